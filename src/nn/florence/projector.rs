//! From DaViT's last map to encoder tokens: 2-D learned positions, the temporal
//! embedding of frame 0, a mean token in front, a bias-free projection and a LayerNorm.

use super::config::VisionConfig;
use crate::nn::cpu_ops;
use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;

/// The learned 2-D position embedding of the image tokens.
#[derive(Module, Debug)]
pub struct PositionEmbed2d {
    row_embeddings: Embedding,
    column_embeddings: Embedding,
}

/// The sinusoidal temporal embedding.
#[derive(Module, Debug)]
pub struct TemporalEmbed {
    /// Sinusoidal table, a buffer upstream; only row 0 is used for a still image.
    pos_idx_to_embed: Param<Tensor<2>>,
}

/// Image features to the language model's width.
#[derive(Module, Debug)]
pub struct Projector {
    image_position_embed: PositionEmbed2d,
    visual_temporal_embed: TemporalEmbed,
    image_projection: Linear,
    image_proj_norm: LayerNorm,
}

impl Projector {
    /// A projector of shape `c`, randomly initialised.
    pub fn new(c: &VisionConfig, device: &Device) -> Self {
        let dim = *c.embed_dim.last().expect("validated: four stages");
        Self {
            image_position_embed: PositionEmbed2d {
                row_embeddings: EmbeddingConfig::new(c.max_position_embeddings, dim / 2)
                    .init(device),
                column_embeddings: EmbeddingConfig::new(c.max_position_embeddings, dim - dim / 2)
                    .init(device),
            },
            visual_temporal_embed: TemporalEmbed {
                pos_idx_to_embed: burn::nn::Initializer::Zeros
                    .init([c.max_temporal_embeddings, dim], device),
            },
            image_projection: LinearConfig::new(dim, c.projection_dim)
                .with_bias(false)
                .init(device),
            image_proj_norm: LayerNormConfig::new(c.projection_dim).init(device),
        }
    }

    /// `x`: `[B, h*w, C]` on an `h x w` grid -> `[B, 1 + h*w, projection_dim]`.
    pub fn forward(&self, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
        let [_, n, c] = x.dims();
        let device = x.device();
        let pe = &self.image_position_embed;
        let cols = pe
            .column_embeddings
            .forward(Tensor::<1, Int>::arange(0..w as i64, &device).reshape([1, w]))
            .reshape([1, w, c - c / 2])
            .expand([h, w, c - c / 2]);
        let rows = pe
            .row_embeddings
            .forward(Tensor::<1, Int>::arange(0..h as i64, &device).reshape([1, h]))
            .reshape([h, 1, c / 2])
            .expand([h, w, c / 2]);
        let pos = Tensor::cat(vec![cols, rows], 2).reshape([1, n, c]);
        let temporal = self
            .visual_temporal_embed
            .pos_idx_to_embed
            .val()
            .slice(0..1)
            .reshape([1, 1, c]);
        let tokens = x + pos + temporal;
        let mean = tokens.clone().mean_dim(1);
        let feats = Tensor::cat(vec![mean, tokens], 1);
        self.image_proj_norm
            .forward(cpu_ops::linear(&self.image_projection, feats))
    }
}
