//! Building blocks for networks run on plain host slices: activations are token rows
//! `[n, width]`, row-major f32, and each layer's weights are copied out of burn's
//! modules once, at load, in the layout the kernels read.
//!
//! At batch 1 a burn op costs an allocation, a dispatch and a pass of its own; the
//! small transformer and conv layers of the towers spend more on that than on their
//! arithmetic. Here a linear layer is one GEMM whose sums start from the bias, and
//! each elementwise step (GELU, the residual add, LayerNorm) is one pass.

use super::cpu_ops::{QkvRows, attention_rows, gelu_rows, reduce8};
use super::sgemm::{self, Epilogue, Panels};
use super::simd::widest;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use rayon::prelude::*;
use std::borrow::Cow;

/// A tensor's values on the host, as f32.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 weights")
}

/// Below this many multiply-adds a GEMM runs on one thread: the hand-off costs more.
const PARALLEL_WORK: usize = 1 << 18;

/// `y = x w + b` for rows of `x`: `[n, cin] x [cin, cout]`.
pub struct Dense {
    w: Weights,
    bias: Vec<f32>,
    cin: usize,
}

/// The weights in the layout of the GEMM this CPU runs, chosen once at load.
enum Weights {
    /// `[cin, cout]`, row-major, for `gemm`.
    RowMajor(Vec<f32>),
    /// Column panels for the packed kernel (AVX-512F, or AVX2 and FMA).
    Panels(Panels),
}

impl Dense {
    /// From weights already laid out `[cin, cout]` (burn's `Linear`).
    pub fn new(w: Vec<f32>, bias: Vec<f32>) -> Self {
        let cin = w.len() / bias.len();
        assert_eq!(cin * bias.len(), w.len(), "weights are [cin, cout]");
        let w = if sgemm::available() {
            Weights::Panels(Panels::pack(&w, cin, bias.len()))
        } else {
            Weights::RowMajor(w)
        };
        Self { w, bias, cin }
    }

