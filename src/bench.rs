//! `marquee bench`: per-poster latency of a model at batch 1, as the appliance runs
//! it: percentiles per stage over warm runs, cold load time, a 128-token text tower
//! run, throughput at batch 8, and peak RSS.

use crate::infer::batch::{FusionRow, TEXT_DIM, batch};
use crate::infer::classifier::Schedule;
use crate::infer::classifier::{image_input, tower_tokens};
use crate::infer::{Classifier, image_tokens, text_tokens};
use crate::model::cache::CacheDir;
use crate::nn::cpu_ops::host_device;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::nn::host_ops::{Dense, host};
use crate::preprocess::image::decode;
use crate::preprocess::text::MAX_TOKENS;
use crate::util::progress::Stage;
use crate::util::stats::{Percentiles, peak_rss_mb, threads};
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::sigmoid;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Posters in the throughput batch.
pub const BATCH: usize = 8;

/// What `marquee bench` measures of the genre model, per poster at batch 1.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The backend it ran on.
    pub backend: String,
    /// Threads of the CPU pool.
    pub threads: usize,
    /// The model's id and version.
    pub model: String,
    /// Timed runs (after two warm-up runs).
    pub runs: usize,
    /// Reading the model folder and building the networks, cold.
    pub load_ms: f64,
    /// decode + classify, per poster, as served (the towers overlapped on a CPU).
    pub total_ms: Percentiles,
    /// decode, preprocess, image_tower, tokenize, text_tower, fusion, each timed within
    /// the poster (the towers in sequence), their sum as `total_sequential`;
    /// image_tower_alone and text_tower_alone (each tower run over and over by itself,
    /// as a peer times one network alone), and text_tower_128 (the tower alone on a
    /// full 128-token text).
    pub stages: BTreeMap<String, Percentiles>,
    /// Tokens the overview became (the typical text).
    pub text_tokens: usize,
    /// Whole posters a second at batch 8 (towers + fusion, decode excluded).
    pub batch8_posters_per_s: f64,
    /// Best rate of one 1024³ matrix product on this backend (burn's matmul, and on a
    /// CPU the host layers' GEMM): the peak the stages are held against.
    pub peak_gflops: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Loads the model and times `runs` classifications of `poster` (with `overview`).
pub fn run(
    model_dir: &Path,
    cache: &CacheDir,
    device: &Device,
    backend: &str,
    poster: &[u8],
    overview: Option<&str>,
    runs: usize,
) -> Result<BenchReport> {
    let runs = runs.max(1);
    let start = Instant::now();
    let classifier = Classifier::load(model_dir, cache, device)?;
    let load_ms = ms(start);
    let stage = Stage::start("bench", (runs + 2) as u64 * 4 + BATCH as u64);
    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut total = Vec::new();
    // Two warm-up passes: the first calls pay for allocation and kernel set-up.
    for i in 0..runs + 2 {
        let t = Instant::now();
        let img = decode(poster)?;
        let decode_ms = ms(t);
        // Each stage alone (towers in sequence), then the poster as served.
        let alone = classifier.classify_in(Schedule::Sequential, &img, overview, None)?;
        let served = classifier.classify(&img, overview, None)?;
        stage.inc(1);
        if i < 2 {
            continue;
        }
        stages.entry("decode".into()).or_default().push(decode_ms);
        for (name, t) in alone.timings_ms.stages() {
            let (name, t) = match name {
                "total" => ("total_sequential", decode_ms + t),
                "towers" => continue,
                _ => (name, t),
            };
            stages.entry(name.to_string()).or_default().push(t);
        }
        total.push(decode_ms + served.timings_ms.total);
    }
    let long = long_ids(&classifier, overview)?;
    let img = decode(poster)?;
    let ids = match overview {
        Some(s) => classifier.towers.tokenizer.encode(s)?,
        None => Vec::new(),
    };
    let spec = &classifier.model.spec;
    let (towers, layers) = (&classifier.towers, spec.text_layers);
    let x = image_input(std::slice::from_ref(&img), spec.image_input);
    // Each tower by itself, run after run, on a pool worker as a poster is: with its
    // weights and buffers warm from the run before, as a peer's session holding one
    // network is timed. The rows above are the same towers within a poster.
    let alone: [(&str, &(dyn Fn() + Sync)); 3] = [
        ("image_tower_alone", &|| {
            let t = tower_tokens(towers, x.clone(), device);
            std::hint::black_box(t.into_data());
        }),
        ("text_tower_alone", &|| {
            std::hint::black_box(text_tokens(towers, &ids, layers, device));
        }),
        ("text_tower_128", &|| {
            std::hint::black_box(text_tokens(towers, &long, layers, device));
        }),
    ];
    for (name, pass) in alone {
        let times = rayon::scope(|_| {
            let mut times = Vec::with_capacity(runs);
            for i in 0..runs + 2 {
                let t = Instant::now();
                pass();
                stage.inc(1);
                if i >= 2 {
                    times.push(ms(t));
                }
            }
            times
        });
        stages.insert(name.to_string(), times);
    }
    let mut best = f64::MAX;
    for _ in 0..BATCH {
        let t = Instant::now();
        batch_scores(&classifier, &img, &ids, BATCH);
        best = best.min(ms(t));
        stage.inc(1);
    }
    Ok(BenchReport {
        backend: backend.to_string(),
        threads: threads(),
        model: format!("{}@{}", spec.id, spec.version),
        runs,
        load_ms,
        total_ms: Percentiles::of(total),
        stages: stages
            .into_iter()
            .map(|(k, v)| (k, Percentiles::of(v)))
            .collect(),
        text_tokens: ids.len(),
        batch8_posters_per_s: BATCH as f64 / (best / 1e3),
        peak_gflops: peak_gflops(device),
        peak_rss_mb: peak_rss_mb(),
    })
}

