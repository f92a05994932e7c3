//! A model directory (models/ by default): `model.json` (labels, thresholds, head
//! shape, input recipe) beside `head.bpk` (the head's weights, burnpack).

use super::towers::{load_burnpack, save_burnpack};
use crate::nn::head::{FusionHead, HeadConfig};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const SPEC_FILE: &str = "model.json";
pub const HEAD_FILE: &str = "head.bpk";

/// How posters are resized before the image tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInput {
    pub width: u32,
    pub height: u32,
}

/// Everything about a trained head except its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    pub id: String,
    pub version: String,
    pub labels: Vec<String>,
    /// Per-genre decision thresholds on the sigmoid score, tuned on held-out training films.
    pub thresholds: Vec<f32>,
    pub head: HeadConfig,
    pub image_input: ImageInput,
    /// Free-form facts about training (seed, epochs, data), for the model card.
    #[serde(default)]
    pub training: serde_json::Value,
}

impl ModelSpec {
    pub fn validate(&self) -> Result<()> {
        if self.labels.len() != self.head.classes || self.thresholds.len() != self.head.classes {
            bail!(
                "model.json: {} labels and {} thresholds for a head of {} classes",
                self.labels.len(),
                self.thresholds.len(),
                self.head.classes
            );
        }
        Ok(())
    }
}

pub struct ModelDir {
    pub spec: ModelSpec,
    pub head: FusionHead,
}

impl ModelDir {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let spec_path = dir.join(SPEC_FILE);
        let text = std::fs::read_to_string(&spec_path)
            .with_context(|| format!("no model at {} (missing {SPEC_FILE})", dir.display()))?;
        let spec: ModelSpec = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", spec_path.display()))?;
        spec.validate()?;
        let mut head = FusionHead::new(&spec.head, device);
        load_burnpack(&mut head, &dir.join(HEAD_FILE))?;
        Ok(Self { spec, head })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(&self.spec)?;
        std::fs::write(dir.join(SPEC_FILE), json + "\n")?;
        save_burnpack(&self.head, &dir.join(HEAD_FILE))
    }
}

/// The models/ folder of this checkout, found beside the binary's source tree, else
/// `./models`. `MARQUEE_MODEL` overrides.
pub fn default_model_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MARQUEE_MODEL") {
        return p.into();
    }
    let here = PathBuf::from("models");
    if here.join(SPEC_FILE).is_file() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}
