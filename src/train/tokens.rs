//! Token-level frozen features for the early-fusion models, cached on disk in
//! chunks (f16, resumable) so that training reads them instead of running towers.
//!
//! Per row: the EfficientNet feature map at the teacher input (224x336, 7x11 cells)
//! and at the student input (160x240, 5x8 cells), each cell a 1280-d token; and the
//! MiniLM hidden state of every wordpiece after layer 3 (the student's text tower)
//! and layer 6 (the teacher's). A second recipe holds horizontally flipped teacher
//! maps, for the teacher's test-time augmentation on the rows it is scored on; a
//! third the flipped student maps, for the kiosk's (text-less) test-time
//! augmentation; a fourth the hidden states below the top MiniLM layers that a
//! teacher tunes. The extra recipes live in files of their own, so adding one never
//! invalidates the rest.

use super::manifest::{Manifest, Row};
use super::split::fit_tune_split;
use crate::infer::classifier::image_input;
use crate::infer::{TEXT_DIM, compose_text, image_tokens};
use crate::model::cache::CacheDir;
use crate::model::dir::ImageInput;
use crate::model::towers::{Form, Towers};
use crate::nn::efficientnet::FEATURE_DIM;
use crate::preprocess::image::decode;
use crate::util::progress::{Stage, note};
use anyhow::{Context, Result};
use burn::prelude::*;
use half::f16;
use image::RgbImage;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const CHUNK: usize = 128;
const IMAGE_BATCH: usize = 8;
const TEXT_BATCH: usize = 16;

/// The teacher's poster input.
pub const TEACHER_INPUT: ImageInput = ImageInput {
    width: 224,
    height: 336,
};
/// The student's poster input (the shipped model's).
pub const STUDENT_INPUT: ImageInput = ImageInput {
    width: 160,
    height: 240,
};
/// MiniLM layers whose hidden states are kept: the student's depth, the teacher's.
pub const STUDENT_TEXT_LAYERS: usize = 3;
/// MiniLM layers the teacher reads.
pub const TEACHER_TEXT_LAYERS: usize = 6;

const RECIPE: &str =
    "tokens v1 | effnet-lite0 maps 224x336 160x240 catmullrom | minilm-l6 L3 L6 128";
const FLIP_RECIPE: &str = "tokens-flip v1 | effnet-lite0 map 224x336 hflip catmullrom";
const STUDENT_FLIP_RECIPE: &str =
    "tokens-flip-student v1 | effnet-lite0 map 160x240 hflip catmullrom";

fn tail_recipe(blocks: usize, flip: bool) -> String {
    format!(
        "tokens-tail v1 | effnet-lite0 input of the last {blocks} blocks + head 224x336{} catmullrom",
        if flip { " hflip" } else { "" }
    )
}

fn below_recipe(layer: usize) -> String {
    format!("tokens-below v1 | minilm-l6 L{layer} 128")
}

/// What a split needs beyond the plain features.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    /// The flipped teacher maps (rows the teacher scores).
    pub flip: bool,
    /// The flipped student maps (rows the student scores without text).
    pub student_flip: bool,
    /// MiniLM's hidden states after this layer (under a teacher's tuned top layers).
    pub below: Option<usize>,
    /// The input of EfficientNet's last this many blocks and head at the teacher's
    /// input (under a network's tuned image tail); mirrored too when `flip`.
    pub tail: Option<usize>,
}

/// Rows and columns of the feature map for an input (TF-SAME padding rounds up).
pub fn grid(input: ImageInput) -> [usize; 2] {
    [
        (input.height as usize).div_ceil(32),
        (input.width as usize).div_ceil(32),
    ]
}

/// Cells of the feature map for an input.
pub fn grid_tokens(input: ImageInput) -> usize {
    let [h, w] = grid(input);
    h * w
}

