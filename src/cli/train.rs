//! `marquee train`: captions (optional), token features, the teacher, the ablations
//! and the distilled student, bundled into `--out`.

use super::Global;
use super::args::{CaptionSourceArgs, TrainArgs};
use super::models::bundle_student;
use anyhow::{Context, Result, bail};
use marquee::caption::remote::RemoteConfig;
use marquee::caption::stage::{CaptionConfig, Mode, open};
use marquee::infer::Captioner;
use marquee::train::fusion::Role;
use marquee::train::metrics::ThresholdSpread;
use marquee::train::peers::PeerReport;
use marquee::train::recipe::workers::{Launch, Workers};
use marquee::train::recipe::{self, options::RecipeOptions, options::Until};
use marquee::train::report::Ablation;
use marquee::util::progress::note;
use serde::Serialize;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Serialize)]
#[serde(untagged)]
pub enum TrainReport {
    /// `--extract-only`: the features are cached.
    Extracted { extracted: bool },
    /// A worker of a run with `--jobs`: its network is written beside its job file.
    Worked { worked: bool },
    /// `--captions-only`: the captioned manifest.
    Captioned { manifest: PathBuf },
    /// `--only peers`: the peers' rows and threshold spread.
    Peers(PeerReport),
    /// The ablation table on val (the peers' rows first), and how far each model's
    /// per-genre thresholds move between the folds (the peers', then the student's).
    Trained {
        ablations: Vec<Ablation>,
        threshold_spread: Vec<ThresholdSpread>,
    },
}

impl fmt::Display for TrainReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            TrainReport::Extracted { .. } | TrainReport::Worked { .. } => Ok(()),
            TrainReport::Captioned { manifest } => write!(f, "{}", manifest.display()),
            TrainReport::Trained {
                ablations,
                threshold_spread,
            } => {
                table(f, ablations)?;
                for row in ablations.iter().filter(|r| r.val_text_less.is_some()) {
                    per_genre(f, row)?;
                }
                spread(f, threshold_spread)
            }
            TrainReport::Peers(p) => {
                table(f, &p.ablations)?;
                writeln!(f, "\nalpha chosen on the tune films' macro-F1:")?;
                for a in &p.alpha_search {
                    write!(
                        f,
                        "\n{:<72} alpha {:>7} tune macro {:.4}",
                        a.peer, a.alpha, a.tune_macro_f1
                    )?;
                }
                writeln!(f)?;
                spread(f, &p.spread)
            }
        }
    }
}

fn spread(f: &mut fmt::Formatter, spreads: &[ThresholdSpread]) -> fmt::Result {
    if spreads.is_empty() {
        return Ok(());
    }
    let folds = spreads[0].per_genre.values().next().map_or(0, Vec::len);
    write!(
        f,
        "\n\nthreshold spread over {folds} folds (sd of the per-genre thresholds each fold tunes):"
    )?;
    for s in spreads {
        write!(
            f,
            "\n{:<72} mean sd {:.3}, max {:.3} ({})",
            s.model, s.mean_sd, s.max_sd, s.max_sd_genre
        )?;
    }
    Ok(())
}

/// Each genre's val F1 with the overview and without it (the kiosk case).
fn per_genre(f: &mut fmt::Formatter, row: &Ablation) -> fmt::Result {
    let Some(less) = &row.val_text_less else {
        return Ok(());
    };
    write!(
        f,
        "\n\n{}: per genre, val F1 with the overview / text-less (support)",
        row.name
    )?;
    for (genre, g) in &row.val.per_genre {
        let l = less.per_genre.get(genre).map_or(f64::NAN, |x| x.f1);
        write!(f, "\n  {genre:<16} {:.3} / {l:.3} ({})", g.f1, g.support)?;
    }
    Ok(())
}

fn table(f: &mut fmt::Formatter, rows: &[Ablation]) -> fmt::Result {
    writeln!(
        f,
        "val split (never used for training or tuning); F1 micro / macro / weighted / samples:"
    )?;
    write!(
        f,
        "{:<72} {:>7} {:>7} {:>7} {:>7} {:>16}",
        "model", "micro", "macro", "weight", "samples", "text-less macro"
    )?;
    for r in rows {
        let v = &r.val;
        let less = r
            .val_text_less
            .as_ref()
            .map(|t| format!("{:.4}", t.macro_f1))
            .unwrap_or_else(|| "-".into());
        write!(
            f,
            "\n{:<72} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>16}",
            r.name, v.micro_f1, v.macro_f1, v.weighted_f1, v.samples_f1, less
        )?;
    }
    Ok(())
}

