//! DaViT, Florence-2's vision tower: four stages of a strided ConvEmbed followed by
//! pairs of (spatial window attention, channel attention) blocks. Tokens travel as
//! `[B, H*W, C]` (row-major). On the CPU backends the convs and the window attention
//! run as `nn::cpu_ops` kernels in that layout; elsewhere through burn's NCHW convs
//! and window partition, which the kernels are tested against.

use super::config::VisionConfig;
use crate::nn::cpu_ops;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

fn tokens_to_nchw(x: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    let [b, _, c] = x.dims();
    x.reshape([b, h, w, c]).permute([0, 3, 1, 2])
}

/// Patch embedding: a strided conv, with its LayerNorm before (stages 1-3) or after (stage 0).
#[derive(Module, Debug)]
pub struct ConvEmbed {
    conv: Conv2d,
    norm: LayerNorm,
    pre_norm: bool,
}

impl ConvEmbed {
    fn new(c: &VisionConfig, stage: usize, device: &Device) -> Self {
        let cin = if stage == 0 {
            3
        } else {
            c.embed_dim[stage - 1]
        };
        let cout = c.embed_dim[stage];
        let (k, s, p) = (
            c.patch_size[stage],
            c.patch_stride[stage],
            c.patch_padding[stage],
        );
        let pre_norm = c.patch_prenorm[stage];
        Self {
            conv: Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .init(device),
            norm: LayerNormConfig::new(if pre_norm { cin } else { cout }).init(device),
            pre_norm,
        }
    }

    /// `x` is the image (NCHW) for stage 0, else the previous stage's tokens on its grid.
    fn forward(&self, x: Stage) -> (Tensor<3>, usize, usize) {
        let (t, h, w) = match x {
            Stage::Image(x) => {
                let [b, c, h, w] = x.dims();
                (x.permute([0, 2, 3, 1]).reshape([b, h * w, c]), h, w)
            }
            Stage::Tokens(t, h, w) if self.pre_norm => (self.norm.forward(t), h, w),
            Stage::Tokens(t, h, w) => (t, h, w),
        };
        let (t, h, w) = cpu_ops::conv2d_tokens(&self.conv, t, h, w);
        let t = if self.pre_norm {
            t
        } else {
            self.norm.forward(t)
        };
        (t, h, w)
    }
}

enum Stage {
    Image(Tensor<4>),
    Tokens(Tensor<3>, usize, usize),
}

/// Depthwise 3x3 conv, added to its input: DaViT's conditional position encoding.
fn depthwise(c: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c, c], [3, 3])
        .with_groups(c)
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// The blocks' two-layer GELU MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(c: usize, device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(c, 4 * c).init(device),
            fc2: LinearConfig::new(4 * c, c).init(device),
        }
    }
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        cpu_ops::linear(&self.fc2, cpu_ops::linear_gelu(&self.fc1, x))
    }
}

/// The fused q, k, v projection.
#[derive(Module, Debug)]
pub struct QkvProj {
    qkv: Linear,
    proj: Linear,
}

impl QkvProj {
    fn new(c: usize, device: &Device) -> Self {
        Self {
            qkv: LinearConfig::new(c, 3 * c).init(device),
            proj: LinearConfig::new(c, c).init(device),
        }
    }

    /// `[B, N, C]` -> q, k, v each `[B, parts, N, C/parts]`.
    fn split(&self, x: Tensor<3>, parts: usize) -> [Tensor<4>; 3] {
        let [b, n, c] = x.dims();
        let qkv = cpu_ops::linear(&self.qkv, x)
            .reshape([b, n, 3, parts, c / parts])
            .permute([2, 0, 3, 1, 4]);
        let pick = |i: usize| {
            qkv.clone()
                .slice(i..i + 1)
                .reshape([b, parts, n, c / parts])
        };
        [pick(0), pick(1), pick(2)]
    }
}

/// Multi-head attention inside non-overlapping `window x window` tiles, no shift and
/// no relative bias. The map is zero-padded right and bottom to whole windows (after
/// the norm), and the padded tokens take part in attention as upstream's do.
#[derive(Module, Debug)]
pub struct SpatialBlock {
    conv1: Conv2d,
    norm1: LayerNorm,
    window_attn: QkvProj,
    conv2: Conv2d,
    norm2: LayerNorm,
    ffn: Mlp,
    heads: usize,
    window: usize,
}

