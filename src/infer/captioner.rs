//! The one `Captioner` trait, with the types a caption travels in. Florence-2 on the
//! device (`caption::local`) and a caption server (`caption::remote`) implement it;
//! "no captioner" is `None` where one is optional. Serving, the appliance's caption
//! stage and training captions all call it, so they cannot drift apart.

use super::task::Task;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Per-request generation overrides; `None` keeps the model's generation_config.json.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptionOptions {
    /// Beams of the search.
    pub beams: Option<usize>,
    /// Most tokens to generate.
    pub max_new_tokens: Option<usize>,
}

/// Milliseconds per stage of one caption.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimings {
    /// Resizing and normalising the image.
    pub preprocess: f64,
    /// The DaViT vision encoder and the projector.
    pub vision: f64,
    /// The BART encoder over image and prompt tokens.
    pub encoder: f64,
    /// All decoder steps.
    pub decoder: f64,
    /// One decoder step, on average.
    pub per_token: f64,
    /// Image to caption.
    pub total: f64,
}

/// One caption and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionOutput {
    /// The caption text.
    pub caption: String,
    /// The task prompt it answered.
    pub task: Task,
    /// The model that made it.
    pub model: String,
    /// Generated tokens (the decoder start token not counted).
    pub tokens: usize,
    /// What the encoder read: the image's tokens and the task prompt's.
    #[serde(default)]
    pub prompt_tokens: usize,
    /// The generated token ids.
    pub ids: Vec<u32>,
    /// Where the time went.
    pub timings_ms: StageTimings,
}

/// Something that captions posters.
pub trait Captioner: Send + Sync {
    /// "local florence-2-base" or "remote http://…": names the source in status
    /// lines, cache keys and the model card.
    fn describe(&self) -> String;

    /// Captions a decoded poster.
    fn caption(&self, image: &RgbImage, task: Task) -> anyhow::Result<CaptionOutput>;

    /// Captions an encoded image (a file's bytes). By default it is decoded (with the
    /// decode limits) and captioned; a remote captioner sends the bytes as they are.
    fn caption_encoded(&self, bytes: &[u8], task: Task) -> anyhow::Result<CaptionOutput> {
        let image = crate::preprocess::image::decode(bytes)?;
        self.caption(&image, task)
    }
}
