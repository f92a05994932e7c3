//! The status server (tiny_http): the live page, JSON endpoints, SSE, metrics and
//! the authenticated upload endpoint. One thread accepts; each request gets a short
//! thread of its own, since SSE clients hold theirs open.

use super::metrics;
use crate::config::Config;
use crate::health::Health;
use crate::http::{bearer_ok, header, header_value, json, text};
use crate::pipeline::{Job, Poster, Queue, QueueError, ScanResult, Sink, Source};
use crate::preprocess::image::decode;
use crate::publish::outbox::Outbox;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tiny_http::{Method, Request, Response, Server};

const PAGE: &str = include_str!("page.html");
const MAX_CLIENTS: usize = 64;
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

pub struct StatusState {
    pub device_id: String,
    history: Mutex<VecDeque<ScanResult>>,
    capacity: usize,
    subscribers: Mutex<Vec<SyncSender<String>>>,
    pub health: Arc<Health>,
    outbox: Option<Arc<Outbox>>,
    queue_capacity: usize,
}

impl StatusState {
    pub fn new(c: &Config, health: Arc<Health>, outbox: Option<Arc<Outbox>>) -> Arc<Self> {
        Arc::new(Self {
            device_id: c.device_id.clone(),
            history: Mutex::new(VecDeque::new()),
            capacity: c.status.history.max(1),
            subscribers: Mutex::new(Vec::new()),
            health,
            outbox,
            queue_capacity: c.pipeline.queue,
        })
    }

    /// Sends one SSE event to every client; slow or gone clients are dropped.
    pub fn broadcast(&self, event: &str, data: &str) {
        let msg = format!("event: {event}\ndata: {data}\n\n");
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| tx.try_send(msg.clone()).is_ok());
    }

    fn subscribe(&self) -> Receiver<String> {
        let (tx, rx) = sync_channel(64);
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    fn history_json(&self) -> String {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&h.iter().rev().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into())
    }

    fn thumbnail(&self, id: &str) -> Option<Vec<u8>> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().find(|r| r.id == id).map(|r| r.thumbnail.clone())
    }

    fn status_json(&self) -> String {
        let latest = self
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back()
            .cloned();
        serde_json::json!({
            "device_id": self.device_id,
            "version": env!("CARGO_PKG_VERSION"),
            "health": self.health.view(),
            "outbox": self.outbox.as_ref().map_or(0, |o| o.len()),
            "latencies_ms": self.health.latencies(),
            "latest": latest,
        })
        .to_string()
    }
}

/// The pipeline sink that feeds the page.
pub struct StatusSink(pub Arc<StatusState>);

impl Sink for StatusSink {
    fn accept(&mut self, r: &ScanResult) -> Result<(), String> {
        {
            let mut h = self.0.history.lock().unwrap_or_else(|p| p.into_inner());
            h.push_back(r.clone());
            while h.len() > self.0.capacity {
                h.pop_front();
            }
        }
        self.0
            .broadcast("result", &serde_json::to_string(r).unwrap_or_default());
        Ok(())
    }
}

pub struct StatusServer {
    server: Arc<Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: std::net::SocketAddr,
}

impl StatusServer {
    pub fn start(
        c: &Config,
        state: Arc<StatusState>,
        queue: Queue,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let server = Arc::new(
            Server::http(&c.status.listen)
                .map_err(|e| anyhow::anyhow!("status.listen {}: {e}", c.status.listen))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow::anyhow!("status server has no IP address"))?;
        let ctx = Arc::new(Ctx {
            state: state.clone(),
            queue,
            token: c.status.token.clone(),
            max_upload: c.status.max_upload_bytes,
            active: AtomicUsize::new(0),
            stop,
        });
        // Health over SSE, so the page needs no polling.
        {
            let (state, ctx) = (state.clone(), ctx.clone());
            std::thread::spawn(move || {
                while !ctx.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_secs(2));
                    state.broadcast("status", &state.status_json());
                }
            });
        }
        let srv = server.clone();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                for req in srv.incoming_requests() {
                    if ctx.active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                        let _ = req.respond(text(503, "too many clients"));
                        continue;
                    }
                    let ctx = ctx.clone();
                    ctx.active.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        handle(&ctx, req);
                        ctx.active.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })?;
        Ok(Self {
            server,
            thread: Some(thread),
            addr,
        })
    }

    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ctx {
    state: Arc<StatusState>,
    queue: Queue,
    token: Option<String>,
    max_upload: usize,
    active: AtomicUsize,
    stop: Arc<AtomicBool>,
}

