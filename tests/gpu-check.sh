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
  tests/apt-install.sh tests/gpu-check.sh mesa-vulkan-drivers
fi
# Only wgpu in the fixture tests: the release run checks flex and ndarray.
MARQUEE_PARITY_BACKENDS=wgpu cargo test --profile gpu-check --features wgpu --test it -- \
  parity::efficientnet parity::minilm parity::wgpu
