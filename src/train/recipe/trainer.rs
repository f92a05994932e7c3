//! Trains the recipe's networks: every one picks its epoch and thresholds on the
//! tune films, and the student trains with more of its text hidden.

use super::data::Part;
use super::options::RecipeOptions;
use super::workers::Workers;
use crate::nn::bert::BertLayer;
use crate::nn::efficientnet::Tail;
use crate::nn::fusion::FusionConfig;
use crate::train::fusion::{self, FusionOptions, Job, Role, Trained, TuneRows};
use anyhow::Result;
use burn::prelude::*;
use std::path::Path;

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
