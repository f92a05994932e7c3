//! The single-modality networks (poster only, text only) and their late fusion: the
//! ablations that show what early fusion adds.

use super::data::Part;
use super::ensemble::Vote;
use super::trainer::{Net, Trainer};
use crate::nn::efficientnet::Tail;
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::train::fusion::{self, Role};
use crate::train::metrics::tune_thresholds;
use crate::train::report::{Ablation, scored};
use anyhow::Result;

/// Trains the poster-only and text-only networks and reports them, and the mean of
/// the two, on `val`. The poster-only network tunes `tail` when given.
pub(super) fn single_modality(
    t: &Trainer,
    tail: Option<&Tail>,
    val: &Part,
) -> Result<Vec<Ablation>> {
    let (fit, tune, labels) = (t.fit, t.tune, t.labels);
    let k = labels.len();
    let c_poster = fusion::config(Role::Teacher, true, false, k);
    let c_text = fusion::config(Role::Teacher, false, true, k);
    let (y_all, y_text) = (fit.hard(&fit.all), fit.hard(&fit.with_text));
    let poster = Net {
        config: &c_poster,
        top: &[],
        tail,
        role: Role::Teacher,
        rows: &fit.all,
        targets: &y_all,
        seed: t.opts.seed,
        name: "poster-only",
    };
    let text = Net {
        config: &c_text,
        top: &[],
        tail: None,
        role: Role::Teacher,
        rows: &fit.with_text,
        targets: &y_text,
        seed: t.opts.seed,
        name: "text-only",
    };
    let [poster, text]: [_; 2] = t
        .train_all(&[poster, text])?
        .try_into()
        .map_err(|_| anyhow::anyhow!("two networks were asked for"))?;
    // One network, plain view, text as given.
    let single = |m: &TunedFusion, c: &FusionConfig, p: &Part, rows: &[usize]| {
        let vote = Vote {
            members: vec![m],
            config: c,
            role: Role::Teacher,
            tta: false,
            tta_text_less: false,
        };
        vote.scores(p, rows, false, t.device)
    };
    let y_tune_text = tune.y_of(&tune.with_text);
    let y_tune_all = tune.y_of(&tune.all);
    let y_val = val.y_of(&val.all);
    let s_poster_tune = single(&poster.model, &c_poster, tune, &tune.with_text);
    let s_text_tune = single(&text.model, &c_text, tune, &tune.with_text);
    let s_poster_val = single(&poster.model, &c_poster, val, &val.all);
    let s_text_val = single(&text.model, &c_text, val, &val.all);
    let t_poster = tune_thresholds(
        &single(&poster.model, &c_poster, tune, &tune.all),
        &y_tune_all,
        k,
    );
    let poster_val = scored(&s_poster_val, &t_poster, &y_val, labels);
    let late = |a: &[f32], b: &[f32]| -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()
    };
    let t_late = tune_thresholds(&late(&s_poster_tune, &s_text_tune), &y_tune_text, k);
    Ok(vec![
        Ablation {
            name: "poster-only".into(),
            val: poster_val.clone(),
            val_text_less: Some(poster_val.clone()),
            best_epochs: vec![poster.best_epoch],
            train_seconds: poster.seconds,
        },
        Ablation {
            name: "text-only".into(),
            val: scored(&s_text_val, &text.thresholds, &y_val, labels),
            val_text_less: None,
            best_epochs: vec![text.best_epoch],
            train_seconds: text.seconds,
        },
        Ablation::fitted(
            "late fusion (mean of the two)".into(),
            scored(&late(&s_poster_val, &s_text_val), &t_late, &y_val, labels),
            Some(poster_val),
            0.0,
        ),
    ])
}
