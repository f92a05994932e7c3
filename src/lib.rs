//! Marquee: movie-poster genre classification for edge appliances.
//!
//! The folders follow the pipeline: `preprocess` (bytes -> tensors) feeds the pure
//! networks in `nn`; `model` loads and saves their weights; `classify` joins them into
//! a `Classifier`; `train` fits and evaluates heads on a manifest. The appliance
//! (`appliance`) runs `source` -> `pipeline` (classify) -> `publish` (MQTT) + `status`.

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
