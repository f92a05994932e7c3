//! The early-fusion teacher: an ensemble of seeds at the larger input, scored with a
//! mirror-image view too, trained here or read from an earlier run.

use super::data::Part;
use super::ensemble::{Ensemble, Vote, load_tail, load_top};
use super::trainer::{Net, Trainer};
use crate::model::dir::ModelDir;
use crate::nn::bert::BertLayer;
use crate::nn::efficientnet::Tail;
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::train::fusion::{self, Role};
use crate::train::report::Ablation;
use crate::train::tokens::{TEACHER_INPUT, TEACHER_TEXT_LAYERS};
use anyhow::{Result, bail};
use std::path::Path;

/// The teacher's members, and the epochs and seconds they took (none when read).
struct Members {
    config: FusionConfig,
    nets: Vec<TunedFusion>,
    best_epochs: Vec<usize>,
    seconds: f64,
}

/// The teacher ensemble and its row of the ablation table. `text_top` are the
/// pretrained MiniLM layers each member tunes, `tail` EfficientNet's last blocks.
pub(super) fn teacher(
    t: &Trainer,
    text_top: &[BertLayer],
    tail: Option<&Tail>,
    val: &Part,
) -> Result<(Ensemble, Ablation)> {
    let m = match &t.opts.teacher_from {
        Some(dir) => read(t, dir, tail)?,
        None => train(t, text_top, tail)?,
    };
    let vote = Vote {
        members: m.nets.iter().collect(),
        config: &m.config,
        role: Role::Teacher,
        tta: true,
        tta_text_less: true,
    };
    let done = vote.finish((t.tune, val), t.labels, None, t.device);
    let row = Ablation {
        name: format!(
            "early-fusion teacher ({} members, flip TTA, 224x336, MiniLM-L6{}{})",
            m.nets.len(),
            match t.opts.teacher_top_layers {
                0 => String::new(),
                n => format!(", top {n} tuned"),
            },
            match t.opts.image_tail {
                None => String::new(),
                Some(n) => format!(", EfficientNet's last {n} blocks + head tuned"),
            }
        ),
        val: done.val.clone(),
        val_text_less: Some(done.val_text_less.clone()),
        best_epochs: m.best_epochs,
        train_seconds: m.seconds,
    };
    Ok((Ensemble::new(m.config, m.nets, &done, true), row))
}

/// A teacher of this recipe from an earlier run's directory.
fn read(t: &Trainer, dir: &Path, tail: Option<&Tail>) -> Result<Members> {
    let model = ModelDir::load(dir, t.device)?;
    if model.spec.image_input != TEACHER_INPUT || model.spec.text_layers != TEACHER_TEXT_LAYERS {
        bail!("{} is not a teacher of this recipe", dir.display());
    }
    let nets = model
        .members
        .into_iter()
        .enumerate()
        .map(|(i, fusion)| {
            let top = load_top(dir, i, t.opts.teacher_top_layers, t.device)?;
            let tail = load_tail(dir, i, tail)?;
            Ok(TunedFusion { top, tail, fusion })
        })
        .collect::<Result<_>>()?;
    Ok(Members {
        config: model.spec.fusion,
        nets,
        best_epochs: vec![],
        seconds: 0.0,
    })
}

/// `teacher_members` networks on all fit rows, against the hard labels.
fn train(t: &Trainer, text_top: &[BertLayer], tail: Option<&Tail>) -> Result<Members> {
    let config = fusion::config(Role::Teacher, true, true, t.labels.len());
    let targets = t.fit.hard(&t.fit.all);
    let net = Net {
        config: &config,
        top: text_top,
        tail,
        role: Role::Teacher,
        rows: &t.fit.all,
        targets: &targets,
        seed: t.opts.seed,
        name: "teacher",
    };
    let trained = t.ensemble(net, t.opts.teacher_members)?;
    Ok(Members {
        best_epochs: trained.iter().map(|m| m.best_epoch).collect(),
        seconds: trained.iter().map(|m| m.seconds).sum(),
        nets: trained.into_iter().map(|m| m.model).collect(),
        config,
    })
}
