# Sourced by scripts/setup.sh and scripts/setup-deploy.sh: `install_venv DIR REQUIREMENTS`
# creates the venv DIR (with pip in it, for whoever wants to add to it by hand) and installs
# the pinned REQUIREMENTS into it with uv.
#
# uv, not pip, installs: pip unpacked torch and its CUDA libraries (4.9 GB) in about six minutes
# on a 2-core machine, most of `make test`'s setup; uv takes under half a minute for the same
# pins, downloads included, and a second venv from its cache (~/.cache/uv, or UV_CACHE_DIR) is
# linked rather than unpacked again. uv itself, pinned, comes from PyPI with pip into .tools/uv.
# pip's own settings are carried over where uv has the same one: PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS (a folder of wheels) and PIP_CERT (a CA bundle, as
# SSL_CERT_FILE unless that is set).

UV_VERSION=0.13.9
UV=.tools/uv/bin/uv

# The version of uv at .tools/uv ("uv 0.13.9 (x86_64-unknown-linux-gnu)" -> "0.13.9").
uv_version() {
  [ -x "$UV" ] && "$UV" --version 2>/dev/null | cut -d' ' -f2
}

# Installs uv $UV_VERSION into .tools/uv unless it is there already.
ensure_uv() {
  if [ "$(uv_version)" = "$UV_VERSION" ]; then
    return 0
  fi
  local python=${PYTHON:-python3}
  echo "setup: installing uv $UV_VERSION from PyPI into .tools/uv"
  rm -rf .tools/uv
  "$python" -m venv .tools/uv
  .tools/uv/bin/pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  [ "$(uv_version)" = "$UV_VERSION" ] || {
    echo "setup: $UV does not run as uv $UV_VERSION after installing it with pip" >&2
    return 1
  }
}

install_venv() {
  local dir=$1 req=$2 python=${PYTHON:-python3}
  ensure_uv
  [ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
  local args=(pip install --quiet --python "$dir/bin/python" -r "$req")
  [ -n "${PIP_INDEX_URL:-}" ] && args+=(--index-url "$PIP_INDEX_URL")
  [ -n "${PIP_EXTRA_INDEX_URL:-}" ] && args+=(--extra-index-url "$PIP_EXTRA_INDEX_URL")
  [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ] && args+=(--find-links "$PIP_FIND_LINKS")
  if [ -n "${PIP_CERT:-}" ] && [ -z "${SSL_CERT_FILE:-}" ]; then
    SSL_CERT_FILE=$PIP_CERT "$UV" "${args[@]}"
  else
    "$UV" "${args[@]}"
  fi
}
