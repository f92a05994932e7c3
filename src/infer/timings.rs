//! Where one poster's time went, stage by stage, in milliseconds.

use serde::{Deserialize, Serialize};

/// Milliseconds per stage of one poster. The classifier fills the first seven; the
/// appliance adds the caption wait and the whole scan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// Resizing and normalising the poster (both views when the model mirrors it).
    pub preprocess: f64,
    /// Overview and caption to wordpieces.
    pub tokenize: f64,
    /// The poster tower alone.
    pub image_tower: f64,
    /// The text tower alone.
    pub text_tower: f64,
    /// Both towers, run side by side.
    pub towers: f64,
    /// The fusion networks and the decision.
    pub fusion: f64,
    /// Decode to prediction.
    pub total: f64,
    /// How long the scan waited for its caption (the appliance, when it captions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<f64>,
    /// Caption and classification together (the appliance).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<f64>,
}

impl Timings {
    /// The stages in the order they ran, for people reading them.
    pub fn stages(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![
            ("preprocess", self.preprocess),
            ("tokenize", self.tokenize),
            ("image_tower", self.image_tower),
            ("text_tower", self.text_tower),
            ("towers", self.towers),
            ("fusion", self.fusion),
            ("total", self.total),
        ];
        out.extend(self.caption.map(|ms| ("caption", ms)));
        out.extend(self.pipeline.map(|ms| ("pipeline", ms)));
        out
    }
}
