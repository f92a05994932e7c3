//! The CLI's subcommands: read files, call the library, print results.

use crate::caption::local::FlorenceCaptioner;
use crate::caption::server::{CaptionServer, ServerConfig};
use crate::caption::{CaptionOptions, Task};
use crate::classify::{Classifier, Prediction, compose_text};
use crate::cli::{Cli, Command, ConfigAction, ModelsAction};
use crate::config::Config;
use crate::model::bundle;
use crate::model::cache::CacheDir;
use crate::model::dir::default_model_dir;
use crate::model::towers;
use crate::preprocess::image::{MAX_BYTES, decode};
use crate::train::fusion::Role;
use crate::train::manifest::Manifest;
use crate::train::recipe::{self, Ablation, RecipeOptions};
use crate::train::{EvalOutput, run_eval};
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::Path;

pub fn run(cli: Cli) -> Result<()> {
    let cache = cli
        .cache
        .clone()
        .map(CacheDir::new)
        .unwrap_or_else(CacheDir::from_env);
    match cli.command {
        Command::Classify {
            poster,
            overview,
            caption,
            model,
            json,
        } => {
            let device = cli.backend.device()?;
            let img =
                decode(&read_limited(&poster)?).with_context(|| poster.display().to_string())?;
            let model_dir = model.unwrap_or_else(default_model_dir);
            let classifier = Classifier::load(&model_dir, &cache, &device)?;
            let p = classifier.classify(&img, overview.as_deref(), caption.as_deref())?;
            print_prediction(&p, json)?;
        }
        Command::Eval {
            manifest,
            split,
            model,
            text_less,
            json,
        } => {
            let device = cli.backend.device()?;
            let model_dir = model.unwrap_or_else(default_model_dir);
            let out = run_eval(
                &manifest,
                split.as_deref(),
                &model_dir,
                text_less,
                &cache,
                &device,
            )?;
            print_eval(&out, json)?;
        }
        Command::Train {
            manifest,
            out,
            work,
            seed,
            epochs,
            teacher_members,
            fit_limit,
            extract_only,
            captions,
            json,
        } => {
            let device = cli.backend.device()?;
            if extract_only {
                return crate::train::extract_all(&manifest, &cache, &device);
            }
            let mut opts = RecipeOptions {
                seed,
                teacher_members,
                fit_limit,
                ..Default::default()
            };
            opts.fusion.epochs = epochs;
            opts.fusion.seed = seed;
            let work = work.unwrap_or_else(|| cache.root().join("train"));
            let start = std::time::Instant::now();
            let (manifest, caption_source) = match train_captioner(&captions, &device)? {
                None => (manifest, "none".to_string()),
                Some(c) => {
                    let r = crate::train::captions::caption_manifest(
                        &manifest,
                        &c,
                        captions.caption_task.parse().map_err(anyhow::Error::msg)?,
                        &cache.root().join("captions"),
                        &work.join("captioned"),
                    )?;
                    eprintln!(
                        "captions from {}: {} new, {} cached, {} failed (cache {})",
                        r.source,
                        r.captioned,
                        r.from_cache,
                        r.failed,
                        r.cache.display()
                    );
                    if captions.captions_only {
                        println!("{}", r.manifest.display());
                        return Ok(());
                    }
                    (r.manifest, r.source)
                }
            };
            let run = recipe::run(&manifest, &cache, &device, &opts)?;
            let facts = serde_json::json!({
                "manifest": manifest.display().to_string(),
                "split": "posters-v1 train (1 film in 10 held out as tune); val untouched",
                "options": opts, "captions": caption_source,
            });
            run.teacher
                .into_model(Role::Teacher, facts.clone())
                .save(&work.join("teacher"))?;
            let student_raw = work.join("student");
            run.student
                .into_model(Role::Student, facts)
                .save(&student_raw)?;
            std::fs::write(
                work.join("ablations.json"),
                serde_json::to_string_pretty(&run.ablations)?,
            )?;
            bundle_student(&student_raw, &manifest, &cache, &out, &device)?;
            eprintln!("trained in {:.1} min", start.elapsed().as_secs_f64() / 60.0);
            print_ablations(&run.ablations, json)?;
        }
        Command::Bench {
            florence: Some(size),
            reference,
            runs,
            json,
            ..
        } => {
            let (backend, device) = cli.backend.select()?;
            let reference = reference
                .unwrap_or_else(|| "../shared/reference/florence2/bench_base_cpu.json".into());
            let runs = if runs == 20 { 3 } else { runs };
            let r =
                crate::caption::bench::run(&size, &device, backend.name(), runs, Some(&reference))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "Florence-2-{} ({:.0} M params, random weights) on {} ({} threads), p50 of {runs}:",
                    r.size,
                    r.params as f64 / 1e6,
                    r.backend,
                    r.threads
                );
                for (k, v) in &r.stages_s {
                    let vs = match (r.ratio_vs_pytorch.get(k), r.pytorch_s.get(k)) {
                        (Some(x), Some(t)) => format!("  PyTorch {t:.4} s -> {x:.2}x"),
                        _ => String::new(),
                    };
                    println!("  {k:<14} {:.4} s (p90 {:.4}){vs}", v.p50, v.p90);
                }
            }
        }
        Command::Bench {
            florence: None,
            reference: _,
            model,
            poster,
            overview,
            text_less,
            runs,
            json,
        } => {
            let (backend, device) = cli.backend.select()?;
            let model_dir = model.unwrap_or_else(default_model_dir);
            let poster = poster.unwrap_or_else(example_poster);
            let img =
                decode(&read_limited(&poster)?).with_context(|| poster.display().to_string())?;
            let overview = overview.unwrap_or_else(|| BENCH_OVERVIEW.to_string());
            let overview = (!text_less).then_some(overview.as_str());
            let r = crate::bench::run(
                &model_dir,
                &cache,
                &device,
                backend.name(),
                &img,
                overview,
                runs,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {} ({} threads): total p50 {:.1} ms, p90 {:.1} ms; load {:.0} ms; peak RSS {:.0} MB",
                    r.model,
                    r.backend,
                    r.threads,
                    r.total_ms.p50,
                    r.total_ms.p90,
                    r.load_ms,
                    r.peak_rss_mb
                );
                for (k, v) in &r.stages {
                    println!("  {k:<12} p50 {:.1} ms  p90 {:.1} ms", v.p50, v.p90);
                }
            }
        }
        Command::Caption {
            image,
            model,
            task,
            beams,
            max_new_tokens,
            json,
        } => {
            let task: Task = task.parse().map_err(anyhow::Error::msg)?;
            let device = cli.backend.device()?;
            let img =
                decode(&read_limited(&image)?).with_context(|| image.display().to_string())?;
            let captioner = FlorenceCaptioner::load(&model, &device)?;
            let opts = CaptionOptions {
                beams,
                max_new_tokens,
            };
            let out = captioner.caption(&img, task, &opts)?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let t = &out.timings_ms;
                println!("{}", out.caption);
                println!(
                    "{} tokens; preprocess {:.0} ms, vision {:.0} ms, encoder {:.0} ms, decoder {:.0} ms ({:.1} ms/token), total {:.0} ms",
                    out.tokens, t.preprocess, t.vision, t.encoder, t.decoder, t.per_token, t.total
                );
            }
        }
        Command::ServeCaptions {
            listen,
            model,
            token,
            workers,
            queue,
            max_body,
        } => {
            let device = cli.backend.device()?;
            let captioner = std::sync::Arc::new(FlorenceCaptioner::load(&model, &device)?);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let cfg = ServerConfig {
                listen,
                token,
                workers,
                queue,
                max_body,
                ..Default::default()
            };
            let server = CaptionServer::start(captioner.clone(), cfg)?;
            eprintln!(
                "serving {} captions on http://{}",
                captioner.name,
                server.addr()
            );
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            server.shutdown();
            eprintln!("caption server stopped");
        }
        Command::Run { config } => {
            crate::appliance::run(Config::load(&config)?)?;
        }
        Command::Config {
            action: ConfigAction::Check { path },
        } => {
            let c = Config::load(&path)?;
            println!("{}: ok (device_id {})", path.display(), c.device_id);
        }
        Command::Models {
            action: ModelsAction::Fetch {
                name: None, force, ..
            },
        } => {
            towers::fetch(&cache, force)?;
            println!("pretrained towers ready in {}", cache.towers().display());
        }
        Command::Models {
            action:
                ModelsAction::Fetch {
                    name: Some(name),
                    out,
                    revision,
                    sha256,
                    ..
                },
        } => {
            let out = out.unwrap_or_else(|| cache.root().join(&name));
            crate::model::florence::fetch(&name, &out, revision.as_deref(), sha256.as_deref())?;
            FlorenceCaptioner::load(&out, &cli.backend.device()?).with_context(|| {
                format!("{name} downloaded to {} but does not load", out.display())
            })?;
            println!("{name} ready in {}", out.display());
        }
        Command::Models {
            action:
                ModelsAction::Bundle {
                    student,
                    manifest,
                    out,
                },
        } => {
            let device = cli.backend.device()?;
            let student = student.unwrap_or_else(|| cache.root().join("train/student"));
            bundle_student(&student, &manifest, &cache, &out, &device)?;
        }
        Command::Models {
            action: ModelsAction::Info,
        } => {
            println!("cache: {}", cache.root().display());
            for pin in [&towers::EFFICIENTNET, &towers::MINILM] {
                println!("  {}=={} ({})", pin.package, pin.version, pin.licence);
            }
            for f in [
                towers::EFFICIENTNET_FILE,
                towers::MINILM_FILE,
                towers::TOKENIZER_FILE,
            ] {
                let p = cache.towers().join(f);
                let state = if p.is_file() { "present" } else { "missing" };
                println!("  {:<24} {state}", f);
            }
            println!("model: {}", default_model_dir().display());
        }
    }
    Ok(())
}

