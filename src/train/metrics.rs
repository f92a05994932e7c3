//! Multi-label metrics as scikit-learn defines them (zero_division = 0), and the
//! per-genre threshold search.

use crate::infer::labels::decide;
use serde::Serialize;
use std::collections::BTreeMap;

/// One genre's figures.
#[derive(Debug, Clone, Serialize)]
pub struct GenreF1 {
    /// True positives over predicted positives.
    pub precision: f64,
    /// True positives over actual positives.
    pub recall: f64,
    /// Their harmonic mean.
    pub f1: f64,
    /// Actual positives.
    pub support: usize,
}

/// Micro, macro, weighted and samples F1, and each genre's.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Rows scored.
    pub n: usize,
    /// F1 over all decisions together.
    pub micro_f1: f64,
    /// Mean of the genres' F1.
    pub macro_f1: f64,
    /// Mean of the genres' F1, weighted by support.
    pub weighted_f1: f64,
    /// Mean of the rows' F1.
    pub samples_f1: f64,
    /// Per genre.
    pub per_genre: BTreeMap<String, GenreF1>,
}

fn f1(tp: usize, fp: usize, fn_: usize) -> f64 {
    let d = 2 * tp + fp + fn_;
    if d == 0 {
        0.0
    } else {
        2.0 * tp as f64 / d as f64
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// `pred` and `truth` are row-major `[n, labels.len()]` 0/1 matrices.
pub fn report(pred: &[u8], truth: &[u8], labels: &[String]) -> Report {
    let k = labels.len();
    let n = truth.len() / k;
    let (mut tp, mut fp, mut fn_) = (vec![0usize; k], vec![0usize; k], vec![0usize; k]);
    let mut samples = 0.0;
    for r in 0..n {
        let (mut stp, mut sfp, mut sfn) = (0, 0, 0);
        for j in 0..k {
            let (p, t) = (pred[r * k + j] == 1, truth[r * k + j] == 1);
            match (p, t) {
                (true, true) => (tp[j] += 1, stp += 1),
                (true, false) => (fp[j] += 1, sfp += 1),
                (false, true) => (fn_[j] += 1, sfn += 1),
                _ => ((), ()),
            };
        }
        samples += f1(stp, sfp, sfn);
    }
    let mut per_genre = BTreeMap::new();
    let (mut macro_sum, mut weighted_sum, mut support_sum) = (0.0, 0.0, 0usize);
    for j in 0..k {
        let support = tp[j] + fn_[j];
        let g = GenreF1 {
            precision: ratio(tp[j], tp[j] + fp[j]),
            recall: ratio(tp[j], support),
            f1: f1(tp[j], fp[j], fn_[j]),
            support,
        };
        macro_sum += g.f1;
        weighted_sum += g.f1 * support as f64;
        support_sum += support;
        per_genre.insert(labels[j].clone(), g);
    }
    let sum = |v: &[usize]| v.iter().sum::<usize>();
    Report {
        n,
        micro_f1: f1(sum(&tp), sum(&fp), sum(&fn_)),
        macro_f1: macro_sum / k as f64,
        weighted_f1: if support_sum == 0 {
            0.0
        } else {
            weighted_sum / support_sum as f64
        },
        samples_f1: if n == 0 { 0.0 } else { samples / n as f64 },
        per_genre,
    }
}

/// `decide` on each row of a row-major `[n, k]` score matrix.
pub fn decide_all(scores: &[f32], thresholds: &[f32]) -> Vec<u8> {
    scores
        .chunks(thresholds.len())
        .flat_map(|row| decide(row, thresholds))
        .collect()
}

/// Per genre, the threshold in 0.05..0.95 that maximises that genre's F1 on the
/// given scores.
pub fn tune_thresholds(scores: &[f32], truth: &[u8], k: usize) -> Vec<f32> {
    let n = truth.len() / k;
    (0..k)
        .map(|j| {
            let mut best = (0.5f32, -1.0f64);
            for step in 1..=90 {
                let t = step as f32 * 0.01 + 0.04;
                let (mut tp, mut fp, mut fn_) = (0, 0, 0);
                for r in 0..n {
                    let (p, y) = (scores[r * k + j] >= t, truth[r * k + j] == 1);
                    match (p, y) {
                        (true, true) => tp += 1,
                        (true, false) => fp += 1,
                        (false, true) => fn_ += 1,
                        _ => {}
                    }
                }
                let f = f1(tp, fp, fn_);
                if f > best.1 {
                    best = (t, f);
                }
            }
            best.0
        })
        .collect()
}

/// How far per-genre thresholds move when each fold of the training films tunes its
/// own (on the scores of the films its model never saw).
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdSpread {
    /// The model the thresholds belong to.
    pub model: String,
    /// Standard deviation over the folds, averaged over the genres.
    pub mean_sd: f64,
    /// The largest standard deviation of a genre.
    pub max_sd: f64,
    /// That genre.
    pub max_sd_genre: String,
    /// Per genre: the thresholds each fold chose.
    pub per_genre: BTreeMap<String, Vec<f32>>,
}

impl ThresholdSpread {
    /// The spread of `folds` (one threshold per genre each) for `model`.
    pub fn of(model: &str, folds: &[Vec<f32>], labels: &[String]) -> Self {
        let sd: Vec<f64> = (0..labels.len())
            .map(|j| {
                let v: Vec<f64> = folds.iter().map(|t| t[j] as f64).collect();
                let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
                (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
            })
            .collect();
        let (max_j, max_sd) = sd
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, 0.0));
        Self {
            model: model.into(),
            mean_sd: sd.iter().sum::<f64>() / sd.len().max(1) as f64,
            max_sd,
            max_sd_genre: labels.get(max_j).cloned().unwrap_or_default(),
            per_genre: labels
                .iter()
                .enumerate()
                .map(|(j, l)| (l.clone(), folds.iter().map(|t| t[j]).collect()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("g{i}")).collect()
    }

    #[test]
    fn matches_sklearn_on_a_small_case() {
        // y_true = [[1,0,1],[0,1,0],[1,1,0]], y_pred = [[1,0,0],[0,1,1],[1,0,0]]
        // sklearn: micro 0.6667, macro 0.5556, weighted 0.6667, samples 0.6667
        let truth = [1, 0, 1, 0, 1, 0, 1, 1, 0];
        let pred = [1, 0, 0, 0, 1, 1, 1, 0, 0];
        let r = report(&pred, &truth, &labels(3));
        assert!((r.micro_f1 - 2.0 / 3.0).abs() < 1e-9);
        assert!((r.macro_f1 - (1.0 + 2.0 / 3.0 + 0.0) / 3.0).abs() < 1e-9);
        assert!((r.weighted_f1 - (2.0 * 1.0 + 2.0 * 2.0 / 3.0) / 5.0).abs() < 1e-9);
        assert!((r.samples_f1 - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.per_genre["g1"].support, 2);
        assert_eq!(r.per_genre["g2"].precision, 0.0);
    }

    #[test]
    fn tuned_threshold_separates_a_separable_genre() {
        let scores = [0.9, 0.8, 0.3, 0.2];
        let truth = [1, 1, 0, 0];
        let t = tune_thresholds(&scores, &truth, 1)[0];
        assert!(t > 0.3 && t <= 0.8, "threshold {t}");
    }

    #[test]
    fn spread_is_the_population_sd_per_genre_and_names_the_widest() {
        // g0: 0.2 and 0.4 (sd 0.1); g1: the same in both folds (sd 0).
        let s = ThresholdSpread::of("m", &[vec![0.2, 0.5], vec![0.4, 0.5]], &labels(2));
        assert!(
            (s.max_sd - 0.1).abs() < 1e-6 && s.max_sd_genre == "g0",
            "{s:?}"
        );
        assert!((s.mean_sd - 0.05).abs() < 1e-6, "{s:?}");
        assert_eq!(s.per_genre["g1"], [0.5, 0.5]);
    }
}
