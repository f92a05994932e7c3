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
use super::topics::{STATE_MAX, Topics, discovery_payload, state_payload};
use crate::config::{DeviceId, MqttConfig};
use crate::health::{Health, Heartbeat};
use crate::pipeline::{QueueShared, ScanResult, Sink, clip};
use crate::util::backoff::Backoff;
use anyhow::{Context, Result};
use rumqttc::{
    Client, Connection, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS,
    RecvTimeoutError, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
        let json = record(r).map_err(|e| e.to_string())?;
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
        queue: Arc<QueueShared>,
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
            queue,
            overview_shown: None,
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
    queue: Arc<QueueShared>,
    /// The overview last published (retained) on the overview state topic; `None`
    /// until it is published on this connection.
    overview_shown: Option<Option<String>>,
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
                self.show_overview();
                if Instant::now() >= next_stats {
                    let stats = self
                        .health
                        .stats_json(self.outbox.len(), self.queue.pending());
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
                self.overview_shown = None;
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
        let Wire {
            state,
            attrs,
            event,
            image,
        } = match wire(&entry.payload) {
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
        let mut messages = vec![
            (&t.events, false, attrs.clone().into_bytes()),
            (&t.state, true, state.clone().into_bytes()),
            (&t.attributes, true, attrs.clone().into_bytes()),
            (&t.scan, false, event.into_bytes()),
        ];
        if let Some(jpeg_b64) = image {
            messages.push((&t.poster, true, jpeg_b64.into_bytes()));
        }
        for (topic, retain, payload) in messages {
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

    /// Keeps the overview state topic (retained) equal to the overview waiting for
    /// the next scan: set when a command brings one, cleared once a scan used it.
    fn show_overview(&mut self) {
        let now = self.queue.next_overview();
        if self.overview_shown.as_ref() == Some(&now) {
            return;
        }
        let topic = self.topics.overview_state.clone();
        // Home Assistant refuses a text entity's state over 255 characters.
        let payload = clip(now.as_deref().unwrap_or_default(), STATE_MAX).into_bytes();
        if self.publish(Tag::Other, &topic, QoS::AtLeastOnce, true, payload) {
            self.overview_shown = Some(now);
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
            self.queue
                .set_next_overview(Some(text).filter(|s| !s.is_empty()));
            self.show_overview();
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
/// What one outbox record publishes.
#[derive(Debug)]
struct Wire {
    /// The predicted genres as one short string (the genres sensor).
    state: String,
    /// The result without its picture (attributes and `events`).
    attrs: String,
    /// The Home Assistant event of this scan.
    event: String,
    /// The poster thumbnail, a base64 JPEG (the image entity), where the record has one.
    image: Option<String>,
}

/// The outbox record: the result, and its thumbnail for the image entity.
#[derive(serde::Serialize)]
struct Record<'a> {
    #[serde(flatten)]
    result: &'a ScanResult,
    thumbnail_jpeg_b64: Option<String>,
}

fn record(r: &ScanResult) -> serde_json::Result<Vec<u8>> {
    use base64::Engine;
    let thumbnail_jpeg_b64 = (!r.thumbnail.is_empty())
        .then(|| base64::engine::general_purpose::STANDARD.encode(&r.thumbnail));
    serde_json::to_vec(&Record {
        result: r,
        thumbnail_jpeg_b64,
    })
}

fn wire(payload: &[u8]) -> Result<Wire, String> {
    if payload.len() > PAYLOAD_MAX {
        return Err(format!(
            "result is {} bytes, over the {PAYLOAD_MAX}-byte payload budget",
            payload.len()
        ));
    }
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable outbox record: {e}"))?;
    let image = match v.remove("thumbnail_jpeg_b64") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    };
    #[derive(serde::Deserialize)]
    struct Genre {
        label: String,
        score: f64,
    }
    let predicted: Vec<String> = serde_json::from_value(
        v.get("predicted")
            .cloned()
            .unwrap_or(serde_json::Value::Null),
    )
    .map_err(|e| format!("unreadable outbox record: predicted: {e}"))?;
    let genres: Vec<Genre> =
        serde_json::from_value(v.get("genres").cloned().unwrap_or_default()).unwrap_or_default();
    let top = genres.iter().max_by(|a, b| a.score.total_cmp(&b.score));
    let event = serde_json::json!({
        "event_type": "scanned",
        "predicted": predicted,
        "top_genre": top.map(|g| g.label.as_str()),
        "top_score": top.map(|g| g.score),
        "caption": v.get("caption"),
        "source": v.get("source"),
        "name": v.get("name"),
        "id": v.get("id"),
    })
    .to_string();
    Ok(Wire {
        state: state_payload(&predicted),
        attrs: serde_json::Value::Object(v).to_string(),
        event,
        image,
    })
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
        assert_eq!(wire(ok).unwrap().state, "Drama, Crime");
        assert!(wire(b"{not json").unwrap_err().contains("unreadable"));
        let big = format!(
            r#"{{"predicted":[],"overview":"{}"}}"#,
            "a".repeat(PAYLOAD_MAX)
        );
        assert!(wire(big.as_bytes()).unwrap_err().contains("budget"));
    }
}
