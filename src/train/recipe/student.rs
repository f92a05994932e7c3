//! The student: the shipped model, distilled from the teacher's soft labels for
//! every training poster, with its thresholds tuned out of fold by default.

use super::data::Part;
use super::ensemble::{Ensemble, OutOfFold, Vote};
use super::options::Thresholds;
use super::trainer::{Net, Trainer, member_names, member_nets};
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::train::fusion::{self, Role};
use crate::train::manifest::Row;
use crate::train::metrics::{ThresholdSpread, tune_thresholds};
use crate::train::report::{Ablation, scored};
use crate::train::split::{FOLDS, fold_of};
use crate::util::progress::note;
use anyhow::Result;

/// The student ensemble, its row of the ablation table, and (out of fold) how far
/// its thresholds move between the folds.
pub(super) struct Student {
    pub(super) ensemble: Ensemble,
    pub(super) row: Ablation,
    pub(super) spread: Vec<ThresholdSpread>,
}

/// Distils the student from `teacher` and tunes its thresholds.
pub(super) fn student(
    t: &Trainer,
    teacher: &Ensemble,
    fit_rows: &[Row],
    val: &Part,
) -> Result<Student> {
    let targets = soft_targets(t, teacher);
    let config = fusion::config(Role::Student, true, true, t.labels.len());
    let net = Net {
        config: &config,
        top: &[],
        tail: None,
        role: Role::Student,
        rows: &t.fit.all,
        targets: &targets,
        seed: t.opts.seed,
        name: "student",
    };
    let names = member_names(net.name, t.opts.student_members);
    let out_of_fold_on = t.opts.thresholds == Thresholds::OutOfFold;
    let folds = match out_of_fold_on {
        true => fold_sets(t, &targets, fit_rows),
        false => Vec::new(),
    };
    // The members and the fold students are independent: one batch of networks.
    let mut nets = member_nets(net, &names);
    nets.extend(folds.iter().map(|f| Net {
        rows: &f.rows,
        targets: &f.targets,
        name: &f.name,
        ..net
    }));
    let mut students = t.train_all(&nets)?;
    let fold_nets: Vec<TunedFusion> = students
        .split_off(names.len())
        .into_iter()
        .map(|s| s.model)
        .collect();
    let oof = out_of_fold_on.then(|| out_of_fold(t, &config, &fold_nets, fit_rows));
    let vote = Vote {
        members: students.iter().map(|s| &s.model).collect(),
        config: &config,
        role: Role::Student,
        tta: false,
        tta_text_less: t.opts.kiosk_flips(),
    };
    let done = vote.finish((t.tune, val), t.labels, oof.as_ref(), t.device);
    let row = Ablation {
        name: format!(
            "early-fusion student ({} members, 160x240, MiniLM-L3){}",
            students.len(),
            match t.opts.thresholds {
                Thresholds::Tune => String::new(),
                Thresholds::OutOfFold => format!(", {FOLDS}-fold thresholds"),
            }
        ),
        val: done.val.clone(),
        val_text_less: Some(done.val_text_less.clone()),
        best_epochs: students.iter().map(|s| s.best_epoch).collect(),
        train_seconds: students.iter().map(|s| s.seconds).sum(),
    };
    let members = students.into_iter().map(|s| s.model).collect();
    Ok(Student {
        ensemble: Ensemble::new(config, members, &done, t.opts.kiosk_flips()),
        row,
        spread: oof.map(|o| o.spread).unwrap_or_default(),
    })
}

/// One fold's student: the fit rows outside the fold, with their targets.
struct FoldSet {
    rows: Vec<usize>,
    targets: Vec<f32>,
    name: String,
}

/// Each fold's rows to train on. One network per fold keeps the recipe inside its
/// time budget; the tune films are scored by the whole ensemble.
fn fold_sets(t: &Trainer, targets: &[f32], fit_rows: &[Row]) -> Vec<FoldSet> {
    let k = t.labels.len();
    let fold: Vec<usize> = fit_rows.iter().map(|r| fold_of(&r.film)).collect();
    (0..FOLDS)
        .map(|f| {
            let rows: Vec<usize> = t
                .fit
                .all
                .iter()
                .copied()
                .filter(|&r| fold[r] != f)
                .collect();
            let targets = rows
                .iter()
                .flat_map(|&r| targets[r * k..(r + 1) * k].iter().copied())
                .collect();
            let name = format!("student, fold {}/{FOLDS}", f + 1);
            FoldSet {
                rows,
                targets,
                name,
            }
        })
        .collect()
}

