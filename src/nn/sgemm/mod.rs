//! `y = x w (+ b or + y)` for the host layers on an x86-64 CPU with AVX-512F or
//! AVX2 + FMA, and on aarch64 (NEON), with `w` packed once, at load, into column
//! panels that the kernel reads in order.
//!
//! Why our own: `gemm` 0.19 has no AVX-512 path on stable Rust (its widest kernel is
//! AVX2+FMA, 8 lanes), and the towers' products are small and oddly shaped (k of
//! 16-1536, widths such as 24, 40 and 1152), where a plain register tile does well.
//! The panels are 32 columns wide for every instruction set (`panels.rs`); each set
//! has its register tile (`avx512.rs`: 12 rows x 32 columns; `avx2.rs` and
//! `neon.rs`: 6 rows x 16 columns, run over each half of a panel), and the loops
//! around the tile are shared (`blocks.rs`). The last panel's columns are masked, so
//! no width needs padding in `y`. The accumulators start from the bias (a new output
//! is never filled first, then read back) or from `y`, and the kernel can clamp each
//! value as it stores it (ReLU6), so a conv layer needs no second pass over its
//! output. Each output adds its products in order of k with one fused multiply-add
//! each, so every instruction set gives the same bits. Elsewhere (armv7, whose NEON
//! intrinsics are not stable Rust, and x86-64 without AVX2), `Dense` calls `gemm`.
//!
//! Work is split into a grid of row bands by panel groups, the one that streams the
//! least: the towers' last layers (40-77 rows against up to 1280 columns) and BART's
//! wide layers by panels, so that each thread streams only its share of the weights,
//! and tall, narrow products by rows.

// Where no kernel is built (armv7), `Isa` has no value: the entry points panic
// before they compute, and `Dense` never calls them (`available` is false).
#![cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code, unreachable_code, unused_variables)
)]

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocks;
#[cfg(target_arch = "aarch64")]
mod neon;
mod out;
mod panels;

pub use blocks::Epilogue;
use blocks::Start;
use out::Out;
use panels::NR;
pub use panels::Panels;

/// The fewest rows worth a row task of their own: the tallest tile.
const TASK_ROWS: usize = 12;

/// The instruction sets the kernel is built for (those of this target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Isa {
    /// This target's, widest first.
    #[cfg(target_arch = "x86_64")]
    const ALL: &'static [Isa] = &[Isa::Avx512, Isa::Avx2];
    #[cfg(target_arch = "aarch64")]
    const ALL: &'static [Isa] = &[Isa::Neon];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ALL: &'static [Isa] = &[];

    /// Whether this CPU runs it (checked at run time on x86-64: the binary is built
    /// for its baseline; std caches the answer).
    fn runs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        use std::arch::is_x86_feature_detected as has;
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => has!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => has!("avx2") && has!("fma"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
        }
    }

    /// Every instruction set this CPU runs, widest first.
    fn here() -> impl Iterator<Item = Isa> {
        Isa::ALL.iter().copied().filter(|isa| isa.runs())
    }

    /// The widest this CPU runs.
    fn widest() -> Option<Isa> {
        Isa::here().next()
    }

    /// Rows of its whole tile.
    fn rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => <avx512::Avx512 as blocks::Kernel>::ROWS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => <avx2::Avx2 as blocks::Kernel>::ROWS,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => <neon::Neon as blocks::Kernel>::ROWS,
        }
    }
}

/// Whether this CPU runs the kernel: AVX-512F, AVX2 and FMA, or NEON (aarch64).
pub fn available() -> bool {
    Isa::widest().is_some()
}

impl Panels {
    /// `y = epilogue(y + x w)` for the rows of `x` (`[n, cin]`) and `y` (`[n, cout]`),
    /// split over rayon's pool when `parallel`.
    ///
    /// # Panics
    /// If the CPU runs no kernel (see [`available`]) or the lengths disagree.
    pub fn accumulate(&self, x: &[f32], y: &mut [f32], epilogue: Epilogue, parallel: bool) {
        self.accumulate_on(widest(), x, y, epilogue, parallel);
    }

    /// [`Panels::accumulate`] with the tile of `isa`.
    fn accumulate_on(
        &self,
        isa: Isa,
        x: &[f32],
        y: &mut [f32],
        epilogue: Epilogue,
        parallel: bool,
    ) {
        let n = x.len() / self.cin;
        assert_eq!(y.len(), n * self.cout, "row counts agree");
        let y = Out(y.as_mut_ptr());
        self.run(isa, x, y, Start::Output, epilogue, parallel);
    }

    /// `epilogue(x w + bias)` (zero without a bias) as a new `[n, cout]` buffer,
    /// written once: it is never filled first.
    ///
    /// # Panics
    /// As [`Panels::accumulate`], or if `bias` is not `cout` wide.
    pub fn product(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        parallel: bool,
    ) -> Vec<f32> {
        self.product_on(widest(), x, bias, epilogue, parallel)
    }

