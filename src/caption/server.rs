//! `marquee serve-captions`: Florence-2 over HTTP for appliances that cannot run it.
//!
//! - `POST /v1/caption?task=caption[&beams=N][&max_new_tokens=N]`, body = the encoded
//!   image -> `{caption, task, model, tokens, ids, timings_ms}`.
//! - `POST /v1/chat/completions`: the OpenAI-compatible vision form (image as a data
//!   URL, a task token such as `<CAPTION>` in the text), answered in that format.
//!   With `"stream": true`, server-sent chunks ending in `data: [DONE]`; `usage` counts
//!   the prompt (image and task tokens) and completion tokens.
//! - `GET /v1/models`: the one model served (token needed, as for captions).
//! - `GET /healthz`: `{status, model, busy, queued}`, no token needed.
//!
//! The HTTP side (limits, timeouts, connection cap) is `crate::http`'s: every request
//! is its own task, so a client that stalls mid-body holds up nobody. A handler checks
//! the token and reads the body within its limit, then hands the work to a fixed pool
//! of captioning threads through a bounded queue; when the queue is full the client
//! gets 503 at once rather than waiting. Shutdown stops accepting, finishes what is
//! queued, and returns.

use super::local::FlorenceCaptioner;
use super::openai::{ChatRequest, ChatResponse, Choice, Reply, Usage};
use crate::http::{HttpServer, bearer_ok, drain, json, read_body, retry_soon};
use crate::infer::captioner::CaptionOptions;
use crate::infer::task::Task;
use crate::preprocess::image::decode;
use anyhow::Result;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

/// `marquee serve-captions`: where it listens and who may ask.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address and port.
    pub listen: SocketAddr,
    /// Bearer token every request must carry (none: open).
    pub token: Option<String>,
    /// Requests captioned at once (each runs the whole model).
    pub workers: usize,
    /// Requests that may wait for a worker; beyond that, 503.
    pub queue: usize,
    /// Largest request body (bytes); beyond that, 413.
    pub max_body: usize,
    /// Upper bound on `max_new_tokens` a client may ask for.
    pub max_new_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8788)),
            token: None,
            workers: 1,
            queue: 4,
            max_body: 16 << 20,
            max_new_tokens: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Marquee,
    Openai,
    /// OpenAI with `stream: true`: the answer as server-sent chunks ending in `[DONE]`.
    OpenaiStream,
}

struct Work {
    reply: oneshot::Sender<Response>,
    api: Api,
    image: Vec<u8>,
    task: Task,
    opts: CaptionOptions,
}

/// A running caption server; dropping it does not stop it (see `stop`).
pub struct CaptionServer {
    http: HttpServer,
    tx: Arc<Mutex<Option<Sender<Work>>>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Shared {
    fn all_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) == self.cfg.workers.max(1)
    }
}

struct Shared {
    captioner: Arc<FlorenceCaptioner>,
    cfg: ServerConfig,
    busy: AtomicUsize,
    queued: AtomicUsize,
    /// Worker threads still running (each counts itself out when it ends).
    alive: AtomicUsize,
    tx: Arc<Mutex<Option<Sender<Work>>>>,
}

/// Longest a request waits in the queue and the worker together.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl CaptionServer {
    /// Binds `cfg.listen` and serves `captioner` on worker threads.
    pub fn start(captioner: Arc<FlorenceCaptioner>, cfg: ServerConfig) -> Result<Self> {
        // Every worker takes from the one queue (a multi-consumer channel).
        let (tx, rx) = crossbeam_channel::bounded::<Work>(cfg.queue.max(1));
        let tx = Arc::new(Mutex::new(Some(tx)));
        let shared = Arc::new(Shared {
            captioner,
            cfg: cfg.clone(),
            busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            alive: AtomicUsize::new(cfg.workers.max(1)),
            tx: tx.clone(),
        });
        let mut threads = Vec::new();
        for i in 0..cfg.workers.max(1) {
            let (rx, shared) = (rx.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("caption-worker-{i}"))
                    .spawn(move || worker(&rx, &shared))?,
            );
        }
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/v1/caption", post(caption))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "not found: use POST /v1/caption or /v1/chat/completions",
                )
            })
            .with_state(shared.clone());
        let http = HttpServer::start(cfg.listen, router, 2, "caption-http")?;
        Ok(Self {
            http,
            tx,
            threads,
            shared,
        })
    }

    /// Whether every worker is still running (the service's watchdog check).
    pub fn workers_alive(&self) -> bool {
        self.shared.all_alive()
    }

    /// The bound address (the port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.http.addr
    }

    /// Stops accepting, lets the workers finish the queue, and waits for them.
    pub fn shutdown(self) {
        // Closing the queue first: a request arriving now gets 503, and the workers
        // exit once the queue is empty.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        for t in self.threads {
            let _ = t.join();
        }
        self.http.stop();
    }
}

