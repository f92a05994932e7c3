//! A bundled model: the towers travel inside the model folder, cut down for it, so
//! models/ runs with no network and no cache. Written once by `marquee train`.
//!
//! - `image_tower.safetensors`: EfficientNet-Lite0 up to its feature map (the
//!   ImageNet classifier is left out), f16.
//! - `text_tower.safetensors`: the first `text_layers` MiniLM layers, position
//!   embeddings up to the tokenizer's 128-token limit, and word embeddings for a
//!   vocabulary pruned to the wordpieces of the training texts plus every
//!   single-character piece (so any word still tokenizes), f16 / int8.
//! - `tokenizer.json`: MiniLM's tokenizer with that vocabulary, renumbered.
//!
//! Weights are stored as f16 to halve the folder, and the word embeddings (the
//! largest table) as int8 with one f32 scale per row; all are widened to f32 on
//! load, so inference runs in f32 on every backend.

use super::cache::CacheDir;
use super::dir::{ModelDir, ModelSpec, TowerSource};
use super::towers::{Form, Towers};
use crate::nn::bert::{Bert, BertConfig};
use crate::nn::efficientnet::EfficientNetLite0;
use crate::preprocess::text::{MAX_TOKENS, TextTokenizer};
use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use burn::store::{FloatCastAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::DType;
use half::f16;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The bundled poster tower.
pub const IMAGE_FILE: &str = "image_tower.safetensors";
/// The bundled text tower.
pub const TEXT_FILE: &str = "text_tower.safetensors";
/// The bundled wordpiece vocabulary.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const WORD_EMBEDDINGS: &str = "embeddings.word.weight";

/// A tensor on its way to a file: name, shape, f32 values.
type Named = (String, Vec<usize>, Vec<f32>);

fn snapshot<M: ModuleSnapshot>(m: &M) -> Result<Vec<Named>> {
    let mut store = SafetensorsStore::from_bytes(None);
    m.save_into(&mut store)
        .map_err(|e| anyhow!("collecting weights: {e}"))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| anyhow!("collecting weights: {e}"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut out = Vec::new();
    for (name, t) in st.tensors() {
        if t.dtype() != Dtype::F32 {
            bail!("{name}: expected f32, found {:?}", t.dtype());
        }
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push((name, t.shape().to_vec(), v));
    }
    Ok(out)
}

/// Suffixes of an int8 table: the values and one scale per row.
const Q8: &str = ".q8";
const Q8_SCALE: &str = ".q8scale";

/// Writes tensors as f16, except those named in `int8`, which are stored as int8 rows
/// with a per-row scale (`NAME.q8`, `NAME.q8scale`).
fn write_compact(path: &Path, tensors: &[Named], int8: &[&str]) -> Result<()> {
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, shape, v) in tensors {
        if int8.contains(&n.as_str()) && shape.len() == 2 {
            let h = shape[1];
            let mut q = Vec::with_capacity(v.len());
            let mut scales = Vec::with_capacity(shape[0] * 4);
            for row in v.chunks(h) {
                let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                q.extend(
                    row.iter()
                        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
                scales.extend(scale.to_le_bytes());
            }
            out.push((format!("{n}{Q8}"), Dtype::I8, shape.clone(), q));
            out.push((format!("{n}{Q8_SCALE}"), Dtype::F32, vec![shape[0]], scales));
        } else {
            let b = v
                .iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect();
            out.push((n.clone(), Dtype::F16, shape.clone(), b));
        }
    }
    let views = out
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// A table stored as int8 rows, widened: name, shape, values.
type Table = (String, [usize; 2], Vec<f32>);

/// Reads a compact safetensors file (f16, int8 rows) into a module, widened to f32,
/// and returns its int8 tables widened for the caller to place. The f16 tensors come
/// from the mapped file through a cast, one at a time, and the tables are handed
/// over as they are, so loading never holds a second f32 copy of the tower (which
/// used to set the appliance's peak memory).
fn load_compact<M: ModuleSnapshot>(
    m: &mut M,
    path: &Path,
    allow_partial: bool,
) -> Result<Vec<Table>> {
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(FloatCastAdapter::to(DType::F32))
        .allow_partial(true);
    let result = m
        .load_from(&mut store)
        .map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    drop(store);
    let tables = int8_tables(path)?;
    if !allow_partial {
        let missing: Vec<&str> = result
            .missing
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !tables.iter().any(|(t, ..)| t == n))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{}: weights missing for {}",
                path.display(),
                missing.join(", ")
            );
        }
    }
    Ok(tables)
}

