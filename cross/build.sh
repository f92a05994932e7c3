#!/usr/bin/env bash
# Builds Marquee for a board and packages it:
#   cross/build.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [cargo build flags…]
# leaves target/TARGET/release/marquee and target/TARGET/debian/marquee_VERSION_ARCH.deb.
# Extra flags go to cargo build, e.g. `--features camera` (see cross/README.md).
# Each step it needs is installed here when missing (run as root, or do them by hand):
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross      (aarch64)
#   apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross    (armv7)
#   rustup target add TARGET
#   cargo install cargo-deb --locked --version 3.8.0
# .cargo/config.toml names the linkers.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
  aarch64-unknown-linux-gnu) apt_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross); cc=aarch64-linux-gnu-gcc ;;
  armv7-unknown-linux-gnueabihf) apt_pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross); cc=arm-linux-gnueabihf-gcc ;;
  *) echo "usage: cross/build.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [cargo flags]" >&2; exit 2 ;;
esac
shift

step() { echo "cross/build.sh: $*" >&2; }

# 1. Debian's cross gcc: the linker, and the C compiler for ring (rustls' crypto).
if ! command -v "$cc" >/dev/null; then
  step "installing ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
# 2. The target's Rust standard library.
if ! rustup target list --installed | grep -qx "$target"; then
  step "rustup target add $target"
  rustup target add "$target"
fi
# 3. cargo-deb, pinned: the .deb layout is tested against its output.
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
  step "cargo install cargo-deb 3.8.0"
  cargo install cargo-deb --locked --version 3.8.0
fi

step "cargo build --release --target $target $*"
cargo build --release --target "$target" "$@"

# CARGO_TARGET_DIR may point at a cache elsewhere (CI does): the contract's paths are
# in this checkout's target/.
built="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$target/release/marquee"
mkdir -p "target/$target/release" "target/$target/debian"
if [ "$(realpath "$built")" != "$(realpath -m "target/$target/release/marquee")" ]; then
  cp "$built" "target/$target/release/marquee"
fi

step "cargo deb --target $target"
rm -f "target/$target/debian/"marquee_*.deb
cargo deb --no-build --target "$target" --output "target/$target/debian/"
ls -l "target/$target/release/marquee" "target/$target/debian/"marquee_*.deb
