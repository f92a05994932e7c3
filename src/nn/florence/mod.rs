//! Florence-2 in burn: the DaViT vision tower, the projector into the text space, and
//! the BART encoder-decoder with greedy and beam-search generation. No I/O here: the
//! processor, tokenizer and weight files live in `caption` and `model::florence`.

pub mod bart;
pub mod config;
pub mod davit;
pub mod generate;
pub mod projector;

use bart::{Bart, DecoderCache};
use burn::prelude::*;
use config::FlorenceConfig;
use davit::{Davit, Tap};
use projector::Projector;

/// Florence-2: DaViT, the projector and BART.
#[derive(Module, Debug)]
pub struct Florence2 {
    vision_tower: Davit,
    multi_modal_projector: Projector,
    language_model: Bart,
}

impl Florence2 {
    /// A Florence-2 of shape `c`, randomly initialised.
    pub fn new(c: &FlorenceConfig, device: &Device) -> Self {
        Self {
            vision_tower: Davit::new(&c.vision_config, device),
            multi_modal_projector: Projector::new(&c.vision_config, device),
            language_model: Bart::new(&c.text_config, device),
        }
    }

    /// `[B, 3, H, W]` pixels -> `[B, 1 + h*w, d]` image tokens.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.encode_image_taps(pixels, None)
    }

    /// `encode_image`, recording each stage's output in `taps` (parity tests).
    pub fn encode_image_taps(&self, pixels: Tensor<4>, taps: Option<&mut Vec<Tap>>) -> Tensor<3> {
        let (x, h, w) = self.vision_tower.forward_taps(pixels, taps);
        self.multi_modal_projector.forward(x, h, w)
    }

    /// The encoder input: image tokens, then the embedded prompt. The mask covers both.
    pub fn merge(
        &self,
        image: Tensor<3>,
        prompt: Tensor<2, Int>,
        prompt_mask: Tensor<2>,
    ) -> (Tensor<3>, Tensor<2>) {
        let [b, n, _] = image.dims();
        let device = image.device();
        let text = self.language_model.embed_tokens(prompt);
        let mask = Tensor::cat(vec![Tensor::ones([b, n], &device), prompt_mask], 1);
        (Tensor::cat(vec![image, text], 1), mask)
    }

    /// The BART encoder over the merged tokens.
    pub fn encode(&self, embeds: Tensor<3>, mask: Tensor<2>) -> Tensor<3> {
        self.language_model.encode(embeds, mask)
    }

    /// A decoder cache for `encoded`, ready for the first step.
    pub fn start(&self, encoded: Tensor<3>, mask: Tensor<2>) -> DecoderCache {
        self.language_model.start(encoded, mask)
    }

    /// Logits `[B, T, vocab]` for `ids` following the cached prefix.
    pub fn decode_logits(&self, ids: Tensor<2, Int>, cache: &mut DecoderCache) -> Tensor<3> {
        let hidden = self.language_model.decode(ids, cache);
        self.language_model.logits(hidden)
    }

    /// Longest encoder input (image tokens + prompt) the position table covers.
    pub fn max_positions(&self) -> usize {
        self.language_model.max_positions()
    }
}
