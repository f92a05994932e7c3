//! The health record every component reports into: broker, camera, folder and
//! captioner state, counters and recent latencies. The status page, `/metrics` and
//! the MQTT `stats` topic read it.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One component's health as the page and `/api/status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    /// None: not configured.
    pub ok: Option<bool>,
    /// What the component last said of itself.
    pub detail: String,
    /// When that was (RFC 3339).
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

/// Counts since start.
#[derive(Debug, Clone, Serialize)]
pub struct Counters {
    /// Posters classified and delivered to every sink.
    pub processed: u64,
    /// Posters that failed.
    pub failed: u64,
    /// Results the broker acknowledged.
    pub published: u64,
    /// Uploads refused (auth, size, bad image, queue full).
    pub rejected_uploads: u64,
    /// Results moved to the dead-letter folder (they could never be published).
    pub dead_letters: u64,
    /// Results that could not be written to the outbox (a full or broken disk).
    pub outbox_write_failures: u64,
}

#[derive(Debug)]
struct Inner {
    broker: Component,
    camera: Component,
    captioner: Component,
    folder: Component,
    outbox: Component,
    counters: Counters,
    /// Recent end-to-end latencies (ms), for the page's plot and the metrics.
    latencies: VecDeque<f64>,
    /// Why the last outbox write failed, until a write or a probe succeeds again.
    outbox_unwritable: Option<String>,
}

/// The appliance's state: each component's last word, counters, heartbeats and latencies, shared by every worker.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    started: Instant,
    beats: Mutex<Vec<Heartbeat>>,
    /// Every end-to-end latency since start (ms), for `/metrics`: its sum and count
    /// only grow, unlike the recent window the page plots.
    latency: Histogram,
}

/// Latency buckets: 10 ms to about 20 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10.0, 2.0, 12))
}