fn error(code: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    let resp = json(code, body);
    if code == StatusCode::SERVICE_UNAVAILABLE {
        retry_soon(resp)
    } else {
        resp
    }
}

type St = State<Arc<Shared>>;

async fn healthz(State(shared): St) -> Response {
    let ok = shared.all_alive();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "a captioning worker has stopped" },
        "model": shared.captioner.name,
        "busy": shared.busy.load(Ordering::SeqCst),
        "queued": shared.queued.load(Ordering::SeqCst),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, body.to_string())
}

async fn caption(
    State(shared): St,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admit(&shared, Api::Marquee, &q, &headers, body).await
}

/// The one model this server holds, as OpenAI clients list models first.
async fn models(State(shared): St, headers: HeaderMap) -> Response {
    if let Some(token) = &shared.cfg.token
        && !bearer_ok(&headers, token)
    {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let body = serde_json::json!({
        "object": "list",
        "data": [{"id": shared.captioner.name, "object": "model", "created": 0, "owned_by": "marquee"}],
    });
    json(StatusCode::OK, body.to_string())
}

async fn chat(State(shared): St, headers: HeaderMap, body: Body) -> Response {
    admit(&shared, Api::Openai, &HashMap::new(), &headers, body).await
}

async fn admit(
    shared: &Shared,
    api: Api,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let cfg = &shared.cfg;
    if let Some(token) = &cfg.token
        && !bearer_ok(headers, token)
    {
        drain(body, headers).await;
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let body = match read_body(body, headers, cfg.max_body).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let parsed = match api {
        Api::Marquee => marquee_request(query, body, cfg.max_new_tokens),
        Api::Openai | Api::OpenaiStream => openai_request(&body, cfg.max_new_tokens),
    };
    let (image, task, opts, stream) = match parsed {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let api = if stream { Api::OpenaiStream } else { api };
    let (reply, answer) = oneshot::channel();
    let work = Work {
        reply,
        api,
        image,
        task,
        opts,
    };
    shared.queued.fetch_add(1, Ordering::SeqCst);
    let sent = match shared.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(tx) => tx.try_send(work).map_err(|e| match e {
            TrySendError::Full(_) => "caption server busy: queue full, retry shortly",
            TrySendError::Disconnected(_) => "caption server shutting down",
        }),
        None => Err("caption server shutting down"),
    };
    if let Err(msg) = sent {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        return error(StatusCode::SERVICE_UNAVAILABLE, msg);
    }
    // Every queued request has a deadline: a stuck worker never holds a client.
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(_)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the captioning worker stopped",
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!("no caption within {} s", REQUEST_TIMEOUT.as_secs()),
        ),
    }
}

/// The image, the task, the generation options, and whether to stream the answer.
type Parsed = (Vec<u8>, Task, CaptionOptions, bool);

fn marquee_request(
    query: &HashMap<String, String>,
    body: Vec<u8>,
    cap: usize,
) -> Result<Parsed, String> {
    let task = match query.get("task") {
        Some(t) => t.parse()?,
        None => Task::Caption,
    };
    let num = |k: &str| -> Result<Option<usize>, String> {
        query
            .get(k)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("{k} must be a whole number"))
            })
            .transpose()
    };
    let opts = CaptionOptions {
        beams: num("beams")?.map(|b| b.clamp(1, 8)),
        max_new_tokens: num("max_new_tokens")?.map(|n| n.clamp(1, cap)),
    };
    Ok((body, task, opts, false))
}

