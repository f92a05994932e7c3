//! Fused kernels for the CPU backends, for the few ops where burn's CPU path spends
//! far more than the arithmetic needs (measured on Florence-2-base's vision tower):
//! - exact GELU: flex evaluates libm's scalar `erff` per element, which cost more
//!   than the two matmuls around it;
//! - DaViT's depthwise 3x3 position conv: burn convolves NCHW, so tokens `[B, H*W, C]`
//!   paid two full transposes per call, and the residual add a third pass.
//!
//! Each kernel works on the tensor's own buffer (flex hands it over without a copy
//! when nothing else shares it) and falls back to burn's ops on a GPU, under
//! autodiff, or for a dtype other than f32, so results never depend on the path
//! beyond float rounding.

use super::gemv::{self, Layout};
use super::sgemm::{self, Epilogue, Panels};
use super::simd::widest;
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

/// Whether tensors on `device` live in host memory with no gradient graph to keep:
/// where the kernels here (and `efficientnet::HostLite0`) may run.
pub fn host_device(device: &Device) -> bool {
    #[allow(deprecated)] // ndarray is kept as the reference CPU backend.
    let cpu = *device == Device::flex() || *device == Device::ndarray();
    cpu && !device.is_autodiff()
}

/// Whether `x` lives in host memory as f32 with no gradient graph to keep.
fn on_host_f32<const D: usize>(x: &Tensor<D>) -> bool {
    host_device(&x.device()) && x.dtype() == DType::F32
}

/// Below this many multiply-adds a product runs on one thread: the hand-off costs more.
const PARALLEL_WORK: usize = 1 << 18;

/// `linear.forward(x)`. On the host a few rows read the weights in place
/// ([`gemv`]), and more rows run in the packed GEMM where the CPU has a kernel for
/// it (AVX-512F, or AVX2 and FMA); elsewhere burn's linear.
pub fn linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    product(
        x,
        linear.weight.val(),
        linear.bias.as_ref().map(|b| b.val()),
    )
}

/// `x wᵀ` for weights laid out `[cout, cin]`: an embedding table as the output layer
/// (a tied lm_head). A few rows read the table in place; more rows, burn's matmul.
pub fn matmul_transposed(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    host_product(x, &w, Layout::OutIn, None).unwrap_or_else(|x| x.matmul(w.transpose()))
}

/// `x w + bias` for `[cin, cout]` weights, over the last axis of `x`.
fn product<const D: usize>(x: Tensor<D>, w: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    host_product(x, &w, Layout::InOut, bias.as_ref())
        .unwrap_or_else(|x| burn::tensor::module::linear(x, w, bias))
}

/// [`product`] on the host kernels, reading flex's weight buffers without a copy;
/// `x` back where they do not apply (another device, dtype or shape, or many rows
/// on a CPU that runs no packed kernel), for burn's ops to run instead.
#[allow(clippy::result_large_err)] // `Err` hands `x` itself back; boxing it costs a call.
fn host_product<const D: usize>(
    x: Tensor<D>,
    w: &Tensor<2>,
    layout: Layout,
    bias: Option<&Tensor<1>>,
) -> Result<Tensor<D>, Tensor<D>> {
    let dims = x.dims();
    let cin = dims[D - 1];
    let cout = match (layout, w.dims()) {
        (Layout::InOut, [i, o]) | (Layout::OutIn, [o, i]) if i == cin => o,
        _ => return Err(x),
    };
    let n = dims[..D - 1].iter().product::<usize>();
    let few = n <= gemv::FEW;
    if !on_host_f32(&x) || !(few || layout == Layout::InOut && sgemm::available()) {
        return Err(x);
    }
    let Some(w) = flex(w.clone()) else {
        return Err(x);
    };
    let b = match bias.map(|b| flex(b.clone())) {
        Some(None) => return Err(x),
        b => b.flatten(),
    };
    let (Some(w), Some(bias)) = (
        w.as_slice::<f32>(),
        b.as_ref()
            .map(|b| b.as_slice::<f32>())
            .map_or(Some(None), |b| b.map(Some)),
    ) else {
        return Err(x);
    };
    let device = x.device();
    // The rows in place where flex holds them contiguous: a layer's input is most
    // often shared (a residual keeps it, and q, k and v read it), and `into_data`
    // copies a shared buffer.
    let view = flex(x.clone());
    let data;
    let xs = match view.as_ref().and_then(|v| v.as_slice::<f32>()) {
        Some(xs) => xs,
        None => {
            data = x.into_data();
            let Ok(xs) = data.as_slice::<f32>() else {
                return Err(Tensor::from_data(data, &device));
            };
            xs
        }
    };
    let parallel = n * cin * cout >= PARALLEL_WORK;
    let y = if few {
        gemv::product(xs, w, layout, bias, cout, parallel)
    } else {
        Panels::pack(w, cin, cout).product(xs, bias, Epilogue::Plain, parallel)
    };
    let mut shape = dims;
    shape[D - 1] = cout;
    Ok(Tensor::from_data(TensorData::new(y, shape), &device))
}

