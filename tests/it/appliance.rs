//! The appliance end to end, against a real Mosquitto broker on a loopback port
//! (with `mosquitto_sub` as the independent client) and Debian's headless Chromium.

use crate::common;

use common::appliance::*;
use common::browser::Browser;
use serde_json::Value;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn hot_folder_to_mqtt_survives_a_broker_restart() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-mqtt");
    let mut broker = Broker::start(&dir);
    let sub = Subscriber::device(broker.port);
    let m = start_marquee(&dir, broker.port, "");
    wait_for("online", Duration::from_secs(20), || {
        sub.on("marquee/kiosk-test/availability")
            .iter()
            .any(|s| s == "online")
    });

    let files = posters(20);
    for (i, p) in files.iter().take(10).enumerate() {
        drop_file(
            &m.inbox,
            &format!("p{i:02}.jpg"),
            &std::fs::read(p).unwrap(),
        );
    }
    wait_for("the first 10 events", Duration::from_secs(120), || {
        events(&sub).len() >= 10
    });

    // The broker dies mid-run; results keep coming and wait in the outbox.
    broker.kill();
    for (i, p) in files.iter().enumerate().skip(10) {
        drop_file(
            &m.inbox,
            &format!("p{i:02}.jpg"),
            &std::fs::read(p).unwrap(),
        );
    }
    wait_for("all 20 posters processed", Duration::from_secs(120), || {
        std::fs::read_dir(m.inbox.join("done"))
            .map(|d| d.count())
            .unwrap_or(0)
            >= 20
    });
    std::thread::sleep(Duration::from_secs(1));
    broker.restart();
    let distinct = || {
        let mut names: Vec<String> = events(&sub)
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        names.dedup();
        names.len()
    };
    let end = Instant::now() + Duration::from_secs(120);
    while distinct() < 20 {
        assert!(
            Instant::now() < end,
            "only {} of 20 events arrived; subscriber saw:\n{}\nmarquee said:\n{}",
            distinct(),
            sub.lines
                .lock()
                .unwrap()
                .iter()
                .map(|l| &l[..l.len().min(120)])
                .collect::<Vec<_>>()
                .join("\n"),
            m.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // In order, with duplicates only as QoS 1 allows (a repeat of the latest).
    let evs = events(&sub);
    let mut seqs: Vec<u64> = evs
        .iter()
        .map(|e| seq_of(e["id"].as_str().unwrap()))
        .collect();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), 20, "20 distinct results ({n} messages)");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    for e in &evs {
        assert_eq!(e["genres"].as_array().unwrap().len(), 18);
        assert_eq!(e["source"], "folder");
        assert!(!e["predicted"].as_array().unwrap().is_empty());
    }
    assert!(failed_is_empty(&m.inbox));

    // Retained state and attributes, and discovery.
    let state = broker
        .retained("marquee/kiosk-test/genres/state")
        .expect("retained state");
    assert!(!state.is_empty() && state.len() <= 255);
    let attrs: Value = serde_json::from_str(
        &broker
            .retained("marquee/kiosk-test/genres/attributes")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(attrs["id"], evs.last().unwrap()["id"]);
    let disc: Value = serde_json::from_str(
        sub.on("homeassistant/device/kiosk-test/config")
            .last()
            .expect("discovery"),
    )
    .unwrap();
    assert_eq!(
        disc["cmps"]["kiosk-test_genres"]["stat_t"],
        "marquee/kiosk-test/genres/state"
    );
    assert_eq!(disc["avty_t"], "marquee/kiosk-test/availability");

    // Killing marquee leaves `offline` retained (the last will).
    signal(&m.proc, "-KILL");
    wait_for("offline retained", Duration::from_secs(10), || {
        broker
            .retained("marquee/kiosk-test/availability")
            .as_deref()
            == Some("offline")
    });
    assert!(!m.stderr.lock().unwrap().contains("panicked"));
}