pub fn run(a: TrainArgs, g: &Global) -> Result<TrainReport> {
    let device = g.backend.device()?;
    if a.extract_only {
        marquee::train::tokens::extract_all(&a.manifest, &g.cache, &device)?;
        return Ok(TrainReport::Extracted { extracted: true });
    }
    let mut opts = RecipeOptions {
        seed: a.seed,
        teacher_members: a.teacher_members,
        teacher_top_layers: a.teacher_top_layers,
        image_tail: a.tune_image_blocks,
        student_members: a.student_members,
        student_text_dropout: a.student_text_dropout,
        kiosk_flip: !a.no_kiosk_flip,
        fit_limit: a.fit_limit,
        ..Default::default()
    };
    opts.fusion.epochs = a.epochs;
    opts.fusion.seed = a.seed;
    opts.fusion.patience = a.patience;
    opts.thresholds = a.thresholds.into();
    opts.teacher_from = a.teacher;
    opts.fusion.schedule = a.schedule.into();
    opts.fusion.positives = a.positives.into();
    opts.fusion.loss = a.loss.into();
    opts.fusion.augment_flip = a.augment_flip;
    if let Some(only) = a.only {
        opts.until = only.into();
    }
    if let Some(job) = &a.worker_job {
        exit_when_the_run_ends();
        recipe::work(job, &g.cache, &device, &opts)?;
        return Ok(TrainReport::Worked { worked: true });
    }
    let work = a.work.unwrap_or_else(|| g.cache.root().join("train"));
    // A worker is this program again, with this run's arguments and a job file.
    let respawn = Respawn {
        args: std::env::args_os().skip(1).collect(),
    };
    let workers = Workers {
        jobs: a.jobs,
        dir: work.join("jobs"),
        launch: Some(&respawn),
    };
    // Declared before the run, so dropped after its networks.
    let _jobs = RemoveOnDrop(workers.dir.clone());
    let start = std::time::Instant::now();
    let (manifest, caption_source) = match captioner(&a.captions, &device)? {
        None => (a.manifest, "none".to_string()),
        Some(c) => {
            let r = marquee::train::captions::caption_manifest(
                &a.manifest,
                c.as_ref(),
                a.captions.caption_task,
                &g.cache.root().join("captions"),
                &work.join("captioned"),
            )?;
            note(&format!(
                "captions from {}: {} new, {} cached, {} failed (cache {})",
                r.source,
                r.captioned,
                r.from_cache,
                r.failed,
                r.cache.display()
            ));
            if a.captions.captions_only {
                return Ok(TrainReport::Captioned {
                    manifest: r.manifest,
                });
            }
            (r.manifest, r.source)
        }
    };
    let run = recipe::run(&manifest, &g.cache, &device, &opts, &workers)?;
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    std::fs::write(
        work.join("ablations.json"),
        serde_json::to_string_pretty(&run.ablations)?,
    )?;
    if let Some(peers) = &run.peers {
        std::fs::write(
            work.join("peers.json"),
            serde_json::to_string_pretty(peers)?,
        )?;
    }
    if !run.student_spread.is_empty() {
        std::fs::write(
            work.join("student_spread.json"),
            serde_json::to_string_pretty(&run.student_spread)?,
        )?;
    }
    let threshold_spread: Vec<ThresholdSpread> = run
        .peers
        .iter()
        .flat_map(|p| p.spread.iter().cloned())
        .chain(run.student_spread)
        .collect();
    let facts = serde_json::json!({
        "manifest": manifest.display().to_string(),
        "split": "posters-v1 train (1 film in 10 held out as tune); val untouched",
        "options": opts, "captions": caption_source,
    });
    if let Some(teacher) = run.teacher {
        teacher.save(Role::Teacher, facts.clone(), &work.join("teacher"))?;
    }
    let Some(student) = run.student else {
        return Ok(match (opts.until, run.peers) {
            (Until::Peers, Some(peers)) => TrainReport::Peers(peers),
            _ => TrainReport::Trained {
                ablations: run.ablations,
                threshold_spread,
            },
        });
    };
    let student_raw = work.join("student");
    student.save(Role::Student, facts, &student_raw)?;
    let bundled = bundle_student(&student_raw, &manifest, &g.cache, &a.out, &device)?;
    note(&bundled.to_string());
    note(&format!(
        "trained in {:.1} min",
        start.elapsed().as_secs_f64() / 60.0
    ));
    Ok(TrainReport::Trained {
        ablations: run.ablations,
        threshold_spread,
    })
}

/// The captioner `--captions` asks for; `None` for `none`. It is opened the way the
/// appliance opens its own (`caption::stage::open`), with training's patience.
fn captioner(
    a: &CaptionSourceArgs,
    device: &burn::prelude::Device,
) -> Result<Option<Box<dyn Captioner>>> {
    let mode: Mode = a.captions.into();
    let mut cfg = CaptionConfig {
        mode,
        ..Default::default()
    };
    match mode {
        Mode::Off => {}
        Mode::Local => {
            cfg.model = Some(
                a.caption_model
                    .clone()
                    .context("--captions local needs --caption-model DIR (a Florence-2 model)")?,
            );
        }
        Mode::Remote => {
            cfg.remote = RemoteConfig {
                url: a
                    .caption_url
                    .clone()
                    .context("--captions remote needs --caption-url URL")?,
                protocol: a.caption_protocol.into(),
                token: std::env::var("MARQUEE_CAPTION_TOKEN").ok(),
                timeout_ms: 120_000,
                retries: 2,
                ..Default::default()
            };
        }
    }
    open(&cfg, device)
}

/// Starts a worker of a run with `--jobs`: this program, with the run's arguments
/// and the job file.
struct Respawn {
    args: Vec<OsString>,
}

impl Launch for Respawn {
    fn launch(&self, job: &Path) -> Result<()> {
        let exe = std::env::current_exe().context("finding this program to start a worker")?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .arg("--worker-job")
            .arg(job)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the worker for {}", job.display()))?;
        // Held open while it works: the worker stops when this end closes, so a
        // run killed outright leaves no worker behind.
        let _lifeline = child.stdin.take();
        let status = child.wait()?;
        if !status.success() {
            bail!("the worker for {} failed ({status})", job.display());
        }
        Ok(())
    }
}

/// A worker's watch on its run: stdin closes when the run ends, however it ends.
fn exit_when_the_run_ends() {
    std::thread::spawn(|| {
        let mut byte = [0u8; 1];
        while matches!(std::io::stdin().read(&mut byte), Ok(1)) {}
        std::process::exit(1);
    });
}

/// Removes a folder when dropped: the workers' networks, once the run is done.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}