/// `t`'s flex buffer, shared, not copied; `None` on another backend.
fn flex<const D: usize>(t: Tensor<D>) -> Option<FlexTensor> {
    t.try_into_primitive::<Flex>().ok()
}

/// `gelu(linear(x))`, GELU in the exact (erf) form as PyTorch's `nn.GELU()` and
/// transformers' "gelu". On the host the bias is added inside the GELU pass, which
/// saves a pass over the widest activation of a transformer block.
pub fn linear_gelu<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let bias = match &linear.bias {
        Some(bias) => host_vec(bias.val()),
        None => Some(vec![0.0; linear.weight.dims()[1]]),
    };
    let (true, Some(bias)) = (on_host_f32(&x), bias) else {
        return burn::tensor::activation::gelu(linear.forward(x));
    };
    let y = product(x, linear.weight.val(), None);
    let device = y.device();
    let mut data = y.into_data();
    let Ok(values) = data.as_mut_slice::<f32>() else {
        return burn::tensor::activation::gelu(Tensor::from_data(data, &device));
    };
    let width = bias.len();
    let rows_per_task = (1 << 14) / width.max(1) + 1;
    values
        .par_chunks_mut(rows_per_task * width)
        .for_each(|rows| gelu_rows(rows, &bias));
    Tensor::from_data(data, &device)
}

widest! {
    /// `rows = gelu(rows + bias)` (exact erf form) for rows as wide as `bias`.
    pub(crate) fn gelu_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            for (x, b) in row.iter_mut().zip(bias) {
                let v = *x + b;
                *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
            }
        }
    }
}

/// erf for f32 as a branch-free rational function, so the loop vectorises: Eigen's
/// and XLA's `x * P(x^2) / Q(x^2)` on x clamped to [-4, 4] (erf is +-1 in f32 past
/// that). Within 4e-7 of libm's erff (checked in the tests below).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for a in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ] {
        p = p * x2 + a;
    }
    let mut q = -1.456_607_2e-5_f32;
    for b in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = q * x2 + b;
    }
    // Past 3.92 libm's erff rounds to exactly +-1; so do we, so that GELU of a large
    // negative input is exactly 0 rather than the fit's 1e-7 residue times x.
    let e = x * p / q;
    if x.abs() > 3.92 {
        1.0f32.copysign(x)
    } else {
        e
    }
}

/// `x + depthwise3x3(x)` for tokens `[B, h*w, C]` on an `h x w` grid, with the conv's
/// zero padding of 1, its bias, and `conv`'s `[C, 1, 3, 3]` weights: DaViT's
/// conditional position encoding, computed in token layout in one pass.
pub fn add_depthwise3x3(conv: &Conv2d, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
    let [b, n, c] = x.dims();
    let weight = conv.weight.val();
    let host = on_host_f32(&x) && weight.dims() == [c, 1, 3, 3] && n == h * w;
    // Taps as [9][C] so the inner loop runs along contiguous channels.
    let taps = host
        .then(|| host_vec(weight.reshape([c, 9]).transpose()))
        .flatten();
    let bias = match &conv.bias {
        Some(bias) => host.then(|| host_vec(bias.val())).flatten(),
        None => Some(vec![0.0; c]),
    };
    let (Some(taps), Some(bias)) = (taps, bias) else {
        return add_depthwise3x3_nchw(conv, x, h, w);
    };
    let device = x.device();
    let data = x.into_data();
    let Ok(input) = data.as_slice::<f32>() else {
        return add_depthwise3x3_nchw(conv, Tensor::from_data(data, &device), h, w);
    };
    let mut out = vec![0.0f32; b * n * c];
    out.par_chunks_mut(w * c)
        .enumerate()
        .for_each(|(r, out_row)| {
            let image = &input[(r / h) * n * c..(r / h + 1) * n * c];
            depthwise_row(image, out_row, r % h, [h, w, c], (&taps, &bias));
        });
    Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
}

/// burn's own path: through NCHW and back.
fn add_depthwise3x3_nchw(conv: &Conv2d, x: Tensor<3>, h: usize, w: usize) -> Tensor<3> {
    let [b, n, c] = x.dims();
    let nchw = x.clone().reshape([b, h, w, c]).permute([0, 3, 1, 2]);
    x + conv.forward(nchw).permute([0, 2, 3, 1]).reshape([b, n, c])
}

