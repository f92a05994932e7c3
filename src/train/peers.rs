//! Logistic-regression peers on frozen, pooled features: what a user gets from the
//! same pretrained towers without training a network. Every training run prints
//! them beside the networks, so the gap is always in view.
//!
//! - text: MiniLM-L6's last layer mean-pooled over every wordpiece, `[CLS]` and `[SEP]`
//!   included (the way sentence-transformers pools all-MiniLM-L6-v2);
//! - poster: EfficientNet-Lite0's 224x336 feature map averaged over its cells (the
//!   network's own global pooling);
//! - late fusion: the mean of the two probabilities (the poster's alone without text).
//!
//! One L2-regularised logistic regression per genre: linfa-logistic's L-BFGS on
//! standardised features. Each peer picks its L2 weight (alpha) from a grid by its
//! macro-F1 on the held-out tune films, the way the networks pick their epoch:
//! scikit-learn's default (alpha 1) is far too weak for 384 and 1280 dense features
//! and 1-3 % positives (docs/accuracy.md). Thresholds are tuned exactly as the
//! networks' are, on the tune films. Beside them, the same peers with thresholds
//! tuned on out-of-fold scores over all training films (k-fold by film), and how far
//! the per-fold thresholds move.

use super::metrics::{ThresholdSpread, decide_all, report, tune_thresholds};
use super::report::Ablation;
use super::split::FOLDS;
use super::tokens::TokenSet;
use crate::infer::TEXT_DIM;
use crate::nn::efficientnet::FEATURE_DIM;
use crate::util::progress::note;
use anyhow::{Context, Result};
use linfa::DatasetBase;
use linfa::traits::Fit;
use linfa_logistic::{FittedLogisticRegression, LogisticRegression};
use ndarray::{Array1, Array2, ShapeBuilder};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// L2 weights on standardised features that each peer chooses from (scikit-learn's
/// C = 1 down to C = 1e-4).
pub const ALPHAS: [f64; 5] = [1.0, 10.0, 100.0, 1000.0, 10000.0];
/// L-BFGS iterations per genre (scikit-learn's default for lbfgs).
const MAX_ITERATIONS: u64 = 100;

/// Pooled features of a set of rows, row-major: `text` is `[n, 384]` (zeros where a
/// row has no text), `poster` is `[n, 1280]`.
#[derive(Debug, Clone, Default)]
pub struct Pooled {
    /// Rows.
    pub n: usize,
    /// Pooled text features, `[n, 384]`.
    pub text: Vec<f32>,
    /// Whether each row has text.
    pub has_text: Vec<bool>,
    /// Pooled poster features, `[n, 1280]`.
    pub poster: Vec<f32>,
}

impl Pooled {
    /// Means of the cached teacher maps (224x336) and MiniLM-L6 hidden states.
    pub fn of(set: &TokenSet) -> Self {
        let cells = set.teacher_map.len() / (set.n.max(1) * FEATURE_DIM);
        let mut p = Pooled {
            n: set.n,
            text: vec![0.0; set.n * TEXT_DIM],
            has_text: vec![false; set.n],
            poster: vec![0.0; set.n * FEATURE_DIM],
        };
        for i in 0..set.n {
            let map = &set.teacher_map[i * cells * FEATURE_DIM..(i + 1) * cells * FEATURE_DIM];
            mean_rows(
                map,
                FEATURE_DIM,
                &mut p.poster[i * FEATURE_DIM..][..FEATURE_DIM],
            );
            let (a, b) = (set.text_off[i], set.text_off[i + 1]);
            if b > a {
                p.has_text[i] = true;
                let hidden = &set.text_l6[a * TEXT_DIM..b * TEXT_DIM];
                mean_rows(hidden, TEXT_DIM, &mut p.text[i * TEXT_DIM..][..TEXT_DIM]);
            }
        }
        p
    }

