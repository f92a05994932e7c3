//! The AVX-512 tile: 12 rows x 32 columns, 24 accumulators of 16 lanes, two panel
//! registers and one broadcast in AVX-512's 32 registers. The last panel's columns
//! are masked lanes.

use super::blocks::{Init, Kernel, Run, Tile};
use super::panels::NR;
use std::arch::x86_64::*;

/// The AVX-512F kernel.
pub(super) struct Avx512;

impl Kernel for Avx512 {
    const COLS: usize = 32;
    /// A block's last rows run in 4, 8 or 12: padded to 12, five rows left over
    /// cost as much as a whole tile.
    const TILES: &'static [Run] = &[(4, tile4), (8, tile8), (12, tile12)];
}

/// The lanes of a 16-lane register that hold the first `width` columns.
fn mask(width: usize) -> u16 {
    if width >= 16 {
        0xFFFF
    } else {
        (1u16 << width) - 1
    }
}

/// Defines a tile of as many rows as it lists (see [`Tile`]). Written out register
/// by register: as an array, LLVM kept the accumulators on the stack.
macro_rules! tile_fn {
    ($(#[$doc:meta])* $name:ident: $($r:literal => $lo:ident $hi:ident),*) => {
        $(#[$doc])*
        #[target_feature(enable = "avx512f")]
        unsafe fn $name(t: Tile) {
            let Tile { k, a, lda, b, c, ldc, width, init, relu6, fetch } = t;
            let (m0, m1) = (mask(width), mask(width.saturating_sub(16)));
            // SAFETY (every pointer access): the caller's bounds; masked lanes are
            // not touched.
            unsafe {
                let (first_lo, first_hi) = match init {
                    Init::Row(bias) => (
                        _mm512_maskz_loadu_ps(m0, bias),
                        _mm512_maskz_loadu_ps(m1, bias.wrapping_add(16)),
                    ),
                    _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
                };
                let from_c = matches!(init, Init::Output);
                $(
                    let (mut $lo, mut $hi) = if from_c {
                        (
                            _mm512_maskz_loadu_ps(m0, c.add($r * ldc)),
                            _mm512_maskz_loadu_ps(m1, c.wrapping_add($r * ldc + 16)),
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
                        let x = _mm512_set1_ps(*a.add($r * lda + p));
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
                    _mm512_mask_storeu_ps(c.wrapping_add($r * ldc + 16), m1, $hi);
                )*
            }
        }
    };
}

tile_fn!(
    /// The whole tile: 12 rows.
    tile12: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b,
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
