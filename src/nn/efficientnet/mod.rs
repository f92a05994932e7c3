//! EfficientNet-Lite0, as the upstream `efficientnet_lite_pytorch` computes it:
//! TF "SAME" padding (asymmetric on stride 2), ReLU6 everywhere, BatchNorm eps 1e-3,
//! no squeeze-excitation, no conv bias. Field names follow the PyTorch state dict
//! with the leading underscores dropped (see `model::towers`).

mod host;
pub use host::HostLite0;

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

/// Width of the pooled feature vector that the fusion head reads.
pub const FEATURE_DIM: usize = 1280;
/// ImageNet-1k classes of the pretrained classifier.
pub const NUM_CLASSES: usize = 1000;
/// Input side the weights were trained at.
pub const INPUT_SIZE: usize = 224;
const BN_EPS: f64 = 1e-3;
const STEM_CHANNELS: usize = 32;
const HEAD_IN: usize = 320;

/// The lite0 block table: (repeats, kernel, stride, expand ratio, in, out).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Upstream computes its pads once for 224x224. At 224 those equal a dynamic TF-SAME
/// computation (before = pad / 2, the rest after), which is what burn's
/// `PaddingConfig2d::Same` does, so every spatial conv uses it.
fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let padding = if k == 1 {
        PaddingConfig2d::Valid
    } else {
        PaddingConfig2d::Same
    };
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(padding)
        .with_bias(false)
        .init(device)
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(BN_EPS)
        .init(device)
}

fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clamp(0.0, 6.0)
}

/// Inverted-residual block (MBConv without squeeze-excitation).
#[derive(Module, Debug)]
pub struct MbConv {
    /// Absent when the expand ratio is 1 (block 0).
    expand_conv: Option<Conv2d>,
    bn0: Option<BatchNorm>,
    depthwise_conv: Conv2d,
    bn1: BatchNorm,
    project_conv: Conv2d,
    bn2: BatchNorm,
    residual: bool,
}

impl MbConv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        expand: usize,
        device: &Device,
    ) -> Self {
        let mid = cin * expand;
        let (expand_conv, bn0) = if expand == 1 {
            (None, None)
        } else {
            (Some(conv(cin, mid, 1, 1, 1, device)), Some(bn(mid, device)))
        };
        Self {
            expand_conv,
            bn0,
            depthwise_conv: conv(mid, mid, k, stride, mid, device),
            bn1: bn(mid, device),
            project_conv: conv(mid, cout, 1, 1, 1, device),
            bn2: bn(cout, device),
            residual: stride == 1 && cin == cout,
        }
    }

    /// The block with its batch norms frozen (see [`EfficientNetLite0::tail`]).
    fn freeze_norms(self) -> Self {
        Self {
            bn0: self.bn0.map(Module::freeze),
            bn1: self.bn1.freeze(),
            bn2: self.bn2.freeze(),
            ..self
        }
    }

    /// The block on `[batch, channels, height, width]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let (Some(conv), Some(bn)) = (&self.expand_conv, &self.bn0) {
            x = relu6(bn.forward(conv.forward(x)));
        }
        x = relu6(self.bn1.forward(self.depthwise_conv.forward(x)));
        x = self.bn2.forward(self.project_conv.forward(x));
        if self.residual { x + input } else { x }
    }
}

/// What one forward pass exposes: the taps the parity tests and the fusion model read.
pub struct EfficientNetOutput {
    /// Head conv + BN + ReLU6, before pooling: `[B, 1280, H/32, W/32]`.
    pub features: Tensor<4>,
    /// Global average of `features`: `[B, 1280]`.
    pub pooled: Tensor<2>,
}

/// EfficientNet-Lite0's last blocks and head, tuned inside a genre network: it reads
/// the (cached) input of its first block and gives the head's feature map.
#[derive(Module, Debug)]
pub struct Tail {
    blocks: Vec<MbConv>,
    conv_head: Conv2d,
    bn1: BatchNorm,
}

impl Tail {
    /// `[B, C, H, W]` block input to the head's `[B, 1280, H', W']` map (ReLU6 applied).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.blocks.iter().fold(x, |x, b| b.forward(x));
        relu6(self.bn1.forward(self.conv_head.forward(x)))
    }

    /// The same map as tokens `[B, H' * W', 1280]`, cells row-major, as the towers give them.
    pub fn tokens(&self, x: Tensor<4>) -> Tensor<3> {
        let f = self.forward(x);
        let [b, c, h, w] = f.dims();
        f.reshape([b, c, h * w]).swap_dims(1, 2)
    }
}

