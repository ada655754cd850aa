# Sourced by scripts/demo and scripts/test: installs what a fresh machine lacks.
# exiftool comes from Debian's libimage-exiftool-perl; uv from PyPI; Python packages from uv.lock.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v exiftool >/dev/null 2>&1; then
  echo "== installing exiftool (Debian package libimage-exiftool-perl)" >&2
  if command -v apt-get >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libimage-exiftool-perl >/dev/null
  else
    echo "exiftool is required: install it with your package manager (Debian: libimage-exiftool-perl)" >&2
    exit 2
  fi
fi
if ! command -v uv >/dev/null 2>&1; then
  echo "== installing uv" >&2
  python3 -m pip install --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --locked --quiet
