//! The loops around a register tile, the same for every instruction set: blocks of
//! rows that fit in L2, chunks of panels whose output fits beside them, k in passes
//! where it is long (each pass starts from the last one's sums), panel by panel, a
//! tile's columns of the panel at a time, tile by tile down the rows, the last rows
//! through a padded copy, and the next panel fetched into L2 as the tiles of this
//! one run.

use super::panels::{NR, Panels};
use std::ops::Range;

/// Bytes of input rows a block holds, and bytes of output columns it writes, where
/// k takes one pass: both stay in the core's L2 while every panel of weights passes
/// over them (each panel writes its columns of every output row, so an output block
/// larger than L2 went out to L3 and back once a panel).
const BLOCK_BYTES: usize = 256 << 10;
/// Bytes of a block's rows over one pass of k (the rows a block holds).
const A_BYTES: usize = 128 << 10;
/// Bytes of a block's output over a chunk of panels (the panels a chunk holds).
const C_BYTES: usize = 192 << 10;
/// Bytes of a tile's columns of a panel over one pass of k: they stay in L1, with the
/// tile's rows, while the block's rows pass under them (a whole panel's columns at k =
/// 768, 48 KB, did not, and every tile read them from L2).
const PASS_BYTES: usize = 16 << 10;
/// The most rows a tile has (the padded copy of a block's last rows is this tall).
const MAX_TILE_ROWS: usize = 12;

/// What the kernel does to each output value as it stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// Store the sum.
    Plain,
    /// Store the sum clamped to [0, 6] (EfficientNet's activation).
    Relu6,
}

/// Where the accumulators start.
#[derive(Clone, Copy)]
pub(super) enum Start<'a> {
    /// From the values in `y`.
    Output,
    /// From the bias row, or from zero.
    Bias(Option<&'a [f32]>),
}

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
pub(super) enum Init {
    /// The tile's values in `c`.
    Output,
    /// The same row for every row (a bias), from the tile's first column.
    Row(*const f32),
    /// Zero.
    Zero,
}

/// Panel rows for a tile to fetch into L2 as it runs, one row a step of k.
#[derive(Clone, Copy)]
pub(super) struct Fetch {
    pub(super) from: *const f32,
    pub(super) rows: usize,
}

impl Fetch {
    const NONE: Self = Self {
        from: std::ptr::null(),
        rows: 0,
    };
}

/// One tile's operands: `c = epilogue(init + a b)` for `a`'s rows (k values each, at
/// stride `lda`) against `COLS` columns of a panel (`b`: k rows, `NR` apart), `c`'s rows
/// at stride `ldc`, of which the first `width` (at most `COLS`) exist.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    pub(super) k: usize,
    pub(super) a: *const f32,
    pub(super) lda: usize,
    pub(super) b: *const f32,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) width: usize,
    pub(super) init: Init,
    pub(super) relu6: bool,
    pub(super) fetch: Fetch,
}

/// A tile of so many rows.
///
/// Its function's safety contract: the CPU has the kernel's instruction set; `a`
/// holds the tile's rows of k values, `b` k rows of `NR`, `c` room for those rows of
/// `width` values at stride `ldc` (holding them where `init` is `Output`), a `Row`
/// init `width` values, and `fetch` its rows of `NR` values.
pub(super) type Run = (usize, unsafe fn(Tile));

/// An instruction set's register tiles.
pub(super) trait Kernel {
    /// Columns of a tile: a panel's width, or a whole fraction of it.
    const COLS: usize;
    /// Its tiles, shortest first: the last is the whole tile (at most 12 rows), the
    /// others take a block's last rows.
    const TILES: &'static [Run];
    /// Rows of the whole tile.
    const ROWS: usize = Self::TILES[Self::TILES.len() - 1].0;
}

/// What a task computes: columns `panels` of `epilogue(start + x w)`.
#[derive(Clone)]
pub(super) struct Job<'a> {
    pub(super) w: &'a Panels,
    pub(super) panels: Range<usize>,
    pub(super) start: Start<'a>,
    pub(super) epilogue: Epilogue,
}

/// Columns `panels` of every tile of `y` (rows of `xs`, `cout` apart), in blocks of
/// rows that fit in L2.
///
/// # Safety
/// The CPU has `K`'s instruction set, and `y` has room for `xs`'s rows of `cout`
/// values (and holds them where `start` is `Output`).
pub(super) unsafe fn rows<K: Kernel>(job: &Job, xs: &[f32], y: *mut f32) {
    let (k, cout) = (job.w.cin, job.w.cout);
    let kc = pass_len(k, K::COLS);
    let (block, chunk) = if kc == k {
        // One pass: a block's rows, and its output over every panel, stay in L2 while
        // the panels pass over them.
        let written = 4 * (job.panels.len() * NR).min(cout);
        let block = (BLOCK_BYTES / (4 * k)).min(BLOCK_BYTES / written);
        (
            block.max(K::ROWS) / K::ROWS * K::ROWS,
            job.panels.len().max(1),
        )
    } else {
        // Passes over k: a block's rows of one pass, and its output over a chunk of
        // panels, stay in L2 while every pass of the chunk goes over them; a chunk's
        // output is finished before the next, so it never goes out to L3 and back
        // between passes.
        let block = (A_BYTES / (4 * kc)).max(K::ROWS) / K::ROWS * K::ROWS;
        let block = block.min(xs.len() / k);
        (block, (C_BYTES / (4 * NR * block.max(1))).max(1))
    };
    for (b, xb) in xs.chunks(block * k).enumerate() {
        let y = y.wrapping_add(b * block * cout);
        for first in job.panels.clone().step_by(chunk) {
            let job = Job {
                panels: first..(first + chunk).min(job.panels.end),
                ..job.clone()
            };
            // SAFETY: as this function's own contract, for a block of its rows.
            unsafe { block_rows::<K>(&job, xb, y, kc) };
        }
    }
}

