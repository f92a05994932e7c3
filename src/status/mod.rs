//! The local status page and its JSON, SSE and Prometheus endpoints.

pub mod metrics;
pub mod server;
