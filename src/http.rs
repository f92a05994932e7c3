//! The HTTP core both servers (status page, caption server) stand on: hyper's HTTP/1
//! server with hard limits, under an axum router.
//!
//! One request cannot take the server down:
//! - the head is bounded in bytes and in header count (431 beyond), and must arrive
//!   within `HEADER_TIMEOUT`, which also closes idle keep-alive connections;
//! - a body is read only by the handler that wants it, up to its limit and within
//!   `BODY_TIMEOUT`; a declared length over the limit is refused (413) unread;
//! - conflicting `Content-Length` headers are refused by hyper's parser (400), and
//!   identical repeats folded into one, as RFC 9112 §6.3 allows;
//! - the acceptor only accepts: every connection is its own task, so a slow client
//!   holds up nobody else;
//! - connections are capped, and each holds a slot that is released when its task
//!   ends for any reason, a panic included (a guard, not a counter); when all slots
//!   are taken, a new connection takes the slot of the oldest idle one (no request
//!   in progress), so idle or slowloris sockets can never lock out a real client.

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Request line plus headers, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;
/// Longest a client may take to send its request line and headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a handler waits for a declared body to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// An over-limit body is read and discarded up to this many bytes (for this long)
/// before the 413, so an honest client that sends it anyway reads the answer
/// instead of a reset; past either bound the connection is just closed.
const DRAIN_MAX: usize = 8 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Open connections at once; beyond that a new one evicts the oldest idle one, or
/// is closed at once when every one is serving a request.
pub const MAX_CONNECTIONS: usize = 256;
/// How long `stop` waits for open requests before it drops them.
const DRAIN: Duration = Duration::from_secs(5);

/// A running server: its own small tokio runtime, an acceptor task, and a way to stop.
pub struct HttpServer {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Arc<Notify>,
    runtime: Option<tokio::runtime::Runtime>,
    acceptor: Option<tokio::task::JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `listen` and serves `router` on `threads` runtime threads.
    pub fn start(listen: SocketAddr, router: Router, threads: usize, name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .enable_all()
            .build()
            .context("starting the HTTP runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(Notify::new());
        let acceptor = runtime.spawn(accept(listener, router, stop.clone()));
        Ok(Self {
            addr,
            stop,
            runtime: Some(runtime),
            acceptor: Some(acceptor),
        })
    }

    /// Stops accepting, gives open requests `DRAIN` to finish, then drops them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.notify_one();
        if let (Some(rt), Some(acceptor)) = (self.runtime.take(), self.acceptor.take()) {
            let _ = rt.block_on(async { tokio::time::timeout(DRAIN, acceptor).await });
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The open connections, so that a new one can take the slot of the oldest idle
/// one when all are taken: idle or slow clients (a crowd of silent sockets, a
/// slowloris trickling its head) can then never lock out a client that asks.
#[derive(Default)]
struct Slots {
    open: std::sync::Mutex<Vec<Slot>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Slot {
    id: u64,
    /// Requests being served on it (a streamed body counts until it ends).
    busy: Arc<std::sync::atomic::AtomicUsize>,
    abort: tokio::task::AbortHandle,
}

impl Slots {
    /// Makes room for one more connection: evicts the oldest idle one when all
    /// `MAX_CONNECTIONS` are taken. False when every slot is busy.
    fn make_room(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() < MAX_CONNECTIONS {
            return true;
        }
        let idle = open
            .iter()
            .position(|s| s.busy.load(std::sync::atomic::Ordering::SeqCst) == 0);
        match idle {
            Some(i) => {
                open.remove(i).abort.abort();
                true
            }
            None => false,
        }
    }

    fn add(
        &self,
        busy: Arc<std::sync::atomic::AtomicUsize>,
        abort: tokio::task::AbortHandle,
    ) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.push(Slot { id, busy, abort });
        id
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|s| s.id != id);
    }
}

/// Frees a connection's slot when its task ends for any reason (done, evicted, a
/// panic): a guard, not a counter.
struct SlotGuard {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.remove(self.id);
    }
}

/// Marks a connection busy while a request (and its streamed answer) is served.
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn accept(listener: tokio::net::TcpListener, router: Router, stop: Arc<Notify>) {
    let slots = Arc::new(Slots::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // A client that half-closes after its request still gets the answer.
        .half_close(true)
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEADER_BYTES.max(8192) * 4);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.notified() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of file descriptors and the like: wait, do not spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !slots.make_room() {
            drop(stream);
            continue;
        }
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let svc = busy_service(TowerToHyperService::new(router.clone()), busy.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<SlotGuard>();
        let task = tokio::spawn(async move {
            // Holds the slot until this task ends, however it ends.
            let _slot = ready_rx.await;
            let _ = conn.await;
        });
        let id = slots.add(busy, task.abort_handle());
        let _ = ready_tx.send(SlotGuard {
            slots: slots.clone(),
            id,
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The router as a hyper service that counts the requests it is serving on one
/// connection, up to the end of each answer's body.
fn busy_service(
    inner: TowerToHyperService<Router>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone {
    let inner = Arc::new(inner);
    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = Busy::enter(&busy);
        let fut = hyper::service::Service::call(&*inner, req);
        async move {
            use http_body_util::BodyExt;
            let resp = fut.await?;
            Ok(resp.map(|b| {
                Body::new(b.map_frame(move |f| {
                    let _held = &guard;
                    f
                }))
            }))
        }
    })
}

/// The body, read up to `max` bytes within `BODY_TIMEOUT`; the reply to send
/// instead when it is too large, too slow or broken. Call it only after the
/// request is authenticated: the drain is for clients we trust.
pub async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Vec<u8>, Response> {
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        drain(body, headers).await;
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, max)).await {
        Ok(Ok(b)) => Ok(b.to_vec()),
        Ok(Err(e)) if is_length_limit(&e) => Err(too_large()),
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            &format!("reading the body: {e}"),
        )),
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Reads and discards a body the handler refuses (wrong token, too large), so a
/// client still sending it reads the answer instead of a reset. Only a body that
/// declares at most `DRAIN_MAX` bytes, and only for `DRAIN_TIMEOUT`: anything
/// bigger just has its connection closed.
pub async fn drain(body: Body, headers: &HeaderMap) {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n <= DRAIN_MAX as u64) {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, axum::body::to_bytes(body, DRAIN_MAX)).await;
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// A plain-text response.
pub fn text(code: StatusCode, body: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{body}\n"),
    )
        .into_response()
}

/// A JSON response (the body is already JSON).
pub fn json(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `Retry-After: 1` on a busy answer, so well-behaved clients back off.
pub fn retry_soon(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Whether `headers` carry `Authorization: Bearer <token>`, compared in constant time.
pub fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let got = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let want = format!("Bearer {token}");
    // The digests are compared, not the texts: both are 32 bytes whatever was sent,
    // so neither the time nor an early length check tells how much of it was right.
    Sha256::digest(got)
        .ct_eq(&Sha256::digest(want.as_bytes()))
        .into()
}

/// A header's value as text, if it is text.
pub fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
