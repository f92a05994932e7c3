//! `y += x w` for the host layers on a CPU with AVX-512F, with `w` packed once, at
//! load, into column panels that the kernel reads in order.
//!
//! Why our own: `gemm` 0.19 has no AVX-512 path on stable Rust (its widest kernel is
//! AVX2+FMA, 8 lanes), and the towers' products are small and oddly shaped (k of
//! 16-1536, widths such as 24, 40 and 1152), where a plain register tile does well.
//! The tile is 12 rows x 32 columns: 24 accumulators of 16 lanes, two panel
//! registers and one broadcast fit AVX-512's 32 registers. The last panel's columns
//! are masked, so no width needs padding in `y`. The kernel can clamp each value
//! as it stores it (ReLU6), so a conv layer needs no second pass over its output.
//! Each output adds its products in order of k onto the value already in `y`.
//! Where AVX-512F is missing, `Dense` calls `gemm` as before.

use rayon::prelude::*;

/// Columns of a panel: two 16-lane registers.
const NR: usize = 32;
/// Rows of a tile.
const MR: usize = 12;

/// What the kernel does to each output value as it stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// Store the sum.
    Plain,
    /// Store the sum clamped to [0, 6] (EfficientNet's activation).
    Relu6,
}

/// Whether this CPU runs the kernel (checked at run time; the binary is built for
/// the x86-64 baseline).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `[cin, cout]` weights as panels of `NR` columns: panel `p` holds rows `0..cin` of
/// columns `p * NR..(p + 1) * NR`, one row after another, zero past `cout`.
pub struct Panels {
    data: Vec<f32>,
    cin: usize,
    cout: usize,
}

impl Panels {
    /// Packs row-major `[cin, cout]` weights.
    pub fn pack(w: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(w.len(), cin * cout, "weights are [cin, cout]");
        let panels = cout.div_ceil(NR);
        let mut data = vec![0f32; panels * cin * NR];
        for (p, panel) in data.chunks_exact_mut(cin * NR).enumerate() {
            let c0 = p * NR;
            let width = NR.min(cout - c0);
            for (i, row) in panel.chunks_exact_mut(NR).enumerate() {
                row[..width].copy_from_slice(&w[i * cout + c0..i * cout + c0 + width]);
            }
        }
        Self { data, cin, cout }
    }

