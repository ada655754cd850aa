# Sourced by scripts/demo and scripts/test: installs what a fresh machine lacks.
# exiftool comes from Debian's libimage-exiftool-perl; uv from PyPI; Python packages from uv.lock.
# scripts/test also sets CONSENTRY_TEST_PACKAGES: the servers and the browser its tests use
# (Redis, PostgreSQL, Chromium), installed from Debian's packages, never downloaded by a tool.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_debian=()
command -v exiftool >/dev/null 2>&1 || need_debian+=(libimage-exiftool-perl)
for pair in ${CONSENTRY_TEST_PACKAGES:-}; do
  # each entry is program=package: install the package when the program is missing
  program=${pair%%=*}; package=${pair#*=}
  command -v "$program" >/dev/null 2>&1 || [ -x "$program" ] || need_debian+=("$package")
done
if [ ${#need_debian[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_debian[*]}" >&2
  if command -v apt-get >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need_debian[@]}" >/dev/null
  else
    echo "missing: ${need_debian[*]}: install them with your package manager" >&2
    exit 2
  fi
fi
if ! command -v uv >/dev/null 2>&1; then
  echo "== installing uv" >&2
  python3 -m pip install --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --locked --quiet