impl SpatialBlock {
    fn new(c: usize, heads: usize, window: usize, device: &Device) -> Self {
        Self {
            conv1: depthwise(c, device),
            norm1: LayerNormConfig::new(c).init(device),
            window_attn: QkvProj::new(c, device),
            conv2: depthwise(c, device),
            norm2: LayerNormConfig::new(c).init(device),
            ffn: Mlp::new(c, device),
            heads,
            window,
        }
    }

    fn attention(&self, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
        let win = cpu_ops::Windows {
            h,
            w,
            ws: self.window,
            heads: self.heads,
        };
        // On the CPU: strided windows, no window layout (same result, less copying).
        let out =
            cpu_ops::window_attention(&self.window_attn.qkv, x, win, |x| self.windowed(x, h, w));
        // Per token, so after un-partitioning: padding tokens are not projected.
        cpu_ops::linear(&self.window_attn.proj, out)
    }

    /// burn's path: pad, partition into windows, fused attention, un-partition.
    fn windowed(&self, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
        let [b, _, c] = x.dims();
        let ws = self.window;
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let mut grid = x.reshape([b, h, w, c]);
        let device = grid.device();
        if wp > w {
            grid = Tensor::cat(vec![grid, Tensor::zeros([b, h, wp - w, c], &device)], 2);
        }
        if hp > h {
            grid = Tensor::cat(vec![grid, Tensor::zeros([b, hp - h, wp, c], &device)], 1);
        }
        let (nh, nw) = (hp / ws, wp / ws);
        let windows = grid
            .reshape([b, nh, ws, nw, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b * nh * nw, ws * ws, c]);
        let [q, k, v] = self.window_attn.split(windows, self.heads);
        // The backend's fused attention: no score tensor round trip through memory.
        attention(q, k, v, None, None, AttentionModuleOptions::default())
            .swap_dims(1, 2)
            .reshape([b, nh, nw, ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b, hp, wp, c])
            .slice([0..b, 0..h, 0..w])
            .reshape([b, h * w, c])
    }

    fn forward(&self, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
        let x = cpu_ops::add_depthwise3x3(&self.conv1, x, h, w);
        let x = x.clone() + self.attention(self.norm1.forward(x), h, w);
        let x = cpu_ops::add_depthwise3x3(&self.conv2, x, h, w);
        x.clone() + self.ffn.forward(self.norm2.forward(x))
    }
}

/// Attention across channels within each group: a `C/G x C/G` map per group, scaled
/// by the token count N (not the head width).
#[derive(Module, Debug)]
pub struct ChannelBlock {
    conv1: Conv2d,
    norm1: LayerNorm,
    channel_attn: QkvProj,
    conv2: Conv2d,
    norm2: LayerNorm,
    ffn: Mlp,
    groups: usize,
}

impl ChannelBlock {
    fn new(c: usize, groups: usize, device: &Device) -> Self {
        Self {
            conv1: depthwise(c, device),
            norm1: LayerNormConfig::new(c).init(device),
            channel_attn: QkvProj::new(c, device),
            conv2: depthwise(c, device),
            norm2: LayerNormConfig::new(c).init(device),
            ffn: Mlp::new(c, device),
            groups,
        }
    }

    fn attention(&self, x: Tensor<3>) -> Tensor<3> {
        let out = cpu_ops::channel_attention(&self.channel_attn.qkv, x, self.groups, |x| {
            self.channel_generic(x)
        });
        cpu_ops::linear(&self.channel_attn.proj, out)
    }

    /// burn's path: split the heads, two matmuls through transposes.
    fn channel_generic(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let [q, k, v] = self.channel_attn.split(x, self.groups);
        let q = q * (n as f64).powf(-0.5);
        let attn = softmax(q.swap_dims(2, 3).matmul(k), 3);
        // (A · vᵀ)ᵀ = v · Aᵀ: [B, G, N, C/G].
        let out = v.matmul(attn.swap_dims(2, 3));
        out.swap_dims(1, 2).reshape([b, n, c])
    }

