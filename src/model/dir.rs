//! A model directory: `model.json` (labels, thresholds, network shapes, input recipe)
//! beside the fusion networks' weights, and, for a bundled model, the towers and the
//! tokenizer too. The shipped student in models/ is bundled, so it runs with no
//! network and no cache; the teacher reads the full towers from the cache.

use super::towers::{load_burnpack, save_burnpack};
use crate::nn::fusion::{EarlyFusion, FusionConfig};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The spec's file name in a model directory.
pub const SPEC_FILE: &str = "model.json";

/// How posters are resized before the image tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInput {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Where a model's towers come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerSource {
    /// `image_tower.safetensors`, `text_tower.safetensors` and `tokenizer.json` in the folder.
    Bundled {
        /// The bundled MiniLM's vocabulary size (cut to the training texts).
        vocab_size: usize,
        /// The bundled MiniLM's longest input.
        max_positions: usize,
    },
    /// The converted pretrained towers in the cache (`marquee models fetch`).
    Cache,
}

/// Everything about a trained model except its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The model's name.
    pub id: String,
    /// The Marquee version that trained it.
    pub version: String,
    /// The genres, in score order.
    pub labels: Vec<String>,
    /// Per-genre thresholds on the sigmoid score when the input has text.
    pub thresholds: Vec<f32>,
    /// Per-genre thresholds for text-less input (a kiosk scan with no overview).
    pub thresholds_text_less: Vec<f32>,
    /// The fusion networks' shape.
    pub fusion: FusionConfig,
    /// Networks whose scores are averaged (`fusion_0` …).
    pub members: usize,
    /// Also score the mirror image of the poster and average.
    pub tta_flip: bool,
    /// The same for a poster that comes without text (the kiosk case), whose
    /// thresholds were tuned on such scores; there the skipped text tower pays for
    /// part of the second view.
    #[serde(default)]
    pub tta_flip_text_less: bool,
    /// The poster size the image tower reads.
    pub image_input: ImageInput,
    /// MiniLM layers the text tokens pass through.
    pub text_layers: usize,
    /// Where the towers come from.
    pub towers: TowerSource,
    /// Free-form facts about training (seed, epochs, data), for the model card.
    #[serde(default)]
    pub training: serde_json::Value,
}

impl ModelSpec {
    /// Checks the spec against itself (grid, heads, thresholds, members).
    pub fn validate(&self) -> Result<()> {
        let k = self.fusion.classes;
        if self.labels.len() != k
            || self.thresholds.len() != k
            || self.thresholds_text_less.len() != k
        {
            bail!(
                "model.json: {} labels, {} and {} thresholds for a network of {k} classes",
                self.labels.len(),
                self.thresholds.len(),
                self.thresholds_text_less.len(),
            );
        }
        if !(1..=16).contains(&self.members) || !(1..=6).contains(&self.text_layers) {
            bail!("model.json: members must be 1..=16 and text_layers 1..=6");
        }
        let ImageInput { width, height } = self.image_input;
        if !(32..=2048).contains(&width) || !(32..=2048).contains(&height) {
            bail!("model.json: image_input {width}x{height} is outside 32..=2048 per side");
        }
        // The tower's feature map (stride 32, TF-SAME rounding up) must be the grid
        // the fusion network was built for, or the first poster would trip an assert.
        let grid = [height.div_ceil(32) as usize, width.div_ceil(32) as usize];
        if grid != self.fusion.image_grid {
            bail!(
                "model.json: image_input {width}x{height} makes a {}x{} feature map, but fusion.image_grid is {:?}",
                grid[0],
                grid[1],
                self.fusion.image_grid
            );
        }
        let f = &self.fusion;
        if f.d_model == 0 || f.heads == 0 || !f.d_model.is_multiple_of(f.heads) || f.d_ff == 0 {
            bail!(
                "model.json: fusion.d_model {} must be a positive multiple of fusion.heads {}, and d_ff positive",
                f.d_model,
                f.heads
            );
        }
        if let Some(t) = self
            .thresholds
            .iter()
            .chain(&self.thresholds_text_less)
            .find(|t| !(0.0..=1.0).contains(*t))
        {
            bail!("model.json: threshold {t} is outside 0..=1");
        }
        Ok(())
    }
}

/// Member `i`'s weights file.
pub fn member_file(i: usize) -> String {
    format!("fusion_{i}.bpk")
}

/// Member `i`'s tuned MiniLM layers, in a teacher that tunes them (training only).
pub fn top_file(i: usize) -> String {
    format!("text_top_{i}.bpk")
}

/// Member `i`'s tuned EfficientNet blocks and head, in a teacher that tunes them
/// (training only).
pub fn tail_file(i: usize) -> String {
    format!("image_tail_{i}.bpk")
}

/// The fusion networks of a model and their spec.
pub struct ModelDir {
    /// Everything but the weights.
    pub spec: ModelSpec,
    /// The fusion networks, one per member.
    pub members: Vec<EarlyFusion>,
}

impl ModelDir {
    /// Reads and checks a directory's model.json.
    pub fn load_spec(dir: &Path) -> Result<ModelSpec> {
        let spec_path = dir.join(SPEC_FILE);
        let text = std::fs::read_to_string(&spec_path)
            .with_context(|| format!("no model at {} (missing {SPEC_FILE})", dir.display()))?;
        let spec: ModelSpec = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", spec_path.display()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Loads a model directory's spec and fusion networks.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let spec = Self::load_spec(dir)?;
        let members = (0..spec.members)
            .map(|i| {
                let mut m = EarlyFusion::new(&spec.fusion, device);
                load_burnpack(&mut m, &dir.join(member_file(i)))?;
                Ok(m)
            })
            .collect::<Result<_>>()?;
        Ok(Self { spec, members })
    }

    /// Writes the spec and the members' weights to `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(&self.spec)?;
        std::fs::write(dir.join(SPEC_FILE), json + "\n")?;
        for (i, m) in self.members.iter().enumerate() {
            save_burnpack(m, &dir.join(member_file(i)))?;
        }
        Ok(())
    }
}

/// Where the .deb installs the bundled model.
pub const INSTALLED_MODEL_DIR: &str = "/usr/share/marquee/models";

/// `MARQUEE_MODEL`, else `./models` (a checkout), else the installed package's.
/// When none holds a model, `./models`, so that the error names it.
pub fn default_model_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MARQUEE_MODEL") {
        return p.into();
    }
    for dir in ["models", INSTALLED_MODEL_DIR] {
        if Path::new(dir).join(SPEC_FILE).is_file() {
            return dir.into();
        }
    }
    PathBuf::from("models")
}
