//! Helpers shared by the integration tests: fixture paths, tensors, error measures.
#![allow(dead_code)]

pub mod appliance;
pub mod browser;

use marquee::model::cache::CacheDir;
use safetensors::SafeTensors;
use std::path::PathBuf;

/// `../shared` beside the checkout (`MARQUEE_SHARED` overrides).
pub fn shared() -> PathBuf {
    std::env::var_os("MARQUEE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The weight cache; the tests need `marquee models fetch` to have run.
pub fn cache() -> CacheDir {
    let c = CacheDir::from_env();
    assert!(
        c.towers().join("efficientnet_lite0.bpk").is_file(),
        "no converted weights in {}: run `cargo run --release -- models fetch` first",
        c.towers().display()
    );
    c
}

pub struct Fixture {
    bytes: Vec<u8>,
}

/// `efficientnet_lite0.safetensors` as shipped declares a header 2 bytes shorter than
/// its JSON (1392 vs 1394), so strict readers refuse it. The JSON and the data are
/// intact: rewrite the length prefix to where the JSON object really ends.
fn repair_header(bytes: Vec<u8>) -> Vec<u8> {
    if SafeTensors::deserialize(&bytes).is_ok() {
        return bytes;
    }
    let mut stream =
        serde_json::Deserializer::from_slice(&bytes[8..]).into_iter::<serde_json::Value>();
    stream
        .next()
        .expect("a JSON header")
        .expect("a parseable JSON header");
    let real = stream.byte_offset() as u64;
    let mut fixed = real.to_le_bytes().to_vec();
    fixed.extend_from_slice(&bytes[8..]);
    fixed
}

pub struct Array {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
    pub u8: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = shared().join("reference").join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self {
            bytes: repair_header(bytes),
        }
    }

    pub fn get(&self, name: &str) -> Array {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture has no {name}"));
        let shape = t.shape().to_vec();
        let data = t.data();
        let (mut f32, mut i64, mut u8) = (vec![], vec![], vec![]);
        match t.dtype() {
            safetensors::Dtype::F32 => {
                f32 = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            safetensors::Dtype::I64 => {
                i64 = data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            }
            safetensors::Dtype::U8 => u8 = data.to_vec(),
            d => panic!("unexpected dtype {d:?} for {name}"),
        };
        Array {
            shape,
            f32,
            i64,
            u8,
        }
    }
}

/// ‖got − want‖₂ / ‖want‖₂.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub const TOLERANCE: f64 = 1e-4;

/// Records one measured error in `target/parity.txt` (for the CI log and the notes).
pub fn record(backend: &str, tensor: &str, err: f64) {
    use std::io::Write;
    let line = format!("{backend:<8} {tensor:<28} rel_l2 {err:.3e}\n");
    print!("{line}");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/parity.txt");
    let _ = std::fs::create_dir_all(path.parent().unwrap());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A fresh scratch folder under target/.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-tmp")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A valid PNG signature and IHDR claiming `w`x`h` RGB pixels, with no image data.
pub fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let crc = crc32(&ihdr);
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend(13u32.to_be_bytes());
    v.extend(&ihdr);
    v.extend(crc.to_be_bytes());
    v
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
