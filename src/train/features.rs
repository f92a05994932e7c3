//! Frozen-tower features of manifest rows, cached on disk in chunks so that a
//! retrain costs minutes and an interrupted extraction resumes where it stopped.

use super::manifest::{Manifest, Row};
use crate::classify::{Encoder, TEXT_DIM, compose_text};
use crate::nn::efficientnet::FEATURE_DIM;
use crate::preprocess::image::decode;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const CHUNK: usize = 128;
const IMAGE_BATCH: usize = 8;
const TEXT_BATCH: usize = 32;

/// Features of `n` rows, row-major.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub image: Vec<f32>,
    pub text: Vec<f32>,
    /// 1.0 where the row has text.
    pub present: Vec<f32>,
}

impl Features {
    pub fn len(&self) -> usize {
        self.present.len()
    }

    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }

    fn extend(&mut self, other: Features) {
        self.image.extend(other.image);
        self.text.extend(other.text);
        self.present.extend(other.present);
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Features {
        let mut out = Features::default();
        for &i in idx {
            out.image
                .extend_from_slice(&self.image[i * FEATURE_DIM..(i + 1) * FEATURE_DIM]);
            out.text
                .extend_from_slice(&self.text[i * TEXT_DIM..(i + 1) * TEXT_DIM]);
            out.present.push(self.present[i]);
        }
        out
    }
}

fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Features for `rows`, from the cache where present, computed (and cached) otherwise.
pub fn extract(
    encoder: &Encoder,
    manifest: &Manifest,
    rows: &[Row],
    cache: &Path,
    recipe: &str,
) -> Result<Features> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let pb = progress(rows.len(), "features");
    let mut all = Features::default();
    for chunk in rows.chunks(CHUNK) {
        let path = chunk_path(cache, manifest, chunk, recipe);
        // The bar counts posters: a cached chunk advances it at once.
        let feats = match read_chunk(&path, chunk.len()) {
            Some(f) => {
                pb.inc(chunk.len() as u64);
                f
            }
            None => {
                let f = compute(encoder, manifest, chunk, &pb)?;
                write_chunk(&path, &f)?;
                f
            }
        };
        all.extend(feats);
    }
    pb.finish_and_clear();
    Ok(all)
}

fn chunk_path(cache: &Path, manifest: &Manifest, rows: &[Row], recipe: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(recipe.as_bytes());
    for r in rows {
        for part in [
            r.id.as_bytes(),
            manifest.poster_path(r).as_os_str().as_encoded_bytes(),
            r.overview.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    let key = crate::model::towers::hex(&h.finalize()[..16]);
    cache.join(format!("{key}.safetensors"))
}

fn compute(
    encoder: &Encoder,
    manifest: &Manifest,
    rows: &[Row],
    pb: &ProgressBar,
) -> Result<Features> {
    let mut out = Features {
        image: Vec::with_capacity(rows.len() * FEATURE_DIM),
        text: vec![0.0; rows.len() * TEXT_DIM],
        present: vec![0.0; rows.len()],
    };
    for batch in rows.chunks(IMAGE_BATCH) {
        let images = batch
            .iter()
            .map(|r| {
                let path = manifest.poster_path(r);
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                decode(&bytes).with_context(|| format!("poster of {}", r.id))
            })
            .collect::<Result<Vec<_>>>()?;
        out.image.extend(encoder.image_features(&images));
        pb.inc(batch.len() as u64);
    }
    // Shortest texts together, so a batch pads little.
    let mut texts: Vec<(usize, String)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| compose_text(Some(&r.overview), None).map(|t| (i, t)))
        .collect();
    texts.sort_by_key(|(_, t)| t.len());
    for batch in texts.chunks(TEXT_BATCH) {
        let strs: Vec<&str> = batch.iter().map(|(_, t)| t.as_str()).collect();
        let emb = encoder.text_features(&strs)?;
        for (k, (i, _)) in batch.iter().enumerate() {
            out.text[i * TEXT_DIM..(i + 1) * TEXT_DIM]
                .copy_from_slice(&emb[k * TEXT_DIM..(k + 1) * TEXT_DIM]);
            out.present[*i] = 1.0;
        }
    }
    Ok(out)
}

fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_chunk(path: &Path, f: &Features) -> Result<()> {
    let n = f.len();
    let (img, txt, pre) = (bytes_of(&f.image), bytes_of(&f.text), bytes_of(&f.present));
    let views = [
        (
            "image",
            TensorView::new(Dtype::F32, vec![n, FEATURE_DIM], &img)?,
        ),
        (
            "text",
            TensorView::new(Dtype::F32, vec![n, TEXT_DIM], &txt)?,
        ),
        ("present", TensorView::new(Dtype::F32, vec![n], &pre)?),
    ];
    // Write then rename, so a killed run never leaves a half chunk behind.
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, None, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn read_chunk(path: &Path, n: usize) -> Option<Features> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let get = |name: &str, len: usize| -> Option<Vec<f32>> {
        let t = st.tensor(name).ok()?;
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (v.len() == len).then_some(v)
    };
    Some(Features {
        image: get("image", n * FEATURE_DIM)?,
        text: get("text", n * TEXT_DIM)?,
        present: get("present", n)?,
    })
}
