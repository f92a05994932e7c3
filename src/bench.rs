//! `marquee bench`: per-poster latency of a model, batch 1, as the appliance runs it.
//! Percentiles per stage over repeated runs after a warm-up, load time, and peak RSS.

use crate::classify::Classifier;
use crate::model::cache::CacheDir;
use anyhow::Result;
use burn::prelude::*;
use image::RgbImage;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
}

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

pub fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.5),
        p90: at(0.9),
    }
}

/// Threads the CPU backends use: rayon's pool, which `RAYON_NUM_THREADS` sets.
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Peak resident set of this process (Linux `VmHWM`), in MB; 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
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
        total_ms: percentiles(total),
        stages: stages
            .into_iter()
            .map(|(k, v)| (k, percentiles(v)))
            .collect(),
        peak_rss_mb: peak_rss_mb(),
    })
}
