//! Trains a fusion head on cached tower features with burn autodiff on the CPU.
//! Deterministic for a given seed: batch order and modality dropout come from a
//! seeded ChaCha stream, and burn's own initialisation is seeded through the device.

use super::features::Features;
use super::metrics::{decide_all, report, tune_thresholds};
use crate::classify::{TEXT_DIM, head_input, head_scores};
use crate::nn::head::{FusionHead, HeadConfig};
use burn::module::Module;
use burn::nn::loss::BinaryCrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f32,
    pub seed: u64,
    /// Epochs without a better tune macro-F1 before stopping.
    pub patience: usize,
    /// Share of text rows whose text is hidden in a step, so the head learns poster-only.
    pub text_dropout: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 60,
            batch: 128,
            lr: 1e-3,
            weight_decay: 1e-2,
            seed: 42,
            patience: 8,
            text_dropout: 0.25,
        }
    }
}

pub struct Trained {
    pub head: FusionHead,
    pub thresholds: Vec<f32>,
    pub best_epoch: usize,
    pub tune_macro_f1: f64,
}

/// Sigmoid scores of every row of `f` under `head`, row-major `[n, classes]`.
pub fn score(head: &FusionHead, f: &Features, device: &Device) -> Vec<f32> {
    let input = head_input(f.image.clone(), f.text.clone(), f.present.clone(), device);
    head_scores(head, input)
}

pub fn train_head(
    config: &HeadConfig,
    train: (&Features, &[u8]),
    tune: (&Features, &[u8]),
    labels: &[String],
    opts: &TrainOptions,
    device: &Device,
) -> Trained {
    let k = config.classes;
    device.seed(opts.seed);
    let ad = device.clone().autodiff();
    let mut head = FusionHead::new(config, &ad);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(opts.weight_decay)
        .init();
    let loss_fn = BinaryCrossEntropyLossConfig::new()
        .with_logits(true)
        .init(&ad);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (feats, y) = train;
    let n = feats.len();
    let mut order: Vec<usize> = (0..n).collect();

    let pb = ProgressBar::new(opts.epochs as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] epoch {pos}/{len} {wide_msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut best: Option<Trained> = None;
    let mut since_best = 0;
    for epoch in 1..=opts.epochs {
        order.shuffle(&mut rng);
        for idx in order.chunks(opts.batch) {
            let mut b = feats.select(idx);
            for (i, p) in b.present.iter_mut().enumerate() {
                if *p > 0.0 && rng.random_bool(opts.text_dropout) {
                    *p = 0.0;
                    b.text[i * TEXT_DIM..(i + 1) * TEXT_DIM].fill(0.0);
                }
            }
            let targets: Vec<i64> = idx
                .iter()
                .flat_map(|&i| y[i * k..(i + 1) * k].iter().map(|&v| v as i64))
                .collect();
            let targets =
                Tensor::<2, Int>::from_data(TensorData::new(targets, [idx.len(), k]), &ad);
            let logits = head.forward(head_input(b.image, b.text, b.present, &ad));
            let loss = loss_fn.forward(logits, targets);
            let grads = GradientsParams::from_grads(loss.backward(), &head);
            head = optim.step(opts.lr, head, grads);
        }
        // Model selection on held-out training films, never on the reported split.
        let valid = head.valid();
        let scores = score(&valid, tune.0, device);
        let thresholds = tune_thresholds(&scores, tune.1, k);
        let macro_f1 = report(&decide_all(&scores, &thresholds), tune.1, labels).macro_f1;
        pb.set_message(format!("tune macro-F1 {macro_f1:.4}"));
        pb.inc(1);
        if best.as_ref().is_none_or(|b| macro_f1 > b.tune_macro_f1) {
            best = Some(Trained {
                head: valid,
                thresholds,
                best_epoch: epoch,
                tune_macro_f1: macro_f1,
            });
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= opts.patience {
                break;
            }
        }
    }
    pb.finish_and_clear();
    best.expect("at least one epoch")
}
