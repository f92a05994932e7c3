//! `/metrics` in the Prometheus text format, through prometheus-client: counters and
//! gauges read from the health record at each scrape, and the latency histogram that
//! the health record observes on every poster.

use crate::health::Health;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

fn up(ok: Option<bool>) -> i64 {
    i64::from(ok == Some(true))
}

/// `/metrics` in the Prometheus text format.
pub fn render(health: &Health, outbox: usize, queue_capacity: usize) -> String {
    let h = health.view();
    let c = &h.counters;
    let mut r = Registry::with_prefix("marquee");
    let counters = [
        ("processed", "Posters classified.", c.processed),
        ("failed", "Posters that could not be classified.", c.failed),
        (
            "published",
            "Results acknowledged by the MQTT broker.",
            c.published,
        ),
        (
            "uploads_rejected",
            "Uploads refused (auth, size, bad image, queue full).",
            c.rejected_uploads,
        ),
        (
            "dead_letters",
            "Results moved to the dead-letter folder because they could never be published.",
            c.dead_letters,
        ),
        (
            "outbox_write_failures",
            "Results that could not be written to the outbox (full or broken disk).",
            c.outbox_write_failures,
        ),
    ];
    for (name, help, value) in counters {
        r.register(name, help, ConstCounter::new(value));
    }
    let gauges = [
        (
            "outbox_pending",
            "Results waiting in the disk outbox.",
            outbox as i64,
        ),
        (
            "queue_capacity",
            "Capacity of the classifier queue.",
            queue_capacity as i64,
        ),
        (
            "outbox_writable",
            "1 while the outbox can be written (0: results are not being kept).",
            i64::from(health.outbox_unwritable().is_none()),
        ),
        (
            "broker_up",
            "1 while connected to the MQTT broker.",
            up(h.broker.ok),
        ),
        (
            "camera_up",
            "1 while the camera delivers frames.",
            up(h.camera.ok),
        ),
        ("uptime_seconds", "Seconds since start.", h.uptime_s as i64),
    ];
    for (name, help, value) in gauges {
        r.register(name, help, ConstGauge::new(value));
    }
    r.register(
        "latency_ms",
        "End-to-end classification latency (ms).",
        health.latency_histogram(),
    );
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut s, &r);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_a_histogram_whose_sum_and_count_only_grow() {
        let h = Health::default();
        for ms in [15.0, 30.0, 5000.0] {
            h.processed(ms);
        }
        let text = render(&h, 2, 8);
        assert!(text.contains("marquee_processed_total 3"), "{text}");
        assert!(text.contains("marquee_outbox_pending 2"), "{text}");
        assert!(
            text.contains("# TYPE marquee_latency_ms histogram"),
            "{text}"
        );
        assert!(text.contains("marquee_latency_ms_count 3"), "{text}");
        assert!(text.contains("marquee_latency_ms_sum 5045.0"), "{text}");
        // Far more posters than the page's recent window: the count keeps them all.
        for _ in 0..500 {
            h.processed(20.0);
        }
        let text = render(&h, 0, 8);
        assert!(text.contains("marquee_latency_ms_count 503"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