    /// [`Panels::product`] with the tile of `isa`.
    fn product_on(
        &self,
        isa: Isa,
        x: &[f32],
        bias: Option<&[f32]>,
        epilogue: Epilogue,
        parallel: bool,
    ) -> Vec<f32> {
        let n = x.len() / self.cin;
        assert!(
            bias.is_none_or(|b| b.len() == self.cout),
            "a bias per column"
        );
        let mut y = Vec::with_capacity(n * self.cout);
        let out = Out(y.as_mut_ptr());
        self.run(isa, x, out, Start::Bias(bias), epilogue, parallel);
        // SAFETY: `run` stored every value of the n x cout rows: each tile of every
        // panel, masked to the columns that exist, and the last rows through a copy.
        unsafe { y.set_len(n * self.cout) };
        y
    }

    /// The shared body: `y` has room for `n x cout` values, and this CPU runs `isa`.
    fn run(&self, isa: Isa, x: &[f32], y: Out, start: Start, epilogue: Epilogue, parallel: bool) {
        let (cin, cout) = (self.cin, self.cout);
        let n = x.len() / cin;
        assert_eq!(n * cin, x.len(), "whole rows");
        assert!(isa.runs(), "this CPU runs {isa:?}");
        if n == 0 || cout == 0 {
            return;
        }
        let (row_tasks, panel_tasks) = split(n, cout, parallel);
        // Whole tiles a row task, as evenly as they go.
        let tiles = n.div_ceil(isa.rows());
        let row_tasks = row_tasks.min(tiles);
        let first_row = |r: usize| (r * tiles / row_tasks * isa.rows()).min(n);
        let panels = cout.div_ceil(NR);
        let per_task = panels.div_ceil(panel_tasks);
        let panel_tasks = panels.div_ceil(per_task);
        let task = |t: usize| {
            let (r, p) = (t / panel_tasks, t % panel_tasks);
            let rows = first_row(r)..first_row(r + 1);
            let panels = p * per_task..((p + 1) * per_task).min(panels);
            let xs = &x[rows.start * cin..rows.end * cin];
            let y = y.at(rows.start * cout);
            let job = blocks::Job {
                w: self,
                panels,
                start,
                epilogue,
            };
            // SAFETY: this CPU runs `isa` (asserted above); `y` has room for the rows
            // of `xs`, and no other task writes these rows' columns `panels`.
            unsafe { rows_on(isa, &job, xs, y) }
        };
        let tasks = row_tasks * panel_tasks;
        if tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }
}

