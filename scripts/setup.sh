#!/usr/bin/env bash
# Installs what building and testing stagecoach needs, skipping whatever is already there:
# - protoc (Debian protobuf-compiler), needed by the gRPC code generation;
# - a Python venv at .venv with torch (which also provides libtorch to the worker build),
#   transformers, safetensors and numpy, pinned in python/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
for pkg in "$@"; do
  # Extra Debian packages a target asks for (e.g. etcd-server, prometheus), by package:binary.
  bin=${pkg#*:}; name=${pkg%%:*}
  command -v "$bin" >/dev/null 2>&1 || need_apt+=("$name")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

req=python/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
PYTHON=${PYTHON:-python3}
echo "setup: creating .venv with $(grep -v '^#' "$req" | tr '\n' ' ')(torch is a large download)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
