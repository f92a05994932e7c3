//! The fusion network on host rows (see `nn::host_ops`) for the case that serving
//! meets: one poster, its text (or none), nothing masked. Each burn op at these
//! sizes (about a hundred tokens of width 128) costs more in dispatch than in
//! arithmetic; here the step is one GEMM or one pass. Pooled maps (the teacher)
//! and masks keep burn's path.

use super::{EarlyFusion, IMAGE, SUMMARY, TEXT};
use crate::nn::host_ops::{Dense, Norm, SelfAttention, add_into, host};

/// burn's LayerNorm default, which `EarlyFusion` and its encoder use.
const LN_EPS: f64 = 1e-5;

struct Layer {
    attn_norm: Norm,
    attn: SelfAttention,
    ffn_norm: Norm,
    ffn_in: Dense,
    ffn_out: Dense,
}

/// An [`EarlyFusion`] copied for the host kernels.
pub struct HostFusion {
    image_proj: Dense,
    /// `[cells, d]`, with the image modality embedding already added.
    image_pos: Vec<f32>,
    text_proj: Dense,
    /// The text modality embedding, `[d]`.
    text_marker: Vec<f32>,
    /// The summary token, `[d]`.
    summary: Vec<f32>,
    in_norm: Norm,
    layers: Vec<Layer>,
    out_norm: Norm,
    out: Dense,
}

impl HostFusion {
    /// `None` for a network that pools its map or lacks a modality: burn serves those.
    pub fn new(m: &EarlyFusion) -> Option<Self> {
        let (Some(image_proj), Some(pos), Some(text_proj), false) =
            (&m.image_proj, &m.image_pos, &m.text_proj, m.pool)
        else {
            return None;
        };
        let markers = host(m.modality.weight.val());
        let d = markers.len() / 3;
        let marker = |k: i64| markers[k as usize * d..(k as usize + 1) * d].to_vec();
        let mut image_pos = host(pos.val());
        for row in image_pos.chunks_exact_mut(d) {
            add_into(row, &marker(IMAGE));
        }
        let layers = m
            .encoder
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: Norm::from_layer_norm(&l.norm_2, LN_EPS),
                attn: SelfAttention::new(
                    &l.mha.query,
                    &l.mha.key,
                    &l.mha.value,
                    &l.mha.output,
                    l.mha.n_heads,
                ),
                ffn_norm: Norm::from_layer_norm(&l.norm_1, LN_EPS),
                ffn_in: Dense::from_linear(&l.pwff.linear_inner),
                ffn_out: Dense::from_linear(&l.pwff.linear_outer),
            })
            .collect();
        Some(Self {
            image_proj: Dense::from_linear(image_proj),
            image_pos,
            text_proj: Dense::from_linear(text_proj),
            text_marker: marker(TEXT),
            summary: marker(SUMMARY),
            in_norm: Norm::from_layer_norm(&m.in_norm, LN_EPS),
            layers,
            out_norm: Norm::from_layer_norm(&m.out_norm, LN_EPS),
            out: Dense::from_linear(&m.out),
        })
    }

    /// Genre logits of one poster's map tokens `[cells, image_dim]` and its text
    /// tokens `[len, text_dim]` (empty for no text).
    pub fn forward(&self, image: &[f32], text: &[f32]) -> Vec<f32> {
        let d = self.summary.len();
        let mut x = self.summary.clone();
        let mut img = self.image_proj.forward(image);
        assert_eq!(
            img.len(),
            self.image_pos.len(),
            "the map has the trained grid"
        );
        add_into(&mut img, &self.image_pos);
        x.extend(img);
        if !text.is_empty() {
            let mut t = self.text_proj.forward(text);
            for row in t.chunks_exact_mut(d) {
                add_into(row, &self.text_marker);
            }
            x.extend(t);
        }
        self.in_norm.apply(&mut x);
        for layer in &self.layers {
            let a = layer.attn.forward(&layer.attn_norm.of(&x));
            add_into(&mut x, &a);
            let h = layer.ffn_in.forward_gelu(&layer.ffn_norm.of(&x));
            add_into(&mut x, &layer.ffn_out.forward(&h));
        }
        self.out.forward(&self.out_norm.of(&x[..d]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;
    use crate::nn::cpu_ops::tests::rel_l2;
    use crate::nn::fusion::{FusionConfig, FusionInput};
    use burn::prelude::*;
    use burn::tensor::Distribution;

    /// Random weights, with and without text: the host network computes burn's
    /// (whose one text slot is masked when there is no text).
    #[test]
    fn host_fusion_equals_burns() {
        let device = Device::flex();
        device.seed(13);
        let c = FusionConfig {
            pool: false,
            image_dim: crate::nn::efficientnet::FEATURE_DIM,
            text_dim: 384,
            ..config()
        };
        let m = EarlyFusion::new(&c, &device);
        let host_m = HostFusion::new(&m).expect("an unpooled two-modality network");
        let cells = c.image_tokens();
        let rand = |n: usize| host(Tensor::<1>::random([n], Distribution::Default, &device));
        let image = rand(cells * c.image_dim);
        for len in [0, 7] {
            let text = rand(len * c.text_dim);
            // burn's input as serving builds it: no text is one masked slot.
            let slots = len.max(1);
            let mut padded = text.clone();
            padded.resize(slots * c.text_dim, 0.0);
            let input = FusionInput {
                image: Tensor::from_data(
                    TensorData::new(image.clone(), [1, cells, c.image_dim]),
                    &device,
                ),
                image_hidden: Tensor::from_data(TensorData::new(vec![false], [1, 1]), &device),
                text: Tensor::from_data(TensorData::new(padded, [1, slots, c.text_dim]), &device),
                text_mask: Tensor::from_data(
                    TensorData::new(vec![len == 0; slots], [1, slots]),
                    &device,
                ),
            };
            let want = host(m.forward(input));
            let got = host_m.forward(&image, &text);
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "text {len}: rel L2 {err:.3e}");
        }
    }
}
