//! Florence-2 weights: both checkpoint layouts load into one burn module through
//! burn-store, with a key remap per layout and an adapter for the two tensors whose
//! shape differs (Microsoft's `[in, out]` image projection and its unpadded vocabulary).
//!
//! Layouts (see the reference kit's mapping table):
//! - transformers-native (`florence-community/*`, `model.safetensors`): `model.` prefix,
//!   tied aliases left out;
//! - Microsoft's remote code (`microsoft/Florence-2-*`, `pytorch_model.bin` or
//!   safetensors): `fn.dw`/`fn.net` wrappers, top-level projector names, tied aliases
//!   and an all-zero `final_logits_bias`, which we drop.

use crate::nn::florence::Florence2;
use crate::nn::florence::config::FlorenceConfig;
use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::store::bridge::map_data;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    KeyRemapper, ModuleAdapter, ModuleContext, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore,
};
use std::collections::BTreeMap;
use std::path::Path;

/// How a Florence-2 checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers' native Florence-2 (`model.vision_tower.…`).
    Native,
    /// Microsoft's remote-code release (`vision_tower.…`, `language_model.model.…`).
    Microsoft,
}

impl Layout {
    /// Tells the layouts apart by a key only one of them has.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a str>) -> Result<Self> {
        keys.find_map(|k| {
            if k.starts_with("model.vision_tower.") || k.starts_with("model.language_model.") {
                Some(Layout::Native)
            } else if k.starts_with("vision_tower.") || k.starts_with("language_model.model.") {
                Some(Layout::Microsoft)
            } else {
                None
            }
        })
        .context("not a Florence-2 checkpoint: no vision_tower or language_model keys")
    }

    /// Checkpoint key -> burn parameter path. Keys a layout drops map under `dropped.`.
    pub fn remapper(self) -> KeyRemapper {
        let patterns: &[(&str, &str)] = match self {
            Layout::Native => &[
                (r"^lm_head\.weight$", "dropped.lm_head"),
                (
                    r"^model\.language_model\.(encoder|decoder)\.embed_tokens\.weight$",
                    "dropped.$1.embed_tokens",
                ),
                (r"^model\.", ""),
            ],
            Layout::Microsoft => &[
                (
                    r"^language_model\.final_logits_bias$",
                    "dropped.final_logits_bias",
                ),
                (r"^language_model\.lm_head\.weight$", "dropped.lm_head"),
                (
                    r"^language_model\.model\.(encoder|decoder)\.embed_tokens\.weight$",
                    "dropped.$1.embed_tokens",
                ),
                (r"^language_model\.model\.", "language_model."),
                (
                    r"^vision_tower\.convs\.(\d+)\.proj\.",
                    "vision_tower.convs.$1.conv.",
                ),
                (r"\.conv([12])\.fn\.dw\.", ".conv$1."),
                (r"\.(window_attn|channel_attn)\.norm\.", ".norm1."),
                (r"\.(window_attn|channel_attn)\.fn\.", ".$1."),
                (r"\.ffn\.norm\.", ".norm2."),
                (r"\.ffn\.fn\.net\.", ".ffn."),
                (
                    r"^image_projection$",
                    "multi_modal_projector.image_projection.weight",
                ),
                (
                    r"^image_proj_norm\.",
                    "multi_modal_projector.image_proj_norm.",
                ),
                (
                    r"^image_pos_embed\.",
                    "multi_modal_projector.image_position_embed.",
                ),
                (
                    r"^visual_temporal_embed\.",
                    "multi_modal_projector.visual_temporal_embed.",
                ),
            ],
        };
        KeyRemapper::from_patterns(patterns.to_vec()).expect("static regexes")
    }

    /// Where one checkpoint key lands, by the same rules the loader applies.
    pub fn burn_path(self, key: &str) -> String {
        self.remapper()
            .to_regex_pairs()
            .iter()
            .fold(key.to_string(), |k, (re, to)| {
                re.replace_all(&k, to.as_str()).into_owned()
            })
    }
}

/// The image projection, in the native layout.
pub const PROJECTION: &str = "multi_modal_projector.image_projection.weight";
/// The shared token embedding, in the native layout.
pub const SHARED: &str = "language_model.shared.weight";

/// Microsoft -> native shapes: transposes the `[in, out]` projection into a Linear's
/// `[out, in]`, and pads the vocabulary rows to the native size with zeros.
#[derive(Clone)]
struct MicrosoftToNative {
    vocab: usize,
}

