//! `marquee eval`: micro, macro, weighted and samples F1 of a model on a manifest.

use super::Global;
use super::args::EvalArgs;
use anyhow::Result;
use marquee::model::dir::default_model_dir;
use marquee::train::eval::{self, EvalOutput};
use serde::Serialize;
use std::fmt;

#[derive(Serialize)]
#[serde(transparent)]
pub struct EvalReport(EvalOutput);

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let out = &self.0;
        let r = &out.report;
        writeln!(
            f,
            "model {}  n={}  {:.1} ms/sample",
            out.model, r.n, out.ms_per_sample
        )?;
        writeln!(
            f,
            "micro-F1 {:.4}  macro-F1 {:.4}  weighted-F1 {:.4}  samples-F1 {:.4}",
            r.micro_f1, r.macro_f1, r.weighted_f1, r.samples_f1
        )?;
        write!(
            f,
            "{:<16} {:>9} {:>9} {:>9} {:>8}",
            "genre", "precision", "recall", "f1", "support"
        )?;
        for (g, s) in &r.per_genre {
            write!(
                f,
                "\n{:<16} {:>9.3} {:>9.3} {:>9.3} {:>8}",
                g, s.precision, s.recall, s.f1, s.support
            )?;
        }
        Ok(())
    }
}

pub fn run(a: EvalArgs, g: &Global) -> Result<EvalReport> {
    let device = g.backend.device()?;
    let model_dir = a.model.unwrap_or_else(default_model_dir);
    let out = eval::run(
        &a.manifest,
        a.split.map(|s| s.name()),
        &model_dir,
        a.text_less,
        &g.cache,
        &device,
    )?;
    Ok(EvalReport(out))
}
