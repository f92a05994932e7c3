//! The caption server and the appliance's remote client, on loopback with the tiny
//! Florence-2 of the reference kit: both protocols, the token, the body limit, 503 when
//! the queue is full, a hung server (timeout), the circuit breaker, the appliance's
//! deadline, and graceful shutdown.

use crate::common;

use common::shared;
use marquee::backend::Backend;
use marquee::caption::local::FlorenceCaptioner;
use marquee::caption::remote::{Protocol, RemoteCaptioner, RemoteConfig, RemoteError};
use marquee::caption::server::{CaptionServer, ServerConfig};
use marquee::caption::stage::{CaptionConfig, CaptionStage, Mode};
use marquee::infer::task::Task;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn kit() -> PathBuf {
    shared().join("reference/florence2")
}

fn captioner() -> Arc<FlorenceCaptioner> {
    Arc::new(
        FlorenceCaptioner::load(&kit().join("tiny"), &Backend::Flex.device().unwrap()).unwrap(),
    )
}

/// The tiny model's caption server on a free loopback port.
fn serve(cfg: ServerConfig) -> CaptionServer {
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..cfg
    };
    CaptionServer::start(captioner(), cfg).unwrap()
}

fn astronaut() -> Vec<u8> {
    std::fs::read(kit().join("astronaut.png")).unwrap()
}

fn client(url: String, protocol: Protocol, token: Option<&str>) -> RemoteCaptioner {
    RemoteCaptioner::new(RemoteConfig {
        url,
        protocol,
        token: token.map(str::to_string),
        timeout_ms: 10_000,
        retries: 0,
        ..Default::default()
    })
}

fn beam3_astronaut() -> Vec<u32> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kit().join("expected_ids.json")).unwrap())
            .unwrap();
    serde_json::from_value(json["astronaut_beam3_20_ids"].clone()).unwrap()
}

