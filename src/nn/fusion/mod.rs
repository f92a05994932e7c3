//! The early-fusion network: poster-region tokens (cells of the EfficientNet feature
//! map) and text tokens (MiniLM hidden states of the overview and caption) are
//! projected to one width, marked with a modality embedding, and attend to each
//! other in joint transformer layers; a summary token reads out the genres.
//!
//! A missing modality is a masked one: the same network scores poster-only,
//! text-only and both, which is what modality dropout trains it for.

mod host;
mod tuned;
pub use host::HostFusion;
pub use tuned::TunedFusion;

use crate::nn::cpu_ops::{attention, host_device, linear_gelu};
use burn::module::Param;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::prelude::*;

/// Shape of a fusion network. Stored in model.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FusionConfig {
    /// Width of an image token (EfficientNet's channels).
    pub image_dim: usize,
    /// Rows and columns of the feature map (fixed by the input size).
    pub image_grid: [usize; 2],
    /// Average 2x2 cells into one token first (fewer tokens, cheaper layers).
    pub pool: bool,
    /// Width of a text token (MiniLM's hidden size).
    pub text_dim: usize,
    /// Reads the poster.
    pub use_image: bool,
    /// Reads the text.
    pub use_text: bool,
    /// Width of the joint layers.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Joint transformer layers.
    pub layers: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Genres scored.
    pub classes: usize,
    /// Dropout in training.
    pub dropout: f64,
}

/// One batch. Token tensors are `[B, N, dim]`; a mask is `[B, N]`, true where the
/// token is absent (padding, a dropped or missing modality).
#[derive(Debug, Clone)]
pub struct FusionInput {
    /// The raw feature map, `[B, h*w, C]`, row-major cells.
    pub image: Tensor<3>,
    /// `[B, 1]`, true where the row's poster is hidden.
    pub image_hidden: Tensor<2, Bool>,
    /// Text tokens, `[B, T, text_dim]`.
    pub text: Tensor<3>,
    /// `[B, T]`, true where a text token is padding.
    pub text_mask: Tensor<2, Bool>,
}

impl FusionConfig {
    /// Image tokens the layers see.
    pub fn image_tokens(&self) -> usize {
        let [h, w] = self.image_grid;
        if self.pool {
            h.div_ceil(2) * w.div_ceil(2)
        } else {
            h * w
        }
    }
}

/// Averages 2x2 blocks of map cells `[B, h*w, C]` (row-major) into `[B, ⌈h/2⌉*⌈w/2⌉, C]`;
/// a block cut by the edge averages the cells it has.
pub fn pool_cells(x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
    let [b, _, c] = x.dims();
    let device = x.device();
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    let padded = Tensor::<4>::zeros([b, 2 * h2, 2 * w2, c], &device)
        .slice_assign([0..b, 0..h, 0..w, 0..c], x.reshape([b, h, w, c]));
    let summed = padded
        .reshape([b, h2, 2, w2, 2 * c])
        .sum_dim(2)
        .reshape([b, h2, w2, 2, c])
        .sum_dim(3)
        .reshape([b, h2 * w2, c]);
    let counts: Vec<f32> = (0..h2)
        .flat_map(|i| (0..w2).map(move |j| ((h - 2 * i).min(2) * (w - 2 * j).min(2)) as f32))
        .collect();
    let counts = Tensor::<1>::from_data(TensorData::new(counts, [h2 * w2]), &device);
    summed / counts.reshape([1, h2 * w2, 1])
}

const SUMMARY: i64 = 0;
const IMAGE: i64 = 1;
const TEXT: i64 = 2;

/// The early-fusion network: projections, modality embeddings, joint layers, a summary token and the genre head.
#[derive(Module, Debug)]
pub struct EarlyFusion {
    image_proj: Option<Linear>,
    /// Learned position of each map cell (row-major).
    image_pos: Option<Param<Tensor<2>>>,
    text_proj: Option<Linear>,
    grid: [usize; 2],
    pool: bool,
    modality: Embedding,
    in_norm: LayerNorm,
    encoder: TransformerEncoder,
    out_norm: LayerNorm,
    dropout: Dropout,
    out: Linear,
}

impl EarlyFusion {
    /// A network of shape `c`, randomly initialised.
    pub fn new(c: &FusionConfig, device: &Device) -> Self {
        let d = c.d_model;
        Self {
            image_proj: c
                .use_image
                .then(|| LinearConfig::new(c.image_dim, d).init(device)),
            image_pos: c.use_image.then(|| {
                Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([c.image_tokens(), d], device)
            }),
            text_proj: c
                .use_text
                .then(|| LinearConfig::new(c.text_dim, d).init(device)),
            grid: c.image_grid,
            pool: c.pool,
            modality: EmbeddingConfig::new(3, d).init(device),
            in_norm: LayerNormConfig::new(d).init(device),
            encoder: TransformerEncoderConfig::new(d, c.d_ff, c.heads, c.layers)
                .with_dropout(c.dropout)
                .with_norm_first(true)
                .init(device),
            out_norm: LayerNormConfig::new(d).init(device),
            dropout: DropoutConfig::new(c.dropout).init(),
            out: LinearConfig::new(d, c.classes).init(device),
        }
    }

    fn marker(&self, kind: i64, b: usize, n: usize, device: &Device) -> Tensor<3> {
        let ids = Tensor::<2, Int>::full([b, n], kind, device);
        self.modality.forward(ids)
    }

