//! Florence-2's image processor: an exact-size bicubic resize (no crop, aspect ratio
//! ignored, as CLIPImageProcessor with `resample=3` does), rescale by 1/255 and
//! ImageNet normalisation, NCHW.

use image::RgbImage;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `processor_config.json` / `preprocessor_config.json`: the input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl ImageSize {
    /// Florence-2's released checkpoints: 768 x 768.
    pub const FLORENCE: Self = Self {
        width: 768,
        height: 768,
    };

    /// Reads `size` from either processor file format (nested `image_processor` or flat).
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let size = v
            .get("image_processor")
            .and_then(|p| p.get("size"))
            .or_else(|| v.get("size"))?;
        Some(Self {
            width: size.get("width")?.as_u64()? as u32,
            height: size.get("height")?.as_u64()? as u32,
        })
    }
}

/// Bicubic resize to exactly `size`, computed as Pillow's `Image.resize(..., BICUBIC)`
/// does: a = -0.5, the support widened by the scale when shrinking, coefficients in
/// 22-bit fixed point, a horizontal pass into 8 bits, then a vertical pass. Written out
/// because the reference is that exact integer arithmetic: `image`'s Catmull-Rom works
/// in f32 (vertical pass first) and lands up to 4 levels away.
pub fn resize(img: &RgbImage, size: ImageSize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (size.width as usize, size.height as usize);
    if (w, h) == (ow, oh) {
        return img.clone();
    }
    let src = img.as_raw();
    // Horizontal: [h, w] -> [h, ow].
    let mut mid = src.to_vec();
    if ow != w {
        let (bounds, coeffs, k) = coefficients(w, ow);
        mid = vec![0u8; h * ow * 3];
        for y in 0..h {
            for x in 0..ow {
                let (start, n) = bounds[x];
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for i in 0..n {
                        acc += src[(y * w + start + i) * 3 + c] as i32 * coeffs[x * k + i];
                    }
                    mid[(y * ow + x) * 3 + c] = clip8(acc);
                }
            }
        }
    }
    // Vertical: [h, ow] -> [oh, ow].
    let mut out = mid.clone();
    if oh != h {
        let (bounds, coeffs, k) = coefficients(h, oh);
        out = vec![0u8; oh * ow * 3];
        for y in 0..oh {
            let (start, n) = bounds[y];
            for x in 0..ow {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for i in 0..n {
                        acc += mid[((start + i) * ow + x) * 3 + c] as i32 * coeffs[y * k + i];
                    }
                    out[(y * ow + x) * 3 + c] = clip8(acc);
                }
            }
        }
    }
    RgbImage::from_raw(ow as u32, oh as u32, out).expect("sized buffer")
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: (first input index, taps), and fixed-point weights, `k` per row.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let k = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * k];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(k);
        let w: Vec<f64> = (0..n)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = w.iter().sum();
        for (x, wx) in w.iter().enumerate() {
            let v = if total != 0.0 { wx / total } else { *wx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            coeffs[xx * k + x] = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, coeffs, k)
}

/// A resized image -> normalised CHW floats.
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            // float32(float64(u8) / 255) as the reference rescale does.
            let x = (p.0[c] as f64 * (1.0 / 255.0)) as f32;
            out[c * w * h + i] = (x - MEAN[c]) / STD[c];
        }
    }
    out
}
