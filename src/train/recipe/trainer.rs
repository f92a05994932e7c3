//! Trains the recipe's networks: every one picks its epoch and thresholds on the
//! tune films, and the student trains with more of its text hidden.

use super::data::Part;
use super::options::RecipeOptions;
use super::workers::{self, NetJob, Workers};
use crate::nn::bert::BertLayer;
use crate::nn::efficientnet::Tail;
use crate::nn::fusion::{EarlyFusion, FusionConfig, TunedFusion};
use crate::train::fusion::{self, FusionOptions, Job, Role, Trained, TuneRows};
use anyhow::{Context, Result, bail};
use burn::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What every network of a run shares: the fit and tune rows, the options, the
/// labels, the device, and the manifest and workers that train networks elsewhere.
pub(super) struct Trainer<'a> {
    pub(super) fit: &'a Part,
    pub(super) tune: &'a Part,
    pub(super) opts: &'a RecipeOptions,
    pub(super) labels: &'a [String],
    pub(super) device: &'a Device,
    pub(super) manifest: &'a Path,
    pub(super) workers: &'a Workers<'a>,
}

/// One network of a run.
#[derive(Clone, Copy)]
pub(super) struct Net<'a> {
    pub(super) config: &'a FusionConfig,
    /// Pretrained MiniLM layers it tunes (none: frozen text features).
    pub(super) top: &'a [BertLayer],
    /// EfficientNet's last blocks and head, when it tunes them (none: frozen maps).
    pub(super) tail: Option<&'a Tail>,
    pub(super) role: Role,
    /// The fit rows it trains on, and their targets.
    pub(super) rows: &'a [usize],
    pub(super) targets: &'a [f32],
    pub(super) seed: u64,
    pub(super) name: &'a str,
}

impl Trainer<'_> {
    /// Trains `net`; a network that reads text is tuned on the tune rows with text.
    pub(super) fn train(&self, net: Net) -> Trained {
        let tune = self.tune;
        let sel = if net.config.use_text {
            &tune.with_text
        } else {
            &tune.all
        };
        let truth = tune.y_of(sel);
        let opts = FusionOptions {
            seed: net.seed,
            text_dropout: match net.role {
                Role::Student => self.opts.student_text_dropout,
                Role::Teacher => self.opts.fusion.text_dropout,
            },
            ..self.opts.fusion.clone()
        };
        let job = Job {
            config: net.config,
            top: net.top.to_vec(),
            tail: net.tail.cloned(),
            role: net.role,
            set: &self.fit.set,
            fit: net.rows,
            targets: net.targets,
            tune: TuneRows {
                set: &tune.set,
                rows: sel,
                truth: &truth,
            },
            labels: self.labels,
            opts: &opts,
            name: net.name,
        };
        fusion::train(job, self.device)
    }

    /// `members` networks like `net`, seeds `net.seed`, `net.seed + 1`, ..., each
    /// named "`net.name` i/members".
    pub(super) fn ensemble(&self, net: Net, members: usize) -> Result<Vec<Trained>> {
        let names = member_names(net.name, members);
        self.train_all(&member_nets(net, &names))
    }

    /// Trains every network of `nets`, `workers.jobs` at a time (the extra ones in
    /// worker processes); the results come in the order of `nets`.
    pub(super) fn train_all(&self, nets: &[Net]) -> Result<Vec<Trained>> {
        let w = self.workers;
        let launch = match w.launch {
            Some(l) if w.jobs > 1 && nets.len() > 1 => l,
            _ => return Ok(nets.iter().map(|&n| self.train(n)).collect()),
        };
        std::fs::create_dir_all(&w.dir).with_context(|| format!("creating {}", w.dir.display()))?;
        let jobs: Vec<NetJob> = nets.iter().map(|n| self.job(n)).collect();
        let stem = format!("{}-{}", std::process::id(), nets[0].name);
        let stem = stem.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
        let paths: Vec<PathBuf> = (0..nets.len())
            .map(|i| w.dir.join(format!("{stem}-{i}.json")))
            .collect();
        // Each takes the next network not yet taken: the workers through their
        // processes, this thread in this process. Only this thread touches burn
        // until all are done, so its networks keep their seeded streams.
        let (next, n) = (AtomicUsize::new(0), nets.len());
        let take = || Some(next.fetch_add(1, Ordering::SeqCst)).filter(|&i| i < n);
        let mut mine = Vec::new();
        let theirs = std::thread::scope(|s| {
            let handles: Vec<_> = (1..w.jobs.min(n))
                .map(|_| {
                    s.spawn(|| -> Result<Vec<usize>> {
                        let mut done = Vec::new();
                        while let Some(i) = take() {
                            jobs[i].write(&paths[i])?;
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
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("a worker thread panicked"))
                })
                .collect::<Result<Vec<Vec<usize>>>>()
        })?;
        let mut out: Vec<Option<Trained>> = (0..n).map(|_| None).collect();
        for (i, t) in mine {
            out[i] = Some(t);
        }
        for i in theirs.into_iter().flatten() {
            let net = &nets[i];
            let shape = TunedFusion {
                top: net.top.to_vec(),
                tail: net.tail.cloned(),
                fusion: EarlyFusion::new(net.config, self.device),
            };
            out[i] = Some(workers::take_back(shape, &paths[i])?);
        }
        out.into_iter()
            .map(|t| t.context("a network was neither trained nor given back"))
            .collect()
    }

    fn job(&self, net: &Net) -> NetJob {
        NetJob {
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
}

/// The names of an ensemble's members: "`name` i/members".
pub(super) fn member_names(name: &str, members: usize) -> Vec<String> {
    (1..=members)
        .map(|m| format!("{name} {m}/{members}"))
        .collect()
}

/// An ensemble's members: networks like `net`, one per name, seeds `net.seed`,
/// `net.seed + 1`, ...
pub(super) fn member_nets<'a>(net: Net<'a>, names: &'a [String]) -> Vec<Net<'a>> {
    names
        .iter()
        .enumerate()
        .map(|(m, name)| Net {
            seed: net.seed + m as u64,
            name,
            ..net
        })
        .collect()
}