/// Token features of `n` rows. Maps are `[n, cells, 1280]`, text is packed:
/// row `i` owns tokens `text_off[i]..text_off[i + 1]` of `[tokens, 384]`.
#[derive(Debug, Default, Clone)]
pub struct TokenSet {
    /// Rows.
    pub n: usize,
    /// Teacher maps (224x336 input).
    pub teacher_map: Vec<f16>,
    /// Student maps (160x240 input).
    pub student_map: Vec<f16>,
    /// Where each row's text tokens start, and the end (`n + 1` entries).
    pub text_off: Vec<usize>,
    /// MiniLM states after 3 layers.
    pub text_l3: Vec<f16>,
    /// MiniLM states after 6 layers.
    pub text_l6: Vec<f16>,
    /// Flipped teacher maps; empty unless asked for.
    pub flip_map: Vec<f16>,
    /// Flipped student maps; empty unless asked for.
    pub student_flip_map: Vec<f16>,
    /// Hidden states below the teacher's tuned top layers, packed as the others;
    /// empty unless asked for.
    pub text_below: Vec<f16>,
    /// Inputs of the tuned image tail, `[n, c, h, w]` flattened; empty unless asked for.
    pub tail_in: Vec<f16>,
    /// The same for the mirror images; empty unless asked for with `flip`.
    pub tail_flip: Vec<f16>,
    /// `[c, h, w]` of a row of `tail_in`.
    pub tail_dims: [usize; 3],
}

impl TokenSet {
    /// Text tokens of row `i` (0: no text).
    pub fn text_len(&self, i: usize) -> usize {
        self.text_off[i + 1] - self.text_off[i]
    }
}

/// Token features for `rows`, from the cache where present, computed otherwise,
/// with the `extra` features asked for.
pub fn extract_tokens(
    towers: &Towers,
    device: &Device,
    manifest: &Manifest,
    rows: &[Row],
    cache: &Path,
    extra: Extra,
) -> Result<TokenSet> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let name = format!(
        "tokens{}{}{}{}",
        if extra.flip { "+flip" } else { "" },
        if extra.student_flip { "+flip160" } else { "" },
        extra.below.map(|l| format!("+L{l}")).unwrap_or_default(),
        extra.tail.map(|b| format!("+tail{b}")).unwrap_or_default()
    );
    let pb = Stage::start(&name, rows.len() as u64);
    let mut all = TokenSet {
        text_off: vec![0],
        ..Default::default()
    };
    for chunk in rows.chunks(CHUNK) {
        let path = chunk_path(cache, manifest, chunk, RECIPE);
        let mut set = match read_chunk(&path, chunk.len()) {
            Some(s) => {
                pb.inc(chunk.len() as u64);
                s
            }
            None => {
                let s = compute(towers, device, manifest, chunk, &pb)?;
                write_chunk(&path, &s)?;
                s
            }
        };
        let flips = [
            (extra.flip, FLIP_RECIPE, TEACHER_INPUT, &mut set.flip_map),
            (
                extra.student_flip,
                STUDENT_FLIP_RECIPE,
                STUDENT_INPUT,
                &mut set.student_flip_map,
            ),
        ];
        for (wanted, recipe, input, slot) in flips {
            if !wanted {
                continue;
            }
            let fpath = chunk_path(cache, manifest, chunk, recipe);
            *slot = match read_flip(&fpath, chunk.len() * grid_tokens(input) * FEATURE_DIM) {
                Some(f) => f,
                None => {
                    let images = load_images(manifest, chunk)?;
                    let flipped: Vec<RgbImage> = images
                        .iter()
                        .map(image::imageops::flip_horizontal)
                        .collect();
                    let f = maps(towers, device, &flipped, input);
                    write_named(&fpath, &[("flip_map", f16_bytes(&f), vec![f.len()])])?;
                    f
                }
            };
        }
        if let Some(layer) = extra.below {
            let bpath = chunk_path(cache, manifest, chunk, &below_recipe(layer));
            let tokens = *set.text_off.last().expect("starts with 0");
            set.text_below = match read_text(&bpath, "text_below", tokens) {
                Some(t) => t,
                None => {
                    let (_, mut states) = text_states(towers, device, chunk, &[layer])?;
                    let t = states.pop().expect("one tap");
                    write_named(&bpath, &[("text_below", f16_bytes(&t), vec![t.len()])])?;
                    t
                }
            };
        }
        if let Some(blocks) = extra.tail {
            let views: &[bool] = if extra.flip { &[false, true] } else { &[false] };
            for &flip in views {
                let tpath = chunk_path(cache, manifest, chunk, &tail_recipe(blocks, flip));
                let (t, dims) = match read_tail(&tpath) {
                    Some(t) if t.0.len() == chunk.len() * t.1.iter().product::<usize>() => t,
                    _ => {
                        let images = load_images(manifest, chunk)?;
                        let t = tail_inputs(towers, device, &images, blocks, flip);
                        let dims: Vec<u8> =
                            t.1.iter().flat_map(|&d| (d as i64).to_le_bytes()).collect();
                        let data = ("tail_in", f16_bytes(&t.0), vec![t.0.len()]);
                        write_named(&tpath, &[data, ("tail_dims", dims, vec![3])])?;
                        t
                    }
                };
                set.tail_dims = dims;
                match flip {
                    true => set.tail_flip = t,
                    false => set.tail_in = t,
                }
            }
        }
        append(&mut all, set);
    }
    drop(pb);
    Ok(all)
}

