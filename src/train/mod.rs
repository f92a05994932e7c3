//! Training and evaluation on a manifest: feature cache, trainer, metrics.
//! Reuses `nn` and `preprocess` through `classify::Encoder`, so training and
//! inference compute features the same way.

pub mod features;
pub mod manifest;
pub mod metrics;
pub mod trainer;

use crate::classify::{Classifier, Encoder};
use crate::model::cache::CacheDir;
use crate::model::dir::{ImageInput, ModelDir, ModelSpec};
use crate::model::towers::Towers;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::nn::head::HeadConfig;
use crate::preprocess::image::decode;
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use features::{Features, extract};
use manifest::{Manifest, Row, multi_hot, stable_hash};
use metrics::{Report, decide_all, report};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use trainer::{TrainOptions, score, train_head};

/// The 18 genres, in the order every model output uses (posters-v1 `genres.txt`).
pub const GENRES: [&str; 18] = [
    "Action",
    "Adventure",
    "Animation",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Family",
    "Fantasy",
    "History",
    "Horror",
    "Music",
    "Mystery",
    "Romance",
    "Science Fiction",
    "Thriller",
    "War",
    "Western",
];

/// Whole posters, at the towers' native width and the posters' 2:3 aspect.
pub const IMAGE_INPUT: ImageInput = ImageInput {
    width: 224,
    height: 336,
};
/// Names the feature recipe; change it whenever features would change.
pub const FEATURE_RECIPE: &str = "v1 effnet-lite0 224x336 catmullrom | minilm-l6 mean-pool 128";
/// One training film in this many is held out to pick the epoch and tune thresholds.
const TUNE_EVERY: u64 = 10;

pub fn labels() -> Vec<String> {
    GENRES.iter().map(|s| s.to_string()).collect()
}

/// Splits training rows by film into (fit, tune): val is never used for any choice.
pub fn fit_tune_split(rows: &[Row]) -> (Vec<Row>, Vec<Row>) {
    rows.iter()
        .cloned()
        .partition(|r| !stable_hash(&r.film).is_multiple_of(TUNE_EVERY))
}

