//! Topic names and payloads: the MQTT contract (docs/mqtt.md documents it).

use crate::config::{DeviceId, MqttConfig};
use serde_json::json;

/// Home Assistant limits a state to 255 characters.
pub const STATE_MAX: usize = 255;

/// Every topic of one device, from the config's prefixes and the device id.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `PREFIX/DEVICE`: the device's own topics hang below it.
    pub base: String,
    /// `online` / `offline` (retained; the last will says `offline`).
    pub availability: String,
    /// The predicted genres as one string (retained).
    pub state: String,
    /// The last result without its picture (retained).
    pub attributes: String,
    /// Every result (not retained).
    pub events: String,
    /// Queue, outbox and counters (QoS 0).
    pub stats: String,
    /// The overview command for the next scan.
    pub cmd_overview: String,
    /// The overview waiting for the next scan (retained; empty once used).
    pub overview_state: String,
    /// One Home Assistant event per scan (not retained).
    pub scan: String,
    /// The last poster, a base64 JPEG thumbnail (retained).
    pub poster: String,
    /// The Home Assistant discovery document's topic.
    pub discovery: String,
    /// Home Assistant's own status (`online` asks for discovery again).
    pub ha_status: String,
}

impl Topics {
    /// The topics of device `id` under `m`'s prefixes.
    pub fn new(m: &MqttConfig, id: &DeviceId) -> Self {
        let base = format!("{}/{id}", m.prefix);
        Self {
            availability: format!("{base}/availability"),
            state: format!("{base}/genres/state"),
            attributes: format!("{base}/genres/attributes"),
            events: format!("{base}/events"),
            stats: format!("{base}/stats"),
            cmd_overview: format!("{base}/cmd/overview"),
            overview_state: format!("{base}/overview/state"),
            scan: format!("{base}/scan"),
            poster: format!("{base}/poster"),
            discovery: format!("{}/device/{id}/config", m.discovery_prefix),
            ha_status: format!("{}/status", m.discovery_prefix),
            base,
        }
    }
}

/// The predicted genres as one short string, cut on a character boundary.
pub fn state_payload(predicted: &[String]) -> String {
    let mut s = if predicted.is_empty() {
        "none".to_string()
    } else {
        predicted.join(", ")
    };
    s.truncate(s.floor_char_boundary(STATE_MAX));
    s
}

/// Home Assistant device discovery: one device (`dev`, `o`, `cmps`) with the genres
/// sensor (the full result as attributes), the last-scan time, the caption, the
/// poster image, a `scanned` event per poster, the next-overview text, and
/// diagnostics. Home Assistant copies only availability and the state and command
/// topics from the root to the components, so every component names its own `qos`.
pub fn discovery_payload(id: &DeviceId, t: &Topics) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let uid = |name: &str| format!("marquee_{id}_{name}");
    json!({
        "dev": {"ids": [format!("marquee_{id}")], "name": format!("Marquee {id}"),
                "mf": "Marquee", "mdl": "Poster genre appliance", "sw": version},
        "o": {"name": "marquee", "sw": version},
        "avty_t": t.availability,
        "qos": 1,
        "cmps": {
            format!("{id}_genres"): {
                "p": "sensor", "name": "Genres", "uniq_id": uid("genres"), "qos": 1,
                "stat_t": t.state, "json_attr_t": t.attributes, "icon": "mdi:movie-open"
            },
            format!("{id}_last_scan"): {
                "p": "sensor", "name": "Last scan", "uniq_id": uid("last_scan"), "qos": 1,
                "stat_t": t.attributes, "val_tpl": "{{ value_json.timestamp }}",
                "dev_cla": "timestamp"
            },
            format!("{id}_caption"): {
                "p": "sensor", "name": "Caption", "uniq_id": uid("caption"), "qos": 1,
                "stat_t": t.attributes, "icon": "mdi:text-box-outline",
                "val_tpl": "{{ (value_json.caption or '')[:255] }}"
            },
            format!("{id}_poster"): {
                "p": "image", "name": "Poster", "uniq_id": uid("poster"), "qos": 1,
                "image_topic": t.poster, "content_type": "image/jpeg", "image_encoding": "b64"
            },
            format!("{id}_scan"): {
                "p": "event", "name": "Scan", "uniq_id": uid("scan"), "qos": 1,
                "stat_t": t.scan, "evt_typ": ["scanned"], "icon": "mdi:movie-search"
            },
            format!("{id}_overview"): {
                "p": "text", "name": "Next overview", "uniq_id": uid("overview"), "qos": 1,
                "cmd_t": t.cmd_overview, "stat_t": t.overview_state, "max": 255, "mode": "text"
            },
            format!("{id}_latency"): {
                "p": "sensor", "name": "Latency", "uniq_id": uid("latency"), "qos": 1,
                "stat_t": t.attributes, "val_tpl": "{{ value_json.timings_ms.pipeline | round(0) }}",
                "unit_of_meas": "ms", "stat_cla": "measurement", "ent_cat": "diagnostic"
            },
            format!("{id}_queue"): {
                "p": "sensor", "name": "Queue", "uniq_id": uid("queue"), "qos": 1,
                "stat_t": t.stats, "val_tpl": "{{ value_json.queue }}",
                "stat_cla": "measurement", "ent_cat": "diagnostic"
            },
            format!("{id}_outbox"): {
                "p": "sensor", "name": "Outbox", "uniq_id": uid("outbox"), "qos": 1,
                "stat_t": t.stats, "val_tpl": "{{ value_json.outbox }}",
                "stat_cla": "measurement", "ent_cat": "diagnostic"
            }
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_component_has_a_platform_a_unique_id_and_its_own_qos() {
        let m = MqttConfig::default();
        let id = DeviceId::try_from("kiosk".to_string()).unwrap();
        let t = Topics::new(&m, &id);
        let d: serde_json::Value = serde_json::from_str(&discovery_payload(&id, &t)).unwrap();
        let cmps = d["cmps"].as_object().unwrap();
        for (key, c) in cmps {
            assert!(c["p"].is_string(), "{key}: p");
            assert!(
                c["uniq_id"].as_str().unwrap().starts_with("marquee_kiosk_"),
                "{key}"
            );
            assert_eq!(c["qos"], 1, "{key}: qos");
        }
        let p = |k: &str| {
            cmps[&format!("kiosk_{k}")]["p"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(p("poster"), "image");
        assert_eq!(p("scan"), "event");
        assert_eq!(cmps["kiosk_scan"]["evt_typ"], json!(["scanned"]));
        assert_eq!(cmps["kiosk_poster"]["image_topic"], "marquee/kiosk/poster");
        assert_eq!(
            cmps["kiosk_overview"]["stat_t"],
            "marquee/kiosk/overview/state"
        );
        assert_eq!(cmps["kiosk_outbox"]["ent_cat"], "diagnostic");
    }

    #[test]
    fn state_is_short_and_cut_on_a_char_boundary() {
        assert_eq!(
            state_payload(&["Drama".into(), "Romance".into()]),
            "Drama, Romance"
        );
        assert_eq!(state_payload(&[]), "none");
        let long: Vec<String> = (0..100).map(|i| format!("Genre-é{i}")).collect();
        let s = state_payload(&long);
        assert!(s.len() <= STATE_MAX);
    }
}
