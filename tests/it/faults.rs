//! Fault tests: a real Mosquitto killed at the worst moment, poison results, hostile
//! HTTP clients, and a slow writer, all against `marquee run` as a real process on
//! loopback. Each scenario is one that lost data or took the appliance down before.

use crate::common;

use common::appliance::*;
use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A TCP proxy between Marquee and the broker that can cut the link at the worst
/// moment: when armed, it swallows the broker's PUBACK of the next result (a QoS 1
/// PUBLISH on `.../events`): the broker has the message, Marquee never hears so. It
/// then cuts the connection and refuses new ones until `resume`.
struct Proxy {
    port: u16,
    armed: Arc<AtomicBool>,
    tripped: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

fn read_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut p = vec![0u8; 1];
    s.read_exact(&mut p)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        p.push(b[0]);
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let start = p.len();
    p.resize(start + len, 0);
    s.read_exact(&mut p[start..])?;
    Ok(p)
}

/// The packet id of a QoS 1 PUBLISH on a `.../events` topic.
fn result_publish_id(pkt: &[u8]) -> Option<u16> {
    if pkt[0] & 0xF0 != 0x30 || (pkt[0] >> 1) & 3 != 1 {
        return None;
    }
    let mut i = 1;
    while pkt[i] & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let tlen = usize::from(u16::from_be_bytes([pkt[i], pkt[i + 1]]));
    let topic = &pkt[i + 2..i + 2 + tlen];
    let id = &pkt[i + 2 + tlen..i + 4 + tlen];
    topic
        .ends_with(b"/events")
        .then(|| u16::from_be_bytes([id[0], id[1]]))
}

