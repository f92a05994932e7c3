//! Image decoding with hard limits, and the two resize recipes the towers use.
//!
//! Every poster passes through `decode` first: it caps the byte size, the pixel
//! dimensions and the decoder's allocation, so a decompression bomb or a truncated
//! upload becomes a one-line error instead of an out-of-memory kill or a panic.

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// Largest encoded image we accept (bytes).
pub const MAX_BYTES: usize = 32 * 1024 * 1024;
/// Largest side, in pixels, of a decoded image.
pub const MAX_SIDE: u32 = 8192;
/// Largest allocation the decoder may make (bytes).
pub const MAX_ALLOC: u64 = 256 * 1024 * 1024;

/// Why an image was refused. One line each, suitable for a log or `failed/` reason.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty image (0 bytes)")]
    Empty,
    #[error("image too large: {0} bytes (limit {MAX_BYTES})")]
    TooManyBytes(usize),
    #[error("unrecognised image format (not JPEG, PNG, WebP or BMP)")]
    UnknownFormat,
    #[error("image dimensions {0}x{1} exceed the limit of {MAX_SIDE} pixels per side")]
    TooLarge(u32, u32),
    #[error("corrupt image: {0}")]
    Corrupt(String),
}

/// Decodes an encoded image (JPEG, PNG, WebP, BMP) to RGB8, enforcing the limits.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > MAX_BYTES {
        return Err(ImageError::TooManyBytes(bytes.len()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    // Check the header before any pixel buffer exists.
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt(one_line(&e)))?;
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(ImageError::TooLarge(w, h));
    }
    if w == 0 || h == 0 {
        return Err(ImageError::Corrupt(format!("zero-sized image {w}x{h}")));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img: DynamicImage = reader.decode().map_err(|e| ImageError::Corrupt(one_line(&e)))?;
    Ok(img.to_rgb8())
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

/// The reference recipe of the EfficientNet fixtures (TF eval preprocessing):
/// centre crop `int(size / (size + 32) * min(w, h))`, bicubic resize to `size`².
pub fn center_crop_resize(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let c = ((size as f64 / (size as f64 + 32.0)) * w.min(h) as f64) as u32;
    let c = c.max(1);
    let top = (h - c).div_ceil(2);
    let left = (w - c).div_ceil(2);
    let crop = image::imageops::crop_imm(img, left, top, c, c).to_image();
    image::imageops::resize(&crop, size, size, FilterType::CatmullRom)
}

/// Whole-poster recipe for the classifier: no crop (a poster's title and credits sit at
/// its edges), bicubic resize to `width`x`height`.
pub fn resize_exact(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    image::imageops::resize(img, width, height, FilterType::CatmullRom)
}

/// RGB8 to planar CHW f32 with the TF-lite normalisation `(p - 127) / 128`.
pub fn to_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 - 127.0) / 128.0;
        }
    }
    out
}
