//! Picks the burn device at run time: burn 0.22 has no backend type parameter.

use anyhow::{Result, bail};
use burn::prelude::Device;

/// A backend of burn's, chosen at run time (`--backend`, `classify.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// wgpu where this build has it and a GPU adapter answers, else flex (one warning).
    Auto,
    /// burn-flex: pure-Rust CPU backend (default).
    Flex,
    /// burn-ndarray: the older CPU backend.
    Ndarray,
    /// burn-wgpu: GPU through Vulkan/Metal (needs the `wgpu` cargo feature).
    Wgpu,
}

impl Backend {
    /// The concrete backend and its device. `auto` settles here, once per call site
    /// that asks, so callers name what actually runs.
    pub fn select(self) -> Result<(Backend, Device)> {
        match self {
            Backend::Flex => Ok((self, Device::flex())),
            #[allow(deprecated)]
            Backend::Ndarray => Ok((self, Device::ndarray())),
            Backend::Wgpu => Ok((self, wgpu_device()?)),
            Backend::Auto => match wgpu_device() {
                Ok(d) => Ok((Backend::Wgpu, d)),
                Err(e) => {
                    tracing::warn!("backend auto: {e:#}; running on the CPU (flex)");
                    Ok((Backend::Flex, Device::flex()))
                }
            },
        }
    }

    /// The device this backend computes on (an error when the build or the machine lacks it).
    pub fn device(self) -> Result<Device> {
        Ok(self.select()?.1)
    }

    /// The backend's name as the CLI and the config spell it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Flex => "flex",
            Backend::Ndarray => "ndarray",
            Backend::Wgpu => "wgpu",
        }
    }
}

/// The GPU device, initialised once: burn's wgpu runtime cannot be set up twice, and
/// initialising it here turns "no adapter" into an error instead of a panic at the
/// first tensor.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device> {
    use std::sync::OnceLock;
    static GPU: OnceLock<Result<Device, String>> = OnceLock::new();
    match GPU.get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string())) {
        Ok(d) => Ok(d.clone()),
        Err(e) => bail!("no GPU adapter for wgpu: {e}"),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device> {
    bail!("this build has no wgpu backend: rebuild with `cargo build --release --features wgpu`")
}
