//! `marquee bench florence base|large`: the full-size architecture with random
//! weights (fp32, batch 1, one 768x768 image, the `<CAPTION>` prompt), timed per
//! stage as the reference kit's PyTorch figures were: vision (DaViT + projector), the
//! text encoder over 577 + 8 tokens, decoder step 0 (which also projects the cross K/V),
//! and steps 1-31 with the KV cache (lm_head and argmax included). The ratios are
//! against the kit's `bench_base_cpu.json` (PyTorch 2.15, 2 threads, sdpa).

use crate::caption::local::sync;
use crate::nn::florence::Florence2;
use crate::nn::florence::config::FlorenceConfig;
use crate::util::progress::Stage;
use crate::util::stats::{Percentiles, peak_rss_mb, threads};
use anyhow::{Result, bail};
use burn::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// `<s> What does the image describe? </s>` with the real Florence tokenizer.
const CAPTION_PROMPT: [i64; 8] = [0, 2264, 473, 5, 2274, 6190, 116, 2];
const DECODER_STEPS: usize = 31;

/// What `marquee bench florence` measures.
#[derive(Debug, Serialize)]
pub struct FlorenceBench {
    /// base or large.
    pub size: String,
    /// The backend it ran on.
    pub backend: String,
    /// Threads of the CPU pool.
    pub threads: usize,
    /// Parameters of the network.
    pub params: usize,
    /// Building the network with random weights.
    pub init_ms: f64,
    /// Seconds per stage, p50/p90; decoder figures are per step.
    pub stages_s: BTreeMap<String, Percentiles>,
    /// burn p50 / PyTorch median, per stage (< 1 = faster than PyTorch).
    pub ratio_vs_pytorch: BTreeMap<String, f64>,
    /// PyTorch's medians from the reference file, per stage (seconds).
    pub pytorch_s: BTreeMap<String, f64>,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
}

/// PyTorch medians from the kit: the first 2-thread sdpa run.
fn pytorch_anchors(path: &Path) -> Result<BTreeMap<String, f64>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let run = v["runs"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|x| x["threads"] == 2 && x["attn_implementation"] == "sdpa")
        })
        .ok_or_else(|| anyhow::anyhow!("{}: no 2-thread sdpa run", path.display()))?;
    let mut out = BTreeMap::new();
    for (ours, theirs) in [
        ("vision", "vision_s"),
        ("text_encoder", "text_encoder_s"),
        ("decoder_step0", "decoder_step0"),
        ("decoder_step", "decoder_step_steps1to31"),
        ("lm_head", "lm_head_only_s"),
    ] {
        if let Some(x) = run[theirs]["wall_median"].as_f64() {
            out.insert(ours.to_string(), x);
        }
    }
    Ok(out)
}

/// Builds Florence-2 of `size` with random weights and times its stages `runs` times.
pub fn run(
    size: &str,
    device: &Device,
    backend: &str,
    runs: usize,
    reference: Option<&Path>,
) -> Result<FlorenceBench> {
    let config = match size {
        "base" => FlorenceConfig::base(),
        "large" => FlorenceConfig::large(),
        other => bail!("unknown Florence-2 size {other:?}: use base or large"),
    };
    let runs = runs.max(1);
    let bar = Stage::start("florence bench", (3 + 4 * runs) as u64);
    bar.message("random init");
    let t = Instant::now();
    device.seed(7);
    let model = Florence2::new(&config, device);
    let params = model.num_params();
    let side = 768;
    let pixels = Tensor::<4>::random(
        [1, 3, side, side],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let prompt = Tensor::<1, Int>::from_data(TensorData::new(CAPTION_PROMPT.to_vec(), [8]), device)
        .reshape([1, 8]);
    let mask = Tensor::<2>::ones([1, 8], device);
    // Warm-up through every stage, which also materialises the lazy random weights
    // (otherwise the first timed run of each stage would include their generation).
    let image = sync(model.encode_image(pixels.clone()));
    let (embeds, enc_mask) = model.merge(image, prompt.clone(), mask.clone());
    let encoded = sync(model.encode(embeds.clone(), enc_mask.clone()));
    let mut cache = model.start(encoded, enc_mask.clone());
    let two = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64], [1, 1]), device);
    let _ = model.decode_logits(two, &mut cache).into_data();
    let init_ms = t.elapsed().as_secs_f64() * 1e3;
    bar.inc(3);

    let mut stages: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut time = |name: &str, secs: f64| stages.entry(name.into()).or_default().push(secs);
    for _ in 0..runs {
        bar.message("vision");
        let t = Instant::now();
        let image = sync(model.encode_image(pixels.clone()));
        time("vision", t.elapsed().as_secs_f64());
        bar.inc(1);
        let _ = image;

        bar.message("text encoder");
        let t = Instant::now();
        let encoded = sync(model.encode(embeds.clone(), enc_mask.clone()));
        time("text_encoder", t.elapsed().as_secs_f64());
        bar.inc(1);

        bar.message("decoder");
        let mut token = 2i64;
        let t = Instant::now();
        let mut cache = model.start(encoded, enc_mask.clone());
        let next = |token: i64, cache: &mut _| -> i64 {
            let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![token], [1, 1]), device);
            let logits = model.decode_logits(ids, cache);
            logits
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(2)
        };
        token = next(token, &mut cache);
        time("decoder_step0", t.elapsed().as_secs_f64());
        bar.inc(1);
        for _ in 0..DECODER_STEPS {
            let t = Instant::now();
            token = next(token, &mut cache);
            time("decoder_step", t.elapsed().as_secs_f64());
        }
        bar.inc(1);
    }
    drop(bar);

    let pytorch = match reference {
        Some(p) if p.is_file() => pytorch_anchors(p)?,
        _ => BTreeMap::new(),
    };
    let stages_s: BTreeMap<String, Percentiles> = stages
        .into_iter()
        .map(|(k, v)| (k, Percentiles::of(v)))
        .collect();
    let ratio_vs_pytorch = if size == "base" {
        stages_s
            .iter()
            .filter_map(|(k, p)| pytorch.get(k).map(|t| (k.clone(), p.p50 / t)))
            .collect()
    } else {
        BTreeMap::new()
    };
    Ok(FlorenceBench {
        size: size.into(),
        backend: backend.into(),
        threads: threads(),
        params,
        init_ms,
        stages_s,
        ratio_vs_pytorch,
        pytorch_s: pytorch,
        peak_rss_mb: peak_rss_mb(),
    })
}