fn host_vec<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    (t.dtype() == DType::F32)
        .then(|| t.into_data().try_into_vec().ok())
        .flatten()
}

/// One output row `y` of `x + conv(x)`, for one `[h, w, c]` image in token layout,
/// with the 3x3 `taps` (`[9, c]`) and `bias` of the convolution.
fn depthwise_row(
    image: &[f32],
    out: &mut [f32],
    y: usize,
    [h, w, c]: [usize; 3],
    (taps, bias): (&[f32], &[f32]),
) {
    let row = w * c;
    out.copy_from_slice(&image[y * row..(y + 1) * row]);
    for px in out.chunks_exact_mut(c) {
        px.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
    }
    for dy in 0..3 {
        let Some(yy) = (y + dy).checked_sub(1).filter(|&yy| yy < h) else {
            continue;
        };
        let src = &image[yy * row..(yy + 1) * row];
        for dx in 0..3 {
            let tap = &taps[(dy * 3 + dx) * c..(dy * 3 + dx + 1) * c];
            // Output column x reads input column x + dx - 1.
            let (out_from, src_from, len) = match dx {
                0 => (1, 0, w - 1),
                1 => (0, 0, w),
                _ => (0, 1, w - 1),
            };
            let outs = out[out_from * c..(out_from + len) * c].chunks_exact_mut(c);
            let srcs = src[src_from * c..(src_from + len) * c].chunks_exact(c);
            for (o, s) in outs.zip(srcs) {
                for ((o, s), t) in o.iter_mut().zip(s).zip(tap) {
                    *o += s * t;
                }
            }
        }
    }
}

/// A dense conv over tokens `[B, h*w, Cin]` on an `h x w` grid, to tokens
/// `[B, ho*wo, Cout]` and the new grid: DaViT's strided patch embeddings. On the host
/// it runs as one matmul over patches gathered in token layout (im2col), so neither
/// side is transposed to NCHW; elsewhere, burn's conv through NCHW.
pub fn conv2d_tokens(conv: &Conv2d, x: Tensor<3>, h: usize, w: usize) -> (Tensor<3>, usize, usize) {
    let [b, n, cin] = x.dims();
    let [cout, wcin, kh, kw] = conv.weight.dims();
    let pad = match conv.padding {
        PaddingConfig2d::Explicit(t, l, bt, r) if t == l && l == bt && bt == r => Some(t),
        PaddingConfig2d::Valid => Some(0),
        _ => None,
    };
    let [s, sw] = conv.stride;
    let plain = conv.groups == 1 && conv.dilation == [1, 1] && s == sw && kh == kw && wcin == cin;
    let (Some(p), true, true) = (pad, plain && n == h * w, on_host_f32(&x)) else {
        let nchw = x.reshape([b, h, w, cin]).permute([0, 3, 1, 2]);
        let y = conv.forward(nchw);
        let [_, _, ho, wo] = y.dims();
        return (y.permute([0, 2, 3, 1]).reshape([b, ho * wo, cout]), ho, wo);
    };
    let (k, device) = (kh, x.device());
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let data = x.into_data();
    let input = data.as_slice::<f32>().unwrap_or(&[]);
    // One row per output position: the k x k patch, row-major, channels innermost.
    let patch = k * k * cin;
    let mut cols = vec![0.0f32; b * ho * wo * patch];
    if input.len() == b * n * cin {
        cols.par_chunks_mut(wo * patch)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (img, oy) = (r / ho, r % ho);
                let image = &input[img * n * cin..(img + 1) * n * cin];
                for (ox, col) in out_row.chunks_exact_mut(patch).enumerate() {
                    for (ky, dst) in col.chunks_exact_mut(k * cin).enumerate() {
                        let Some(y) = (oy * s + ky).checked_sub(p).filter(|&y| y < h) else {
                            continue; // zero padding: the row stays zero
                        };
                        for (kx, px) in dst.chunks_exact_mut(cin).enumerate() {
                            if let Some(x) = (ox * s + kx).checked_sub(p).filter(|&x| x < w) {
                                px.copy_from_slice(
                                    &image[(y * w + x) * cin..(y * w + x + 1) * cin],
                                );
                            }
                        }
                    }
                }
            });
    }
    let cols = Tensor::<2>::from_data(TensorData::new(cols, [b * ho * wo, patch]), &device);
    // [Cout, Cin, k, k] -> [k, k, Cin, Cout], the patch order above.
    let weight = conv
        .weight
        .val()
        .permute([2, 3, 1, 0])
        .reshape([patch, cout]);
    let y = product(cols, weight, conv.bias.as_ref().map(|b| b.val()));
    (y.reshape([b, ho * wo, cout]), ho, wo)
}

