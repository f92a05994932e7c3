//! Marquee: movie-poster genre classification for edge appliances.
//!
//! The folders follow the pipeline: `preprocess` (bytes -> tensors) feeds the pure
//! networks in `nn`; `model` loads and saves their weights; `infer` joins them into
//! a `Classifier`; `caption` runs Florence-2 (here or on a server); `train` fits and
//! evaluates the networks on a manifest. The appliance (`appliance`) runs `source`
//! -> `pipeline` (caption, classify) -> `publish` (MQTT) + `status`.
//! docs/ARCHITECTURE.md draws the layers; `tests/it/layers.rs` holds them.

#![warn(missing_docs)]

pub mod appliance;
pub mod backend;
pub mod bench;
pub mod caption;
pub mod config;
pub mod health;
pub mod http;
pub mod infer;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod preprocess;
pub mod publish;
pub mod source;
pub mod status;
pub mod train;
pub mod util;