/// The int8 tables of a compact file (`NAME.q8` rows with `NAME.q8scale`), widened.
fn int8_tables(path: &Path) -> Result<Vec<Table>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st =
        SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let mut tables = Vec::new();
    for (name, q) in st.tensors() {
        let Some(base) = name.strip_suffix(Q8) else {
            continue;
        };
        let scales: Vec<f32> = st
            .tensor(&format!("{base}{Q8_SCALE}"))
            .with_context(|| format!("{}: {base} has no scales", path.display()))?
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let &[rows, h] = q.shape() else {
            bail!("{}: {base} is not a table", path.display());
        };
        if scales.len() != rows {
            bail!(
                "{}: {base} has {} scales for {rows} rows",
                path.display(),
                scales.len()
            );
        }
        let v = q
            .data()
            .iter()
            .enumerate()
            .map(|(i, &v)| v as i8 as f32 * scales[i / h])
            .collect();
        tables.push((base.to_string(), [rows, h], v));
    }
    Ok(tables)
}

impl Towers {
    /// Loads the towers bundled in a model folder.
    pub fn load_bundled(dir: &Path, spec: &ModelSpec, device: &Device, form: Form) -> Result<Self> {
        let TowerSource::Bundled {
            vocab_size,
            max_positions,
        } = spec.towers
        else {
            bail!("model.json does not bundle its towers");
        };
        let mut image = EfficientNetLite0::new(device);
        // The ImageNet classifier is not shipped: it is the one part left unloaded.
        if let Some((name, ..)) = load_compact(&mut image, &dir.join(IMAGE_FILE), true)?.first() {
            bail!("{IMAGE_FILE}: unexpected int8 table {name}");
        }
        let config = BertConfig {
            vocab_size,
            max_positions,
            layers: spec.text_layers,
            ..BertConfig::MINILM_L6
        };
        let mut text = Bert::new(&config, device);
        for (name, shape, v) in load_compact(&mut text, &dir.join(TEXT_FILE), false)? {
            if name != WORD_EMBEDDINGS || shape != [config.vocab_size, config.hidden] {
                bail!("{TEXT_FILE}: unexpected int8 table {name} {shape:?}");
            }
            text.set_word_embeddings(Tensor::from_data(TensorData::new(v, shape), device));
        }
        let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self::new(image, text, tokenizer, device, form))
    }
}

