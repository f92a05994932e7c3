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
use crate::nn::sgemm::Epilogue;
use crate::nn::simd::widest;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
    /// The taps as [`grouped_row`] reads them, where the channels come in whole
    /// groups.
    grouped: Option<Vec<f32>>,
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
        let grouped = c.is_multiple_of(GROUP).then(|| group_taps(&taps, c));
        Self {
            taps,
            grouped,
            bias,
            k,
            stride,
        }
    }

    /// Output row `oy` of `x` (`r.h x r.w` pixels) into `row`, on this thread. It
    /// stores every value of `row`, which need not hold values before.
    fn row(&self, x: &[f32], r: Reach, oy: usize, row: &mut [MaybeUninit<f32>]) {
        if let Some(grouped) = &self.grouped {
            return grouped_row(row, x, grouped, &self.bias, r, oy);
        }
        row.fill(MaybeUninit::new(0.0));
        // SAFETY: every value was written just above.
        let row = unsafe { row.assume_init_mut() };
        depthwise_row(row, x, &self.taps, &self.bias, r, oy);
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
        // Not zeroed first: each row stores every value (a serial pass over up to
        // 1.2 MB that the other core waited through).
        let mut y = Vec::with_capacity(oh * ow * c);
        let rows = y.spare_capacity_mut().par_chunks_mut(ow * c).enumerate();
        rows.for_each(|(oy, row)| self.row(x, reach, oy, row));
        // SAFETY: every row stored each of its values (the row's contract).
        unsafe { y.set_len(oh * ow * c) };
        (y, oh, ow)
    }
}

/// Channels in a group of the grouped taps: one AVX-512 register, two of AVX2's,
/// four of NEON's.
const GROUP: usize = 16;

/// One group's channels of a pixel, or of a tap.
type Lanes = [f32; GROUP];

/// Taps `[k*k, c]` regrouped as `[c / GROUP][k*k][GROUP]`: one group's taps lie
/// together, so that [`grouped_row`] reads them as one run.
fn group_taps(taps: &[f32], c: usize) -> Vec<f32> {
    let kk = taps.len() / c;
    let mut grouped = Vec::with_capacity(taps.len());
    for c0 in (0..c).step_by(GROUP) {
        for t in 0..kk {
            grouped.extend_from_slice(&taps[t * c + c0..t * c + c0 + GROUP]);
        }
    }
    grouped
}

/// The group of values at `p`.
///
/// # Safety
/// `p` points to `GROUP` values.
#[inline(always)]
unsafe fn lanes<'a>(p: *const f32) -> &'a Lanes {
    // SAFETY: the caller's; `Lanes` has the alignment of `f32`.
    unsafe { &*p.cast::<Lanes>() }
}

/// `acc += x * t`, lane by lane, each a fused multiply-add (as the portable row's).
#[inline(always)]
fn fma(acc: &mut Lanes, x: &Lanes, t: &Lanes) {
    for ((a, x), t) in acc.iter_mut().zip(x).zip(t) {
        *a = x.mul_add(*t, *a);
    }
}

/// Stores `relu6(acc)` at `out`.
///
/// # Safety
/// `out` has room for `GROUP` values.
#[inline(always)]
unsafe fn store(out: *mut MaybeUninit<f32>, acc: &Lanes) {
    // SAFETY: the caller's.
    let out = unsafe { &mut *out.cast::<[MaybeUninit<f32>; GROUP]>() };
    for (o, a) in out.iter_mut().zip(acc) {
        o.write(a.clamp(0.0, 6.0));
    }
}

/// What every row of a layer reads: the input (`r.h x r.w` pixels), the grouped taps
/// and the bias.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    x: &'a [f32],
    grouped: &'a [f32],
    bias: &'a [f32],
    r: Reach,
}