    /// Genre logits `[B, classes]`.
    pub fn forward(&self, x: FusionInput) -> Tensor<2> {
        let device = x.image.device();
        let b = x.image.dims()[0];
        let mut parts = vec![self.marker(SUMMARY, b, 1, &device)];
        let mut masks = vec![Tensor::<2, Bool>::from_data(
            TensorData::new(vec![false; b], [b, 1]),
            &device,
        )];
        if let (Some(proj), Some(pos)) = (&self.image_proj, &self.image_pos) {
            let [h, w] = self.grid;
            let img = if self.pool {
                pool_cells(x.image, h, w)
            } else {
                x.image
            };
            let n = img.dims()[1];
            let t = proj.forward(img) + pos.val().unsqueeze::<3>();
            parts.push(t + self.marker(IMAGE, b, n, &device));
            masks.push(x.image_hidden.expand([b, n]));
        }
        if let Some(proj) = &self.text_proj {
            let [_, n, _] = x.text.dims();
            if n > 0 {
                parts.push(proj.forward(x.text) + self.marker(TEXT, b, n, &device));
                masks.push(x.text_mask);
            }
        }
        let h = self
            .dropout
            .forward(self.in_norm.forward(Tensor::cat(parts, 1)));
        let mask = Tensor::cat(masks, 1);
        let h = self.encode(h, mask);
        let [_, _, d] = h.dims();
        let summary = h.slice([0..b, 0..1]).reshape([b, d]);
        self.out
            .forward(self.dropout.forward(self.out_norm.forward(summary)))
    }
}

impl EarlyFusion {
    /// The joint layers. Serving on the host with nothing masked (one poster, its
    /// text unpadded) takes the fused path; training (autodiff, dropout), masks and
    /// GPUs take burn's encoder.
    fn encode(&self, h: Tensor<3>, mask: Tensor<2, Bool>) -> Tensor<3> {
        if host_device(&h.device()) && !mask.clone().any().into_scalar::<bool>() {
            return self.encode_unmasked(h);
        }
        self.encoder
            .forward(TransformerEncoderInput::new(h).mask_pad(mask))
    }

    /// burn's pre-norm encoder layers (norm_2 before attention, norm_1 before the
    /// feed-forward, as burn names them) with the host attention and GELU kernels,
    /// at inference (dropout is the identity).
    fn encode_unmasked(&self, mut x: Tensor<3>) -> Tensor<3> {
        for layer in &self.encoder.layers {
            let m = &layer.mha;
            let h = layer.norm_2.forward(x.clone());
            let (q, k, v) = (
                m.query.forward(h.clone()),
                m.key.forward(h.clone()),
                m.value.forward(h),
            );
            x = x + m.output.forward(attention(q, k, v, m.n_heads));
            let h = layer.norm_1.forward(x.clone());
            x = x + layer
                .pwff
                .linear_outer
                .forward(linear_gelu(&layer.pwff.linear_inner, h));
        }
        x
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn dev() -> Device {
        Device::flex()
    }

    #[test]
    fn fused_layers_equal_burns_encoder() {
        let device = dev();
        device.seed(5);
        let m = EarlyFusion::new(&config(), &device);
        let h = Tensor::<3>::random([2, 9, 16], burn::tensor::Distribution::Default, &device);
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(vec![false; 18], [2, 9]), &device);
        let want = m
            .encoder
            .forward(TransformerEncoderInput::new(h.clone()).mask_pad(mask))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let got = m
            .encode_unmasked(h)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn pooling_averages_blocks_and_edges() {
        let x = Tensor::<3>::from_data(
            TensorData::new((1..=9).map(|v| v as f32).collect::<Vec<_>>(), [1, 9, 1]),
            &dev(),
        );
        let got = pool_cells(x, 3, 3).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got, vec![3.0, 4.5, 7.5, 9.0]);
    }

    pub(crate) fn config() -> FusionConfig {
        FusionConfig {
            image_dim: 8,
            image_grid: [3, 2],
            pool: true,
            text_dim: 6,
            use_image: true,
            use_text: true,
            d_model: 16,
            heads: 2,
            layers: 1,
            d_ff: 32,
            classes: 3,
            dropout: 0.0,
        }
    }

    fn input(text_len: usize, real: usize, device: &Device) -> FusionInput {
        let image = Tensor::<3>::random([1, 6, 8], burn::tensor::Distribution::Default, device);
        let text = Tensor::<3>::ones([1, text_len, 6], device);
        let mask: Vec<bool> = (0..text_len).map(|i| i >= real).collect();
        FusionInput {
            image,
            image_hidden: Tensor::from_data(TensorData::new(vec![false], [1, 1]), device),
            text,
            text_mask: Tensor::from_data(TensorData::new(mask, [1, text_len]), device),
        }
    }

    #[test]
    fn padding_tokens_do_not_change_the_scores() {
        let device = dev();
        device.seed(7);
        let m = EarlyFusion::new(&config(), &device);
        let a = input(2, 2, &device);
        let mut b = input(5, 2, &device);
        b.image = a.image.clone();
        let sa = m.forward(a).into_data().try_to_vec::<f32>().unwrap();
        let sb = m.forward(b).into_data().try_to_vec::<f32>().unwrap();
        for (x, y) in sa.iter().zip(&sb) {
            assert!((x - y).abs() < 1e-5, "{sa:?} vs {sb:?}");
        }
    }

    #[test]
    fn hidden_text_differs_from_present_text() {
        let device = dev();
        device.seed(7);
        let m = EarlyFusion::new(&config(), &device);
        let a = input(2, 2, &device);
        let mut b = input(2, 0, &device);
        b.image = a.image.clone();
        let sa = m.forward(a).into_data().try_to_vec::<f32>().unwrap();
        let sb = m.forward(b).into_data().try_to_vec::<f32>().unwrap();
        assert!(sa.iter().zip(&sb).any(|(x, y)| (x - y).abs() > 1e-4));
    }
}