/// Writes the bundled towers for `text_layers` MiniLM layers and a vocabulary of
/// the pieces in `texts`. Returns the `TowerSource` to put in model.json.
pub fn write_bundle(
    towers: &Towers,
    tokenizer_json: &Path,
    texts: &[String],
    text_layers: usize,
    dir: &Path,
) -> Result<TowerSource> {
    std::fs::create_dir_all(dir)?;
    // The image tower, without the ImageNet classifier.
    let image: Vec<Named> = snapshot(&towers.image)?
        .into_iter()
        .filter(|(n, _, _)| !n.starts_with("fc."))
        .collect();
    write_compact(&dir.join(IMAGE_FILE), &image, &[])?;

    // The vocabulary: the training texts' pieces, single characters, special tokens.
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(tokenizer_json)?)?;
    let vocab = raw["model"]["vocab"]
        .as_object()
        .context("tokenizer.json: no model.vocab")?;
    let mut keep: BTreeSet<i64> = BTreeSet::new();
    for (piece, id) in vocab {
        let bare = piece.strip_prefix("##").unwrap_or(piece);
        if bare.chars().count() == 1 || (piece.starts_with('[') && piece.ends_with(']')) {
            keep.insert(id.as_i64().context("vocab id")?);
        }
    }
    for t in texts {
        keep.extend(towers.tokenizer.encode(t)?);
    }
    let new_id: BTreeMap<i64, i64> = keep
        .iter()
        .enumerate()
        .map(|(i, &o)| (o, i as i64))
        .collect();
    let remap = |old: &serde_json::Value| -> Option<serde_json::Value> {
        new_id.get(&old.as_i64()?).map(|&n| n.into())
    };
    let mut tok = raw.clone();
    let mut new_vocab = serde_json::Map::new();
    for (piece, id) in vocab {
        if let Some(n) = remap(id) {
            new_vocab.insert(piece.clone(), n);
        }
    }
    tok["model"]["vocab"] = new_vocab.into();
    if let Some(added) = tok["added_tokens"].as_array_mut() {
        for a in added {
            a["id"] = remap(&a["id"]).context("special token pruned")?;
        }
    }
    if let Some(special) = tok["post_processor"]["special_tokens"].as_object_mut() {
        for (_, s) in special.iter_mut() {
            if let Some(ids) = s["ids"].as_array_mut() {
                for id in ids {
                    *id = remap(id).context("special token pruned")?;
                }
            }
        }
    }
    if tok["padding"].is_object() {
        tok["padding"]["pad_id"] = remap(&tok["padding"]["pad_id"]).unwrap_or(0.into());
    }
    std::fs::write(dir.join(TOKENIZER_FILE), serde_json::to_vec(&tok)?)?;
    // The pruned tokenizer must cut every training text exactly as the full one did.
    let pruned = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    for t in texts {
        let want: Vec<i64> = towers
            .tokenizer
            .encode(t)?
            .iter()
            .map(|o| new_id[o])
            .collect();
        if pruned.encode(t)? != want {
            bail!("the pruned tokenizer splits a training text differently: {t:.60}");
        }
    }

    // The text tower: the first layers, the rows of the kept pieces, 128 positions.
    let old: Vec<i64> = keep.iter().copied().collect();
    let mut text = Vec::new();
    for (name, shape, v) in snapshot(&towers.text)? {
        if let Some(rest) = name.strip_prefix("layers.") {
            let layer: usize = rest.split('.').next().unwrap_or("").parse()?;
            if layer >= text_layers {
                continue;
            }
            text.push((name, shape, v));
        } else if name == WORD_EMBEDDINGS {
            let h = shape[1];
            let rows = old
                .iter()
                .flat_map(|&o| v[o as usize * h..(o as usize + 1) * h].iter().copied())
                .collect();
            text.push((name, vec![old.len(), h], rows));
        } else if name.starts_with("embeddings.position.") {
            let h = shape[1];
            text.push((name, vec![MAX_TOKENS, h], v[..MAX_TOKENS * h].to_vec()));
        } else {
            text.push((name, shape, v));
        }
    }
    write_compact(&dir.join(TEXT_FILE), &text, &[WORD_EMBEDDINGS])?;
    Ok(TowerSource::Bundled {
        vocab_size: old.len(),
        max_positions: MAX_TOKENS,
    })
}

/// Turns a trained student (towers from the cache) into a self-contained model
/// folder at `out`: its fusion network and spec, plus the bundled towers.
pub fn export(
    student: &Path,
    texts: &[String],
    cache: &CacheDir,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let mut model = ModelDir::load(student, device)?;
    let towers = Towers::load(cache, device, Form::Modules)?;
    let tokenizer = cache.towers().join(super::towers::TOKENIZER_FILE);
    model.spec.towers = write_bundle(&towers, &tokenizer, texts, model.spec.text_layers, out)?;
    model.save(out)
}
