//! EfficientNet-Lite0 on the host in token layout (`[H*W, C]` per image, channels
//! contiguous), with every BatchNorm folded into its conv when the tower is loaded.
//!
//! burn's CPU path convolves NCHW and runs BatchNorm, ReLU6 and the residual add as
//! separate passes over each activation; the network is made of 1x1 and depthwise
//! convs, where those passes cost more than the arithmetic. Here a 1x1 conv is one
//! GEMM into a buffer that already holds the bias, followed by one ReLU6 (or
//! residual) sweep, and a depthwise conv is one pass along contiguous channels with
//! bias and ReLU6 applied on the way out. The result equals burn's up to float
//! rounding (tests below; the fixture parity tests run both paths).

use super::{BN_EPS, EfficientNetLite0, FEATURE_DIM, MbConv};
use crate::nn::host_ops::{Dense, host};
#[cfg(target_arch = "x86_64")]
use crate::nn::sgemm;
use crate::nn::simd::widest;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

/// `conv` followed by `bn`, as one conv: weights `[Cout, Cin/groups, k, k]` scaled by
/// `gamma / sqrt(var + eps)` per output channel, and the matching bias.
fn fold(conv: &Conv2d, bn: &BatchNorm) -> (Vec<f32>, Vec<f32>, [usize; 4]) {
    let w = conv.weight.val();
    let dims = w.dims();
    let mut w = host(w);
    let gamma = host(bn.gamma.val());
    let beta = host(bn.beta.val());
    let mean = host(bn.running_mean.value());
    let var = host(bn.running_var.value());
    let per = w.len() / dims[0];
    let mut bias = vec![0f32; dims[0]];
    for o in 0..dims[0] {
        let scale = gamma[o] / (var[o] + BN_EPS as f32).sqrt();
        w[o * per..(o + 1) * per]
            .iter_mut()
            .for_each(|v| *v *= scale);
        bias[o] = beta[o] - mean[o] * scale;
    }
    (w, bias, dims)
}

/// TensorFlow's SAME padding on one axis: (pad before, output size).
fn same(size: usize, k: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + k).saturating_sub(size);
    (total / 2, out)
}

/// A depthwise k x k conv with stride, TF-SAME padding, bias and ReLU6.
struct Depthwise {
    /// `[k*k, C]`: the taps of each kernel position along the channels.
    taps: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    stride: usize,
}

impl Depthwise {
    fn new(w: Vec<f32>, bias: Vec<f32>, dims: [usize; 4], stride: usize) -> Self {
        let (c, k) = (dims[0], dims[2]);
        let mut taps = vec![0f32; w.len()];
        for ch in 0..c {
            for t in 0..k * k {
                taps[t * c + ch] = w[ch * k * k + t];
            }
        }
        Self {
            taps,
            bias,
            k,
            stride,
        }
    }

    fn forward(&self, x: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let c = self.bias.len();
        let (k, s) = (self.k, self.stride);
        let (pt, oh) = same(h, k, s);
        let (pl, ow) = same(w, k, s);
        let reach = Reach { h, w, k, s, pt, pl };
        assert_eq!(
            x.len(),
            h * w * c,
            "the input is h x w pixels of c channels"
        );
        let mut y = vec![0f32; oh * ow * c];
        let rows = y.par_chunks_mut(ow * c).enumerate();
        #[cfg(target_arch = "x86_64")]
        if sgemm::available() && c.is_multiple_of(x86::LANES) && matches!(k, 3 | 5) {
            rows.for_each(|(oy, row)| {
                let (taps, bias) = (&self.taps[..], &self.bias[..]);
                // SAFETY: AVX-512F is present, c is a multiple of 16, and `x` and the
                // taps hold h x w and k x k rows of c values (asserted above and at load).
                unsafe {
                    match k {
                        3 => x86::depthwise_row::<3, 9>(row, x, taps, bias, reach, oy),
                        _ => x86::depthwise_row::<5, 25>(row, x, taps, bias, reach, oy),
                    }
                }
            });
            return (y, oh, ow);
        }
        rows.for_each(|(oy, row)| depthwise_row(row, x, &self.taps, &self.bias, reach, oy));
        (y, oh, ow)
    }
}

