//! The host layers' GEMM on the towers' shapes: `gemm` 0.19 (what `Dense` calls
//! where no packed kernel runs) against the packed kernel (`nn::sgemm`: AVX-512F, or
//! AVX2 and FMA, the widest this CPU has), one thread and rayon's pool, in one run.
//! Florence-2-base's dense layers are the last rows. `cargo bench --bench gemm [--
//! WORD]` (only the shapes whose name holds WORD); docs/performance.md.

use marquee::nn::host_ops::gemm_rows;
use marquee::nn::sgemm::{self, Epilogue, Panels};
use std::time::Instant;

/// (what, rows, k, cout) at the shipped 224x336 input and a 65-token overview, then
/// Florence-2-base's at 768x768 (DaViT's third stage: 48x48 tokens of 512; BART's
/// encoder: 577 + 8 tokens of 768).
const SHAPES: [(&str, usize, usize, usize); 17] = [
    ("stem 3x3/2 (im2col)", 18_816, 27, 32),
    ("stage 2 expand", 18_816, 16, 96),
    ("stage 2 project", 4_704, 144, 24),
    ("stage 3 expand", 4_704, 24, 144),
    ("stage 4 expand", 1_176, 40, 240),
    ("stage 5 project", 294, 480, 80),
    ("stage 6 expand", 294, 112, 672),
    ("stage 7 expand", 77, 192, 1_152),
    ("head", 77, 320, 1_280),
    ("text q|k|v", 65, 384, 1_152),
    ("text ffn out", 65, 1_536, 384),
    ("1024^3", 1_024, 1_024, 1_024),
    ("florence davit qkv", 2_304, 512, 1_536),
    ("florence davit fc1", 2_304, 512, 2_048),
    ("florence davit fc2", 2_304, 2_048, 512),
    ("florence bart fc1", 585, 768, 3_072),
    ("florence bart fc2", 585, 3_072, 768),
];

fn value(i: usize) -> f32 {
    (i.wrapping_mul(2_654_435_761) % 2_000) as f32 / 1_000.0 - 1.0
}

/// The best of `reps` timed calls, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let packed = sgemm::available();
    println!(
        "{:<22}{:>7}{:>6}{:>6}  GFLOP/s: {:>8}{:>8}  {:>10}{:>10}",
        "shape", "rows", "k", "cout", "gemm 1t", "ours 1t", "gemm pool", "ours pool"
    );
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let chosen = SHAPES
        .iter()
        .filter(|s| only.as_ref().is_none_or(|w| s.0.contains(w.as_str())));
    for &(what, n, k, m) in chosen {
        let x: Vec<f32> = (0..n * k).map(value).collect();
        let w: Vec<f32> = (0..k * m).map(|i| value(i + 7)).collect();
        let mut y = vec![0f32; n * m];
        let flop = 2.0 * (n * k * m) as f64 / 1e9;
        let reps = (2.0 / flop).clamp(5.0, 200.0) as usize;
        let mut rates = Vec::new();
        for par in [false, true] {
            rates.push(flop / best(reps, || gemm_rows(&x, &w, &mut y, k, par)));
            if packed {
                let p = Panels::pack(&w, k, m);
                rates.push(flop / best(reps, || p.accumulate(&x, &mut y, Epilogue::Plain, par)));
            } else {
                rates.push(f64::NAN);
            }
        }
        println!(
            "{what:<22}{n:>7}{k:>6}{m:>6}  GFLOP/s: {:>8.1}{:>8.1}  {:>10.1}{:>10.1}",
            rates[0], rates[1], rates[2], rates[3]
        );
    }
    if !packed {
        println!("(no AVX-512F or AVX2 + FMA on this CPU: `Dense` runs `gemm`)");
    }
}
