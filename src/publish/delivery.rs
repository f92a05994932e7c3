//! MQTT delivery as pure state: events in, actions out, no I/O (the session in
//! `mqtt.rs` does the I/O and feeds every event here).
//!
//! Design note.
//! - One outbox entry is on the wire at a time (the head). Its messages are
//!   requested one by one; when rumqttc's bounded request queue is full, the head
//!   waits where it is and goes on with the next message once the queue moves. A
//!   message is never requested twice on one connection, so a full queue can never
//!   fill it with the head's own repeats (the duplicate storm of issue #30).
//! - On a clean-session reconnect rumqttc drops everything unacknowledged, so the
//!   head is requested again from its first message after the next ConnAck
//!   (at-least-once: a message the broker took just before the link died arrives
//!   twice, never zero times). With a session present, rumqttc replays its own
//!   in-flight publishes and nothing is requested again.
//! - Control messages (availability, discovery, the last state, the overview state)
//!   are flags, not a queue: a flood of Home Assistant `online` or overview
//!   commands sets a flag that is already set, and each control has at most one
//!   publish awaiting its PubAck. The head can always get into the queue.
//! - A connection that takes publishes but acknowledges none for `ACK_DEADLINE` is
//!   dropped and made again: a broker that answers pings but never PubAcks cannot
//!   hold the outbox for good.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// No PubAck for this long while publishes are outstanding: reconnect.
pub const ACK_DEADLINE: Duration = Duration::from_secs(30);

/// The messages that are not outbox entries, in the order they go out after a
/// ConnAck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Control {
    /// An empty retained message on our own command topic, sent before we
    /// subscribe: a retained command is never acted on, and one too large for the
    /// client would otherwise be re-sent on every subscribe and drop every connection.
    ClearCommand,
    /// The command and Home Assistant status subscriptions (not a publish).
    Subscribe,
    /// `online` on the availability topic.
    Online,
    /// The Home Assistant discovery document.
    Discovery,
    /// The last delivered state (retained), re-sent on reconnect.
    State,
    /// The last delivered attributes (retained), re-sent on reconnect.
    Attributes,
    /// The overview waiting for the next scan (retained).
    Overview,
}

/// What a request carries, so that its PubAck can be credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// Message `index` of outbox entry `seq`.
    Entry {
        /// The entry's outbox number.
        seq: u64,
        /// Which of its publishes.
        index: usize,
    },
    /// One of the session's own messages (discovery, state, availability, ...).
    Control(Control),
    /// QoS 0 statistics: never acknowledged.
    Stats,
    /// `offline` at shutdown.
    Offline,
}

/// What happened, as the session saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the connection.
    ConnAck {
        /// The broker kept the session (never, with a clean session).
        session_present: bool,
    },
    /// The session read the oldest outbox entry: `messages` publishes make it.
    Head {
        /// The entry's outbox number.
        seq: u64,
        /// How many publishes it makes.
        messages: usize,
    },
    /// The oldest outbox entry can never go out (unreadable, or over the budget).
    RecordTooBig {
        /// The entry's outbox number.
        seq: u64,
        /// Why it cannot go out.
        reason: String,
    },
    /// rumqttc's queue took the request.
    Queued(Tag),
    /// rumqttc's queue was full: the request was not made.
    QueueFull(Tag),
    /// rumqttc wrote the oldest requested publish with this packet id (0: QoS 0).
    Outgoing {
        /// The packet id rumqttc gave it.
        pkid: u16,
    },
    /// The broker acknowledged packet `pkid`.
    PubAck {
        /// The acknowledged packet id.
        pkid: u16,
    },
    /// Home Assistant came online: it wants the discovery document again.
    DiscoveryWanted,
    /// The overview waiting for the next scan changed.
    OverviewChanged,
    /// The connection failed or was dropped.
    ConnectionLost,
    /// Time passed (the deadline checks).
    Tick {
        /// The time now.
        now: Instant,
    },
}

