//! The health record every component reports into: broker, camera, folder and
//! captioner state, counters and recent latencies. The status page, `/metrics` and
//! the MQTT `stats` topic read it.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

/// One component's health as the page and `/api/status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// None: not configured.
    pub ok: Option<bool>,
    pub detail: String,
    pub since: String,
}

impl Component {
    fn off(detail: &str) -> Self {
        Self {
            ok: None,
            detail: detail.into(),
            since: now(),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct Counters {
    pub processed: u64,
    pub failed: u64,
    pub published: u64,
    pub rejected_uploads: u64,
}

#[derive(Debug)]
struct Inner {
    broker: Component,
    camera: Component,
    captioner: Component,
    folder: Component,
    counters: Counters,
    /// Recent end-to-end latencies (ms), for the page's plot and the metrics.
    latencies: VecDeque<f64>,
}

#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    started: Instant,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    pub broker: Component,
    pub camera: Component,
    pub captioner: Component,
    pub folder: Component,
    pub counters: Counters,
    pub uptime_s: u64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                broker: Component::off("not configured"),
                camera: Component::off("not configured"),
                captioner: Component::off("captioning is off"),
                folder: Component::off("not configured"),
                counters: Counters {
                    processed: 0,
                    failed: 0,
                    published: 0,
                    rejected_uploads: 0,
                },
                latencies: VecDeque::new(),
            }),
            started: Instant::now(),
        }
    }
}

fn set(c: &mut Component, ok: bool, detail: &str) {
    if c.ok != Some(ok) || c.detail != detail {
        *c = Component {
            ok: Some(ok),
            detail: detail.into(),
            since: now(),
        };
    }
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn set_broker(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.broker, ok, detail));
    }

    pub fn set_camera(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.camera, ok, detail));
    }

    pub fn set_folder(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.folder, ok, detail));
    }

    pub fn processed(&self, latency_ms: f64) {
        self.with(|i| {
            i.counters.processed += 1;
            i.latencies.push_back(latency_ms);
            if i.latencies.len() > 200 {
                i.latencies.pop_front();
            }
        });
    }

    pub fn failed(&self) {
        self.with(|i| i.counters.failed += 1);
    }

    pub fn published(&self) {
        self.with(|i| i.counters.published += 1);
    }

    pub fn rejected_upload(&self) {
        self.with(|i| i.counters.rejected_uploads += 1);
    }

    pub fn latencies(&self) -> Vec<f64> {
        self.with(|i| i.latencies.iter().copied().collect())
    }

    pub fn view(&self) -> HealthView {
        let uptime_s = self.started.elapsed().as_secs();
        self.with(|i| HealthView {
            broker: i.broker.clone(),
            camera: i.camera.clone(),
            captioner: i.captioner.clone(),
            folder: i.folder.clone(),
            counters: i.counters.clone(),
            uptime_s,
        })
    }

    /// The periodic MQTT `stats` payload.
    pub fn stats_json(&self, outbox: usize) -> String {
        let v = self.view();
        serde_json::json!({
            "uptime_s": v.uptime_s, "processed": v.counters.processed, "failed": v.counters.failed,
            "published": v.counters.published, "outbox": outbox,
            "camera_ok": v.camera.ok, "broker_ok": v.broker.ok,
        })
        .to_string()
    }
}
