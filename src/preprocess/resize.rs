//! The image tower's input in one step: a Catmull-Rom resize straight into planar,
//! normalised f32. It computes exactly what `image::imageops::resize(..CatmullRom)`
//! followed by `to_chw` computes (the same weights, and for every value the same
//! float operations in the same order, so the same bits: tests below), but where
//! `image` reads four channels a pixel through `get_pixel` one output column at a
//! time, this runs over contiguous rows, on all cores. That resize was a fifth of a
//! poster's latency.

use super::image::to_chw;
use image::RgbImage;
use rayon::prelude::*;

/// `image`'s cubic (B, C) spline, term for term.
fn bc_cubic_spline(x: f32, b: f32, c: f32) -> f32 {
    let a = x.abs();
    let k = if a < 1.0 {
        (12.0 - 9.0 * b - 6.0 * c) * a.powi(3)
            + (-18.0 + 12.0 * b + 6.0 * c) * a.powi(2)
            + (6.0 - 2.0 * b)
    } else if a < 2.0 {
        (-b - 6.0 * c) * a.powi(3)
            + (6.0 * b + 30.0 * c) * a.powi(2)
            + (-12.0 * b - 48.0 * c) * a
            + (8.0 * b + 24.0 * c)
    } else {
        0.0
    };
    k / 6.0
}

fn catmull_rom(x: f32) -> f32 {
    bc_cubic_spline(x, 0.0, 0.5)
}

/// For each output position: the first input index and the normalised weights.
fn taps(size: u32, new_size: u32) -> Vec<(usize, Vec<f32>)> {
    let ratio = size as f32 / new_size as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = 2.0 * sratio;
    (0..new_size)
        .map(|o| {
            let input = (o as f32 + 0.5) * ratio;
            let left = ((input - support).floor() as i64).clamp(0, size as i64 - 1);
            let right = ((input + support).ceil() as i64).clamp(left + 1, size as i64);
            let input = input - 0.5;
            let mut ws = Vec::with_capacity((right - left) as usize);
            let mut sum = 0.0;
            for i in left..right {
                let w = catmull_rom((i as f32 - input) / sratio);
                ws.push(w);
                sum += w;
            }
            for w in ws.iter_mut() {
                *w /= sum;
            }
            (left as usize, ws)
        })
        .collect()
}

/// `to_chw(&resize(img, width, height, CatmullRom))`, bit for bit.
pub fn resize_to_chw(img: &RgbImage, width: u32, height: u32) -> Vec<f32> {
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return to_chw(img);
    }
    let src = img.as_raw();
    let row = w as usize * 3;
    // Vertical pass: `[height, w, 3]` f32. Each value sums its taps in tap order.
    let rows = taps(h, height);
    let mut mid = vec![0f32; height as usize * row];
    mid.par_chunks_mut(row)
        .zip(&rows)
        .for_each(|(out, (left, ws))| {
            for (i, &wt) in ws.iter().enumerate() {
                let line = &src[(left + i) * row..(left + i + 1) * row];
                for (t, &p) in out.iter_mut().zip(line) {
                    *t += p as f32 * wt;
                }
            }
        });
    // Horizontal pass, rounded and clamped as `image` does, then normalised.
    let cols = taps(w, width);
    let (nw, nh) = (width as usize, height as usize);
    let plane = nw * nh;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    r.par_chunks_mut(nw)
        .zip(g.par_chunks_mut(nw))
        .zip(b.par_chunks_mut(nw))
        .zip(mid.par_chunks(row))
        .for_each(|(((r, g), b), line)| {
            for (x, (left, ws)) in cols.iter().enumerate() {
                let mut t = [0f32; 3];
                for (i, &wt) in ws.iter().enumerate() {
                    let p = &line[(left + i) * 3..(left + i) * 3 + 3];
                    t[0] += p[0] * wt;
                    t[1] += p[1] * wt;
                    t[2] += p[2] * wt;
                }
                let level = |v: f32| (v.clamp(0.0, 255.0).round() - 127.0) / 128.0;
                r[x] = level(t[0]);
                g[x] = level(t[1]);
                b[x] = level(t[2]);
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::image::resize_exact;

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for c in &mut px {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                *c = (s >> 24) as u8;
            }
            image::Rgb(px)
        })
    }

    /// Down, up, mixed and odd sizes, and the tower's own: the same bits as `image`.
    #[test]
    fn equals_image_resize_then_to_chw() {
        for (i, &(w, h, nw, nh)) in [
            (448, 672, 160, 240),
            (1000, 1500, 160, 240),
            (97, 53, 160, 240),
            (160, 121, 160, 240),
            (333, 211, 37, 301),
            (1, 1, 5, 3),
        ]
        .iter()
        .enumerate()
        {
            let img = noise(w, h, i as u32);
            let want = to_chw(&resize_exact(&img, nw, nh));
            let got = resize_to_chw(&img, nw, nh);
            assert_eq!(want.len(), got.len());
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{w}x{h} -> {nw}x{nh} differs");
        }
    }
}
