//! `y = x w (+ b or + y)` for the host layers on a CPU with AVX-512F, with `w`
//! packed once, at load, into column panels that the kernel reads in order.
//!
//! Why our own: `gemm` 0.19 has no AVX-512 path on stable Rust (its widest kernel is
//! AVX2+FMA, 8 lanes), and the towers' products are small and oddly shaped (k of
//! 16-1536, widths such as 24, 40 and 1152), where a plain register tile does well.
//! The tile is 12 rows x 32 columns: 24 accumulators of 16 lanes, two panel
//! registers and one broadcast fit AVX-512's 32 registers. The last panel's columns
//! are masked, so no width needs padding in `y`. The accumulators start from the
//! bias (a new output is never filled first, then read back) or from `y`, and the
//! kernel can clamp each value as it stores it (ReLU6), so a conv layer needs no
//! second pass over its output. Each output adds its products in order of k.
//! Where AVX-512F is missing, `Dense` calls `gemm` as before.
//!
//! Work is split by rows when there are enough tiles to share, and by panels when
//! there are few rows (the towers' last layers: 40-77 rows against up to 1280
//! columns), so that each thread streams only its share of the weights.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Columns of a panel: two 16-lane registers.
const NR: usize = 32;
/// Rows of a tile.
const MR: usize = 12;
/// Packed values from which packing is worth splitting over the pool.
const PARALLEL_PACK: usize = 1 << 18;

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

/// Where the accumulators start.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Start<'a> {
    /// From the values in `y`.
    Output,
    /// From the bias row, or from zero.
    Bias(Option<&'a [f32]>),
}