/// The best rate of a 1024³ f32 product along the paths Marquee's networks take:
/// burn's matmul on `device`, and on a CPU device also the host layers' GEMM.
fn peak_gflops(device: &Device) -> f64 {
    const N: usize = 1024;
    const TRIES: usize = 20;
    let a = Tensor::<2>::random([N, N], Distribution::Default, device);
    let b = Tensor::<2>::random([N, N], Distribution::Default, device);
    let mut best = f64::MAX;
    for _ in 0..TRIES {
        let t = Instant::now();
        let _ = a.clone().matmul(b.clone()).into_data();
        best = best.min(t.elapsed().as_secs_f64());
    }
    if host_device(device) {
        let x = host(a);
        let layer = Dense::new(host(b), vec![0.0; N]);
        for _ in 0..TRIES {
            let t = Instant::now();
            std::hint::black_box(layer.forward(&x));
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    2.0 * (N as f64).powi(3) / best / 1e9
}

/// A full-length text: the overview (or a stock sentence) repeated past the limit,
/// then cut there by the tokenizer.
fn long_ids(c: &Classifier, overview: Option<&str>) -> Result<Vec<i64>> {
    let base = overview.unwrap_or("A story of people, places and the days between them.");
    let text = vec![base; MAX_TOKENS].join(" ");
    Ok(c.towers.tokenizer.encode(&text)?)
}

/// The text tower's hidden states of `n` copies of `ids`, read back to the host: as
/// one batch through burn's modules, or one text at a time on the host kernels
/// (which serve unpadded texts).
fn text_hidden(c: &Classifier, ids: &[i64], n: usize) -> Vec<f32> {
    let layers = c.model.spec.text_layers;
    if ids.is_empty() || c.towers.text_host.is_some() {
        return (0..n)
            .flat_map(|_| text_tokens(&c.towers, ids, layers, &c.device))
            .collect();
    }
    let l = ids.len();
    let dev = &c.device;
    let all: Vec<i64> = (0..n).flat_map(|_| ids.iter().copied()).collect();
    let idt = Tensor::<2, Int>::from_data(TensorData::new(all, [n, l]), dev);
    let mask = Tensor::<2>::ones([n, l], dev);
    c.towers
        .text
        .forward_layers(idt, mask, layers)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 hidden states")
}

/// Scores `n` copies of one poster and text as one batch through every stage.
fn batch_scores(c: &Classifier, img: &image::RgbImage, ids: &[i64], n: usize) -> Vec<f32> {
    let spec = &c.model.spec;
    let dev = &c.device;
    let images = vec![img.clone(); n];
    let tokens = image_tokens(&c.towers, &images, spec.image_input, dev)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 image tokens");
    let text = text_hidden(c, ids, n);
    let cell_len = tokens.len() / n;
    let text_len = ids.len() * TEXT_DIM;
    let rows: Vec<FusionRow<f32>> = (0..n)
        .map(|i| FusionRow {
            image: &tokens[i * cell_len..(i + 1) * cell_len],
            hide_image: false,
            text: &text[i * text_len..(i + 1) * text_len],
        })
        .collect();
    let input = batch(&rows, cell_len / FEATURE_DIM, dev);
    let mut out = Vec::new();
    for m in &c.model.members {
        out.extend(
            sigmoid(m.forward(input.clone()))
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32 scores"),
        );
    }
    out
}