/// The input of EfficientNet's last `blocks` blocks and head for each image at the
/// teacher's input (mirrored when `flip`), flattened `[n, c, h, w]`, and `[c, h, w]`.
fn tail_inputs(
    towers: &Towers,
    device: &Device,
    images: &[RgbImage],
    blocks: usize,
    flip: bool,
) -> (Vec<f16>, [usize; 3]) {
    let last = towers.image.block_count() - blocks - 1;
    let mut out = Vec::new();
    let mut dims = [0; 3];
    for batch in images.chunks(IMAGE_BATCH) {
        let batch: Vec<RgbImage> = match flip {
            true => batch.iter().map(image::imageops::flip_horizontal).collect(),
            false => batch.to_vec(),
        };
        let x = Tensor::<4>::from_data(image_input(&batch, TEACHER_INPUT), device);
        let t = towers.image.forward_until(x, last);
        let [_, c, h, w] = t.dims();
        dims = [c, h, w];
        out.extend(t.into_data().iter::<f32>().map(f16::from_f32));
    }
    (out, dims)
}

/// A chunk's cached tail inputs and their `[c, h, w]`.
fn read_tail(path: &Path) -> Option<(Vec<f16>, [usize; 3])> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let t = f16_of(&st, "tail_in")?;
    Some((t, usizes_of(&st, "tail_dims")?.try_into().ok()?))
}

fn append(all: &mut TokenSet, s: TokenSet) {
    let base = *all.text_off.last().expect("starts with 0");
    all.n += s.n;
    all.teacher_map.extend(s.teacher_map);
    all.student_map.extend(s.student_map);
    all.text_off
        .extend(s.text_off[1..].iter().map(|o| o + base));
    all.text_l3.extend(s.text_l3);
    all.text_l6.extend(s.text_l6);
    all.flip_map.extend(s.flip_map);
    all.student_flip_map.extend(s.student_flip_map);
    all.text_below.extend(s.text_below);
    all.tail_in.extend(s.tail_in);
    all.tail_flip.extend(s.tail_flip);
    all.tail_dims = s.tail_dims;
}

fn load_images(manifest: &Manifest, rows: &[Row]) -> Result<Vec<RgbImage>> {
    rows.iter()
        .map(|r| {
            let path = manifest.poster_path(r);
            let bytes =
                crate::util::limited::read_file(&path, crate::preprocess::image::MAX_BYTES)?;
            decode(&bytes).with_context(|| format!("poster of {}", r.id))
        })
        .collect()
}

/// Feature maps of images at `input`, `[n, cells, 1280]` flattened, f16.
pub fn maps(towers: &Towers, device: &Device, images: &[RgbImage], input: ImageInput) -> Vec<f16> {
    let mut out = Vec::new();
    for batch in images.chunks(IMAGE_BATCH) {
        let t = image_tokens(towers, batch, input, device);
        out.extend(t.into_data().iter::<f32>().map(f16::from_f32));
    }
    out
}