/// The student's targets: the hard labels and the teacher's plain-view scores of
/// every fit row, mixed by `hard_weight`.
fn soft_targets(t: &Trainer, teacher: &Ensemble) -> Vec<f32> {
    note("scoring the fit rows with the teacher for distillation");
    let vote = Vote {
        members: teacher.members.iter().collect(),
        config: &teacher.config,
        role: Role::Teacher,
        tta: false,
        tta_text_less: false,
    };
    let soft = vote.scores(t.fit, &t.fit.all, false, t.device);
    let w = t.opts.hard_weight;
    t.fit
        .hard(&t.fit.all)
        .iter()
        .zip(&soft)
        .map(|(h, s)| w * h + (1.0 - w) * s)
        .collect()
}

/// Puts the scores of a fold's held-out rows (`held[j]` is row j's place) into the
/// out-of-fold table, `k` scores a row.
fn scatter(out: &mut [f32], held: &[usize], scores: &[f32], k: usize) {
    for (j, &i) in held.iter().enumerate() {
        out[i * k..(i + 1) * k].copy_from_slice(&scores[j * k..(j + 1) * k]);
    }
}

/// Out of fold: each fold's student (`fold_nets[f]`, trained without the fit films
/// of fold f) scores the films of its fold.
fn out_of_fold(
    t: &Trainer,
    config: &FusionConfig,
    fold_nets: &[TunedFusion],
    fit_rows: &[Row],
) -> OutOfFold {
    let (fit, k) = (t.fit, t.labels.len());
    let fold: Vec<usize> = fit_rows.iter().map(|r| fold_of(&r.film)).collect();
    let mut with_text = vec![0f32; fit.with_text.len() * k];
    let mut text_less = vec![0f32; fit.all.len() * k];
    let kiosk_flip = t.opts.kiosk_flips();
    let mut plain_less = vec![0f32; if kiosk_flip { text_less.len() } else { 0 }];
    // Each fold's own thresholds, to show how far they move (not used to decide).
    let (mut f_text, mut f_less) = (Vec::new(), Vec::new());
    for (f, m) in fold_nets.iter().enumerate() {
        let alone = Vote {
            members: vec![m],
            config,
            role: Role::Student,
            tta: false,
            tta_text_less: kiosk_flip,
        };
        for (rows, text_hidden, out, folds) in [
            (&fit.with_text, false, &mut with_text, &mut f_text),
            (&fit.all, true, &mut text_less, &mut f_less),
        ] {
            let held: Vec<usize> = (0..rows.len()).filter(|&i| fold[rows[i]] == f).collect();
            let held_rows: Vec<usize> = held.iter().map(|&i| rows[i]).collect();
            let s = alone.scores(fit, &held_rows, text_hidden, t.device);
            scatter(out, &held, &s, k);
            folds.push(tune_thresholds(&s, &fit.y_of(&held_rows), k));
            if text_hidden && kiosk_flip {
                let plain = Vote {
                    tta_text_less: false,
                    ..alone.clone()
                };
                let s = plain.scores(fit, &held_rows, true, t.device);
                scatter(&mut plain_less, &held, &s, k);
            }
        }
    }
    if kiosk_flip {
        // What the mirror image adds, on 9,001 posters no fold network trained on
        // (each view's thresholds tuned on its own scores: the same optimism for both).
        let y = fit.y_of(&fit.all);
        let macro_of = |s: &[f32]| scored(s, &tune_thresholds(s, &y, k), &y, t.labels).macro_f1;
        note(&format!(
            "out-of-fold text-less macro-F1: {:.4} on the poster alone, {:.4} with its mirror image",
            macro_of(&plain_less),
            macro_of(&text_less)
        ));
    }
    OutOfFold {
        with_text: (with_text, fit.y_of(&fit.with_text)),
        text_less: (text_less, fit.y_of(&fit.all)),
        spread: vec![
            ThresholdSpread::of("early-fusion student, fold networks", &f_text, t.labels),
            ThresholdSpread::of(
                "early-fusion student, fold networks, text-less",
                &f_less,
                t.labels,
            ),
        ],
    }
}