/// Shape of a windowed attention: an `h x w` grid of tokens in `ws x ws` windows
/// (zero-padded right and bottom to whole windows), `heads` heads.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// Grid height.
    pub h: usize,
    /// Grid width.
    pub w: usize,
    /// Window size.
    pub ws: usize,
    /// Attention heads.
    pub heads: usize,
}

/// DaViT's window attention before its output projection: `qkv` projects tokens
/// `[B, h*w, C]`, and each head of each window attends within the window. The window
/// partition and the head split are strides here, so no token is copied into a window
/// layout and back; the projection runs without its bias, which is added on the way
/// into each window. Tokens of the padding are zero tokens, so theirs is the bias
/// alone; they attend like upstream's and their outputs are dropped. Scale
/// `1/sqrt(C/heads)`. Where the host path does not apply (GPU, autodiff, another
/// dtype), `generic` computes the same from `x`.
pub fn window_attention(
    qkv: &Linear,
    x: Tensor<3>,
    win: Windows,
    generic: impl FnOnce(Tensor<3>) -> Tensor<3>,
) -> Tensor<3> {
    let [b, n, c] = x.dims();
    let Windows { h, w, ws, heads } = win;
    let shapes = qkv.weight.dims() == [c, 3 * c] && n == h * w && ws > 0 && c % heads == 0;
    let bias = match &qkv.bias {
        Some(bias) => host_vec(bias.val()),
        None => Some(vec![0.0; 3 * c]),
    };
    let (true, true, Some(bias)) = (shapes, on_host_f32(&x), bias) else {
        return generic(x);
    };
    let device = x.device();
    let data = product(x, qkv.weight.val(), None).into_data();
    let input = data.as_slice::<f32>().unwrap_or(&[]);
    let mut out = vec![0.0f32; b * n * c];
    let band = ws * w * c; // one row of windows, all columns: contiguous in the output
    let images = out.par_chunks_mut(n * c).zip(input.par_chunks(n * 3 * c));
    images.for_each(|(out_image, tokens)| {
        // The last band of a padded image is shorter: `run` writes real rows only.
        let bands = out_image.par_chunks_mut(band).enumerate();
        bands.for_each(|(i, out_band)| {
            WindowBand::new(tokens, &bias, win, c, i).run(out_band);
        });
    });
    Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
}

/// Rows of the output a task of [`channel_attention`]'s second product takes.
const CHANNEL_ROWS: usize = 256;

/// DaViT's channel attention before its output projection: `qkv` projects tokens
/// `[B, N, C]`; within each of `groups` groups of channels, `attn = softmax(q_gᵀ k_g
/// / sqrt(N))` (channels attend to channels over every token) and the output is `v_g
/// attnᵀ`, back as `[B, N, C]`. On the host the groups are column strides of the
/// projection's rows: no split, transpose or copy of q, k and v (burn's path made
/// contiguous copies of each, and of the output). Where the host path does not apply,
/// `generic` computes the same from `x`.
pub fn channel_attention(
    qkv: &Linear,
    x: Tensor<3>,
    groups: usize,
    generic: impl FnOnce(Tensor<3>) -> Tensor<3>,
) -> Tensor<3> {
    let [b, n, c] = x.dims();
    let shapes = qkv.weight.dims() == [c, 3 * c] && groups > 0 && c % groups == 0 && n > 0;
    if !(shapes && on_host_f32(&x)) {
        return generic(x);
    }
    let device = x.device();
    let data = linear(qkv, x).into_data();
    let rows = data.as_slice::<f32>().unwrap_or(&[]);
    assert_eq!(rows.len(), b * n * 3 * c, "the projection's rows");
    let d = c / groups;
    let scale = 1.0 / (n as f32).sqrt();
    // Each (image, group)'s d x d attention: a product over all N tokens, then the
    // softmax along its rows.
    let attn: Vec<Vec<f32>> = (0..b * groups)
        .into_par_iter()
        .map(|job| {
            let (image, g) = (job / groups, job % groups);
            let at = image * n * 3 * c + g * d;
            let (q, k) = (&rows[at..], &rows[at + c..]);
            let mut a = vec![0f32; d * d];
            // SAFETY: q and k hold N rows of the group's d values 3C apart (the length
            // asserted above), and `a` is d x d.
            unsafe {
                strided_gemm(
                    [d, d, n],
                    a.as_mut_ptr(),
                    d,
                    Strided::transposed(q.as_ptr(), 3 * c),
                    Strided::rows(k.as_ptr(), 3 * c),
                    scale,
                )
            }
            for row in a.chunks_exact_mut(d) {
                let inv = exp_row(row);
                row.iter_mut().for_each(|v| *v *= inv);
            }
            a
        })
        .collect();
    // `out = v attnᵀ`, a band of rows at a time, every group into its columns.
    let mut out = vec![0f32; b * n * c];
    out.par_chunks_mut(n * c)
        .enumerate()
        .for_each(|(image, out_image)| {
            let bands = out_image.par_chunks_mut(CHANNEL_ROWS * c).enumerate();
            bands.for_each(|(band, out_band)| {
                let (first, m) = (band * CHANNEL_ROWS, out_band.len() / c);
                for (g, a) in attn[image * groups..(image + 1) * groups]
                    .iter()
                    .enumerate()
                {
                    let v = &rows[(image * n + first) * 3 * c + 2 * c + g * d..];
                    // SAFETY: v holds the band's m rows of d values 3C apart, `a` is
                    // d x d, and the band's m rows of C hold the group's d columns.
                    unsafe {
                        strided_gemm(
                            [m, d, d],
                            out_band[g * d..].as_mut_ptr(),
                            c,
                            Strided::rows(v.as_ptr(), 3 * c),
                            Strided::transposed(a.as_ptr(), d),
                            1.0,
                        )
                    }
                }
            });
        });
    Tensor::from_data(TensorData::new(out, [b, n, c]), &device)
}

