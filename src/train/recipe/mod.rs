//! The training recipe behind the shipped model, as a list of named steps:
//!
//! 1. `data`: the three splits' token features;
//! 2. the logistic-regression peers (`train::peers`);
//! 3. `singles`: the single-modality networks and their late fusion;
//! 4. `teacher`: the early-fusion teacher ensemble;
//! 5. `student`: the student distilled from it, with its out-of-fold students;
//! 6. the bundle, written by the caller from `RecipeOutput`.
//!
//! Everything is scored on val, which nothing here tunes on: epochs and thresholds
//! are chosen on held-out training films ("tune").

mod data;
pub mod ensemble;
pub mod options;
mod singles;
mod student;
mod teacher;
mod trainer;
pub mod workers;

use crate::infer::labels::labels;
use crate::model::cache::CacheDir;
use crate::train::metrics::ThresholdSpread;
use crate::train::peers::{self, PeerData, PeerReport, Pooled};
use crate::train::report::Ablation;
use crate::train::split::fold_of;
use anyhow::{Result, bail};
use burn::prelude::*;
use data::Data;
use ensemble::Ensemble;
use options::{RecipeOptions, Until};
use std::path::Path;
use trainer::Trainer;
use workers::{NetJob, Workers};

/// The ablation table, and the trained networks that the export step needs.
pub struct RecipeOutput {
    /// The peers' rows first, then the networks'.
    pub ablations: Vec<Ablation>,
    /// None when the run distils from an earlier teacher.
    pub peers: Option<PeerReport>,
    /// The teacher, when the run goes that far.
    pub teacher: Option<Ensemble>,
    /// The student, when the run goes that far.
    pub student: Option<Ensemble>,
    /// The student's threshold spread over the folds (with and without the
    /// overview), when its thresholds are tuned out of fold.
    pub student_spread: Vec<ThresholdSpread>,
}

/// Runs the recipe on a manifest's train and val rows, as far as `opts.until`,
/// training `workers.jobs` networks at a time where they are independent.
pub fn run(
    manifest_path: &Path,
    cache: &CacheDir,
    device: &Device,
    opts: &RecipeOptions,
    workers: &Workers,
) -> Result<RecipeOutput> {
    let labels = labels();
    let data = data::load(manifest_path, cache, device, opts, &labels)?;
    let peers = match opts.fits_peers() {
        true => Some(fit_peers(&data, &labels)?),
        false => None,
    };
    let mut out = RecipeOutput {
        ablations: peers.iter().flat_map(|p| p.ablations.clone()).collect(),
        peers,
        teacher: None,
        student: None,
        student_spread: Vec::new(),
    };
    if opts.until == Until::Peers {
        return Ok(out);
    }
    let trainer = trainer_of(&data, opts, &labels, device, manifest_path, workers);
    if opts.trains_singles() {
        out.ablations.extend(singles::single_modality(
            &trainer,
            data.image_tail.as_ref(),
            &data.val,
        )?);
    }
    if matches!(opts.until, Until::Ablations | Until::Singles) {
        return Ok(out);
    }
    let (teacher, row) = teacher::teacher(
        &trainer,
        &data.text_top,
        data.image_tail.as_ref(),
        &data.val,
    )?;
    out.ablations.push(row);
    if opts.until != Until::Teacher {
        let s = student::student(&trainer, &teacher, &data.fit_rows, &data.val)?;
        out.ablations.push(s.row);
        out.student = Some(s.ensemble);
        out.student_spread = s.spread;
    }
    out.teacher = Some(teacher);
    Ok(out)
}

/// The trainer of a run's networks, over its fit and tune rows.
fn trainer_of<'a>(
    data: &'a Data,
    opts: &'a RecipeOptions,
    labels: &'a [String],
    device: &'a Device,
    manifest: &'a Path,
    workers: &'a Workers<'a>,
) -> Trainer<'a> {
    Trainer {
        fit: &data.fit,
        tune: &data.tune,
        opts,
        labels,
        device,
        manifest,
        workers,
    }
}

/// A worker's whole run (`--jobs`): loads the features as the run that wrote `job`
/// did, trains its one network and writes it beside the job file.
pub fn work(job: &Path, cache: &CacheDir, device: &Device, opts: &RecipeOptions) -> Result<()> {
    let j = NetJob::read(job)?;
    let labels = labels();
    let data = data::load(&j.manifest, cache, device, opts, &labels)?;
    if (j.tunes_image && data.image_tail.is_none()) || (j.tunes_text && data.text_top.is_empty()) {
        bail!("{} was written by a run with other options", job.display());
    }
    let serial = Workers::serial();
    let trainer = trainer_of(&data, opts, &labels, device, &j.manifest, &serial);
    let top = match j.tunes_text {
        true => &data.text_top[..],
        false => &[],
    };
    let trained = trainer.train(trainer::Net {
        config: &j.config,
        top,
        tail: data.image_tail.as_ref().filter(|_| j.tunes_image),
        role: j.role,
        rows: &j.rows,
        targets: &j.targets,
        seed: j.seed,
        name: &j.name,
    });
    workers::give_back(trained, job)
}

/// The logistic-regression peers on the frozen features, fit and tune rows together.
fn fit_peers(data: &Data, labels: &[String]) -> Result<PeerReport> {
    let train = Pooled::concat(&Pooled::of(&data.fit.set), &Pooled::of(&data.tune.set));
    let nf = data.fit.set.n;
    let fit: Vec<usize> = (0..nf).collect();
    let tune: Vec<usize> = (nf..train.n).collect();
    let fold: Vec<usize> = data
        .fit_rows
        .iter()
        .chain(&data.tune_rows)
        .map(|r| fold_of(&r.film))
        .collect();
    let y_train = [&data.fit.y[..], &data.tune.y[..]].concat();
    peers::run(
        &PeerData {
            train: &train,
            y_train: &y_train,
            fit: &fit,
            tune: &tune,
            fold: &fold,
            val: &Pooled::of(&data.val.set),
            y_val: &data.val.y,
        },
        labels,
    )
}