/// EfficientNet-Lite0 up to its pooled features (the classifier head is not used).
#[derive(Module, Debug)]
pub struct EfficientNetLite0 {
    conv_stem: Conv2d,
    bn0: BatchNorm,
    blocks: Vec<MbConv>,
    conv_head: Conv2d,
    bn1: BatchNorm,
    fc: Linear,
}

impl EfficientNetLite0 {
    /// A randomly initialised network, ready for `model::towers` to load weights into.
    pub fn new(device: &Device) -> Self {
        let mut blocks = Vec::new();
        for (repeats, k, stride, expand, cin, cout) in STAGES {
            for r in 0..repeats {
                let (cin, stride) = if r == 0 { (cin, stride) } else { (cout, 1) };
                blocks.push(MbConv::new(cin, cout, k, stride, expand, device));
            }
        }
        Self {
            conv_stem: conv(3, STEM_CHANNELS, 3, 2, 1, device),
            bn0: bn(STEM_CHANNELS, device),
            blocks,
            conv_head: conv(HEAD_IN, FEATURE_DIM, 1, 1, 1, device),
            bn1: bn(FEATURE_DIM, device),
            fc: LinearConfig::new(FEATURE_DIM, NUM_CLASSES).init(device),
        }
    }

    /// Blocks in the network (16).
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Copies of the last `n` blocks and the head, to tune (`n` = 0: the head alone).
    /// Their batch norms are frozen: they keep the pretrained statistics and affine
    /// terms, so tuning starts from exactly the frozen features, and a batch of 64
    /// posters never stands in for ImageNet's statistics.
    pub fn tail(&self, n: usize) -> Tail {
        let from = self.blocks.len() - n.min(self.blocks.len());
        Tail {
            blocks: self.blocks[from..]
                .iter()
                .map(|b| b.clone().freeze_norms())
                .collect(),
            conv_head: self.conv_head.clone(),
            bn1: self.bn1.clone().freeze(),
        }
    }

    /// Stem: conv 3x3/2 + BN + ReLU6.
    pub fn stem(&self, input: Tensor<4>) -> Tensor<4> {
        relu6(self.bn0.forward(self.conv_stem.forward(input)))
    }

    /// Runs the stem and blocks `0..=last`, for the debug taps of the parity tests.
    pub fn forward_until(&self, input: Tensor<4>, last: usize) -> Tensor<4> {
        self.blocks[..=last]
            .iter()
            .fold(self.stem(input), |x, block| block.forward(x))
    }

    /// Feature map and pooled features of a normalised `[B, 3, H, W]` batch.
    pub fn forward_features(&self, input: Tensor<4>) -> EfficientNetOutput {
        let x = self.forward_until(input, self.blocks.len() - 1);
        let features = relu6(self.bn1.forward(self.conv_head.forward(x)));
        let [b, c, _, _] = features.dims();
        let pooled = features.clone().mean_dim(3).mean_dim(2).reshape([b, c]);
        EfficientNetOutput { features, pooled }
    }

    /// ImageNet logits (dropout is the identity at inference).
    pub fn classify(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail on the cached input of its first block gives the network's own map.
    #[test]
    fn the_tail_on_its_cached_input_is_the_whole_network() {
        let device = Device::flex();
        device.seed(7);
        let net = EfficientNetLite0::new(&device);
        let x = Tensor::<4>::random([2, 3, 64, 96], burn::tensor::Distribution::Default, &device);
        let whole = net.forward_features(x.clone()).features;
        let [b, c, h, w] = whole.dims();
        let whole: Vec<f32> = whole
            .reshape([b, c, h * w])
            .swap_dims(1, 2)
            .into_data()
            .try_to_vec()
            .unwrap();
        // On the training device too: its frozen batch norms keep the running statistics.
        let ad = device.clone().autodiff();
        for (n, train) in [(0, false), (2, false), (2, true)] {
            let cached = net.forward_until(x.clone(), net.block_count() - n - 1);
            let tail: Vec<f32> = match train {
                false => net.tail(n).tokens(cached),
                true => net.tail(n).fork(&ad).train().tokens(cached.to_device(&ad)),
            }
            .into_data()
            .try_to_vec()
            .unwrap();
            assert_eq!(tail.len(), whole.len());
            let err = tail
                .iter()
                .zip(&whole)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-5,
                "last {n} blocks (training {train}): max difference {err}"
            );
        }
    }
}