    /// The rows of `a` followed by those of `b`.
    pub fn concat(a: &Pooled, b: &Pooled) -> Pooled {
        let cat = |x: &[f32], y: &[f32]| [x, y].concat();
        Pooled {
            n: a.n + b.n,
            text: cat(&a.text, &b.text),
            has_text: [&a.has_text[..], &b.has_text[..]].concat(),
            poster: cat(&a.poster, &b.poster),
        }
    }

    fn with_text(&self, rows: &[usize]) -> Vec<usize> {
        rows.iter().copied().filter(|&i| self.has_text[i]).collect()
    }
}

fn mean_rows(x: &[half::f16], dim: usize, out: &mut [f32]) {
    let rows = x.len() / dim;
    for row in x.chunks(dim) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v.to_f32();
        }
    }
    for o in out.iter_mut() {
        *o /= rows.max(1) as f32;
    }
}

/// One genre's model; a genre without both classes in the fit rows gets its rate.
enum GenreFit {
    Lr(FittedLogisticRegression<f64, bool>),
    Rate(f64),
}

/// Per-genre logistic regressions over one kind of pooled feature.
struct Peer {
    dim: usize,
    mean: Vec<f64>,
    scale: Vec<f64>,
    genres: Vec<GenreFit>,
}

impl Peer {
    /// Fits on `rows` of `x` (`[n, dim]`), with labels `y` (`[n, k]`).
    fn fit(x: &[f32], dim: usize, rows: &[usize], y: &[u8], k: usize, alpha: f64) -> Result<Self> {
        let (mut mean, mut var) = (vec![0f64; dim], vec![0f64; dim]);
        for &r in rows {
            for (m, &v) in mean.iter_mut().zip(&x[r * dim..(r + 1) * dim]) {
                *m += v as f64;
            }
        }
        let n = rows.len().max(1) as f64;
        mean.iter_mut().for_each(|m| *m /= n);
        for &r in rows {
            for ((s, &v), m) in var.iter_mut().zip(&x[r * dim..(r + 1) * dim]).zip(&mean) {
                *s += (v as f64 - m).powi(2);
            }
        }
        // A constant feature keeps scale 1 instead of dividing by zero.
        let scale: Vec<f64> = var
            .iter()
            .map(|s| (s / n).sqrt())
            .map(|s| if s > 1e-12 { 1.0 / s } else { 1.0 })
            .collect();
        let mut peer = Peer {
            dim,
            mean,
            scale,
            genres: Vec::new(),
        };
        let records = peer.standardise(x, rows);
        peer.genres = (0..k)
            .into_par_iter()
            .map(|j| {
                let target: Array1<bool> = rows.iter().map(|&r| y[r * k + j] == 1).collect();
                let positives = target.iter().filter(|&&t| t).count();
                if positives == 0 || positives == rows.len() {
                    return Ok(GenreFit::Rate(positives as f64 / n));
                }
                let data = DatasetBase::new(records.view(), target);
                LogisticRegression::default()
                    .alpha(alpha)
                    .max_iterations(MAX_ITERATIONS)
                    .fit(&data)
                    .map(GenreFit::Lr)
                    .with_context(|| format!("logistic regression of genre {j}"))
            })
            .collect::<Result<_>>()?;
        Ok(peer)
    }

    /// Column-major, so that the solver's gradient (the records' transpose times a
    /// vector, one dot per row of the transpose in ndarray without BLAS) reads
    /// contiguous memory: in row-major order each of those dots walked the records
    /// with a stride, and that took most of the peers' time.
    fn standardise(&self, x: &[f32], rows: &[usize]) -> Array2<f64> {
        let d = self.dim;
        Array2::from_shape_fn((rows.len(), d).f(), |(i, c)| {
            (x[rows[i] * d + c] as f64 - self.mean[c]) * self.scale[c]
        })
    }