/// `y`'s first value, shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint (row, column) tiles through it, and the owner of `y`
// waits for every task before it reads `y` again.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The address `i` values on (a method, so that closures capture the whole
    /// `Out`, which may cross threads, and not its pointer).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl Panels {
    /// Packs row-major `[cin, cout]` weights. Large weights are packed in parallel,
    /// a panel a task: Florence-2 packs each layer as it runs it, and a serial copy
    /// left the other core idle. Every value is written once (not zeroed first).
    pub fn pack(w: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(w.len(), cin * cout, "weights are [cin, cout]");
        let len = cout.div_ceil(NR) * cin * NR;
        let mut data = Vec::with_capacity(len);
        let pack_panel = |(p, panel): (usize, &mut [MaybeUninit<f32>])| {
            let c0 = p * NR;
            let width = NR.min(cout - c0);
            for (i, row) in panel.chunks_exact_mut(NR).enumerate() {
                let (values, pad) = row.split_at_mut(width);
                let src = &w[i * cout + c0..i * cout + c0 + width];
                values
                    .iter_mut()
                    .zip(src)
                    .for_each(|(d, &v)| _ = d.write(v));
                pad.iter_mut().for_each(|d| _ = d.write(0.0));
            }
        };
        let (spare, panel) = (&mut data.spare_capacity_mut()[..len], (cin * NR).max(1));
        if len >= PARALLEL_PACK {
            spare
                .par_chunks_exact_mut(panel)
                .enumerate()
                .for_each(pack_panel);
        } else {
            spare
                .chunks_exact_mut(panel)
                .enumerate()
                .for_each(pack_panel);
        }
        // SAFETY: every panel wrote each of its `cin x NR` values above.
        unsafe { data.set_len(len) };
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
    /// split over rayon's pool when `parallel`.
    ///
    /// # Panics
    /// If the CPU lacks AVX-512F (see [`available`]) or the lengths disagree.
    pub fn accumulate(&self, x: &[f32], y: &mut [f32], epilogue: Epilogue, parallel: bool) {
        let n = x.len() / self.cin;
        assert_eq!(y.len(), n * self.cout, "row counts agree");
        self.run(x, Out(y.as_mut_ptr()), Start::Output, epilogue, parallel);
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
        let n = x.len() / self.cin;
        assert!(
            bias.is_none_or(|b| b.len() == self.cout),
            "a bias per column"
        );
        let mut y = Vec::with_capacity(n * self.cout);
        self.run(
            x,
            Out(y.as_mut_ptr()),
            Start::Bias(bias),
            epilogue,
            parallel,
        );
        // SAFETY: `run` stored every value of the n x cout rows: each tile of every
        // panel, masked to the columns that exist, and the last rows through a copy.
        unsafe { y.set_len(n * self.cout) };
        y
    }

    /// The shared body: `y` has room for `n x cout` values.
    fn run(&self, x: &[f32], y: Out, start: Start, epilogue: Epilogue, parallel: bool) {
        let (cin, cout) = (self.cin, self.cout);
        let n = x.len() / cin;
        assert_eq!(n * cin, x.len(), "whole rows");
        assert!(available(), "the packed kernel needs AVX-512F");
        if n == 0 || cout == 0 {
            return;
        }
        let (row_tasks, panel_tasks) = split(n, cout, parallel);
        let rows = n.div_ceil(row_tasks).next_multiple_of(MR);
        let row_tasks = n.div_ceil(rows);
        let panels = cout.div_ceil(NR);
        let per_task = panels.div_ceil(panel_tasks);
        let panel_tasks = panels.div_ceil(per_task);
        let task = |t: usize| {
            let (r, p) = (t / panel_tasks, t % panel_tasks);
            let rows = r * rows..((r + 1) * rows).min(n);
            let panels = p * per_task..((p + 1) * per_task).min(panels);
            let xs = &x[rows.start * cin..rows.end * cin];
            let y = y.at(rows.start * cout);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is present (asserted above); `y` has room for the
            // rows of `xs`, and no other task writes these rows' columns `panels`.
            unsafe {
                x86::rows(self, xs, y, panels, start, epilogue)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (xs, y, panels, start, epilogue);
        };
        let tasks = row_tasks * panel_tasks;
        if tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }
}

/// (row tasks, panel tasks): four row tasks a thread, whole tiles each, so that a
/// slow core evens out; with fewer tiles than that, every task takes all the rows
/// and a share of the panels, so each thread streams only its share of the weights.
fn split(n: usize, cout: usize, parallel: bool) -> (usize, usize) {
    if !parallel {
        return (1, 1);
    }
    let tasks = 4 * rayon::current_num_threads();
    if n.div_ceil(MR) >= tasks {
        (tasks, 1)
    } else {
        (1, cout.div_ceil(NR).min(tasks))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Epilogue, MR, NR, Panels, Start};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Bytes of input rows a block holds: they stay in the core's L2 while every
    /// panel of weights passes over them.
    const BLOCK_BYTES: usize = 256 << 10;

    /// Columns `panels` of every tile of `y` (rows of `xs`, `cout` apart), in blocks
    /// of rows that fit in L2; in a block, panel by panel, so one panel of weights
    /// stays in L1 while the block's rows pass under it.
    ///
    /// # Safety
    /// AVX-512F is present, and `y` has room for `xs`'s rows of `cout` values (and
    /// holds them where `start` is `Output`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        w: &Panels,
        xs: &[f32],
        y: *mut f32,
        panels: Range<usize>,
        start: Start,
        epilogue: Epilogue,
    ) {
        let (k, cout) = (w.cin, w.cout);
        let block = (BLOCK_BYTES / (4 * k)).max(MR) / MR * MR;
        for (b, xb) in xs.chunks(block * k).enumerate() {
            // SAFETY: as this function's own contract, for a block of its rows.
            unsafe {
                block_rows(
                    w,
                    xb,
                    y.add(b * block * cout),
                    panels.clone(),
                    start,
                    epilogue,
                )
            };
        }
    }

    /// [`rows`] for one block. The last rows, fewer than a tile, go through a
    /// zero-padded copy, so the kernel has one shape.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_rows(
        w: &Panels,
        xs: &[f32],
        y: *mut f32,
        panels: Range<usize>,
        start: Start,
        epilogue: Epilogue,
    ) {
        let (k, cout) = (w.cin, w.cout);
        let n = xs.len() / k;
        let full = n / MR * MR;
        let relu6 = epilogue == Epilogue::Relu6;
        let from_y = matches!(start, Start::Output);
        // Only a block with a partial tile pays for the padded copy, and its last rows
        // run in the shortest tile that holds them (4, 8 or 12 rows): padded to 12,
        // five rows left over cost as much as a whole tile.
        let tail = (n - full).next_multiple_of(4);
        let mut tail_x = Vec::new();
        if full < n {
            tail_x.resize(tail * k, 0f32);
            tail_x[..(n - full) * k].copy_from_slice(&xs[full * k..]);
        }
        let mut tail_y = [0f32; MR * NR];
        // While a panel's tiles run, they fetch the next panel into L2, a share
        // each: the weights come from L3 or memory once a poster, and the first tile
        // of a panel would otherwise wait for every line of it.
        let share = k.div_ceil(n.div_ceil(MR));
        let last = panels.end;
        for p in panels {
            let panel = &w.data[p * k * NR..(p + 1) * k * NR];
            let next = (p + 1 < last).then(|| w.data[(p + 1) * k * NR..].as_ptr());
            let fetch = |tile: usize| match next {
                Some(next) if tile * share < k => Fetch {
                    from: next.wrapping_add(tile * share * NR),
                    rows: share.min(k - tile * share),
                },
                _ => Fetch::NONE,
            };
            let c0 = p * NR;
            let width = NR.min(cout - c0);
            let masks = (mask(width), mask(width.saturating_sub(16)));
            let b = panel.as_ptr();
            let init = match start {
                Start::Output => Init::Output,
                Start::Bias(Some(bias)) => Init::Row(bias[c0..].as_ptr()),
                Start::Bias(None) => Init::Zero,
            };
            for r0 in (0..full).step_by(MR) {
                let a = xs[r0 * k..].as_ptr();
                // SAFETY: `a` has MR rows of k values, `y` room for them at stride
                // `cout` (the caller's contract), `b` k rows of NR; the masks cover
                // `width` columns, and the bias row has `width` values from c0.
                let f = fetch(r0 / MR);
                unsafe { tile(k, a, b, y.add(r0 * cout + c0), cout, masks, init, relu6, f) };
            }
            if full < n {
                let rows = n - full;
                for r in (0..rows).filter(|_| from_y) {
                    // SAFETY: row full + r of y holds `cout` values (the contract), and
                    // `width` values from c0 lie inside it.
                    unsafe {
                        let src = y.add((full + r) * cout + c0);
                        std::ptr::copy_nonoverlapping(src, tail_y[r * NR..].as_mut_ptr(), width);
                    }
                }
                let (a, c, f) = (tail_x.as_ptr(), tail_y.as_mut_ptr(), fetch(full / MR));
                // SAFETY: the padded copies hold `tail` full rows, the rows of the tile
                // each call runs.
                unsafe {
                    match tail {
                        4 => tile4(k, a, b, c, NR, masks, init, relu6, f),
                        8 => tile8(k, a, b, c, NR, masks, init, relu6, f),
                        _ => tile(k, a, b, c, NR, masks, init, relu6, f),
                    }
                };
                for r in 0..rows {
                    // SAFETY: as above; y has room for these rows.
                    unsafe {
                        let dst = y.add((full + r) * cout + c0);
                        std::ptr::copy_nonoverlapping(tail_y[r * NR..].as_ptr(), dst, width);
                    }
                }
            }
        }
    }

    /// Where a tile's accumulators start.
    #[derive(Clone, Copy)]
    enum Init {
        /// The tile's values in `c`.
        Output,
        /// The same row for every row (a bias), from the tile's first column.
        Row(*const f32),
        /// Zero.
        Zero,
    }

    /// Panel rows for a tile to fetch into L2 as it runs, one row a step of k.
    #[derive(Clone, Copy)]
    struct Fetch {
        from: *const f32,
        rows: usize,
    }

    impl Fetch {
        const NONE: Self = Self {
            from: std::ptr::null(),
            rows: 0,
        };
    }

    /// The lanes of a 16-lane register that hold the first `width` columns.
    fn mask(width: usize) -> u16 {
        if width >= 16 {
            0xFFFF
        } else {
            (1u16 << width) - 1
        }
    }

    /// Defines a tile of as many rows as it lists: `c = epilogue(init + a b)`, `a`'s
    /// rows at stride k, `c`'s at `ldc`, the columns of each half of `c` masked by
    /// `masks`, fetching `fetch`. Written out register by register: as an array,
    /// LLVM kept the accumulators on the stack.
    macro_rules! tile_fn {
        ($(#[$doc:meta])* $name:ident: $($r:literal => $lo:ident $hi:ident),*) => {
            $(#[$doc])*
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name(
                k: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                (m0, m1): (u16, u16),
                init: Init,
                relu6: bool,
                fetch: Fetch,
            ) {
                // SAFETY (every pointer access): the caller's bounds; masked lanes are
                // not touched.
                unsafe {
                    let (first_lo, first_hi) = match init {
                        Init::Row(bias) => (
                            _mm512_maskz_loadu_ps(m0, bias),
                            _mm512_maskz_loadu_ps(m1, bias.add(16)),
                        ),
                        _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
                    };
                    let from_c = matches!(init, Init::Output);
                    $(
                        let (mut $lo, mut $hi) = if from_c {
                            (
                                _mm512_maskz_loadu_ps(m0, c.add($r * ldc)),
                                _mm512_maskz_loadu_ps(m1, c.add($r * ldc + 16)),
                            )
                        } else {
                            (first_lo, first_hi)
                        };
                    )*
                    for p in 0..k {
                        if p < fetch.rows {
                            let line = fetch.from.add(p * NR).cast::<i8>();
                            _mm_prefetch::<_MM_HINT_T1>(line);
                            _mm_prefetch::<_MM_HINT_T1>(line.add(64));
                        }
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
            }
        };
    }

    tile_fn!(
        /// The whole tile: `MR` rows.
        tile: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b,
        5 => c5a c5b, 6 => c6a c6b, 7 => c7a c7b, 8 => c8a c8b, 9 => c9a c9b,
        10 => c10a c10b, 11 => c11a c11b
    );
    tile_fn!(
        /// Eight rows: a block's last rows when 5-8 are left.
        tile8: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b,
        5 => c5a c5b, 6 => c6a c6b, 7 => c7a c7b
    );
    tile_fn!(
        /// Four rows: a block's last rows when 1-4 are left.
        tile4: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b
    );
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

    /// Every tile height (1..=12 rows and beyond: last rows in tiles of 4, 8 and 12),
    /// every tail width (masked one- and two-register panels), k from 1 up, both epilogues, one task and several (split
    /// by rows, and by panels where the rows are few), onto `y` and from a bias.
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
            (20, 33, 64),
            (35, 20, 40),
            (40, 192, 1_152),
            (300, 80, 480),
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
                let err = max_difference(&got, &want);
                assert!(err < 1e-4, "{n}x{cin}x{cout} {epilogue:?}: {err}");

                // A new output from the bias row, and from zero.
                let row: Vec<f32> = (0..cout).map(|i| value(i, 5) * 4.0).collect();
                for bias in [Some(&row[..]), None] {
                    let got = panels.product(&x, bias, epilogue, parallel);
                    let mut want: Vec<f32> = (0..n)
                        .flat_map(|_| bias.map_or(vec![0.0; cout], <[f32]>::to_vec))
                        .collect();
                    naive(&x, &w, &mut want, cin, cout, epilogue == Epilogue::Relu6);
                    let err = max_difference(&got, &want);
                    assert!(err < 1e-4, "product {n}x{cin}x{cout} {epilogue:?}: {err}");
                }
            }
        }
    }
}
