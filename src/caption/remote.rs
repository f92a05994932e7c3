//! The networked captioner: Marquee's own caption server (`POST /v1/caption`, raw image
//! body) or any OpenAI-compatible chat-completions vision endpoint (llama.cpp server,
//! Ollama, vLLM). Timeouts on every request, a bounded number of retries, and a circuit
//! breaker so a dead server costs one fast "circuit open" instead of a timeout per scan.

use super::openai::{ChatRequest, ChatResponse, ImageUrl, Message, Part};
use crate::infer::captioner::{CaptionOutput, Captioner, StageTimings};
use crate::infer::task::Task;
use crate::util::backoff::Backoff;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How the caption server is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `marquee serve-captions`.
    #[default]
    Marquee,
    /// `POST {url}/v1/chat/completions` with an `image_url` data URL.
    Openai,
}

/// `[caption.remote]`: the caption server and how patient to be with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Base URL, e.g. `http://captioner.local:8788`.
    pub url: String,
    /// Marquee's own API or OpenAI's chat completions.
    pub protocol: Protocol,
    /// Bearer token (`MARQUEE_CAPTION_TOKEN` overrides).
    pub token: Option<String>,
    /// Model name sent to an OpenAI-compatible server.
    pub model: String,
    /// Per-request timeout, connect included.
    pub timeout_ms: u64,
    /// Extra attempts after a failure that may be transient (timeout, 5xx, refused).
    pub retries: u32,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit refuses before letting one trial request through.
    pub breaker_cooldown_ms: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            protocol: Protocol::Marquee,
            token: None,
            model: "florence-2".into(),
            timeout_ms: 5000,
            retries: 1,
            breaker_failures: 3,
            breaker_cooldown_ms: 30_000,
        }
    }
}

/// Why there is no caption. One line each; they end up in `caption_status`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemoteError {
    /// No answer within the timeout (ms).
    #[error("caption server timed out after {0} ms")]
    Timeout(u64),
    /// The server answered 503.
    #[error("caption server busy (503)")]
    Busy,
    /// The breaker is open: failures in a row, and seconds until it tries again.
    #[error("circuit open after {0} consecutive failures; retrying in {1} s")]
    CircuitOpen(u32, u64),
    /// A 4xx: its status and the first line of its body.
    #[error("caption server refused the request: HTTP {0}: {1}")]
    Refused(u16, String),
    /// No connection could be made.
    #[error("caption server unreachable: {0}")]
    Unreachable(String),
    /// An answer that could not be read.
    #[error("caption server sent a bad response: {0}")]
    BadResponse(String),
}

impl RemoteError {
    /// Worth another attempt (and counted by the breaker)? A 4xx is our fault, not the
    /// server's health.
    fn transient(&self) -> bool {
        !matches!(
            self,
            RemoteError::Refused(..) | RemoteError::CircuitOpen(..)
        )
    }
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// A captioner on another machine, behind a retrying client with a circuit breaker.
pub struct RemoteCaptioner {
    cfg: RemoteConfig,
    agent: ureq::Agent,
    breaker: Mutex<Breaker>,
}

/// Waits between retries: 100 ms, 200 ms, 400 ms, ...
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Longest response body we read from a caption server.
const MAX_RESPONSE: u64 = 1 << 20;
/// What is read of an error answer's body (for its first line).
const ERROR_BODY_MAX: u64 = 4096;

impl RemoteCaptioner {
    /// A client for `cfg` (nothing is sent until the first caption).
    pub fn new(cfg: RemoteConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self {
            cfg,
            agent,
            breaker: Mutex::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// Captions an encoded image (JPEG, PNG, ...).
    pub fn caption(&self, image: &[u8], task: Task) -> Result<CaptionOutput, RemoteError> {
        self.admit()?;
        let mut last = RemoteError::Unreachable("no attempt".into());
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                std::thread::sleep(backoff.advance());
            }
            match self.once(image, task) {
                Ok(out) => {
                    self.record(true);
                    return Ok(out);
                }
                Err(e) if e.transient() => last = e,
                Err(e) => return Err(e),
            }
        }
        self.record(false);
        Err(last)
    }

    fn admit(&self) -> Result<(), RemoteError> {
        let b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            Some(until) if Instant::now() < until => Err(RemoteError::CircuitOpen(
                b.failures,
                (until - Instant::now()).as_secs().max(1),
            )),
            // Open and cooled down: half-open, this request is the trial.
            _ => Ok(()),
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            *b = Breaker::default();
        } else {
            b.failures += 1;
            if b.failures >= self.cfg.breaker_failures.max(1) {
                b.open_until =
                    Some(Instant::now() + Duration::from_millis(self.cfg.breaker_cooldown_ms));
            }
        }
    }

