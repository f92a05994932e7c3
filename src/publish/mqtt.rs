//! MQTT publishing with rumqttc's synchronous client.
//!
//! Two threads share one client. The connection thread drives rumqttc's event loop:
//! it reconnects with back-off, and on every ConnAck re-subscribes and re-publishes
//! availability, discovery and the last state; it also counts PubAcks. The sender
//! thread moves results from the disk outbox to the broker one at a time, and
//! deletes an entry only when every QoS 1 publish made so far has been acknowledged,
//! so results arrive in order and none is lost while the broker is away.

use super::outbox::Outbox;
use super::topics::{Topics, discovery_payload, state_payload};
use crate::config::Config;
use crate::health::Health;
use crate::pipeline::{ScanResult, Sink};
use anyhow::{Context, Result};
use rumqttc::{Client, Connection, Event, LastWill, MqttOptions, Packet, QoS, Transport};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BACKOFF_MAX: Duration = Duration::from_secs(30);

struct Shared {
    connected: Mutex<bool>,
    changed: Condvar,
    /// QoS 1 publishes asked for, and PubAcks received.
    requested: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
    last_state: Mutex<Option<(String, String)>>,
}

impl Shared {
    fn notify(&self) {
        let _g = self.connected.lock().expect("mqtt lock");
        self.changed.notify_all();
    }

    fn is_connected(&self) -> bool {
        *self.connected.lock().expect("mqtt lock")
    }

    /// Waits until every QoS 1 publish so far is acknowledged, or the timeout.
    fn wait_acked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.connected.lock().expect("mqtt lock");
        loop {
            if self.acked.load(Ordering::SeqCst) >= self.requested.load(Ordering::SeqCst) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::SeqCst) {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .expect("mqtt lock")
                .0;
        }
    }
}

pub struct Mqtt {
    client: Client,
    shared: Arc<Shared>,
    topics: Topics,
    threads: Vec<JoinHandle<()>>,
}

/// The pipeline's MQTT sink: it only writes to the outbox; the sender publishes.
pub struct OutboxSink {
    pub outbox: Arc<Outbox>,
}

impl Sink for OutboxSink {
    fn accept(&mut self, r: &ScanResult) -> Result<(), String> {
        let json = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        self.outbox
            .push(&json)
            .map(|_| ())
            .map_err(|e| format!("outbox write failed: {e}"))
    }
}

