//! Networks whose sigmoid scores are averaged: how an ensemble scores a split, how
//! its two threshold sets are tuned, and how it is written as a model directory.

use super::data::Part;
use crate::infer::labels::labels;
use crate::model::dir::{ModelDir, ModelSpec, TowerSource, tail_file, top_file};
use crate::model::towers::{load_burnpack, save_burnpack};
use crate::nn::bert::{BertConfig, BertLayer};
use crate::nn::efficientnet::Tail;
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::train::fusion::{self, Role, Scoring, View};
use crate::train::metrics::{Report, ThresholdSpread, tune_thresholds};
use crate::train::report::scored;
use crate::train::tokens::{
    STUDENT_INPUT, STUDENT_TEXT_LAYERS, TEACHER_INPUT, TEACHER_TEXT_LAYERS,
};
use anyhow::{Result, bail};
use burn::prelude::*;
use std::path::Path;

/// Networks whose sigmoid scores are averaged, with their thresholds.
pub struct Ensemble {
    /// The members' shape.
    pub config: FusionConfig,
    /// The trained networks, each with its tuned MiniLM layers (if any).
    pub members: Vec<TunedFusion>,
    /// Per-genre thresholds with the overview.
    pub thresholds: Vec<f32>,
    /// Per-genre thresholds without it (the kiosk case).
    pub thresholds_text_less: Vec<f32>,
    /// Whether the text-less scores average the poster and its mirror image.
    pub tta_text_less: bool,
}

/// How a set of networks votes: the mean of their scores, over both views for `tta`
/// (and for `tta_text_less` when the text is hidden).
#[derive(Clone)]
pub(super) struct Vote<'a> {
    pub(super) members: Vec<&'a TunedFusion>,
    pub(super) config: &'a FusionConfig,
    pub(super) role: Role,
    pub(super) tta: bool,
    pub(super) tta_text_less: bool,
}

/// Out-of-fold scores of the fit rows, with their labels: the rows with text as
/// given, and all rows with the text hidden.
pub(super) struct OutOfFold {
    pub(super) with_text: (Vec<f32>, Vec<u8>),
    pub(super) text_less: (Vec<f32>, Vec<u8>),
    /// How far the per-genre thresholds move when each fold tunes its own.
    pub(super) spread: Vec<ThresholdSpread>,
}

/// Both threshold sets of a vote, and val with and without the overview.
pub(super) struct Finished {
    pub(super) thresholds: Vec<f32>,
    pub(super) thresholds_text_less: Vec<f32>,
    pub(super) val: Report,
    pub(super) val_text_less: Report,
}

impl Vote<'_> {
    /// Mean scores `[rows, classes]` of `rows` of `part`.
    pub(super) fn scores(
        &self,
        part: &Part,
        rows: &[usize],
        text_less: bool,
        device: &Device,
    ) -> Vec<f32> {
        let views: &[View] = if self.tta || (text_less && self.tta_text_less) {
            &[View::Plain, View::Flipped]
        } else {
            &[View::Plain]
        };
        let w = 1.0 / (self.members.len() * views.len()) as f32;
        let mut acc = vec![0f32; rows.len() * self.config.classes];
        for m in &self.members {
            for &view in views {
                let s = Scoring {
                    set: &part.set,
                    rows,
                    role: self.role,
                    view,
                    text_less,
                };
                let s = fusion::score(m, self.config, &s, device);
                for (a, b) in acc.iter_mut().zip(&s) {
                    *a += b * w;
                }
            }
        }
        acc
    }

    /// Tunes both threshold sets on the tune rows (and out-of-fold fit rows, when
    /// given) and reports val with and without text.
    pub(super) fn finish(
        &self,
        (tune, val): (&Part, &Part),
        labels: &[String],
        oof: Option<&OutOfFold>,
        device: &Device,
    ) -> Finished {
        let k = labels.len();
        let with_oof = |s: Vec<f32>, y: Vec<u8>, extra: Option<&(Vec<f32>, Vec<u8>)>| match extra {
            Some((xs, xy)) => {
                tune_thresholds(&[s, xs.clone()].concat(), &[y, xy.clone()].concat(), k)
            }
            None => tune_thresholds(&s, &y, k),
        };
        let s = self.scores(tune, &tune.with_text, false, device);
        let t = with_oof(s, tune.y_of(&tune.with_text), oof.map(|o| &o.with_text));
        let s_less = self.scores(tune, &tune.all, true, device);
        let t_less = with_oof(s_less, tune.y_of(&tune.all), oof.map(|o| &o.text_less));
        let y_val = val.y_of(&val.all);
        let v = self.scores(val, &val.all, false, device);
        let v_less = self.scores(val, &val.all, true, device);
        Finished {
            val: scored(&v, &t, &y_val, labels),
            val_text_less: scored(&v_less, &t_less, &y_val, labels),
            thresholds: t,
            thresholds_text_less: t_less,
        }
    }
}