/// What the session must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Request this publish (or subscription), then report `Queued` or `QueueFull`.
    Send(Tag),
    /// Every message of entry `seq` is acknowledged: remove it from the outbox.
    Delivered {
        /// The entry's outbox number.
        seq: u64,
    },
    /// Entry `seq` can never go out: move it to the dead-letter folder.
    DeadLetter {
        /// The entry's outbox number.
        seq: u64,
        /// Why, for the dead-letter file.
        reason: String,
    },
    /// Drop this connection and make a new one.
    Reconnect {
        /// Why, for the log and the broker's health line.
        reason: String,
    },
}

/// The outbox entry on the wire.
#[derive(Debug)]
struct Head {
    seq: u64,
    messages: usize,
    /// Messages requested on this connection (the next one to request).
    next: usize,
    /// Requested and not yet acknowledged.
    unacked: usize,
}

/// The delivery state of one MQTT client.
#[derive(Debug)]
pub struct Delivery {
    connected: bool,
    /// The queue refused a request; nothing more is asked until it moves.
    full: bool,
    /// Publishes requested and not yet seen going out, in order.
    requested: VecDeque<Tag>,
    /// QoS 1 publishes gone out and not yet acknowledged, by packet id.
    by_pkid: HashMap<u16, Tag>,
    head: Option<Head>,
    /// Controls still to request on this connection.
    due: BTreeSet<Control>,
    /// Controls requested and not yet acknowledged.
    in_flight: BTreeSet<Control>,
    /// Whether an entry was ever delivered (then its state is re-sent on ConnAck).
    has_state: bool,
    /// The last sign of progress: a ConnAck or a PubAck.
    progress: Instant,
}

impl Delivery {
    /// A session state before the first connection.
    pub fn new(now: Instant) -> Self {
        Self {
            connected: false,
            full: false,
            requested: VecDeque::new(),
            by_pkid: HashMap::new(),
            head: None,
            due: BTreeSet::new(),
            in_flight: BTreeSet::new(),
            has_state: false,
            progress: now,
        }
    }

    /// Whether the broker has accepted the connection.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Whether the session should read the oldest outbox entry now.
    pub fn wants_head(&self) -> bool {
        self.connected && self.head.is_none()
    }

    /// How long the oldest outstanding publish has waited for progress, if any.
    pub fn waiting(&self, now: Instant) -> Option<Duration> {
        let outstanding =
            !self.by_pkid.is_empty() || self.requested.iter().any(|t| !matches!(t, Tag::Stats));
        outstanding.then(|| now.saturating_duration_since(self.progress))
    }

    /// The packet id's tag, if that publish still awaits its PubAck (shutdown).
    pub fn awaits(&self, pkid: u16) -> Option<Tag> {
        self.by_pkid.get(&pkid).copied()
    }