impl Proxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let tripped = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (a, t, p) = (armed.clone(), tripped.clone(), paused.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if p.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees a refused session
                }
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_in, mut b_out) =
                    (client.try_clone().unwrap(), broker.try_clone().unwrap());
                // Packet ids of result publishes on this connection.
                let results = Arc::new(std::sync::Mutex::new(HashSet::new()));
                let r = results.clone();
                std::thread::spawn(move || {
                    while let Ok(pkt) = read_packet(&mut c_in) {
                        if let Some(id) = result_publish_id(&pkt) {
                            r.lock().unwrap().insert(id);
                        }
                        if b_out.write_all(&pkt).is_err() {
                            break;
                        }
                    }
                    let _ = b_out.shutdown(Shutdown::Both);
                });
                let (a, t, p) = (a.clone(), t.clone(), p.clone());
                std::thread::spawn(move || {
                    let (mut b_in, mut c_out) = (broker, client);
                    while let Ok(pkt) = read_packet(&mut b_in) {
                        let of_result = pkt[0] & 0xF0 == 0x40
                            && pkt.len() >= 4
                            && results
                                .lock()
                                .unwrap()
                                .remove(&u16::from_be_bytes([pkt[2], pkt[3]]));
                        if of_result && a.swap(false, Ordering::SeqCst) {
                            p.store(true, Ordering::SeqCst);
                            t.store(true, Ordering::SeqCst);
                            break;
                        }
                        if c_out.write_all(&pkt).is_err() {
                            break;
                        }
                    }
                    let _ = b_in.shutdown(Shutdown::Both);
                    let _ = c_out.shutdown(Shutdown::Both);
                });
            }
        });
        Self {
            port,
            armed,
            tripped,
            paused,
        }
    }

    fn arm(&self) {
        self.tripped.store(false, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// Unique result ids in arrival order; panics if a first arrival is out of order.
fn delivered_in_order(sub: &Subscriber) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for e in events(sub) {
        let id = e["id"].as_str().unwrap().to_string();
        if seen.insert(id.clone()) {
            order.push(id);
        }
    }
    for w in order.windows(2) {
        assert!(
            seq_of(&w[0]) < seq_of(&w[1]),
            "out of order: {} before {}",
            w[0],
            w[1]
        );
    }
    order
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.contains("classified")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn broker_killed_between_publish_and_puback_ten_times_loses_nothing() {
    let _serial = serial();
    let dir = common::tmpdir("faults-broker-kills");
    let mut broker = Broker::start(&dir);
    let proxy = Proxy::start(broker.port);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    let m = start_marquee(&dir, proxy.port, "");
    let all = posters(300);
    for (i, p) in all.iter().enumerate() {
        drop_file(
            &m.inbox,
            &format!("p{i:03}.jpg"),
            &std::fs::read(p).unwrap(),
        );
    }
    for kill in 0..10 {
        // Let some results through between kills, so every kill lands mid-burst.
        let target = (kill + 1) * 20;
        let end = Instant::now() + Duration::from_secs(120);
        while delivered_in_order(&sub).len() < target {
            assert!(
                Instant::now() < end,
                "kill {kill}: {} of {target} delivered (seqs {:?}); marquee said:\n{}",
                delivered_in_order(&sub).len(),
                delivered_in_order(&sub)
                    .iter()
                    .map(|i| seq_of(i))
                    .collect::<Vec<_>>(),
                tail(&m.stderr.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        proxy.arm();
        wait_for(
            "a PUBLISH whose PUBACK we swallow",
            Duration::from_secs(60),
            || proxy.tripped.load(Ordering::SeqCst),
        );
        // SIGKILL and SIGTERM in turn.
        if kill % 2 == 0 {
            broker.kill();
        } else if let Some(p) = broker.proc.take() {
            signal(&p, "-TERM");
            let mut p = p;
            let _ = p.0.wait();
        }
        broker.restart();
        proxy.resume();
    }
    wait_for("all 300 results", Duration::from_secs(240), || {
        delivered_in_order(&sub).len() >= 300
    });
    let order = delivered_in_order(&sub);
    assert_eq!(order.len(), 300, "0 lost, none extra");
    let failed = std::fs::read_dir(m.inbox.join("failed")).unwrap().count();
    assert_eq!(failed, 0, "{}", m.stderr.lock().unwrap());
    // Health says connected again, and the outbox is empty.
    wait_for("an empty outbox", Duration::from_secs(30), || {
        let s: Value = ureq::get(&format!("{}/api/status", m.status))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        s["outbox"] == 0 && s["health"]["broker"]["ok"] == true
    });
}

#[test]
fn oversized_overviews_on_every_input_never_block_the_queue() {
    let _serial = serial();
    let dir = common::tmpdir("faults-oversized");
    let broker = Broker::start(&dir);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    let m = start_marquee(&dir, broker.port, "");
    let ps = posters(4);
    let poster = |i: usize| std::fs::read(&ps[i]).unwrap();
    // 1. A 1.1 MB sidecar overview.
    std::fs::write(m.inbox.join("big.txt"), "plot ".repeat(220_000)).unwrap();
    drop_file(&m.inbox, "big.jpg", &poster(0));
    wait_for("the sidecar poster", Duration::from_secs(60), || {
        !events(&sub).is_empty()
    });
    // 2. An upload with a 1 MB overview (multipart field).
    let boundary = "xXxBOUNDARYxXx";
    let mut body = Vec::new();
    write!(
        body,
        "--{boundary}\r\nContent-Disposition: form-data; name=\"overview\"\r\n\r\n"
    )
    .unwrap();
    body.extend(std::iter::repeat_n(b'o', 1_000_000));
    write!(body, "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"poster\"; filename=\"p.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").unwrap();
    body.extend(poster(1));
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    let resp = ureq::post(&format!("{}/api/classify", m.status))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .header(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .send(&body[..])
        .unwrap();
    assert_eq!(resp.status(), 200);
    // 3. 600 KB of `"` on cmd/overview (JSON escaping doubles it), then a poster.
    let quotes = dir.join("quotes.txt");
    std::fs::write(&quotes, "\"".repeat(600_000)).unwrap();
    let st = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "marquee/kiosk-test/cmd/overview", "-f"])
        .arg(&quotes)
        .status()
        .unwrap();
    assert!(st.success());
    std::thread::sleep(Duration::from_secs(1));
    drop_file(&m.inbox, "after-cmd.jpg", &poster(2));
    // And an ordinary poster behind all of them.
    drop_file(&m.inbox, "plain.jpg", &poster(3));
    wait_for("all four results", Duration::from_secs(60), || {
        events(&sub).len() >= 4
    });
    let evs = events(&sub);
    let names: Vec<&str> = evs.iter().map(|e| e["name"].as_str().unwrap()).collect();
    // An upload is named by the file name it came with.
    assert_eq!(names, ["big.jpg", "p.jpg", "after-cmd.jpg", "plain.jpg"]);
    for e in &evs[..3] {
        let o = e["overview"].as_str().expect("overview kept, clipped");
        assert_eq!(o.chars().count(), 4000, "clipped to the documented length");
    }
    assert!(evs[3]["overview"].is_null());
}

/// Sends raw bytes and returns what the server answers (status line first), or ""
/// when it closes without an answer.
fn raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_code(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hostile_http_requests_get_an_answer_and_the_appliance_stays_up() {
    let _serial = serial();
    let dir = common::tmpdir("faults-http");
    let broker = Broker::start(&dir);
    let mut m = start_marquee(&dir, broker.port, "");
    let addr = m.status.trim_start_matches("http://").to_string();
    let healthz = || {
        ureq::get(&format!("{}/healthz", m.status))
            .call()
            .map(|r| r.status().as_u16())
    };
    for url in ["/healthz", "/api/classify", "/nowhere"] {
        for len in ["100000000000", "18446744073709551615"] {
            // No token, a huge declared body, nothing sent: never an allocation of it.
            for _ in 0..70 {
                let r = raw(&addr, format!("POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n").as_bytes());
                assert!(status_code(&r) >= 400, "{url} {len}: {r}");
            }
        }
    }
    // With the token: too large, refused unread.
    let r = raw(&addr, format!("POST /api/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000000000\r\n\r\n").as_bytes());
    assert_eq!(status_code(&r), 413, "{r}");
    // Two conflicting Content-Length headers: 400 (identical repeats are folded into
    // one, which RFC 9112 §6.3 allows: the length is not ambiguous then).
    for (a, b) in [("5", "6"), ("6", "5"), ("5", "100000000000")] {
        let r = raw(&addr, format!("POST /api/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {a}\r\nContent-Length: {b}\r\n\r\nhello!").as_bytes());
        assert_eq!(status_code(&r), 400, "{a}/{b}: {r}");
    }
    // A 64 KB header line, and 200 headers.
    let r = raw(
        &addr,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 << 10)
        )
        .as_bytes(),
    );
    assert_eq!(status_code(&r), 431, "{}", &r[..r.len().min(200)]);
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(
        &addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    );
    assert_eq!(status_code(&r), 431, "{r}");
    // 70 live-page clients: the SSE budget is 32, and /healthz still answers.
    let mut clients = Vec::new();
    let mut refused = 0;
    for _ in 0..70 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).unwrap();
        if &buf == b"HTTP/1.1 503" {
            refused += 1;
        }
        clients.push(s);
    }
    assert_eq!(refused, 70 - 32);
    assert_eq!(healthz().unwrap(), 200);
    drop(clients);
    // A client that declares a body and stalls does not block anyone else.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(format!("POST /api/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\nabc").as_bytes())
        .unwrap();
    let t = Instant::now();
    assert_eq!(healthz().unwrap(), 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        m.proc.0.try_wait().unwrap().is_none(),
        "marquee is still running"
    );
}

#[test]
fn a_slow_writer_is_waited_for_not_failed() {
    let _serial = serial();
    let dir = common::tmpdir("faults-slow-writer");
    let broker = Broker::start(&dir);
    let m = start_marquee(&dir, broker.port, "");
    let bytes = std::fs::read(&posters(1)[0]).unwrap();
    // Written in place (no rename), in four pieces with 1.6 s pauses: longer than
    // settle_ms (300 ms in this config), so each pause looks like a finished file.
    let path = m.inbox.join("slow.jpg");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in bytes.chunks(bytes.len().div_ceil(4)) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1600));
    }
    drop(f);
    let done = m.inbox.join("done/slow.jpg");
    wait_for("slow.jpg in done/", Duration::from_secs(30), || {
        done.is_file()
    });
    assert_eq!(
        std::fs::read(&done).unwrap(),
        bytes,
        "the whole file, nothing written into a moved one"
    );
    assert!(!Path::new(&m.inbox.join("failed/slow.jpg")).exists());
}

