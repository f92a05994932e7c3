//! `marquee bench`: per-poster latency of the genre model, or with `florence SIZE`,
//! Florence-2's stages against the reference kit's PyTorch figures.

use super::Global;
use super::args::{BenchArgs, BenchCommand};
use super::report::Report;
use anyhow::{Context, Result};
use marquee::bench::BenchReport;
use marquee::caption::bench::FlorenceBench;
use marquee::model::dir::default_model_dir;
use serde::Serialize;
use std::fmt;

/// A made-up plot of typical length, so the bench exercises the text tower.
const BENCH_OVERVIEW: &str = "A retired detective is pulled back into one last case when a string of \
    robberies across the city mirrors the crimes of a gang he put away twenty years ago. \
    With an ambitious young partner and a daughter who wants him home, he must decide how \
    far he will go before the past catches up with both of them.";

/// Timed Florence-2 runs unless `--runs` says otherwise: each takes seconds.
const FLORENCE_RUNS: usize = 3;

#[derive(Serialize)]
#[serde(transparent)]
pub struct ModelBench(BenchReport);

impl fmt::Display for ModelBench {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let r = &self.0;
        write!(
            f,
            "{} on {} ({} threads): total p50 {:.1} ms, p90 {:.1} ms; load {:.0} ms; \
             batch {} {:.1} posters/s; peak RSS {:.0} MB; overview {} tokens",
            r.model,
            r.backend,
            r.threads,
            r.total_ms.p50,
            r.total_ms.p90,
            r.load_ms,
            marquee::bench::BATCH,
            r.batch8_posters_per_s,
            r.peak_rss_mb,
            r.text_tokens
        )?;
        for (k, v) in &r.stages {
            write!(f, "\n  {k:<12} p50 {:.1} ms  p90 {:.1} ms", v.p50, v.p90)?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
#[serde(transparent)]
pub struct FlorenceReport {
    #[serde(skip)]
    runs: usize,
    bench: FlorenceBench,
}

impl fmt::Display for FlorenceReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let r = &self.bench;
        write!(
            f,
            "Florence-2-{} ({:.0} M params, random weights) on {} ({} threads), p50 of {}:",
            r.size,
            r.params as f64 / 1e6,
            r.backend,
            r.threads,
            self.runs
        )?;
        for (k, v) in &r.stages_s {
            let vs = match (r.ratio_vs_pytorch.get(k), r.pytorch_s.get(k)) {
                (Some(x), Some(t)) => format!("  PyTorch {t:.4} s -> {x:.2}x"),
                _ => String::new(),
            };
            write!(f, "\n  {k:<14} {:.4} s (p90 {:.4}){vs}", v.p50, v.p90)?;
        }
        Ok(())
    }
}

pub fn run(a: BenchArgs, g: &Global) -> Result<Box<dyn Report>> {
    let (backend, device) = g.backend.select()?;
    if let Some(BenchCommand::Florence(f)) = a.florence {
        let runs = f.runs.unwrap_or(FLORENCE_RUNS);
        let bench = marquee::caption::bench::run(
            f.size.name(),
            &device,
            backend.name(),
            runs,
            f.reference.as_deref(),
        )?;
        return Ok(Box::new(FlorenceReport { runs, bench }));
    }
    let model_dir = a.model.unwrap_or_else(default_model_dir);
    let bytes = marquee::util::limited::read_file(&a.poster, marquee::preprocess::image::MAX_BYTES)
        .with_context(|| format!("--poster {}", a.poster.display()))?;
    let overview = a.overview.unwrap_or_else(|| BENCH_OVERVIEW.to_string());
    let overview = (!a.text_less).then_some(overview.as_str());
    let r = marquee::bench::run(
        &model_dir,
        &g.cache,
        &device,
        backend.name(),
        &bytes,
        overview,
        a.runs,
    )?;
    Ok(Box::new(ModelBench(r)))
}
