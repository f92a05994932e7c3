//! BART as Florence-2 uses it: post-LN encoder and decoder, learned positions with an
//! offset of 2, no embedding scale, and an lm_head tied to the shared embedding.
//! The decoder keeps a KV cache: self-attention K/V grow by one row per step, and the
//! cross-attention K/V of the encoder output are projected once per generation.

use super::config::{POSITION_OFFSET, TextConfig};
use crate::nn::cpu_ops::{self, host_device, linear, linear_gelu, matmul_transposed};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// Added to masked attention scores: far below any real score, finite in f32.
const MASK_BIAS: f32 = -1e9;

/// Multi-head attention with separate q, k, v and out projections.
#[derive(Module, Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(d: usize, heads: usize, device: &Device) -> Self {
        let lin = || LinearConfig::new(d, d).init(device);
        Self {
            q_proj: lin(),
            k_proj: lin(),
            v_proj: lin(),
            out_proj: lin(),
            heads,
        }
    }

    fn split(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, l, d] = x.dims();
        x.reshape([b, l, self.heads, d / self.heads])
            .swap_dims(1, 2)
    }

    /// K and V of `x` as `[B, heads, L, dh]`.
    fn kv(&self, x: Tensor<3>) -> KeyValue {
        KeyValue {
            k: self.split(linear(&self.k_proj, x.clone())),
            v: self.split(linear(&self.v_proj, x)),
        }
    }

    /// Unmasked self-attention: on the host, each head is two GEMMs and a vectorised
    /// softmax over column strides of q, k and v (`cpu_ops::attention`); elsewhere the
    /// backend's fused attention op, so the score matrix of a long encoder input never
    /// makes a round trip through memory.
    fn attend_fused(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, l, d] = x.dims();
        let q = linear(&self.q_proj, x.clone());
        let (k, v) = (linear(&self.k_proj, x.clone()), linear(&self.v_proj, x));
        let ctx = if host_device(&q.device()) {
            cpu_ops::attention(q, k, v, self.heads)
        } else {
            let (q, k, v) = (self.split(q), self.split(k), self.split(v));
            attention(q, k, v, None, None, AttentionModuleOptions::default())
                .swap_dims(1, 2)
                .reshape([b, l, d])
        };
        linear(&self.out_proj, ctx)
    }

    /// `bias` broadcasts to `[B, heads, Lq, Lk]`.
    fn attend(&self, x: Tensor<3>, kv: &KeyValue, bias: Option<Tensor<4>>) -> Tensor<3> {
        let [b, l, d] = x.dims();
        let dh = d / self.heads;
        let q = self.split(linear(&self.q_proj, x) * (dh as f64).powf(-0.5));
        let mut scores = q.matmul(kv.k.clone().swap_dims(2, 3));
        if let Some(bias) = bias {
            scores = scores + bias;
        }
        let ctx = softmax(scores, 3)
            .matmul(kv.v.clone())
            .swap_dims(1, 2)
            .reshape([b, l, d]);
        linear(&self.out_proj, ctx)
    }
}

/// Cached keys and values of one attention.
#[derive(Clone, Debug)]
pub struct KeyValue {
    k: Tensor<4>,
    v: Tensor<4>,
}

impl KeyValue {
    fn append(self, new: KeyValue) -> KeyValue {
        KeyValue {
            k: Tensor::cat(vec![self.k, new.k], 2),
            v: Tensor::cat(vec![self.v, new.v], 2),
        }
    }
    fn select(self, rows: Tensor<1, Int>) -> KeyValue {
        KeyValue {
            k: self.k.select(0, rows.clone()),
            v: self.v.select(0, rows),
        }
    }
}

fn ln(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).init(device)
}

/// One encoder layer.
#[derive(Module, Debug)]
pub struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