fn compute(
    towers: &Towers,
    device: &Device,
    manifest: &Manifest,
    rows: &[Row],
    pb: &Stage,
) -> Result<TokenSet> {
    let mut s = TokenSet {
        n: rows.len(),
        ..Default::default()
    };
    for batch in rows.chunks(IMAGE_BATCH) {
        let images = load_images(manifest, batch)?;
        s.teacher_map
            .extend(maps(towers, device, &images, TEACHER_INPUT));
        s.student_map
            .extend(maps(towers, device, &images, STUDENT_INPUT));
        pb.inc(batch.len() as u64);
    }
    let (lens, mut states) = text_states(
        towers,
        device,
        rows,
        &[STUDENT_TEXT_LAYERS, TEACHER_TEXT_LAYERS],
    )?;
    s.text_l6 = states.pop().expect("two taps");
    s.text_l3 = states.pop().expect("two taps");
    s.text_off.push(0);
    for len in lens {
        s.text_off
            .push(s.text_off.last().expect("starts with 0") + len);
    }
    Ok(s)
}

/// MiniLM's hidden states after each layer in `taps` (ascending), packed row after
/// row, and each row's token count (0 for a text-less row).
fn text_states(
    towers: &Towers,
    device: &Device,
    rows: &[Row],
    taps: &[usize],
) -> Result<(Vec<usize>, Vec<Vec<f16>>)> {
    let ids: Vec<Vec<i64>> = rows
        .iter()
        .map(
            |r| match compose_text(Some(&r.overview), r.caption.as_deref()) {
                Some(t) => towers.tokenizer.encode(&t).map_err(anyhow::Error::from),
                None => Ok(Vec::new()),
            },
        )
        .collect::<Result<_>>()?;
    let mut per_row: Vec<Vec<Vec<f16>>> = vec![vec![Vec::new(); rows.len()]; taps.len()];
    // Similar lengths together, so a batch pads little.
    let mut order: Vec<usize> = (0..rows.len()).filter(|&i| !ids[i].is_empty()).collect();
    order.sort_by_key(|&i| ids[i].len());
    for batch in order.chunks(TEXT_BATCH) {
        let rows_ids: Vec<Vec<i64>> = batch.iter().map(|&i| ids[i].clone()).collect();
        let tb = crate::preprocess::text::pad_batch(&rows_ids);
        let idt = Tensor::<2, Int>::from_data(TensorData::new(tb.ids, [tb.rows, tb.len]), device);
        let mask = Tensor::<2>::from_data(TensorData::new(tb.mask, [tb.rows, tb.len]), device);
        let out = towers.text.forward_taps(idt, mask, taps);
        for (tap, dst) in out.into_iter().zip(per_row.iter_mut()) {
            let v = tap.into_data().try_to_vec::<f32>().expect("f32 hidden");
            for (k, &i) in batch.iter().enumerate() {
                let start = k * tb.len * TEXT_DIM;
                dst[i] = v[start..start + ids[i].len() * TEXT_DIM]
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect();
            }
        }
    }
    let packed = per_row.into_iter().map(|rows| rows.concat()).collect();
    Ok((ids.iter().map(Vec::len).collect(), packed))
}