/// A made-up plot of typical length, so the bench exercises the text tower.
const BENCH_OVERVIEW: &str = "A retired detective is pulled back into one last case when a string of \
    robberies across the city mirrors the crimes of a gang he put away twenty years ago. \
    With an ambitious young partner and a daughter who wants him home, he must decide how \
    far he will go before the past catches up with both of them.";

/// examples/poster.png of this checkout.
fn example_poster() -> std::path::PathBuf {
    let here = Path::new("examples/poster.png");
    if here.is_file() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/poster.png")
}

/// The captioner `train --captions` asked for, if any.
fn train_captioner(
    a: &crate::cli::CaptionArgs,
    device: &burn::prelude::Device,
) -> Result<Option<crate::train::captions::Captioner>> {
    use crate::caption::remote::{RemoteCaptioner, RemoteConfig};
    use crate::train::captions::Captioner;
    Ok(match a.captions.as_deref() {
        None | Some("none") => None,
        Some("local") => {
            let dir = a
                .caption_model
                .as_ref()
                .context("--captions local needs --caption-model DIR (a Florence-2 model)")?;
            Some(Captioner::Local(Box::new(FlorenceCaptioner::load(
                dir, device,
            )?)))
        }
        Some("remote") => {
            let url = a
                .caption_url
                .clone()
                .context("--captions remote needs --caption-url URL")?;
            Some(Captioner::Remote(RemoteCaptioner::new(RemoteConfig {
                url,
                protocol: a.caption_protocol,
                token: std::env::var("MARQUEE_CAPTION_TOKEN").ok(),
                timeout_ms: 120_000,
                retries: 2,
                ..Default::default()
            })))
        }
        Some(other) => bail!("--captions {other}: use local, remote or none"),
    })
}

