//! The appliance's pipeline: sources hand `Job`s to one classifier thread through a
//! bounded queue (a full queue makes a source wait, or an upload get 503), and each
//! `ScanResult` goes to the sinks (the MQTT outbox, the status page) before the
//! job's `done` callback runs, so a hot-folder file moves to done/ only once its
//! result is safe on disk.

use crate::caption::stage::{CaptionStage, Captioned};
use crate::health::{Health, Heartbeat};
use crate::infer::timings::Timings;
use crate::infer::{Classifier, GenreScore};
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Where a poster came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The kiosk camera.
    Camera,
    /// The hot folder.
    Folder,
    /// An HTTP upload or the desk.
    Upload,
}

/// Longest overview kept in a result (characters). The text tower reads 128
/// wordpieces, so this loses nothing the model would see; it keeps every result
/// far inside the MQTT payload budget, whichever way the text came in.
pub const OVERVIEW_MAX_CHARS: usize = 4000;
/// Longest caption kept in a result (characters).
pub const CAPTION_MAX_CHARS: usize = 1000;
/// Longest poster name kept in a result (characters).
pub const NAME_MAX_CHARS: usize = 255;

/// `s` cut to at most `max` characters.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => s[..end].to_string(),
        None => s.to_string(),
    }
}

/// A decoded poster on its way to the classifier.
pub struct Poster {
    /// Where it came from.
    pub source: Source,
    /// File name, or a camera/upload label, for people reading the result.
    pub name: String,
    /// The decoded poster.
    pub image: RgbImage,
    /// The film's plot text, when it came with one.
    pub overview: Option<String>,
    /// A caption given with the poster (the desk); the captioner is then not asked.
    pub caption: Option<String>,
}

/// What happened to a job: its result, or why there is none.
pub type Outcome<'a> = Result<&'a ScanResult, ScanError>;

/// Why a poster has no result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScanError {
    /// The classifier refused it.
    #[error("classify failed: {0}")]
    Classify(String),
    /// A defect (a panic) while scanning it, caught for this poster only.
    #[error("internal error: {0}")]
    Internal(String),
    /// A sink could not keep its result.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Why a sink could not keep a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The result could not be encoded for the outbox.
    #[error("result could not be encoded: {0}")]
    Encode(String),
    /// The outbox could not write it (a full or read-only disk).
    #[error("outbox write failed: {0}")]
    OutboxWrite(String),
}

/// Called once the job's result is safe in every sink, or with why it failed.
pub type Done = Box<dyn FnOnce(Outcome<'_>) + Send>;

/// A poster and what to do when it is done.
pub struct Job {
    /// The poster.
    pub poster: Poster,
    /// Called with the outcome (a hot-folder file then moves to done/ or failed/).
    pub done: Option<Done>,
}

/// One classified poster, as published and shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanResult {
    /// Unique per result: device id, milliseconds, a sequence number.
    pub id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Where the poster came from.
    pub source: Source,
    /// Its file name or label.
    pub name: String,
    /// The caption it was classified with.
    pub caption: Option<String>,
    /// Why `caption` is null, when it is.
    pub caption_status: String,
    /// The overview it was classified with.
    pub overview: Option<String>,
    /// Every genre's score, highest first.
    pub genres: Vec<GenreScore>,
    /// The genres over their thresholds.
    pub predicted: Vec<String>,
    /// Where the time went.
    pub timings_ms: Timings,
    /// A small JPEG of the poster for the status page (not published).
    #[serde(skip)]
    pub thumbnail: Vec<u8>,
}

/// Receives every result, in order, on the classifier thread.
pub trait Sink: Send {
    /// Must not return before the result is durable where durability matters.
    fn accept(&mut self, result: &ScanResult) -> Result<(), SinkError>;
}

/// The overview an MQTT command left for the next scan that comes without one: the
/// MQTT session sets it and shows it, the classifier takes it.
#[derive(Debug, Default, Clone)]
pub struct OverviewCommand(Arc<Mutex<Option<String>>>);

