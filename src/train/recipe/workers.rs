//! Worker processes: a run trains its independent networks (an ensemble's members,
//! the out-of-fold students, the two single-modality networks) several at a time
//! with `--jobs`. This process trains one, and workers, which are this program
//! again, train the others, each from a job file, writing the network and its tune
//! figures beside it. `Trainer::train_all` hands the networks out; this file is the
//! job file and what comes back.
//!
//! Processes, not threads: burn's CPU backends draw initial weights and dropout
//! masks from one seeded stream per process, so two networks trained at once in one
//! process would interleave their draws. A network comes out the same, bit for bit,
//! whichever process trains it, so `--jobs` changes how long a run takes and never
//! what it gives.

use crate::model::towers::{load_burnpack, save_burnpack};
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::train::fusion::{Role, Trained};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Starts a worker: runs this program on a job file and waits for it to finish.
/// The caller (the command line) knows how the program is started.
pub trait Launch: Sync {
    /// Trains the job in `job` in another process; an error if that process fails.
    fn launch(&self, job: &Path) -> Result<()>;
}

/// How many networks a run trains at once, and how it starts the extra ones.
pub struct Workers<'a> {
    /// Networks trained at once (1: all in this process, one after another).
    pub jobs: usize,
    /// Where the job files and the networks they give are written. The networks
    /// read back keep reading their weights from there (burn-store reads lazily), so
    /// the caller removes it only when the run's networks are gone.
    pub dir: PathBuf,
    /// Starts a worker process (unused when `jobs` is 1).
    pub launch: Option<&'a dyn Launch>,
}

impl Workers<'_> {
    /// Every network in this process, one after another.
    pub fn serial() -> Self {
        Workers {
            jobs: 1,
            dir: PathBuf::new(),
            launch: None,
        }
    }
}

/// One network for a worker, as plain data. The worker loads the same features
/// from the cache, so the pretrained layers it tunes are named, not sent.
#[derive(Serialize, Deserialize)]
pub(super) struct NetJob {
    /// The manifest the run read (the captioned one, when it captions).
    pub(super) manifest: PathBuf,
    pub(super) config: FusionConfig,
    /// Tunes the run's pretrained MiniLM layers (a teacher's).
    pub(super) tunes_text: bool,
    /// Tunes the run's EfficientNet tail.
    pub(super) tunes_image: bool,
    pub(super) role: Role,
    pub(super) rows: Vec<usize>,
    pub(super) targets: Vec<f32>,
    pub(super) seed: u64,
    pub(super) name: String,
}

impl NetJob {
    pub(super) fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub(super) fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }
}

/// What a worker gives back besides the network's weights.
#[derive(Serialize, Deserialize)]
struct Outcome {
    thresholds: Vec<f32>,
    best_epoch: usize,
    tune_macro_f1: f64,
    seconds: f64,
}

fn weights_of(job: &Path) -> PathBuf {
    job.with_extension("bpk")
}

fn outcome_of(job: &Path) -> PathBuf {
    job.with_extension("out.json")
}

/// Writes a worker's network beside its job file.
pub(super) fn give_back(t: Trained, job: &Path) -> Result<()> {
    save_burnpack(&t.model, &weights_of(job))?;
    let o = Outcome {
        thresholds: t.thresholds,
        best_epoch: t.best_epoch,
        tune_macro_f1: t.tune_macro_f1,
        seconds: t.seconds,
    };
    let path = outcome_of(job);
    std::fs::write(&path, serde_json::to_vec(&o)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads back the network a worker wrote beside `job`, into `model` (a network of
/// the same shape).
pub(super) fn take_back(mut model: TunedFusion, job: &Path) -> Result<Trained> {
    load_burnpack(&mut model, &weights_of(job))?;
    let path = outcome_of(job);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let o: Outcome =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(Trained {
        model,
        thresholds: o.thresholds,
        best_epoch: o.best_epoch,
        tune_macro_f1: o.tune_macro_f1,
        seconds: o.seconds,
    })
}