impl Ensemble {
    /// The ensemble of `members` with the thresholds `finished` tuned for them (on
    /// text-less scores over both views when `tta_text_less`).
    pub(super) fn new(
        config: FusionConfig,
        members: Vec<TunedFusion>,
        finished: &Finished,
        tta_text_less: bool,
    ) -> Self {
        Self {
            config,
            members,
            thresholds: finished.thresholds.clone(),
            thresholds_text_less: finished.thresholds_text_less.clone(),
            tta_text_less,
        }
    }

    /// Writes the ensemble as a model directory whose towers come from the cache,
    /// with each member's tuned MiniLM layers beside it (`text_top_<i>.bpk`).
    pub fn save(self, role: Role, training: serde_json::Value, dir: &Path) -> Result<()> {
        let (id, input, layers, tta) = match role {
            Role::Teacher => (
                "marquee-early-fusion-teacher",
                TEACHER_INPUT,
                TEACHER_TEXT_LAYERS,
                true,
            ),
            Role::Student => (
                "marquee-early-fusion-student",
                STUDENT_INPUT,
                STUDENT_TEXT_LAYERS,
                false,
            ),
        };
        let tops: Vec<Vec<BertLayer>> = self.members.iter().map(|m| m.top.clone()).collect();
        let tails: Vec<Option<Tail>> = self.members.iter().map(|m| m.tail.clone()).collect();
        ModelDir {
            spec: ModelSpec {
                id: id.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                labels: labels(),
                thresholds: self.thresholds,
                thresholds_text_less: self.thresholds_text_less,
                fusion: self.config,
                members: self.members.len(),
                tta_flip: tta,
                tta_flip_text_less: self.tta_text_less,
                image_input: input,
                text_layers: layers,
                towers: TowerSource::Cache,
                training,
            },
            members: self.members.into_iter().map(|m| m.fusion).collect(),
        }
        .save(dir)?;
        for (i, top) in tops.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            save_burnpack(top, &dir.join(top_file(i)))?;
        }
        for (i, tail) in tails.iter().enumerate() {
            if let Some(tail) = tail {
                save_burnpack(tail, &dir.join(tail_file(i)))?;
            }
        }
        Ok(())
    }
}

/// Member `i`'s tuned EfficientNet tail from a teacher directory, shaped as
/// `pretrained` (none when the run tunes no tail).
pub(super) fn load_tail(dir: &Path, i: usize, pretrained: Option<&Tail>) -> Result<Option<Tail>> {
    let path = dir.join(tail_file(i));
    match (pretrained, path.is_file()) {
        (None, false) => Ok(None),
        (None, true) => bail!(
            "{} tunes EfficientNet's last blocks: give --tune-image-blocks",
            dir.display()
        ),
        (Some(_), false) => bail!("{} has no tuned EfficientNet blocks", dir.display()),
        (Some(t), true) => {
            let mut tail = t.clone();
            load_burnpack(&mut tail, &path)?;
            Ok(Some(tail))
        }
    }
}

/// Member `i`'s `n` tuned MiniLM layers from a teacher directory (none for `n` = 0).
pub(super) fn load_top(dir: &Path, i: usize, n: usize, device: &Device) -> Result<Vec<BertLayer>> {
    let path = dir.join(top_file(i));
    match (n, path.is_file()) {
        (0, false) => Ok(Vec::new()),
        (0, true) => bail!(
            "{} tunes MiniLM layers: give --teacher-top-layers",
            dir.display()
        ),
        (_, false) => bail!("{} has no tuned MiniLM layers", dir.display()),
        (n, true) => {
            let mut top: Vec<BertLayer> = (0..n)
                .map(|_| BertLayer::new(&BertConfig::MINILM_L6, device))
                .collect();
            load_burnpack(&mut top, &path)?;
            Ok(top)
        }
    }
}
