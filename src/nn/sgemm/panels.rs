//! The weights' layout for the kernels: `[cin, cout]` as column panels of 32, each
//! read in order by a tile.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Columns of a panel: two 16-lane registers, four 8-lane ones.
pub(super) const NR: usize = 32;
/// Packed values from which packing is worth splitting over the pool.
const PARALLEL_PACK: usize = 1 << 18;

/// `[cin, cout]` weights as panels of `NR` columns: panel `p` holds rows `0..cin` of
/// columns `p * NR..(p + 1) * NR`, one row after another, zero past `cout`.
pub struct Panels {
    /// The panels from `data[start]`, the first value of a cache line.
    data: Vec<f32>,
    start: usize,
    pub(super) cin: usize,
    pub(super) cout: usize,
}

/// Floats in a cache line: a panel row is two lines, and a tile reads whole ones.
const LINE: usize = 16;

impl Panels {
    /// Packs row-major `[cin, cout]` weights. Large weights are packed in parallel,
    /// a panel a task: Florence-2 packs each layer as it runs it, and a serial copy
    /// left the other core idle. Every value is written once (not zeroed first).
    pub fn pack(w: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(w.len(), cin * cout, "weights are [cin, cout]");
        let len = cout.div_ceil(NR) * cin * NR;
        // A large allocation starts 16 bytes into a page, so half of an AVX2 tile's
        // 32-byte loads of a panel row would straddle two cache lines.
        let mut data = Vec::<f32>::with_capacity(len + LINE - 1);
        let start = data.as_ptr().align_offset(4 * LINE).min(LINE - 1);
        data.resize(start, 0.0);
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
        unsafe { data.set_len(start + len) };
        Self {
            data,
            start,
            cin,
            cout,
        }
    }

    /// The panels, one after another.
    pub(super) fn values(&self) -> &[f32] {
        &self.data[self.start..]
    }

    /// The weights back as row-major `[cin, cout]`.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.cin * self.cout];
        for (p, panel) in self.values().chunks_exact(self.cin * NR).enumerate() {
            let c0 = p * NR;
            let width = NR.min(self.cout - c0);
            for (i, row) in panel.chunks_exact(NR).enumerate() {
                w[i * self.cout + c0..i * self.cout + c0 + width].copy_from_slice(&row[..width]);
            }
        }
        w
    }
}