    /// Row-major `[rows, k]` probabilities.
    fn scores(&self, x: &[f32], rows: &[usize]) -> Vec<f32> {
        let records = self.standardise(x, rows);
        let k = self.genres.len();
        let mut out = vec![0f32; rows.len() * k];
        for (j, g) in self.genres.iter().enumerate() {
            match g {
                GenreFit::Lr(m) => {
                    // linfa's probability is that of the class it labels positive: the
                    // more frequent one, which for most genres is "absent".
                    let present_is_positive = m.labels().pos.class;
                    for (i, &p) in m.predict_probabilities(&records).iter().enumerate() {
                        let p = if present_is_positive { p } else { 1.0 - p };
                        out[i * k + j] = p as f32;
                    }
                }
                GenreFit::Rate(p) => (0..rows.len()).for_each(|i| out[i * k + j] = *p as f32),
            }
        }
        out
    }
}

/// The two peers fitted on the same rows.
struct Pair {
    text: Peer,
    poster: Peer,
}

impl Pair {
    /// `alpha`: the text peer's, then the poster peer's.
    fn fit(p: &Pooled, rows: &[usize], y: &[u8], k: usize, alpha: [f64; 2]) -> Result<Self> {
        Ok(Pair {
            text: Peer::fit(&p.text, TEXT_DIM, &p.with_text(rows), y, k, alpha[TEXT])?,
            poster: Peer::fit(&p.poster, FEATURE_DIM, rows, y, k, alpha[POSTER])?,
        })
    }

    /// (text, poster, late fusion) scores of `rows`. Text-less rows score 0 on text,
    /// and their late fusion is the poster's score.
    fn scores(&self, p: &Pooled, rows: &[usize]) -> [Vec<f32>; 3] {
        let text = self.text.scores(&p.text, rows);
        let poster = self.poster.scores(&p.poster, rows);
        let k = self.poster.genres.len();
        let mut text_or_zero = text;
        let mut late = poster.clone();
        for (i, &r) in rows.iter().enumerate() {
            let (t, l) = (
                &mut text_or_zero[i * k..(i + 1) * k],
                &mut late[i * k..(i + 1) * k],
            );
            if p.has_text[r] {
                l.iter_mut()
                    .zip(t.iter())
                    .for_each(|(l, t)| *l = 0.5 * (*l + t));
            } else {
                t.fill(0.0);
            }
        }
        [text_or_zero, poster, late]
    }
}

/// One point of the alpha grid: a peer's macro-F1 on the tune films.
#[derive(Debug, Clone, Serialize)]
pub struct AlphaTrial {
    /// The peer.
    pub peer: String,
    /// The L2 weight tried.
    pub alpha: f64,
    /// The macro-F1 it reached on the tune films.
    pub tune_macro_f1: f64,
}

/// The peers' rows of the ablation table, the alpha each peer chose, and the
/// threshold spread of each peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    /// The peers' rows of the ablation table.
    pub ablations: Vec<Ablation>,
    /// The text peer's alpha, then the poster peer's.
    pub alpha: [f64; 2],
    /// Every point of the alpha grid.
    pub alpha_search: Vec<AlphaTrial>,
    /// Folds of the out-of-fold tuning.
    pub folds: usize,
    /// How far each peer's thresholds move between the folds.
    pub spread: Vec<ThresholdSpread>,
}

/// Training rows (fit and tune, together) and val, with their labels.
pub struct PeerData<'a> {
    /// Pooled features of the training rows.
    pub train: &'a Pooled,
    /// Their labels, row-major.
    pub y_train: &'a [u8],
    /// Indices into `train` of the fit rows and the tune rows.
    pub fit: &'a [usize],
    /// See `fit`.
    pub tune: &'a [usize],
    /// The fold of each training row (by film).
    pub fold: &'a [usize],
    /// Pooled features of val.
    pub val: &'a Pooled,
    /// Its labels, row-major.
    pub y_val: &'a [u8],
}

/// The peers, in the order `Pair::scores` returns them.
const TEXT: usize = 0;
const POSTER: usize = 1;
const NAMES: [&str; 3] = [
    "LR peer: text (MiniLM-L6 mean-pool)",
    "LR peer: poster (EfficientNet-Lite0 pooled, 224x336)",
    "LR peer: late fusion (mean of the two)",
];

