# Sourced by scripts/test (or by hand: `source scripts/services.sh`): starts the servers that the
# distributed-mode tests use, each private to this run, on 127.0.0.1 only:
#   PostgreSQL (Debian's postgresql 15): a throw-away cluster (initdb) in a temp dir, password
#     authentication with a random password, unix socket in the same temp dir;
#   Redis (Debian's redis-server): no persistence, data dir in the same temp dir.
# Exports CONSENTRY_TEST_POSTGRES_URL (an admin URL: tests create and drop a database of their own
# through it, see tests/services.py) and CONSENTRY_TEST_REDIS_URL.
# Idempotent: a URL that is already set and answers is kept (a developer's own servers, or a
# second `source`), so nothing is started twice. `consentry_services_stop` stops what this file
# started and removes the temp dir; scripts/test runs it from an EXIT trap.
# PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` system user.

CONSENTRY_PG_BIN=${CONSENTRY_PG_BIN:-/usr/lib/postgresql/15/bin}

_consentry_port_free() {
  # true when nothing listens on 127.0.0.1:$1
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

_consentry_free_port() {
  local port=$1
  while ! _consentry_port_free "$port"; do
    port=$((port + 1))
    if [ "$port" -gt $(($1 + 200)) ]; then
      echo "services: no free port from $1" >&2
      return 1
    fi
  done
  echo "$port"
}

_consentry_as_pg() {
  # run a PostgreSQL program as the cluster's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_consentry_services_dir() {
  if [ -z "${CONSENTRY_SERVICES_DIR:-}" ]; then
    CONSENTRY_SERVICES_DIR=$(mktemp -d /tmp/consentry-services.XXXXXX)
    export CONSENTRY_SERVICES_DIR
  fi
}

_consentry_start_postgres() {
  if [ -n "${CONSENTRY_TEST_POSTGRES_URL:-}" ] && [ -n "${CONSENTRY_PG_PORT:-}" ] \
    && "$CONSENTRY_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$CONSENTRY_PG_PORT"; then
    return 0  # started by an earlier `source` in this shell
  fi
  if [ -n "${CONSENTRY_TEST_POSTGRES_URL:-}" ] && [ -z "${CONSENTRY_PG_PORT:-}" ]; then
    return 0  # the developer's own server: the tests report it if it does not answer
  fi
  if [ ! -x "$CONSENTRY_PG_BIN/initdb" ]; then
    echo "services: PostgreSQL not found at $CONSENTRY_PG_BIN (apt-get install postgresql)" >&2
    return 1
  fi
  _consentry_services_dir
  local dir="$CONSENTRY_SERVICES_DIR/pg" port password
  port=$(_consentry_free_port "${CONSENTRY_PG_PORT:-54329}")
  password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
  rm -rf "$dir"  # a cluster of an earlier `source` whose server has gone
  mkdir -p "$dir"
  printf '%s\n' "$password" >"$dir/pwfile"
  chmod 700 "$dir" && chmod 600 "$dir/pwfile"
  if [ "$(id -u)" = 0 ]; then
    chmod 711 "$CONSENTRY_SERVICES_DIR"  # postgres may enter, not list
    chown -R postgres: "$dir"
  fi
  _consentry_as_pg "$CONSENTRY_PG_BIN/initdb" -D "$dir/data" -U consentry --auth=scram-sha-256 \
    --pwfile="$dir/pwfile" -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
    echo "services: initdb failed:" >&2; cat "$dir/initdb.log" >&2; return 1; }
  rm -f "$dir/pwfile"
  # fsync off: a test cluster need not survive a power cut, and it is much faster.
  # Another run may take the same free port at the same moment: then try the next one.
  local attempt
  for attempt in 1 2 3 4 5; do
    if _consentry_as_pg "$CONSENTRY_PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off -c max_connections=200" start >/dev/null; then
      break
    fi
    if [ "$attempt" = 5 ]; then
      echo "services: PostgreSQL did not start:" >&2; cat "$dir/server.log" >&2; return 1
    fi
    port=$(_consentry_free_port $((port + 1)))
  done
  CONSENTRY_PG_PORT=$port
  CONSENTRY_PG_DATA=$dir/data
  CONSENTRY_TEST_POSTGRES_URL="postgresql+psycopg://consentry:$password@127.0.0.1:$port/postgres"
  export CONSENTRY_PG_PORT CONSENTRY_PG_DATA CONSENTRY_TEST_POSTGRES_URL
  echo "== PostgreSQL on 127.0.0.1:$port (data in $dir/data)" >&2
}

