//! The posters-v1 manifest format: JSONL, one sample a line, `poster` relative to the
//! manifest's folder.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Largest manifest read (bytes): posters-v1's is about 5 MB.
const MANIFEST_MAX: usize = 512 << 20;

/// One row of a manifest (movies.jsonl).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Row {
    /// The row's id.
    pub id: String,
    /// The film it belongs to (rows of one film stay in one split).
    #[serde(default)]
    pub film: String,
    /// The plot text (may be empty).
    #[serde(default)]
    pub overview: String,
    /// The film's genres.
    #[serde(default)]
    pub genres: Vec<String>,
    /// The poster file, relative to the manifest.
    pub poster: String,
    /// train, val or test.
    #[serde(default)]
    pub split: String,
    /// A caption of the poster, when the manifest carries one (`train --captions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
}

/// A manifest and the folder its poster paths are relative to.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest's folder.
    pub root: PathBuf,
    /// Its rows.
    pub rows: Vec<Row>,
}

impl Manifest {
    /// Reads a manifest, bounded, with one line of error per bad row.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::util::limited::read_file(path, MANIFEST_MAX)
            .with_context(|| format!("reading manifest {}", path.display()))?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("manifest {} is not UTF-8", path.display()))?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Row = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a manifest row", path.display(), i + 1))?;
            rows.push(row);
        }
        if rows.is_empty() {
            bail!("manifest {} has no rows", path.display());
        }
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Self { root, rows })
    }

    /// Rows of one split (all rows when `split` is None).
    pub fn split(&self, split: Option<&str>) -> Vec<Row> {
        self.rows
            .iter()
            .filter(|r| split.is_none_or(|s| r.split == s))
            .cloned()
            .collect()
    }

    /// The poster file of `row`.
    pub fn poster_path(&self, row: &Row) -> PathBuf {
        self.root.join(&row.poster)
    }
}

/// Multi-hot targets of `rows` over `labels`, row-major `[rows, labels]`.
pub fn multi_hot(rows: &[Row], labels: &[String]) -> Vec<u8> {
    let mut out = vec![0u8; rows.len() * labels.len()];
    for (r, row) in rows.iter().enumerate() {
        for g in &row.genres {
            if let Some(j) = labels.iter().position(|l| l == g) {
                out[r * labels.len() + j] = 1;
            }
        }
    }
    out
}

/// A stable 64-bit hash (FNV-1a), for deterministic film-level splits.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