impl OverviewCommand {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The overview waiting for the next scan, if any (it stays waiting).
    pub fn peek(&self) -> Option<String> {
        self.slot().clone()
    }

    /// Leaves `text` for the next scan (`None` clears it).
    pub fn set(&self, text: Option<String>) {
        *self.slot() = text;
    }

    /// Takes the waiting overview: one command serves one scan.
    pub fn take(&self) -> Option<String> {
        self.slot().take()
    }
}

/// How many posters wait for the classifier (a diagnostic for Home Assistant).
#[derive(Clone)]
pub struct Backlog(Receiver<Job>);

impl Backlog {
    /// The backlog of the queue whose receiving end is `jobs`.
    pub fn new(jobs: &Receiver<Job>) -> Self {
        Self(jobs.clone())
    }

    /// Posters queued and not yet taken by the classifier.
    pub fn pending(&self) -> usize {
        self.0.len()
    }
}

/// The sending side that sources hold.
#[derive(Clone)]
pub struct Queue {
    tx: Sender<Job>,
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Every place in the queue is taken (uploads get 503).
    #[error("the classifier queue is full")]
    Full,
    /// The classifier has stopped (shutdown).
    #[error("the pipeline has stopped")]
    Closed,
}

/// How often a source waiting for room beats its heartbeat and looks at `stop`.
const SEND_WAIT: Duration = Duration::from_millis(200);

impl Queue {
    /// A queue of `capacity` jobs, and the classifier's end of it.
    pub fn new(capacity: usize) -> (Self, Receiver<Job>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        (Self { tx }, rx)
    }

    /// Waits for room (sources that can wait: folder, camera), beating `heartbeat`
    /// meanwhile: a source waiting on a busy classifier is alive. Gives up when
    /// `stop` is set; the job is then dropped (a hot-folder file stays in the inbox).
    pub fn send(
        &self,
        job: Job,
        heartbeat: &Heartbeat,
        stop: &AtomicBool,
    ) -> Result<(), QueueError> {
        let mut job = job;
        loop {
            heartbeat.beat();
            // After a stop nothing new goes in: the classifier finishes what it has.
            if stop.load(Ordering::SeqCst) {
                return Err(QueueError::Closed);
            }
            match self.tx.send_timeout(job, SEND_WAIT) {
                Ok(()) => return Ok(()),
                // The stop flag is looked at again at the top of the loop.
                Err(SendTimeoutError::Timeout(j)) => job = j,
                Err(SendTimeoutError::Disconnected(_)) => return Err(QueueError::Closed),
            }
        }
    }

    /// Whether a job sent now would find the queue full (uploads ask before they
    /// spend memory on decoding).
    pub fn is_full(&self) -> bool {
        self.tx.is_full()
    }

    /// Never waits (uploads: the client gets 503 instead, and the job is dropped).
    pub fn try_send(&self, job: Job) -> Result<(), QueueError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => QueueError::Full,
            TrySendError::Disconnected(_) => QueueError::Closed,
        })
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn new_id(device_id: &str) -> String {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{device_id}-{ms}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

fn thumbnail(img: &RgbImage) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let tw = 180u32;
    let th = (h as u64 * tw as u64 / w.max(1) as u64).clamp(1, 540) as u32;
    let small = image::imageops::thumbnail(img, tw, th);
    let mut out = std::io::Cursor::new(Vec::new());
    match small.write_to(&mut out, image::ImageFormat::Jpeg) {
        Ok(()) => out.into_inner(),
        Err(_) => Vec::new(),
    }
}