    /// The weights back as row-major `[cin, cout]`.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.cin * self.cout];
        for (p, panel) in self.data.chunks_exact(self.cin * NR).enumerate() {
            let c0 = p * NR;
            let width = NR.min(self.cout - c0);
            for (i, row) in panel.chunks_exact(NR).enumerate() {
                w[i * self.cout + c0..i * self.cout + c0 + width].copy_from_slice(&row[..width]);
            }
        }
        w
    }

    /// `y = epilogue(y + x w)` for the rows of `x` (`[n, cin]`) and `y` (`[n, cout]`),
    /// the rows split over rayon's pool when `parallel`.
    ///
    /// # Panics
    /// If the CPU lacks AVX-512F (see [`available`]) or the lengths disagree.
    pub fn accumulate(&self, x: &[f32], y: &mut [f32], epilogue: Epilogue, parallel: bool) {
        let (cin, cout) = (self.cin, self.cout);
        let n = x.len() / cin;
        assert_eq!((n * cin, n * cout), (x.len(), y.len()), "row counts agree");
        assert!(available(), "the packed kernel needs AVX-512F");
        if n == 0 || cout == 0 {
            return;
        }
        // Four tasks a thread, whole tiles each, so that a slow core evens out.
        let tasks = if parallel {
            4 * rayon::current_num_threads()
        } else {
            1
        };
        let rows = n.div_ceil(tasks).next_multiple_of(MR);
        let run = |(t, ys): (usize, &mut [f32])| {
            let xs = &x[t * rows * cin..(t * rows + ys.len() / cout) * cin];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above); `xs` holds the rows of `ys`.
            unsafe {
                x86::rows(self, xs, ys, epilogue)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (xs, ys, epilogue);
        };
        if tasks > 1 {
            y.par_chunks_mut(rows * cout).enumerate().for_each(run);
        } else {
            run((0, y));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epilogue, MR, NR, Panels};
    use std::arch::x86_64::*;

    /// Bytes of input rows a block holds: they stay in the core's L2 while every
    /// panel of weights passes over them.
    const BLOCK_BYTES: usize = 256 << 10;

    /// Every tile of `ys` (rows of `xs`), in blocks of rows that fit in L2; in a
    /// block, panel by panel, so one panel of weights stays in L1 while the block's
    /// rows pass under it.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(w: &Panels, xs: &[f32], ys: &mut [f32], epilogue: Epilogue) {
        let (k, cout) = (w.cin, w.cout);
        let block = (BLOCK_BYTES / (4 * k)).max(MR) / MR * MR;
        for (xb, yb) in xs.chunks(block * k).zip(ys.chunks_mut(block * cout)) {
            // SAFETY: as this function's own contract, for a block of its rows.
            unsafe { block_rows(w, xb, yb, epilogue) };
        }
    }

    /// [`rows`] for one block. The last rows, fewer than a tile, go through a
    /// zero-padded copy, so the kernel has one shape.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_rows(w: &Panels, xs: &[f32], ys: &mut [f32], epilogue: Epilogue) {
        let (k, cout) = (w.cin, w.cout);
        let n = ys.len() / cout;
        let full = n / MR * MR;
        let relu6 = epilogue == Epilogue::Relu6;
        // Only a block with a partial tile pays for the padded copy.
        let mut tail_x = Vec::new();
        if full < n {
            tail_x.resize(MR * k, 0f32);
            tail_x[..(n - full) * k].copy_from_slice(&xs[full * k..]);
        }
        let mut tail_y = [0f32; MR * NR];
        for (p, panel) in w.data.chunks_exact(k * NR).enumerate() {
            let c0 = p * NR;
            let width = NR.min(cout - c0);
            let masks = (mask(width), mask(width.saturating_sub(16)));
            let b = panel.as_ptr();
            for r0 in (0..full).step_by(MR) {
                let a = xs[r0 * k..].as_ptr();
                let c = ys[r0 * cout + c0..].as_mut_ptr();
                // SAFETY: `a` has MR rows of k values, `c` MR rows of `width` values at
                // stride `cout`, `b` k rows of NR; the masks cover `width` columns.
                unsafe { tile(k, a, b, c, cout, masks, relu6) };
            }
            if full < n {
                for (r, row) in ys[full * cout..].chunks_exact(cout).enumerate() {
                    tail_y[r * NR..r * NR + width].copy_from_slice(&row[c0..c0 + width]);
                }
                // SAFETY: the padded copies hold MR full rows.
                unsafe { tile(k, tail_x.as_ptr(), b, tail_y.as_mut_ptr(), NR, masks, relu6) };
                for (r, row) in ys[full * cout..].chunks_exact_mut(cout).enumerate() {
                    row[c0..c0 + width].copy_from_slice(&tail_y[r * NR..r * NR + width]);
                }
            }
        }
    }

    /// The lanes of a 16-lane register that hold the first `width` columns.
    fn mask(width: usize) -> u16 {
        if width >= 16 {
            0xFFFF
        } else {
            (1u16 << width) - 1
        }
    }

    /// One MR x NR tile: `c = epilogue(c + a b)`, `a`'s rows at stride k, `c`'s at
    /// `ldc`, the columns of each half of `c` masked by `masks`. Written out register
    /// by register: as an array, LLVM kept the accumulators on the stack.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile(
        k: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (u16, u16),
        relu6: bool,
    ) {
        macro_rules! kernel {
            ($($r:literal => $lo:ident $hi:ident),*) => {
                // SAFETY (every pointer access): the caller's bounds; masked lanes are
                // not touched.
                unsafe {
                    $(
                        let mut $lo = _mm512_maskz_loadu_ps(m0, c.add($r * ldc));
                        let mut $hi = _mm512_maskz_loadu_ps(m1, c.add($r * ldc + 16));
                    )*
                    for p in 0..k {
                        let b0 = _mm512_loadu_ps(b.add(p * NR));
                        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                        $(
                            let x = _mm512_set1_ps(*a.add($r * k + p));
                            $lo = _mm512_fmadd_ps(x, b0, $lo);
                            $hi = _mm512_fmadd_ps(x, b1, $hi);
                        )*
                    }
                    if relu6 {
                        let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
                        $(
                            $lo = _mm512_min_ps(_mm512_max_ps($lo, zero), six);
                            $hi = _mm512_min_ps(_mm512_max_ps($hi, zero), six);
                        )*
                    }
                    $(
                        _mm512_mask_storeu_ps(c.add($r * ldc), m0, $lo);
                        _mm512_mask_storeu_ps(c.add($r * ldc + 16), m1, $hi);
                    )*
                }
            };
        }
        kernel!(
            0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b,
            5 => c5a c5b, 6 => c6a c6b, 7 => c7a c7b, 8 => c8a c8b, 9 => c9a c9b,
            10 => c10a c10b, 11 => c11a c11b
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], y: &mut [f32], cin: usize, cout: usize, relu6: bool) {
        for (xr, yr) in x.chunks_exact(cin).zip(y.chunks_exact_mut(cout)) {
            for (o, out) in yr.iter_mut().enumerate() {
                let mut s = *out as f64;
                for (i, xv) in xr.iter().enumerate() {
                    s += *xv as f64 * w[i * cout + o] as f64;
                }
                *out = if relu6 { s.clamp(0.0, 6.0) } else { s } as f32;
            }
        }
    }

    /// A value in [-1, 1) from an index, so the test needs no random source.
    fn value(i: usize, salt: usize) -> f32 {
        let h = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 2_000;
        h as f32 / 1_000.0 - 1.0
    }

    #[test]
    fn packing_round_trips_every_width() {
        for (cin, cout) in [(1, 1), (3, 31), (5, 32), (7, 33), (2, 70)] {
            let w: Vec<f32> = (0..cin * cout).map(|i| value(i, 1)).collect();
            assert_eq!(Panels::pack(&w, cin, cout).unpack(), w, "{cin} x {cout}");
        }
    }

    /// Every tile height (1..=12 rows and beyond), every tail width (masked one- and
    /// two-register panels), k from 1 up, both epilogues, one task and several.
    #[test]
    fn kernel_equals_a_plain_product() {
        if !available() {
            return; // Without AVX-512F, `Dense` never builds panels.
        }
        for (n, cin, cout) in [
            (1, 1, 1),
            (5, 3, 16),
            (12, 16, 17),
            (13, 27, 32),
            (25, 40, 33),
            (65, 384, 100),
            (100, 7, 24),
        ] {
            let x: Vec<f32> = (0..n * cin).map(|i| value(i, 2)).collect();
            let w: Vec<f32> = (0..cin * cout).map(|i| value(i, 3)).collect();
            let bias: Vec<f32> = (0..n * cout).map(|i| value(i, 4) * 4.0).collect();
            let panels = Panels::pack(&w, cin, cout);
            for (epilogue, parallel) in [
                (Epilogue::Plain, false),
                (Epilogue::Relu6, false),
                (Epilogue::Plain, true),
                (Epilogue::Relu6, true),
            ] {
                let mut got = bias.clone();
                panels.accumulate(&x, &mut got, epilogue, parallel);
                let mut want = bias.clone();
                naive(&x, &w, &mut want, cin, cout, epilogue == Epilogue::Relu6);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{n}x{cin}x{cout} {epilogue:?}: {err}");
            }
        }
    }
}
