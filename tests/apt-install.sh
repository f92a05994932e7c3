#!/usr/bin/env bash
# tests/apt-install.sh CALLER PACKAGE...: installs Debian packages with apt-get when
# run as root or with passwordless sudo; otherwise prints one line naming them (as
# CALLER) and exits 1. Shared by tests/setup.sh and tests/gpu-check.sh.
set -euo pipefail
caller="$1"
shift
if [ "$(id -u)" = 0 ]; then
  apt=(apt-get)
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  apt=(sudo apt-get)
else
  echo "$caller: missing Debian packages: $* (install them: sudo apt-get install $*)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq --no-install-recommends "$@" >/dev/null