impl EncoderLayer {
    /// `bias` masks padding; `None` when the batch has none.
    fn forward(&self, x: Tensor<3>, bias: Option<Tensor<4>>) -> Tensor<3> {
        let a = match bias {
            None => self.self_attn.attend_fused(x.clone()),
            bias => self
                .self_attn
                .attend(x.clone(), &self.self_attn.kv(x.clone()), bias),
        };
        let x = self.self_attn_layer_norm.forward(x + a);
        let f = linear(&self.fc2, linear_gelu(&self.fc1, x.clone()));
        self.final_layer_norm.forward(x + f)
    }
}

/// One decoder layer: self-attention, cross-attention, feed-forward.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: LayerNorm,
}

/// The BART encoder.
#[derive(Module, Debug)]
pub struct Encoder {
    embed_positions: Embedding,
    layernorm_embedding: LayerNorm,
    layers: Vec<EncoderLayer>,
}

/// The BART decoder.
#[derive(Module, Debug)]
pub struct Decoder {
    embed_positions: Embedding,
    layernorm_embedding: LayerNorm,
    layers: Vec<DecoderLayer>,
}

/// BART: the shared embedding, the encoder and the decoder.
#[derive(Module, Debug)]
pub struct Bart {
    shared: Embedding,
    encoder: Encoder,
    decoder: Decoder,
}

/// Per-layer decoder state of one generation: the growing self-attention K/V, the
/// cross-attention K/V of the encoder output, and the encoder's padding bias.
#[derive(Clone, Debug)]
pub struct DecoderCache {
    past: Vec<Option<KeyValue>>,
    cross: Vec<KeyValue>,
    cross_bias: Tensor<4>,
    len: usize,
}

impl DecoderCache {
    /// Tokens already decoded.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps batch rows `rows` (in that order): beam search reorders its beams.
    pub fn select(self, rows: Tensor<1, Int>) -> Self {
        Self {
            past: self
                .past
                .into_iter()
                .map(|p| p.map(|kv| kv.select(rows.clone())))
                .collect(),
            cross: self
                .cross
                .into_iter()
                .map(|kv| kv.select(rows.clone()))
                .collect(),
            cross_bias: self.cross_bias.select(0, rows),
            len: self.len,
        }
    }
}

/// `[B, S]` 0/1 mask -> additive `[B, 1, 1, S]` bias.
pub fn padding_bias(mask: Tensor<2>) -> Tensor<4> {
    let [b, s] = mask.dims();
    ((mask.neg() + 1.0) * MASK_BIAS).reshape([b, 1, 1, s])
}