/// Scratch for the windows of one band (row of windows) of one image.
struct WindowBand<'a> {
    tokens: &'a [f32],
    bias: &'a [f32],
    win: Windows,
    c: usize,
    band: usize,
    qkv: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

impl<'a> WindowBand<'a> {
    fn new(tokens: &'a [f32], bias: &'a [f32], win: Windows, c: usize, band: usize) -> Self {
        let l = win.ws * win.ws;
        Self {
            tokens,
            bias,
            win,
            c,
            band,
            qkv: vec![0.0; l * 3 * c],
            scores: vec![0.0; l * l + l],
            out: vec![0.0; l * c],
        }
    }

    fn run(mut self, out_band: &mut [f32]) {
        let Windows { h, w, ws, .. } = self.win;
        let c = self.c;
        let y0 = self.band * ws;
        for x0 in (0..w).step_by(ws) {
            // Gather the window's tokens (padding included) row-major.
            for (i, row) in self.qkv.chunks_exact_mut(3 * c).enumerate() {
                let (y, x) = (y0 + i / ws, x0 + i % ws);
                row.copy_from_slice(self.bias);
                if y < h && x < w {
                    let src = &self.tokens[(y * w + x) * 3 * c..(y * w + x + 1) * 3 * c];
                    row.iter_mut().zip(src).for_each(|(r, s)| *r += s);
                }
            }
            self.attend();
            for (i, row) in self.out.chunks_exact(c).enumerate() {
                let (y, x) = (y0 + i / ws, x0 + i % ws);
                if y < h && x < w {
                    let at = ((y - y0) * w + x) * c;
                    out_band[at..at + c].copy_from_slice(row);
                }
            }
        }
    }

    /// softmax(q kᵀ / sqrt(d)) v for every head of the gathered window.
    fn attend(&mut self) {
        let (c, heads) = (self.c, self.win.heads);
        let l = self.win.ws * self.win.ws;
        let d = c / heads;
        for head in 0..heads {
            let rows = QkvRows {
                q: &self.qkv[head * d..],
                k: &self.qkv[c + head * d..],
                v: &self.qkv[2 * c + head * d..],
                stride: 3 * c,
            };
            attend_head(
                rows,
                [l, l, d],
                &mut self.scores,
                &mut self.out[head * d..],
                c,
            );
        }
    }
}

