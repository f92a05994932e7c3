//! Small tools that every layer may use. They import nothing of Marquee, so they sit
//! on the ground floor beside `nn` (see docs/ARCHITECTURE.md).

pub mod backoff;
pub mod limited;
pub mod progress;
pub mod service;
pub mod stats;
pub mod tls;