/// The depthwise row with AVX-512 intrinsics: the vectoriser keeps the portable
/// row's accumulators in memory, a load and a store for every tap.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Reach;
    use std::arch::x86_64::*;

    /// Channels of one register.
    pub(super) const LANES: usize = 16;

    /// [`super::depthwise_row`] for a `K x K` kernel (`KK = K * K` taps) and `c` a
    /// multiple of 16, with the same sums in the same order (the same bits). Each
    /// group of 16 channels holds its taps in registers while it runs along the
    /// row; pixels whose window crosses the edge read the taps they need from memory.
    ///
    /// # Safety
    /// AVX-512F is present; `x` holds `r.h x r.w` pixels and `taps` `KK` rows, of `c`
    /// values each, `c` = `bias.len()` a multiple of 16, and `row` whole pixels.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn depthwise_row<const K: usize, const KK: usize>(
        row: &mut [f32],
        x: &[f32],
        taps: &[f32],
        bias: &[f32],
        r: Reach,
        oy: usize,
    ) {
        debug_assert_eq!(
            (KK, taps.len(), x.len()),
            (K * K, KK * bias.len(), r.h * r.w * bias.len())
        );
        let c = bias.len();
        let s = r.s;
        let ow = row.len() / c;
        let ky0 = r.pt.saturating_sub(oy * s);
        let ky1 = (r.h + r.pt - oy * s).min(K);
        // Columns whose whole window lies inside the input (all of them need the
        // row's window inside too).
        let inside = if (ky0, ky1) == (0, K) && r.w + r.pl >= K {
            r.pl.div_ceil(s)..((r.w + r.pl - K) / s + 1).min(ow)
        } else {
            0..0
        };
        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
        let (xp, tp, out) = (x.as_ptr(), taps.as_ptr(), row.as_mut_ptr());
        // SAFETY (every access below): the window's rows ky0..ky1 and columns
        // kx0..kx1 land inside the input (all K of each inside `inside`), c0 + 16
        // <= c, and ox < ow.
        unsafe {
            // Input pixel (row ky, column kx) of output column ox's window.
            let at = |ox: usize, ky: usize, kx: usize| {
                (((oy * s + ky - r.pt) * r.w + ox * s + kx - r.pl) * c) as isize
            };
            for c0 in (0..c).step_by(LANES) {
                let xp = xp.add(c0);
                let mut t = [zero; KK];
                for (i, t) in t.iter_mut().enumerate() {
                    *t = _mm512_loadu_ps(tp.add(i * c + c0));
                }
                let b = _mm512_loadu_ps(bias.as_ptr().add(c0));
                let store = |ox: usize, acc: __m512| {
                    let v = _mm512_min_ps(_mm512_max_ps(acc, zero), six);
                    _mm512_storeu_ps(out.add(ox * c + c0), v);
                };
                // A window crossing the edge: its taps from memory.
                let edge = |ox: usize| {
                    let kx0 = r.pl.saturating_sub(ox * s);
                    let kx1 = (r.w + r.pl - ox * s).min(K);
                    let mut acc = b;
                    for ky in ky0..ky1 {
                        for kx in kx0..kx1 {
                            let tap = _mm512_loadu_ps(tp.add((ky * K + kx) * c + c0));
                            let v = _mm512_loadu_ps(xp.offset(at(ox, ky, kx)));
                            acc = _mm512_fmadd_ps(v, tap, acc);
                        }
                    }
                    store(ox, acc);
                };
                for ox in (0..inside.start).chain(inside.end.max(inside.start)..ow) {
                    edge(ox);
                }
                // Inside: every tap, from registers.
                for ox in inside.clone() {
                    let mut acc = b;
                    for ky in 0..K {
                        for kx in 0..K {
                            let v = _mm512_loadu_ps(xp.offset(at(ox, ky, kx)));
                            acc = _mm512_fmadd_ps(v, t[ky * K + kx], acc);
                        }
                    }
                    store(ox, acc);
                }
            }
        }
    }
}

/// A depthwise layer's geometry: input rows and columns, kernel size, stride and
/// the SAME padding before the first row and column.
#[derive(Clone, Copy)]
struct Reach {
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    pt: usize,
    pl: usize,
}

