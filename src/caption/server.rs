//! `marquee serve-captions`: Florence-2 over HTTP for appliances that cannot run it.
//!
//! - `POST /v1/caption?task=caption[&beams=N][&max_new_tokens=N]`, body = the encoded
//!   image -> `{caption, task, model, tokens, ids, timings_ms}`.
//! - `POST /v1/chat/completions`: the OpenAI-compatible vision form (image as a data
//!   URL, a task token such as `<CAPTION>` in the text), answered in that format.
//! - `GET /healthz`: `{status, model, busy, queued}`, no token needed.
//!
//! One acceptor thread checks the token and the body size, then hands work to a fixed
//! pool through a bounded queue; when the queue is full the client gets 503 at once
//! rather than waiting. Shutdown stops accepting, finishes what is queued, and returns.

use super::local::FlorenceCaptioner;
use super::{CaptionOptions, Task};
use crate::http::{bearer_ok, header, header_value, json};
use crate::preprocess::image::decode;
use anyhow::{Context, Result};
use base64::Engine;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tiny_http::{Method, Request, Server};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
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
            listen: "127.0.0.1:8788".into(),
            token: None,
            workers: 1,
            queue: 4,
            max_body: 16 << 20,
            max_new_tokens: 256,
        }
    }
}

enum Api {
    Marquee,
    Openai,
}

struct Work {
    req: Request,
    api: Api,
    image: Vec<u8>,
    task: Task,
    opts: CaptionOptions,
}

pub struct CaptionServer {
    addr: SocketAddr,
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    captioner: Arc<FlorenceCaptioner>,
    cfg: ServerConfig,
    busy: AtomicUsize,
    queued: AtomicUsize,
}