fn options(c: &Config, t: &Topics) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(
        format!("marquee-{}", c.device_id),
        &c.mqtt.host,
        c.mqtt.port,
    );
    o.set_keep_alive(Duration::from_secs(c.mqtt.keep_alive_s));
    o.set_clean_session(true);
    o.set_last_will(LastWill::new(
        &t.availability,
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &c.mqtt.username {
        o.set_credentials(user, c.mqtt.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &c.mqtt.tls_ca {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = std::fs::read(ca).with_context(|| format!("mqtt.tls_ca {}", ca.display()))?;
        o.set_transport(Transport::tls(ca, None, None));
    }
    Ok(o)
}

impl Mqtt {
    pub fn start(
        c: &Config,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
        next_overview: Arc<Mutex<Option<String>>>,
    ) -> Result<Self> {
        let topics = Topics::new(c);
        let (client, connection) = Client::new(options(c, &topics)?, 64);
        let shared = Arc::new(Shared {
            connected: Mutex::new(false),
            changed: Condvar::new(),
            requested: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            last_state: Mutex::new(None),
        });
        let conn = {
            let (client, shared, topics, health) = (
                client.clone(),
                shared.clone(),
                topics.clone(),
                health.clone(),
            );
            let discovery = discovery_payload(c, &topics);
            std::thread::Builder::new()
                .name("mqtt-conn".into())
                .spawn(move || {
                    drive(
                        connection,
                        &client,
                        &shared,
                        &topics,
                        &discovery,
                        &health,
                        &next_overview,
                    )
                })?
        };
        let sender = {
            let (client, shared, topics) = (client.clone(), shared.clone(), topics.clone());
            let interval = c.stats_interval();
            std::thread::Builder::new()
                .name("mqtt-send".into())
                .spawn(move || send_loop(&client, &shared, &topics, &outbox, &health, interval))?
        };
        Ok(Self {
            client,
            shared,
            topics,
            threads: vec![conn, sender],
        })
    }

    /// Publishes `offline`, waits briefly for its acknowledgement, disconnects.
    pub fn shutdown(mut self, timeout: Duration) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.notify();
        if self.shared.is_connected() {
            self.shared.requested.fetch_add(1, Ordering::SeqCst);
            let _ = self.client.try_publish(
                &self.topics.availability,
                QoS::AtLeastOnce,
                true,
                "offline",
            );
            self.shared.stop.store(false, Ordering::SeqCst);
            self.shared.wait_acked(timeout);
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        let _ = self.client.try_disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn publish_q1(client: &Client, shared: &Shared, topic: &str, retain: bool, payload: Vec<u8>) {
    shared.requested.fetch_add(1, Ordering::SeqCst);
    if client
        .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        .is_err()
    {
        // Never queued: it will never be acknowledged either.
        shared.requested.fetch_sub(1, Ordering::SeqCst);
    }
}

fn drive(
    mut connection: Connection,
    client: &Client,
    shared: &Shared,
    t: &Topics,
    discovery: &str,
    health: &Health,
    next_overview: &Mutex<Option<String>>,
) {
    let send_discovery = || {
        publish_q1(
            client,
            shared,
            &t.discovery,
            true,
            discovery.as_bytes().to_vec(),
        )
    };
    let mut backoff = Duration::from_millis(500);
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(500);
                *shared.connected.lock().expect("mqtt lock") = true;
                health.set_broker(true, "connected");
                let _ = client.try_subscribe(&t.cmd_overview, QoS::AtLeastOnce);
                let _ = client.try_subscribe(&t.ha_status, QoS::AtLeastOnce);
                publish_q1(client, shared, &t.availability, true, b"online".to_vec());
                send_discovery();
                if let Some((state, attrs)) = shared.last_state.lock().expect("mqtt lock").clone() {
                    publish_q1(client, shared, &t.state, true, state.into_bytes());
                    publish_q1(client, shared, &t.attributes, true, attrs.into_bytes());
                }
                shared.notify();
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                shared.acked.fetch_add(1, Ordering::SeqCst);
                shared.notify();
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // A retained command is old news: never act on it.
                if p.retain {
                    continue;
                }
                let text = String::from_utf8_lossy(&p.payload).trim().to_string();
                if p.topic == t.cmd_overview {
                    tracing::info!("overview for the next scan received over MQTT");
                    *next_overview.lock().expect("overview lock") =
                        Some(text).filter(|s| !s.is_empty());
                } else if p.topic == t.ha_status && text == "online" {
                    send_discovery();
                }
            }
            Ok(_) => {}
            Err(e) => {
                *shared.connected.lock().expect("mqtt lock") = false;
                shared.notify();
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                health.set_broker(false, &e.to_string());
                tracing::warn!("mqtt: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        if shared.stop.load(Ordering::SeqCst) && !shared.is_connected() {
            break;
        }
    }
}

fn send_loop(
    client: &Client,
    shared: &Shared,
    t: &Topics,
    outbox: &Outbox,
    health: &Health,
    interval: Duration,
) {
    let mut next_stats = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.is_connected() && Instant::now() >= next_stats {
            let stats = health.stats_json(outbox.len());
            let _ = client.try_publish(&t.stats, QoS::AtMostOnce, false, stats);
            next_stats = Instant::now() + interval;
        }
        let entry = match (shared.is_connected(), outbox.oldest()) {
            (true, Some(e)) => e,
            (false, _) => {
                let g = shared.connected.lock().expect("mqtt lock");
                let _ = shared.changed.wait_timeout(g, Duration::from_millis(500));
                continue;
            }
            (true, None) => {
                outbox.wait(Duration::from_millis(500));
                continue;
            }
        };
        let Ok(result) = serde_json::from_slice::<serde_json::Value>(&entry.payload) else {
            tracing::warn!(seq = entry.seq, "dropping an unreadable outbox entry");
            outbox.remove(entry.seq);
            continue;
        };
        let state = result["predicted"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let state = state_payload(&state);
        let attrs = String::from_utf8_lossy(&entry.payload).into_owned();
        publish_q1(client, shared, &t.events, false, entry.payload.clone());
        publish_q1(client, shared, &t.state, true, state.clone().into_bytes());
        publish_q1(
            client,
            shared,
            &t.attributes,
            true,
            attrs.clone().into_bytes(),
        );
        // Held until the broker has it all; a reconnect in between makes rumqttc
        // replay the unacknowledged publishes, which we keep waiting for.
        while !shared.wait_acked(Duration::from_millis(500)) {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
        }
        *shared.last_state.lock().expect("mqtt lock") = Some((state, attrs));
        outbox.remove(entry.seq);
        health.published();
    }
}