/// The OpenAI vision form: the first `image_url` (a base64 data URL) and the task token
/// found in the text parts (`<CAPTION>` when there is none).
fn openai_request(body: &[u8], cap: usize) -> Result<Parsed, String> {
    let req: ChatRequest = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => format!("not a chat request: {e}"),
        _ => format!("body is not JSON: {e}"),
    })?;
    let url = req
        .parts()
        .find_map(|p| p.image_url.as_ref())
        .map(|u| u.url.as_str())
        .ok_or("no image_url part")?;
    let data = url
        .split_once(";base64,")
        .map(|(_, d)| d)
        .ok_or("image_url must be a base64 data URL")?;
    let image = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("image_url: {e}"))?;
    let task = req
        .parts()
        .filter_map(|p| p.text.as_deref())
        .flat_map(|t| t.split_whitespace())
        .find_map(|w| w.parse::<Task>().ok().filter(|_| w.starts_with('<')))
        .unwrap_or_default();
    let opts = CaptionOptions {
        beams: None,
        max_new_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .map(|n| (n as usize).clamp(1, cap)),
    };
    Ok((image, task, opts, req.stream))
}

/// Counts a worker out when its thread ends, however it ends.
struct Alive<'a>(&'a AtomicUsize);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn worker(rx: &Receiver<Work>, shared: &Shared) {
    let _alive = Alive(&shared.alive);
    // Ends when the queue is closed (shutdown) and empty.
    for work in rx {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let _idle = Alive(&shared.busy);
        serve(work, &shared.captioner);
    }
}

/// Answers one request; a captioner panic becomes a 500 for that request, and the
/// worker lives on.
fn serve(w: Work, captioner: &FlorenceCaptioner) {
    let resp = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&w, captioner)))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the captioner failed on this image",
            )
        });
    let _ = w.reply.send(resp);
}

fn answer(w: &Work, captioner: &FlorenceCaptioner) -> Response {
    let image = match decode(&w.image) {
        Ok(img) => img,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    };
    let out = match captioner.caption(&image, w.task, &w.opts) {
        Ok(o) => o,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("captioning failed: {e:#}"),
            );
        }
    };
    let id = format!("marquee-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let usage = Usage {
        prompt_tokens: out.prompt_tokens as u64,
        completion_tokens: out.tokens as u64,
        total_tokens: (out.prompt_tokens + out.tokens) as u64,
    };
    // One answer, or one chunk of a streamed one.
    let answer = |object: &str, choice: Choice, usage: Option<Usage>| ChatResponse {
        id: id.clone(),
        object: object.into(),
        created,
        model: Some(out.model.clone()),
        choices: vec![choice],
        usage,
    };
    let said = |role: Option<&str>, content: Option<&str>| Reply {
        role: role.map(str::to_string),
        content: content.map(str::to_string),
    };
    let body = match w.api {
        Api::Marquee => serde_json::to_value(&out).unwrap_or_default(),
        Api::Openai => {
            let choice = Choice {
                index: 0,
                message: Some(said(Some("assistant"), Some(&out.caption))),
                delta: None,
                finish_reason: Some("stop".into()),
            };
            serde_json::to_value(answer("chat.completion", choice, Some(usage))).unwrap_or_default()
        }
        Api::OpenaiStream => {
            // The caption is whole before the first byte: it goes out as one content
            // chunk between the role chunk and the finishing one (with the usage).
            let chunk = |delta: Reply, finish: Option<&str>, usage: Option<Usage>| {
                let choice = Choice {
                    index: 0,
                    message: None,
                    delta: Some(delta),
                    finish_reason: finish.map(str::to_string),
                };
                let c = serde_json::to_string(&answer("chat.completion.chunk", choice, usage))
                    .unwrap_or_default();
                format!("data: {c}\n\n")
            };
            let sse = [
                chunk(said(Some("assistant"), Some("")), None, None),
                chunk(said(None, Some(&out.caption)), None, None),
                chunk(Reply::default(), Some("stop"), Some(usage)),
                "data: [DONE]\n\n".to_string(),
            ]
            .concat();
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Body::from(sse))
                .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
        }
    };
    json(StatusCode::OK, body.to_string())
}

/// Completion ids.
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
