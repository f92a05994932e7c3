//! The rows of the ablation table that every training run prints: one per model,
//! scored on val with and without the overview.

use super::metrics::{Report, decide_all, report};
use serde::Serialize;

/// One line of the ablation table.
#[derive(Debug, Clone, Serialize)]
pub struct Ablation {
    /// The model, as the table names it.
    pub name: String,
    /// Its F1 on val, overviews as given.
    pub val: Report,
    /// The same model with the overview hidden (poster + caption; the kiosk case).
    pub val_text_less: Option<Report>,
    /// The epoch each network stopped at (none for the peers).
    pub best_epochs: Vec<usize>,
    /// Wall time of its training.
    pub train_seconds: f64,
}

impl Ablation {
    /// A row of a model with no epochs (a peer, or a fusion of trained models).
    pub fn fitted(name: String, val: Report, val_text_less: Option<Report>, seconds: f64) -> Self {
        Self {
            name,
            val,
            val_text_less,
            best_epochs: vec![],
            train_seconds: seconds,
        }
    }
}

/// The report of `scores` decided at `thresholds` against `truth`.
pub fn scored(scores: &[f32], thresholds: &[f32], truth: &[u8], labels: &[String]) -> Report {
    report(&decide_all(scores, thresholds), truth, labels)
}