_consentry_start_redis() {
  if [ -n "${CONSENTRY_TEST_REDIS_URL:-}" ] && [ -n "${CONSENTRY_REDIS_PORT:-}" ] \
    && redis-cli -h 127.0.0.1 -p "$CONSENTRY_REDIS_PORT" ping >/dev/null 2>&1; then
    return 0
  fi
  if [ -n "${CONSENTRY_TEST_REDIS_URL:-}" ] && [ -z "${CONSENTRY_REDIS_PORT:-}" ]; then
    return 0
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "services: redis-server not found (apt-get install redis-server)" >&2
    return 1
  fi
  _consentry_services_dir
  local dir="$CONSENTRY_SERVICES_DIR/redis" port i
  port=$(_consentry_free_port "${CONSENTRY_REDIS_PORT:-63799}")
  mkdir -p "$dir" && chmod 700 "$dir"
  local attempt started
  for attempt in 1 2 3 4 5; do
    rm -f "$dir/redis.pid"
    redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes --save '' \
      --appendonly no --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
      --logfile "$dir/redis.log" >/dev/null
    started=
    for i in $(seq 50); do
      # Ours only if the server answering is the process of our pid file (another run may have
      # taken the port at the same moment; then ours exits and we try the next port).
      if [ -s "$dir/redis.pid" ] && redis-cli -h 127.0.0.1 -p "$port" info server 2>/dev/null \
        | tr -d '\r' | grep -qx "process_id:$(cat "$dir/redis.pid")"; then
        started=1; break
      fi
      sleep 0.1
    done
    [ -n "$started" ] && break
    if [ "$attempt" = 5 ]; then
      echo "services: Redis did not start:" >&2; cat "$dir/redis.log" >&2; return 1
    fi
    port=$(_consentry_free_port $((port + 1)))
  done
  CONSENTRY_REDIS_PORT=$port
  CONSENTRY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  export CONSENTRY_REDIS_PORT CONSENTRY_TEST_REDIS_URL
  echo "== Redis on 127.0.0.1:$port" >&2
}

consentry_services_stop() {
  # Stops only what this file started (a developer's own servers have no *_PORT set here).
  if [ -n "${CONSENTRY_PG_DATA:-}" ] && [ -d "$CONSENTRY_PG_DATA" ]; then
    _consentry_as_pg "$CONSENTRY_PG_BIN/pg_ctl" -D "$CONSENTRY_PG_DATA" -m immediate -w \
      stop >/dev/null 2>&1 || true
  fi
  if [ -n "${CONSENTRY_SERVICES_DIR:-}" ] && [ -f "$CONSENTRY_SERVICES_DIR/redis/redis.pid" ]; then
    kill "$(cat "$CONSENTRY_SERVICES_DIR/redis/redis.pid")" 2>/dev/null || true
  fi
  if [ -n "${CONSENTRY_SERVICES_DIR:-}" ]; then
    rm -rf "$CONSENTRY_SERVICES_DIR"
  fi
  unset CONSENTRY_SERVICES_DIR CONSENTRY_PG_DATA CONSENTRY_PG_PORT CONSENTRY_REDIS_PORT \
    CONSENTRY_TEST_POSTGRES_URL CONSENTRY_TEST_REDIS_URL
}

_consentry_start_postgres
_consentry_start_redis