/// [`blocks::rows`] with `isa`'s tile.
///
/// # Safety
/// As [`blocks::rows`]: this CPU runs `isa`, and `y` has room for `xs`'s rows.
unsafe fn rows_on(isa: Isa, job: &blocks::Job, xs: &[f32], y: *mut f32) {
    // SAFETY (each arm): the caller's contract.
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { blocks::rows::<avx512::Avx512>(job, xs, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { blocks::rows::<avx2::Avx2>(job, xs, y) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { blocks::rows::<neon::Neon>(job, xs, y) },
    }
}

/// The widest instruction set here.
///
/// # Panics
/// If this CPU runs none of them.
fn widest() -> Isa {
    Isa::widest().expect("the packed kernel needs AVX-512F, AVX2 and FMA, or NEON")
}

/// (row tasks, panel tasks): `4 x threads` tasks, so that a slow core evens out, as
/// a grid of row bands by panel groups. Each row task streams every weight (`cout`
/// values a step of k) and each panel task every input row (`n` a step of k), so the
/// grid that streams the least, `n x panel tasks + cout x row tasks`, is chosen, ties
/// to rows. BART's fc1 (585 x 768 x 3072) in eight row tasks read its 9.4 MB of
/// weights eight times, and ran on two cores 10 % slower than in eight panel tasks
/// while the shared cache was busy, 3 % when it was quiet; DaViT's 2304-row products
/// are level either way (docs/performance.md, entry 19). Row bands take
/// whole tiles, and with one panel task their count is rounded up to a multiple of
/// the threads (585 rows in seven tasks kept one thread of two a task behind the
/// other). With too few rows and panels for any grid, every task takes all the rows.
fn split(n: usize, cout: usize, parallel: bool) -> (usize, usize) {
    if !parallel {
        return (1, 1);
    }
    let threads = rayon::current_num_threads();
    let tasks = 4 * threads;
    let panels = cout.div_ceil(NR);
    let bands = n.div_ceil(TASK_ROWS);
    let grid = std::iter::successors(Some(1), |p| Some(p * 2))
        .take_while(|&p| p <= tasks)
        .map(|p| (tasks.div_ceil(p), p))
        .filter(|&(r, p)| r <= bands && p <= panels)
        .min_by_key(|&(r, p)| (n * p + cout * r, p));
    let Some((r, p)) = grid else {
        return (1, panels.min(tasks));
    };
    let rows = n.div_ceil(r).next_multiple_of(TASK_ROWS);
    let r = n.div_ceil(rows);
    if p == 1 {
        (r.next_multiple_of(threads), 1)
    } else {
        (r, p)
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

    fn max_difference(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max)
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

    /// Every tile height (1..=12 rows and beyond: last rows in each kernel's short
    /// tiles), every tail width (masked panels, halves and registers), k from 1 up
    /// (in one pass and in several), both epilogues, one task and several (split by
    /// rows, and by panels where the rows are few), onto `y` and from a bias; for
    /// each instruction set this CPU runs.
    #[test]
    fn kernel_equals_a_plain_product() {
        for isa in Isa::here() {
            kernel_equals_a_plain_product_on(isa);
        }
    }

    fn kernel_equals_a_plain_product_on(isa: Isa) {
        for (n, cin, cout) in [
            (1, 1, 1),
            (5, 3, 16),
            (7, 5, 8),
            (3, 11, 45),
            (16, 9, 60),
            (12, 16, 17),
            (13, 27, 32),
            (25, 40, 33),
            (65, 384, 100),
            (100, 7, 24),
            (20, 33, 64),
            (35, 20, 40),
            (40, 192, 1_152),
            (300, 80, 480),
            // Passes over k (past 512 on AVX2 and NEON, 256 on AVX-512), with tail
            // rows and a masked last panel, and enough rows for row tasks.
            (7, 600, 45),
            (29, 1_100, 70),
            (150, 777, 100),
            (60, 700, 1_000),
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
                panels.accumulate_on(isa, &x, &mut got, epilogue, parallel);
                let mut want = bias.clone();
                naive(&x, &w, &mut want, cin, cout, epilogue == Epilogue::Relu6);
                let err = max_difference(&got, &want);
                assert!(err < 1e-4, "{isa:?} {n}x{cin}x{cout} {epilogue:?}: {err}");

                // A new output from the bias row, and from zero.
                let row: Vec<f32> = (0..cout).map(|i| value(i, 5) * 4.0).collect();
                for bias in [Some(&row[..]), None] {
                    let got = panels.product_on(isa, &x, bias, epilogue, parallel);
                    let mut want: Vec<f32> = (0..n)
                        .flat_map(|_| bias.map_or(vec![0.0; cout], <[f32]>::to_vec))
                        .collect();
                    naive(&x, &w, &mut want, cin, cout, epilogue == Epilogue::Relu6);
                    let err = max_difference(&got, &want);
                    assert!(
                        err < 1e-4,
                        "{isa:?} product {n}x{cin}x{cout} {epilogue:?}: {err}"
                    );
                }
            }
        }
    }

    /// The grid streams the least: panels for BART's wide layers and for a few rows,
    /// rows for a tall, narrow product, a multiple of the threads either way.
    #[test]
    fn split_streams_the_least() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build();
        pool.expect("a pool of two").install(|| {
            assert_eq!(split(585, 3_072, true), (1, 8), "BART fc1");
            assert_eq!(split(585, 768, true), (2, 4), "BART fc2");
            assert_eq!(split(18_816, 32, true), (8, 1), "the stem");
            assert_eq!(split(100, 24, true), (6, 1), "rows rounded to the threads");
            assert_eq!(split(65, 1_152, true), (1, 8), "a few rows");
            assert_eq!(split(20, 32, true), (1, 1), "one panel, two bands");
            assert_eq!(split(585, 3_072, false), (1, 1), "serial");
        });
    }

    /// Each output adds its products in order of k with one fused multiply-add
    /// each, so the AVX-512 and AVX2 tiles give the same bits (checked where the
    /// CPU runs both).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let isas: Vec<Isa> = Isa::here().collect();
        let Some(first) = isas.first() else {
            return;
        };
        for (n, cin, cout) in [(13, 27, 33), (77, 320, 1_280), (300, 80, 40), (50, 900, 70)] {
            let x: Vec<f32> = (0..n * cin).map(|i| value(i, 6)).collect();
            let w: Vec<f32> = (0..cin * cout).map(|i| value(i, 7)).collect();
            let bias: Vec<f32> = (0..cout).map(|i| value(i, 8)).collect();
            let panels = Panels::pack(&w, cin, cout);
            let want = panels.product_on(*first, &x, Some(&bias), Epilogue::Plain, true);
            for isa in &isas[1..] {
                let got = panels.product_on(*isa, &x, Some(&bias), Epilogue::Plain, true);
                assert!(got == want, "{isa:?} against {first:?}, {n}x{cin}x{cout}");
            }
        }
    }
}