/// `N` groups of channels from group `g` on, of output column `ox` whose window may
/// cross the edge: only its taps that land inside the input, `N` groups at once,
/// each in registers of its own (one chain of multiply-adds waited on every one
/// before it, and in the late blocks nearly every window crosses an edge).
///
/// # Safety
/// [`grouped_row`]'s checks hold, `ox` is a column of `row` and `g + N` groups fit
/// in `c`.
#[inline(always)]
unsafe fn edge_pixel<const N: usize>(
    row: &mut [MaybeUninit<f32>],
    inputs: Inputs<'_>,
    oy: usize,
    ox: usize,
    g: usize,
) {
    let Inputs {
        x,
        grouped,
        bias,
        r,
    } = inputs;
    let (c, k, s) = (bias.len(), r.k, r.s);
    let ky0 = r.pt.saturating_sub(oy * s);
    let ky1 = (r.h + r.pt - oy * s).min(k);
    let kx0 = r.pl.saturating_sub(ox * s);
    let kx1 = (r.w + r.pl - ox * s).min(k);
    let (xp, tp, bp) = (x.as_ptr(), grouped.as_ptr(), bias.as_ptr());
    // SAFETY (every access): rows ky0..ky1 and columns kx0..kx1 of the window land
    // inside the input; group g + i < c / GROUP, and its k * k taps lie at
    // (g + i) * k * k * GROUP.
    unsafe {
        let mut acc: [Lanes; N] = std::array::from_fn(|i| *lanes(bp.add((g + i) * GROUP)));
        for ky in ky0..ky1 {
            for kx in kx0..kx1 {
                let pixel = xp.add(((oy * s + ky - r.pt) * r.w + ox * s + kx - r.pl) * c);
                for (i, a) in acc.iter_mut().enumerate() {
                    let tap = lanes(tp.add((((g + i) * k + ky) * k + kx) * GROUP));
                    fma(a, lanes(pixel.add((g + i) * GROUP)), tap);
                }
            }
        }
        let out = row.as_mut_ptr().add(ox * c + g * GROUP);
        for (i, a) in acc.iter().enumerate() {
            store(out.add(i * GROUP), a);
        }
    }
}

/// Pixels summed at once inside the input columns, each in registers of its own.
const PIXELS: usize = 4;

/// Groups of channels summed at once for a pixel whose window crosses the edge.
const EDGE_GROUPS: usize = 4;

