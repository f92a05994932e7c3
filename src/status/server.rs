//! The status server: the live page, JSON endpoints, SSE, metrics and the
//! authenticated upload endpoint, on the hardened HTTP core in `crate::http`.
//! SSE clients have a budget of their own (`MAX_SSE`), below the connection cap, so
//! however many open the page, `/healthz` and the API still answer.

use super::metrics;
use crate::config::{DeviceId, StatusConfig};
use crate::health::Health;
use crate::http::{HttpServer, bearer_ok, drain, header_text, json, read_body, retry_soon, text};
use crate::pipeline::{Job, Poster, Queue, QueueError, ScanResult, Sink, SinkError, Source};
use crate::preprocess::image::decode;
use crate::publish::outbox::Outbox;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

const PAGE: &str = include_str!("page.html");
const DESK: &str = include_str!("desk.html");
/// Live-page clients at once; more get 503 (the page retries).
pub const MAX_SSE: usize = 32;
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// What the status page shows: recent results, health, live subscribers.
pub struct StatusState {
    /// The device's id.
    pub device_id: String,
    history: Mutex<VecDeque<ScanResult>>,
    capacity: usize,
    subscribers: Mutex<Vec<mpsc::Sender<String>>>,
    /// The appliance's health.
    pub health: Arc<Health>,
    outbox: Option<Arc<Outbox>>,
    queue_capacity: usize,
}

impl StatusState {
    /// The state of a page for device `device_id`.
    pub fn new(
        id: &DeviceId,
        s: &StatusConfig,
        queue_capacity: usize,
        health: Arc<Health>,
        outbox: Option<Arc<Outbox>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            device_id: id.to_string(),
            history: Mutex::new(VecDeque::new()),
            capacity: s.history.max(1),
            subscribers: Mutex::new(Vec::new()),
            health,
            outbox,
            queue_capacity,
        })
    }

    /// Sends one SSE event to every client; slow or gone clients are dropped.
    pub fn broadcast(&self, event: &str, data: &str) {
        let msg = format!("{event}\n{data}");
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| tx.try_send(msg.clone()).is_ok());
    }

    fn subscribe(&self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(64);
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

    /// After a failed outbox write, a probe write every tick: the page and
    /// `/healthz` turn green when the disk has room again, not at the next poster.
    fn recheck_outbox(&self) {
        if let Some(ob) = &self.outbox
            && self.health.outbox_unwritable().is_some()
            && ob.probe().is_ok()
        {
            self.health.outbox_writable();
        }
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
    fn accept(&mut self, r: &ScanResult) -> Result<(), SinkError> {
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

/// The running status page.
pub struct StatusServer {
    http: HttpServer,
    state: Arc<StatusState>,
    /// The bound address.
    pub addr: std::net::SocketAddr,
}

impl StatusServer {
    /// Binds `cfg.listen` and serves the page, the desk, uploads, SSE and metrics.
    pub fn start(
        s: &StatusConfig,
        state: Arc<StatusState>,
        queue: Queue,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        let ctx = Arc::new(Ctx {
            state: state.clone(),
            queue,
            token: s.token.clone(),
            max_upload: s.max_upload_bytes,
            sse: Arc::new(Semaphore::new(MAX_SSE)),
            uploads: Arc::new(Semaphore::new(UPLOAD_SLOTS)),
        });
        let router = Router::new()
            .route("/", get(page))
            .route("/desk", get(desk))
            .route("/healthz", get(healthz))
            .route("/api/status", get(status))
            .route("/api/history", get(history))
            .route("/metrics", get(metrics_text))
            .route("/api/events", get(events))
            .route("/api/thumbnail/{id}", get(thumbnail))
            .route("/api/classify", post(upload))
            .fallback(|| async { text(StatusCode::NOT_FOUND, "not found") })
            .with_state(ctx);
        let http = HttpServer::start(s.listen, router, 2, "status-http")
            .map_err(|e| anyhow::anyhow!("status.listen {}: {e:#}", s.listen))?;
        // Health over SSE, so the page needs no polling.
        {
            let state = state.clone();
            std::thread::Builder::new()
                .name("status-tick".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_secs(2));
                        state.recheck_outbox();
                        state.broadcast("status", &state.status_json());
                    }
                })?;
        }
        Ok(Self {
            addr: http.addr,
            http,
            state,
        })
    }

    /// Stops serving, letting open requests finish briefly.
    pub fn stop(self) {
        // Dropping the senders ends every SSE stream, so the drain is quick.
        self.state
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.http.stop();
    }
}

