//! Topic names and payloads: the MQTT contract (docs/mqtt.md documents it).

use crate::config::{DeviceId, MqttConfig};
use serde_json::json;

/// Home Assistant limits a state to 255 characters.
pub const STATE_MAX: usize = 255;

#[derive(Debug, Clone)]
pub struct Topics {
    pub base: String,
    pub availability: String,
    pub state: String,
    pub attributes: String,
    pub events: String,
    pub stats: String,
    pub cmd_overview: String,
    pub discovery: String,
    pub ha_status: String,
}

impl Topics {
    pub fn new(m: &MqttConfig, id: &DeviceId) -> Self {
        let base = format!("{}/{id}", m.prefix);
        Self {
            availability: format!("{base}/availability"),
            state: format!("{base}/genres/state"),
            attributes: format!("{base}/genres/attributes"),
            events: format!("{base}/events"),
            stats: format!("{base}/stats"),
            cmd_overview: format!("{base}/cmd/overview"),
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
    if s.len() > STATE_MAX {
        let mut end = STATE_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Home Assistant device discovery: one device, a genres sensor (with the full
/// result as attributes), a last-scan timestamp and a text entity for the overview.
pub fn discovery_payload(id: &DeviceId, t: &Topics) -> String {
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "dev": {"ids": [format!("marquee_{id}")], "name": format!("Marquee {id}"),
                "mf": "Marquee", "mdl": "Poster genre appliance", "sw": version},
        "o": {"name": "marquee", "sw": version},
        "avty_t": t.availability,
        "qos": 1,
        "cmps": {
            format!("{id}_genres"): {
                "p": "sensor", "name": "Genres", "uniq_id": format!("marquee_{id}_genres"),
                "stat_t": t.state, "json_attr_t": t.attributes, "icon": "mdi:movie-open"
            },
            format!("{id}_last_scan"): {
                "p": "sensor", "name": "Last scan", "uniq_id": format!("marquee_{id}_last_scan"),
                "stat_t": t.attributes, "val_tpl": "{{ value_json.timestamp }}",
                "dev_cla": "timestamp"
            },
            format!("{id}_overview"): {
                "p": "text", "name": "Next overview", "uniq_id": format!("marquee_{id}_overview"),
                "cmd_t": t.cmd_overview, "max": 255, "mode": "text"
            }
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
