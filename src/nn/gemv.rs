//! Products of a few rows against weights read where they lie: a decoder step's one
//! token (or a beam search's few) against a layer's `[cin, cout]` weights, or against
//! the tied embedding's `[vocab, d]` rows (Florence-2's lm_head).
//!
//! With one row, a product is one pass over the weights and memory bandwidth is the
//! limit. So the weights are read once, in place, and split by columns over the
//! threads, each streaming its share; packing them first (as `sgemm` does for many
//! rows) would read them twice and write them once. The loops are plain Rust that
//! `widest!` builds for AVX-512, AVX2 + FMA and the target's baseline (NEON on
//! aarch64). A `[cin, cout]` product starts from the bias and adds the products in
//! order of k with one fused multiply-add each, as `sgemm`'s kernel does, so the two
//! give the same bits.

use super::simd::widest;
use rayon::prelude::*;
use std::ops::Range;

/// Up to this many rows a product reads the weights in place; more rows pay for
/// packing them (or for burn's GEMM, which packs them too).
pub const FEW: usize = 8;

/// Columns whose sums stay in L1 while rows of the weights pass under them.
const COLS: usize = 128;

/// How a layer's weights are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[cin, cout]`, row-major (burn's `Linear`).
    InOut,
    /// `[cout, cin]`, row-major (an embedding table used as the output layer).
    OutIn,
}

/// `x w + bias` (zero without a bias) for the rows of `x` (`[n, cin]`), as a new
/// `[n, cout]` buffer; on rayon's pool when `parallel`, each task a share of the
/// columns.
///
/// # Panics
/// If the lengths disagree.
pub fn product(
    x: &[f32],
    w: &[f32],
    layout: Layout,
    bias: Option<&[f32]>,
    cout: usize,
    parallel: bool,
) -> Vec<f32> {
    assert!(
        cout > 0 && w.len().is_multiple_of(cout),
        "whole rows of weights"
    );
    let cin = w.len() / cout;
    let n = x.len().checked_div(cin).unwrap_or(0);
    assert_eq!(n * cin, x.len(), "whole rows of x");
    assert!(bias.is_none_or(|b| b.len() == cout), "a bias per column");
    let tasks = if parallel {
        rayon::current_num_threads().min(cout.div_ceil(COLS))
    } else {
        1
    };
    let per = cout.div_ceil(COLS).div_ceil(tasks.max(1)) * COLS;
    let cols = |t: usize| t * per..((t + 1) * per).min(cout);
    let part = |t: usize| {
        let cols = cols(t);
        let mut part = vec![0f32; n * cols.len()];
        match layout {
            Layout::InOut => in_out(x, w, bias, cout, cols, &mut part),
            Layout::OutIn => out_in(x, w, bias, cin, cols, &mut part),
        }
        part
    };
    let tasks = cout.div_ceil(per);
    if tasks <= 1 {
        return part(0);
    }
    let parts: Vec<Vec<f32>> = (0..tasks).into_par_iter().map(part).collect();
    let mut y = vec![0f32; n * cout];
    for (t, part) in parts.iter().enumerate() {
        let cols = cols(t);
        for (row, src) in y.chunks_exact_mut(cout).zip(part.chunks_exact(cols.len())) {
            row[cols.clone()].copy_from_slice(src);
        }
    }
    y
}

widest! {
    /// Columns `cols` of `x w + bias` for `[cin, cout]` weights, into `part`
    /// (`[n, cols.len()]`): a chunk of columns at a time, each row of the chunk's
    /// weights read once for every row of `x`.
    fn in_out(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        cout: usize,
        cols: Range<usize>,
        part: &mut [f32],
    ) {
        let cin = w.len() / cout;
        let width = cols.len();
        for c0 in cols.clone().step_by(COLS) {
            let c1 = (c0 + COLS).min(cols.end);
            let at = c0 - cols.start..c1 - cols.start;
            for row in part.chunks_exact_mut(width) {
                match bias {
                    Some(b) => row[at.clone()].copy_from_slice(&b[c0..c1]),
                    None => row[at.clone()].fill(0.0),
                }
            }
            for k in 0..cin {
                let wk = &w[k * cout + c0..k * cout + c1];
                for (xr, row) in x.chunks_exact(cin).zip(part.chunks_exact_mut(width)) {
                    let xk = xr[k];
                    for (s, &wv) in row[at.clone()].iter_mut().zip(wk) {
                        *s = xk.mul_add(wv, *s);
                    }
                }
            }
        }
    }
}

