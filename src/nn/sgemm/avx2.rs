//! The AVX2 + FMA tile: 6 rows x 16 columns, 12 accumulators of 8 lanes, two panel
//! registers and one broadcast in AVX2's 16 registers: half a 32-column panel (a
//! half row of a panel is one cache line), so the packed layout is the same as
//! AVX-512's. Columns past the last one are masked lanes on loads and stores; whole
//! tiles load and store plainly.

use super::blocks::{Init, Kernel, Run, Tile};
use super::panels::NR;
use std::arch::x86_64::*;

/// The AVX2 + FMA kernel.
pub(super) struct Avx2;

impl Kernel for Avx2 {
    const COLS: usize = 16;
    /// A block's last rows run in 2, 4 or 6.
    const TILES: &'static [Run] = &[(2, tile2), (4, tile4), (6, tile6)];
}

/// The lanes of an 8-lane register below `n` (all of them from 8 on), as a mask
/// for `maskload` and `maskstore`.
#[target_feature(enable = "avx2")]
fn lanes(n: usize) -> __m256i {
    let n = _mm256_set1_epi32(n.min(8) as i32);
    _mm256_cmpgt_epi32(n, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Defines a tile of as many rows as it lists (see [`Tile`]). Written out register
/// by register, as the AVX-512 tile is.
macro_rules! tile_fn {
    ($(#[$doc:meta])* $name:ident: $($r:literal => $lo:ident $hi:ident),*) => {
        $(#[$doc])*
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name(t: Tile) {
            let Tile { k, a, lda, b, c, ldc, width, init, relu6, fetch } = t;
            let (m0, m1) = (lanes(width), lanes(width.saturating_sub(8)));
            // SAFETY (every pointer access): the caller's bounds; masked lanes are not
            // touched.
            unsafe {
                let (first_lo, first_hi) = match init {
                    Init::Row(bias) => (
                        _mm256_maskload_ps(bias, m0),
                        _mm256_maskload_ps(bias.wrapping_add(8), m1),
                    ),
                    _ => (_mm256_setzero_ps(), _mm256_setzero_ps()),
                };
                let from_c = matches!(init, Init::Output);
                $(
                    let (mut $lo, mut $hi) = match (from_c, width >= 16) {
                        (true, true) => (
                            _mm256_loadu_ps(c.add($r * ldc)),
                            _mm256_loadu_ps(c.add($r * ldc + 8)),
                        ),
                        (true, false) => (
                            _mm256_maskload_ps(c.add($r * ldc), m0),
                            _mm256_maskload_ps(c.wrapping_add($r * ldc + 8), m1),
                        ),
                        (false, _) => (first_lo, first_hi),
                    };
                )*
                for p in 0..k {
                    if p < fetch.rows {
                        let line = fetch.from.add(p * NR).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T1>(line);
                        _mm_prefetch::<_MM_HINT_T1>(line.add(64));
                    }
                    let b0 = _mm256_loadu_ps(b.add(p * NR));
                    let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
                    $(
                        let x = _mm256_set1_ps(*a.add($r * lda + p));
                        $lo = _mm256_fmadd_ps(x, b0, $lo);
                        $hi = _mm256_fmadd_ps(x, b1, $hi);
                    )*
                }
                if relu6 {
                    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
                    $(
                        $lo = _mm256_min_ps(_mm256_max_ps($lo, zero), six);
                        $hi = _mm256_min_ps(_mm256_max_ps($hi, zero), six);
                    )*
                }
                if width >= 16 {
                    $(
                        _mm256_storeu_ps(c.add($r * ldc), $lo);
                        _mm256_storeu_ps(c.add($r * ldc + 8), $hi);
                    )*
                } else {
                    $(
                        _mm256_maskstore_ps(c.add($r * ldc), m0, $lo);
                        _mm256_maskstore_ps(c.wrapping_add($r * ldc + 8), m1, $hi);
                    )*
                }
            }
        }
    };
}

tile_fn!(
    /// The whole tile: 6 rows.
    tile6: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b, 4 => c4a c4b,
    5 => c5a c5b
);
tile_fn!(
    /// Four rows: a block's last rows when 3-4 are left.
    tile4: 0 => c0a c0b, 1 => c1a c1b, 2 => c2a c2b, 3 => c3a c3b
);
tile_fn!(
    /// Two rows: a block's last rows when 1-2 are left.
    tile2: 0 => c0a c0b, 1 => c1a c1b
);
