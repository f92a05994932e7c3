//! The training recipe behind the shipped model: an early-fusion teacher ensemble,
//! the single-modality and late-fusion ablations, and a student distilled from the
//! teacher's soft labels. Everything is scored on val, which nothing here tunes on:
//! epochs and thresholds are chosen on held-out training films ("tune").

use super::fit_tune_split;
use super::fusion::{self, FusionOptions, Role, Trained, View};
use super::manifest::{Manifest, Row, multi_hot};
use super::metrics::{Report, ThresholdSpread, decide_all, report, tune_thresholds};
use super::peers::{self, FOLDS, PeerData, PeerReport, Pooled, fold_of};
use super::tokens::{Extra, TokenSet, extract_tokens};
use super::tokens::{STUDENT_INPUT, STUDENT_TEXT_LAYERS, TEACHER_INPUT, TEACHER_TEXT_LAYERS};
use crate::infer::labels::labels;
use crate::model::cache::CacheDir;
use crate::model::dir::{ModelDir, ModelSpec, TowerSource, top_file};
use crate::model::towers::{Form, Towers, load_burnpack, save_burnpack};
use crate::nn::bert::{BertConfig, BertLayer};
use crate::nn::fusion::{FusionConfig, TunedFusion};
use crate::util::progress::note;
use anyhow::{Result, bail};
use burn::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct RecipeOptions {
    pub seed: u64,
    pub teacher_members: usize,
    /// MiniLM's top layers that each teacher network tunes inside it (0: the
    /// teacher reads frozen layer-6 states, as every other network does).
    pub teacher_top_layers: usize,
    /// Networks in the student ensemble (seeds `seed`, `seed + 1`, ...).
    pub student_members: usize,
    /// The student's share of text rows trained without their text: higher than the
    /// other networks' (`fusion.text_dropout`), because the student alone serves the
    /// kiosk, where no overview comes with the poster.
    pub student_text_dropout: f64,
    /// Weight of the hard labels in the student's targets (the rest is the teacher's).
    pub hard_weight: f32,
    /// Use only the first N fit rows (smoke tests); 0 = all.
    pub fit_limit: usize,
    pub fusion: FusionOptions,
    /// How far the recipe goes.
    pub until: Until,
    /// Where the student's thresholds are tuned.
    pub thresholds: Thresholds,
    /// Distil from this trained teacher (an earlier run's `WORK/teacher`) instead of
    /// fitting the peers, the single-modality networks and a teacher.
    pub teacher_from: Option<PathBuf>,
}

/// Where the student's per-genre thresholds are tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Thresholds {
    /// On the tune films alone (981 rows), as every other network's.
    Tune,
    /// On the tune films and on out-of-fold scores of all fit films: one more
    /// student per fold, each trained without the films it scores.
    OutOfFold,
}

/// The last step a run takes (experiments stop early; only `Student` bundles a model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Until {
    /// The logistic-regression peers.
    Peers,
    /// The peers, the single-modality networks and their late fusion.
    Ablations,
    /// Everything: the teacher and the distilled student too.
    Student,
    /// The teacher alone, without the peers and the single-modality networks.
    Teacher,
}

impl Default for RecipeOptions {
    fn default() -> Self {
        Self {
            seed: 42,
            teacher_members: 2,
            teacher_top_layers: 1,
            student_members: 2,
            student_text_dropout: 0.5,
            hard_weight: 0.5,
            fit_limit: 0,
            fusion: FusionOptions::default(),
            until: Until::Student,
            thresholds: Thresholds::OutOfFold,
            teacher_from: None,
        }
    }
}

/// One line of the ablation table.
#[derive(Debug, Clone, Serialize)]
pub struct Ablation {
    pub name: String,
    pub val: Report,
    /// The same model with the overview hidden (poster + caption; the kiosk case).
    pub val_text_less: Option<Report>,
    pub best_epochs: Vec<usize>,
    pub train_seconds: f64,
}

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