fn f32_data(data: TensorData) -> Vec<f32> {
    data.convert_dtype(burn::tensor::DType::F32)
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

impl ModuleAdapter for MicrosoftToNative {
    fn adapt(&self, tensor: PackTensor, _ctx: ModuleContext<'_>) -> PackTensor {
        let dims = tensor.shape.to_vec();
        let name = tensor.name.clone();
        if name == PROJECTION && dims.len() == 2 {
            let (rows, cols) = (dims[0], dims[1]);
            return map_data(
                tensor,
                name,
                burn::tensor::DType::F32,
                [cols, rows].into(),
                move |d| {
                    let v = f32_data(d);
                    let mut t = vec![0f32; v.len()];
                    for r in 0..rows {
                        for c in 0..cols {
                            t[c * rows + r] = v[r * cols + c];
                        }
                    }
                    TensorData::new(t, [cols, rows])
                },
            );
        }
        if name == SHARED && dims.len() == 2 && dims[0] < self.vocab {
            let (vocab, d) = (self.vocab, dims[1]);
            return map_data(
                tensor,
                name,
                burn::tensor::DType::F32,
                [vocab, d].into(),
                move |data| {
                    let mut v = f32_data(data);
                    v.resize(vocab * d, 0.0);
                    TensorData::new(v, [vocab, d])
                },
            );
        }
        tensor
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Loads a checkpoint file (`*.safetensors` or Microsoft's `pytorch_model.bin`) of
/// either layout into `model`. Every parameter must be covered; extra keys must be
/// ones the layout is known to carry (tied aliases, the zero logits bias).
pub fn load_weights(model: &mut Florence2, config: &FlorenceConfig, path: &Path) -> Result<()> {
    let shown = path.display();
    let is_pickle = path
        .extension()
        .is_some_and(|e| e == "bin" || e == "pth" || e == "pt");
    let keys = if is_pickle {
        pickle_keys(path)?
    } else {
        safetensors_keys(path)?
    };
    let layout =
        Layout::detect(keys.iter().map(String::as_str)).with_context(|| shown.to_string())?;
    let ms = MicrosoftToNative {
        vocab: config.text_config.vocab_size,
    };
    // PytorchStore fixes its adapter, so a pickle is re-read as safetensors in memory
    // and takes the same path (and adapters) as a safetensors checkpoint.
    let store = if is_pickle {
        SafetensorsStore::from_bytes(Some(pickle_to_safetensors(path)?))
    } else {
        SafetensorsStore::from_file(path)
    };
    let store = match layout {
        Layout::Microsoft => store.with_from_adapter(ms.chain(PyTorchToBurnAdapter)),
        Layout::Native => store.with_from_adapter(PyTorchToBurnAdapter),
    };
    let mut store = store
        .remap(layout.remapper())
        .allow_partial(true)
        .map_indices_contiguous(false);
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    if !result.missing.is_empty() {
        let names: Vec<&str> = result
            .missing
            .iter()
            .map(|(n, _)| n.as_str())
            .take(8)
            .collect();
        bail!(
            "{shown}: {} Florence-2 weights missing (first: {}); is config.json the checkpoint's?",
            result.missing.len(),
            names.join(", ")
        );
    }
    if !result.errors.is_empty() {
        bail!("{shown}: {}", result.errors[0]);
    }
    let unexpected: Vec<&String> = result
        .unused
        .iter()
        .filter(|k| !k.starts_with("dropped."))
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "{shown}: {} keys fit no parameter (first: {})",
            unexpected.len(),
            unexpected[0]
        );
    }
    Ok(())
}

fn safetensors_keys(path: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!(
            "{}: safetensors header of {len} bytes is implausible",
            path.display()
        );
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: bad safetensors header", path.display()))?;
    Ok(map.into_keys().filter(|k| k != "__metadata__").collect())
}

fn pickle_keys(path: &Path) -> Result<Vec<String>> {
    let reader = burn::store::pytorch_reader::PytorchReader::new(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(reader.keys())
}

/// A PyTorch pickle checkpoint as safetensors bytes (float tensors only).
fn pickle_to_safetensors(path: &Path) -> Result<Vec<u8>> {
    use burn::store::pytorch_reader::DType as P;
    use safetensors::Dtype as S;
    let reader = burn::store::pytorch_reader::PytorchReader::new(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut tensors = Vec::new();
    for (name, t) in reader.tensors() {
        let dtype = match t.dtype() {
            P::F32 => S::F32,
            P::F16 => S::F16,
            P::BF16 => S::BF16,
            P::F64 => S::F64,
            _ => continue,
        };
        let bytes = t
            .read()
            .with_context(|| format!("{}: reading {name}", path.display()))?;
        tensors.push((name.clone(), dtype, t.shape().to_vec(), bytes));
    }
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    safetensors::serialize(views, None).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Every float parameter of a module: its path as a checkpoint names it, shape, and whether it sits in a
/// `Linear` (whose weight burn stores transposed). Shapes come from lazy params, so a
/// full-size model costs no memory.
pub fn parameter_shapes<M: Module>(model: &M) -> BTreeMap<String, (Vec<usize>, bool)> {
    struct Shapes {
        path: Vec<String>,
        kinds: Vec<String>,
        out: BTreeMap<String, (Vec<usize>, bool)>,
    }
    impl ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push(name.to_string());
            self.kinds.push(container_type.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
            self.kinds.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let kind = self.kinds.iter().rev().find(|k| k.starts_with("Struct:"));
            let linear = kind.is_some_and(|k| k == "Struct:Linear");
            let mut path = self.path.join(".");
            // A LayerNorm's gamma/beta are weight/bias in a checkpoint.
            if kind.is_some_and(|k| k == "Struct:LayerNorm") {
                for (burn, torch) in [(".gamma", ".weight"), (".beta", ".bias")] {
                    if let Some(stem) = path.strip_suffix(burn) {
                        path = format!("{stem}{torch}");
                    }
                }
            }
            self.out.insert(path, (param.lazy_shape().to_vec(), linear));
        }
    }
    let mut v = Shapes {
        path: Vec::new(),
        kinds: Vec::new(),
        out: BTreeMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The shape a checkpoint tensor has once the load adapters are through with it: a
/// Linear weight transposed (Microsoft's projection already is), Microsoft's vocabulary
/// rows padded to the native count.
pub fn adapted_shape(
    layout: Layout,
    burn_path: &str,
    shape: &[usize],
    in_linear: bool,
    vocab: usize,
) -> Vec<usize> {
    let mut s = shape.to_vec();
    let ms_projection = layout == Layout::Microsoft && burn_path == PROJECTION;
    if in_linear && s.len() == 2 && burn_path.ends_with(".weight") && !ms_projection {
        s.reverse();
    }
    if layout == Layout::Microsoft && burn_path == SHARED && s.len() == 2 {
        s[0] = s[0].max(vocab);
    }
    s
}

/// A released Florence-2 checkpoint on the Hugging Face hub (transformers-native layout).
pub struct FlorencePin {
    /// Its name in `marquee models fetch`.
    pub name: &'static str,
    /// The hub repository.
    pub repo: &'static str,
    /// A commit of the repo, and the sha256 of its `model.safetensors` at that commit.
    /// `None` until someone with access to the hub has recorded them: we never pin by
    /// guesswork, so then `fetch` asks for both on the command line.
    pub revision: Option<&'static str>,
    /// See `revision`.
    pub weights_sha256: Option<&'static str>,
    /// Its licence.
    pub licence: &'static str,
}

/// The Florence-2 checkpoints `marquee models fetch` knows.
pub const FLORENCE_PINS: [FlorencePin; 2] = [
    FlorencePin {
        name: "florence-2-base",
        repo: "florence-community/Florence-2-base",
        revision: None,
        weights_sha256: None,
        licence: "MIT",
    },
    FlorencePin {
        name: "florence-2-large",
        repo: "florence-community/Florence-2-large",
        revision: None,
        weights_sha256: None,
        licence: "MIT",
    },
];

const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "model.safetensors",
];

/// Downloads a checkpoint folder at a pinned revision into `out`, checking the weights'
/// sha256 before anything is renamed into place. For users with internet; no test calls
/// it with the network.
pub fn fetch(name: &str, out: &Path, revision: Option<&str>, sha256: Option<&str>) -> Result<()> {
    let pin = FLORENCE_PINS
        .iter()
        .find(|p| p.name == name)
        .with_context(|| {
            format!("unknown model {name:?}: use florence-2-base or florence-2-large")
        })?;
    let (Some(revision), Some(sha256)) = (revision.or(pin.revision), sha256.or(pin.weights_sha256))
    else {
        bail!(
            "no revision and sha256 are pinned for {name} in this build: pass --revision COMMIT --sha256 HEX (of model.safetensors, from https://huggingface.co/{}/tree/COMMIT)",
            pin.repo
        );
    };
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .build()
        .new_agent();
    for file in MODEL_FILES {
        let url = format!(
            "https://huggingface.co/{}/resolve/{revision}/{file}",
            pin.repo
        );
        let part = out.join(format!("{file}.part"));
        let digest = download(&agent, &url, &part)?;
        if file == "model.safetensors" && !digest.eq_ignore_ascii_case(sha256) {
            let _ = std::fs::remove_file(&part);
            bail!("{url}: sha256 {digest} is not the pinned {sha256}");
        }
        std::fs::rename(&part, out.join(file))?;
    }
    Ok(())
}

fn download(agent: &ureq::Agent, url: &str, to: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let total = resp.body().content_length().unwrap_or(0);
    let bar =
        crate::util::progress::Stage::start(url.rsplit('/').next().unwrap_or("download"), total);
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut file = std::io::BufWriter::new(std::fs::File::create(to)?);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).with_context(|| url.to_string())?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    file.flush()?;
    drop(bar);
    Ok(hex::encode(hash.finalize()))
}
