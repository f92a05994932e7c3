//! Trains a run's independent networks (an ensemble's members, the out-of-fold
//! students, the two single-modality networks) several at a time: this process
//! trains one, and worker processes of the same program train the others, each from
//! a job file, writing the network and its tune figures beside it.
//!
//! Processes, not threads: burn's CPU backends draw initial weights and dropout
//! masks from one seeded stream per process, so two networks trained at once in one
//! process would interleave their draws. A network comes out the same, bit for bit,
//! whichever process trains it, so `--jobs` changes how long a run takes and never
//! what it gives.

use super::data;
use super::options::RecipeOptions;
use super::trainer::{Net, Trainer};
use crate::infer::labels::labels;
use crate::model::cache::CacheDir;
use crate::model::towers::{load_burnpack, save_burnpack};
use crate::nn::fusion::{EarlyFusion, FusionConfig, TunedFusion};
use crate::train::fusion::{Role, Trained};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// One network for a worker: what `Net` holds, as plain data. The worker loads the
/// same features from the cache, so the tuned layers are named, not sent.
#[derive(Serialize, Deserialize)]
struct Job {
    manifest: PathBuf,
    config: FusionConfig,
    /// Tunes the run's pretrained MiniLM layers (a teacher's).
    tunes_text: bool,
    /// Tunes the run's EfficientNet tail.
    tunes_image: bool,
    role: Role,
    rows: Vec<usize>,
    targets: Vec<f32>,
    seed: u64,
    name: String,
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

impl Trainer<'_> {
    /// Trains every network of `nets`, `workers.jobs` at a time; the results come
    /// in the order of `nets`.
    pub(super) fn train_all(&self, nets: &[Net]) -> Result<Vec<Trained>> {
        let w = self.workers;
        let launch = match w.launch {
            Some(l) if w.jobs > 1 && nets.len() > 1 => l,
            _ => return Ok(nets.iter().map(|&n| self.train(n)).collect()),
        };
        std::fs::create_dir_all(&w.dir).with_context(|| format!("creating {}", w.dir.display()))?;
        let jobs: Vec<Job> = nets.iter().map(|n| self.job(n)).collect();
        let stem = format!(
            "{}-{}",
            std::process::id(),
            nets[0].name.replace(['/', ' ', ','], "-")
        );
        let paths: Vec<PathBuf> = (0..nets.len())
            .map(|i| w.dir.join(format!("{stem}-{i}.json")))
            .collect();
        // Each takes the next network not yet taken: the workers through their
        // processes, this thread in this process. Only this thread touches burn
        // until all are done, so its own networks keep their seeded stream.
        let (next, n) = (AtomicUsize::new(0), nets.len());
        let take = || Some(next.fetch_add(1, Ordering::SeqCst)).filter(|&i| i < n);
        let mut mine = Vec::new();
        let theirs = std::thread::scope(|s| {
            let workers: Vec<_> = (1..w.jobs.min(n))
                .map(|_| {
                    s.spawn(|| -> Result<Vec<usize>> {
                        let mut done = Vec::new();
                        while let Some(i) = take() {
                            std::fs::write(&paths[i], serde_json::to_vec(&jobs[i])?)
                                .with_context(|| format!("writing {}", paths[i].display()))?;
                            launch.launch(&paths[i])?;
                            done.push(i);
                        }
                        Ok(done)
                    })
                })
                .collect();
            while let Some(i) = take() {
                mine.push((i, self.train(nets[i])));
            }
            workers
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("a worker thread panicked"))
                })
                .collect::<Result<Vec<Vec<usize>>>>()
        })?;
        let mut out: Vec<Option<Trained>> = (0..nets.len()).map(|_| None).collect();
        for (i, t) in mine {
            out[i] = Some(t);
        }
        for i in theirs.into_iter().flatten() {
            out[i] = Some(self.load(&nets[i], &paths[i])?);
        }
        out.into_iter()
            .map(|t| t.context("a network was neither trained nor given back"))
            .collect()
    }

    fn job(&self, net: &Net) -> Job {
        Job {
            manifest: self.manifest.to_path_buf(),
            config: net.config.clone(),
            tunes_text: !net.top.is_empty(),
            tunes_image: net.tail.is_some(),
            role: net.role,
            rows: net.rows.to_vec(),
            targets: net.targets.to_vec(),
            seed: net.seed,
            name: net.name.to_string(),
        }
    }

    /// A worker's network, read back into the shape `net` trains.
    fn load(&self, net: &Net, job: &Path) -> Result<Trained> {
        let mut model = TunedFusion {
            top: net.top.to_vec(),
            tail: net.tail.cloned(),
            fusion: EarlyFusion::new(net.config, self.device),
        };
        load_burnpack(&mut model, &weights_of(job))?;
        let path = outcome_of(job);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
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
}

/// A worker's whole run: loads the features as the run that wrote `job` did, trains
/// its network and writes it beside the job file.
pub fn work(job: &Path, cache: &CacheDir, device: &Device, opts: &RecipeOptions) -> Result<()> {
    let text =
        std::fs::read_to_string(job).with_context(|| format!("reading {}", job.display()))?;
    let j: Job =
        serde_json::from_str(&text).with_context(|| format!("reading {}", job.display()))?;
    let labels = labels();
    let data = data::load(&j.manifest, cache, device, opts, &labels)?;
    if (j.tunes_image && data.image_tail.is_none()) || (j.tunes_text && data.text_top.is_empty()) {
        bail!("{} was written by a run with other options", job.display());
    }
    let serial = Workers::serial();
    let trainer = Trainer {
        fit: &data.fit,
        tune: &data.tune,
        opts,
        labels: &labels,
        device,
        manifest: &j.manifest,
        workers: &serial,
    };
    let top = match j.tunes_text {
        true => &data.text_top[..],
        false => &[],
    };
    let t = trainer.train(Net {
        config: &j.config,
        top,
        tail: data.image_tail.as_ref().filter(|_| j.tunes_image),
        role: j.role,
        rows: &j.rows,
        targets: &j.targets,
        seed: j.seed,
        name: &j.name,
    });
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