/// One head for a block of queries: `out = softmax(q kᵀ / sqrt(d)) v` for `lq`
/// query rows against `lk` key and value rows, each `d` wide and `x.stride` apart,
/// into `out` with rows `out_stride` apart; `scratch` holds the `lq x lk` scores and
/// a value a query row. Two GEMMs and the vectorised softmax, no copies of the
/// operands.
fn attend_head(
    x: QkvRows,
    [lq, lk, d]: [usize; 3],
    scratch: &mut [f32],
    out: &mut [f32],
    out_stride: usize,
) {
    let QkvRows { q, k, v, stride } = x;
    let span = |l: usize, rs: usize| (l - 1) * rs + d;
    assert!(lq > 0 && lk > 0, "a head has rows");
    assert!(stride >= d && out_stride >= d, "rows hold a head");
    assert!(
        q.len() >= span(lq, stride) && k.len().min(v.len()) >= span(lk, stride),
        "operands cover the head"
    );
    assert!(
        scratch.len() >= lq * lk + lq && out.len() >= span(lq, out_stride),
        "buffers cover the head"
    );
    let (scores, inv) = scratch.split_at_mut(lq * lk);
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY: q holds `lq` rows and k `lk` rows of `d` values `stride` apart, and
    // scores is `lq x lk` (checked above).
    unsafe {
        strided_gemm(
            [lq, lk, d],
            scores.as_mut_ptr(),
            lk,
            Strided::rows(q.as_ptr(), stride),
            Strided::transposed(k.as_ptr(), stride),
            scale,
        )
    }
    // Each row's 1 / sum scales its d outputs after the second product, not its lk
    // scores before it.
    for (row, inv) in scores.chunks_exact_mut(lk).zip(inv.iter_mut()) {
        *inv = exp_row(row);
    }
    // SAFETY: scores is `lq x lk`, v holds `lk` rows of `d` values `stride` apart and
    // out `lq` rows of `d` values `out_stride` apart (checked above).
    unsafe {
        strided_gemm(
            [lq, d, lk],
            out.as_mut_ptr(),
            out_stride,
            Strided::rows(scores.as_ptr(), lk),
            Strided::rows(v.as_ptr(), stride),
            1.0,
        )
    }
    for (row, &inv) in out.chunks_mut(out_stride).zip(inv.iter()) {
        row[..d].iter_mut().for_each(|o| *o *= inv);
    }
}

/// An operand of [`strided_gemm`]: its first value and the steps between its columns
/// and between its rows, so heads and groups are read in place from a projection's
/// rows.
#[derive(Clone, Copy)]
struct Strided {
    at: *const f32,
    col: usize,
    row: usize,
}

impl Strided {
    /// Rows `step` values apart, each row's values adjacent.
    fn rows(at: *const f32, step: usize) -> Self {
        Self {
            at,
            col: 1,
            row: step,
        }
    }

    /// The transpose of [`Strided::rows`]: its rows are the columns here.
    fn transposed(at: *const f32, step: usize) -> Self {
        Self {
            at,
            col: step,
            row: 1,
        }
    }
}

/// `dst = scale (lhs rhs)` for an `m x k` lhs and a `k x n` rhs, on this thread, with
/// `dst`'s columns adjacent and its rows `dst_row` apart; `dst` is written, never read.
///
/// # Safety
/// Each operand holds every value its shape and steps reach.
unsafe fn strided_gemm(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_row: usize,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row as isize,
            false,
            lhs.at,
            lhs.col as isize,
            lhs.row as isize,
            rhs.at,
            rhs.col as isize,
            rhs.row as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

widest! {
    /// `row = exp(row - max(row))`, returning 1 / its sum: softmax without the last
    /// scaling, which the caller applies where it is cheaper.
    fn exp_row(row: &mut [f32]) -> f32 {
        let max = reduce8(row, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
        // Eight lanes of sums beside the exponentials, so the one pass vectorises.
        let mut lanes = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (sum, s) in lanes.iter_mut().zip(chunk) {
                *s = exp(*s - max);
                *sum += *s;
            }
        }
        let mut sum = lanes.into_iter().fold(0.0, |a, b| a + b);
        for s in chunks.into_remainder() {
            *s = exp(*s - max);
            sum += *s;
        }
        1.0 / sum
    }
}

/// A reduction over eight interleaved accumulators, so it vectorises without
/// reordering float arithmetic behind the compiler's back.
#[inline(always)]
pub(crate) fn reduce8(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    rest.iter().fold(lanes, |a, &x| f(a, x))
}

/// e^x for x <= 0 (softmax after subtracting the max) as a branch-free polynomial, so
/// the loop vectorises: Cephes' expf (range reduction by ln 2 split in two, degree-5
/// polynomial on [-ln2/2, ln2/2], 2^n through the exponent bits). Within 2 ulp of
/// `f32::exp` (checked in the tests below); underflows to 0 below -87.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 0.0);
    // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no libm floor):
    // `t`'s low mantissa bits then hold n itself, read as an integer below.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    for a in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + a;
    }
    let e = p * r * r + r + 1.0;
    // 2^n from t's bits (n + 127 in the exponent field): integer lanes, where `n as
    // i32` would be a saturating conversion that does not vectorise.
    let biased = t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

