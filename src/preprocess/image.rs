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
    /// No bytes at all.
    #[error("empty image (0 bytes)")]
    Empty,
    /// More bytes than `MAX_BYTES`.
    #[error("image too large: {0} bytes (limit {MAX_BYTES})")]
    TooManyBytes(usize),
    /// Not JPEG, PNG, WebP or BMP.
    #[error("unrecognised image format (not JPEG, PNG, WebP or BMP)")]
    UnknownFormat,
    /// Wider or taller than `MAX_SIDE`.
    #[error("image dimensions {0}x{1} exceed the limit of {MAX_SIDE} pixels per side")]
    TooLarge(u32, u32),
    /// The decoder's complaint.
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
    let format = reader.format().ok_or(ImageError::UnknownFormat)?;
    // Check the header before any pixel buffer exists.
    let (w, h) = match reader.into_dimensions() {
        Ok(d) => d,
        // A bare PNG header (a bomb with no data) fails in the decoder; its IHDR
        // still tells the claimed size, which is the more useful reason.
        Err(e) => png_ihdr_size(bytes)
            .filter(|&(w, h)| w > MAX_SIDE || h > MAX_SIDE)
            .ok_or_else(|| ImageError::Corrupt(one_line(&e)))?,
    };
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(ImageError::TooLarge(w, h));
    }
    if w == 0 || h == 0 {
        return Err(ImageError::Corrupt(format!("zero-sized image {w}x{h}")));
    }
    if format == image::ImageFormat::Jpeg {
        return decode_jpeg_strict(bytes);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(limits);
    let img: DynamicImage = reader
        .decode()
        .map_err(|e| ImageError::Corrupt(one_line(&e)))?;
    Ok(img.to_rgb8())
}

/// Width and height from a PNG's IHDR (bytes 16..24), if the file starts like a PNG.
fn png_ihdr_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// JPEG through zune-jpeg in strict mode: truncated or damaged entropy data is an
/// error, not a silently grey poster.
fn decode_jpeg_strict(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    let (w, h, pixels) = zune_decode(bytes)?;
    if cut_short(bytes, &pixels) {
        return Err(ImageError::Corrupt(
            "JPEG: the image data ends before the last row (truncated file)".into(),
        ));
    }
    RgbImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| ImageError::Corrupt("JPEG pixel buffer does not match its size".into()))
}

/// zune-jpeg reads zeros once the entropy data meets a marker, so a file cut short
/// with an end-of-image marker appended decodes without an error. A complete scan
/// never reads past its own end: decoded again with filler bytes before the final
/// EOI, it gives the same pixels, while a cut one takes the filler as data and
/// changes. (Checked on all 10,676 JPEGs of posters-v1: no false alarm.)
fn cut_short(bytes: &[u8], pixels: &[u8]) -> bool {
    let Some(eoi) = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]) else {
        return false;
    };
    let mut probe = Vec::with_capacity(bytes.len() + 64);
    probe.extend_from_slice(&bytes[..eoi]);
    probe.extend_from_slice(&[0x55; 64]);
    probe.extend_from_slice(&bytes[eoi..]);
    !matches!(zune_decode(&probe), Ok((_, _, p)) if p == pixels)
}

fn zune_decode(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), ImageError> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE as usize)
        .set_max_height(MAX_SIDE as usize)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = dec
        .decode()
        .map_err(|e| ImageError::Corrupt(format!("JPEG: {}", one_line(&format!("{e:?}")))))?;
    let (w, h) = dec
        .dimensions()
        .ok_or_else(|| ImageError::Corrupt("JPEG without dimensions".into()))?;
    Ok((w, h, pixels))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg() -> Vec<u8> {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_a_good_jpeg_and_refuses_a_truncated_one() {
        let good = jpeg();
        assert_eq!(decode(&good).unwrap().dimensions(), (64, 48));
        let mut cut = good[..good.len() * 2 / 3].to_vec();
        cut.extend(std::iter::repeat_n(0u8, 300));
        assert!(matches!(decode(&cut), Err(ImageError::Corrupt(_))));
    }

    #[test]
    fn refuses_real_posters_cut_short_with_an_end_marker() {
        // The shared data beside the checkout, or where MARQUEE_SHARED says.
        let shared = std::env::var_os("MARQUEE_SHARED").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
            std::path::PathBuf::from,
        );
        let dir = shared.join("data/posters-v1/posters");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("posters-v1 beside the checkout")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
            .collect();
        names.sort();
        for path in names.iter().step_by(names.len() / 11).take(11) {
            let whole = std::fs::read(path).unwrap();
            assert!(decode(&whole).is_ok(), "{}", path.display());
            for pct in [30, 60, 90, 97] {
                let mut cut = whole[..whole.len() * pct / 100].to_vec();
                cut.extend_from_slice(&[0xFF, 0xD9]);
                assert!(
                    matches!(decode(&cut), Err(ImageError::Corrupt(_))),
                    "{} cut at {pct}% was accepted",
                    path.display()
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// Damaged images (random bytes written over a real JPEG or PNG, or cut
        /// anywhere) decode or give an error; they never panic.
        #[test]
        fn damaged_images_never_panic(
            png in proptest::prelude::any::<bool>(),
            edits in proptest::collection::vec((0usize..100_000, proptest::prelude::any::<u8>()), 0..16),
            cut in 0usize..100_000,
        ) {
            let mut b = if png {
                let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 7]));
                let mut out = Cursor::new(Vec::new());
                img.write_to(&mut out, image::ImageFormat::Png).unwrap();
                out.into_inner()
            } else {
                jpeg()
            };
            for (at, v) in edits {
                let n = b.len();
                b[at % n] = v;
            }
            b.truncate(cut.max(1));
            let _ = decode(&b);
        }
    }

    #[test]
    fn refuses_a_bomb_header_by_its_claimed_size() {
        let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        png.extend(20000u32.to_be_bytes());
        png.extend(20000u32.to_be_bytes());
        png.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            decode(&png),
            Err(ImageError::TooLarge(20000, 20000))
        ));
        assert!(matches!(decode(b""), Err(ImageError::Empty)));
        assert!(matches!(
            decode(b"hello, not an image"),
            Err(ImageError::UnknownFormat)
        ));
    }
}