fn bundle_student(
    student: &Path,
    manifest: &Path,
    cache: &CacheDir,
    out: &Path,
    device: &burn::prelude::Device,
) -> Result<()> {
    let m = Manifest::load(manifest)?;
    let texts: Vec<String> = m
        .split(Some("train"))
        .iter()
        .filter_map(|r| compose_text(Some(&r.overview), r.caption.as_deref()))
        .collect();
    bundle::export(student, &texts, cache, out, device)?;
    let bytes: u64 = std::fs::read_dir(out)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "self-contained model written to {} ({:.1} MB)",
        out.display(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Reads a file, refusing anything over the image byte limit before reading it all.
fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > MAX_BYTES {
        bail!(
            "{}: file larger than the {MAX_BYTES}-byte image limit",
            path.display()
        );
    }
    Ok(bytes)
}

fn print_prediction(p: &Prediction, json: bool) -> Result<()> {
    if json {
        let timings: serde_json::Map<String, serde_json::Value> = p
            .timings_ms
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        let out = serde_json::json!({
            "genres": p.genres, "predicted": p.predicted,
            "caption": p.caption, "timings_ms": timings,
        });
        println!("{out}");
        return Ok(());
    }
    println!("predicted: {}", p.predicted.join(", "));
    for g in &p.genres {
        let bar = "#".repeat((g.score * 30.0).round() as usize);
        println!("  {:<16} {:>5.3} {bar}", g.label, g.score);
    }
    let t: Vec<String> = p
        .timings_ms
        .iter()
        .map(|(k, v)| format!("{k} {v:.1} ms"))
        .collect();
    println!("timings: {}", t.join(", "));
    Ok(())
}

fn print_eval(out: &EvalOutput, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(out)?);
        return Ok(());
    }
    let r = &out.report;
    println!(
        "model {}  n={}  {:.1} ms/sample",
        out.model, r.n, out.ms_per_sample
    );
    println!(
        "micro-F1 {:.4}  macro-F1 {:.4}  weighted-F1 {:.4}  samples-F1 {:.4}",
        r.micro_f1, r.macro_f1, r.weighted_f1, r.samples_f1
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>8}",
        "genre", "precision", "recall", "f1", "support"
    );
    for (g, s) in &r.per_genre {
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            g, s.precision, s.recall, s.f1, s.support
        );
    }
    Ok(())
}

fn print_ablations(rows: &[Ablation], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(rows)?);
        return Ok(());
    }
    println!(
        "val split (never used for training or tuning); F1 micro / macro / weighted / samples:"
    );
    println!(
        "{:<62} {:>7} {:>7} {:>7} {:>7} {:>16}",
        "model", "micro", "macro", "weight", "samples", "text-less macro"
    );
    for r in rows {
        let v = &r.val;
        let less = r
            .val_text_less
            .as_ref()
            .map(|t| format!("{:.4}", t.macro_f1))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<62} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>16}",
            r.name, v.micro_f1, v.macro_f1, v.weighted_f1, v.samples_f1, less
        );
    }
    Ok(())
}