/// Networks whose sigmoid scores are averaged, with their thresholds.
pub struct Ensemble {
    pub config: FusionConfig,
    pub members: Vec<TunedFusion>,
    pub thresholds: Vec<f32>,
    pub thresholds_text_less: Vec<f32>,
}

/// Rows of a split as indices into its token set, with and without text.
struct Part {
    set: TokenSet,
    y: Vec<u8>,
    all: Vec<usize>,
    with_text: Vec<usize>,
}

impl Part {
    fn new(set: TokenSet, rows: &[Row], labels: &[String]) -> Self {
        let all: Vec<usize> = (0..set.n).collect();
        let with_text = all
            .iter()
            .copied()
            .filter(|&i| set.text_len(i) > 0)
            .collect();
        Self {
            y: multi_hot(rows, labels),
            set,
            all,
            with_text,
        }
    }

    fn y_of(&self, idx: &[usize]) -> Vec<u8> {
        let k = self.y.len() / self.set.n.max(1);
        idx.iter()
            .flat_map(|&i| self.y[i * k..(i + 1) * k].iter().copied())
            .collect()
    }
}

fn mean_into(acc: &mut [f32], add: &[f32], weight: f32) {
    for (a, b) in acc.iter_mut().zip(add) {
        *a += b * weight;
    }
}

/// Mean scores of an ensemble over its members (and both views, for `tta`).
#[allow(clippy::too_many_arguments)]
fn ensemble_scores(
    e: &[&TunedFusion],
    c: &FusionConfig,
    part: &Part,
    rows: &[usize],
    role: Role,
    tta: bool,
    text_less: bool,
    device: &Device,
) -> Vec<f32> {
    let views: &[View] = if tta {
        &[View::Plain, View::Flipped]
    } else {
        &[View::Plain]
    };
    let w = 1.0 / (e.len() * views.len()) as f32;
    let mut acc = vec![0f32; rows.len() * c.classes];
    for m in e {
        for &v in views {
            let s = fusion::score(m, c, &part.set, rows, role, v, text_less, device);
            mean_into(&mut acc, &s, w);
        }
    }
    acc
}

fn tuned(scores: &[f32], truth: &[u8], k: usize) -> Vec<f32> {
    tune_thresholds(scores, truth, k)
}

fn eval(scores: &[f32], thresholds: &[f32], truth: &[u8], labels: &[String]) -> Report {
    report(&decide_all(scores, thresholds), truth, labels)
}

/// The three splits' token features, extracted once (or read from the cache).
struct Data {
    fit_rows: Vec<Row>,
    tune_rows: Vec<Row>,
    fit: Part,
    tune: Part,
    val: Part,
    /// Pretrained copies of the MiniLM layers the teacher tunes (none by default).
    text_top: Vec<BertLayer>,
}

fn load(
    manifest_path: &Path,
    cache: &CacheDir,
    device: &Device,
    opts: &RecipeOptions,
    labels: &[String],
) -> Result<Data> {
    let manifest = Manifest::load(manifest_path)?;
    let (mut fit_rows, tune_rows) = fit_tune_split(&manifest.split(Some("train")));
    if opts.fit_limit > 0 {
        fit_rows.truncate(opts.fit_limit);
    }
    let val_rows = manifest.split(Some("val"));
    if fit_rows.is_empty() || tune_rows.is_empty() || val_rows.is_empty() {
        bail!(
            "manifest {} lacks train or val rows",
            manifest_path.display()
        );
    }
    let towers = Towers::load(cache, device, Form::Modules)?;
    let top = opts.teacher_top_layers;
    if top > TEACHER_TEXT_LAYERS {
        bail!("the teacher can tune at most {TEACHER_TEXT_LAYERS} MiniLM layers, not {top}");
    }
    let below = (top > 0).then_some(TEACHER_TEXT_LAYERS - top);
    let dir = cache.tokens();
    note(&format!(
        "token features: {} fit, {} tune, {} val rows (cached in {})",
        fit_rows.len(),
        tune_rows.len(),
        val_rows.len(),
        dir.display()
    ));
    let val = Part::new(
        extract_tokens(
            &towers,
            device,
            &manifest,
            &val_rows,
            &dir,
            Extra { flip: true, below },
        )?,
        &val_rows,
        labels,
    );
    let tune = Part::new(
        extract_tokens(
            &towers,
            device,
            &manifest,
            &tune_rows,
            &dir,
            Extra { flip: true, below },
        )?,
        &tune_rows,
        labels,
    );
    let fit = Part::new(
        extract_tokens(
            &towers,
            device,
            &manifest,
            &fit_rows,
            &dir,
            Extra { flip: false, below },
        )?,
        &fit_rows,
        labels,
    );
    Ok(Data {
        fit_rows,
        tune_rows,
        fit,
        tune,
        val,
        text_top: towers.text.top_layers(top),
    })
}

