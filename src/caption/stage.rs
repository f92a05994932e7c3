//! Captioning inside the appliance. A worker thread owns the captioner (Florence-2 on
//! the device, or a remote server); the pipeline asks it for a caption and waits at
//! most `deadline_ms`. Whatever happens (a slow Pi, a dead server, an open circuit) the
//! scan goes on: the result is published with the caption if it came in time, without
//! it otherwise, and `caption_status` says which and why.

use super::local::FlorenceCaptioner;
use super::remote::{RemoteCaptioner, RemoteConfig};
use crate::infer::captioner::{CaptionOptions, CaptionOutput, Captioner};
use crate::infer::task::Task;
use anyhow::{Context, Result};
use burn::prelude::Device;
use image::RgbImage;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Where captions come from, `caption.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No captions.
    #[default]
    Off,
    /// Florence-2 on this device.
    Local,
    /// A caption server (Marquee's or an OpenAI-compatible one).
    Remote,
}

/// `[caption]` in the appliance config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionConfig {
    /// Off, local or remote.
    pub mode: Mode,
    /// Florence-2 model directory (mode = local).
    pub model: Option<PathBuf>,
    /// The Florence-2 task prompt.
    pub task: Task,
    /// Overrides of the model's generation_config.json (local).
    pub beams: Option<usize>,
    /// Most tokens a caption may have (local; overrides the model's).
    pub max_new_tokens: Option<usize>,
    /// Longest a scan waits for its caption before publishing without one.
    pub deadline_ms: u64,
    /// The server (mode = remote).
    pub remote: RemoteConfig,
}

impl Default for CaptionConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            model: None,
            task: Task::Caption,
            beams: None,
            max_new_tokens: None,
            deadline_ms: 3000,
            remote: RemoteConfig::default(),
        }
    }
}

type Reply = Result<CaptionOutput, String>;

const BUSY: &str = "captioner still busy with an earlier poster";
const STOPPED: &str = "captioner stopped";

struct Ask {
    image: RgbImage,
    reply: Sender<Reply>,
}

/// The pipeline's handle on the caption worker.
pub struct CaptionStage {
    tx: SyncSender<Ask>,
    worker: std::thread::JoinHandle<()>,
    /// Set while the worker has a poster; cleared when it is done with it.
    busy: Arc<AtomicBool>,
    /// Why the last caption failed after its scan had stopped waiting (a server
    /// that timed out past the deadline), told with the next scan.
    late: Arc<std::sync::Mutex<Option<String>>>,
    deadline: Duration,
    /// "local florence-2-base" / "remote http://…", for status lines.
    pub label: String,
}

/// What a scan got: the caption, or why not, and how long it waited.
#[derive(Debug, Clone, PartialEq)]
pub struct Captioned {
    /// The caption, when one came in time.
    pub caption: Option<String>,
    /// Where it came from, or why there is none.
    pub status: CaptionStatus,
    /// How long the scan waited for it.
    pub waited_ms: f64,
}

/// Why a scan has the caption it has. Results carry it as one line
/// (`caption_status`): "ok: …", "given: …" or "none: …".
#[derive(Debug, Clone, PartialEq)]
pub enum CaptionStatus {
    /// The stage's captioner answered in time.
    Captioned {
        /// The captioner's label ("local florence-2-base", "remote http://…").
        by: String,
        /// How long it took.
        ms: f64,
    },
    /// The caption came with the poster (the desk).
    Given,
    /// Captioning is off.
    Off,
    /// None this time, and why: busy, stopped, failed or too slow.
    Missed(String),
    /// This scan's status, and why the previous poster's caption failed after its
    /// scan had stopped waiting.
    AfterLateFailure(Box<CaptionStatus>, String),
}

impl std::fmt::Display for CaptionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptionStatus::Captioned { by, ms } => write!(f, "ok: {by} in {ms:.0} ms"),
            CaptionStatus::Given => write!(f, "given: sent with the poster"),
            CaptionStatus::Off => write!(f, "none: captioning is off"),
            CaptionStatus::Missed(why) => write!(f, "none: {why}"),
            CaptionStatus::AfterLateFailure(now, e) => {
                write!(f, "{now} (the previous caption failed late: {e})")
            }
        }
    }
}

impl Captioned {
    /// A caption that came with the poster.
    pub fn given(caption: &str) -> Self {
        Self {
            caption: Some(caption.to_string()).filter(|c| !c.trim().is_empty()),
            status: CaptionStatus::Given,
            waited_ms: 0.0,
        }
    }

    /// No caption: captioning is off.
    pub fn off() -> Self {
        Self {
            caption: None,
            status: CaptionStatus::Off,
            waited_ms: 0.0,
        }
    }
}

impl CaptionStage {
    /// `None` when captioning is off. A local model is loaded here, so a bad model
    /// directory stops the appliance at start-up with a clear error.
    pub fn start(cfg: &CaptionConfig, device: &Device) -> Result<Option<Self>> {
        let Some(engine) = open(cfg, device)? else {
            return Ok(None);
        };
        let label = engine.describe();
        // One poster in flight and none waiting: a caption that would start late is
        // worth less than starting the next one on time.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Ask>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let task = cfg.task;
        let flag = busy.clone();
        let late = Arc::new(std::sync::Mutex::new(None));
        let late_w = late.clone();
        let worker = std::thread::Builder::new()
            .name("captioner".into())
            .spawn(move || worker(engine.as_ref(), task, rx, &flag, &late_w))?;
        Ok(Some(Self {
            tx,
            worker,
            busy,
            late,
            deadline: Duration::from_millis(cfg.deadline_ms),
            label,
        }))
    }

    /// Whether the worker thread has ended (it should not: a panic is caught per
    /// poster); the appliance then exits so that systemd restarts it.
    pub fn is_finished(&self) -> bool {
        self.worker.is_finished()
    }

    /// Asks for a caption and waits until it comes or the deadline passes.
    pub fn caption(&self, image: &RgbImage) -> Captioned {
        let mut c = self.ask(image);
        let late = self.late.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = late {
            c.status = CaptionStatus::AfterLateFailure(Box::new(c.status), e);
        }
        c
    }

    fn ask(&self, image: &RgbImage) -> Captioned {
        let start = Instant::now();
        let (reply, rx) = std::sync::mpsc::channel();
        let ask = Ask {
            image: image.clone(),
            reply,
        };
        let waited = |s: Instant| s.elapsed().as_secs_f64() * 1e3;
        if self.busy.swap(true, Ordering::SeqCst) {
            return Captioned {
                caption: None,
                status: CaptionStatus::Missed(BUSY.into()),
                waited_ms: 0.0,
            };
        }
        let status = match self.tx.try_send(ask) {
            Err(TrySendError::Full(_)) => BUSY.to_string(),
            Err(TrySendError::Disconnected(_)) => STOPPED.to_string(),
            Ok(()) => match rx.recv_timeout(self.deadline) {
                Ok(Ok(out)) => {
                    return Captioned {
                        status: CaptionStatus::Captioned {
                            by: self.label.clone(),
                            ms: waited(start),
                        },
                        caption: Some(out.caption).filter(|c| !c.is_empty()),
                        waited_ms: waited(start),
                    };
                }
                Ok(Err(e)) => e,
                Err(RecvTimeoutError::Timeout) => format!(
                    "deadline of {} ms passed ({})",
                    self.deadline.as_millis(),
                    self.label
                ),
                Err(RecvTimeoutError::Disconnected) => STOPPED.to_string(),
            },
        };
        Captioned {
            caption: None,
            status: CaptionStatus::Missed(status),
            waited_ms: waited(start),
        }
    }
}

/// The captioner `cfg` asks for; `None` when captioning is off. A local model is
/// loaded here, so a bad model directory is an error at start-up.
pub fn open(cfg: &CaptionConfig, device: &Device) -> Result<Option<Box<dyn Captioner>>> {
    Ok(match cfg.mode {
        Mode::Off => None,
        Mode::Local => {
            let dir = cfg
                .model
                .clone()
                .context("caption.model is needed for mode = local")?;
            let mut c = FlorenceCaptioner::load(&dir, device)
                .with_context(|| format!("caption.model {}", dir.display()))?;
            c.options = CaptionOptions {
                beams: cfg.beams,
                max_new_tokens: cfg.max_new_tokens,
            };
            Some(Box::new(c))
        }
        Mode::Remote => Some(Box::new(RemoteCaptioner::new(cfg.remote.clone()))),
    })
}

/// Clears the busy flag however a caption ends, a panic included.
struct Idle<'a>(&'a AtomicBool);

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn worker(
    engine: &dyn Captioner,
    task: Task,
    rx: Receiver<Ask>,
    busy: &AtomicBool,
    late: &std::sync::Mutex<Option<String>>,
) {
    while let Ok(ask) = rx.recv() {
        let _idle = Idle(busy);
        // A captioner defect fails that poster's caption, never the worker: the
        // scan goes out without one and says why.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.caption(&ask.image, task)
        }))
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the captioner failed on this poster (a panic)"
            ))
        })
        .map_err(|e| format!("{e:#}"));
        // The scan may have stopped waiting; then a late caption is dropped, and a
        // late failure is kept for the next scan to tell.
        if let Err(std::sync::mpsc::SendError(Err(e))) = ask.reply.send(out) {
            *late.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    }
}