fn chunk_path(cache: &Path, manifest: &Manifest, rows: &[Row], recipe: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(recipe.as_bytes());
    for r in rows {
        for part in [
            r.id.as_bytes(),
            manifest.poster_path(r).as_os_str().as_encoded_bytes(),
            r.overview.as_bytes(),
            r.caption.as_deref().unwrap_or("").as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    let key = hex::encode(&h.finalize()[..16]);
    cache.join(format!("{key}.safetensors"))
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_named(path: &Path, tensors: &[(&str, Vec<u8>, Vec<usize>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, bytes, shape)| {
            let dtype = if matches!(*name, "text_off" | "tail_dims") {
                Dtype::I64
            } else {
                Dtype::F16
            };
            Ok((
                name.to_string(),
                TensorView::new(dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // Write then rename, so a killed run never leaves a half chunk behind.
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(views, None, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_chunk(path: &Path, s: &TokenSet) -> Result<()> {
    let off: Vec<u8> = s
        .text_off
        .iter()
        .flat_map(|&o| (o as i64).to_le_bytes())
        .collect();
    write_named(
        path,
        &[
            (
                "teacher_map",
                f16_bytes(&s.teacher_map),
                vec![s.teacher_map.len()],
            ),
            (
                "student_map",
                f16_bytes(&s.student_map),
                vec![s.student_map.len()],
            ),
            ("text_off", off, vec![s.text_off.len()]),
            ("text_l3", f16_bytes(&s.text_l3), vec![s.text_l3.len()]),
            ("text_l6", f16_bytes(&s.text_l6), vec![s.text_l6.len()]),
        ],
    )
}

fn f16_of(st: &SafeTensors, name: &str) -> Option<Vec<f16>> {
    let t = st.tensor(name).ok()?;
    (t.dtype() == Dtype::F16).then(|| {
        t.data()
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect()
    })
}

/// An i64 tensor (offsets, dims) as sizes.
fn usizes_of(st: &SafeTensors, name: &str) -> Option<Vec<usize>> {
    let t = st.tensor(name).ok()?;
    (t.dtype() == Dtype::I64).then(|| {
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .collect()
    })
}

fn read_chunk(path: &Path, n: usize) -> Option<TokenSet> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let text_off = usizes_of(&st, "text_off")?;
    let s = TokenSet {
        n,
        teacher_map: f16_of(&st, "teacher_map")?,
        student_map: f16_of(&st, "student_map")?,
        text_l3: f16_of(&st, "text_l3")?,
        text_l6: f16_of(&st, "text_l6")?,
        text_off,
        ..Default::default()
    };
    let tokens = *s.text_off.last()?;
    let ok = s.text_off.len() == n + 1
        && s.teacher_map.len() == n * grid_tokens(TEACHER_INPUT) * FEATURE_DIM
        && s.student_map.len() == n * grid_tokens(STUDENT_INPUT) * FEATURE_DIM
        && s.text_l3.len() == tokens * TEXT_DIM
        && s.text_l6.len() == tokens * TEXT_DIM;
    ok.then_some(s)
}

/// A chunk's cached mirror-image maps, when they hold `values` numbers.
fn read_flip(path: &Path, values: usize) -> Option<Vec<f16>> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let f = f16_of(&st, "flip_map")?;
    (f.len() == values).then_some(f)
}

/// A packed text tensor of a chunk's `tokens` tokens.
fn read_text(path: &Path, name: &str, tokens: usize) -> Option<Vec<f16>> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let t = f16_of(&st, name)?;
    (t.len() == tokens * TEXT_DIM).then_some(t)
}

/// Extracts (or finds cached) token features of every row, as the default recipe
/// reads them: flipped teacher maps for the rows the teacher scores (tune and val),
/// flipped student maps for all (the kiosk's test-time augmentation).
pub fn extract_all(manifest_path: &Path, cache: &CacheDir, device: &Device) -> Result<()> {
    let manifest = Manifest::load(manifest_path)?;
    let towers = Towers::load(cache, device, Form::Modules)?;
    let (fit, tune) = fit_tune_split(&manifest.split(Some("train")));
    let val = manifest.split(Some("val"));
    let dir = cache.tokens();
    let student_flip = Extra {
        student_flip: true,
        ..Default::default()
    };
    let flip = Extra {
        flip: true,
        ..student_flip
    };
    note(&format!(
        "token features: {} fit, {} tune, {} val rows",
        fit.len(),
        tune.len(),
        val.len()
    ));
    extract_tokens(&towers, device, &manifest, &val, &dir, flip)?;
    extract_tokens(&towers, device, &manifest, &tune, &dir, flip)?;
    extract_tokens(&towers, device, &manifest, &fit, &dir, student_flip)?;
    Ok(())
}
