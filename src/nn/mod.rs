//! Pure networks: tensors in, tensors out. No files, no network, no clocks.
pub mod bert;
pub mod cpu_ops;
pub mod efficientnet;
pub mod florence;
pub mod fusion;
pub mod gemv;
pub mod host_ops;
pub mod sgemm;
mod simd;
