//! How training films are divided: the tune slice that picks epochs and thresholds,
//! and the folds of out-of-fold tuning. Both go by a stable hash of the film's key,
//! so a film's rows stay together and every run divides the same way.

use super::manifest::{Row, stable_hash};

/// One training film in this many is held out to pick the epoch and tune thresholds.
pub const TUNE_EVERY: u64 = 10;

/// Folds of the out-of-fold threshold tuning.
pub const FOLDS: usize = 5;

/// Splits training rows by film into (fit, tune): val is never used for any choice.
pub fn fit_tune_split(rows: &[Row]) -> (Vec<Row>, Vec<Row>) {
    rows.iter()
        .cloned()
        .partition(|r| !stable_hash(&r.film).is_multiple_of(TUNE_EVERY))
}

/// The fold of a training film: by its key, so a film's rows stay together, and
/// independent of the tune slice (which takes the hash modulo 10).
pub fn fold_of(film: &str) -> usize {
    ((stable_hash(film) / TUNE_EVERY) % FOLDS as u64) as usize
}