impl CaptionServer {
    pub fn start(captioner: Arc<FlorenceCaptioner>, cfg: ServerConfig) -> Result<Self> {
        let server = Arc::new(
            Server::http(&cfg.listen)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .context("caption server bound to a non-IP address")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(cfg.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            captioner,
            cfg: cfg.clone(),
            busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
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
        let (srv, st) = (server.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("caption-accept".into())
                .spawn(move || accept(&srv, tx, &shared, &st))?,
        );
        Ok(Self {
            addr,
            server,
            stop,
            threads,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the workers finish the queue, and waits for them.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn error(req: Request, code: u16, msg: &str) {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut resp = json(code, body);
    if code == 503 {
        resp = resp.with_header(header("Retry-After", "1"));
    }
    let _ = req.respond(resp);
}

fn accept(server: &Server, tx: SyncSender<Work>, shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let req = match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(req)) => req,
            Ok(None) => continue,
            Err(_) => break,
        };
        let path = req.url().split('?').next().unwrap_or("").to_string();
        match (req.method(), path.as_str()) {
            (Method::Get, "/healthz") => {
                let body = serde_json::json!({
                    "status": "ok",
                    "model": shared.captioner.name,
                    "busy": shared.busy.load(Ordering::SeqCst),
                    "queued": shared.queued.load(Ordering::SeqCst),
                });
                let _ = req.respond(json(200, body.to_string()));
            }
            (Method::Post, "/v1/caption") => admit(req, Api::Marquee, &tx, shared),
            (Method::Post, "/v1/chat/completions") => admit(req, Api::Openai, &tx, shared),
            _ => error(
                req,
                404,
                "not found: use POST /v1/caption or /v1/chat/completions",
            ),
        }
    }
    // Dropping `tx` lets the workers drain the queue and exit.
}

fn admit(mut req: Request, api: Api, tx: &SyncSender<Work>, shared: &Shared) {
    let cfg = &shared.cfg;
    if let Some(token) = &cfg.token
        && !bearer_ok(&req, token)
    {
        return error(req, 401, "missing or wrong bearer token");
    }
    let declared =
        header_value(&req, "Content-Length").and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > cfg.max_body) {
        return error(
            req,
            413,
            &format!("body over the {} byte limit", cfg.max_body),
        );
    }
    let mut body = Vec::new();
    if let Err(e) = req
        .as_reader()
        .take(cfg.max_body as u64 + 1)
        .read_to_end(&mut body)
    {
        return error(req, 400, &format!("reading the body: {e}"));
    }
    if body.len() > cfg.max_body {
        return error(
            req,
            413,
            &format!("body over the {} byte limit", cfg.max_body),
        );
    }
    let parsed = match api {
        Api::Marquee => marquee_request(req.url(), body, cfg.max_new_tokens),
        Api::Openai => openai_request(&body, cfg.max_new_tokens),
    };
    let (image, task, opts) = match parsed {
        Ok(p) => p,
        Err(e) => return error(req, 400, &e),
    };
    let work = Work {
        req,
        api,
        image,
        task,
        opts,
    };
    shared.queued.fetch_add(1, Ordering::SeqCst);
    match tx.try_send(work) {
        Ok(()) => {}
        Err(TrySendError::Full(w)) | Err(TrySendError::Disconnected(w)) => {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            error(w.req, 503, "caption server busy: queue full, retry shortly");
        }
    }
}

fn query(url: &str, key: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

type Parsed = (Vec<u8>, Task, CaptionOptions);

fn marquee_request(url: &str, body: Vec<u8>, cap: usize) -> Result<Parsed, String> {
    let task = match query(url, "task") {
        Some(t) => t.parse()?,
        None => Task::Caption,
    };
    let num = |k: &str| -> Result<Option<usize>, String> {
        query(url, k)
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
    Ok((body, task, opts))
}

/// The OpenAI vision form: the first `image_url` (a base64 data URL) and the task token
/// found in the text parts (`<CAPTION>` when there is none).
fn openai_request(body: &[u8], cap: usize) -> Result<Parsed, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let parts: Vec<&serde_json::Value> = v["messages"]
        .as_array()
        .ok_or("no messages")?
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .collect();
    let url = parts
        .iter()
        .find_map(|p| p["image_url"]["url"].as_str())
        .ok_or("no image_url part")?;
    let data = url
        .split_once(";base64,")
        .map(|(_, d)| d)
        .ok_or("image_url must be a base64 data URL")?;
    let image = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("image_url: {e}"))?;
    let task = parts
        .iter()
        .filter_map(|p| p["text"].as_str())
        .flat_map(|t| t.split_whitespace())
        .find_map(|w| w.parse::<Task>().ok().filter(|_| w.starts_with('<')))
        .unwrap_or_default();
    let opts = CaptionOptions {
        beams: None,
        max_new_tokens: v["max_tokens"].as_u64().map(|n| (n as usize).clamp(1, cap)),
    };
    Ok((image, task, opts))
}

fn worker(rx: &Mutex<Receiver<Work>>, shared: &Shared) {
    loop {
        let work = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            }
        };
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        shared.busy.fetch_add(1, Ordering::SeqCst);
        serve(work, &shared.captioner);
        shared.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(w: Work, captioner: &FlorenceCaptioner) {
    let image = match decode(&w.image) {
        Ok(img) => img,
        Err(e) => return error(w.req, 422, &e.to_string()),
    };
    let out = match captioner.caption(&image, w.task, &w.opts) {
        Ok(o) => o,
        Err(e) => return error(w.req, 500, &format!("captioning failed: {e:#}")),
    };
    let body = match w.api {
        Api::Marquee => serde_json::to_value(&out).unwrap_or_default(),
        Api::Openai => serde_json::json!({
            "id": format!("marquee-{}", std::process::id()),
            "object": "chat.completion",
            "model": out.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": out.caption},
                "finish_reason": "stop"
            }],
            "usage": {"completion_tokens": out.tokens},
        }),
    };
    let _ = w.req.respond(json(200, body.to_string()));
}
