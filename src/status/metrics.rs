//! `/metrics` in the Prometheus text exposition format.

use crate::health::HealthView;
use std::fmt::Write;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn up(ok: Option<bool>) -> u8 {
    u8::from(ok == Some(true))
}

pub fn render(h: &HealthView, latencies: &[f64], outbox: usize, queue_capacity: usize) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            s,
            "# HELP marquee_{name} {help}\n# TYPE marquee_{name} {kind}\nmarquee_{name} {value}"
        );
    };
    let c = &h.counters;
    metric(
        "processed_total",
        "counter",
        "Posters classified.",
        c.processed.to_string(),
    );
    metric(
        "failed_total",
        "counter",
        "Posters that could not be classified.",
        c.failed.to_string(),
    );
    metric(
        "published_total",
        "counter",
        "Results acknowledged by the MQTT broker.",
        c.published.to_string(),
    );
    metric(
        "uploads_rejected_total",
        "counter",
        "Uploads refused (auth, size, bad image, queue full).",
        c.rejected_uploads.to_string(),
    );
    metric(
        "dead_letters_total",
        "counter",
        "Results moved to the dead-letter folder because they could never be published.",
        c.dead_letters.to_string(),
    );
    metric(
        "outbox_pending",
        "gauge",
        "Results waiting in the disk outbox.",
        outbox.to_string(),
    );
    metric(
        "queue_capacity",
        "gauge",
        "Capacity of the classifier queue.",
        queue_capacity.to_string(),
    );
    metric(
        "broker_up",
        "gauge",
        "1 while connected to the MQTT broker.",
        up(h.broker.ok).to_string(),
    );
    metric(
        "camera_up",
        "gauge",
        "1 while the camera delivers frames.",
        up(h.camera.ok).to_string(),
    );
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        h.uptime_s.to_string(),
    );
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "# HELP marquee_latency_ms End-to-end classification latency over recent posters."
    );
    let _ = writeln!(s, "# TYPE marquee_latency_ms summary");
    for q in [0.5, 0.9, 0.99] {
        let _ = writeln!(
            s,
            "marquee_latency_ms{{quantile=\"{q}\"}} {}",
            quantile(&sorted, q)
        );
    }
    let _ = writeln!(s, "marquee_latency_ms_sum {}", sorted.iter().sum::<f64>());
    let _ = writeln!(s, "marquee_latency_ms_count {}", sorted.len());
    s
}