    fn once(&self, image: &[u8], task: Task) -> Result<CaptionOutput, RemoteError> {
        let start = Instant::now();
        let base = self.cfg.url.trim_end_matches('/');
        let auth = self.cfg.token.as_ref().map(|t| format!("Bearer {t}"));
        let response = match self.cfg.protocol {
            Protocol::Marquee => {
                let mut req = self
                    .agent
                    .post(format!("{base}/v1/caption?task={}", task.name()))
                    .header("Content-Type", "application/octet-stream");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(image)
            }
            Protocol::Openai => {
                let mut req = self.agent.post(format!("{base}/v1/chat/completions"));
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send_json(openai_request(&self.cfg.model, image, task))
            }
        };
        let mut response = response.map_err(|e| self.transport(e))?;
        let status = response.status().as_u16();
        // The status decides first: an error's body is read only for its first
        // line, as bytes (any size, any encoding), and never counts against the
        // server's health when the status says the request was at fault.
        let mut read = |limit: u64| response.body_mut().with_config().limit(limit).read_to_vec();
        match status {
            200 => {}
            503 => return Err(RemoteError::Busy),
            s if s >= 500 => return Err(RemoteError::Unreachable(format!("HTTP {s}"))),
            s => {
                let head = read(ERROR_BODY_MAX).unwrap_or_default();
                return Err(RemoteError::Refused(
                    s,
                    first_line(&String::from_utf8_lossy(&head)),
                ));
            }
        }
        let body = read(MAX_RESPONSE).map_err(|e| self.transport(e))?;
        let body = String::from_utf8(body)
            .map_err(|_| RemoteError::BadResponse("the body is not UTF-8".into()))?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        match self.cfg.protocol {
            Protocol::Marquee => {
                let mut out: CaptionOutput = serde_json::from_str(&body)
                    .map_err(|e| RemoteError::BadResponse(e.to_string()))?;
                out.timings_ms.total = elapsed;
                Ok(out)
            }
            Protocol::Openai => {
                let answer: ChatResponse = serde_json::from_str(&body)
                    .map_err(|e| RemoteError::BadResponse(e.to_string()))?;
                let text = answer
                    .choices
                    .first()
                    .and_then(|c| c.message.as_ref())
                    .and_then(|m| m.content.as_deref())
                    .ok_or_else(|| {
                        RemoteError::BadResponse("no choices[0].message.content".into())
                    })?;
                let usage = answer.usage.clone().unwrap_or_default();
                Ok(CaptionOutput {
                    caption: crate::infer::task::clean(text),
                    task,
                    model: answer.model.unwrap_or_else(|| self.cfg.model.clone()),
                    tokens: usage.completion_tokens as usize,
                    prompt_tokens: usage.prompt_tokens as usize,
                    ids: Vec::new(),
                    timings_ms: StageTimings {
                        total: elapsed,
                        ..Default::default()
                    },
                })
            }
        }
    }

    fn transport(&self, e: ureq::Error) -> RemoteError {
        match e {
            ureq::Error::Timeout(_) => RemoteError::Timeout(self.cfg.timeout_ms),
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                RemoteError::Timeout(self.cfg.timeout_ms)
            }
            e => RemoteError::Unreachable(first_line(&e.to_string())),
        }
    }
}

impl Captioner for RemoteCaptioner {
    fn describe(&self) -> String {
        format!("remote {} ({:?})", self.cfg.url, self.cfg.protocol)
    }

    /// The poster travels as a JPEG.
    fn caption(&self, image: &image::RgbImage, task: Task) -> anyhow::Result<CaptionOutput> {
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image
            .write_to(&mut jpeg, image::ImageFormat::Jpeg)
            .map_err(|e| anyhow::anyhow!("encoding the poster: {e}"))?;
        Ok(RemoteCaptioner::caption(self, jpeg.get_ref(), task)?)
    }

    /// The file's bytes go as they are: no decode, no re-encode.
    fn caption_encoded(&self, bytes: &[u8], task: Task) -> anyhow::Result<CaptionOutput> {
        Ok(RemoteCaptioner::caption(self, bytes, task)?)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

/// A chat-completions request carrying the image as a data URL and the task's prompt.
pub fn openai_request(model: &str, image: &[u8], task: Task) -> ChatRequest {
    let mime = match image {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [b'R', b'I', b'F', b'F', ..] => "image/webp",
        _ => "image/jpeg",
    };
    let data = base64::engine::general_purpose::STANDARD.encode(image);
    ChatRequest {
        model: Some(model.to_string()),
        temperature: Some(0.0),
        messages: vec![Message {
            role: "user".into(),
            content: vec![
                Part {
                    kind: Some("text".into()),
                    text: Some(format!("{} {}", task.token(), task.prompt())),
                    ..Default::default()
                },
                Part {
                    kind: Some("image_url".into()),
                    image_url: Some(ImageUrl {
                        url: format!("data:{mime};base64,{data}"),
                    }),
                    ..Default::default()
                },
            ],
        }],
        ..Default::default()
    }
}