/// A worker's proof of life: it beats at least every few seconds while it runs.
/// The watchdog is fed only while every registered worker beats.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    name: &'static str,
    base: Instant,
    /// Milliseconds after `base` of the last beat.
    last: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Sleeps up to `total`, beating meanwhile, and wakes early when `stop` is set:
    /// a worker waiting (a back-off, a poll interval) is alive and stoppable.
    pub fn sleep_unless(&self, stop: &std::sync::atomic::AtomicBool, total: Duration) {
        let end = Instant::now() + total;
        while !stop.load(Ordering::SeqCst) {
            self.beat();
            let Some(left) = end.checked_duration_since(Instant::now()) else {
                return;
            };
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// Says the worker is alive.
    pub fn beat(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// A snapshot of `Health` for the status page and `/healthz`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    /// The MQTT broker.
    pub broker: Component,
    /// The camera.
    pub camera: Component,
    /// The caption stage.
    pub captioner: Component,
    /// The hot folder.
    pub folder: Component,
    /// The outbox on disk.
    pub outbox: Component,
    /// Counts since start.
    pub counters: Counters,
    /// Seconds since start.
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
                outbox: Component::off("MQTT is off"),
                counters: Counters {
                    processed: 0,
                    failed: 0,
                    published: 0,
                    rejected_uploads: 0,
                    dead_letters: 0,
                    outbox_write_failures: 0,
                },
                outbox_unwritable: None,
                latencies: VecDeque::new(),
            }),
            started: Instant::now(),
            beats: Mutex::new(Vec::new()),
            latency: latency_histogram(),
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

    /// Records the broker's state.
    pub fn set_broker(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.broker, ok, detail));
    }

    /// Records the camera's state.
    pub fn set_camera(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.camera, ok, detail));
    }

    /// Records the hot folder's state.
    pub fn set_folder(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.folder, ok, detail));
    }

    /// Records the caption stage's state.
    pub fn set_captioner(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.captioner, ok, detail));
    }

    /// Records the outbox's state.
    pub fn set_outbox(&self, ok: bool, detail: &str) {
        self.with(|i| set(&mut i.outbox, ok, detail));
    }

    /// An outbox write failed: results are not being kept. `/healthz` says so.
    pub fn outbox_write_failed(&self, why: &str) {
        self.with(|i| {
            i.counters.outbox_write_failures += 1;
            i.outbox_unwritable = Some(why.to_string());
            set(&mut i.outbox, false, why);
        });
    }

    /// An outbox write (or a probe write) succeeded.
    pub fn outbox_writable(&self) {
        self.with(|i| {
            if i.outbox_unwritable.take().is_some() || i.outbox.ok != Some(true) {
                set(&mut i.outbox, true, "ok");
            }
        });
    }

    /// Why results cannot be kept right now, if they cannot.
    pub fn outbox_unwritable(&self) -> Option<String> {
        self.with(|i| i.outbox_unwritable.clone())
    }

    /// Counts a result the outbox gave up on, and says why.
    pub fn dead_lettered(&self, why: &str) {
        self.with(|i| {
            i.counters.dead_letters += 1;
            set(
                &mut i.outbox,
                false,
                &format!("dead-lettered a result: {why}"),
            );
        });
    }

    /// Registers a worker; it must call `beat` regularly from now on.
    pub fn heartbeat(&self, name: &'static str) -> Heartbeat {
        let hb = Heartbeat {
            name,
            base: self.started,
            last: Arc::new(AtomicU64::new(self.started.elapsed().as_millis() as u64)),
        };
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hb.clone());
        hb
    }

    /// The workers that have not beaten for `limit`.
    pub fn stalled(&self, limit: Duration) -> Vec<&'static str> {
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|b| b.age() > limit)
            .map(|b| b.name)
            .collect()
    }

    /// Counts a delivered poster and its latency.
    pub fn processed(&self, latency_ms: f64) {
        self.latency.observe(latency_ms);
        self.with(|i| {
            i.counters.processed += 1;
            i.latencies.push_back(latency_ms);
            if i.latencies.len() > 200 {
                i.latencies.pop_front();
            }
        });
    }

    /// Counts a failed poster.
    pub fn failed(&self) {
        self.with(|i| i.counters.failed += 1);
    }

    /// Counts a result the broker acknowledged.
    pub fn published(&self) {
        self.with(|i| i.counters.published += 1);
    }

    /// Counts a refused upload.
    pub fn rejected_upload(&self) {
        self.with(|i| i.counters.rejected_uploads += 1);
    }

    /// The latency histogram since start (shares its data with this record).
    pub fn latency_histogram(&self) -> Histogram {
        self.latency.clone()
    }

    /// The latencies kept (most recent last), in ms.
    pub fn latencies(&self) -> Vec<f64> {
        self.with(|i| i.latencies.iter().copied().collect())
    }

    /// A snapshot for the status page.
    pub fn view(&self) -> HealthView {
        let uptime_s = self.started.elapsed().as_secs();
        self.with(|i| HealthView {
            broker: i.broker.clone(),
            camera: i.camera.clone(),
            captioner: i.captioner.clone(),
            folder: i.folder.clone(),
            outbox: i.outbox.clone(),
            counters: i.counters.clone(),
            uptime_s,
        })
    }

    /// The periodic MQTT `stats` payload.
    pub fn stats_json(&self, outbox: usize, queue: usize) -> String {
        let v = self.view();
        serde_json::json!({
            "uptime_s": v.uptime_s, "processed": v.counters.processed, "failed": v.counters.failed,
            "published": v.counters.published, "outbox": outbox, "queue": queue,
            "dead_letters": v.counters.dead_letters,
            "camera_ok": v.camera.ok, "broker_ok": v.broker.ok,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_worker_is_reported_stalled() {
        let h = Health::default();
        let a = h.heartbeat("a");
        let _b = h.heartbeat("b");
        std::thread::sleep(Duration::from_millis(60));
        a.beat();
        assert_eq!(h.stalled(Duration::from_millis(40)), vec!["b"]);
        assert!(h.stalled(Duration::from_secs(5)).is_empty());
    }
}
