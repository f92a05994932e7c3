//! MQTT publishing with rumqttc's synchronous client.
//!
//! One thread owns both the client and its event loop, and it is the only one that
//! publishes. That makes the order of rumqttc's `Outgoing::Publish(pkid)` events the
//! order of our own requests, so every packet id maps back to the outbox entry it
//! carries, and an entry is deleted only when the broker has acknowledged all of its
//! messages.
//!
//! What to send and when is decided in `delivery.rs` (pure state, tested per event);
//! this file does the I/O. Why not trust rumqttc's replay: with a clean session,
//! rumqttc drops everything unacknowledged (and everything still queued) when it
//! reconnects. So on any connection error we forget what was in flight, and after
//! the next ConnAck we re-send the outbox head from scratch. Delivery is at least
//! once: a message the broker took just before it died arrives twice, never zero
//! times. A persistent
//! session (`clean_session = false`) would not remove that step, because a broker
//! restarted without its persistence file answers `session_present = false` and
//! rumqttc then drops the pending publishes anyway; it would also queue stale
//! `cmd/overview` commands for us while we are away.
//!
//! Results that cannot go out (unreadable, or larger than the payload budget) are
//! moved to the dead-letter folder with their reason, so one bad result never
//! blocks the ones behind it.

use super::delivery::{Action, Control, Delivery, Event, Tag};
use super::outbox::Outbox;
use super::topics::{STATE_MAX, Topics, discovery_payload, state_payload};
use crate::config::{DeviceId, MqttConfig};
use crate::health::{Health, Heartbeat};
use crate::pipeline::{Backlog, OverviewCommand, ScanResult, Sink, SinkError, clip};
use crate::util::backoff::Backoff;
use crate::util::limited::read_file;
use crate::util::tls::{CA_MAX, client_config};
use anyhow::{Context, Result};
use rumqttc::{
    Client, Connection, ConnectionError, LastWill, MqttOptions, Outgoing, Packet, QoS,
    RecvTimeoutError, TlsConfiguration, Transport,
};
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