    /// Turns one event into the actions it calls for.
    pub fn on(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::ConnAck { session_present } => {
                self.connected = true;
                self.full = false;
                self.progress = Instant::now();
                if !session_present {
                    self.forget_connection();
                }
                self.due.extend([
                    Control::ClearCommand,
                    Control::Subscribe,
                    Control::Online,
                    Control::Discovery,
                    Control::Overview,
                ]);
                if self.has_state {
                    self.due.extend([Control::State, Control::Attributes]);
                }
                Vec::new()
            }
            Event::Head { seq, messages } => {
                if self.head.is_none() && messages > 0 {
                    self.head = Some(Head {
                        seq,
                        messages,
                        next: 0,
                        unacked: 0,
                    });
                }
                Vec::new()
            }
            Event::RecordTooBig { seq, reason } => vec![Action::DeadLetter { seq, reason }],
            Event::Queued(tag) => {
                match tag {
                    Tag::Control(Control::Subscribe) => {}
                    Tag::Control(c) => {
                        self.in_flight.insert(c);
                        self.requested.push_back(tag);
                    }
                    _ => self.requested.push_back(tag),
                }
                Vec::new()
            }
            Event::QueueFull(tag) => {
                self.full = true;
                match tag {
                    Tag::Entry { seq, index } => {
                        if let Some(h) = self.head.as_mut().filter(|h| h.seq == seq) {
                            h.next = h.next.min(index);
                            h.unacked = h.unacked.saturating_sub(1);
                        }
                    }
                    Tag::Control(c) => {
                        self.due.insert(c);
                    }
                    Tag::Stats | Tag::Offline => {}
                }
                Vec::new()
            }
            Event::Outgoing { pkid } => {
                self.full = false;
                let tag = self.requested.pop_front();
                match (tag, pkid) {
                    (Some(tag), 0) => self.settle(tag),
                    (Some(tag), pkid) => {
                        self.by_pkid.insert(pkid, tag);
                        Vec::new()
                    }
                    (None, _) => Vec::new(),
                }
            }
            Event::PubAck { pkid } => match self.by_pkid.remove(&pkid) {
                Some(tag) => {
                    self.progress = Instant::now();
                    self.settle(tag)
                }
                None => Vec::new(),
            },
            Event::DiscoveryWanted => {
                if self.connected {
                    self.due.insert(Control::Discovery);
                }
                Vec::new()
            }
            Event::OverviewChanged => {
                if self.connected {
                    self.due.insert(Control::Overview);
                }
                Vec::new()
            }
            Event::ConnectionLost => {
                self.connected = false;
                self.forget_connection();
                Vec::new()
            }
            Event::Tick { now } => {
                self.full = false;
                match self.waiting(now).filter(|w| *w >= ACK_DEADLINE) {
                    Some(w) if self.connected => vec![Action::Reconnect {
                        reason: format!("no acknowledgement for {} s", w.as_secs()),
                    }],
                    _ => Vec::new(),
                }
            }
        }
    }

    /// The next request to make, if any: controls first (each at most once in
    /// flight), then the head's next message. `None` while disconnected or while
    /// the queue is full.
    pub fn next_request(&mut self) -> Option<Action> {
        if !self.connected || self.full {
            return None;
        }
        if let Some(c) = self
            .due
            .iter()
            .copied()
            .find(|c| !self.in_flight.contains(c))
        {
            self.due.remove(&c);
            return Some(Action::Send(Tag::Control(c)));
        }
        let h = self.head.as_mut()?;
        if h.next >= h.messages {
            return None;
        }
        let tag = Tag::Entry {
            seq: h.seq,
            index: h.next,
        };
        h.next += 1;
        h.unacked += 1;
        Some(Action::Send(tag))
    }

    /// A publish is done (acknowledged, or QoS 0 gone out).
    fn settle(&mut self, tag: Tag) -> Vec<Action> {
        match tag {
            Tag::Control(c) => {
                self.in_flight.remove(&c);
                Vec::new()
            }
            Tag::Entry { seq, .. } => {
                let Some(h) = self.head.as_mut().filter(|h| h.seq == seq) else {
                    return Vec::new();
                };
                h.unacked = h.unacked.saturating_sub(1);
                if h.unacked == 0 && h.next >= h.messages {
                    self.head = None;
                    self.has_state = true;
                    vec![Action::Delivered { seq }]
                } else {
                    Vec::new()
                }
            }
            Tag::Stats | Tag::Offline => Vec::new(),
        }
    }

    /// What was requested on a connection without a session is gone: the head
    /// starts again from its first message, the controls are due again.
    fn forget_connection(&mut self) {
        self.requested.clear();
        self.by_pkid.clear();
        self.in_flight.clear();
        self.due.clear();
        if let Some(h) = self.head.as_mut() {
            h.next = 0;
            h.unacked = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected() -> Delivery {
        let mut d = Delivery::new(Instant::now());
        d.on(Event::ConnAck {
            session_present: false,
        });
        drain_controls(&mut d);
        d
    }

    /// Requests every due control and has it go out and be acknowledged; an entry
    /// offered meanwhile is handed back (as a full queue would).
    fn drain_controls(d: &mut Delivery) {
        let mut pkid = 60_000;
        while let Some(Action::Send(tag)) = d.next_request() {
            let Tag::Control(c) = tag else {
                d.on(Event::QueueFull(tag));
                d.on(Event::Tick {
                    now: Instant::now(),
                });
                break;
            };
            d.on(Event::Queued(tag));
            if c != Control::Subscribe {
                pkid += 1;
                d.on(Event::Outgoing { pkid });
                d.on(Event::PubAck { pkid });
            }
        }
    }

    /// Requests and queues everything `next` offers; returns the tags.
    fn send_all(d: &mut Delivery) -> Vec<Tag> {
        let mut out = Vec::new();
        while let Some(Action::Send(tag)) = d.next_request() {
            d.on(Event::Queued(tag));
            out.push(tag);
        }
        out
    }

    fn entry(seq: u64, index: usize) -> Tag {
        Tag::Entry { seq, index }
    }

    #[test]
    fn nothing_is_sent_before_a_connack() {
        let mut d = Delivery::new(Instant::now());
        d.on(Event::Head {
            seq: 1,
            messages: 4,
        });
        assert!(!d.wants_head());
        assert_eq!(d.next_request(), None);
    }

    #[test]
    fn connack_without_a_session_sends_the_controls_in_order_then_the_head() {
        let mut d = Delivery::new(Instant::now());
        d.on(Event::ConnAck {
            session_present: false,
        });
        assert!(d.wants_head());
        d.on(Event::Head {
            seq: 7,
            messages: 2,
        });
        let tags = send_all(&mut d);
        assert_eq!(
            tags,
            [
                Tag::Control(Control::ClearCommand),
                Tag::Control(Control::Subscribe),
                Tag::Control(Control::Online),
                Tag::Control(Control::Discovery),
                Tag::Control(Control::Overview),
                entry(7, 0),
                entry(7, 1),
            ]
        );
    }

    #[test]
    fn an_entry_is_delivered_when_every_message_is_acked() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 3,
            messages: 3,
        });
        send_all(&mut d);
        for pkid in 1..=3 {
            assert!(d.on(Event::Outgoing { pkid }).is_empty());
        }
        assert!(d.on(Event::PubAck { pkid: 1 }).is_empty());
        assert!(d.on(Event::PubAck { pkid: 3 }).is_empty());
        assert_eq!(
            d.on(Event::PubAck { pkid: 2 }),
            [Action::Delivered { seq: 3 }]
        );
        assert!(d.wants_head());
        // The next ConnAck re-sends the delivered state.
        d.on(Event::ConnectionLost);
        d.on(Event::ConnAck {
            session_present: false,
        });
        let tags = send_all(&mut d);
        assert!(tags.contains(&Tag::Control(Control::State)));
        assert!(tags.contains(&Tag::Control(Control::Attributes)));
    }

    #[test]
    fn a_full_queue_resumes_where_it_stopped_and_never_repeats_a_message() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 5,
            messages: 4,
        });
        assert_eq!(d.next_request(), Some(Action::Send(entry(5, 0))));
        d.on(Event::Queued(entry(5, 0)));
        assert_eq!(d.next_request(), Some(Action::Send(entry(5, 1))));
        d.on(Event::QueueFull(entry(5, 1)));
        assert_eq!(
            d.next_request(),
            None,
            "nothing asked while the queue is full"
        );
        // Many ticks with the queue still full: the head never starts again.
        for _ in 0..100 {
            d.on(Event::Tick {
                now: Instant::now(),
            });
            match d.next_request() {
                Some(Action::Send(t)) => {
                    assert_eq!(t, entry(5, 1));
                    d.on(Event::QueueFull(t));
                }
                other => panic!("{other:?}"),
            }
        }
        d.on(Event::Outgoing { pkid: 1 });
        let tags = send_all(&mut d);
        assert_eq!(tags, [entry(5, 1), entry(5, 2), entry(5, 3)]);
        assert_eq!(d.next_request(), None, "each message requested once");
    }

    #[test]
    fn a_lost_connection_starts_the_head_again_after_the_next_connack() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 9,
            messages: 2,
        });
        send_all(&mut d);
        d.on(Event::Outgoing { pkid: 1 });
        d.on(Event::PubAck { pkid: 1 });
        d.on(Event::ConnectionLost);
        assert_eq!(d.next_request(), None);
        // A late PubAck of the old connection credits nothing.
        assert!(d.on(Event::PubAck { pkid: 2 }).is_empty());
        d.on(Event::ConnAck {
            session_present: false,
        });
        drain_controls(&mut d);
        assert_eq!(send_all(&mut d), [entry(9, 0), entry(9, 1)]);
    }

    #[test]
    fn connack_with_a_session_keeps_what_is_in_flight() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 2,
            messages: 2,
        });
        send_all(&mut d);
        d.on(Event::Outgoing { pkid: 1 });
        d.on(Event::Outgoing { pkid: 2 });
        d.on(Event::ConnAck {
            session_present: true,
        });
        drain_controls(&mut d);
        assert_eq!(d.next_request(), None, "rumqttc replays its own publishes");
        d.on(Event::PubAck { pkid: 1 });
        assert_eq!(
            d.on(Event::PubAck { pkid: 2 }),
            [Action::Delivered { seq: 2 }]
        );
    }

    #[test]
    fn a_flood_of_discovery_requests_keeps_one_in_flight() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 1,
            messages: 1,
        });
        let mut sent = 0;
        for _ in 0..5000 {
            d.on(Event::DiscoveryWanted);
            d.on(Event::OverviewChanged);
            while let Some(Action::Send(t)) = d.next_request() {
                d.on(Event::Queued(t));
                sent += 1;
            }
        }
        // Discovery, the overview and the head: one each until acknowledged.
        assert_eq!(sent, 3);
        for pkid in 1..=3 {
            d.on(Event::Outgoing { pkid });
        }
        let delivered: Vec<_> = (1..=3)
            .flat_map(|pkid| d.on(Event::PubAck { pkid }))
            .collect();
        assert_eq!(delivered, [Action::Delivered { seq: 1 }]);
        // Wanted again while in flight: sent once more after the ack.
        assert_eq!(
            send_all(&mut d),
            [
                Tag::Control(Control::Discovery),
                Tag::Control(Control::Overview)
            ]
        );
    }

    #[test]
    fn a_control_refused_by_a_full_queue_stays_due() {
        let mut d = connected();
        d.on(Event::DiscoveryWanted);
        assert_eq!(
            d.next_request(),
            Some(Action::Send(Tag::Control(Control::Discovery)))
        );
        d.on(Event::QueueFull(Tag::Control(Control::Discovery)));
        d.on(Event::Outgoing { pkid: 0 });
        assert_eq!(
            d.next_request(),
            Some(Action::Send(Tag::Control(Control::Discovery)))
        );
    }

    #[test]
    fn an_unsendable_record_is_dead_lettered() {
        let mut d = connected();
        assert_eq!(
            d.on(Event::RecordTooBig {
                seq: 4,
                reason: "too big".into()
            }),
            [Action::DeadLetter {
                seq: 4,
                reason: "too big".into()
            }]
        );
        assert!(d.wants_head());
    }

    #[test]
    fn no_ack_within_the_deadline_reconnects() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 1,
            messages: 1,
        });
        send_all(&mut d);
        d.on(Event::Outgoing { pkid: 1 });
        let start = Instant::now();
        assert!(d.on(Event::Tick { now: start }).is_empty());
        let late = start + ACK_DEADLINE + Duration::from_secs(1);
        assert!(matches!(
            d.on(Event::Tick { now: late })[..],
            [Action::Reconnect { .. }]
        ));
        // Nothing outstanding: no deadline.
        let mut idle = connected();
        assert!(idle.on(Event::Tick { now: late }).is_empty());
    }

    #[test]
    fn qos0_stats_settle_when_they_go_out() {
        let mut d = connected();
        d.on(Event::Queued(Tag::Stats));
        assert!(d.waiting(Instant::now()).is_none(), "stats never wait");
        d.on(Event::Outgoing { pkid: 0 });
        assert!(d.requested.is_empty());
    }

    #[test]
    fn a_late_head_event_never_replaces_the_head_on_the_wire() {
        let mut d = connected();
        d.on(Event::Head {
            seq: 1,
            messages: 2,
        });
        send_all(&mut d);
        d.on(Event::Head {
            seq: 2,
            messages: 2,
        });
        d.on(Event::Outgoing { pkid: 1 });
        d.on(Event::Outgoing { pkid: 2 });
        d.on(Event::PubAck { pkid: 1 });
        assert_eq!(
            d.on(Event::PubAck { pkid: 2 }),
            [Action::Delivered { seq: 1 }]
        );
    }
}
