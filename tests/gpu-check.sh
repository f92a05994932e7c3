#!/usr/bin/env bash
# The wgpu backend's parity, on whatever Vulkan adapter the machine has; on a
# machine without a GPU, Mesa's lavapipe (a Vulkan driver on the CPU), so CI runs
# the GPU code path. Run after tests/setup.sh (it needs the fetched towers).
#   1. installs mesa-vulkan-drivers when no Vulkan driver is there (as root or with
#      sudo; otherwise one line names it);
#   2. `cargo test --profile gpu-check --features wgpu --test it` for the backend
#      tests: the fixture parity tests on wgpu, and the shipped model's scores on
#      wgpu against flex. The gpu-check profile (Cargo.toml) leaves the
#      wgpu stack unoptimised, which halves its cold build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt=(apt-get)
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt=(sudo apt-get)
  else
    echo "tests/gpu-check.sh: no Vulkan driver (install one: sudo apt-get install mesa-vulkan-drivers)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${apt[@]}" update -qq
  "${apt[@]}" install -y -qq --no-install-recommends mesa-vulkan-drivers >/dev/null
fi
# Only wgpu in the fixture tests: the release run checks flex and ndarray.
MARQUEE_PARITY_BACKENDS=wgpu cargo test --profile gpu-check --features wgpu --test it -- \
  parity::efficientnet parity::minilm parity::wgpu
