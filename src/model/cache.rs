//! The cache folder outside git: converted tower weights and extracted features.

use std::path::{Path, PathBuf};

/// `$MARQUEE_CACHE`, else `$XDG_CACHE_HOME/marquee`, else `~/.cache/marquee`.
#[derive(Debug, Clone)]
pub struct CacheDir(PathBuf);

impl CacheDir {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    /// `MARQUEE_CACHE`, else `$XDG_CACHE_HOME/marquee`, else `~/.cache/marquee`.
    pub fn from_env() -> Self {
        if let Some(p) = std::env::var_os("MARQUEE_CACHE") {
            return Self(p.into());
        }
        if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
            return Self(PathBuf::from(p).join("marquee"));
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| ".".into());
        Self(home.join(".cache").join("marquee"))
    }

    /// The cache's folder.
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// The converted pretrained towers.
    pub fn towers(&self) -> PathBuf {
        self.0.join("towers")
    }

    /// The downloaded wheels.
    pub fn wheels(&self) -> PathBuf {
        self.0.join("wheels")
    }

    /// Token-level frozen features of manifest rows (see `train::tokens`).
    pub fn tokens(&self) -> PathBuf {
        self.0.join("tokens")
    }
}