    /// The weights as row-major `[cin, cout]`.
    fn row_major(&self) -> Cow<'_, [f32]> {
        match &self.w {
            Weights::RowMajor(w) => Cow::Borrowed(w),
            Weights::Panels(p) => Cow::Owned(p.unpack()),
        }
    }

    /// From weights laid out `[cout, cin]` (a 1x1 conv's `[cout, cin, 1, 1]`).
    pub fn from_out_in(w: Vec<f32>, bias: Vec<f32>) -> Self {
        let cout = bias.len();
        let cin = w.len() / cout;
        let mut t = vec![0f32; w.len()];
        for o in 0..cout {
            for i in 0..cin {
                t[i * cout + o] = w[o * cin + i];
            }
        }
        Self::new(t, bias)
    }

    /// A copy of burn's `Linear` for the host kernels.
    pub fn from_linear(l: &Linear) -> Self {
        let w = host(l.weight.val());
        let cout = l.weight.dims()[1];
        let bias = l.bias.as_ref().map_or(vec![0.0; cout], |b| host(b.val()));
        Self::new(w, bias)
    }

    /// Several layers over the same input as one: their outputs side by side
    /// (a transformer's query, key and value projections in one GEMM).
    pub fn side_by_side(parts: &[Dense]) -> Self {
        let cin = parts[0].cin;
        let cout: usize = parts.iter().map(Dense::cout).sum();
        let ws: Vec<_> = parts.iter().map(Dense::row_major).collect();
        let mut w = Vec::with_capacity(cin * cout);
        for i in 0..cin {
            for (p, pw) in parts.iter().zip(&ws) {
                assert_eq!(p.cin, cin, "side by side layers share their input");
                w.extend_from_slice(&pw[i * p.cout()..(i + 1) * p.cout()]);
            }
        }
        let bias = parts.iter().flat_map(|p| p.bias.iter().copied()).collect();
        Self::new(w, bias)
    }

    /// Input features.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output features.
    pub fn cout(&self) -> usize {
        self.bias.len()
    }

    /// `x @ W + b` for rows of `x`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.forward_with(x, Epilogue::Plain)
    }

    /// `relu6(x @ W + b)` for rows of `x` (EfficientNet's convs), clamped as the
    /// product is stored where the CPU runs the packed kernel.
    pub fn forward_relu6(&self, x: &[f32]) -> Vec<f32> {
        self.forward_with(x, Epilogue::Relu6)
    }

    fn forward_with(&self, x: &[f32], epilogue: Epilogue) -> Vec<f32> {
        self.forward_on(x, epilogue, self.parallel(x))
    }

    /// `epilogue(x @ W + b)` on the calling thread alone: for a caller that already
    /// runs one task per core (EfficientNet's bands).
    pub fn forward_serial(&self, x: &[f32], epilogue: Epilogue) -> Vec<f32> {
        self.forward_on(x, epilogue, false)
    }

    fn forward_on(&self, x: &[f32], epilogue: Epilogue, parallel: bool) -> Vec<f32> {
        if let Weights::Panels(p) = &self.w {
            return p.product(x, Some(&self.bias), epilogue, parallel);
        }
        let n = x.len() / self.cin;
        let mut y: Vec<f32> = Vec::with_capacity(n * self.cout());
        for _ in 0..n {
            y.extend_from_slice(&self.bias);
        }
        self.accumulate_on(x, &mut y, epilogue, parallel);
        y
    }

    /// `gelu(x w + b)` (exact erf form), the bias added inside the GELU pass.
    pub fn forward_gelu(&self, x: &[f32]) -> Vec<f32> {
        let mut y = match &self.w {
            Weights::Panels(p) => p.product(x, None, Epilogue::Plain, self.parallel(x)),
            Weights::RowMajor(_) => {
                let mut y = vec![0f32; x.len() / self.cin * self.cout()];
                self.accumulate(x, &mut y, Epilogue::Plain);
                y
            }
        };
        let width = self.cout();
        let rows_per_task = (1 << 14) / width + 1;
        y.par_chunks_mut(rows_per_task * width)
            .for_each(|rows| gelu_rows(rows, &self.bias));
        y
    }

    /// Whether a product over `x`'s rows is worth rayon's hand-off.
    fn parallel(&self, x: &[f32]) -> bool {
        x.len() * self.cout() >= PARALLEL_WORK
    }

    /// `y = epilogue(y + x w)`.
    fn accumulate(&self, x: &[f32], y: &mut [f32], epilogue: Epilogue) {
        self.accumulate_on(x, y, epilogue, self.parallel(x));
    }

    fn accumulate_on(&self, x: &[f32], y: &mut [f32], epilogue: Epilogue, parallel: bool) {
        let (cin, cout) = (self.cin, self.cout());
        let n = x.len() / cin;
        assert_eq!((n * cin, n * cout), (x.len(), y.len()), "row counts agree");
        let w = match &self.w {
            Weights::Panels(p) => return p.accumulate(x, y, epilogue, parallel),
            Weights::RowMajor(w) => w,
        };
        gemm_rows(x, w, y, cin, parallel);
        if epilogue == Epilogue::Relu6 {
            relu6(y);
        }
    }
}

