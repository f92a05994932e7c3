//! The BERT layers on host rows (see `nn::host_ops`): self-attention with query,
//! key and value as one GEMM, and each residual + LayerNorm as one pass. Serving reads one unpadded text, so no mask is needed;
//! padded batches (feature extraction) keep burn's path.

use super::{Bert, BertLayer, LN_EPS};
use crate::nn::host_ops::{Dense, Norm, SelfAttention, host};
use burn::prelude::*;

struct Layer {
    attn: SelfAttention,
    attn_norm: Norm,
    ffn_in: Dense,
    ffn_out: Dense,
    ffn_norm: Norm,
}

/// The encoder layers of a [`Bert`], copied for the host kernels.
pub struct HostBert {
    layers: Vec<Layer>,
}

impl HostBert {
    /// Copies `bert`'s layers for the host kernels.
    pub fn new(bert: &Bert) -> Self {
        Self {
            layers: bert.layers.iter().map(Layer::new).collect(),
        }
    }

    /// [`HostBert::new`] that takes the layers out of `bert`, one at a time, so that
    /// each weight is held once (serving needs no second copy). `bert` keeps its
    /// embeddings, which [`HostBert::forward_layers`] reads.
    pub fn take(bert: &mut Bert) -> Self {
        let layers = std::mem::take(&mut bert.layers)
            .into_iter()
            .map(|l| Layer::new(&l))
            .collect();
        Self { layers }
    }

    /// Hidden states `[L, H]` of one unpadded text after the first `n` layers, from
    /// `bert`'s embeddings of `ids` (`bert` is the model this was copied from).
    pub fn forward_layers(&self, bert: &Bert, ids: &[i64], n: usize) -> Vec<f32> {
        let l = ids.len();
        if l == 0 {
            return Vec::new();
        }
        let device = bert.embeddings.word.weight.device();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, l]), &device);
        let mut x = host(bert.embed(ids));
        for layer in &self.layers[..n] {
            x = layer.forward(&x);
        }
        x
    }
}

impl Layer {
    fn new(l: &BertLayer) -> Self {
        Self {
            attn: SelfAttention::new(&l.query, &l.key, &l.value, &l.attn_out, l.heads),
            attn_norm: Norm::from_layer_norm(&l.attn_norm, LN_EPS),
            ffn_in: Dense::from_linear(&l.ffn_in),
            ffn_out: Dense::from_linear(&l.ffn_out),
            ffn_norm: Norm::from_layer_norm(&l.ffn_norm, LN_EPS),
        }
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut a = self.attn.forward(x);
        self.attn_norm.add_apply(&mut a, x);
        let mut y = self.ffn_out.forward(&self.ffn_in.forward_gelu(&a));
        self.ffn_norm.add_apply(&mut y, &a);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::bert::BertConfig;
    use crate::nn::cpu_ops::tests::rel_l2;

    /// Random weights, two layers: the host layers compute burn's.
    #[test]
    fn host_layers_equal_burns() {
        let device = Device::flex();
        device.seed(9);
        let config = BertConfig {
            vocab_size: 50,
            layers: 2,
            ..BertConfig::MINILM_L6
        };
        let bert = Bert::new(&config, &device);
        let ids: Vec<i64> = (0..23).map(|i| (i * 7 % 50) as i64).collect();
        let idt = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, 23]), &device);
        let want = host(bert.forward_layers(idt, Tensor::ones([1, 23], &device), 2));
        let got = HostBert::new(&bert).forward_layers(&bert, &ids, 2);
        let err = rel_l2(&got, &want);
        assert!(err < 1e-5, "rel L2 {err:.3e}");
    }
}