/// The logistic-regression peers on the frozen features (`peers.rs`).
fn peers(data: &Data, labels: &[String]) -> Result<PeerReport> {
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

pub fn run(
    manifest_path: &Path,
    cache: &CacheDir,
    device: &Device,
    opts: &RecipeOptions,
) -> Result<RecipeOutput> {
    let labels = labels();
    let k = labels.len();
    let data = load(manifest_path, cache, device, opts, &labels)?;
    // A run from an earlier teacher, or of the teacher alone, fits no peers.
    let full = opts.teacher_from.is_none() && opts.until != Until::Teacher;
    let peer_report = match full {
        true => Some(peers(&data, &labels)?),
        false => None,
    };
    let early = |ablations: Vec<Ablation>, peers: Option<PeerReport>| RecipeOutput {
        ablations,
        peers,
        teacher: None,
        student: None,
        student_spread: Vec::new(),
    };
    let mut ablations = peer_report
        .as_ref()
        .map(|p| p.ablations.clone())
        .unwrap_or_default();
    if opts.until == Until::Peers {
        return Ok(early(ablations, peer_report));
    }
    let Data {
        fit_rows,
        fit,
        tune,
        val,
        text_top,
        ..
    } = data;

    let hard =
        |p: &Part, idx: &[usize]| -> Vec<f32> { p.y_of(idx).iter().map(|&v| v as f32).collect() };
    let train_one = |c: &FusionConfig,
                     top: Vec<BertLayer>,
                     role: Role,
                     rows: &[usize],
                     targets: &[f32],
                     seed: u64,
                     name: &str|
     -> Trained {
        let sel = if c.use_text {
            &tune.with_text
        } else {
            &tune.all
        };
        let y_sel = tune.y_of(sel);
        let o = FusionOptions {
            seed,
            text_dropout: match role {
                Role::Student => opts.student_text_dropout,
                Role::Teacher => opts.fusion.text_dropout,
            },
            ..opts.fusion.clone()
        };
        fusion::train(
            c,
            top,
            role,
            &fit.set,
            rows,
            targets,
            (&tune.set, sel, &y_sel),
            &labels,
            &o,
            name,
            device,
        )
    };
    // `members` networks on all fit rows, seeds `seed`, `seed + 1`, ...
    let ensemble = |c: &FusionConfig,
                    top: &[BertLayer],
                    role: Role,
                    targets: &[f32],
                    members: usize,
                    name: &str|
     -> Vec<Trained> {
        (0..members)
            .map(|m| {
                let name = format!("{name} {}/{members}", m + 1);
                let seed = opts.seed + m as u64;
                train_one(c, top.to_vec(), role, &fit.all, targets, seed, &name)
            })
            .collect()
    };
    let y_tune_text = tune.y_of(&tune.with_text);
    let y_tune_all = tune.y_of(&tune.all);
    let y_val = val.y_of(&val.all);

    // Single-modality models and their late fusion.
    if full {
        let c_poster = fusion::config(Role::Teacher, true, false, k);
        let poster = train_one(
            &c_poster,
            Vec::new(),
            Role::Teacher,
            &fit.all,
            &hard(&fit, &fit.all),
            opts.seed,
            "poster-only",
        );
        let c_text = fusion::config(Role::Teacher, false, true, k);
        let text = train_one(
            &c_text,
            Vec::new(),
            Role::Teacher,
            &fit.with_text,
            &hard(&fit, &fit.with_text),
            opts.seed,
            "text-only",
        );
        // One network, plain view, text as given.
        let single = |m: &TunedFusion, c: &FusionConfig, p: &Part, rows: &[usize]| {
            ensemble_scores(&[m], c, p, rows, Role::Teacher, false, false, device)
        };
        let s_poster_tune = single(&poster.model, &c_poster, &tune, &tune.with_text);
        let s_text_tune = single(&text.model, &c_text, &tune, &tune.with_text);
        let s_poster_val = single(&poster.model, &c_poster, &val, &val.all);
        let s_text_val = single(&text.model, &c_text, &val, &val.all);
        let t_poster = tuned(
            &single(&poster.model, &c_poster, &tune, &tune.all),
            &y_tune_all,
            k,
        );
        ablations.push(Ablation {
            name: "poster-only".into(),
            val: eval(&s_poster_val, &t_poster, &y_val, &labels),
            val_text_less: Some(eval(&s_poster_val, &t_poster, &y_val, &labels)),
            best_epochs: vec![poster.best_epoch],
            train_seconds: poster.seconds,
        });
        ablations.push(Ablation {
            name: "text-only".into(),
            val: eval(&s_text_val, &text.thresholds, &y_val, &labels),
            val_text_less: None,
            best_epochs: vec![text.best_epoch],
            train_seconds: text.seconds,
        });
        let late = |a: &[f32], b: &[f32]| -> Vec<f32> {
            a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()
        };
        let t_late = tuned(&late(&s_poster_tune, &s_text_tune), &y_tune_text, k);
        ablations.push(Ablation {
            name: "late fusion (mean of the two)".into(),
            val: eval(&late(&s_poster_val, &s_text_val), &t_late, &y_val, &labels),
            val_text_less: Some(eval(&s_poster_val, &t_poster, &y_val, &labels)),
            best_epochs: vec![],
            train_seconds: 0.0,
        });
    }
    if opts.until == Until::Ablations {
        return Ok(early(ablations, peer_report));
    }

    // The early-fusion teacher: an ensemble of seeds, scored with a mirror-image view too.
    let y_fit_all = hard(&fit, &fit.all);
    let (c_teacher, members, best_epochs, seconds) = match &opts.teacher_from {
        Some(dir) => {
            let t = ModelDir::load(dir, device)?;
            if t.spec.image_input != TEACHER_INPUT || t.spec.text_layers != TEACHER_TEXT_LAYERS {
                bail!("{} is not a teacher of this recipe", dir.display());
            }
            let members: Vec<TunedFusion> = t
                .members
                .into_iter()
                .enumerate()
                .map(|(i, fusion)| {
                    let top = load_top(dir, i, opts.teacher_top_layers, device)?;
                    Ok(TunedFusion { top, fusion })
                })
                .collect::<Result<_>>()?;
            (t.spec.fusion, members, vec![], 0.0)
        }
        None => {
            let c_teacher = fusion::config(Role::Teacher, true, true, k);
            let trained = ensemble(
                &c_teacher,
                &text_top,
                Role::Teacher,
                &y_fit_all,
                opts.teacher_members,
                "teacher",
            );
            let epochs = trained.iter().map(|t| t.best_epoch).collect();
            let seconds = trained.iter().map(|t| t.seconds).sum();
            let models = trained.into_iter().map(|t| t.model).collect();
            (c_teacher, models, epochs, seconds)
        }
    };
    let refs: Vec<&TunedFusion> = members.iter().collect();
    let teacher = finish(
        &refs,
        &c_teacher,
        Role::Teacher,
        true,
        &tune,
        &val,
        &y_val,
        &labels,
        None,
        device,
    );
    ablations.push(Ablation {
        name: format!(
            "early-fusion teacher ({} members, flip TTA, 224x336, MiniLM-L6{})",
            members.len(),
            match opts.teacher_top_layers {
                0 => String::new(),
                n => format!(", top {n} tuned"),
            }
        ),
        val: teacher.1,
        val_text_less: Some(teacher.2),
        best_epochs,
        train_seconds: seconds,
    });
    let teacher_e = Ensemble {
        thresholds: teacher.0.0,
        thresholds_text_less: teacher.0.1,
        config: c_teacher.clone(),
        members,
    };
    if opts.until == Until::Teacher {
        return Ok(RecipeOutput {
            teacher: Some(teacher_e),
            ..early(ablations, None)
        });
    }
    let refs: Vec<&TunedFusion> = teacher_e.members.iter().collect();

    // The student, on the teacher's soft labels for every training poster.
    note("scoring the fit rows with the teacher for distillation");
    let soft = ensemble_scores(
        &refs,
        &c_teacher,
        &fit,
        &fit.all,
        Role::Teacher,
        false,
        false,
        device,
    );
    let targets: Vec<f32> = y_fit_all
        .iter()
        .zip(&soft)
        .map(|(h, s)| opts.hard_weight * h + (1.0 - opts.hard_weight) * s)
        .collect();
    let c_student = fusion::config(Role::Student, true, true, k);
    let students = ensemble(
        &c_student,
        &[],
        Role::Student,
        &targets,
        opts.student_members,
        "student",
    );
    // Out of fold: each fold's student is trained without the fit films it scores.
    // One network per fold keeps the recipe inside its time budget; the tune films
    // are scored by the whole ensemble.
    let oof = (opts.thresholds == Thresholds::OutOfFold).then(|| {
        let fold: Vec<usize> = fit_rows.iter().map(|r| fold_of(&r.film)).collect();
        let mut with_text = vec![0f32; fit.with_text.len() * k];
        let mut text_less = vec![0f32; fit.all.len() * k];
        // Each fold's own thresholds, to show how far they move (not used to decide).
        let (mut f_text, mut f_less) = (Vec::new(), Vec::new());
        for f in 0..FOLDS {
            let kept: Vec<usize> = fit.all.iter().copied().filter(|&r| fold[r] != f).collect();
            let t: Vec<f32> = kept
                .iter()
                .flat_map(|&r| targets[r * k..(r + 1) * k].iter().copied())
                .collect();
            let m = train_one(
                &c_student,
                Vec::new(),
                Role::Student,
                &kept,
                &t,
                opts.seed,
                &format!("student, fold {}/{FOLDS}", f + 1),
            )
            .model;
            for (rows, text_hidden, out, folds) in [
                (&fit.with_text, false, &mut with_text, &mut f_text),
                (&fit.all, true, &mut text_less, &mut f_less),
            ] {
                let held: Vec<usize> = (0..rows.len()).filter(|&i| fold[rows[i]] == f).collect();
                let held_rows: Vec<usize> = held.iter().map(|&i| rows[i]).collect();
                let s = fusion::score(
                    &m,
                    &c_student,
                    &fit.set,
                    &held_rows,
                    Role::Student,
                    View::Plain,
                    text_hidden,
                    device,
                );
                for (j, &i) in held.iter().enumerate() {
                    out[i * k..(i + 1) * k].copy_from_slice(&s[j * k..(j + 1) * k]);
                }
                folds.push(tuned(&s, &fit.y_of(&held_rows), k));
            }
        }
        OutOfFold {
            with_text: (with_text, fit.y_of(&fit.with_text)),
            text_less: (text_less, fit.y_of(&fit.all)),
            spread: vec![
                ThresholdSpread::of("early-fusion student, fold networks", &f_text, &labels),
                ThresholdSpread::of(
                    "early-fusion student, fold networks, text-less",
                    &f_less,
                    &labels,
                ),
            ],
        }
    });
    let student_refs: Vec<&TunedFusion> = students.iter().map(|t| &t.model).collect();
    let student = finish(
        &student_refs,
        &c_student,
        Role::Student,
        false,
        &tune,
        &val,
        &y_val,
        &labels,
        oof.as_ref(),
        device,
    );
    ablations.push(Ablation {
        name: format!(
            "early-fusion student ({} members, 160x240, MiniLM-L3){}",
            students.len(),
            match opts.thresholds {
                Thresholds::Tune => String::new(),
                Thresholds::OutOfFold => format!(", {FOLDS}-fold thresholds"),
            }
        ),
        val: student.1,
        val_text_less: Some(student.2),
        best_epochs: students.iter().map(|t| t.best_epoch).collect(),
        train_seconds: students.iter().map(|t| t.seconds).sum(),
    });
    let student_e = Ensemble {
        thresholds: student.0.0,
        thresholds_text_less: student.0.1,
        config: c_student,
        members: students.into_iter().map(|t| t.model).collect(),
    };
    Ok(RecipeOutput {
        ablations,
        peers: peer_report,
        teacher: Some(teacher_e),
        student: Some(student_e),
        student_spread: oof.map(|o| o.spread).unwrap_or_default(),
    })
}

impl Ensemble {
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
        Ok(())
    }
}

