//! `marquee bench`: per-poster latency of a model, batch 1, as the appliance runs it.
//! Percentiles per stage over repeated runs after a warm-up, load time, and peak RSS.

use crate::infer::Classifier;
use crate::model::cache::CacheDir;
use crate::util::stats::{Percentiles, peak_rss_mb, threads};
use anyhow::Result;
use burn::prelude::*;
use image::RgbImage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub threads: usize,
    pub model: String,
    pub runs: usize,
    pub load_ms: f64,
    pub total_ms: Percentiles,
    pub stages: BTreeMap<String, Percentiles>,
    pub peak_rss_mb: f64,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    model_dir: &Path,
    cache: &CacheDir,
    device: &Device,
    backend: &str,
    poster: &RgbImage,
    overview: Option<&str>,
    runs: usize,
) -> Result<BenchReport> {
    let start = Instant::now();
    let classifier = Classifier::load(model_dir, cache, device)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    // Warm-up: first calls pay for allocation and kernel set-up.
    for _ in 0..2 {
        classifier.classify(poster, overview, None)?;
    }
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..runs.max(1) {
        let p = classifier.classify(poster, overview, None)?;
        for (name, ms) in p.timings_ms {
            stages.entry(name).or_default().push(ms);
        }
    }
    let total = stages.remove("total").unwrap_or_default();
    let spec = &classifier.model.spec;
    Ok(BenchReport {
        backend: backend.to_string(),
        threads: threads(),
        model: format!("{}@{}", spec.id, spec.version),
        runs: runs.max(1),
        load_ms,
        total_ms: Percentiles::of(total),
        stages: stages
            .into_iter()
            .map(|(k, v)| (k, Percentiles::of(v)))
            .collect(),
        peak_rss_mb: peak_rss_mb(),
    })
}