impl Bart {
    /// A BART of shape `c`, randomly initialised.
    pub fn new(c: &TextConfig, device: &Device) -> Self {
        let d = c.d_model;
        let positions = c.max_position_embeddings + POSITION_OFFSET;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            shared: EmbeddingConfig::new(c.vocab_size, d).init(device),
            encoder: Encoder {
                embed_positions: EmbeddingConfig::new(positions, d).init(device),
                layernorm_embedding: ln(d, device),
                layers: (0..c.encoder_layers)
                    .map(|_| EncoderLayer {
                        self_attn: Attention::new(d, c.encoder_attention_heads, device),
                        self_attn_layer_norm: ln(d, device),
                        fc1: lin(d, c.encoder_ffn_dim),
                        fc2: lin(c.encoder_ffn_dim, d),
                        final_layer_norm: ln(d, device),
                    })
                    .collect(),
            },
            decoder: Decoder {
                embed_positions: EmbeddingConfig::new(positions, d).init(device),
                layernorm_embedding: ln(d, device),
                layers: (0..c.decoder_layers)
                    .map(|_| DecoderLayer {
                        self_attn: Attention::new(d, c.decoder_attention_heads, device),
                        self_attn_layer_norm: ln(d, device),
                        encoder_attn: Attention::new(d, c.decoder_attention_heads, device),
                        encoder_attn_layer_norm: ln(d, device),
                        fc1: lin(d, c.decoder_ffn_dim),
                        fc2: lin(c.decoder_ffn_dim, d),
                        final_layer_norm: ln(d, device),
                    })
                    .collect(),
            },
        }
    }

    /// Longest sequence the position tables cover.
    pub fn max_positions(&self) -> usize {
        self.encoder.embed_positions.weight.dims()[0] - POSITION_OFFSET
    }

    /// The scaled token embeddings of `ids`.
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.shared.forward(ids)
    }

    fn positions(
        table: &Embedding,
        b: usize,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Tensor<3> {
        let idx = Tensor::<1, Int>::arange(
            (start + POSITION_OFFSET) as i64..(start + len + POSITION_OFFSET) as i64,
            device,
        )
        .reshape([1, len]);
        let [_, d] = table.weight.dims();
        table.forward(idx).expand([b, len, d])
    }

    /// Encoder over `[B, S, d]` input embeddings with a `[B, S]` 0/1 mask.
    pub fn encode(&self, embeds: Tensor<3>, mask: Tensor<2>) -> Tensor<3> {
        let [b, s, _] = embeds.dims();
        let device = embeds.device();
        let e = &self.encoder;
        let x = embeds + Self::positions(&e.embed_positions, b, 0, s, &device);
        let x = e.layernorm_embedding.forward(x);
        // A batch without padding (one poster, say) takes the fused attention path.
        let padded: bool = mask.clone().lower_elem(0.5).any().into_scalar();
        let bias = padded.then(|| padding_bias(mask));
        e.layers
            .iter()
            .fold(x, |x, layer| layer.forward(x, bias.clone()))
    }

    /// Starts a generation: projects the cross-attention K/V of `encoded` once.
    pub fn start(&self, encoded: Tensor<3>, mask: Tensor<2>) -> DecoderCache {
        DecoderCache {
            past: vec![None; self.decoder.layers.len()],
            cross: self
                .decoder
                .layers
                .iter()
                .map(|l| l.encoder_attn.kv(encoded.clone()))
                .collect(),
            cross_bias: padding_bias(mask),
            len: 0,
        }
    }

    /// Decodes `ids` `[B, T]` after the cached prefix; returns hidden states `[B, T, d]`.
    /// Within `ids`, attention is causal.
    pub fn decode(&self, ids: Tensor<2, Int>, cache: &mut DecoderCache) -> Tensor<3> {
        let [b, t] = ids.dims();
        let device = ids.device();
        let dec = &self.decoder;
        let x = self.embed_tokens(ids)
            + Self::positions(&dec.embed_positions, b, cache.len, t, &device);
        let mut x = dec.layernorm_embedding.forward(x);
        let causal = (t > 1).then(|| {
            let past = cache.len;
            let query = Tensor::<1, Int>::arange(past as i64..(past + t) as i64, &device)
                .reshape([t, 1])
                .expand([t, past + t]);
            let key = Tensor::<1, Int>::arange(0..(past + t) as i64, &device)
                .reshape([1, past + t])
                .expand([t, past + t]);
            // A query sees keys up to its own position.
            let mask = query.lower(key);
            Tensor::<2>::zeros([t, past + t], &device)
                .mask_fill(mask, MASK_BIAS)
                .reshape([1, 1, t, past + t])
        });
        for (i, layer) in dec.layers.iter().enumerate() {
            let new = layer.self_attn.kv(x.clone());
            let kv = match cache.past[i].take() {
                Some(old) => old.append(new),
                None => new,
            };
            let a = layer.self_attn.attend(x.clone(), &kv, causal.clone());
            cache.past[i] = Some(kv);
            x = layer.self_attn_layer_norm.forward(x + a);
            let c = layer.encoder_attn.attend(
                x.clone(),
                &cache.cross[i],
                Some(cache.cross_bias.clone()),
            );
            x = layer.encoder_attn_layer_norm.forward(x + c);
            let f = linear(&layer.fc2, linear_gelu(&layer.fc1, x.clone()));
            x = layer.final_layer_norm.forward(x + f);
        }
        cache.len += t;
        x
    }

    /// Tied lm_head: `[B, T, d]` -> `[B, T, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = hidden.dims();
        let w = self.shared.weight.val();
        let [v, _] = w.dims();
        matmul_transposed(hidden.reshape([b * t, d]), w).reshape([b, t, v])
    }
}