/// Member `i`'s `n` tuned MiniLM layers from a teacher directory (none for `n` = 0).
fn load_top(dir: &Path, i: usize, n: usize, device: &Device) -> Result<Vec<BertLayer>> {
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

/// Out-of-fold scores of the fit rows, with their labels: the rows with text as
/// given, and all rows with the text hidden.
struct OutOfFold {
    with_text: (Vec<f32>, Vec<u8>),
    text_less: (Vec<f32>, Vec<u8>),
    /// How far the per-genre thresholds move when each fold tunes its own.
    spread: Vec<ThresholdSpread>,
}

/// Tunes both threshold sets on tune rows (and out-of-fold fit rows, when given) and
/// reports val with and without text.
#[allow(clippy::too_many_arguments)]
fn finish(
    e: &[&TunedFusion],
    c: &FusionConfig,
    role: Role,
    tta: bool,
    tune: &Part,
    val: &Part,
    y_val: &[u8],
    labels: &[String],
    oof: Option<&OutOfFold>,
    device: &Device,
) -> ((Vec<f32>, Vec<f32>), Report, Report) {
    let k = labels.len();
    let with_oof = |s: Vec<f32>, y: Vec<u8>, extra: Option<&(Vec<f32>, Vec<u8>)>| match extra {
        Some((xs, xy)) => tuned(&[s, xs.clone()].concat(), &[y, xy.clone()].concat(), k),
        None => tuned(&s, &y, k),
    };
    let s = ensemble_scores(e, c, tune, &tune.with_text, role, tta, false, device);
    let t = with_oof(s, tune.y_of(&tune.with_text), oof.map(|o| &o.with_text));
    let s_less = ensemble_scores(e, c, tune, &tune.all, role, tta, true, device);
    let t_less = with_oof(s_less, tune.y_of(&tune.all), oof.map(|o| &o.text_less));
    let v = ensemble_scores(e, c, val, &val.all, role, tta, false, device);
    let v_less = ensemble_scores(e, c, val, &val.all, role, tta, true, device);
    (
        (t.clone(), t_less.clone()),
        eval(&v, &t, y_val, labels),
        eval(&v_less, &t_less, y_val, labels),
    )
}