/// The MQTT session's thread and its stop flag.
pub struct Mqtt {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The pipeline's MQTT sink: it only writes to the outbox; the session publishes.
pub struct OutboxSink {
    /// The outbox it appends to.
    pub outbox: Arc<Outbox>,
    /// Counts results it could not keep.
    pub health: Arc<Health>,
}

impl Sink for OutboxSink {
    fn accept(&mut self, r: &ScanResult) -> Result<(), SinkError> {
        let json = record(r).map_err(|e| SinkError::Encode(e.to_string()))?;
        match self.outbox.push(&json) {
            Ok(_) => {
                self.health.outbox_writable();
                Ok(())
            }
            Err(e) => {
                let e = SinkError::OutboxWrite(e.to_string());
                self.health.outbox_write_failed(&e.to_string());
                Err(e)
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
        let pem = read_file(ca, CA_MAX).with_context(|| format!("mqtt.tls_ca {}", ca.display()))?;
        let config = client_config(&pem)
            .map_err(|e| anyhow::anyhow!("mqtt.tls_ca {}: {e}", ca.display()))?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(o)
}

impl Mqtt {
    /// Starts the session thread: connect, discovery, then the outbox in order.
    pub fn start(
        m: &MqttConfig,
        id: &DeviceId,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
        pipeline: (Backlog, OverviewCommand),
        heartbeat: Heartbeat,
    ) -> Result<Self> {
        let (backlog, overview) = pipeline;
        let topics = Topics::new(m, id);
        let options = options(m, id, &topics)?;
        let (client, connection) = Client::new(options.clone(), REQUEST_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let session = Session {
            client,
            connection,
            options,
            discovery: discovery_payload(id, &topics),
            topics,
            outbox,
            health,
            backlog,
            overview,
            overview_shown: None,
            heartbeat,
            stats_every: Duration::from_secs(m.stats_interval_s),
            delivery: Delivery::new(Instant::now()),
            head: None,
            last_state: None,
        };
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || session.run(&st))?;
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
/// rumqttc's request queue (bounded; `Delivery` never floods it).
const REQUEST_QUEUE: usize = 64;

/// One message of the head entry.
struct Message {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

/// The outbox entry on the wire: its messages, and the state it leaves behind.
struct HeadWire {
    seq: u64,
    messages: Vec<Message>,
    state: (String, String),
}

/// The I/O half of MQTT delivery: it owns the client and its connection, reads the
/// outbox, and carries out what `Delivery` decides.
struct Session {
    client: Client,
    connection: Connection,
    options: MqttOptions,
    topics: Topics,
    discovery: String,
    outbox: Arc<Outbox>,
    health: Arc<Health>,
    /// Posters waiting for the classifier (for the stats).
    backlog: Backlog,
    /// The overview command: set from `cmd/overview`, shown on `overview/state`.
    overview: OverviewCommand,
    /// The overview last requested (retained) on the overview state topic.
    overview_shown: Option<Option<String>>,
    heartbeat: Heartbeat,
    stats_every: Duration,
    delivery: Delivery,
    head: Option<HeadWire>,
    /// The last acknowledged state and attributes, re-sent (retained) on reconnect.
    last_state: Option<(String, String)>,
}

/// What the loop learned from one event.
enum Step {
    Continue,
    /// The connection failed: wait before the next attempt.
    Lost(String),
    /// rumqttc's request channel is gone: nothing more can be sent.
    Closed,
}

impl Session {
    fn run(mut self, stop: &AtomicBool) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut next_stats = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            self.heartbeat.beat();
            if self.delivery.connected() {
                if Instant::now() >= next_stats {
                    self.publish_stats();
                    next_stats = Instant::now() + self.stats_every;
                }
                self.pump();
                self.watch_acks();
            }
            // While disconnected, `recv` runs rumqttc's connect (bounded by its own
            // timeout); a shorter wait here would cancel a slow TLS handshake.
            let event = if self.delivery.connected() {
                match self.connection.recv_timeout(TICK) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.connection.recv() {
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
                    self.heartbeat.sleep_unless(stop, wait);
                }
            }
        }
        self.go_offline();
    }

    /// Loads the head, notes a changed overview, checks the deadlines and makes
    /// every request `Delivery` asks for.
    fn pump(&mut self) {
        if self.delivery.wants_head() {
            self.load_head();
        }
        if self.overview_shown.as_ref() != Some(&self.overview.peek()) {
            self.delivery.on(Event::OverviewChanged);
        }
        let actions = self.delivery.on(Event::Tick {
            now: Instant::now(),
        });
        self.carry_out(actions);
        while let Some(action) = self.delivery.next_request() {
            self.carry_out(vec![action]);
        }
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(tag) => self.send(tag),
                Action::Delivered { seq } => {
                    self.outbox.remove(seq);
                    if let Some(h) = self.head.take().filter(|h| h.seq == seq) {
                        self.last_state = Some(h.state);
                    }
                    self.health.published();
                    self.health.set_broker(true, "connected");
                }
                Action::DeadLetter { seq, reason } => {
                    tracing::warn!(seq, "dead-lettering a result: {reason}");
                    self.outbox.dead_letter(seq, &reason);
                    self.health.dead_lettered(&reason);
                }
                Action::Reconnect { reason } => {
                    tracing::warn!("mqtt: {reason}; reconnecting");
                    // Dropping the connection closes the socket; the new client
                    // connects on its first `recv`.
                    let (client, connection) = Client::new(self.options.clone(), REQUEST_QUEUE);
                    self.client = client;
                    self.connection = connection;
                    self.lost(&reason);
                }
            }
        }
    }

    /// Reads the oldest outbox entry and tells `Delivery` what it is.
    fn load_head(&mut self) {
        let Some(entry) = self.outbox.oldest(PAYLOAD_MAX) else {
            return;
        };
        let event = match entry.payload.and_then(|p| wire(&p)) {
            Ok(w) => {
                let t = &self.topics;
                let mut messages = vec![
                    Message::new(&t.events, false, w.attrs.clone()),
                    Message::new(&t.state, true, w.state.clone()),
                    Message::new(&t.attributes, true, w.attrs.clone()),
                    Message::new(&t.scan, false, w.event),
                ];
                if let Some(jpeg_b64) = w.image {
                    messages.push(Message::new(&t.poster, true, jpeg_b64));
                }
                let n = messages.len();
                self.head = Some(HeadWire {
                    seq: entry.seq,
                    messages,
                    state: (w.state, w.attrs),
                });
                Event::Head {
                    seq: entry.seq,
                    messages: n,
                }
            }
            Err(reason) => Event::RecordTooBig {
                seq: entry.seq,
                reason,
            },
        };
        let actions = self.delivery.on(event);
        self.carry_out(actions);
    }

    /// Makes one request and tells `Delivery` whether rumqttc's queue took it.
    fn send(&mut self, tag: Tag) {
        let t = &self.topics;
        let qos = QoS::AtLeastOnce;
        let taken = match tag {
            Tag::Entry { seq, index } => {
                match self
                    .head
                    .as_ref()
                    .filter(|h| h.seq == seq)
                    .map(|h| &h.messages[index])
                {
                    Some(m) => self
                        .client
                        .try_publish(&m.topic, qos, m.retain, m.payload.clone())
                        .is_ok(),
                    None => return,
                }
            }
            Tag::Control(c) => match c {
                Control::ClearCommand => self
                    .client
                    .try_publish(&t.cmd_overview, qos, true, Vec::new())
                    .is_ok(),
                Control::Subscribe => {
                    self.client.try_subscribe(&t.cmd_overview, qos).is_ok()
                        && self.client.try_subscribe(&t.ha_status, qos).is_ok()
                }
                Control::Online => self
                    .client
                    .try_publish(&t.availability, qos, true, b"online".to_vec())
                    .is_ok(),
                Control::Discovery => self
                    .client
                    .try_publish(&t.discovery, qos, true, self.discovery.clone().into_bytes())
                    .is_ok(),
                Control::State | Control::Attributes => {
                    let Some((state, attrs)) = &self.last_state else {
                        return;
                    };
                    let (topic, payload) = if c == Control::State {
                        (&t.state, state)
                    } else {
                        (&t.attributes, attrs)
                    };
                    self.client
                        .try_publish(topic, qos, true, payload.clone().into_bytes())
                        .is_ok()
                }
                Control::Overview => {
                    let now = self.overview.peek();
                    // Home Assistant refuses a text entity's state over 255 characters.
                    let payload = clip(now.as_deref().unwrap_or_default(), STATE_MAX).into_bytes();
                    let ok = self
                        .client
                        .try_publish(&t.overview_state, qos, true, payload)
                        .is_ok();
                    if ok {
                        self.overview_shown = Some(now);
                    }
                    ok
                }
            },
            Tag::Stats | Tag::Offline => return,
        };
        let event = if taken {
            Event::Queued(tag)
        } else {
            Event::QueueFull(tag)
        };
        self.delivery.on(event);
    }

    fn publish_stats(&mut self) {
        let stats = self
            .health
            .stats_json(self.outbox.len(), self.backlog.pending());
        if self
            .client
            .try_publish(
                &self.topics.stats,
                QoS::AtMostOnce,
                false,
                stats.into_bytes(),
            )
            .is_ok()
        {
            self.delivery.on(Event::Queued(Tag::Stats));
        }
    }

    fn handle(&mut self, event: Result<rumqttc::Event, ConnectionError>) -> Step {
        use rumqttc::Event::{Incoming, Outgoing as Out};
        let ev = match event {
            Ok(Incoming(Packet::ConnAck(c))) => {
                self.overview_shown = None;
                self.health.set_broker(true, "connected");
                tracing::info!("mqtt: connected");
                Event::ConnAck {
                    session_present: c.session_present,
                }
            }
            Ok(Out(Outgoing::Publish(pkid))) => Event::Outgoing { pkid },
            Ok(Incoming(Packet::PubAck(ack))) => Event::PubAck { pkid: ack.pkid },
            Ok(Incoming(Packet::Publish(p))) => {
                self.command(&p);
                return Step::Continue;
            }
            Ok(_) => return Step::Continue,
            Err(ConnectionError::RequestsDone) => return Step::Closed,
            Err(e) => return Step::Lost(e.to_string()),
        };
        let actions = self.delivery.on(ev);
        self.carry_out(actions);
        Step::Continue
    }

    /// rumqttc drops what was requested on a lost clean-session connection; the
    /// head goes out again after the next ConnAck.
    fn lost(&mut self, why: &str) {
        self.delivery.on(Event::ConnectionLost);
        self.health.set_broker(false, why);
    }

    /// "Connected" means acknowledgements flow, not just that a socket is open.
    fn watch_acks(&self) {
        if let Some(w) = self.delivery.waiting(Instant::now())
            && w >= ACK_STALL
        {
            self.health.set_broker(
                false,
                &format!("connected, but no acknowledgement for {} s", w.as_secs()),
            );
        }
    }

    fn command(&mut self, p: &rumqttc::Publish) {
        // A retained command is old news: never act on it.
        if p.retain {
            return;
        }
        if p.topic == self.topics.cmd_overview {
            let text = String::from_utf8_lossy(&p.payload);
            let text = clip(text.trim(), COMMAND_MAX_CHARS);
            tracing::info!("overview for the next scan received over MQTT");
            self.overview.set(Some(text).filter(|s| !s.is_empty()));
        } else if p.topic == self.topics.ha_status && p.payload.trim_ascii() == b"online" {
            self.delivery.on(Event::DiscoveryWanted);
        }
    }

    /// Publishes `offline` and waits briefly for its acknowledgement, then disconnects.
    fn go_offline(&mut self) {
        if self.delivery.connected()
            && self
                .client
                .try_publish(
                    &self.topics.availability,
                    QoS::AtLeastOnce,
                    true,
                    b"offline".to_vec(),
                )
                .is_ok()
        {
            self.delivery.on(Event::Queued(Tag::Offline));
            let deadline = Instant::now() + OFFLINE_TIMEOUT;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.connection.recv_timeout(left.min(TICK)) {
                    Ok(Ok(rumqttc::Event::Incoming(Packet::PubAck(ack))))
                        if self.delivery.awaits(ack.pkid) == Some(Tag::Offline) =>
                    {
                        break;
                    }
                    Ok(Ok(rumqttc::Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        self.delivery.on(Event::Outgoing { pkid });
                    }
                    Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => break,
                    _ => {}
                }
            }
        }
        let _ = self.client.try_disconnect();
        let _ = self.connection.recv_timeout(TICK);
    }
}

impl Message {
    fn new(topic: &str, retain: bool, payload: String) -> Self {
        Self {
            topic: topic.to_string(),
            retain,
            payload: payload.into_bytes(),
        }
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

/// An outbox record as read back: the result, and its thumbnail.
#[derive(serde::Deserialize)]
struct Stored {
    #[serde(flatten)]
    result: ScanResult,
    #[serde(default)]
    thumbnail_jpeg_b64: Option<String>,
}

fn wire(payload: &[u8]) -> Result<Wire, String> {
    if payload.len() > PAYLOAD_MAX {
        return Err(format!(
            "result is {} bytes, over the {PAYLOAD_MAX}-byte payload budget",
            payload.len()
        ));
    }
    let Stored {
        result: r,
        thumbnail_jpeg_b64,
    } = serde_json::from_slice(payload).map_err(|e| format!("unreadable outbox record: {e}"))?;
    let top = r.genres.iter().max_by(|a, b| a.score.total_cmp(&b.score));
    let event = serde_json::json!({
        "event_type": "scanned",
        "predicted": r.predicted,
        "top_genre": top.map(|g| g.label.as_str()),
        "top_score": top.map(|g| g.score),
        "caption": r.caption,
        "source": r.source,
        "name": r.name,
        "id": r.id,
    })
    .to_string();
    Ok(Wire {
        state: state_payload(&r.predicted),
        // The thumbnail is not a field of the result: the attributes go without it.
        attrs: serde_json::to_string(&r).map_err(|e| format!("unwritable result: {e}"))?,
        event,
        image: thumbnail_jpeg_b64.filter(|s| !s.is_empty()),
    })
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
        let ok = br#"{"id":"x","timestamp":"2026-12-05T00:00:00Z","source":"folder","name":"a.jpg",
            "caption":null,"caption_status":"none: captioning is off","overview":null,
            "genres":[{"label":"Drama","score":0.9},{"label":"Crime","score":0.7}],
            "predicted":["Drama","Crime"],"timings_ms":{"total":1.0},"thumbnail_jpeg_b64":"AAAA"}"#;
        let w = wire(ok).unwrap();
        assert_eq!(w.state, "Drama, Crime");
        assert_eq!(w.image.as_deref(), Some("AAAA"));
        assert!(!w.attrs.contains("thumbnail"), "{}", w.attrs);
        assert!(w.event.contains(r#""top_genre":"Drama""#), "{}", w.event);
        let partial = br#"{"predicted":["Drama"],"id":"x"}"#;
        assert!(wire(partial).unwrap_err().contains("unreadable"));
        assert!(wire(b"{not json").unwrap_err().contains("unreadable"));
        let big = format!(
            r#"{{"predicted":[],"overview":"{}"}}"#,
            "a".repeat(PAYLOAD_MAX)
        );
        assert!(wire(big.as_bytes()).unwrap_err().contains("budget"));
    }
}
