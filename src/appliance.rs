//! `marquee run`: wires the sources, the classifier, MQTT and the status page
//! together, tells systemd it is ready, and shuts down cleanly on SIGTERM: sources
//! stop, queued posters are finished (their results are on disk in the outbox),
//! `offline` is published, and the process exits.
//!
//! Supervision: every worker (classifier, MQTT session, sources) beats a heartbeat.
//! The systemd watchdog is fed only while all of them beat, and a worker that ends
//! on its own (a panic included) makes `run` return an error, so the process exits
//! non-zero and systemd restarts it.

use crate::caption::stage::CaptionStage;
use crate::config::Config;
use crate::health::Health;
use crate::infer::Classifier;
use crate::model::cache::CacheDir;
use crate::model::dir::default_model_dir;
use crate::pipeline::{Backlog, Job, OverviewCommand, Queue, Sink, Worker};
use crate::publish::mqtt::{Mqtt, OutboxSink};
use crate::publish::outbox::Outbox;
use crate::source::{camera, folder::Folder};
use crate::status::server::{StatusServer, StatusSink, StatusState};
use crate::util::service::{Service, Tick};
use anyhow::{Context, Result};
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Duration;

/// A worker silent for this long is stalled: the watchdog is no longer fed.
const STALL: Duration = Duration::from_secs(30);

/// Runs the appliance until SIGTERM, or until a worker stops on its own (an error).
pub fn run(cfg: Config) -> Result<()> {
    let service = Service::new()?;
    let stop = service.stop_flag();
    let health = Arc::new(Health::default());
    let device = cfg.classify.backend.device()?;
    let cache = cfg
        .classify
        .cache
        .clone()
        .map(CacheDir::new)
        .unwrap_or_else(CacheDir::from_env);
    let model_dir = cfg.classify.model.clone().unwrap_or_else(default_model_dir);
    let classifier = Classifier::load(&model_dir, &cache, &device)?;
    let captioner = CaptionStage::start(&cfg.caption, &device)?.map(Arc::new);
    if let Some(c) = &captioner {
        tracing::info!("captioning: {}", c.label);
        health.set_captioner(true, &format!("ready: {}", c.label));
    }
    let (queue, jobs) = Queue::new(cfg.pipeline.queue);
    let overview = OverviewCommand::default();
    let sinks = Sinks::open(&cfg, &health, &queue, &jobs, &overview, &stop)?;
    let mut threads = start_sources(&cfg, &queue, &health, &stop)?;
    drop(queue);
    let worker = Worker {
        device_id: cfg.device_id.to_string(),
        classifier,
        captioner: captioner.clone(),
        jobs,
        overview,
        sinks: sinks.sinks,
        health: health.clone(),
        heartbeat: health.heartbeat("classifier"),
        stop: stop.clone(),
    };
    threads.push((
        "classifier",
        std::thread::Builder::new()
            .name("classify".into())
            .spawn(move || worker.run())?,
    ));
    tracing::info!(
        "marquee {} running as {}",
        env!("CARGO_PKG_VERSION"),
        cfg.device_id
    );
    let outcome =
        service.run(|| supervise(&threads, sinks.mqtt.as_ref(), captioner.as_deref(), &health));
    tracing::info!("shutting down");
    for (_, t) in threads {
        let _ = t.join();
    }
    if let Some(m) = sinks.mqtt {
        m.shutdown();
    }
    if let Some(s) = sinks.status {
        s.stop();
    }
    outcome
}

/// Where results go, and the services behind them.
struct Sinks {
    /// The outbox and the status page, in that order.
    sinks: Vec<Box<dyn Sink>>,
    mqtt: Option<Mqtt>,
    status: Option<StatusServer>,
}

impl Sinks {
    /// Opens the outbox and its MQTT session, and the status page, as configured.
    fn open(
        cfg: &Config,
        health: &Arc<Health>,
        queue: &Queue,
        jobs: &Receiver<Job>,
        overview: &OverviewCommand,
        stop: &Arc<AtomicBool>,
    ) -> Result<Self> {
        let mut out = Sinks {
            sinks: Vec::new(),
            mqtt: None,
            status: None,
        };
        let mut outbox = None;
        if cfg.mqtt.enabled {
            let dir = cfg.state_dir.join("outbox");
            let ob = Outbox::open(
                &dir,
                &cfg.state_dir.join("dead-letter"),
                cfg.mqtt.outbox_max,
            )
            .with_context(|| format!("outbox {}", dir.display()))?;
            health.set_broker(false, "connecting");
            health.set_outbox(true, "ok");
            out.mqtt = Some(Mqtt::start(
                &cfg.mqtt,
                &cfg.device_id,
                ob.clone(),
                health.clone(),
                (Backlog::new(jobs), overview.clone()),
                health.heartbeat("mqtt"),
            )?);
            out.sinks.push(Box::new(OutboxSink {
                outbox: ob.clone(),
                health: health.clone(),
            }));
            outbox = Some(ob);
        }
        if cfg.status.enabled {
            let state = StatusState::new(
                &cfg.device_id,
                &cfg.status,
                cfg.pipeline.queue,
                health.clone(),
                outbox,
            );
            let server =
                StatusServer::start(&cfg.status, state.clone(), queue.clone(), stop.clone())?;
            tracing::info!("status page on http://{}", server.addr);
            out.sinks.push(Box::new(StatusSink(state)));
            out.status = Some(server);
        }
        Ok(out)
    }
}

/// The configured sources, each on a thread of its own.
fn start_sources(
    cfg: &Config,
    queue: &Queue,
    health: &Arc<Health>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<(&'static str, JoinHandle<()>)>> {
    let mut threads = Vec::new();
    if let Some(fc) = &cfg.sources.folder {
        let f = Folder::new(fc)
            .with_context(|| format!("sources.folder.path {}", fc.path.display()))?;
        let (q, h, s) = (queue.clone(), health.clone(), stop.clone());
        let hb = health.heartbeat("folder");
        threads.push((
            "folder",
            std::thread::Builder::new()
                .name("folder".into())
                .spawn(move || f.run(q, h, hb, s))?,
        ));
    }
    if let Some(cc) = cfg.sources.camera.clone() {
        let (q, h, s) = (queue.clone(), health.clone(), stop.clone());
        let hb = health.heartbeat("camera");
        threads.push((
            "camera",
            std::thread::Builder::new()
                .name("camera".into())
                .spawn(move || camera::run(cc, q, h, hb, s))?,
        ));
    }
    Ok(threads)
}

/// One watchdog tick: a worker that ended is a failure, a stalled one is unhealthy.
fn supervise(
    threads: &[(&str, JoinHandle<()>)],
    mqtt: Option<&Mqtt>,
    captioner: Option<&CaptionStage>,
    health: &Health,
) -> Tick {
    let dead = threads
        .iter()
        .find(|(_, t)| t.is_finished())
        .map(|(name, _)| *name)
        .or_else(|| mqtt.filter(|m| m.is_finished()).map(|_| "mqtt"))
        .or_else(|| captioner.filter(|c| c.is_finished()).map(|_| "captioner"));
    if let Some(name) = dead {
        tracing::error!(
            "the {name} worker stopped unexpectedly; exiting so that systemd restarts marquee"
        );
        return Tick::Fail(anyhow::anyhow!("the {name} worker stopped unexpectedly"));
    }
    let stalled = health.stalled(STALL);
    if stalled.is_empty() {
        Tick::Healthy
    } else {
        tracing::warn!("stalled workers: {stalled:?}; not feeding the watchdog");
        Tick::Unhealthy
    }
}