#[test]
fn configs_and_flags_that_run_could_not_live_with_are_refused_at_the_door() {
    let dir = common::tmpdir("faults-config");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder, not a PEM").unwrap();
    let file = file.display().to_string();
    let long = "a/".repeat(50_000);
    let cases = [
        ("state_dir", "state_dir = \"\"\n".to_string()),
        ("state_dir", format!("state_dir = \"{file}\"\n")),
        ("state_dir", "state_dir = \"a\\u0000b\"\n".to_string()),
        (
            "sources.folder.path",
            format!("[sources.folder]\npath = \"{file}\"\n"),
        ),
        (
            "sources.folder.path",
            format!("[sources.folder]\npath = \"{long}\"\n"),
        ),
        (
            "sources.folder.settle_ms",
            "[sources.folder]\nsettle_ms = 600000\n".to_string(),
        ),
        ("mqtt.tls_ca", "[mqtt]\ntls_ca = \"\"\n".to_string()),
        ("mqtt.tls_ca", format!("[mqtt]\ntls_ca = \"{file}\"\n")),
        ("classify.model", "[classify]\nmodel = \"\"\n".to_string()),
        (
            "classify.model",
            format!("[classify]\nmodel = \"{file}\"\n"),
        ),
        (
            "classify.backend",
            "[classify]\nbackend = \"wgpu\"\n".to_string(),
        ),
        (
            "mqtt.prefix",
            "[mqtt]\nprefix = \"a\\u0000b\"\n".to_string(),
        ),
        ("mqtt.prefix", "[mqtt]\nprefix = \"$SYS/x\"\n".to_string()),
        (
            "mqtt.discovery_prefix",
            "[mqtt]\ndiscovery_prefix = \"a\\nb\"\n".to_string(),
        ),
        ("mqtt.host", "[mqtt]\nhost = \"a\\u0000b\"\n".to_string()),
        (
            "mqtt.username",
            "[mqtt]\nusername = \"a\\u0000b\"\n".to_string(),
        ),
        (
            "pipeline.queue",
            "[pipeline]\nqueue = 9223372036854775807\n".into(),
        ),
        (
            "mqtt.stats_interval_s",
            "[mqtt]\nstats_interval_s = 9223372036854775807\n".into(),
        ),
        ("mqtt.outbox_max", "[mqtt]\noutbox_max = 0\n".into()),
        (
            "sources.folder.path",
            "[sources.folder]\npath = \"\"\n".into(),
        ),
        (
            "caption.deadline_ms",
            "[caption]\ndeadline_ms = 9223372036854775807\n".into(),
        ),
    ];
    for (key, toml) in &cases {
        if *key == "classify.backend" && cfg!(feature = "wgpu") {
            continue;
        }
        let p = dir.join("c.toml");
        std::fs::write(&p, toml).unwrap();
        let o = Command::new(marquee_bin())
            .args(["config", "check", p.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{key}: {toml:.200}: {err}");
        assert!(
            err.contains(key) && err.trim().lines().count() == 1 && err.len() < 400,
            "{key}: {err}"
        );
    }
    for args in [
        &["train", "--manifest", "x.jsonl", "--epochs", "0"][..],
        &["train", "--manifest", "x.jsonl", "--teacher-members", "0"],
        &["bench", "--runs", "0"],
        &["serve-captions", "--model", "x", "--queue", "0"],
    ] {
        let o = Command::new(marquee_bin()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("outside") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// systemd's notify socket, played by the test: the times of the watchdog pings.
fn notify_socket(path: &Path) -> Arc<std::sync::Mutex<Vec<Instant>>> {
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    let pings = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = pings.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                p.lock().unwrap().push(Instant::now());
            }
        }
    });
    pings
}

#[test]
fn a_folder_of_junk_never_holds_up_a_poster_the_watchdog_or_a_stop() {
    let _serial = serial();
    let dir = common::tmpdir("faults-junk");
    let broker = Broker::start(&dir);
    let sock = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock);
    let pings = notify_socket(&sock);
    // A 2 s watchdog: Marquee pings every second while every worker beats.
    let mut m = start_marquee_env(
        &dir,
        broker.port,
        "",
        &[
            ("NOTIFY_SOCKET", sock.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    // 20 undecodable files ahead of a poster (files go in name order).
    for i in 0..20 {
        drop_file(
            &m.inbox,
            &format!("a-junk-{i:02}.jpg"),
            b"not a picture at all",
        );
    }
    drop_file(
        &m.inbox,
        "z-poster.jpg",
        &std::fs::read(&posters(1)[0]).unwrap(),
    );
    let t = Instant::now();
    wait_for("the poster in done/", Duration::from_secs(30), || {
        m.inbox.join("done/z-poster.jpg").is_file()
    });
    let took = t.elapsed();
    assert!(took < Duration::from_secs(8), "the poster took {took:?}");
    wait_for("20 junk files in failed/", Duration::from_secs(30), || {
        (0..20).all(|i| {
            m.inbox
                .join(format!("failed/a-junk-{i:02}.jpg.reason.txt"))
                .is_file()
        })
    });
    // 500 more junk files, then SIGTERM while they are being handled.
    for i in 0..500 {
        drop_file(&m.inbox, &format!("b-junk-{i:03}.jpg"), b"junk");
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Pinged every second all along, up to now.
    let mut pinged = pings.lock().unwrap().clone();
    assert!(pinged.len() >= 3, "{} watchdog pings", pinged.len());
    pinged.push(Instant::now());
    let gap = pinged.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(gap < Duration::from_secs(3), "watchdog gap {gap:?}");
    signal(&m.proc, "-TERM");
    let t = Instant::now();
    while m.proc.0.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGTERM not honoured in 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP proxy to the broker that decides each PUBACK's fate by the number of its
/// connection (0 for the first): passed on after `delay`, one at a time (`Some`: a
/// broker that acknowledges slowly), or swallowed (`None`). Every other packet, pings
/// and incoming publishes included, passes at once, beside the held acks.
fn puback_proxy(upstream: u16, fate: fn(usize) -> Option<Duration>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().flatten().enumerate() {
            let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c_in, mut b_out) = (client.try_clone().unwrap(), broker.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut b_out);
                let _ = b_out.shutdown(Shutdown::Both);
            });
            let c_out = Arc::new(std::sync::Mutex::new(client));
            let (acks, held) = std::sync::mpsc::channel::<Vec<u8>>();
            let (out, delay) = (c_out.clone(), fate(n));
            std::thread::spawn(move || {
                for pkt in held {
                    if let Some(d) = delay {
                        std::thread::sleep(d);
                        if out.lock().unwrap().write_all(&pkt).is_err() {
                            break;
                        }
                    }
                }
            });
            std::thread::spawn(move || {
                let mut b_in = broker;
                while let Ok(pkt) = read_packet(&mut b_in) {
                    if pkt[0] & 0xF0 == 0x40 {
                        let _ = acks.send(pkt);
                    } else if c_out.lock().unwrap().write_all(&pkt).is_err() {
                        break;
                    }
                }
                let _ = c_out.lock().unwrap().shutdown(Shutdown::Both);
            });
        }
    });
    port
}