/// `y += x w` through `gemm` for row-major `x` (`[n, cin]`), `w` (`[cin, cout]`)
/// and `y` (`[n, cout]`), on rayon's pool when `parallel`: the path where no packed
/// kernel runs (aarch64, armv7, x86-64 without AVX2), and the peer of `nn::sgemm` in
/// `benches/gemm.rs`.
pub fn gemm_rows(x: &[f32], w: &[f32], y: &mut [f32], cin: usize, parallel: bool) {
    let cout = w.len() / cin;
    let n = x.len() / cin;
    assert_eq!(cin * cout, w.len(), "weights are [cin, cout]");
    assert_eq!((n * cin, n * cout), (x.len(), y.len()), "row counts agree");
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: y is `n x cout`, x is `n x cin` and w is `cin x cout`, all row-major
    // and contiguous, as the strides say (lengths checked above).
    unsafe {
        gemm::gemm(
            n,
            cout,
            cin,
            y.as_mut_ptr(),
            1,
            cout as isize,
            true,
            x.as_ptr(),
            1,
            cin as isize,
            w.as_ptr(),
            1,
            cout as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Each value clamped to [0, 6] (EfficientNet's activation).
pub fn relu6(xs: &mut [f32]) {
    xs.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
}

/// Multi-head self-attention over the rows of one sequence: query, key and value as
/// one GEMM, the host attention kernel reading their column blocks in place, then
/// the output projection.
pub struct SelfAttention {
    qkv: Dense,
    out: Dense,
    heads: usize,
}

impl SelfAttention {
    /// Self-attention from burn's four projections, with `heads` heads.
    pub fn new(query: &Linear, key: &Linear, value: &Linear, out: &Linear, heads: usize) -> Self {
        Self {
            qkv: Dense::side_by_side(&[
                Dense::from_linear(query),
                Dense::from_linear(key),
                Dense::from_linear(value),
            ]),
            out: Dense::from_linear(out),
            heads,
        }
    }

    /// `[n, d]` rows in, `[n, d]` rows out.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.qkv.cout() / 3;
        let n = x.len() / d;
        let qkv = self.qkv.forward(x);
        let rows = QkvRows {
            q: &qkv,
            k: &qkv[d..],
            v: &qkv[2 * d..],
            stride: 3 * d,
        };
        self.out
            .forward(&attention_rows(rows, [1, n, d], self.heads))
    }
}

/// LayerNorm over each row, as burn's (biased variance, eps inside the root).
pub struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// `eps` is the module's own (burn keeps it private).
    pub fn from_layer_norm(ln: &LayerNorm, eps: f64) -> Self {
        let gamma = host(ln.gamma.val());
        let beta = ln
            .beta
            .as_ref()
            .map_or(vec![0.0; gamma.len()], |b| host(b.val()));
        Self {
            gamma,
            beta,
            eps: eps as f32,
        }
    }

    /// `rows = norm(rows)`.
    pub fn apply(&self, rows: &mut [f32]) {
        norm_rows(rows, &self.gamma, &self.beta, self.eps);
    }

    /// `rows = norm(rows + residual)`: the post-LN residual step.
    pub fn add_apply(&self, rows: &mut [f32], residual: &[f32]) {
        add_into(rows, residual);
        self.apply(rows);
    }

    /// `norm(rows)` as a new buffer (the pre-LN branch input).
    pub fn of(&self, rows: &[f32]) -> Vec<f32> {
        let mut out = rows.to_vec();
        self.apply(&mut out);
        out
    }
}

widest! {
    /// LayerNorm of each row as wide as `gamma`, the sums over eight interleaved
    /// accumulators so that they vectorise (a running sum waits on every add).
    fn norm_rows(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        for row in rows.chunks_exact_mut(gamma.len()) {
            let n = row.len() as f32;
            let mean = reduce8(row, 0.0, |a, b| a + b) / n;
            row.iter_mut().for_each(|x| *x -= mean);
            let var = sum_squares(row) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *x = *x * inv * g + b;
            }
        }
    }
}

/// The sum of squares over eight interleaved accumulators, as `reduce8` sums.
#[inline(always)]
fn sum_squares(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x * x;
        }
    }
    let lanes: f32 = acc.iter().sum();
    rest.iter().fold(lanes, |a, &x| a + x * x)
}

/// `acc += x`, element-wise (a residual connection).
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::cpu_ops::tests::rel_l2;
    use burn::nn::{LayerNormConfig, LinearConfig};
    use burn::tensor::Distribution;

    #[test]
    fn dense_and_norm_equal_burns_modules() {
        let device = Device::flex();
        device.seed(11);
        let (a, b, c) = (
            LinearConfig::new(24, 7).init(&device),
            LinearConfig::new(24, 5).init(&device),
            LinearConfig::new(24, 9).init(&device),
        );
        let x = Tensor::<2>::random([13, 24], Distribution::Uniform(-2.0, 2.0), &device);
        let xs = host(x.clone());
        let fused = Dense::side_by_side(&[
            Dense::from_linear(&a),
            Dense::from_linear(&b),
            Dense::from_linear(&c),
        ])
        .forward(&xs);
        let want = host(Tensor::cat(
            vec![
                a.forward(x.clone()),
                b.forward(x.clone()),
                c.forward(x.clone()),
            ],
            1,
        ));
        assert!(rel_l2(&fused, &want) < 1e-6);

        let gelu = Dense::from_linear(&a).forward_gelu(&xs);
        let want = host(burn::tensor::activation::gelu(a.forward(x.clone())));
        assert!(rel_l2(&gelu, &want) < 1e-6);

        let mut ln = LayerNormConfig::new(24).with_epsilon(1e-12).init(&device);
        ln.gamma = ln
            .gamma
            .map(|g| g + Tensor::random([24], Distribution::Default, &device));
        let norm = Norm::from_layer_norm(&ln, 1e-12);
        let r = Tensor::<2>::random([13, 24], Distribution::Default, &device);
        let mut got = xs.clone();
        norm.add_apply(&mut got, &host(r.clone()));
        let want = host(ln.forward(x + r));
        assert!(rel_l2(&got, &want) < 1e-6);
    }
}
