//! The BERT encoder of all-MiniLM-L6-v2 (post-LN, exact erf GELU, LayerNorm eps 1e-12)
//! and the sentence-transformers pooling: masked mean, then L2 normalisation.

mod host;
pub use host::HostBert;

use crate::nn::cpu_ops::{attention, linear_gelu};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

/// Shape of a BERT encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BertConfig {
    /// Wordpieces in the vocabulary.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Longest input, in wordpieces.
    pub max_positions: usize,
    /// Token types (segments).
    pub type_vocab_size: usize,
}

impl BertConfig {
    /// sentence-transformers/all-MiniLM-L6-v2.
    pub const MINILM_L6: Self = Self {
        vocab_size: 30522,
        hidden: 384,
        layers: 6,
        heads: 12,
        intermediate: 1536,
        max_positions: 512,
        type_vocab_size: 2,
    };
}

const LN_EPS: f64 = 1e-12;
/// Added to masked attention scores: far below any real score, yet finite in f32.
const MASK_BIAS: f32 = -1e9;

fn layer_norm(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device)
}

/// Word, position and token-type embeddings, then LayerNorm.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

/// One post-LN transformer layer.
#[derive(Module, Debug)]
pub struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_norm: LayerNorm,
    heads: usize,
}

impl BertLayer {
    /// A layer of shape `c`, randomly initialised.
    pub fn new(c: &BertConfig, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            query: lin(c.hidden, c.hidden),
            key: lin(c.hidden, c.hidden),
            value: lin(c.hidden, c.hidden),
            attn_out: lin(c.hidden, c.hidden),
            attn_norm: layer_norm(c.hidden, device),
            ffn_in: lin(c.hidden, c.intermediate),
            ffn_out: lin(c.intermediate, c.hidden),
            ffn_norm: layer_norm(c.hidden, device),
            heads: c.heads,
        }
    }

    /// `x`: `[B, L, H]`; `mask_bias`: `[B, 1, 1, L]`, 0 on tokens and `MASK_BIAS` on
    /// pads, or `None` when no row is padded (then the host attention kernel runs).
    pub fn forward(&self, x: Tensor<3>, mask_bias: Option<Tensor<4>>) -> Tensor<3> {
        let [b, l, h] = x.dims();
        let q = self.query.forward(x.clone());
        let k = self.key.forward(x.clone());
        let v = self.value.forward(x.clone());
        let context = match mask_bias {
            None => attention(q, k, v, self.heads),
            Some(bias) => {
                let dh = h / self.heads;
                let split = |t: Tensor<3>| t.reshape([b, l, self.heads, dh]).swap_dims(1, 2);
                let scores = split(q).matmul(split(k).swap_dims(2, 3)) / (dh as f64).sqrt() + bias;
                softmax(scores, 3)
                    .matmul(split(v))
                    .swap_dims(1, 2)
                    .reshape([b, l, h])
            }
        };
        let x = self.attn_norm.forward(x + self.attn_out.forward(context));
        let ffn = self.ffn_out.forward(linear_gelu(&self.ffn_in, x.clone()));
        self.ffn_norm.forward(x + ffn)
    }
}

/// The BERT encoder: embeddings and layers.
#[derive(Module, Debug)]
pub struct Bert {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
}

impl Bert {
    /// An encoder of shape `c`, randomly initialised.
    pub fn new(c: &BertConfig, device: &Device) -> Self {
        Self {
            embeddings: BertEmbeddings {
                word: EmbeddingConfig::new(c.vocab_size, c.hidden).init(device),
                position: EmbeddingConfig::new(c.max_positions, c.hidden).init(device),
                token_type: EmbeddingConfig::new(c.type_vocab_size, c.hidden).init(device),
                norm: layer_norm(c.hidden, device),
            },
            layers: (0..c.layers).map(|_| BertLayer::new(c, device)).collect(),
        }
    }

    /// Replaces the word table `[vocab, hidden]` (a bundle stores it as int8 rows).
    pub fn set_word_embeddings(&mut self, table: Tensor<2>) {
        self.embeddings.word.weight = burn::module::Param::from_tensor(table);
    }

    /// Token embeddings before the first layer: `[B, L, H]`.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, l] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &device)
            .reshape([1, l])
            .expand([b, l]);
        let types = Tensor::<2, Int>::zeros([b, l], &device);
        let e = &self.embeddings;
        let x = e.word.forward(ids) + e.position.forward(positions) + e.token_type.forward(types);
        e.norm.forward(x)
    }

    /// Additive attention bias from a `[B, L]` 0/1 mask; `None` when nothing is
    /// padded, where adding zeros would change nothing.
    pub fn mask_bias(mask: Tensor<2>) -> Option<Tensor<4>> {
        let [b, l] = mask.dims();
        let padded: bool = mask.clone().lower_elem(0.5).any().into_scalar();
        padded.then(|| ((mask.neg() + 1.0) * MASK_BIAS).reshape([b, 1, 1, l]))
    }

    /// Copies of the top `n` layers (a teacher tunes them on hidden states from below).
    pub fn top_layers(&self, n: usize) -> Vec<BertLayer> {
        self.layers[self.layers.len() - n.min(self.layers.len())..].to_vec()
    }

    /// Additive attention bias from a `[B, L]` mask that is true on absent tokens.
    pub fn absent_bias(absent: Tensor<2, Bool>) -> Tensor<4> {
        let [b, l] = absent.dims();
        (absent.float() * MASK_BIAS).reshape([b, 1, 1, l])
    }

    /// Last hidden state of right-padded ids `[B, L]` with their 0/1 mask.
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<3> {
        self.forward_layers(ids, mask, self.layers.len())
    }

    /// Hidden states after the first `n` layers (0 = embeddings only).
    pub fn forward_layers(&self, ids: Tensor<2, Int>, mask: Tensor<2>, n: usize) -> Tensor<3> {
        let bias = Self::mask_bias(mask);
        self.layers[..n]
            .iter()
            .fold(self.embed(ids), |x, layer| layer.forward(x, bias.clone()))
    }
}

impl Bert {
    /// Hidden states after each layer listed in `taps` (1-based, ascending), in one pass.
    pub fn forward_taps(
        &self,
        ids: Tensor<2, Int>,
        mask: Tensor<2>,
        taps: &[usize],
    ) -> Vec<Tensor<3>> {
        let bias = Self::mask_bias(mask);
        let mut x = self.embed(ids);
        let mut out = Vec::with_capacity(taps.len());
        for (i, layer) in self.layers.iter().enumerate() {
            if taps.iter().all(|&t| t <= i) {
                break;
            }
            x = layer.forward(x, bias.clone());
            if taps.contains(&(i + 1)) {
                out.push(x.clone());
            }
        }
        out
    }
}

/// sentence-transformers pooling: mean over real tokens, then unit L2 norm. `[B, H]`.
pub fn mean_pool_normalize(hidden: Tensor<3>, mask: Tensor<2>) -> Tensor<2> {
    let [b, l, h] = hidden.dims();
    let m = mask.reshape([b, l, 1]);
    let summed = (hidden * m.clone()).sum_dim(1).reshape([b, h]);
    let count = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
    let mean = summed / count;
    let norm = mean
        .clone()
        .powi_scalar(2)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    mean / norm
}
