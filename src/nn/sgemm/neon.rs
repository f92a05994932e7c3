//! The NEON tile (aarch64): 6 rows x 16 columns, 24 accumulators of 4 lanes, four
//! panel registers and one broadcast in NEON's 32 registers: half a 32-column panel,
//! as the AVX2 tile. NEON has no masked loads or stores, so a tile with fewer than 16
//! columns (the last panel's) goes through a small buffer on the stack.

use super::blocks::{Init, Kernel, Run, Tile};
use super::panels::NR;
use std::arch::aarch64::*;

/// The NEON kernel (every aarch64 CPU has NEON).
pub(super) struct Neon;

impl Kernel for Neon {
    const COLS: usize = 16;
    /// A block's last rows run in 2, 4 or 6.
    const TILES: &'static [Run] = &[(2, tile2), (4, tile4), (6, tile6)];
}

/// Four registers: 16 columns.
type Row = [float32x4_t; 4];

/// The 16 values at `p`, or its first `w` and zeros.
///
/// # Safety
/// `p` holds `w.min(16)` values.
#[inline(always)]
unsafe fn load(p: *const f32, w: usize) -> Row {
    let mut buf = [0f32; 16];
    let p = if w >= 16 {
        p
    } else {
        // SAFETY: `p` holds `w` values (the contract).
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), w) };
        buf.as_ptr()
    };
    // SAFETY: `p` holds 16 values: the caller's, or the buffer.
    unsafe { [0, 4, 8, 12].map(|i| vld1q_f32(p.add(i))) }
}

/// Stores the first `w.min(16)` values of `v` at `p`.
///
/// # Safety
/// `p` has room for `w.min(16)` values.
#[inline(always)]
unsafe fn store(p: *mut f32, v: Row, w: usize) {
    let mut buf = [0f32; 16];
    let to = if w >= 16 { p } else { buf.as_mut_ptr() };
    // SAFETY: `to` has room for 16 values: the caller's, or the buffer.
    unsafe {
        for (i, v) in [0, 4, 8, 12].into_iter().zip(v) {
            vst1q_f32(to.add(i), v);
        }
        if w < 16 {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, w);
        }
    }
}

/// Fetches the 64-byte line at `p` into L2 (`prfm`; the prefetch intrinsics are not
/// stable Rust on aarch64).
#[inline(always)]
fn fetch_line(p: *const f32) {
    // SAFETY: a prefetch is a hint: it reads nothing into registers and cannot fault.
    unsafe {
        std::arch::asm!("prfm pldl2keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
    }
}

/// Defines a tile of as many rows as it lists (see [`Tile`]), written out register
/// by register as the x86 tiles are.
macro_rules! tile_fn {
    ($(#[$doc:meta])* $name:ident: $($r:literal => $v:ident),*) => {
        $(#[$doc])*
        unsafe fn $name(t: Tile) {
            let Tile { k, a, lda, b, c, ldc, width: w, init, relu6, fetch } = t;
            // SAFETY (every pointer access): the caller's bounds, `w` columns of `c`
            // and of the bias.
            unsafe {
                let first = match init {
                    Init::Row(bias) => load(bias, w),
                    _ => [vdupq_n_f32(0.0); 4],
                };
                let from_c = matches!(init, Init::Output);
                $(
                    let mut $v: Row = if from_c { load(c.add($r * ldc), w) } else { first };
                )*
                for p in 0..k {
                    if p < fetch.rows {
                        let line = fetch.from.wrapping_add(p * NR);
                        fetch_line(line);
                        fetch_line(line.wrapping_add(16));
                    }
                    let bp = b.add(p * NR);
                    let panel = [0, 4, 8, 12].map(|i| vld1q_f32(bp.add(i)));
                    $(
                        let x = vld1q_dup_f32(a.add($r * lda + p));
                        $v = [0, 1, 2, 3].map(|i| vfmaq_f32($v[i], panel[i], x));
                    )*
                }
                if relu6 {
                    let (zero, six) = (vdupq_n_f32(0.0), vdupq_n_f32(6.0));
                    $(
                        $v = $v.map(|v| vminq_f32(vmaxq_f32(v, zero), six));
                    )*
                }
                $(
                    store(c.add($r * ldc), $v, w);
                )*
            }
        }
    };
}

tile_fn!(
    /// The whole tile: 6 rows.
    tile6: 0 => c0, 1 => c1, 2 => c2, 3 => c3, 4 => c4, 5 => c5
);
tile_fn!(
    /// Four rows: a block's last rows when 3-4 are left.
    tile4: 0 => c0, 1 => c1, 2 => c2, 3 => c3
);
tile_fn!(
    /// Two rows: a block's last rows when 1-2 are left.
    tile2: 0 => c0, 1 => c1
);