/// Home Assistant's side of the device, against a real broker with `mosquitto_sub`
/// and `mosquitto_pub` as the independent clients: every discovery component with
/// its platform, unique id and own QoS; the image, event, caption and diagnostic
/// payloads; and the overview text entity's retained state, set by a command and
/// cleared once a scan has used it.
#[test]
fn home_assistant_sees_image_event_caption_diagnostics_and_the_overview_state() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-ha");
    let broker = Broker::start(&dir);
    let sub = Subscriber::device(broker.port);
    let m = start_marquee(&dir, broker.port, "");
    wait_for("discovery", Duration::from_secs(20), || {
        !sub.on("homeassistant/device/kiosk-test/config").is_empty()
    });
    let disc: Value = serde_json::from_str(
        sub.on("homeassistant/device/kiosk-test/config")
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(disc["dev"]["ids"].is_array() && disc["o"]["name"].is_string());
    let cmps = disc["cmps"].as_object().unwrap();
    for name in [
        "genres",
        "last_scan",
        "caption",
        "poster",
        "scan",
        "overview",
        "latency",
        "queue",
        "outbox",
    ] {
        let c = &cmps[&format!("kiosk-test_{name}")];
        assert!(c["p"].is_string(), "{name}: {c}");
        assert_eq!(c["uniq_id"], format!("marquee_kiosk-test_{name}"));
        assert_eq!(c["qos"], 1, "{name}: its own qos");
    }
    assert_eq!(cmps["kiosk-test_poster"]["p"], "image");
    assert_eq!(cmps["kiosk-test_poster"]["image_encoding"], "b64");
    assert_eq!(cmps["kiosk-test_scan"]["p"], "event");
    assert_eq!(cmps["kiosk-test_latency"]["ent_cat"], "diagnostic");

    // An overview sent from Home Assistant's text entity shows as its state...
    let overview = "An astronaut is stranded on Mars and must survive until rescue.";
    let pubbed = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "marquee/kiosk-test/cmd/overview", "-m", overview])
        .status()
        .unwrap();
    assert!(pubbed.success());
    wait_for("the overview state", Duration::from_secs(10), || {
        broker
            .retained("marquee/kiosk-test/overview/state")
            .as_deref()
            == Some(overview)
    });

    // ...until a scan uses it: then the event, the picture, and a cleared state.
    drop_file(&m.inbox, "p0.jpg", &std::fs::read(&posters(1)[0]).unwrap());
    wait_for("the scan event", Duration::from_secs(60), || {
        !sub.on("marquee/kiosk-test/scan").is_empty()
    });
    let ev: Value = serde_json::from_str(&sub.on("marquee/kiosk-test/scan")[0]).unwrap();
    assert_eq!(ev["event_type"], "scanned");
    assert_eq!(ev["source"], "folder");
    let predicted = ev["predicted"].as_array().unwrap();
    let top_score = ev["top_score"].as_f64().unwrap();
    assert!(
        !predicted.is_empty() && top_score > 0.0 && top_score <= 1.0,
        "{ev}"
    );
    let attrs: Value = serde_json::from_str(
        &broker
            .retained("marquee/kiosk-test/genres/attributes")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(attrs["overview"], overview);
    assert_eq!(attrs["id"], ev["id"]);
    assert!(
        attrs.get("thumbnail_jpeg_b64").is_none(),
        "no picture in attributes"
    );
    assert!(attrs["timings_ms"]["pipeline"].as_f64().unwrap() > 0.0);
    wait_for(
        "the overview state cleared",
        Duration::from_secs(10),
        || {
            broker
                .retained("marquee/kiosk-test/overview/state")
                .is_none()
        },
    );

    use base64::Engine;
    let b64 = broker
        .retained("marquee/kiosk-test/poster")
        .expect("retained poster");
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap();
    assert!(
        jpeg.len() < 64 * 1024,
        "a small picture: {} bytes",
        jpeg.len()
    );
    let img = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    assert_eq!(img.width(), 180);

    // The diagnostics' source: stats with the queue depth and the outbox size.
    wait_for("stats", Duration::from_secs(10), || {
        !sub.on("marquee/kiosk-test/stats").is_empty()
    });
    let stats: Value =
        serde_json::from_str(sub.on("marquee/kiosk-test/stats").last().unwrap()).unwrap();
    assert!(
        stats["queue"].is_u64() && stats["outbox"].is_u64(),
        "{stats}"
    );
    assert!(!m.stderr.lock().unwrap().contains("panicked"));
}

