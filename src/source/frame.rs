//! Raw camera frames (MJPEG or YUYV) and their decoding to RGB.

use crate::preprocess::image::{ImageError, decode};
use image::RgbImage;

/// How a frame's bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Each frame a JPEG.
    Mjpeg,
    /// Packed YUV 4:2:2.
    Yuyv,
}

/// One raw camera frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Its layout.
    pub format: PixelFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// A frame as an RGB picture (bounded like any image).
pub fn decode_frame(f: &Frame) -> Result<RgbImage, ImageError> {
    match f.format {
        PixelFormat::Mjpeg => decode(&f.data),
        PixelFormat::Yuyv => yuyv_to_rgb(f),
    }
}

/// YUYV 4:2:2 (BT.601, limited range) to RGB8.
fn yuyv_to_rgb(f: &Frame) -> Result<RgbImage, ImageError> {
    let (w, h) = (f.width as usize, f.height as usize);
    if w == 0 || h == 0 || w % 2 != 0 || f.data.len() < w * h * 2 {
        return Err(ImageError::Corrupt(format!(
            "YUYV frame of {} bytes does not fill {w}x{h}",
            f.data.len()
        )));
    }
    let mut out = Vec::with_capacity(w * h * 3);
    for px in f.data[..w * h * 2].chunks_exact(4) {
        let (y0, u, y1, v) = (
            px[0] as f32,
            px[1] as f32 - 128.0,
            px[2] as f32,
            px[3] as f32 - 128.0,
        );
        for y in [y0, y1] {
            let c = 1.164 * (y - 16.0);
            let clamp = |x: f32| x.round().clamp(0.0, 255.0) as u8;
            out.extend([
                clamp(c + 1.596 * v),
                clamp(c - 0.392 * u - 0.813 * v),
                clamp(c + 2.017 * u),
            ]);
        }
    }
    RgbImage::from_raw(f.width, f.height, out)
        .ok_or_else(|| ImageError::Corrupt("YUYV size".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_grey_and_short_frames() {
        let f = Frame {
            format: PixelFormat::Yuyv,
            width: 2,
            height: 1,
            data: vec![128, 128, 128, 128],
        };
        let img = decode_frame(&f).unwrap();
        let p = img.get_pixel(0, 0);
        assert!(p.0.iter().all(|&c| (128..=132).contains(&c)), "{p:?}");
        let short = Frame {
            data: vec![1, 2],
            ..f
        };
        assert!(decode_frame(&short).is_err());
    }
}
