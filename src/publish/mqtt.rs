//! MQTT publishing with rumqttc's synchronous client.
//!
//! One thread owns both the client and its event loop, and it is the only one that
//! publishes. That makes the order of rumqttc's `Outgoing::Publish(pkid)` events the
//! order of our own requests, so every packet id maps back to the outbox entry it
//! carries, and an entry is deleted only when the broker has acknowledged all of its
//! messages.
//!
//! Why not trust rumqttc's replay: with a clean session, rumqttc drops everything
//! unacknowledged (and everything still queued) when it reconnects. So on any
//! connection error we forget what was in flight, and after the next ConnAck we
//! re-send the outbox head from scratch. Delivery is at least once: a message the
//! broker took just before it died arrives twice, never zero times. A persistent
//! session (`clean_session = false`) would not remove that step, because a broker
//! restarted without its persistence file answers `session_present = false` and
//! rumqttc then drops the pending publishes anyway; it would also queue stale
//! `cmd/overview` commands for us while we are away.
//!
//! Results that cannot go out (unreadable, or larger than the payload budget) are
//! moved to the dead-letter folder with their reason, so one bad result never
//! blocks the ones behind it.

use super::outbox::Outbox;
use super::topics::{Topics, discovery_payload, state_payload};
use crate::config::{DeviceId, MqttConfig};
use crate::health::{Health, Heartbeat};
use crate::pipeline::{ScanResult, Sink, clip};
use crate::util::backoff::Backoff;
use anyhow::{Context, Result};
use rumqttc::{
    Client, Connection, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    RecvTimeoutError, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the loop waits for an event before it looks at the outbox again.
const TICK: Duration = Duration::from_millis(100);
/// A broker that has not acknowledged the head entry for this long is not called
/// "connected" on the page, even while the TCP connection stands.
const ACK_STALL: Duration = Duration::from_secs(10);
/// Largest packet either side may send. Results are far below it (see `PAYLOAD_MAX`).
const PACKET_MAX: usize = 1 << 20;
/// The budget of one published result. Overviews and captions are clipped in the
/// pipeline, so a result that still exceeds this is a defect: it is dead-lettered.
pub const PAYLOAD_MAX: usize = 256 * 1024;
/// Longest `cmd/overview` text kept (characters); the rest is cut.
pub const COMMAND_MAX_CHARS: usize = crate::pipeline::OVERVIEW_MAX_CHARS;

pub struct Mqtt {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The pipeline's MQTT sink: it only writes to the outbox; the session publishes.
pub struct OutboxSink {
    pub outbox: Arc<Outbox>,
    pub health: Arc<Health>,
}

impl Sink for OutboxSink {
    fn accept(&mut self, r: &ScanResult) -> Result<(), String> {
        let json = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        match self.outbox.push(&json) {
            Ok(_) => {
                self.health.set_outbox(true, "ok");
                Ok(())
            }
            Err(e) => {
                let msg = format!("outbox write failed: {e}");
                self.health.set_outbox(false, &msg);
                Err(msg)
            }
        }
    }
}

fn options(m: &MqttConfig, id: &DeviceId, t: &Topics) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(format!("marquee-{id}"), &m.host, m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    o.set_clean_session(true);
    o.set_last_will(LastWill::new(
        &t.availability,
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    o.set_max_packet_size(PACKET_MAX, PACKET_MAX);
    if let Some(user) = &m.username {
        o.set_credentials(user, m.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &m.tls_ca {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = std::fs::read(ca).with_context(|| format!("mqtt.tls_ca {}", ca.display()))?;
        o.set_transport(Transport::tls(ca, None, None));
    }
    Ok(o)
}

impl Mqtt {
    pub fn start(
        m: &MqttConfig,
        id: &DeviceId,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
        next_overview: Arc<Mutex<Option<String>>>,
        heartbeat: Heartbeat,
    ) -> Result<Self> {
        let topics = Topics::new(m, id);
        let (client, connection) = Client::new(options(m, id, &topics)?, 64);
        let stop = Arc::new(AtomicBool::new(false));
        let session = Session {
            client,
            discovery: discovery_payload(id, &topics),
            topics,
            outbox,
            health,
            next_overview,
            heartbeat,
            stats_every: Duration::from_secs(m.stats_interval_s),
            connected: false,
            requested: VecDeque::new(),
            by_pkid: HashMap::new(),
            head: None,
            attempt: 0,
            last_state: None,
        };
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || session.run(connection, &st))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the session thread has ended (it only does so when asked to stop).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Publishes `offline`, waits up to `OFFLINE_TIMEOUT` for its acknowledgement,
    /// disconnects.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Time allowed to get `offline` acknowledged at shutdown.
const OFFLINE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a requested publish carries, so its PubAck can be credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// One of the messages of outbox entry `seq`, sent in attempt `attempt`.
    Entry {
        seq: u64,
        attempt: u64,
    },
    Offline,
    Other,
}

/// The outbox entry on the wire: what is still unacknowledged of it.
struct Head {
    seq: u64,
    attempt: u64,
    unacked: usize,
    sent_at: Instant,
    state: (String, String),
}

struct Session {
    client: Client,
    topics: Topics,
    discovery: String,
    outbox: Arc<Outbox>,
    health: Arc<Health>,
    next_overview: Arc<Mutex<Option<String>>>,
    heartbeat: Heartbeat,
    stats_every: Duration,
    connected: bool,
    /// Requests made on this connection and not yet seen going out, in order.
    requested: VecDeque<Tag>,
    /// QoS 1 publishes gone out on this connection and not yet acknowledged.
    by_pkid: HashMap<u16, Tag>,
    head: Option<Head>,
    attempt: u64,
    /// The last acknowledged state and attributes, re-sent (retained) on reconnect.
    last_state: Option<(String, String)>,
}

/// What the loop learned from one event.
enum Step {
    Continue,
    /// The connection failed: wait this long before the next attempt.
    Lost(String),
    /// rumqttc's request channel is gone: nothing more can be sent.
    Closed,
}

impl Session {
    fn run(mut self, mut connection: Connection, stop: &AtomicBool) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut next_stats = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            self.heartbeat.beat();
            if self.connected {
                self.send_head();
                if Instant::now() >= next_stats {
                    let stats = self.health.stats_json(self.outbox.len());
                    self.publish(
                        Tag::Other,
                        &self.topics.stats.clone(),
                        QoS::AtMostOnce,
                        false,
                        stats.into_bytes(),
                    );
                    next_stats = Instant::now() + self.stats_every;
                }
                self.watch_acks();
            }
            // While disconnected, `recv` runs rumqttc's connect (bounded by its own
            // timeout); a shorter wait here would cancel a slow TLS handshake.
            let event = if self.connected {
                match connection.recv_timeout(TICK) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match connection.recv() {
                    Ok(e) => e,
                    Err(_) => break,
                }
            };
            match self.handle(event) {
                Step::Continue => backoff.reset(),
                Step::Closed => break,
                Step::Lost(why) => {
                    self.lost(&why);
                    let wait = backoff.advance();
                    tracing::warn!("mqtt: {why}; retrying in {wait:?}");
                    sleep_unless(stop, wait, &self.heartbeat);
                }
            }
        }
        self.go_offline(&mut connection);
    }

    fn handle(&mut self, event: Result<Event, ConnectionError>) -> Step {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                self.connected = true;
                self.requested.clear();
                self.by_pkid.clear();
                self.head = None;
                self.health.set_broker(true, "connected");
                tracing::info!("mqtt: connected");
                let t = self.topics.clone();
                let _ = self.client.try_subscribe(&t.cmd_overview, QoS::AtLeastOnce);
                let _ = self.client.try_subscribe(&t.ha_status, QoS::AtLeastOnce);
                self.publish(
                    Tag::Other,
                    &t.availability,
                    QoS::AtLeastOnce,
                    true,
                    b"online".to_vec(),
                );
                self.publish(
                    Tag::Other,
                    &t.discovery,
                    QoS::AtLeastOnce,
                    true,
                    self.discovery.clone().into_bytes(),
                );
                if let Some((state, attrs)) = self.last_state.clone() {
                    self.publish(
                        Tag::Other,
                        &t.state,
                        QoS::AtLeastOnce,
                        true,
                        state.into_bytes(),
                    );
                    self.publish(
                        Tag::Other,
                        &t.attributes,
                        QoS::AtLeastOnce,
                        true,
                        attrs.into_bytes(),
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let tag = self.requested.pop_front().unwrap_or(Tag::Other);
                if pkid != 0 {
                    self.by_pkid.insert(pkid, tag);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(tag) = self.by_pkid.remove(&ack.pkid) {
                    self.acked(tag);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => self.command(&p),
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return Step::Closed,
            Err(e) => return Step::Lost(e.to_string()),
        }
        Step::Continue
    }

    /// Everything requested on the lost connection is gone (rumqttc drops it on a
    /// clean-session reconnect), so the head is sent again after the next ConnAck.
    fn lost(&mut self, why: &str) {
        self.connected = false;
        self.requested.clear();
        self.by_pkid.clear();
        self.head = None;
        self.health.set_broker(false, why);
    }

    fn publish(&mut self, tag: Tag, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        let ok = self.client.try_publish(topic, qos, retain, payload).is_ok();
        if ok {
            self.requested.push_back(tag);
        }
        ok
    }

    /// Puts the oldest outbox entry on the wire, unless one is already there.
    fn send_head(&mut self) {
        if self.head.is_some() {
            return;
        }
        let Some(entry) = self.outbox.oldest() else {
            return;
        };
        let (state, attrs) = match wire(&entry.payload) {
            Ok(w) => w,
            Err(why) => {
                tracing::warn!(seq = entry.seq, "dead-lettering a result: {why}");
                self.outbox.dead_letter(entry.seq, &why);
                self.health.dead_lettered(&why);
                return;
            }
        };
        self.attempt += 1;
        let (seq, attempt) = (entry.seq, self.attempt);
        let tag = Tag::Entry { seq, attempt };
        let t = self.topics.clone();
        let mut unacked = 0;
        for (topic, retain, payload) in [
            (&t.events, false, entry.payload),
            (&t.state, true, state.clone().into_bytes()),
            (&t.attributes, true, attrs.clone().into_bytes()),
        ] {
            if !self.publish(tag, topic, QoS::AtLeastOnce, retain, payload) {
                // rumqttc's queue is full: the acked part is harmless to repeat,
                // so forget this attempt and send the whole entry again later.
                return;
            }
            unacked += 1;
        }
        self.head = Some(Head {
            seq,
            attempt,
            unacked,
            sent_at: Instant::now(),
            state: (state, attrs),
        });
    }

    fn acked(&mut self, tag: Tag) {
        let Tag::Entry { seq, attempt } = tag else {
            return;
        };
        let Some(head) = self.head.as_mut() else {
            return;
        };
        if head.seq != seq || head.attempt != attempt {
            return;
        }
        head.unacked -= 1;
        if head.unacked == 0 {
            let head = self.head.take().expect("head present");
            self.outbox.remove(head.seq);
            self.last_state = Some(head.state);
            self.health.published();
            self.health.set_broker(true, "connected");
        }
    }

    /// "Connected" means acknowledgements flow, not just that a socket is open.
    fn watch_acks(&self) {
        if let Some(h) = &self.head
            && h.sent_at.elapsed() >= ACK_STALL
        {
            self.health.set_broker(
                false,
                &format!(
                    "connected, but no acknowledgement for {} s",
                    h.sent_at.elapsed().as_secs()
                ),
            );
        }
    }

    fn command(&mut self, p: &rumqttc::Publish) {
        // A retained command is old news: never act on it.
        if p.retain {
            return;
        }
        let text = String::from_utf8_lossy(&p.payload);
        let text = clip(text.trim(), COMMAND_MAX_CHARS);
        if p.topic == self.topics.cmd_overview {
            tracing::info!("overview for the next scan received over MQTT");
            *self.next_overview.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(text).filter(|s| !s.is_empty());
        } else if p.topic == self.topics.ha_status && text == "online" {
            // Through `publish`, like every request: the packet-id map depends on it.
            let (topic, payload) = (self.topics.discovery.clone(), self.discovery.clone());
            self.publish(
                Tag::Other,
                &topic,
                QoS::AtLeastOnce,
                true,
                payload.into_bytes(),
            );
        }
    }

    /// Publishes `offline` and waits briefly for its acknowledgement, then disconnects.
    fn go_offline(&mut self, connection: &mut Connection) {
        if self.connected {
            let topic = self.topics.availability.clone();
            self.publish(
                Tag::Offline,
                &topic,
                QoS::AtLeastOnce,
                true,
                b"offline".to_vec(),
            );
            let deadline = Instant::now() + OFFLINE_TIMEOUT;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match connection.recv_timeout(left.min(TICK)) {
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack))))
                        if self.by_pkid.get(&ack.pkid) == Some(&Tag::Offline) =>
                    {
                        break;
                    }
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        let tag = self.requested.pop_front().unwrap_or(Tag::Other);
                        if pkid != 0 {
                            self.by_pkid.insert(pkid, tag);
                        }
                    }
                    Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
                    _ => {}
                }
            }
        }
        let _ = self.client.try_disconnect();
        let _ = connection.recv_timeout(TICK);
    }
}

/// The retained state and attributes for one outbox entry, or why it cannot go out.
fn wire(payload: &[u8]) -> Result<(String, String), String> {
    if payload.len() > PAYLOAD_MAX {
        return Err(format!(
            "result is {} bytes, over the {PAYLOAD_MAX}-byte payload budget",
            payload.len()
        ));
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        predicted: Vec<String>,
    }
    let w: Wire =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable outbox record: {e}"))?;
    let attrs = String::from_utf8(payload.to_vec()).map_err(|e| e.to_string())?;
    Ok((state_payload(&w.predicted), attrs))
}

fn sleep_unless(stop: &AtomicBool, total: Duration, heartbeat: &Heartbeat) {
    let end = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) {
        heartbeat.beat();
        let Some(left) = end.checked_duration_since(Instant::now()) else {
            return;
        };
        std::thread::sleep(left.min(TICK));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Outbox records read back from disk (any bytes at all) and command payloads
        /// never panic: they are published, clipped or dead-lettered.
        #[test]
        fn any_record_or_command_is_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), text in ".{0,5000}") {
            let _ = wire(&bytes);
            let c = clip(text.trim(), COMMAND_MAX_CHARS);
            proptest::prop_assert!(c.chars().count() <= COMMAND_MAX_CHARS);
        }
    }

    #[test]
    fn wire_refuses_oversized_and_unreadable_records() {
        let ok = br#"{"predicted":["Drama","Crime"],"id":"x"}"#;
        assert_eq!(wire(ok).unwrap().0, "Drama, Crime");
        assert!(wire(b"{not json").unwrap_err().contains("unreadable"));
        let big = format!(
            r#"{{"predicted":[],"overview":"{}"}}"#,
            "a".repeat(PAYLOAD_MAX)
        );
        assert!(wire(big.as_bytes()).unwrap_err().contains("budget"));
    }
}