#[test]
fn round_trip_both_protocols_token_and_limits() {
    let server = serve(ServerConfig {
        token: Some("s3cret".into()),
        max_body: 2 << 20,
        ..Default::default()
    });
    let url = format!("http://{}", server.addr());

    // Marquee's protocol: the model's generation_config (beam 3) gives the reference ids.
    let out = client(url.clone(), Protocol::Marquee, Some("s3cret"))
        .caption(&astronaut(), Task::Caption)
        .unwrap();
    assert_eq!(out.ids, beam3_astronaut());
    assert_eq!(out.task, Task::Caption);
    assert_eq!(out.model, "tiny");
    assert!(!out.caption.is_empty() && out.timings_ms.total > 0.0);

    // OpenAI-compatible chat completions: the same caption.
    let oa = client(url.clone(), Protocol::Openai, Some("s3cret"))
        .caption(&astronaut(), Task::Caption)
        .unwrap();
    assert_eq!(oa.caption, out.caption);

    // Wrong token: refused, and not retried as if the server were sick.
    let bad =
        client(url.clone(), Protocol::Marquee, Some("nope")).caption(&astronaut(), Task::Caption);
    assert!(matches!(bad, Err(RemoteError::Refused(401, _))), "{bad:?}");

    // Body over the limit: 413 before the server reads it.
    let big = vec![0u8; 3 << 20];
    let r = client(url.clone(), Protocol::Marquee, Some("s3cret")).caption(&big, Task::Caption);
    assert!(matches!(r, Err(RemoteError::Refused(413, _))), "{r:?}");

    // Not an image: a clear 422.
    let r = client(url.clone(), Protocol::Marquee, Some("s3cret")).caption(b"hello", Task::Caption);
    assert!(matches!(r, Err(RemoteError::Refused(422, _))), "{r:?}");

    // Health needs no token.
    let health: serde_json::Value = ureq::get(format!("{url}/healthz"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(health["status"], "ok");

    // Graceful shutdown: returns, and the port is closed afterwards.
    server.shutdown();
    let r = client(url, Protocol::Marquee, Some("s3cret")).caption(&astronaut(), Task::Caption);
    assert!(matches!(r, Err(RemoteError::Unreachable(_))), "{r:?}");
}

#[test]
fn full_queue_answers_503() {
    let server = serve(ServerConfig {
        workers: 1,
        queue: 1,
        ..Default::default()
    });
    let url = format!(
        "http://{}/v1/caption?beams=3&max_new_tokens=120",
        server.addr()
    );
    let image = Arc::new(astronaut());
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let (url, image) = (url.clone(), image.clone());
            std::thread::spawn(move || {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .new_agent();
                agent.post(&url).send(&image[..]).unwrap().status().as_u16()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    println!("statuses: {statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );

    // The client reports 503 as "busy": a burst of clients released together.
    let gate = Arc::new(std::sync::Barrier::new(12));
    let results: Vec<_> = (0..12)
        .map(|_| {
            let remote = client(format!("http://{}", server.addr()), Protocol::Marquee, None);
            let (image, gate) = (image.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                remote.caption(&image, Task::Caption)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(results.iter().any(|r| r.is_ok()));
    assert!(
        results.iter().any(|r| matches!(r, Err(RemoteError::Busy))),
        "{results:?}"
    );
    server.shutdown();
}

/// A server that accepts connections and never answers: the "hung caption server".
fn hung_server() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

#[test]
fn hung_server_times_out_and_the_breaker_opens() {
    let (_hung, url) = hung_server();
    let remote = RemoteCaptioner::new(RemoteConfig {
        url,
        timeout_ms: 300,
        retries: 0,
        breaker_failures: 2,
        breaker_cooldown_ms: 400,
        ..Default::default()
    });
    for _ in 0..2 {
        let t = Instant::now();
        let r = remote.caption(&astronaut(), Task::Caption);
        assert!(matches!(r, Err(RemoteError::Timeout(300))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    // Open: refused at once, without touching the network.
    let t = Instant::now();
    let r = remote.caption(&astronaut(), Task::Caption);
    assert!(matches!(r, Err(RemoteError::CircuitOpen(2, _))), "{r:?}");
    assert!(t.elapsed() < Duration::from_millis(50));
    // After the cool-down one trial goes through (and fails, so it opens again).
    std::thread::sleep(Duration::from_millis(450));
    let r = remote.caption(&astronaut(), Task::Caption);
    assert!(matches!(r, Err(RemoteError::Timeout(_))), "{r:?}");
    let r = remote.caption(&astronaut(), Task::Caption);
    assert!(matches!(r, Err(RemoteError::CircuitOpen(..))), "{r:?}");
}

#[test]
fn appliance_stage_publishes_on_deadline_and_with_caption() {
    let device = Backend::Flex.device().unwrap();
    let img = image::open(kit().join("astronaut.png")).unwrap().to_rgb8();

    // A hung server: the scan goes on at the deadline and says so.
    let (_hung, url) = hung_server();
    let mut cfg = CaptionConfig {
        mode: Mode::Remote,
        deadline_ms: 400,
        ..Default::default()
    };
    cfg.remote.url = url;
    cfg.remote.timeout_ms = 5000;
    let stage = CaptionStage::start(&cfg, &device).unwrap().unwrap();
    let t = Instant::now();
    let c = stage.caption(&img);
    assert!(c.caption.is_none());
    assert!(
        c.status
            .to_string()
            .starts_with("none: deadline of 400 ms passed"),
        "{}",
        c.status
    );
    assert!(t.elapsed() < Duration::from_millis(1500));
    // The worker is still stuck on that request: the next scan does not wait at all.
    let c = stage.caption(&img);
    assert!(c.status.to_string().contains("busy"), "{}", c.status);

    // A live server: the caption arrives in time.
    let server = serve(ServerConfig::default());
    let mut cfg = CaptionConfig {
        mode: Mode::Remote,
        deadline_ms: 20_000,
        ..Default::default()
    };
    cfg.remote.url = format!("http://{}", server.addr());
    let stage = CaptionStage::start(&cfg, &device).unwrap().unwrap();
    let c = stage.caption(&img);
    assert!(c.caption.is_some(), "{}", c.status);
    assert!(
        c.status.to_string().starts_with("ok: remote"),
        "{}",
        c.status
    );

    // A dead server: no caption, the reason, no panic.
    server.shutdown();
    let c = stage.caption(&img);
    assert!(c.caption.is_none());
    assert!(
        c.status
            .to_string()
            .starts_with("none: caption server unreachable"),
        "{}",
        c.status
    );

    // On the device.
    let cfg = CaptionConfig {
        mode: Mode::Local,
        model: Some(kit().join("tiny")),
        deadline_ms: 20_000,
        ..Default::default()
    };
    let stage = CaptionStage::start(&cfg, &device).unwrap().unwrap();
    let c = stage.caption(&img);
    assert!(
        c.status.to_string().starts_with("ok: local tiny"),
        "{}",
        c.status
    );
}

#[test]
fn a_stalled_body_does_not_freeze_the_caption_server() {
    use std::io::{Read, Write};
    let server = serve(ServerConfig::default());
    let addr = server.addr();
    // Declares a body and stops sending after three bytes.
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    stalled
        .write_all(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let health = ureq::get(format!("http://{addr}/healthz")).call().unwrap();
    assert_eq!(health.status(), 200);
    let out = client(format!("http://{addr}"), Protocol::Marquee, None)
        .caption(&astronaut(), Task::Caption)
        .unwrap();
    assert_eq!(out.ids, beam3_astronaut());
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    // A huge or doubled Content-Length gets an answer, not an abort.
    for req in [
        "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\n",
        "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\nConnection: close\r\n\r\n",
        "POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let code: u16 = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!((400..500).contains(&code), "{req:?}: {resp}");
    }
    assert_eq!(
        ureq::get(format!("http://{addr}/healthz"))
            .call()
            .unwrap()
            .status(),
        200
    );
    drop(stalled);
    server.shutdown();
}

/// The official OpenAI Python client (pinned in tests/setup.sh) against the caption
/// server: it lists the models, gets a caption with usage counts, streams one (chunks
/// ending in `[DONE]`), and a wrong key is an AuthenticationError.
#[test]
fn the_openai_python_client_captions_streams_and_lists_models() {
    let python = marquee::model::cache::CacheDir::from_env()
        .root()
        .join("openai-venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run tests/setup.sh",
        python.display()
    );
    let server = serve(ServerConfig {
        token: Some("s3cret".into()),
        ..Default::default()
    });
    let script = r#"
import base64, json, sys
import openai
base, image = sys.argv[1], sys.argv[2]
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "text", "text": "<CAPTION>"},
    {"type": "image_url", "image_url": {"url": url}}]}]
client = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0)
out = {"version": openai.__version__}
out["models"] = [m.id for m in client.models.list()]
r = client.chat.completions.create(model=out["models"][0], messages=messages)
out["content"] = r.choices[0].message.content
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]
chunks = list(client.chat.completions.create(model=out["models"][0], messages=messages, stream=True))
out["chunks"] = len(chunks)
out["streamed"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(
        model=out["models"][0], messages=messages)
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code
print(json.dumps(out))
"#;
    let o = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(format!("http://{}/v1", server.addr()))
        .arg(kit().join("astronaut.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["version"], "3.57.0");
    assert_eq!(out["models"], serde_json::json!(["tiny"]));
    let content = out["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{out}");
    assert_eq!(
        out["streamed"], content,
        "the stream carries the same caption"
    );
    assert!(out["chunks"].as_u64().unwrap() >= 2, "{out}");
    assert_eq!(out["finish"], "stop");
    let usage: Vec<u64> = serde_json::from_value(out["usage"].clone()).unwrap();
    assert!(
        usage[0] > 0 && usage[1] > 0 && usage[2] == usage[0] + usage[1],
        "{out}"
    );
    assert_eq!(out["wrong_key"], 401);
    server.shutdown();
}

/// A server that answers every request with `status` and `body`, then closes.
fn answering_server(status: u16, body: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in l.incoming().flatten() {
            // The whole request first (until the client pauses), so that closing
            // never resets a client still sending its body.
            let mut buf = [0u8; 65536];
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    url
}

#[test]
fn a_4xx_with_any_body_is_the_request_s_fault_not_the_server_s() {
    // 2 MB of bytes that are not UTF-8: the status decides, the breaker stays shut.
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 7) as u8 | 0x80).collect();
    let remote = RemoteCaptioner::new(RemoteConfig {
        url: answering_server(400, body),
        timeout_ms: 3000,
        retries: 0,
        breaker_failures: 1,
        ..Default::default()
    });
    for _ in 0..3 {
        let r = remote.caption(&astronaut(), Task::Caption);
        assert!(matches!(r, Err(RemoteError::Refused(400, _))), "{r:?}");
    }
}

#[test]
fn a_late_timeout_reaches_the_next_scan_s_status() {
    let device = Backend::Flex.device().unwrap();
    let img = image::open(kit().join("astronaut.png")).unwrap().to_rgb8();
    let (_hung, url) = hung_server();
    let mut cfg = CaptionConfig {
        mode: Mode::Remote,
        deadline_ms: 200,
        ..Default::default()
    };
    cfg.remote.url = url;
    cfg.remote.timeout_ms = 600;
    cfg.remote.retries = 0;
    let stage = CaptionStage::start(&cfg, &device).unwrap().unwrap();
    let c = stage.caption(&img);
    assert!(
        c.status.to_string().contains("deadline of 200 ms passed"),
        "{}",
        c.status
    );
    std::thread::sleep(Duration::from_millis(1000));
    let c = stage.caption(&img);
    assert!(
        c.status
            .to_string()
            .contains("failed late: caption server timed out after 600 ms"),
        "{}",
        c.status
    );
}
