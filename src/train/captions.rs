//! `marquee train --captions local|remote`: caption every poster of a manifest once with
//! the configured captioner, keep the captions in a resumable cache, and write a copy
//! of the manifest that carries them, which the rest of training reads like any other.

use super::manifest::{Manifest, Row};
use crate::infer::Captioner;
use crate::infer::task::Task;
use crate::preprocess::image::MAX_BYTES;
use crate::util::limited::read_file;
use crate::util::progress::Stage;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    id: String,
    caption: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// What `train --captions` did.
#[derive(Debug, Serialize)]
pub struct CaptionReport {
    /// The captioner.
    pub source: String,
    /// Posters captioned now.
    pub captioned: usize,
    /// Posters whose caption came from the cache.
    pub from_cache: usize,
    /// Posters that could not be captioned.
    pub failed: usize,
    /// The caption cache.
    pub cache: PathBuf,
    /// The captioned manifest.
    pub manifest: PathBuf,
}

/// Captions every row (cached per source and task), then writes `out_dir/manifest.jsonl`
/// with a `caption` on each row that has one, poster paths made absolute.
pub fn caption_manifest(
    manifest_path: &Path,
    captioner: &dyn Captioner,
    task: Task,
    cache_dir: &Path,
    out_dir: &Path,
) -> Result<CaptionReport> {
    let manifest = Manifest::load(manifest_path)?;
    let source = captioner.describe();
    let key = hex::encode(&Sha256::digest(format!("{source}|{task}").as_bytes())[..8]);
    std::fs::create_dir_all(cache_dir)?;
    let cache_path = cache_dir.join(format!("{key}.jsonl"));
    let mut known: HashMap<String, Cached> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&cache_path) {
        // A line cut short by a crash is skipped, and its poster captioned again.
        for c in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Cached>(l).ok())
        {
            known.insert(c.id.clone(), c);
        }
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cache_path)
        .with_context(|| cache_path.display().to_string())?;
    let todo: Vec<&Row> = manifest
        .rows
        .iter()
        .filter(|r| !known.contains_key(&r.id))
        .collect();
    let bar = Stage::start("captioning", todo.len() as u64);
    let from_cache = manifest.rows.len() - todo.len();
    for row in todo {
        let caption = read_file(&manifest.poster_path(row), MAX_BYTES)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| captioner.caption_encoded(&bytes, task));
        let c = match caption.map(|o| o.caption) {
            Ok(text) => Cached {
                id: row.id.clone(),
                caption: Some(text).filter(|t| !t.is_empty()),
                error: None,
            },
            Err(e) => Cached {
                id: row.id.clone(),
                caption: None,
                error: Some(format!("{e:#}")),
            },
        };
        writeln!(log, "{}", serde_json::to_string(&c)?)?;
        known.insert(c.id.clone(), c);
        bar.inc(1);
    }
    drop(bar);
    std::fs::create_dir_all(out_dir)?;
    let out = out_dir.join("manifest.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
    let mut failed = 0;
    for row in &manifest.rows {
        let mut r = row.clone();
        r.poster = manifest.poster_path(row).to_string_lossy().into_owned();
        let cached = known.get(&row.id);
        failed += usize::from(cached.is_some_and(|c| c.error.is_some()));
        r.caption = cached.and_then(|c| c.caption.clone());
        writeln!(f, "{}", serde_json::to_string(&r)?)?;
    }
    f.flush()?;
    Ok(CaptionReport {
        source,
        captioned: manifest.rows.len() - from_cache,
        from_cache,
        failed,
        cache: cache_path,
        manifest: out,
    })
}