/// Publishes `n` messages on `topic` from one `mosquitto_pub -l` (one per line).
fn flood(port: u16, topic: &str, lines: impl Iterator<Item = String>) {
    let mut p = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(p.wait().unwrap().success());
}

#[test]
fn a_flood_of_commands_never_repeats_a_result() {
    let _serial = serial();
    let dir = common::tmpdir("faults-storm");
    let broker = Broker::start(&dir);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    // A broker that acknowledges slowly, so that rumqttc's request queue fills.
    let proxy = puback_proxy(broker.port, |_| Some(Duration::from_millis(20)));
    let m = start_marquee(&dir, proxy, "");
    let ps = posters(20);
    let bport = broker.port;
    let flooder = std::thread::spawn(move || {
        flood(
            bport,
            "homeassistant/status",
            (0..5000).map(|_| "online".into()),
        );
        flood(
            bport,
            "marquee/kiosk-test/cmd/overview",
            (0..5000).map(|i| format!("plot number {i}")),
        );
    });
    for (i, p) in ps.iter().enumerate() {
        drop_file(
            &m.inbox,
            &format!("s{i:02}.jpg"),
            &std::fs::read(p).unwrap(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    flooder.join().unwrap();
    let unique = || {
        events(&sub)
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<HashSet<_>>()
            .len()
    };
    wait_for("20 results", Duration::from_secs(180), || unique() >= 20);
    std::thread::sleep(Duration::from_secs(2));
    let evs = events(&sub);
    for id in evs.iter().map(|e| e["id"].as_str().unwrap()) {
        let copies = evs.iter().filter(|e| e["id"] == id).count();
        assert!(copies <= 2, "{id} published {copies} times");
    }
    wait_for("an empty outbox", Duration::from_secs(60), || {
        let s: Value = ureq::get(&format!("{}/api/status", m.status))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        s["outbox"] == 0
    });
}

#[test]
fn a_retained_command_too_large_for_the_client_never_stops_delivery() {
    let _serial = serial();
    let dir = common::tmpdir("faults-retained");
    let broker = Broker::start(&dir);
    let big = dir.join("big.txt");
    std::fs::write(&big, "x".repeat(1_100_000)).unwrap();
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-r",
        ])
        .args(["-t", "marquee/kiosk-test/cmd/overview", "-f"])
        .arg(&big)
        .status()
        .unwrap();
    assert!(st.success());
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    let m = start_marquee(&dir, broker.port, "");
    for (i, p) in posters(3).iter().enumerate() {
        drop_file(&m.inbox, &format!("r{i}.jpg"), &std::fs::read(p).unwrap());
    }
    wait_for("3 results", Duration::from_secs(60), || {
        events(&sub).len() >= 3
    });
    assert_eq!(
        broker.retained("marquee/kiosk-test/cmd/overview"),
        None,
        "the retained command is cleared"
    );
    let s = m.stderr.lock().unwrap();
    assert!(
        s.matches("mqtt: connected").count() <= 2,
        "reconnected over and over:\n{}",
        tail(&s)
    );
}

/// `/healthz` through a fresh connection, with a short timeout: 200, or why not.
fn probe(addr: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    match status_code(&String::from_utf8_lossy(&out)) {
        0 => Err("closed without an answer".into()),
        c => Ok(c),
    }
}

#[test]
fn a_crowd_of_idle_and_slowloris_sockets_never_locks_out_a_client() {
    let _serial = serial();
    let dir = common::tmpdir("faults-idle");
    let broker = Broker::start(&dir);
    let m = start_marquee(&dir, broker.port, "");
    let addr = m.status.trim_start_matches("http://").to_string();
    // 300 connections that send nothing.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..10 {
        assert_eq!(probe(&addr), Ok(200), "probe {i} beside 300 idle sockets");
    }
    drop(idle);
    // 500 slowloris clients, each trickling its head one byte a second.
    let stop = Arc::new(AtomicBool::new(false));
    let mut trickle = Vec::new();
    for t in 0..10 {
        let (addr, stop) = (addr.clone(), stop.clone());
        trickle.push(std::thread::spawn(move || {
            let mut socks: Vec<TcpStream> = (0..50)
                .filter_map(|_| TcpStream::connect(&addr).ok())
                .collect();
            let head =
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 60 {
                for s in &mut socks {
                    let _ = s.write_all(&head[i % head.len()..][..1]);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(1000 + t));
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut failed = Vec::new();
    for i in 0..30 {
        if let Err(e) = probe(&addr) {
            failed.push(format!("{i}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    for t in trickle {
        t.join().unwrap();
    }
    assert!(
        failed.is_empty(),
        "probes refused beside 500 slowloris: {failed:?}"
    );
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

#[test]
fn twelve_huge_uploads_at_once_stay_under_the_memory_bound() {
    let _serial = serial();
    let dir = common::tmpdir("faults-uploads");
    let broker = Broker::start(&dir);
    // An 8192×8192 JPEG of about 1 MB: a smooth picture compresses well.
    let img = image::RgbImage::from_fn(8192, 8192, |x, y| {
        image::Rgb([(x / 32) as u8, (y / 32) as u8, ((x + y) / 64) as u8])
    });
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 30)
        .encode_image(&img)
        .unwrap();
    drop(img);
    let jpeg = Arc::new(jpeg.into_inner());
    assert!(jpeg.len() < 2_000_000, "{} bytes", jpeg.len());
    let m = start_marquee(&dir, broker.port, "");
    let url = format!("{}/api/classify", m.status);
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (url, jpeg) = (url.clone(), jpeg.clone());
            std::thread::spawn(move || {
                ureq::post(&url)
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .header("Authorization", &format!("Bearer {TOKEN}"))
                    .header("Content-Type", "image/jpeg")
                    .send(&jpeg[..])
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let codes: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(codes.iter().all(|c| [200, 503].contains(c)), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    let peak = peak_rss_mib(m.proc.0.id());
    println!("peak RSS {peak} MiB; answers {codes:?}");
    // The bound README.md documents: 2 upload slots, each a body and its decode.
    assert!(
        peak < 1500,
        "peak RSS {peak} MiB for 12 uploads at once ({codes:?})"
    );
    assert_eq!(probe(m.status.trim_start_matches("http://")), Ok(200));
}

/// A tmpfs of `size` mounted at `dir` (root only), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs (the test needs root)");
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_disk_is_reported_and_recovers_without_a_write() {
    if unsafe_is_not_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let _serial = serial();
    let dir = common::tmpdir("faults-full-disk");
    let broker = Broker::start(&dir);
    let _fs = Tmpfs::mount(&dir.join("state"), "4m");
    let m = start_marquee(&dir, broker.port, "");
    let addr = m.status.trim_start_matches("http://").to_string();
    let metric = |name: &str| -> String {
        let t = ureq::get(&format!("{}/metrics", m.status))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        t.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(probe(&addr), Ok(200));
    assert_eq!(
        metric("marquee_outbox_writable "),
        "marquee_outbox_writable 1"
    );
    // Fill the disk, then scan.
    let filler = dir.join("state/filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 << 20]);
    let ps = posters(2);
    drop_file(&m.inbox, "full.jpg", &std::fs::read(&ps[0]).unwrap());
    wait_for("the failed scan", Duration::from_secs(30), || {
        m.inbox.join("failed/full.jpg").is_file()
    });
    assert_eq!(probe(&addr), Ok(503), "/healthz says results are not kept");
    assert_eq!(
        metric("marquee_outbox_writable "),
        "marquee_outbox_writable 0"
    );
    assert!(!metric("marquee_outbox_write_failures_total 0").ends_with(" 0"));
    // Room again: green within a few seconds, with no poster written.
    std::fs::remove_file(&filler).unwrap();
    wait_for("/healthz 200 again", Duration::from_secs(10), || {
        probe(&addr) == Ok(200)
    });
    drop_file(&m.inbox, "room.jpg", &std::fs::read(&ps[1]).unwrap());
    wait_for("the next scan done", Duration::from_secs(30), || {
        m.inbox.join("done/room.jpg").is_file()
    });
}

fn unsafe_is_not_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0")
        .unwrap_or(true)
}

#[test]
fn a_broker_that_never_acknowledges_is_left_for_a_new_connection() {
    let _serial = serial();
    let dir = common::tmpdir("faults-no-ack");
    let broker = Broker::start(&dir);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    // The first connection's PUBACKs never arrive (pings do); later ones pass.
    let proxy = puback_proxy(broker.port, |n| (n > 0).then_some(Duration::ZERO));
    let m = start_marquee(&dir, proxy, "");
    drop_file(
        &m.inbox,
        "noack.jpg",
        &std::fs::read(&posters(1)[0]).unwrap(),
    );
    // Published on the first connection (the broker has it), never acknowledged:
    // after the ack deadline Marquee reconnects and the outbox empties.
    wait_for("the result", Duration::from_secs(30), || {
        !events(&sub).is_empty()
    });
    wait_for("an empty outbox", Duration::from_secs(60), || {
        let s: Value = ureq::get(&format!("{}/api/status", m.status))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        s["outbox"] == 0
    });
    let log = m.stderr.lock().unwrap();
    assert!(log.contains("no acknowledgement for"), "{}", tail(&log));
}

#[test]
fn the_pages_send_security_headers() {
    let _serial = serial();
    let dir = common::tmpdir("faults-headers");
    let broker = Broker::start(&dir);
    let m = start_marquee(&dir, broker.port, "");
    for page in ["/", "/desk"] {
        let r = ureq::get(&format!("{}{page}", m.status)).call().unwrap();
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            h("content-security-policy").contains("frame-ancestors 'none'"),
            "{page}"
        );
        assert!(
            h("content-security-policy").contains("script-src 'sha256-"),
            "{page}"
        );
        assert_eq!(h("x-frame-options"), "DENY", "{page}");
        assert_eq!(h("x-content-type-options"), "nosniff", "{page}");
    }
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn mqtt_over_tls_delivers_through_our_own_rustls_config() {
    let _serial = serial();
    let dir = common::tmpdir("faults-tls");
    // A CA, and a broker certificate for 127.0.0.1 signed by it.
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=marquee-test-ca",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ],
    );
    let (tls_port, plain_port) = (free_port(), free_port());
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\nuser root\n\
             listener {plain_port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _broker = Proc(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the TLS broker", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    let sub = Subscriber::start(plain_port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(500));
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let config = dir.join("marquee.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"kiosk-test\"\nstate_dir = \"{d}/state\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {tls_port}\ntls_ca = \"{d}/ca.pem\"\n\
             [sources.folder]\npath = \"{d}/inbox\"\npoll_ms = 100\nsettle_ms = 300\n\
             [status]\nenabled = false\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let _m = Proc(
        Command::new(marquee_bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    drop_file(&inbox, "tls.jpg", &std::fs::read(&posters(1)[0]).unwrap());
    wait_for("the result over TLS", Duration::from_secs(60), || {
        !events(&sub).is_empty()
    });
}

#[test]
fn a_busy_status_port_stops_the_start_with_one_line_naming_the_key() {
    let _serial = serial();
    let dir = common::tmpdir("faults-busy-port");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = dir.join("marquee.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"kiosk-test\"\nstate_dir = \"{}\"\n[mqtt]\nenabled = false\n\
             [status]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let o = Command::new(marquee_bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("status.listen") && err.trim().lines().count() == 1,
        "{err}"
    );
}