/// The classifier thread: it owns everything a scan needs, takes jobs off the queue
/// until `stop` is set (then finishes the jobs already queued) or every `Queue` is
/// dropped, and hands each result to the sinks before calling the job's `done`.
pub struct Worker {
    /// Names every result's id.
    pub device_id: String,
    /// The genre model.
    pub classifier: Classifier,
    /// The caption stage, when captioning is on.
    pub captioner: Option<Arc<CaptionStage>>,
    /// The queue's receiving end.
    pub jobs: Receiver<Job>,
    /// The MQTT overview command, for a scan that comes without an overview.
    pub overview: OverviewCommand,
    /// Where results go, in order: the outbox, the status page.
    pub sinks: Vec<Box<dyn Sink>>,
    /// Counters and the captioner's state.
    pub health: Arc<Health>,
    /// Beaten on every job and every wait.
    pub heartbeat: Heartbeat,
    /// Set at shutdown.
    pub stop: Arc<AtomicBool>,
}

impl Worker {
    /// Classifies until stopped.
    pub fn run(mut self) {
        while let Some(Job { poster, done }) = self.next_job() {
            // One poster's panic (a model or kernel defect) fails that poster, with its
            // reason, and the appliance goes on: its hot-folder file reaches failed/
            // instead of crash-looping the service.
            let scanned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.scan(&poster)))
                    .unwrap_or_else(|panic| Err(ScanError::Internal(panic_text(&*panic))));
            let delivered = scanned.and_then(|r| {
                for sink in self.sinks.iter_mut() {
                    sink.accept(&r)?;
                }
                Ok(r)
            });
            match &delivered {
                Ok(r) => {
                    self.health.processed(r.timings_ms.pipeline.unwrap_or(0.0));
                    tracing::info!(id = %r.id, name = %r.name, predicted = ?r.predicted, "classified")
                }
                Err(e) => {
                    self.health.failed();
                    tracing::warn!(name = %poster.name, "{e}");
                }
            }
            if let Some(done) = done {
                done(delivered.as_ref().map_err(Clone::clone));
            }
        }
    }

    /// The next job; `None` once stopped with the queue empty, or closed.
    fn next_job(&self) -> Option<Job> {
        loop {
            self.heartbeat.beat();
            match self.jobs.recv_timeout(Duration::from_millis(200)) {
                Ok(job) => return Some(job),
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::SeqCst) => {
                    return self.jobs.try_recv().ok();
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Captions (when asked) and classifies one poster.
    fn scan(&self, poster: &Poster) -> Result<ScanResult, ScanError> {
        let start = Instant::now();
        let overview = poster
            .overview
            .clone()
            .or_else(|| self.overview.take())
            .map(|o| clip(&o, OVERVIEW_MAX_CHARS));
        let captioner = self.captioner.as_deref();
        let captioned = match (&poster.caption, captioner) {
            (Some(given), _) => Captioned::given(given),
            (None, Some(c)) => c.caption(&poster.image),
            (None, None) => Captioned::off(),
        };
        if captioner.is_some() && poster.caption.is_none() {
            self.health
                .set_captioner(captioned.caption.is_some(), &captioned.status.to_string());
        }
        let caption = captioned
            .caption
            .as_deref()
            .map(|c| clip(c, CAPTION_MAX_CHARS));
        let p = self
            .classifier
            .classify(&poster.image, overview.as_deref(), caption.as_deref())
            .map_err(|e| ScanError::Classify(format!("{e:#}")))?;
        let mut timings = p.timings_ms;
        timings.pipeline = Some(start.elapsed().as_secs_f64() * 1e3);
        if captioner.is_some() && poster.caption.is_none() {
            timings.caption = Some(captioned.waited_ms);
        }
        Ok(ScanResult {
            id: new_id(&self.device_id),
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            source: poster.source,
            name: clip(&poster.name, NAME_MAX_CHARS),
            caption,
            caption_status: captioned.status.to_string(),
            overview,
            genres: p.genres,
            predicted: p.predicted,
            timings_ms: timings,
            thumbnail: thumbnail(&poster.image),
        })
    }
}

/// The text of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_cuts_on_character_boundaries() {
        assert_eq!(clip("héllo", 2), "hé");
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("", 0), "");
    }
}