widest! {
    /// Columns `cols` of `x wᵀ + bias` for `[cout, cin]` weights, into `part`
    /// (`[n, cols.len()]`): one dot product per output, each weight row read once.
    fn out_in(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        cin: usize,
        cols: Range<usize>,
        part: &mut [f32],
    ) {
        let width = cols.len();
        for (j, c) in cols.enumerate() {
            let wc = &w[c * cin..(c + 1) * cin];
            let b = bias.map_or(0.0, |b| b[c]);
            for (xr, row) in x.chunks_exact(cin).zip(part.chunks_exact_mut(width)) {
                row[j] = b + dot(xr, wc);
            }
        }
    }
}

/// `a · b` over 32 interleaved sums, so that it vectorises (and has independent
/// chains to overlap) without reordering float arithmetic behind the compiler's back.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (a32, b32) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (a32.remainder(), b32.remainder());
    for (ca, cb) in a32.zip(b32) {
        for i in 0..L {
            acc[i] = ca[i].mul_add(cb[i], acc[i]);
        }
    }
    for (i, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[i] = x.mul_add(y, acc[i]);
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize, salt: usize) -> f32 {
        ((i * 7919 + salt * 104_729) % 2003) as f32 / 1001.0 - 1.0
    }

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| value(i, salt)).collect()
    }

    /// In f64, in order of k.
    fn naive(x: &[f32], w: &[f32], bias: &[f32], cin: usize, layout: Layout) -> Vec<f64> {
        let cout = bias.len();
        let n = x.len() / cin;
        let mut y = vec![0f64; n * cout];
        for r in 0..n {
            for c in 0..cout {
                let mut s = f64::from(bias[c]);
                for k in 0..cin {
                    let wv = match layout {
                        Layout::InOut => w[k * cout + c],
                        Layout::OutIn => w[c * cin + k],
                    };
                    s += f64::from(x[r * cin + k]) * f64::from(wv);
                }
                y[r * cout + c] = s;
            }
        }
        y
    }

    #[test]
    fn both_layouts_equal_a_plain_product() {
        // Widths around the column chunk and the 32 sums, rows up to FEW.
        for (n, cin, cout) in [(1, 768, 768), (3, 37, 300), (8, 64, 129), (2, 5, 1)] {
            let x = values(n * cin, 1);
            let bias = values(cout, 2);
            for layout in [Layout::InOut, Layout::OutIn] {
                let w = values(cin * cout, 3);
                let want = naive(&x, &w, &bias, cin, layout);
                for parallel in [false, true] {
                    let got = product(&x, &w, layout, Some(&bias), cout, parallel);
                    assert_eq!(got.len(), want.len());
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (f64::from(g) - w).abs())
                        .fold(0.0, f64::max);
                    assert!(worst < 1e-4, "{n}x{cin}x{cout} {layout:?}: off by {worst}");
                }
            }
        }
    }

    #[test]
    fn without_a_bias_the_sums_start_from_zero() {
        let (cin, cout) = (16, 40);
        let x = values(2 * cin, 4);
        let w = values(cin * cout, 5);
        let zero = vec![0f32; cout];
        for layout in [Layout::InOut, Layout::OutIn] {
            let with = product(&x, &w, layout, Some(&zero), cout, true);
            let without = product(&x, &w, layout, None, cout, true);
            assert_eq!(with, without);
        }
    }

    #[test]
    fn rows_in_place_give_the_packed_kernels_bits() {
        if !super::super::sgemm::available() {
            return; // no packed kernel for this CPU
        }
        let (n, cin, cout) = (3, 200, 150);
        let (x, w, bias) = (values(n * cin, 6), values(cin * cout, 7), values(cout, 8));
        let packed = super::super::sgemm::Panels::pack(&w, cin, cout);
        let want = packed.product(&x, Some(&bias), super::super::sgemm::Epilogue::Plain, false);
        assert_eq!(
            product(&x, &w, Layout::InOut, Some(&bias), cout, true),
            want
        );
    }
}
