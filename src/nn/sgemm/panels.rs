//! The weights' layout for the kernels: `[cin, cout]` as column panels of 32, each
//! read in order by a tile.

use super::out::Out;
use rayon::prelude::*;

/// Columns of a panel: two 16-lane registers, four 8-lane ones.
pub(super) const NR: usize = 32;
/// Packed values from which packing is worth splitting over the pool.
const PARALLEL_PACK: usize = 1 << 18;
/// Rows of the weights a packing task takes.
const BAND: usize = 16;

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
    /// Packs row-major `[cin, cout]` weights. Large weights are packed in parallel:
    /// Florence-2 packs each layer as it runs it, and a serial copy left the other
    /// core idle. A task packs a band of rows into every panel, so it reads whole rows
    /// in order (a panel at a time read 128 bytes a row, each row a page or more from
    /// the last). Every value is written once (not zeroed first).
    pub fn pack(w: &[f32], cin: usize, cout: usize) -> Self {
        assert_eq!(w.len(), cin * cout, "weights are [cin, cout]");
        let len = cout.div_ceil(NR) * cin * NR;
        // A large allocation starts 16 bytes into a page, so half of an AVX2 tile's
        // 32-byte loads of a panel row would straddle two cache lines.
        let mut data = Vec::<f32>::with_capacity(len + LINE - 1);
        let start = data.as_ptr().align_offset(4 * LINE).min(LINE - 1);
        data.resize(start, 0.0);
        let out = Out(data.spare_capacity_mut()[..len].as_mut_ptr().cast::<f32>());
        let pack_band = |band: usize| {
            let rows = band * BAND..((band + 1) * BAND).min(cin);
            for (c0, panel) in (0..cout).step_by(NR).zip((0..).step_by(cin * NR)) {
                let width = NR.min(cout - c0);
                for i in rows.clone() {
                    let src = &w[i * cout + c0..i * cout + c0 + width];
                    // SAFETY: row i of the panel from `c0` is NR values inside the `len`
                    // reserved, and no other band writes row i.
                    unsafe {
                        let dst = out.at(panel + i * NR);
                        if width == NR {
                            // A fixed-size copy: inline vector moves, not a call.
                            let row = src.as_ptr().cast::<[f32; NR]>().read_unaligned();
                            dst.cast::<[f32; NR]>().write_unaligned(row);
                        } else {
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, width);
                            std::ptr::write_bytes(dst.add(width), 0, NR - width);
                        }
                    }
                }
            }
        };
        let bands = cin.div_ceil(BAND);
        if len >= PARALLEL_PACK {
            (0..bands).into_par_iter().for_each(pack_band);
        } else {
            (0..bands).for_each(pack_band);
        }
        // SAFETY: every band wrote each of its rows' values in every panel above.
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