/// The length of a pass over k: all of k up to twice `PASS_BYTES` of a tile's columns
/// (the towers' head, k = 320, ran slower in two passes), else passes as even as they go,
/// each no larger than `PASS_BYTES`.
fn pass_len(k: usize, cols: usize) -> usize {
    let most = (PASS_BYTES / (4 * cols)).max(1);
    if k <= 2 * most {
        return k;
    }
    k.div_ceil(k.div_ceil(most))
}

/// [`rows`] for one block, in passes over k of `kc` (every pass but the first starts
/// from the sums in `y`): panel by panel, so the weights a tile reads stay in L1 while
/// the block's rows pass under them. The last rows, fewer than a tile, go through a
/// zero-padded copy, so the kernel has a few fixed shapes.
unsafe fn block_rows<K: Kernel>(job: &Job, xs: &[f32], y: *mut f32, kc: usize) {
    let Job {
        w, start, epilogue, ..
    } = *job;
    let (k, cout) = (w.cin, w.cout);
    let n = xs.len() / k;
    let full = n / K::ROWS * K::ROWS;
    // Only a block with a partial tile pays for the padded copy, and its last rows run
    // in the shortest tile that holds them: padded to a whole tile, a few rows left
    // over cost as much as a whole one.
    const { assert!(K::ROWS <= MAX_TILE_ROWS) };
    let whole = K::TILES[K::TILES.len() - 1].1;
    let &(tail, short) = (K::TILES.iter().find(|t| t.0 >= n - full)).expect("a whole tile");
    let mut tail_x = Vec::new();
    if full < n {
        tail_x.resize(tail * k, 0f32);
        tail_x[..(n - full) * k].copy_from_slice(&xs[full * k..]);
    }
    let mut tail_y = [0f32; MAX_TILE_ROWS * NR];
    let (groups, tiles) = (NR / K::COLS, n.div_ceil(K::ROWS));
    let panels = job.panels.clone();
    for k0 in (0..k).step_by(kc) {
        let kl = kc.min(k - k0);
        let (first, last) = (k0 == 0, k0 + kl == k);
        let relu6 = last && epilogue == Epilogue::Relu6;
        let from_y = !first || matches!(start, Start::Output);
        // The pass's rows of panel `p`.
        let slice = |p: usize| &w.values()[p * k * NR + k0 * NR..p * k * NR + (k0 + kl) * NR];
        // While a panel's tiles run, they fetch the next panel's rows for this pass
        // into L2, a share each: the weights come from L3 or memory, and the first
        // tile of a panel would otherwise wait for every line of it.
        let share = kl.div_ceil(groups * tiles);
        for p in panels.clone() {
            let panel = slice(p);
            let next = (p + 1 < panels.end).then(|| slice(p + 1).as_ptr());
            let fetch = |tile: usize| match next {
                Some(next) if tile * share < kl => Fetch {
                    from: next.wrapping_add(tile * share * NR),
                    rows: share.min(kl - tile * share),
                },
                _ => Fetch::NONE,
            };
            // A tile's columns of the panel at a time, so that those columns of the
            // pass stay in L1 while the block's rows pass under them.
            for g in (0..groups).take_while(|g| p * NR + g * K::COLS < cout) {
                let c0 = p * NR + g * K::COLS;
                let width = K::COLS.min(cout - c0);
                let init = match start {
                    Start::Bias(Some(bias)) if first => Init::Row(bias[c0..].as_ptr()),
                    Start::Bias(None) if first => Init::Zero,
                    _ => Init::Output,
                };
                let tile = |a: *const f32, c: *mut f32, ldc: usize, t: usize| Tile {
                    k: kl,
                    a,
                    lda: k,
                    b: panel[g * K::COLS..].as_ptr(),
                    c,
                    ldc,
                    width,
                    init,
                    relu6,
                    fetch: fetch(g * tiles + t),
                };
                for r0 in (0..full).step_by(K::ROWS) {
                    let (a, c) = (xs[r0 * k + k0..].as_ptr(), y.wrapping_add(r0 * cout + c0));
                    let t = tile(a, c, cout, r0 / K::ROWS);
                    // SAFETY: `a` has ROWS rows of k values from k0 (kl of them read),
                    // `y` room for them at stride `cout` (the caller's contract), `b`
                    // kl rows of NR from the group's column; `width` columns from c0
                    // exist in `y` and in the bias row.
                    unsafe { whole(t) };
                }
                if full < n {
                    let rows = n - full;
                    for r in (0..rows).filter(|_| from_y) {
                        // SAFETY: row full + r of y holds `cout` values (the contract),
                        // and `width` values from c0 lie inside it.
                        unsafe {
                            let src = y.add((full + r) * cout + c0);
                            let dst = tail_y[r * NR..].as_mut_ptr();
                            std::ptr::copy_nonoverlapping(src, dst, width);
                        }
                    }
                    let t = tile(
                        tail_x[k0..].as_ptr(),
                        tail_y.as_mut_ptr(),
                        NR,
                        full / K::ROWS,
                    );
                    // SAFETY: the padded copies hold `tail` full rows, the rows of the
                    // tile, and a row of `tail_y` room for NR >= width values.
                    unsafe { short(t) };
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
    }
}
