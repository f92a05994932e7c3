//! `marquee run`: wires the sources, the classifier, MQTT and the status page
//! together, tells systemd it is ready, pets the watchdog, and shuts down cleanly
//! on SIGTERM: sources stop, queued posters are finished (their results are on disk
//! in the outbox), `offline` is published, and the process exits.

use crate::caption::stage::CaptionStage;
use crate::classify::Classifier;
use crate::config::Config;
use crate::health::Health;
use crate::model::cache::CacheDir;
use crate::model::dir::default_model_dir;
use crate::pipeline::{Queue, Sink, run_classifier};
use crate::publish::mqtt::{Mqtt, OutboxSink};
use crate::publish::outbox::Outbox;
use crate::source::{camera, folder::Folder};
use crate::status::server::{StatusServer, StatusSink, StatusState};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Time allowed to get `offline` acknowledged at shutdown.
const OFFLINE_TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(cfg: Config) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }

    let device = cfg.classify.backend.device()?;
    let cache = cfg
        .classify
        .cache
        .clone()
        .map(CacheDir::new)
        .unwrap_or_else(CacheDir::from_env);
    let model_dir = cfg.classify.model.clone().unwrap_or_else(default_model_dir);
    let classifier = Classifier::load(&model_dir, &cache, &device)?;
    let captioner = CaptionStage::start(&cfg.caption, &device)?;
    if let Some(c) = &captioner {
        tracing::info!("captioning: {}", c.label);
    }

    let health = Arc::new(Health::default());
    let (queue, rx) = Queue::new(cfg.pipeline.queue);
    let next_overview = queue.next_overview.clone();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();

    let mut mqtt = None;
    let mut outbox = None;
    if cfg.mqtt.enabled {
        let dir = cfg.state_dir.join("outbox");
        let ob = Outbox::open(&dir, cfg.mqtt.outbox_max)
            .with_context(|| format!("outbox {}", dir.display()))?;
        health.set_broker(false, "connecting");
        mqtt = Some(Mqtt::start(
            &cfg,
            ob.clone(),
            health.clone(),
            next_overview.clone(),
        )?);
        sinks.push(Box::new(OutboxSink { outbox: ob.clone() }));
        outbox = Some(ob);
    }
    let mut status = None;
    if cfg.status.enabled {
        let state = StatusState::new(&cfg, health.clone(), outbox.clone());
        let server = StatusServer::start(&cfg, state.clone(), queue.clone(), stop.clone())?;
        tracing::info!("status page on http://{}", server.addr);
        sinks.push(Box::new(StatusSink(state)));
        status = Some(server);
    }

    let mut threads = Vec::new();
    if let Some(fc) = &cfg.sources.folder {
        let f = Folder::new(fc)
            .with_context(|| format!("sources.folder.path {}", fc.path.display()))?;
        let (q, h, s) = (queue.clone(), health.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("folder".into())
                .spawn(move || f.run(q, h, s))?,
        );
    }
    if let Some(cc) = cfg.sources.camera.clone() {
        let (q, h, s) = (queue.clone(), health.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("camera".into())
                .spawn(move || camera::run(cc, q, h, s))?,
        );
    }
    drop(queue);

    let device_id = cfg.device_id.clone();
    let worker = {
        let stop = stop.clone();
        let health = health.clone();
        std::thread::Builder::new()
            .name("classify".into())
            .spawn(move || {
                let mut sinks = sinks;
                run_classifier(
                    &device_id,
                    &classifier,
                    captioner.as_ref(),
                    rx,
                    next_overview,
                    &mut sinks,
                    &health,
                    &stop,
                );
            })?
    };

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut petted = Instant::now();
    eprintln!(
        "marquee {} running as {}",
        env!("CARGO_PKG_VERSION"),
        cfg.device_id
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(every) = watchdog
            && petted.elapsed() >= every
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            petted = Instant::now();
        }
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down");
    for t in threads {
        let _ = t.join();
    }
    let _ = worker.join();
    if let Some(m) = mqtt {
        m.shutdown(OFFLINE_TIMEOUT);
    }
    if let Some(s) = status {
        s.stop();
    }
    Ok(())
}