/// Fits and scores the peers two ways: thresholds on the tune films (as the
/// networks), and on out-of-fold scores over all training films.
pub fn run(d: &PeerData, labels: &[String]) -> Result<PeerReport> {
    let k = labels.len();
    let val_rows: Vec<usize> = (0..d.val.n).collect();
    let eval = |s: &[f32], t: &[f32]| report(&decide_all(s, t), d.y_val, labels);
    // Thresholds of one peer from its scores `s` of training `rows` (row i of `s` is
    // rows[i]), and the macro-F1 they reach on those rows; the text and late-fusion
    // peers are tuned on the rows with text, as the networks are.
    let tuned = |s: &[f32], rows: &[usize], peer: usize| -> (Vec<f32>, f64) {
        let keep: Vec<usize> = (0..rows.len())
            .filter(|&i| peer == POSTER || d.train.has_text[rows[i]])
            .collect();
        let scores: Vec<f32> = keep
            .iter()
            .flat_map(|&i| s[i * k..(i + 1) * k].iter().copied())
            .collect();
        let truth: Vec<u8> = keep
            .iter()
            .flat_map(|&i| d.y_train[rows[i] * k..(rows[i] + 1) * k].iter().copied())
            .collect();
        let t = tune_thresholds(&scores, &truth, k);
        let f1 = report(&decide_all(&scores, &t), &truth, labels).macro_f1;
        (t, f1)
    };
    let mut ablations = Vec::new();

    // As the networks: fit on the fit films, alpha and thresholds on the tune films.
    let start = Instant::now();
    let mut alpha_search = Vec::new();
    // Per peer: (tune macro-F1, alpha, the fitted peer).
    let mut best: [Option<(f64, f64, Peer)>; 2] = [None, None];
    for (i, &alpha) in ALPHAS.iter().enumerate() {
        note(&format!(
            "LR peers: alpha {alpha} ({}/{}), fit films, tune-film macro-F1",
            i + 1,
            ALPHAS.len()
        ));
        let pair = Pair::fit(d.train, d.fit, d.y_train, k, [alpha; 2])?;
        let s = pair.scores(d.train, d.tune);
        for (p, peer) in [(TEXT, pair.text), (POSTER, pair.poster)] {
            let f1 = tuned(&s[p], d.tune, p).1;
            alpha_search.push(AlphaTrial {
                peer: NAMES[p].into(),
                alpha,
                tune_macro_f1: f1,
            });
            if best[p].as_ref().is_none_or(|b| f1 > b.0) {
                best[p] = Some((f1, alpha, peer));
            }
        }
    }
    let [Some((_, alpha_text, text)), Some((_, alpha_poster, poster))] = best else {
        unreachable!("the alpha grid is not empty");
    };
    let alpha = [alpha_text, alpha_poster];
    let pair = Pair { text, poster };
    let tune_s = pair.scores(d.train, d.tune);
    let val_s = pair.scores(d.val, &val_rows);
    let t: Vec<Vec<f32>> = (0..3).map(|p| tuned(&tune_s[p], d.tune, p).0).collect();
    let seconds = start.elapsed().as_secs_f64();
    let poster_val = eval(&val_s[POSTER], &t[POSTER]);
    for p in 0..3 {
        ablations.push(Ablation::fitted(
            NAMES[p].into(),
            eval(&val_s[p], &t[p]),
            (p != TEXT).then(|| poster_val.clone()),
            seconds,
        ));
    }

    // Out of fold: every training film is scored by a model that never saw it.
    let start = Instant::now();
    let all: Vec<usize> = (0..d.train.n).collect();
    let mut oof: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0f32; d.train.n * k]);
    let mut fold_thresholds: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    for f in 0..FOLDS {
        note(&format!("LR peers: fold {}/{FOLDS}", f + 1));
        let (held, kept): (Vec<usize>, Vec<usize>) =
            all.iter().copied().partition(|&r| d.fold[r] == f);
        if held.is_empty() || kept.is_empty() {
            continue;
        }
        let s = Pair::fit(d.train, &kept, d.y_train, k, alpha)?.scores(d.train, &held);
        for (i, &r) in held.iter().enumerate() {
            for p in 0..3 {
                oof[p][r * k..(r + 1) * k].copy_from_slice(&s[p][i * k..(i + 1) * k]);
            }
        }
        for (p, ft) in fold_thresholds.iter_mut().enumerate() {
            ft.push(tuned(&s[p], &held, p).0);
        }
    }
    note("LR peers: all training films, out-of-fold thresholds");
    let t_oof: Vec<Vec<f32>> = (0..3).map(|p| tuned(&oof[p], &all, p).0).collect();
    let full = Pair::fit(d.train, &all, d.y_train, k, alpha)?.scores(d.val, &val_rows);
    let seconds = start.elapsed().as_secs_f64();
    let poster_val = eval(&full[POSTER], &t_oof[POSTER]);
    for p in 0..3 {
        ablations.push(Ablation::fitted(
            format!("{}, {FOLDS}-fold thresholds", NAMES[p]),
            eval(&full[p], &t_oof[p]),
            (p != TEXT).then(|| poster_val.clone()),
            seconds,
        ));
    }
    let spread = (0..3)
        .map(|p| ThresholdSpread::of(NAMES[p], &fold_thresholds[p], labels))
        .collect();
    Ok(PeerReport {
        ablations,
        alpha,
        alpha_search,
        folds: FOLDS,
        spread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_genre_with_one_class_scores_its_rate_and_a_learnable_one_is_learned() {
        // Genre 0 is present where the first feature is high (a minority of rows, as
        // genres are); genre 1 is never present.
        let (n, dim, k) = (200, 3, 2);
        let x: Vec<f32> = (0..n * dim)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let y: Vec<u8> = (0..n)
            .flat_map(|r| [u8::from(x[r * dim] > 0.4), 0])
            .collect();
        let present = (0..n).filter(|&r| y[r * k] == 1).count();
        assert!(present > 20 && present < n / 2, "{present}");
        let rows: Vec<usize> = (0..n).collect();
        let peer = Peer::fit(&x, dim, &rows, &y, k, 1.0).unwrap();
        let s = peer.scores(&x, &rows);
        let right = (0..n)
            .filter(|&r| (s[r * k] > 0.5) == (y[r * k] == 1))
            .count();
        assert!(right >= 190, "{right}/{n} right");
        assert!((0..n).all(|r| s[r * k + 1] == 0.0));
    }

    #[test]
    fn late_fusion_is_the_mean_with_text_and_the_poster_without() {
        let set = Pooled {
            n: 2,
            text: vec![0.0; 2 * TEXT_DIM],
            has_text: vec![true, false],
            poster: vec![0.0; 2 * FEATURE_DIM],
        };
        let fixed = |p: f64| Peer {
            dim: 0,
            mean: vec![],
            scale: vec![],
            genres: vec![GenreFit::Rate(p)],
        };
        let pair = Pair {
            text: Peer {
                dim: TEXT_DIM,
                mean: vec![0.0; TEXT_DIM],
                scale: vec![1.0; TEXT_DIM],
                ..fixed(0.8)
            },
            poster: Peer {
                dim: FEATURE_DIM,
                mean: vec![0.0; FEATURE_DIM],
                scale: vec![1.0; FEATURE_DIM],
                ..fixed(0.2)
            },
        };
        let [text, poster, late] = pair.scores(&set, &[0, 1]);
        assert_eq!(text, [0.8, 0.0]);
        assert_eq!(poster, [0.2, 0.2]);
        assert!((late[0] - 0.5).abs() < 1e-6 && late[1] == 0.2, "{late:?}");
    }
}