/// Multi-head self-attention without padding, `softmax(q kᵀ / sqrt(d)) v` for each
/// head of `[B, L, C]` queries, keys and values, back as `[B, L, C]` (heads side by
/// side). On the host the heads are column strides of q, k and v, so no head is
/// copied out and back, each head is two small GEMMs and a vectorised softmax, and
/// the heads run in parallel; burn's path splits and transposes each operand and
/// evaluates `exp` in scalar code. Elsewhere, burn's ops.
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let [b, l, c] = q.dims();
    if !(on_host_f32(&q) && on_host_f32(&k) && on_host_f32(&v)) || c % heads != 0 {
        return attention_generic(q, k, v, heads);
    }
    let device = q.device();
    let (Some(q), Some(k), Some(v)) = (host_vec(q), host_vec(k), host_vec(v)) else {
        unreachable!("host f32 tensors read back as f32");
    };
    let context = attention_rows(
        QkvRows {
            q: &q,
            k: &k,
            v: &v,
            stride: c,
        },
        [b, l, c],
        heads,
    );
    Tensor::from_data(TensorData::new(context, [b, l, c]), &device)
}

/// Bytes of scores an attention task holds, so that they stay in L2.
/// `gemm` packs the head's keys and values again for every block, so larger blocks
/// pack less: at BART's 585 tokens a block is 112 queries, six a head, where 128 KB
/// made eleven (the packing's share of the encoder 2.3 -> 1.3 %).
const SCORE_BYTES: usize = 256 << 10;

/// Queries, keys and values as host rows: each starts at its own first column and
/// steps `stride` values per token, so one `[tokens, 3C]` projection can serve all three.
pub struct QkvRows<'a> {
    /// Queries, row-major.
    pub q: &'a [f32],
    /// Keys, row-major.
    pub k: &'a [f32],
    /// Values, row-major.
    pub v: &'a [f32],
    /// Floats between one row and the next.
    pub stride: usize,
}

/// [`attention`] on host rows: `[b, l, c]` context, heads side by side.
pub fn attention_rows(x: QkvRows, [b, l, c]: [usize; 3], heads: usize) -> Vec<f32> {
    let QkvRows { q, k, v, stride } = x;
    let d = c / heads;
    assert!(d * heads == c && stride >= c, "heads split the width");
    if b * l == 0 {
        return Vec::new();
    }
    for t in [q, k, v] {
        assert!(t.len() >= (b * l - 1) * stride + c, "rows cover the batch");
    }
    // A task takes a block of one head's queries, so that its scores stay in L2
    // while the softmax and the second product pass over them: a whole head of
    // BART's 585 tokens has 1.4 MB of scores.
    let block = (SCORE_BYTES / (4 * l)).clamp(1, l);
    let blocks_per_head = l.div_ceil(block);
    // A job's (batch item, head, block of queries).
    let place = |job: usize| {
        (
            job / (heads * blocks_per_head),
            job / blocks_per_head % heads,
            job % blocks_per_head,
        )
    };
    let blocks: Vec<Vec<f32>> = (0..b * heads * blocks_per_head)
        .into_par_iter()
        .map(|job| {
            let (item, head, qb) = place(job);
            let lq = block.min(l - qb * block);
            let at = item * l * stride + head * d;
            let mut scratch = vec![0f32; lq * l + lq];
            let mut out = vec![0f32; lq * d];
            let rows = QkvRows {
                q: &q[at + qb * block * stride..],
                k: &k[at..],
                v: &v[at..],
                stride,
            };
            attend_head(rows, [lq, l, d], &mut scratch, &mut out, d);
            out
        })
        .collect();
    let mut context = vec![0f32; b * l * c];
    for (job, rows) in blocks.iter().enumerate() {
        let (item, head, qb) = place(job);
        for (r, src) in rows.chunks_exact(d).enumerate() {
            let at = item * l * c + (qb * block + r) * c + head * d;
            context[at..at + d].copy_from_slice(src);
        }
    }
    context
}

