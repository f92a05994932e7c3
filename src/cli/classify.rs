//! `marquee classify`: one poster, all 18 genre scores and the predicted set.

use super::args::ClassifyArgs;
use super::{Global, read_image};
use anyhow::Result;
use marquee::infer::timings::Timings;
use marquee::infer::{Classifier, GenreScore, Prediction};
use marquee::model::dir::default_model_dir;
use serde::Serialize;
use std::fmt;

/// The contract's JSON: `{"genres", "predicted", "caption", "timings_ms": {stage: ms}}`.
#[derive(Serialize)]
pub struct ClassifyReport {
    genres: Vec<GenreScore>,
    predicted: Vec<String>,
    caption: Option<String>,
    timings_ms: Timings,
}

impl From<Prediction> for ClassifyReport {
    fn from(p: Prediction) -> Self {
        Self {
            timings_ms: p.timings_ms,
            genres: p.genres,
            predicted: p.predicted,
            caption: p.caption,
        }
    }
}

impl fmt::Display for ClassifyReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "predicted: {}", self.predicted.join(", "))?;
        for g in &self.genres {
            let bar = "#".repeat((g.score * 30.0).round() as usize);
            writeln!(f, "  {:<16} {:>5.3} {bar}", g.label, g.score)?;
        }
        let t: Vec<String> = self
            .timings_ms
            .stages()
            .into_iter()
            .map(|(k, v)| format!("{k} {v:.1} ms"))
            .collect();
        write!(f, "timings: {}", t.join(", "))
    }
}

pub fn run(a: ClassifyArgs, g: &Global) -> Result<ClassifyReport> {
    let device = g.backend.device()?;
    let img = read_image(&a.poster)?;
    let model_dir = a.model.unwrap_or_else(default_model_dir);
    let classifier = Classifier::load(&model_dir, &g.cache, &device)?;
    let p = classifier.classify(&img, a.overview.as_deref(), a.caption.as_deref())?;
    Ok(p.into())
}