struct Ctx {
    state: Arc<StatusState>,
    queue: Queue,
    token: Option<String>,
    max_upload: usize,
    sse: Arc<Semaphore>,
    /// Uploads read and decoded at once (`UPLOAD_SLOTS`).
    uploads: Arc<Semaphore>,
}

type Shared = State<Arc<Ctx>>;

/// 200 `ok`, or 503 with the reason while results cannot be kept (the outbox
/// cannot be written: a full or read-only disk).
async fn healthz(State(ctx): Shared) -> Response {
    match ctx.state.health.outbox_unwritable() {
        None => text(StatusCode::OK, "ok"),
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, &why),
    }
}

async fn page() -> Response {
    html_page(PAGE, &PAGE_CSP)
}

/// Content-Security-Policy of a page: its one inline script by hash, nothing
/// from elsewhere, never framed.
fn csp(html: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let script = html
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(s, _)| s);
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; \
         base-uri 'none'; frame-ancestors 'none'"
    )
}

static PAGE_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| csp(PAGE));
static DESK_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| csp(DESK));

/// An HTML page with the headers that keep it from being framed, sniffed or
/// made to run another script.
fn html_page(body: &'static str, csp: &str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// The poster desk: a person gives a poster, an overview and a caption, and sees
/// the genres. It posts to `/api/classify` like any client.
async fn desk() -> Response {
    html_page(DESK, &DESK_CSP)
}

async fn status(State(ctx): Shared) -> Response {
    json(StatusCode::OK, ctx.state.status_json())
}

async fn history(State(ctx): Shared) -> Response {
    json(StatusCode::OK, ctx.state.history_json())
}

async fn metrics_text(State(ctx): Shared) -> Response {
    let st = &ctx.state;
    let outbox = st.outbox.as_ref().map_or(0, |o| o.len());
    let body = metrics::render(&st.health, outbox, st.queue_capacity);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn thumbnail(State(ctx): Shared, Path(id): Path<String>) -> Response {
    match ctx.state.thumbnail(id.trim_end_matches(".jpg")) {
        Some(jpg) if !jpg.is_empty() => {
            ([(header::CONTENT_TYPE, "image/jpeg")], jpg).into_response()
        }
        _ => text(StatusCode::NOT_FOUND, "no such thumbnail"),
    }
}

async fn events(State(ctx): Shared) -> Response {
    let Ok(permit) = ctx.sse.clone().try_acquire_owned() else {
        return retry_soon(text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("too many live clients (limit {MAX_SSE})"),
        ));
    };
    let rx = ctx.state.subscribe();
    let first = ctx.state.status_json();
    // The permit lives in the stream: it is returned when the client goes away.
    let stream = futures_util::stream::unfold(
        (Some(first), rx, permit),
        |(first, mut rx, permit)| async move {
            let msg = match first {
                Some(f) => format!("status\n{f}"),
                None => rx.recv().await?,
            };
            let (event, data) = msg.split_once('\n').unwrap_or(("message", ""));
            let ev = Event::default().event(event).data(data);
            Some((Ok::<_, Infallible>(ev), (None, rx, permit)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Uploads read and decoded at the same time. An 8192×8192 picture decodes to
/// 192 MiB of RGB (plus the decoder's own buffers), so this is the memory bound.
const UPLOAD_SLOTS: usize = 2;
/// How long an upload waits for a slot before it is told to come back.
const UPLOAD_WAIT: Duration = Duration::from_secs(10);

async fn upload(State(ctx): Shared, headers: HeaderMap, body: Body) -> Response {
    let health = ctx.state.health.clone();
    let reject = |code: StatusCode, msg: &str| {
        health.rejected_upload();
        let r = text(code, msg);
        if code == StatusCode::SERVICE_UNAVAILABLE {
            retry_soon(r)
        } else {
            r
        }
    };
    let Some(token) = &ctx.token else {
        return reject(
            StatusCode::FORBIDDEN,
            "uploads are disabled: set status.token (or MARQUEE_HTTP_TOKEN)",
        );
    };
    if !bearer_ok(&headers, token) {
        drain(body, &headers).await;
        return reject(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    // Ask the queue first, and hold one of `UPLOAD_SLOTS` while the body is read
    // and decoded: a crowd of huge uploads costs at most that many bodies and
    // decoded pictures at once, never one each.
    if ctx.queue.is_full() {
        drain(body, &headers).await;
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "the classifier is busy: try again",
        );
    }
    let Ok(Ok(_slot)) =
        tokio::time::timeout(UPLOAD_WAIT, ctx.uploads.clone().acquire_owned()).await
    else {
        drain(body, &headers).await;
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many uploads at once: try again",
        );
    };
    let body = match read_body(body, &headers, ctx.max_upload).await {
        Ok(b) => b,
        Err(resp) => {
            health.rejected_upload();
            return resp;
        }
    };
    let content_type = header_text(&headers, "content-type").unwrap_or_default();
    let mut up = match parse_body(&content_type, body).await {
        Ok(parts) => parts,
        Err(e) => return reject(StatusCode::BAD_REQUEST, &e),
    };
    if let Some(o) = header_text(&headers, "x-marquee-overview") {
        up.overview = Some(o);
    }
    let image = std::mem::take(&mut up.image);
    let img = match tokio::task::spawn_blocking(move || decode(&image)).await {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return reject(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        Err(_) => return reject(StatusCode::INTERNAL_SERVER_ERROR, "decoding failed"),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
    let job = Job {
        poster: Poster {
            source: Source::Upload,
            name: up.name.unwrap_or_else(|| "upload".into()),
            image: img,
            overview: up.overview,
            caption: up.caption,
        },
        done: Some(Box::new(move |outcome| {
            let _ = tx.send(
                outcome
                    .map(|r| serde_json::to_string(r).unwrap_or_default())
                    .map_err(|e| e.to_string()),
            );
        })),
    };
    match ctx.queue.try_send(job) {
        Ok(()) => {}
        Err(QueueError::Full) => {
            return reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "the classifier is busy: try again",
            );
        }
        Err(QueueError::Closed) => {
            return reject(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        }
    }
    match tokio::time::timeout(UPLOAD_TIMEOUT, rx).await {
        Ok(Ok(Ok(body))) => json(StatusCode::OK, body),
        Ok(Ok(Err(e))) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Ok(Err(_)) => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        Err(_) => text(StatusCode::GATEWAY_TIMEOUT, "classification timed out"),
    }
}

/// What an upload carries.
#[derive(Debug, Default)]
struct Upload {
    image: Vec<u8>,
    /// The file name the browser sent, for people reading the result.
    name: Option<String>,
    overview: Option<String>,
    caption: Option<String>,
}

/// The image, file name, overview and caption of a multipart/form-data body, or the
/// raw body as the image.
async fn parse_body(content_type: &str, body: Vec<u8>) -> Result<Upload, String> {
    let Ok(boundary) = multer::parse_boundary(content_type) else {
        return Ok(Upload {
            image: body,
            ..Default::default()
        });
    };
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut up = Upload::default();
    let mut image = None;
    loop {
        match mp.next_field().await {
            Ok(Some(field)) => {
                let field_name = field.name().unwrap_or_default().to_string();
                let file_name = field.file_name().map(str::to_string);
                let data = field.bytes().await.map_err(|e| format!("multipart: {e}"))?;
                // The body limit bounds these texts; the pipeline clips them.
                let text = || Some(String::from_utf8_lossy(&data).trim().to_string());
                match field_name.as_str() {
                    "overview" => up.overview = text().filter(|s| !s.is_empty()),
                    "caption" => up.caption = text().filter(|s| !s.is_empty()),
                    _ if image.is_none() => {
                        image = Some(data.to_vec());
                        up.name = file_name;
                    }
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => return Err(format!("multipart: {e}")),
        }
    }
    up.image = image.ok_or("multipart body has no image field")?;
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A status server on a free loopback port, with a token, and no classifier
    /// behind its queue (uploads that get that far wait, then time out).
    fn server() -> (StatusServer, crate::pipeline::Queue) {
        let c = StatusConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: Some("t0ken".into()),
            max_upload_bytes: 4096,
            ..Default::default()
        };
        let id = Config::default().device_id;
        let state = StatusState::new(&id, &c, 1, Arc::new(Health::default()), None);
        let (queue, rx) = crate::pipeline::Queue::new(1);
        std::mem::forget(rx);
        let stop = Arc::new(AtomicBool::new(false));
        let s = StatusServer::start(&c, state, queue.clone(), stop).unwrap();
        (s, queue)
    }

    fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random request heads (methods, paths with percent-escapes and queries,
        /// headers, Content-Length values, bodies) over a real socket: each gets an
        /// HTTP answer or a closed connection, and the server keeps serving.
        #[test]
        fn random_requests_never_take_the_server_down(
            method in prop_oneof![Just("GET".to_string()), Just("POST".to_string()), Just("PUT".to_string()), "[A-Z]{1,8}"],
            path in prop_oneof![Just("/api/classify".to_string()), Just("/api/thumbnail/x%2F..%00.jpg".to_string()), "/[a-z%0-9?=&/.]{0,40}"],
            headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,60}"), 0..8),
            length in prop_oneof![Just(None), (0u64..10_000).prop_map(Some), Just(Some(u64::MAX)), Just(Some(100_000_000_000))],
            auth in any::<bool>(),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let srv = SERVER.with(|s| *s);
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
            for (k, v) in &headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            if let Some(n) = length {
                req.push_str(&format!("Content-Length: {n}\r\n"));
            }
            if auth {
                req.push_str("Authorization: Bearer t0ken\r\n");
            }
            req.push_str("\r\n");
            let mut bytes = req.into_bytes();
            bytes.extend(&body);
            let out = exchange(srv, &bytes);
            prop_assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&out));
            let ok = exchange(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            prop_assert!(ok.starts_with(b"HTTP/1.1 200"), "healthz after {:?}: {:?} / first answer {:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]), String::from_utf8_lossy(&ok), String::from_utf8_lossy(&out[..out.len().min(300)]));
        }
    }

    thread_local! {
        /// One server for every case, alive for the whole test run.
        static SERVER: std::net::SocketAddr = {
            let (s, q) = server();
            let addr = s.addr;
            std::mem::forget(s);
            std::mem::forget(q);
            addr
        };
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// The upload path's body parsing takes any content type and body without a
        /// panic: a multipart body (well-formed or damaged) or a raw image.
        #[test]
        fn any_upload_body_parses_or_is_refused(
            ct in prop_oneof![Just("image/jpeg".to_string()), "multipart/form-data; boundary=[a-zA-Z0-9\"]{0,12}", ".{0,60}"],
            body in proptest::collection::vec(any::<u8>(), 0..600),
            wrap in any::<bool>(),
        ) {
            let body = if wrap {
                let mut b = b"--B\r\nContent-Disposition: form-data; name=\"overview\"\r\n\r\n".to_vec();
                b.extend(&body);
                b.extend(b"\r\n--B--\r\n");
                b
            } else {
                body
            };
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(parse_body(&ct, body));
        }
    }
}
