//! An early-fusion network that tunes MiniLM's top layers inside it: its text
//! tokens arrive as the hidden states below those layers, which run first. With no
//! top layers it is the early-fusion network alone.

use super::{EarlyFusion, FusionInput};
use crate::nn::bert::{Bert, BertLayer};
use crate::nn::efficientnet::Tail;
use burn::prelude::*;

/// A fusion network with the MiniLM layers it tunes (a teacher's); none for a student.
#[derive(Module, Debug)]
pub struct TunedFusion {
    /// Pretrained MiniLM layers, trained on with the fusion layers.
    pub top: Vec<BertLayer>,
    /// EfficientNet's last blocks and head, trained on with the fusion layers (a
    /// teacher's, when it tunes them); its image tokens come from this tail.
    pub tail: Option<Tail>,
    /// The fusion layers.
    pub fusion: EarlyFusion,
}

impl TunedFusion {
    /// Genre logits `[B, classes]`.
    pub fn forward(&self, mut x: FusionInput) -> Tensor<2> {
        let n = x.text.dims()[1];
        if n > 0 && !self.top.is_empty() {
            let bias = Bert::absent_bias(x.text_mask.clone());
            x.text = self
                .top
                .iter()
                .fold(x.text, |h, layer| layer.forward(h, Some(bias.clone())));
        }
        self.fusion.forward(x)
    }

    /// Genre logits `[B, classes]` of a network with a tail: `tail_input` (the cached
    /// `[B, C, H, W]` input of its first block) replaces `x.image`.
    pub fn forward_tail(&self, mut x: FusionInput, tail_input: Option<Tensor<4>>) -> Tensor<2> {
        if let (Some(tail), Some(input)) = (&self.tail, tail_input) {
            x.image = tail.tokens(input);
        }
        self.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::bert::BertConfig;
    use crate::nn::fusion::FusionConfig;

    fn config() -> FusionConfig {
        FusionConfig {
            text_dim: 384,
            ..crate::nn::fusion::tests::config()
        }
    }

    fn input(text_len: usize, real: usize, device: &Device) -> FusionInput {
        let dist = burn::tensor::Distribution::Default;
        FusionInput {
            image: Tensor::<3>::random([1, 6, 8], dist, device),
            image_hidden: Tensor::from_data(TensorData::new(vec![false], [1, 1]), device),
            text: Tensor::<3>::random([1, text_len, 384], dist, device),
            text_mask: Tensor::from_data(
                TensorData::new((0..text_len).map(|i| i >= real).collect(), [1, text_len]),
                device,
            ),
        }
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_to_vec().unwrap()
    }

    #[test]
    fn without_top_layers_it_is_the_fusion_network_and_pads_change_nothing() {
        let device = Device::flex();
        device.seed(3);
        let fusion = EarlyFusion::new(&config(), &device);
        let plain = TunedFusion {
            top: Vec::new(),
            tail: None,
            fusion: fusion.clone(),
        };
        let x = input(4, 4, &device);
        assert_eq!(values(plain.forward(x.clone())), values(fusion.forward(x)));
        let tuned = TunedFusion {
            top: vec![BertLayer::new(&BertConfig::MINILM_L6, &device)],
            tail: None,
            fusion,
        };
        let short = input(3, 3, &device);
        let mut long = input(6, 3, &device);
        long.image = short.image.clone();
        long.text = Tensor::cat(
            vec![
                short.text.clone(),
                Tensor::<3>::ones([1, 3, 384], &device) * 7.0,
            ],
            1,
        );
        let (a, b) = (values(tuned.forward(short)), values(tuned.forward(long)));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn the_top_layers_get_gradients() {
        let device = Device::flex();
        device.seed(4);
        let ad = device.clone().autodiff();
        let top = vec![BertLayer::new(&BertConfig::MINILM_L6, &device)];
        let net = TunedFusion {
            top: top.fork(&ad).train(),
            tail: None,
            fusion: EarlyFusion::new(&config(), &ad),
        };
        let x = input(5, 4, &ad);
        let mut grads = net.forward(x).sum().backward();
        let g = burn::optim::GradientsParams::from_module(&mut grads, &net.top);
        // Every weight and bias of the layer (4 attention linears, 2 feed-forward,
        // 2 norms: 16 tensors) has a gradient.
        assert_eq!(g.len(), 16);
    }
}