/// Which modalities a head variant reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Variant {
    Fused,
    PosterOnly,
    TextOnly,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Fused => "fused",
            Variant::PosterOnly => "poster-only",
            Variant::TextOnly => "text-only",
        }
    }

    fn config(self) -> HeadConfig {
        HeadConfig {
            image_dim: FEATURE_DIM,
            text_dim: crate::classify::TEXT_DIM,
            use_image: self != Variant::TextOnly,
            use_text: self != Variant::PosterOnly,
            hidden: 512,
            classes: GENRES.len(),
            dropout: 0.3,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VariantResult {
    pub variant: &'static str,
    pub best_epoch: usize,
    pub tune_macro_f1: f64,
    pub val: Report,
}

pub struct TrainRun {
    pub results: Vec<VariantResult>,
}

fn features_for(
    encoder: &Encoder,
    manifest: &Manifest,
    rows: &[Row],
    cache: &CacheDir,
) -> Result<Features> {
    extract(encoder, manifest, rows, &cache.features(), FEATURE_RECIPE)
}

/// Trains the fused head and the two single-modality ablations, writes the fused one
/// to `out`, and reports all three on the val split.
pub fn run_train(
    manifest_path: &Path,
    out: &Path,
    cache: &CacheDir,
    device: &Device,
    opts: &TrainOptions,
) -> Result<TrainRun> {
    let manifest = Manifest::load(manifest_path)?;
    let labels = labels();
    let (fit, tune) = fit_tune_split(&manifest.split(Some("train")));
    let val = manifest.split(Some("val"));
    if fit.is_empty() || tune.is_empty() {
        bail!(
            "manifest {} has too few training rows",
            manifest_path.display()
        );
    }
    let encoder = Encoder {
        towers: Towers::load(cache, device)?,
        image_input: IMAGE_INPUT,
        device: device.clone(),
    };
    eprintln!(
        "extracting features: {} fit, {} tune, {} val rows",
        fit.len(),
        tune.len(),
        val.len()
    );
    let f_fit = features_for(&encoder, &manifest, &fit, cache)?;
    let f_tune = features_for(&encoder, &manifest, &tune, cache)?;
    let f_val = features_for(&encoder, &manifest, &val, cache)?;
    let (y_fit, y_tune, y_val) = (
        multi_hot(&fit, &labels),
        multi_hot(&tune, &labels),
        multi_hot(&val, &labels),
    );

    let mut results = Vec::new();
    for variant in [Variant::Fused, Variant::PosterOnly, Variant::TextOnly] {
        eprintln!("training the {} head", variant.name());
        let config = variant.config();
        let trained = train_head(
            &config,
            (&f_fit, &y_fit),
            (&f_tune, &y_tune),
            &labels,
            opts,
            device,
        );
        let scores = score(&trained.head, &f_val, device);
        let val_report = report(&decide_all(&scores, &trained.thresholds), &y_val, &labels);
        if variant == Variant::Fused {
            let spec = ModelSpec {
                id: "marquee-fusion-head".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                labels: labels.clone(),
                thresholds: trained.thresholds.clone(),
                head: config,
                image_input: IMAGE_INPUT,
                training: serde_json::json!({
                    "manifest": "posters-v1 (train split; 1 film in 10 held out for tuning)",
                    "rows_fit": fit.len(), "rows_tune": tune.len(),
                    "best_epoch": trained.best_epoch, "options": opts,
                    "feature_recipe": FEATURE_RECIPE, "captions": "none",
                }),
            };
            ModelDir {
                spec,
                head: trained.head,
            }
            .save(out)?;
        }
        results.push(VariantResult {
            variant: variant.name(),
            best_epoch: trained.best_epoch,
            tune_macro_f1: trained.tune_macro_f1,
            val: val_report,
        });
    }
    Ok(TrainRun { results })
}

#[derive(Debug, Serialize)]
pub struct EvalOutput {
    #[serde(flatten)]
    pub report: Report,
    pub model: String,
    /// Mean end-to-end latency of `classify` (decode to prediction), batch 1.
    pub ms_per_sample: f64,
}

/// Evaluates a model directory on a manifest's rows (of one split, if given).
pub fn run_eval(
    manifest_path: &Path,
    split: Option<&str>,
    model_dir: &Path,
    cache: &CacheDir,
    device: &Device,
) -> Result<EvalOutput> {
    let manifest = Manifest::load(manifest_path)?;
    let rows = manifest.split(split);
    if rows.is_empty() {
        bail!(
            "no rows in split {:?} of {}",
            split.unwrap_or("*"),
            manifest_path.display()
        );
    }
    let model = ModelDir::load(model_dir, device)?;
    let towers = Towers::load(cache, device)?;
    let classifier = Classifier::new(towers, model, device.clone());
    let labels = classifier.labels().to_vec();
    let feats = features_for(&classifier.encoder, &manifest, &rows, cache)?;
    let scores = score(&classifier.model.head, &feats, device);
    let report = report(
        &decide_all(&scores, &classifier.model.spec.thresholds),
        &multi_hot(&rows, &labels),
        &labels,
    );
    let ms_per_sample = latency(&classifier, &manifest, &rows)?;
    let spec = &classifier.model.spec;
    Ok(EvalOutput {
        report,
        model: format!("{}@{}", spec.id, spec.version),
        ms_per_sample,
    })
}

/// Times full `classify` calls on a few rows (features above may have come from cache).
fn latency(classifier: &Classifier, manifest: &Manifest, rows: &[Row]) -> Result<f64> {
    let sample: Vec<&Row> = rows.iter().take(8).collect();
    let mut total = 0.0;
    for row in &sample {
        let path = manifest.poster_path(row);
        let start = Instant::now();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let img = decode(&bytes).with_context(|| format!("poster of {}", row.id))?;
        let overview = Some(row.overview.as_str()).filter(|s| !s.trim().is_empty());
        classifier.classify(&img, overview, None)?;
        total += start.elapsed().as_secs_f64() * 1e3;
    }
    Ok(total / sample.len() as f64)
}