/// [`attention`] through burn's ops.
pub fn attention_generic(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let [b, l, c] = q.dims();
    let d = c / heads;
    let split = |t: Tensor<3>| t.reshape([b, l, heads, d]).swap_dims(1, 2);
    let scores = split(q).matmul(split(k).swap_dims(2, 3)) / (d as f64).sqrt();
    burn::tensor::activation::softmax(scores, 3)
        .matmul(split(v))
        .swap_dims(1, 2)
        .reshape([b, l, c])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::nn::conv::Conv2dConfig;

    /// Relative L2 error of `a` against `b` (shared by the kernel tests of `nn`).
    pub(crate) fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    #[test]
    fn host_attention_matches_burns() {
        let device = Device::flex();
        device.seed(11);
        // Heads of 32 (the towers', the fusion's, DaViT's) and of other widths, odd
        // row counts among them; 600 tokens take six blocks of queries a head, the
        // last one short.
        let shapes = [
            (2, 600, 64, 2),
            (1, 65, 384, 12),
            (1, 5, 64, 2),
            (2, 49, 128, 4),
            (1, 106, 128, 4),
            (1, 1, 32, 1),
            (2, 7, 24, 3),
            (1, 1, 8, 2),
        ];
        for (b, l, c, heads) in shapes {
            let r = || {
                Tensor::<3>::random(
                    [b, l, c],
                    burn::tensor::Distribution::Normal(0.0, 2.0),
                    &device,
                )
            };
            let (q, k, v) = (r(), r(), r());
            let want = attention_generic(q.clone(), k.clone(), v.clone(), heads);
            let got = attention(q, k, v, heads);
            let err = rel_l2(
                &got.into_data().try_to_vec::<f32>().unwrap(),
                &want.into_data().try_to_vec::<f32>().unwrap(),
            );
            assert!(err < 1e-6, "{b}x{l}x{c}/{heads}: rel L2 {err:.3e}");
        }
    }

    #[test]
    fn linear_gelu_matches_burns_exact_gelu() {
        let device = Device::flex();
        device.seed(5);
        // Pre-activations from -8 to 8 in steps of 1/256 (and both tails), through a
        // 1 -> 3 linear layer with a bias.
        let xs: Vec<f32> = (-2048..=2048)
            .map(|i| i as f32 / 256.0)
            .chain([-30.0, 30.0])
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [xs.len(), 1]), &device);
        let linear = LinearConfig::new(1, 3).init(&device);
        let ours: Vec<f32> = linear_gelu(&linear, x.clone())
            .into_data()
            .try_into_vec()
            .unwrap();
        let reference: Vec<f32> = burn::tensor::activation::gelu(linear.forward(x))
            .into_data()
            .try_into_vec()
            .unwrap();
        // Absolute error near zero, relative beyond 1 (the layer scales up to 30).
        let worst = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0.0f32, f32::max);
        assert!(worst < 2e-6, "worst error {worst}");
        // The erf itself, against the same libm erff burn uses.
        for &x in &xs {
            let e = (erf(x) - burn_erf(x)).abs();
            assert!(e < 4e-7, "erf({x}) off by {e}");
        }
    }

    #[test]
    fn exp_matches_std_for_softmax_inputs() {
        for i in 0..87_000 {
            let x = -(i as f32) / 1000.0;
            let (ours, std) = (exp(x), x.exp());
            assert!(
                (ours - std).abs() <= 2.5e-7 * std,
                "exp({x}) = {ours}, std {std}"
            );
        }
        // Below the clamp: a denormal-free tiny value, never NaN or negative.
        assert!((0.0..1e-37).contains(&exp(-1000.0)));
    }

    fn burn_erf(x: f32) -> f32 {
        let t = Tensor::<1>::from_data(TensorData::new(vec![x], [1]), &Device::flex());
        t.erf().into_data().try_into_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn token_conv_matches_burns_conv() {
        let device = Device::flex();
        device.seed(4);
        // DaViT's two shapes: 7x7 stride 4 pad 3 and 3x3 stride 2 pad 1, odd sizes.
        for (k, s, p, h, w) in [(7, 4, 3, 13, 10), (3, 2, 1, 7, 6)] {
            let (b, cin, cout) = (2, 3, 5);
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .init(&device);
            let x = Tensor::<3>::random(
                [b, h * w, cin],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            let nchw = x.clone().reshape([b, h, w, cin]).permute([0, 3, 1, 2]);
            let want = conv.forward(nchw);
            let [_, _, ho, wo] = want.dims();
            let want = want.permute([0, 2, 3, 1]).reshape([b, ho * wo, cout]);
            let (got, gh, gw) = conv2d_tokens(&conv, x, h, w);
            assert_eq!((gh, gw), (ho, wo));
            let (got, want): (Vec<f32>, Vec<f32>) = (
                got.into_data().try_into_vec().unwrap(),
                want.into_data().try_into_vec().unwrap(),
            );
            assert!(rel_l2(&got, &want) < 1e-6, "{}", rel_l2(&got, &want));
        }
    }

    #[test]
    fn depthwise_matches_burns_conv_including_edges() {
        let device = Device::flex();
        device.seed(3);
        let (b, h, w, c) = (2, 5, 7, 6);
        let conv = Conv2dConfig::new([c, c], [3, 3])
            .with_groups(c)
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<3>::random(
            [b, h * w, c],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let want = add_depthwise3x3_nchw(&conv, x.clone(), h, w);
        let got = add_depthwise3x3(&conv, x, h, w);
        let (got, want): (Vec<f32>, Vec<f32>) = (
            got.into_data().try_into_vec().unwrap(),
            want.into_data().try_into_vec().unwrap(),
        );
        assert!(rel_l2(&got, &want) < 1e-6, "{}", rel_l2(&got, &want));
    }
}
