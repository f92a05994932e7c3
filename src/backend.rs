//! Picks the burn device at run time: burn 0.22 has no backend type parameter.

use anyhow::{Result, bail};
use burn::prelude::Device;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn-flex: pure-Rust CPU backend (default).
    Flex,
    /// burn-ndarray: the older CPU backend.
    Ndarray,
    /// burn-wgpu: GPU through Vulkan/Metal (needs the `wgpu` cargo feature).
    Wgpu,
}

impl Backend {
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            #[allow(deprecated)]
            Backend::Ndarray => Ok(Device::ndarray()),
            Backend::Wgpu => wgpu_device(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Ndarray => "ndarray",
            Backend::Wgpu => "wgpu",
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device> {
    Ok(Device::wgpu(Default::default()))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device> {
    bail!("this build has no wgpu backend: rebuild with `cargo build --release --features wgpu`")
}