widest! {
    /// Output row `oy`: `relu6(bias + sum of taps x input)` for each pixel and
    /// channel, the taps added in order (ky, kx), so every vector width gives the
    /// same bits. The whole row is one call, so that its loops along the channels
    /// are built for the vector unit, with no dispatch per pixel.
    fn depthwise_row(row: &mut [f32], x: &[f32], taps: &[f32], bias: &[f32], r: Reach, oy: usize) {
        let c = bias.len();
        let (k, s) = (r.k, r.s);
        for px in row.chunks_exact_mut(c) {
            px.copy_from_slice(bias);
        }
        let ow = row.len() / c;
        for ky in 0..k {
            let Some(iy) = (oy * s + ky).checked_sub(r.pt).filter(|&iy| iy < r.h) else {
                continue;
            };
            let src = &x[iy * r.w * c..(iy + 1) * r.w * c];
            for kx in 0..k {
                let tap = &taps[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                // Output column ox reads input column ox * s + kx - pl.
                let first = r.pl.saturating_sub(kx).div_ceil(s);
                let last = (r.w + r.pl - kx).div_ceil(s).min(ow);
                for ox in first..last {
                    let ix = ox * s + kx - r.pl;
                    let acc = &mut row[ox * c..(ox + 1) * c];
                    for ((o, x), t) in acc.iter_mut().zip(&src[ix * c..(ix + 1) * c]).zip(tap) {
                        *o = x.mul_add(*t, *o);
                    }
                }
            }
        }
        row.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
    }
}

struct Block {
    expand: Option<Dense>,
    depthwise: Depthwise,
    project: Dense,
    residual: bool,
}

fn block(b: &MbConv) -> Block {
    let expand = match (&b.expand_conv, &b.bn0) {
        (Some(conv), Some(bn)) => {
            let (w, bias, _) = fold(conv, bn);
            Some(Dense::from_out_in(w, bias))
        }
        _ => None,
    };
    let (w, bias, dims) = fold(&b.depthwise_conv, &b.bn1);
    let (pw, pb, _) = fold(&b.project_conv, &b.bn2);
    Block {
        expand,
        depthwise: Depthwise::new(w, bias, dims, b.depthwise_conv.stride[0]),
        project: Dense::from_out_in(pw, pb),
        residual: b.residual,
    }
}

/// The tower's folded weights, ready for [`HostLite0::tokens`].
pub struct HostLite0 {
    /// 3x3 stride-2 stem over im2col rows of 27 values (ky, kx, channel).
    stem: Dense,
    blocks: Vec<Block>,
    head: Dense,
}

impl HostLite0 {
    /// Copies `net`'s layers for the host kernels.
    pub fn new(net: &EfficientNetLite0) -> Self {
        let blocks = net.blocks.iter().map(block).collect();
        Self::with_blocks(net, blocks)
    }

    /// [`HostLite0::new`] that takes the blocks out of `net`, one at a time, so that
    /// each weight is held once (serving needs no second copy). `net` keeps its stem
    /// and head and can no longer run its blocks.
    pub fn take(net: &mut EfficientNetLite0) -> Self {
        let blocks = std::mem::take(&mut net.blocks)
            .into_iter()
            .map(|b| block(&b))
            .collect();
        Self::with_blocks(net, blocks)
    }

    fn with_blocks(net: &EfficientNetLite0, blocks: Vec<Block>) -> Self {
        let (w, bias, dims) = fold(&net.conv_stem, &net.bn0);
        // `[Cout, 3, 3, 3]` (c, ky, kx) to im2col order (ky, kx, c).
        let mut stem = vec![0f32; w.len()];
        for o in 0..dims[0] {
            for c in 0..3 {
                for t in 0..9 {
                    stem[o * 27 + t * 3 + c] = w[o * 27 + c * 9 + t];
                }
            }
        }
        let (hw, hb, _) = fold(&net.conv_head, &net.bn1);
        Self {
            stem: Dense::from_out_in(stem, bias),
            blocks,
            head: Dense::from_out_in(hw, hb),
        }
    }

    /// The head's feature map of one normalised image, planar `[3, h, w]`, as tokens
    /// `[cells, 1280]` (row-major cells), with the grid's rows and columns.
    pub fn tokens(&self, chw: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let (mut x, mut h, mut w) = self.stem(chw, h, w);
        for b in &self.blocks {
            let expanded = b.expand.as_ref().map(|e| e.forward_relu6(&x));
            let (d, oh, ow) = b.depthwise.forward(expanded.as_deref().unwrap_or(&x), h, w);
            let mut t = b.project.forward(&d);
            if b.residual {
                t.iter_mut().zip(&x).for_each(|(o, i)| *o += i);
            }
            (x, h, w) = (t, oh, ow);
        }
        let f = self.head.forward_relu6(&x);
        debug_assert_eq!(f.len(), h * w * FEATURE_DIM);
        (f, h, w)
    }

    fn stem(&self, chw: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let (pt, oh) = same(h, 3, 2);
        let (pl, ow) = same(w, 3, 2);
        let plane = h * w;
        let mut cols = vec![0f32; oh * ow * 27];
        cols.par_chunks_mut(ow * 27)
            .enumerate()
            .for_each(|(oy, row)| {
                for ox in 0..ow {
                    let px = &mut row[ox * 27..(ox + 1) * 27];
                    for ky in 0..3 {
                        let Some(iy) = (oy * 2 + ky).checked_sub(pt).filter(|&v| v < h) else {
                            continue;
                        };
                        for kx in 0..3 {
                            let Some(ix) = (ox * 2 + kx).checked_sub(pl).filter(|&v| v < w) else {
                                continue;
                            };
                            for c in 0..3 {
                                px[(ky * 3 + kx) * 3 + c] = chw[c * plane + iy * w + ix];
                            }
                        }
                    }
                }
            });
        (self.stem.forward_relu6(&cols), oh, ow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::cpu_ops::tests::rel_l2;
    use burn::prelude::*;
    use burn::tensor::Distribution;

    /// The AVX-512 depthwise row gives the portable row's bits, at both kernel
    /// sizes and strides, on rows that cross every edge and rows inside.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_depthwise_row_is_the_portable_row() {
        if !sgemm::available() {
            return; // The portable row is the only one here.
        }
        let value = |i: usize| ((i * 7_919) % 2_000) as f32 / 500.0 - 2.0;
        let (h, w, c) = (11, 9, 32);
        let x: Vec<f32> = (0..h * w * c).map(value).collect();
        for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
            let taps: Vec<f32> = (0..k * k * c).map(|i| value(i + 13) / 4.0).collect();
            let bias: Vec<f32> = (0..c).map(|i| value(i + 29)).collect();
            let ((pt, oh), (pl, ow)) = (same(h, k, s), same(w, k, s));
            let reach = Reach { h, w, k, s, pt, pl };
            for oy in 0..oh {
                let mut want = vec![0f32; ow * c];
                depthwise_row(&mut want, &x, &taps, &bias, reach, oy);
                let mut got = vec![f32::NAN; ow * c];
                // SAFETY: AVX-512F is present; the sizes are the contract's.
                unsafe {
                    match k {
                        3 => x86::depthwise_row::<3, 9>(&mut got, &x, &taps, &bias, reach, oy),
                        _ => x86::depthwise_row::<5, 25>(&mut got, &x, &taps, &bias, reach, oy),
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "k {k} stride {s} row {oy}");
            }
        }
    }

    /// Random weights and statistics, odd sizes (asymmetric SAME pads on every
    /// stride): the folded token-layout path computes burn's NCHW path.
    #[test]
    fn host_path_matches_burn() {
        let device = Device::flex();
        device.seed(3);
        let mut net = EfficientNetLite0::new(&device);
        // Non-trivial BatchNorm statistics, so the folding is exercised.
        let jitter = |t: Tensor<1>, lo: f64, hi: f64| {
            Tensor::random(t.dims(), Distribution::Uniform(lo, hi), &device)
        };
        let mut bns: Vec<&mut BatchNorm> = vec![&mut net.bn0, &mut net.bn1];
        for b in net.blocks.iter_mut() {
            if let Some(bn) = b.bn0.as_mut() {
                bns.push(bn);
            }
            bns.push(&mut b.bn1);
            bns.push(&mut b.bn2);
        }
        for bn in bns {
            bn.gamma = bn.gamma.clone().map(|t| jitter(t, 0.5, 1.5));
            bn.beta = bn.beta.clone().map(|t| jitter(t, -0.2, 0.2));
            bn.running_mean =
                burn::module::RunningState::new(jitter(bn.running_mean.value(), -0.1, 0.1));
            bn.running_var =
                burn::module::RunningState::new(jitter(bn.running_var.value(), 0.5, 2.0));
        }
        let (h, w) = (75, 53);
        let x = Tensor::<4>::random([1, 3, h, w], Distribution::Uniform(-1.0, 1.0), &device);
        let want = net.forward_features(x.clone()).features;
        let [_, c, fh, fw] = want.dims();
        let want = host(want.reshape([c, fh * fw]).transpose());
        let (got, gh, gw) = HostLite0::new(&net).tokens(&host(x), h, w);
        assert_eq!((gh, gw), (fh, fw));
        let err = rel_l2(&got, &want);
        assert!(err < 1e-5, "rel L2 {err:.3e}");
    }
}