fn failed_is_empty(inbox: &Path) -> bool {
    std::fs::read_dir(inbox.join("failed"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

fn post(url: &str, token: &str, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "image/jpeg")
        .send(body)
        .unwrap();
    let code = resp.status().as_u16();
    (code, resp.body_mut().read_to_string().unwrap_or_default())
}

#[test]
fn bad_inputs_end_in_failed_and_the_daemon_keeps_running() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-bad");
    let broker = Broker::start(&dir);
    // A camera that is not there: reported and retried, never fatal.
    let m = start_marquee(
        &dir,
        broker.port,
        "[sources.camera]\ndevice = \"/dev/video-missing\"\n",
    );
    let poster = std::fs::read(&posters(1)[0]).unwrap();
    let mut corrupt = poster[..poster.len() / 2].to_vec();
    corrupt.extend(std::iter::repeat_n(0u8, 500));
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("corrupt.jpg", corrupt),
        ("empty.jpg", vec![]),
        ("bomb.png", common::png_header(20000, 20000)),
        ("notes.jpg", b"just some text, not a JPEG\n".to_vec()),
    ];
    for (name, bytes) in &bad {
        drop_file(&m.inbox, name, bytes);
    }
    drop_file(&m.inbox, "good.jpg", &poster);
    std::fs::write(
        m.inbox.join("good.txt"),
        "Two brothers fight a war in the desert.",
    )
    .unwrap();
    wait_for("every file handled", Duration::from_secs(60), || {
        let n = |d: &str| {
            std::fs::read_dir(m.inbox.join(d))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        n("failed") >= 2 * bad.len() && n("done") >= 2
    });
    for (name, _) in &bad {
        let reason =
            std::fs::read_to_string(m.inbox.join("failed").join(format!("{name}.reason.txt")))
                .unwrap_or_else(|_| panic!("{name} has a reason"));
        assert_eq!(reason.trim().lines().count(), 1, "{name}: {reason}");
    }
    let bomb = std::fs::read_to_string(m.inbox.join("failed/bomb.png.reason.txt")).unwrap();
    assert!(bomb.contains("20000x20000"), "{bomb}");
    assert!(
        m.inbox.join("done/good.txt").is_file(),
        "the sidecar travels with its poster"
    );

    // Uploads: wrong token, too large, good.
    let url = format!("{}/api/classify", m.status);
    assert_eq!(post(&url, "wrong", &poster).0, 401);
    assert_eq!(post(&url, TOKEN, &vec![0u8; 2_100_000]).0, 413);
    assert_eq!(post(&url, TOKEN, b"not an image").0, 422);
    let (code, body) = post(&url, TOKEN, &poster);
    assert_eq!(code, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["source"], "upload");
    assert_eq!(r["genres"].as_array().unwrap().len(), 18);

    let status: Value = serde_json::from_str(
        &ureq::get(&format!("{}/api/status", m.status))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["health"]["camera"]["ok"], false, "{status}");
    assert!(
        status["health"]["camera"]["detail"]
            .as_str()
            .unwrap()
            .contains("/dev/video-missing")
    );

    // Still alive, metrics say so, and no panic anywhere.
    assert!(ureq::get(&format!("{}/healthz", m.status)).call().is_ok());
    let metrics = ureq::get(&format!("{}/metrics", m.status))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(metrics.contains("marquee_processed_total 2"), "{metrics}");
    assert!(
        metrics.contains("marquee_uploads_rejected_total 3"),
        "{metrics}"
    );

    // SIGTERM: a clean exit that leaves `offline` retained.
    let mut m = m;
    signal(&m.proc, "-TERM");
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = m.proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "marquee did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        broker
            .retained("marquee/kiosk-test/availability")
            .as_deref(),
        Some("offline")
    );
    assert!(
        !m.stderr.lock().unwrap().contains("panicked"),
        "{}",
        m.stderr.lock().unwrap()
    );
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-config");
    let p = dir.join("bad.toml");
    std::fs::write(
        &p,
        "device_id = \"kiosk\"\n[status]\nlisten = \"everywhere\"\n",
    )
    .unwrap();
    for args in [
        vec!["config", "check", p.to_str().unwrap()],
        vec!["run", "--config", p.to_str().unwrap()],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_marquee"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("status.listen") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let ok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/marquee.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_marquee"))
        .args(["config", "check", ok.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the shipped example config is valid: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn status_page_updates_live_in_a_real_browser() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-page");
    let broker = Broker::start(&dir);
    let m = start_marquee(&dir, broker.port, "");
    let poster = posters(3);
    drop_file(&m.inbox, "first.jpg", &std::fs::read(&poster[1]).unwrap());
    let history = format!("{}/api/history", m.status);
    let count = |url: &str| -> usize {
        ureq::get(url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|s| serde_json::from_str::<Vec<Value>>(&s).ok())
            .map_or(0, |v| v.len())
    };
    wait_for("the first result", Duration::from_secs(60), || {
        count(&history) >= 1
    });

    let browser = Browser::start(&dir);
    let mut cdp = browser.page();

    cdp.navigate(&format!("{}/", m.status));
    wait_for(
        "the latest result rendered",
        Duration::from_secs(20),
        || cdp.eval("document.querySelectorAll('#bars .bar').length") == 18,
    );
    let first_id = cdp.eval("document.getElementById('predicted').dataset.id");
    assert!(
        first_id
            .as_str()
            .is_some_and(|s| s.starts_with("kiosk-test-"))
    );
    // A marker that a reload would wipe.
    cdp.eval("window.__marker = 'no-reload'");

    drop_file(&m.inbox, "second.jpg", &std::fs::read(&poster[2]).unwrap());
    wait_for(
        "the new result on the page",
        Duration::from_secs(60),
        || {
            let id = cdp.eval("document.getElementById('predicted').dataset.id");
            id != first_id && id.is_string()
        },
    );
    assert_eq!(
        cdp.eval("window.__marker"),
        "no-reload",
        "updated without a reload"
    );
    assert_eq!(
        cdp.eval("document.getElementById('name').textContent"),
        "folder: second.jpg"
    );
    assert_eq!(
        cdp.eval("document.querySelectorAll('#history tr').length"),
        2
    );
    wait_for("health badges", Duration::from_secs(10), || {
        cdp.eval("document.getElementById('h-broker').className") == "badge ok"
    });

    let png = cdp.screenshot("status-page.png");
    assert!(png.len() > 10_000, "a real screenshot");
}

/// The poster desk in a real browser: choose a poster file, type an overview and
/// the token, click Classify, read the genres from the page; a wrong token says so;
/// an overview carrying HTML shows as text and runs nothing.
#[test]
fn the_poster_desk_classifies_in_a_real_browser() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-desk");
    let broker = Broker::start(&dir);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    let m = start_marquee(&dir, broker.port, "");
    let poster = posters(1).remove(0);
    let browser = Browser::start(&dir);
    let mut cdp = browser.page();
    cdp.navigate(&format!("{}/desk", m.status));
    wait_for("the desk", Duration::from_secs(20), || {
        cdp.eval("document.readyState") == "complete"
            && cdp.eval("!!document.getElementById('classify')") == true
    });
    let text = |cdp: &mut common::browser::Cdp, id: &str| {
        cdp.eval(&format!("document.getElementById('{id}').textContent"))
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    // A wrong token: a clear message, nothing classified.
    cdp.set_files("#file", &[&poster]);
    wait_for("the preview", Duration::from_secs(10), || {
        cdp.eval("document.getElementById('classify').disabled") == false
    });
    cdp.type_into("#token", "not-the-token");
    cdp.eval("document.getElementById('classify').click()");
    cdp.wait_text("error", "access token is wrong", Duration::from_secs(20));
    assert_eq!(cdp.eval("document.getElementById('result').hidden"), true);

    // The right token and an overview with HTML in it.
    let overview = "Two friends rob a bank. <img src=x onerror=\"window.__pwned=1\"><b>bold</b>";
    cdp.eval("document.getElementById('token').value = ''");
    cdp.type_into("#token", TOKEN);
    cdp.type_into("#overview", overview);
    cdp.eval("document.getElementById('classify').click()");
    wait_for("the result on the desk", Duration::from_secs(60), || {
        cdp.eval("document.querySelectorAll('#bars .bar').length") == 18
    });
    let predicted = text(&mut cdp, "predicted");
    assert!(!predicted.is_empty() && predicted != "none", "{predicted}");
    assert!(text(&mut cdp, "timings").contains("total"));
    assert_eq!(text(&mut cdp, "error"), "");
    // Shown as text: the tags are characters on the page, not elements, and ran nothing.
    assert_eq!(text(&mut cdp, "echo"), overview);
    assert_eq!(cdp.eval("document.querySelectorAll('#echo *').length"), 0);
    assert_eq!(cdp.eval("typeof window.__pwned"), "undefined");

    // Through the normal pipeline: published, marked as an upload, with the file name.
    wait_for("the upload's MQTT event", Duration::from_secs(20), || {
        !sub.on("marquee/kiosk-test/events").is_empty()
    });
    let ev: Value = serde_json::from_str(&sub.on("marquee/kiosk-test/events")[0]).unwrap();
    assert_eq!(ev["source"], "upload");
    assert_eq!(ev["overview"], overview);
    assert_eq!(
        ev["name"].as_str().unwrap(),
        poster.file_name().unwrap().to_str().unwrap()
    );
    let shown: Vec<String> = predicted.split(", ").map(String::from).collect();
    let published: Vec<String> = serde_json::from_value(ev["predicted"].clone()).unwrap();
    assert_eq!(shown, published);

    cdp.eval("document.activeElement.blur(); window.scrollTo(0, 0)");
    let png = cdp.screenshot("desk.png");
    assert!(png.len() > 10_000, "a real screenshot");
    assert!(!m.stderr.lock().unwrap().contains("panicked"));
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let _serial = serial();
    let dir = common::tmpdir("systemd");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for unit in ["marquee.service", "marquee-captions.service"] {
        // verify checks that ExecStart exists: point it at the binary under test.
        let text = std::fs::read_to_string(root.join(unit))
            .unwrap()
            .replace("/usr/bin/marquee", env!("CARGO_BIN_EXE_marquee"));
        let path = dir.join(unit);
        std::fs::write(&path, text).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze installed (apt-get install systemd)");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.trim().is_empty(), "{unit}: {err}");
    }
}

/// A camera frame: `poster` (if any) pasted on a grey stand at `dx`, with a little
/// sensor noise that differs from frame to frame.
fn camera_frame(poster: Option<&image::RgbImage>, dx: u32, seed: u32) -> image::RgbImage {
    let mut f = image::RgbImage::from_fn(320, 240, |x, y| {
        let n = ((x * 31 + y * 17 + seed * 7) % 5) as u8;
        image::Rgb([90 + n, 92 + n, 95 + n])
    });
    if let Some(p) = poster {
        let p = image::imageops::resize(p, 120, 180, image::imageops::FilterType::Triangle);
        image::imageops::overlay(&mut f, &p, 100 + dx as i64, 30);
    }
    f
}

#[test]
fn replayed_camera_frames_give_one_result_per_steady_poster() {
    let _serial = serial();
    let dir = common::tmpdir("appliance-camera");
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let files = posters(3);
    let a = marquee::preprocess::image::decode(&std::fs::read(&files[0]).unwrap()).unwrap();
    let b = marquee::preprocess::image::decode(&std::fs::read(&files[2]).unwrap()).unwrap();
    // Empty stand, poster A held still, A moving away, B held still for long.
    let mut seq: Vec<image::RgbImage> = Vec::new();
    seq.extend((0..4).map(|i| camera_frame(None, 0, i)));
    seq.extend((0..6).map(|i| camera_frame(Some(&a), 0, i)));
    seq.extend((0..3).map(|i| camera_frame(Some(&a), 30 + 40 * i, i)));
    seq.extend((0..12).map(|i| camera_frame(Some(&b), 0, i)));
    // A camera keeps one pixel format: MJPEG for A's part, raw YUYV for B's, and
    // one damaged frame that must simply be skipped.
    for (i, f) in seq.iter().enumerate() {
        if i < 13 {
            f.save(frames.join(format!("{i:03}.jpg"))).unwrap();
        } else {
            std::fs::write(frames.join(format!("{i:03}.yuyv")), to_yuyv(f)).unwrap();
        }
    }
    std::fs::write(frames.join("012a.jpg"), b"\xff\xd8\xff garbage").unwrap();
    // An entry that cannot be read at all (a folder named like a frame) is skipped
    // too: the replay goes on past it.
    std::fs::create_dir_all(frames.join("005a.jpg")).unwrap();
    let broker = Broker::start(&dir);
    let sub = Subscriber::start(broker.port, &["marquee/kiosk-test/events"]);
    std::thread::sleep(Duration::from_millis(300));
    let extra = format!(
        "[sources.camera]\ndevice = \"replay:{}\"\nwidth = 320\nheight = 240\nfps = 20\nformat = \"mjpeg\"\nsteady_frames = 3\n",
        frames.display()
    );
    let m = start_marquee(&dir, broker.port, &extra);
    let status = format!("{}/api/status", m.status);
    wait_for("the replay to finish", Duration::from_secs(60), || {
        ureq::get(&status)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .is_some_and(|s| s.contains("replay finished"))
    });
    wait_for("two events", Duration::from_secs(60), || {
        events(&sub).len() >= 2
    });
    std::thread::sleep(Duration::from_secs(2));
    let evs = events(&sub);
    assert_eq!(evs.len(), 2, "one result per steady poster: {evs:?}");
    assert!(evs.iter().all(|e| e["source"] == "camera"));
}

/// RGB to YUYV 4:2:2 (BT.601 limited range), as a webcam delivers it.
fn to_yuyv(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity((img.width() * img.height() * 2) as usize);
    let yuv = |p: &image::Rgb<u8>| {
        let (r, g, b) = (p[0] as f32, p[1] as f32, p[2] as f32);
        let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
        let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
        let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
        (y, u, v)
    };
    for row in img.rows() {
        let px: Vec<_> = row.collect();
        for pair in px.chunks(2) {
            let (y0, u0, v0) = yuv(pair[0]);
            let (y1, u1, v1) = yuv(pair[1]);
            out.extend([
                y0 as u8,
                ((u0 + u1) / 2.0) as u8,
                y1 as u8,
                ((v0 + v1) / 2.0) as u8,
            ]);
        }
    }
    out
}
