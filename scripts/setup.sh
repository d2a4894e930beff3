#!/usr/bin/env bash
# Installs what building and testing stagecoach needs, skipping whatever is already there, and
# then checks every prerequisite it relies on (a file or a working command, not only a package
# name), failing with what is missing:
# - protoc (Debian protobuf-compiler) and the protobuf well-known types (libprotobuf-dev: the
#   etcd client's build imports google/protobuf/descriptor.proto);
# - the Debian packages a target asks for, as package:check arguments (see SERVICES in the
#   Makefile), where check is a command name or an absolute file path;
# - a Python venv at .venv with torch (which also provides libtorch to the worker build),
#   transformers, safetensors and numpy, pinned in python/requirements.txt, installed with uv
#   (scripts/pyenv.sh).
# Every package is installed by name: nothing relies on apt's recommends.
set -euo pipefail
cd "$(dirname "$0")/.."

# package:check pairs the build itself always needs.
prereqs=(
  "protobuf-compiler:protoc"
  "libprotobuf-dev:/usr/include/google/protobuf/descriptor.proto"
  "libprotobuf-dev:/usr/include/google/protobuf/struct.proto"
)
prereqs+=("$@")

# Whether the prerequisite `check` (a command on PATH or an absolute path) is there.
present() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

need_apt=()
for pair in "${prereqs[@]}"; do
  name=${pair%%:*}; check=${pair#*:}
  if ! present "$check"; then
    case " ${need_apt[*]:-} " in *" $name "*) ;; *) need_apt+=("$name") ;; esac
  fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
missing=()
for pair in "${prereqs[@]}"; do
  name=${pair%%:*}; check=${pair#*:}
  present "$check" || missing+=("$check (Debian package $name)")
done
# protoc must run, not only exist.
if present protoc && ! protoc --version >/dev/null 2>&1; then
  missing+=("a working protoc (protoc --version fails)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: still missing after installing: ${missing[*]}" >&2
  echo "setup: install them by hand (apt-get install <package>) and run make again" >&2
  exit 1
fi

req=python/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
# The venv is complete when its stamp matches and the libtorch the worker links is in it.
venv_ok() {
  [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    compgen -G ".venv/lib/python3*/site-packages/torch/lib/libtorch_cpu.so" >/dev/null
}
if venv_ok; then
  exit 0
fi
. scripts/pyenv.sh
echo "setup: creating .venv with $(grep -v '^#' "$req" | tr '\n' ' ')(torch is a large download)"
install_venv .venv "$req"
echo "$want" > "$stamp"
venv_ok || { echo "setup: .venv has no torch/lib/libtorch_cpu.so after installing $req" >&2; exit 1; }
