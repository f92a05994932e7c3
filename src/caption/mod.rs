//! Captioning, the stage between source and classify: Florence-2 on the device
//! (`local`), or a caption server over HTTP (`remote`: Marquee's own or any
//! OpenAI-compatible vision endpoint), and the server Marquee runs for others
//! (`server`). The networks are in `nn::florence`; this folder does the I/O.

pub mod bench;
pub mod local;
pub mod processor;
pub mod remote;
pub mod server;
pub mod stage;
pub mod task;

use serde::{Deserialize, Serialize};
pub use task::Task;

/// Per-request generation overrides; `None` keeps the model's generation_config.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionOptions {
    pub beams: Option<usize>,
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    pub preprocess: f64,
    pub vision: f64,
    pub encoder: f64,
    pub decoder: f64,
    pub per_token: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionOutput {
    pub caption: String,
    pub task: Task,
    pub model: String,
    /// Generated tokens (the decoder start token not counted).
    pub tokens: usize,
    pub ids: Vec<u32>,
    pub timings_ms: StageTimings,
}