widest! {
    /// [`depthwise_row`] over taps regrouped by [`group_taps`] (`c` = `bias.len()` a
    /// multiple of [`GROUP`]), with the same sums in the same order (the same bits),
    /// each group's sums held in registers: the portable row keeps its accumulators
    /// in the row, a load and a store for every tap. It stores every value of `row`,
    /// which need not hold values before.
    ///
    /// Pixels outside, channels inside: as the loop runs along the channels, each
    /// input pixel is read front to back, as the prefetcher expects. Four pixels
    /// whose windows lie inside the input columns are summed at once; a window that
    /// crosses the edge goes through [`edge_pixel`].
    fn grouped_row(
        row: &mut [MaybeUninit<f32>],
        x: &[f32],
        grouped: &[f32],
        bias: &[f32],
        r: Reach,
        oy: usize,
    ) {
        let (c, k, s) = (bias.len(), r.k, r.s);
        assert_eq!(
            (grouped.len(), x.len(), c % GROUP, row.len() % c),
            (k * k * c, r.h * r.w * c, 0, 0),
            "the taps and input of whole groups, and a row of whole pixels"
        );
        let groups = c / GROUP;
        let ow = row.len() / c;
        let ky0 = r.pt.saturating_sub(oy * s);
        let ky1 = (r.h + r.pt - oy * s).min(k);
        // Output columns whose window lies inside the input columns.
        let inside = if r.w + r.pl >= k {
            r.pl.div_ceil(s)..((r.w + r.pl - k) / s + 1).min(ow)
        } else {
            0..0
        };
        let inputs = Inputs { x, grouped, bias, r };
        let (xp, tp, bp) = (x.as_ptr(), grouped.as_ptr(), bias.as_ptr());
        let mut ox = 0;
        while ox < ow {
            if !(inside.contains(&ox) && ox + PIXELS <= inside.end) {
                let mut g = 0;
                // SAFETY: the checks above; ox < ow; the groups g.. fit in c.
                unsafe {
                    while g + EDGE_GROUPS <= groups {
                        edge_pixel::<EDGE_GROUPS>(row, inputs, oy, ox, g);
                        g += EDGE_GROUPS;
                    }
                    for g in g..groups {
                        edge_pixel::<1>(row, inputs, oy, ox, g);
                    }
                }
                ox += 1;
                continue;
            }
            // SAFETY (every access): the four pixels' windows lie inside the input
            // columns and rows ky0..ky1 inside its rows; c0 + GROUP <= c; group g's
            // k * k taps lie at g * k * k * GROUP; ox + PIXELS <= ow.
            unsafe {
                for g in 0..groups {
                    let c0 = g * GROUP;
                    let mut acc = [*lanes(bp.add(c0)); PIXELS];
                    for ky in ky0..ky1 {
                        // The first pixel's window, its first input pixel in this row.
                        let first = xp.add(((oy * s + ky - r.pt) * r.w + ox * s - r.pl) * c + c0);
                        for kx in 0..k {
                            let tap = lanes(tp.add(((g * k + ky) * k + kx) * GROUP));
                            for (p, a) in acc.iter_mut().enumerate() {
                                fma(a, lanes(first.add((p * s + kx) * c)), tap);
                            }
                        }
                    }
                    let out = row.as_mut_ptr().add(ox * c + c0);
                    for (p, a) in acc.iter().enumerate() {
                        store(out.add(p * c), a);
                    }
                }
            }
            ox += PIXELS;
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

/// Above this many input rows per output row of a band (the rows the depthwise
/// window adds at the band's edges, expanded twice), a block runs layer by layer.
const BAND_OVERLAP: f32 = 1.4;

impl Block {
    /// `x` (`h x w` pixels) through the block: band by band where that pays,
    /// otherwise layer by layer.
    fn forward(&self, x: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let (k, s) = (self.depthwise.k, self.depthwise.stride);
        let oh = same(h, k, s).1;
        let band = oh.div_ceil(4 * rayon::current_num_threads()).max(1);
        let rows_in = ((band - 1) * s + k) as f32 / (band * s) as f32;
        if self.expand.is_none() || rows_in <= BAND_OVERLAP {
            return self.banded(x, h, w, band);
        }
        self.layered(x, h, w)
    }

    /// The block one layer at a time, each layer split over the pool.
    fn layered(&self, x: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let expanded = self.expand.as_ref().map(|e| e.forward_relu6(x));
        let (d, oh, ow) = self
            .depthwise
            .forward(expanded.as_deref().unwrap_or(x), h, w);
        let mut t = self.project.forward(&d);
        if self.residual {
            t.iter_mut().zip(x).for_each(|(o, i)| *o += i);
        }
        (t, oh, ow)
    }

    /// The block a band of `band` output rows at a time, each band one task that
    /// expands the input rows its window reads, runs the depthwise rows and projects
    /// them: the expanded rows (up to 3.7 MB for a whole map) stay in the core's L2,
    /// and the block is one parallel step, not three. A band's edge rows are expanded
    /// by both bands that read them. Each value is the layer-by-layer path's.
    fn banded(&self, x: &[f32], h: usize, w: usize, band: usize) -> (Vec<f32>, usize, usize) {
        let dw = &self.depthwise;
        let (k, s) = (dw.k, dw.stride);
        let (pt, oh) = same(h, k, s);
        let (pl, ow) = same(w, k, s);
        let (cin, e, cout) = (x.len() / (h * w), dw.bias.len(), self.project.cout());
        let mut y = Vec::with_capacity(oh * ow * cout);
        let bands = y.spare_capacity_mut().par_chunks_mut(band * ow * cout);
        bands.enumerate().for_each(|(b, out)| {
            let (oy0, rows) = (b * band, out.len() / (ow * cout));
            // Input rows the band's windows read, and the first one's place.
            let iy0 = (oy0 * s).saturating_sub(pt);
            let iy1 = ((oy0 + rows - 1) * s + k).saturating_sub(pt).min(h);
            let input = &x[iy0 * w * cin..iy1 * w * cin];
            let expanded = self
                .expand
                .as_ref()
                .map(|ex| ex.forward_serial(input, Epilogue::Relu6));
            let reach = Reach {
                h: iy1 - iy0,
                w,
                k,
                s,
                pt: pt + iy0 - oy0 * s,
                pl,
            };
            let mut d = Vec::with_capacity(rows * ow * e);
            let spare = &mut d.spare_capacity_mut()[..rows * ow * e];
            for (oy, row) in spare.chunks_exact_mut(ow * e).enumerate() {
                dw.row(expanded.as_deref().unwrap_or(input), reach, oy, row);
            }
            // SAFETY: each row stored every one of its values.
            unsafe { d.set_len(rows * ow * e) };
            let t = self.project.forward_serial(&d, Epilogue::Plain);
            if self.residual {
                let skip = &x[oy0 * ow * cin..(oy0 + rows) * ow * cin];
                for ((o, v), i) in out.iter_mut().zip(&t).zip(skip) {
                    o.write(v + i);
                }
            } else {
                for (o, v) in out.iter_mut().zip(&t) {
                    o.write(*v);
                }
            }
        });
        // SAFETY: the bands cover the rows, and each stored every value of its own.
        unsafe { y.set_len(oh * ow * cout) };
        (y, oh, ow)
    }
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
            (x, h, w) = b.forward(&x, h, w);
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

    /// The grouped row gives the portable row's bits, at both kernel sizes and
    /// strides, on rows that cross every edge and rows inside.
    #[test]
    fn grouped_row_is_the_portable_row() {
        let value = |i: usize| ((i * 7_919) % 2_000) as f32 / 500.0 - 2.0;
        // Wide rows (runs of four inside pixels), rows narrower than the kernel, and
        // channels in runs of four groups with one left over.
        for (h, w, c) in [(11, 9, 32), (7, 3, 80), (6, 14, 64)] {
            let x: Vec<f32> = (0..h * w * c).map(value).collect();
            for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
                let taps: Vec<f32> = (0..k * k * c).map(|i| value(i + 13) / 4.0).collect();
                let grouped = group_taps(&taps, c);
                let bias: Vec<f32> = (0..c).map(|i| value(i + 29)).collect();
                let ((pt, oh), (pl, ow)) = (same(h, k, s), same(w, k, s));
                let reach = Reach { h, w, k, s, pt, pl };
                for oy in 0..oh {
                    let mut want = vec![0f32; ow * c];
                    depthwise_row(&mut want, &x, &taps, &bias, reach, oy);
                    let mut got = vec![MaybeUninit::new(f32::NAN); ow * c];
                    grouped_row(&mut got, &x, &grouped, &bias, reach, oy);
                    // SAFETY: initialised (NaN before, to catch a value not stored).
                    let got: Vec<u32> = got
                        .iter()
                        .map(|v| unsafe { v.assume_init() }.to_bits())
                        .collect();
                    let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{h}x{w}x{c} k {k} stride {s} row {oy}");
                }
            }
        }
    }

    /// Band by band, any band height, gives the layer-by-layer values: each kind of
    /// block (no expansion, stride 2 with 3x3 and 5x5 windows, stride 1 with the
    /// residual), on odd map sizes.
    #[test]
    fn bands_equal_layers() {
        let device = Device::flex();
        device.seed(5);
        let net = HostLite0::new(&EfficientNetLite0::new(&device));
        let value = |i: usize| ((i * 7_919) % 2_000) as f32 / 1_000.0 - 1.0;
        let (h, w) = (23, 13);
        for b in [0, 1, 2, 3] {
            let block = &net.blocks[b];
            let cin = match &block.expand {
                Some(e) => e.cin(),
                None => block.depthwise.bias.len(),
            };
            let x: Vec<f32> = (0..h * w * cin).map(value).collect();
            let want = block.layered(&x, h, w);
            for band in [1, 3, 7, 40] {
                let got = block.banded(&x, h, w, band);
                assert_eq!((got.1, got.2), (want.1, want.2));
                let err = rel_l2(&got.0, &want.0);
                assert!(err < 1e-6, "block {b} band {band}: rel L2 {err:.3e}");
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
