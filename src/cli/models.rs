//! `marquee models fetch|info|bundle|export`: the pinned pretrained weights, making a
//! trained student self-contained, and its networks as plain f32 for outside runtimes.

use super::Global;
use super::args::ModelsAction;
use super::report::Report;
use anyhow::{Context, Result};
use burn::prelude::Device;
use marquee::caption::local::FlorenceCaptioner;
use marquee::infer::{Classifier, compose_text};
use marquee::model::cache::CacheDir;
use marquee::model::dir::default_model_dir;
use marquee::model::towers::Form;
use marquee::model::{bundle, towers};
use marquee::train::manifest::Manifest;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// "NAME ready in DIR".
#[derive(Serialize)]
pub struct Ready {
    name: String,
    dir: PathBuf,
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} ready in {}", self.name, self.dir.display())
    }
}

#[derive(Serialize)]
pub struct Bundled {
    dir: PathBuf,
    bytes: u64,
}

impl fmt::Display for Bundled {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "self-contained model written to {} ({:.1} MB)",
            self.dir.display(),
            self.bytes as f64 / 1e6
        )
    }
}

#[derive(Serialize)]
pub struct Exported {
    files: Vec<PathBuf>,
}

impl fmt::Display for Exported {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "f32 networks written:")?;
        for p in &self.files {
            write!(f, "\n  {}", p.display())?;
        }
        Ok(())
    }
}

#[derive(Serialize)]
pub struct Info {
    cache: PathBuf,
    packages: Vec<String>,
    files: Vec<(String, bool)>,
    model: PathBuf,
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "cache: {}", self.cache.display())?;
        for p in &self.packages {
            writeln!(f, "  {p}")?;
        }
        for (file, present) in &self.files {
            let state = if *present { "present" } else { "missing" };
            writeln!(f, "  {file:<24} {state}")?;
        }
        write!(f, "model: {}", self.model.display())
    }
}

pub fn run(action: ModelsAction, g: &Global) -> Result<Box<dyn Report>> {
    let cache = &g.cache;
    Ok(match action {
        ModelsAction::Fetch {
            name: None, force, ..
        } => {
            towers::fetch(cache, force)?;
            Box::new(Ready {
                name: "pretrained towers".into(),
                dir: cache.towers(),
            })
        }
        ModelsAction::Fetch {
            name: Some(name),
            out,
            revision,
            sha256,
            ..
        } => {
            let name = name.name();
            let out = out.unwrap_or_else(|| cache.root().join(name));
            marquee::model::florence::fetch(name, &out, revision.as_deref(), sha256.as_deref())?;
            FlorenceCaptioner::load(&out, &g.backend.device()?).with_context(|| {
                format!("{name} downloaded to {} but does not load", out.display())
            })?;
            Box::new(Ready {
                name: name.into(),
                dir: out,
            })
        }
        ModelsAction::Bundle {
            student,
            manifest,
            out,
        } => {
            let device = g.backend.device()?;
            let student = student.unwrap_or_else(|| cache.root().join("train/student"));
            Box::new(bundle_student(&student, &manifest, cache, &out, &device)?)
        }
        ModelsAction::Export { model, out } => {
            let device = g.backend.device()?;
            let model = model.unwrap_or_else(default_model_dir);
            // The files are written from burn's modules, so they are kept whole.
            let c = Classifier::load_as(&model, cache, &device, Form::Modules)?;
            Box::new(Exported {
                files: marquee::model::export::write_f32(&c.towers, &c.model.members, &out)?,
            })
        }
        ModelsAction::Info => Box::new(Info {
            cache: cache.root().to_path_buf(),
            packages: [&towers::EFFICIENTNET, &towers::MINILM]
                .iter()
                .map(|p| format!("{}=={} ({})", p.package, p.version, p.licence))
                .collect(),
            files: [
                towers::EFFICIENTNET_FILE,
                towers::MINILM_FILE,
                towers::TOKENIZER_FILE,
            ]
            .iter()
            .map(|f| (f.to_string(), cache.towers().join(f).is_file()))
            .collect(),
            model: default_model_dir(),
        }),
    })
}

/// Bundles a trained student with cut-down towers whose vocabulary covers the
/// manifest's train texts.
pub fn bundle_student(
    student: &Path,
    manifest: &Path,
    cache: &CacheDir,
    out: &Path,
    device: &Device,
) -> Result<Bundled> {
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
    Ok(Bundled {
        dir: out.to_path_buf(),
        bytes,
    })
}
