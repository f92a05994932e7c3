//! The fusion head of the foundation model: it reads the frozen towers' pooled
//! features and scores the genres. Each modality is projected to a shared width and
//! the projections are summed; an absent modality contributes a learned "missing"
//! vector instead, so one head serves poster-only, text-only and both.

use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;

/// Which inputs a head reads, and its size. Stored in the model directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    pub image_dim: usize,
    pub text_dim: usize,
    pub use_image: bool,
    pub use_text: bool,
    pub hidden: usize,
    pub classes: usize,
    pub dropout: f64,
}

/// One batch of head inputs. `text_present` is `[B, 1]`, 1 where the row has text.
#[derive(Debug, Clone)]
pub struct HeadInput {
    pub image: Tensor<2>,
    pub text: Tensor<2>,
    pub text_present: Tensor<2>,
}

#[derive(Module, Debug)]
pub struct FusionHead {
    image: Option<Linear>,
    text: Option<Linear>,
    /// Stands in for the text projection when a row has no text.
    text_missing: Option<Linear>,
    norm: LayerNorm,
    dropout: Dropout,
    out: Linear,
}

impl FusionHead {
    pub fn new(c: &HeadConfig, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            image: c.use_image.then(|| lin(c.image_dim, c.hidden)),
            text: c.use_text.then(|| lin(c.text_dim, c.hidden)),
            // A bias-only layer fed a constant 1: the learned "no text" vector.
            text_missing: c
                .use_text
                .then(|| LinearConfig::new(1, c.hidden).with_bias(false).init(device)),
            norm: LayerNormConfig::new(c.hidden).init(device),
            dropout: DropoutConfig::new(c.dropout).init(),
            out: lin(c.hidden, c.classes),
        }
    }

    /// Genre logits `[B, classes]`.
    pub fn forward(&self, x: HeadInput) -> Tensor<2> {
        let mut h: Option<Tensor<2>> = None;
        let mut add = |t: Tensor<2>| {
            h = Some(match h.take() {
                Some(a) => a + t,
                None => t,
            })
        };
        if let Some(img) = &self.image {
            add(img.forward(self.dropout.forward(x.image)));
        }
        if let (Some(txt), Some(missing)) = (&self.text, &self.text_missing) {
            let present = x.text_present;
            let proj = txt.forward(self.dropout.forward(x.text)) * present.clone();
            add(proj + missing.forward(present.neg() + 1.0));
        }
        let h = h.expect("a head reads at least one modality");
        self.out
            .forward(self.dropout.forward(gelu(self.norm.forward(h))))
    }
}
