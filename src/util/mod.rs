//! Small tools that every layer may use. They import nothing of Marquee, so they sit
//! on the ground floor beside `nn` (see docs/ARCHITECTURE.md).

pub mod backoff;
pub mod limited;
pub mod progress;
pub mod service;
pub mod stats;
pub mod tls;

/// Lower-case hex of bytes (cache keys, sha256 checks).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