fn handle(ctx: &Ctx, req: Request) {
    let url = req.url().split('?').next().unwrap_or("/").to_string();
    let st = &ctx.state;
    let resp = match (req.method(), url.as_str()) {
        (Method::Get, "/") => Response::from_string(PAGE)
            .with_header(header("Content-Type", "text/html; charset=utf-8")),
        (Method::Get, "/healthz") => text(200, "ok"),
        (Method::Get, "/api/status") => json(200, st.status_json()),
        (Method::Get, "/api/history") => json(200, st.history_json()),
        (Method::Get, "/metrics") => {
            let outbox = st.outbox.as_ref().map_or(0, |o| o.len());
            let body = metrics::render(
                &st.health.view(),
                &st.health.latencies(),
                outbox,
                st.queue_capacity,
            );
            Response::from_string(body)
                .with_header(header("Content-Type", "text/plain; version=0.0.4"))
        }
        (Method::Get, "/api/events") => return sse(ctx, req),
        (Method::Get, p) if p.starts_with("/api/thumbnail/") => {
            let id = p
                .trim_start_matches("/api/thumbnail/")
                .trim_end_matches(".jpg");
            match st.thumbnail(id) {
                Some(jpg) if !jpg.is_empty() => {
                    Response::from_data(jpg).with_header(header("Content-Type", "image/jpeg"))
                }
                _ => text(404, "no such thumbnail"),
            }
        }
        (Method::Post, "/api/classify") => return upload(ctx, req),
        (_, "/api/classify") => text(405, "use POST"),
        _ => text(404, "not found"),
    };
    let _ = req.respond(resp);
}

fn sse(ctx: &Ctx, req: Request) {
    let rx = ctx.state.subscribe();
    let mut w = req.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = |w: &mut Box<dyn Write + Send>, s: &str| -> std::io::Result<()> {
        write!(w, "{:x}\r\n{s}\r\n", s.len())?;
        w.flush()
    };
    if w.write_all(head.as_bytes()).is_err() || chunk(&mut w, "retry: 2000\n\n").is_err() {
        return;
    }
    let _ = chunk(
        &mut w,
        &format!("event: status\ndata: {}\n\n", ctx.state.status_json()),
    );
    while !ctx.stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(msg) => {
                if chunk(&mut w, &msg).is_err() {
                    return;
                }
            }
            // A comment line keeps proxies and the browser from timing out.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if chunk(&mut w, ": keep-alive\n\n").is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn upload(ctx: &Ctx, mut req: Request) {
    let health = &ctx.state.health;
    let reject = |req: Request, code: u16, msg: &str| {
        health.rejected_upload();
        let _ = req.respond(text(code, msg));
    };
    let Some(token) = &ctx.token else {
        return reject(
            req,
            403,
            "uploads are disabled: set status.token (or MARQUEE_HTTP_TOKEN)",
        );
    };
    if !bearer_ok(&req, token) {
        return reject(req, 401, "missing or wrong bearer token");
    }
    if req.body_length().is_some_and(|n| n > ctx.max_upload) {
        return reject(
            req,
            413,
            &format!("body larger than {} bytes", ctx.max_upload),
        );
    }
    let mut body = Vec::new();
    if req
        .as_reader()
        .take(ctx.max_upload as u64 + 1)
        .read_to_end(&mut body)
        .is_err()
    {
        return reject(req, 400, "could not read the body");
    }
    if body.len() > ctx.max_upload {
        return reject(
            req,
            413,
            &format!("body larger than {} bytes", ctx.max_upload),
        );
    }
    let content_type = header_value(&req, "Content-Type").unwrap_or_default();
    let (image, mut overview) = match parse_body(&content_type, body) {
        Ok(parts) => parts,
        Err(e) => return reject(req, 400, &e),
    };
    if let Some(o) = header_value(&req, "X-Marquee-Overview") {
        overview = Some(o);
    }
    let img = match decode(&image) {
        Ok(i) => i,
        Err(e) => return reject(req, 422, &e.to_string()),
    };
    let (tx, rx) = sync_channel::<Result<String, String>>(1);
    let job = Job {
        poster: Poster {
            source: Source::Upload,
            name: "upload".into(),
            image: img,
            overview,
        },
        done: Some(Box::new(move |outcome| {
            let _ = tx.send(outcome.map(|r| serde_json::to_string(r).unwrap_or_default()));
        })),
    };
    match ctx.queue.try_send(job) {
        Ok(()) => {}
        Err((QueueError::Full, _)) => return reject(req, 503, "the classifier is busy: try again"),
        Err((QueueError::Closed, _)) => return reject(req, 503, "shutting down"),
    }
    let resp = match rx.recv_timeout(UPLOAD_TIMEOUT) {
        Ok(Ok(body)) => json(200, body),
        Ok(Err(e)) => text(500, &e),
        Err(_) => text(504, "classification timed out"),
    };
    let _ = req.respond(resp);
}

/// The image (and overview) of a multipart/form-data body, or the raw body.
fn parse_body(content_type: &str, body: Vec<u8>) -> Result<(Vec<u8>, Option<String>), String> {
    let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
    else {
        return Ok((body, None));
    };
    let boundary = boundary.trim_matches('"');
    let mut mp = multipart::server::Multipart::with_body(std::io::Cursor::new(body), boundary);
    let (mut image, mut overview) = (None, None);
    loop {
        match mp.read_entry() {
            Ok(Some(mut field)) => {
                let mut data = Vec::new();
                field
                    .data
                    .read_to_end(&mut data)
                    .map_err(|e| format!("multipart: {e}"))?;
                match &*field.headers.name {
                    "overview" => overview = Some(String::from_utf8_lossy(&data).into_owned()),
                    _ if image.is_none() => image = Some(data),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("multipart: {e}")),
        }
    }
    image
        .map(|i| (i, overview))
        .ok_or_else(|| "multipart body has no image field".into())
}
