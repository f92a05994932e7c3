//! `marquee eval`: a model directory scored end to end (decode, towers, fusion) on a
//! manifest's rows, one poster at a time as the appliance sees them.

use super::manifest::{Manifest, Row, multi_hot};
use super::metrics::{Report, report};
use crate::infer::Classifier;
use crate::model::cache::CacheDir;
use crate::preprocess::image::{MAX_BYTES, decode};
use crate::util::limited::read_file;
use crate::util::progress::{Stage, note};
use anyhow::{Result, bail};
use burn::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What `marquee eval` prints: the F1 report, the model and its latency.
#[derive(Debug, Serialize)]
pub struct EvalOutput {
    /// Micro, macro, weighted and samples F1, and each genre's.
    #[serde(flatten)]
    pub report: Report,
    /// The model's id and version (`id@version`).
    pub model: String,
    /// Mean end-to-end latency of `classify` (decode to prediction), batch 1.
    pub ms_per_sample: f64,
    /// Rows whose poster could not be read or decoded (not scored).
    pub skipped: usize,
}

/// Evaluates a model directory end to end on a manifest's rows (of `split`, or all).
/// With `text_less`, the overviews are withheld: the kiosk case.
pub fn run(
    manifest_path: &Path,
    split: Option<&str>,
    model_dir: &Path,
    text_less: bool,
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
    let rows = dedupe(rows);
    let classifier = Classifier::load(model_dir, cache, device)?;
    let labels = classifier.labels().to_vec();
    let unknown: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| &r.genres)
        .filter(|g| !labels.contains(g))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        note(&format!(
            "labels the model does not know are not scored: {}",
            unknown.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let k = labels.len();
    let pb = Stage::start("eval", rows.len() as u64);
    let mut pred = Vec::with_capacity(rows.len() * k);
    let mut scored = Vec::with_capacity(rows.len());
    let mut skipped = Vec::new();
    let mut total_ms = 0.0;
    for row in &rows {
        pb.inc(1);
        // One unreadable poster is reported and skipped, never the end of the run.
        let path = manifest.poster_path(row);
        let bytes = match read_file(&path, MAX_BYTES) {
            Ok(b) => b,
            Err(e) => {
                skipped.push(format!("{}: {e}", row.id));
                continue;
            }
        };
        let start = Instant::now();
        let img = match decode(&bytes) {
            Ok(i) => i,
            Err(e) => {
                skipped.push(format!("{}: {e}", row.id));
                continue;
            }
        };
        let overview = Some(row.overview.as_str()).filter(|s| !text_less && !s.trim().is_empty());
        let p = classifier.classify(&img, overview, row.caption.as_deref())?;
        total_ms += start.elapsed().as_secs_f64() * 1e3;
        pred.extend(labels.iter().map(|l| p.predicted.contains(l) as u8));
        scored.push(row.clone());
    }
    drop(pb);
    if !skipped.is_empty() {
        note(&format!(
            "{} of {} posters skipped (unreadable); the first: {}",
            skipped.len(),
            rows.len(),
            skipped[0]
        ));
    }
    if scored.is_empty() {
        bail!("no poster of the {} rows could be read", rows.len());
    }
    let rows = scored;
    let report = report(&pred, &multi_hot(&rows, &labels), &labels);
    let spec = &classifier.model.spec;
    Ok(EvalOutput {
        report,
        model: format!("{}@{}", spec.id, spec.version),
        ms_per_sample: total_ms / rows.len() as f64,
        skipped: skipped.len(),
    })
}

/// Rows with a repeated id are scored once (a manifest of duplicates is said, not
/// silently run in full).
fn dedupe(rows: Vec<Row>) -> Vec<Row> {
    let n = rows.len();
    let mut seen = std::collections::HashSet::new();
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| seen.insert(r.id.clone()))
        .collect();
    if rows.len() < n {
        note(&format!(
            "{} duplicate rows (a repeated id) skipped",
            n - rows.len()
        ));
    }
    rows
}