    fn forward(&self, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
        let x = cpu_ops::add_depthwise3x3(&self.conv1, x, h, w);
        let x = x.clone() + self.attention(self.norm1.forward(x));
        let x = cpu_ops::add_depthwise3x3(&self.conv2, x, h, w);
        x.clone() + self.ffn.forward(self.norm2.forward(x))
    }
}

/// A spatial and a channel block, each with its MLP.
#[derive(Module, Debug)]
pub struct DavitBlock {
    spatial_block: SpatialBlock,
    channel_block: ChannelBlock,
}

/// DaViT: patch embeddings and blocks, stage by stage.
#[derive(Module, Debug)]
pub struct Davit {
    convs: Vec<ConvEmbed>,
    blocks: Vec<Vec<DavitBlock>>,
}

/// One named intermediate map (NCHW), for parity checks against the reference taps.
pub type Tap = (String, Tensor<4>);

impl Davit {
    /// A DaViT of shape `c`, randomly initialised.
    pub fn new(c: &VisionConfig, device: &Device) -> Self {
        let stages = c.embed_dim.len();
        Self {
            convs: (0..stages).map(|s| ConvEmbed::new(c, s, device)).collect(),
            blocks: (0..stages)
                .map(|s| {
                    let d = c.embed_dim[s];
                    (0..c.depths[s])
                        .map(|_| DavitBlock {
                            spatial_block: SpatialBlock::new(
                                d,
                                c.num_heads[s],
                                c.window_size,
                                device,
                            ),
                            channel_block: ChannelBlock::new(d, c.num_groups[s], device),
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// Last-stage tokens `[B, h*w, C]` and the grid side lengths.
    pub fn forward(&self, pixels: Tensor<4>) -> (Tensor<3>, usize, usize) {
        self.forward_taps(pixels, None)
    }

    /// As `forward`, also pushing every stage's ConvEmbed output and every spatial and
    /// channel block output into `taps` (named like the reference fixtures).
    pub fn forward_taps(
        &self,
        pixels: Tensor<4>,
        mut taps: Option<&mut Vec<Tap>>,
    ) -> (Tensor<3>, usize, usize) {
        let mut x = Stage::Image(pixels);
        for (s, (conv, blocks)) in self.convs.iter().zip(&self.blocks).enumerate() {
            let (mut t, h, w) = conv.forward(x);
            let mut tap = |name: String, t: &Tensor<3>| {
                if let Some(taps) = taps.as_deref_mut() {
                    taps.push((name, tokens_to_nchw(t.clone(), h, w)));
                }
            };
            tap(format!("vision_stage{s}_conv"), &t);
            for (i, block) in blocks.iter().enumerate() {
                t = block.spatial_block.forward(t, h, w);
                tap(format!("vision_stage{s}_block{i}_spatial"), &t);
                t = block.channel_block.forward(t, h, w);
                tap(format!("vision_stage{s}_block{i}_channel"), &t);
            }
            x = Stage::Tokens(t, h, w);
        }
        let Stage::Tokens(t, h, w) = x else {
            unreachable!("DaViT has at least one stage")
        };
        (t, h, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::cpu_ops::tests::rel_l2;
    use burn::tensor::Distribution;

    /// The host channel attention gives burn's: several groups, a batch, a band of
    /// rows and a short one, one token.
    #[test]
    fn host_channel_attention_matches_burns() {
        let device = Device::flex();
        device.seed(3);
        for (b, n, c, groups) in [(1, 300, 64, 2), (2, 37, 96, 3), (1, 1, 32, 1)] {
            let block = ChannelBlock::new(c, groups, &device);
            let x = Tensor::<3>::random([b, n, c], Distribution::Normal(0.0, 1.0), &device);
            let want = block.channel_generic(x.clone());
            let got = cpu_ops::channel_attention(&block.channel_attn.qkv, x, groups, |_| {
                unreachable!("the host path applies")
            });
            let err = rel_l2(
                &got.into_data().try_to_vec::<f32>().unwrap(),
                &want.into_data().try_to_vec::<f32>().unwrap(),
            );
            assert!(err < 1e-5, "{b}x{n}x{c}/{groups}: rel L2 {err:.3e}");
        }
    }
}
