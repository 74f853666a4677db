//! A deterministic harness that steps a [`Supervisor`] against a scripted broker
//! with a virtual clock (quinn's `Pair`, firezone's advance-until-quiet).
//!
//! The "world" answers commands after a fixed latency: dials succeed while the
//! broker is up and fail with an I/O error while it is down; channel opens succeed
//! while their connection is alive. Faults are injected by the test through
//! [`World`] methods.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rebound_core::{
    AckKind, ChannelId, ChannelInput, ChannelState, Command, Config, ConnectionId, ConnectionState,
    ConsumeOptions, ConsumerId, Delivery, Event, Input, Message, Properties, QueueRef, Supervisor,
    TopologyOp, TransportError, endpoint::parse_hosts,
};

/// How long every simulated transport operation takes.
pub const LATENCY: Duration = Duration::from_millis(2);

/// A pending answer to a command, due at a virtual time.
#[derive(Debug, Clone)]
enum Pending {
    Dial {
        connection: ConnectionId,
        epoch: u64,
        /// The host's refusal, if it refuses.
        refusal: Option<TransportError>,
    },
    Open {
        channel: ChannelId,
        generation: u64,
        epoch: u64,
    },
    Close {
        connection: ConnectionId,
        epoch: u64,
    },
    Confirm {
        channel: ChannelId,
        generation: u64,
        seq: u64,
    },
    Topology {
        channel: ChannelId,
        generation: u64,
        op: TopologyOp,
    },
}

/// A publish the broker got: (seq, message).
pub type Sent = (u64, Arc<Message>);

pub struct World {
    pub sup: Supervisor,
    pub start: Instant,
    pub now: Instant,
    /// Every command and event, stamped with virtual milliseconds.
    pub trace: String,
    pub commands: Vec<(Duration, Command)>,
    pub events: Vec<(Duration, Event)>,
    /// Commands and events interleaved as they came: (is a command, index).
    pub order: Vec<(bool, usize)>,
    /// Whether dials succeed.
    pub broker_up: bool,
    /// Dials fail with this error while set (for example 403).
    pub refuse_with: Option<TransportError>,
    /// Dials never answer while set (a blackholed host).
    pub blackhole: bool,
    /// Dials to these hosts never answer (a paused node among good ones).
    pub silent_hosts: BTreeSet<String>,
    /// Dials to these hosts fail with the error, after the delay (a slow refusal:
    /// a handshake that fails late).
    pub refusing_hosts: BTreeMap<String, (TransportError, Duration)>,
    /// Live transport connections: slot -> epoch.
    pub live: BTreeMap<ConnectionId, u64>,
    /// Live transport channels: slot -> generation.
    pub live_chans: BTreeMap<ChannelId, u64>,
    /// Published, not yet confirmed, per live channel generation: (seq, message).
    pub unconfirmed: BTreeMap<(ChannelId, u64), Vec<Sent>>,
    /// Confirm every publish after LATENCY.
    pub auto_confirm: bool,
    /// Payloads the broker confirmed (stored).
    pub stored: Vec<bytes::Bytes>,
    /// Broken rules seen at the "broker" (stale acks, seq gaps): must stay empty.
    pub violations: Vec<String>,
    /// Delivered, unacked tags per channel generation.
    pub delivered: BTreeMap<(ChannelId, u64), BTreeSet<u64>>,
    next_delivery: BTreeMap<(ChannelId, u64), u64>,
    /// Every topology op the broker ran, with its channel.
    pub topology_log: Vec<(ChannelId, TopologyOp)>,
    /// The next topology op fails with this error (the channel closes).
    pub fail_topology: Option<TransportError>,
    /// Every basic.consume fails with this error (the channel closes) while set.
    pub fail_consume: Option<TransportError>,
    /// Every queue.declare of this name fails with this error (the channel
    /// closes) while set.
    pub fail_declare: Option<(String, TransportError)>,
    server_named: u64,
    pending: Vec<(Instant, u64, Pending)>,
    seq: u64,
}

pub fn config(connections: usize, channels: usize, seed: u64) -> Config {
    let hosts = parse_hosts([
        "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f",
        "amqp://guest:s3cr3t-pw@127.0.0.2:5672/%2f",
    ])
    .expect("valid hosts");
    let mut config = Config::new(hosts);
    config.connections = connections;
    config.channels_per_connection = channels;
    config.seed = seed;
    config
}

impl World {
    pub fn new(config: Config) -> World {
        World::new_with(config, |_| {})
    }

    /// A world that `setup` configures before the first dials go out.
    pub fn new_with(config: Config, setup: impl FnOnce(&mut World)) -> World {
        #[allow(clippy::disallowed_methods)] // the harness owns the clock, not the machine
        let start = Instant::now();
        let sup = Supervisor::new(config, start).expect("valid config");
        let mut world = World {
            sup,
            start,
            now: start,
            trace: String::new(),
            commands: Vec::new(),
            events: Vec::new(),
            order: Vec::new(),
            broker_up: true,
            refuse_with: None,
            blackhole: false,
            silent_hosts: BTreeSet::new(),
            refusing_hosts: BTreeMap::new(),
            live: BTreeMap::new(),
            live_chans: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
            auto_confirm: true,
            stored: Vec::new(),
            violations: Vec::new(),
            delivered: BTreeMap::new(),
            next_delivery: BTreeMap::new(),
            topology_log: Vec::new(),
            fail_topology: None,
            fail_consume: None,
            fail_declare: None,
            server_named: 0,
            pending: Vec::new(),
            seq: 0,
        };
        setup(&mut world);
        world.drain();
        world
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Feeds one input now and drains the outputs.
    pub fn input(&mut self, input: Input) {
        let _ = writeln!(self.trace, "{:>8?} < {input:?}", self.elapsed());
        self.sup.handle(self.now, input);
        self.drain();
    }

    fn drain(&mut self) {
        let at = self.elapsed();
        while let Some(command) = self.sup.poll_command() {
            let _ = writeln!(self.trace, "{at:>8?} > {command:?}");
            let mut due = self.now + LATENCY;
            if let Command::Dial { endpoint, .. } = &command
                && let Some((_, delay)) = self.refusing_hosts.get(endpoint.host())
            {
                due = self.now + *delay;
            }
            let pending = match &command {
                Command::Dial { endpoint, .. } if self.silent_hosts.contains(endpoint.host()) => {
                    None
                }
                Command::Dial {
                    connection,
                    epoch,
                    endpoint,
                } => Some(Pending::Dial {
                    connection: *connection,
                    epoch: *epoch,
                    refusal: self
                        .refusing_hosts
                        .get(endpoint.host())
                        .map(|(error, _)| error.clone()),
                }),
                Command::OpenChannel {
                    channel,
                    epoch,
                    generation,
                } => Some(Pending::Open {
                    channel: *channel,
                    generation: *generation,
                    epoch: *epoch,
                }),
                Command::CloseConnection { connection, epoch } => Some(Pending::Close {
                    connection: *connection,
                    epoch: *epoch,
                }),
                Command::Publish {
                    channel,
                    generation,
                    seq,
                    message,
                } => self.on_publish(*channel, *generation, *seq, message),
                Command::Topology {
                    channel,
                    generation,
                    op,
                } => Some(Pending::Topology {
                    channel: *channel,
                    generation: *generation,
                    op: op.clone(),
                }),
                Command::Ack {
                    channel,
                    generation,
                    delivery_tag,
                    kind,
                } => {
                    self.on_ack(*channel, *generation, *delivery_tag, *kind);
                    None
                }
                _ => None,
            };
            if let Some(p) = pending {
                self.seq += 1;
                self.pending.push((due, self.seq, p));
            }
            self.order.push((true, self.commands.len()));
            self.commands.push((at, command));
        }
        while let Some(event) = self.sup.poll_event() {
            let _ = writeln!(self.trace, "{at:>8?} ! {event:?}");
            self.order.push((false, self.events.len()));
            self.events.push((at, event));
        }
    }

    /// The next moment something happens: a pending answer or a timer.
    fn next_wake(&self) -> Option<Instant> {
        let answer = self.pending.iter().map(|(at, _, _)| *at).min();
        match (answer, self.sup.poll_timeout()) {
            (Some(a), Some(t)) => Some(a.min(t)),
            (a, t) => a.or(t),
        }
    }

    /// Runs the world until `deadline` (virtual), answering commands and firing
    /// timers in time order.
    pub fn run_until(&mut self, deadline: Instant) {
        let mut steps = 0u32;
        while let Some(wake) = self.next_wake() {
            if wake > deadline {
                break;
            }
            steps += 1;
            assert!(steps < 1_000_000, "no progress: a hot loop in the machine");
            self.now = self.now.max(wake);
            // answers due now, in the order the commands were issued
            self.pending.sort_by_key(|(at, seq, _)| (*at, *seq));
            let due: Vec<_> = self
                .pending
                .iter()
                .take_while(|(at, _, _)| *at <= self.now)
                .cloned()
                .collect();
            self.pending.drain(..due.len());
            for (_, _, p) in due {
                self.answer(p);
            }
            if self.sup.poll_timeout().is_some_and(|t| t <= self.now) {
                self.input(Input::Timeout);
            }
        }
        self.now = self.now.max(deadline);
    }

    pub fn run_for(&mut self, d: Duration) {
        let deadline = self.now + d;
        self.run_until(deadline);
    }

    /// Runs until every channel is Ready, or `limit` passes; returns the time taken.
    pub fn run_until_ready(&mut self, limit: Duration) -> Option<Duration> {
        let from = self.now;
        let deadline = self.now + limit;
        loop {
            if self.sup.is_all_ready() {
                return Some(self.now - from);
            }
            let wake = self.next_wake()?;
            if wake > deadline {
                return None;
            }
            self.run_until(wake);
        }
    }

    fn on_publish(
        &mut self,
        channel: ChannelId,
        generation: u64,
        seq: u64,
        message: &Arc<Message>,
    ) -> Option<Pending> {
        // only Ready channels of unblocked connections carry messages
        if !self.sup.is_closed() {
            let state = self.sup.channel_state(channel);
            let conn = self.sup.connection_state(channel.connection);
            if state != Some(ChannelState::Ready)
                || !conn.is_some_and(ConnectionState::is_sendable)
                || self.sup.channel_generation(channel) != Some(generation)
            {
                self.violations.push(format!(
                    "{channel} gen {generation}: published while {state:?} on {conn:?}"
                ));
            }
        }
        if self.live_chans.get(&channel) != Some(&generation) {
            return None; // the channel is gone: the transport would fail the call
        }
        let list = self.unconfirmed.entry((channel, generation)).or_default();
        let expected = list.last().map_or(0, |(s, _)| *s) + 1;
        if seq < expected {
            self.violations.push(format!(
                "{channel} gen {generation}: seq {seq} after {}",
                expected - 1
            ));
        }
        list.push((seq, Arc::clone(message)));
        self.auto_confirm.then_some(Pending::Confirm {
            channel,
            generation,
            seq,
        })
    }

    fn on_ack(&mut self, channel: ChannelId, generation: u64, tag: u64, kind: AckKind) {
        if self.live_chans.get(&channel) != Some(&generation) {
            self.violations.push(format!(
                "ack for {channel} gen {generation} which is not live"
            ));
            return;
        }
        let set = self.delivered.entry((channel, generation)).or_default();
        let multiple = matches!(
            kind,
            AckKind::Ack { multiple: true } | AckKind::Nack { multiple: true, .. }
        );
        if !set.contains(&tag) {
            self.violations.push(format!(
                "ack of unknown tag {tag} on {channel} gen {generation} (406 on a real broker)"
            ));
        }
        if multiple {
            *set = set.split_off(&(tag + 1));
        } else {
            set.remove(&tag);
        }
    }

    /// The broker confirms the oldest `n` publishes of a live channel generation.
    pub fn confirm(&mut self, channel: ChannelId, n: usize, multiple: bool, ack: bool) {
        let Some(&generation) = self.live_chans.get(&channel) else {
            return;
        };
        let Some(list) = self.unconfirmed.get_mut(&(channel, generation)) else {
            return;
        };
        let n = n.min(list.len());
        if n == 0 {
            return;
        }
        let taken: Vec<_> = list.drain(..n).collect();
        if ack {
            self.stored
                .extend(taken.iter().map(|(_, m)| m.payload.clone()));
        }
        if multiple {
            let delivery_tag = taken[n - 1].0;
            self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::Confirm {
                    delivery_tag,
                    multiple: true,
                    ack,
                },
            });
        } else {
            for (seq, _) in taken {
                self.input(Input::Channel {
                    channel,
                    generation,
                    event: ChannelInput::Confirm {
                        delivery_tag: seq,
                        multiple: false,
                        ack,
                    },
                });
            }
        }
    }

    /// The broker delivers a message to `consumer_tag` on a live channel.
    pub fn deliver(
        &mut self,
        channel: ChannelId,
        consumer_tag: &str,
        payload: &str,
    ) -> Option<u64> {
        let generation = *self.live_chans.get(&channel)?;
        let next = self.next_delivery.entry((channel, generation)).or_insert(0);
        *next += 1;
        let tag = *next;
        self.delivered
            .entry((channel, generation))
            .or_default()
            .insert(tag);
        self.input(Input::Channel {
            channel,
            generation,
            event: ChannelInput::Delivery(Box::new(Delivery {
                consumer_tag: consumer_tag.to_string(),
                delivery_tag: tag,
                redelivered: false,
                exchange: String::new(),
                routing_key: "q".into(),
                properties: Properties::default(),
                payload: payload.to_string().into_bytes().into(),
            })),
        });
        Some(tag)
    }

    fn answer(&mut self, p: Pending) {
        match p {
            Pending::Confirm {
                channel,
                generation,
                seq,
            } => {
                if self.live_chans.get(&channel) != Some(&generation) {
                    return;
                }
                let list = self.unconfirmed.entry((channel, generation)).or_default();
                if let Some(pos) = list.iter().position(|(s, _)| *s == seq) {
                    let (_, message) = list.remove(pos);
                    self.stored.push(message.payload.clone());
                    self.input(Input::Channel {
                        channel,
                        generation,
                        event: ChannelInput::Confirm {
                            delivery_tag: seq,
                            multiple: false,
                            ack: true,
                        },
                    });
                }
            }
            Pending::Topology {
                channel,
                generation,
                op,
            } => {
                if self.live_chans.get(&channel) != Some(&generation) {
                    return;
                }
                let consume_error = match (&op, &self.fail_declare) {
                    (TopologyOp::Consume { .. }, _) => self.fail_consume.clone(),
                    (TopologyOp::DeclareQueue(decl), Some((name, error))) if decl.name == *name => {
                        Some(error.clone())
                    }
                    _ => None,
                };
                if let Some(error) = consume_error.or_else(|| self.fail_topology.take()) {
                    self.live_chans.remove(&channel);
                    self.input(Input::Channel {
                        channel,
                        generation,
                        event: ChannelInput::TopologyDone(Err(error)),
                    });
                    return;
                }
                let name = match &op {
                    TopologyOp::DeclareQueue(decl) if decl.name.is_empty() => {
                        self.server_named += 1;
                        Some(format!("amq.gen-{}", self.server_named))
                    }
                    TopologyOp::DeclareQueue(decl) => Some(decl.name.clone()),
                    _ => None,
                };
                self.topology_log.push((channel, op));
                self.input(Input::Channel {
                    channel,
                    generation,
                    event: ChannelInput::TopologyDone(Ok(name)),
                });
            }

            Pending::Dial {
                connection,
                epoch,
                refusal,
            } => {
                if self.blackhole {
                    return; // never answers; the connect timeout must fire
                }
                if let Some(error) = refusal.or_else(|| self.refuse_with.clone()) {
                    self.input(Input::DialFailed {
                        connection,
                        epoch,
                        error,
                    });
                } else if self.broker_up {
                    self.live.insert(connection, epoch);
                    self.input(Input::Connected { connection, epoch });
                } else {
                    self.input(Input::DialFailed {
                        connection,
                        epoch,
                        error: TransportError::Io("connection refused".into()),
                    });
                }
            }
            Pending::Open {
                channel,
                generation,
                epoch,
            } => {
                if self.live.get(&channel.connection) == Some(&epoch) {
                    self.live_chans.insert(channel, generation);
                    self.input(Input::Channel {
                        channel,
                        generation,
                        event: ChannelInput::Opened,
                    });
                } else {
                    self.input(Input::Channel {
                        channel,
                        generation,
                        event: ChannelInput::OpenFailed(TransportError::Io(
                            "connection gone".into(),
                        )),
                    });
                }
            }
            Pending::Close { connection, epoch } => {
                if self.live.get(&connection) == Some(&epoch) {
                    self.live.remove(&connection);
                    self.live_chans.retain(|ch, _| ch.connection != connection);
                }
                self.input(Input::ConnectionClosed { connection, epoch });
            }
        }
    }

    // ----- faults -----

    /// The broker drops a live connection.
    pub fn kill(&mut self, connection: ConnectionId, error: TransportError) {
        self.live_chans.retain(|ch, _| ch.connection != connection);
        if let Some(epoch) = self.live.remove(&connection) {
            self.input(Input::ConnectionLost {
                connection,
                epoch,
                error,
            });
        }
    }

    /// The broker restarts: every connection dies; dials fail until `up()`.
    pub fn broker_down(&mut self) {
        self.broker_up = false;
        let live: Vec<_> = self.live.keys().copied().collect();
        for c in live {
            self.kill(
                c,
                TransportError::Reply {
                    code: 320,
                    text: "CONNECTION_FORCED - broker shutdown".into(),
                },
            );
        }
    }

    /// The broker closes one channel with a reply code.
    pub fn channel_error(&mut self, channel: ChannelId, code: u16) {
        self.channel_closed(
            channel,
            TransportError::Reply {
                code,
                text: "channel error".into(),
            },
        );
    }

    /// The broker closes `channel` with `error`; answers still pending for it
    /// arrive later and are stale.
    pub fn channel_closed(&mut self, channel: ChannelId, error: TransportError) {
        let Some(generation) = self.sup.channel_generation(channel) else {
            return;
        };
        if self.live.contains_key(&channel.connection) && self.live_chans.remove(&channel).is_some()
        {
            self.input(Input::Channel {
                channel,
                generation,
                event: ChannelInput::Lost(error),
            });
        }
    }

    pub fn dials(&self) -> usize {
        self.commands
            .iter()
            .filter(|(_, c)| matches!(c, Command::Dial { .. }))
            .count()
    }
}

/// How a publish ended.
pub type PublishResult = Result<amqp_rebound_core::Confirmation, amqp_rebound_core::PublishError>;

/// A message whose payload is `id`, for tracking.
pub fn msg(id: u64) -> Arc<Message> {
    Arc::new(Message::new("", "q", id.to_string().into_bytes()))
}

impl World {
    /// Publishes through the supervisor now and drains.
    pub fn publish(
        &mut self,
        message: Arc<Message>,
    ) -> Result<amqp_rebound_core::PublishId, amqp_rebound_core::PublishError> {
        let r = self.sup.publish(self.now, message, None);
        self.drain();
        r
    }

    /// Runs any application command on the supervisor now and drains.
    pub fn app<R>(&mut self, f: impl FnOnce(&mut Supervisor, Instant) -> R) -> R {
        let r = f(&mut self.sup, self.now);
        self.drain();
        r
    }

    /// Every publish resolution so far: (id, result).
    pub fn resolutions(&self) -> Vec<(amqp_rebound_core::PublishId, PublishResult)> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::PublishResolved { id, result } => Some((*id, result.clone())),
                _ => None,
            })
            .collect()
    }

    /// Payloads of the Publish commands so far, in order.
    pub fn sent_payloads(&self) -> Vec<String> {
        self.commands
            .iter()
            .filter_map(|(_, c)| match c {
                Command::Publish { message, .. } => {
                    Some(String::from_utf8_lossy(&message.payload).into_owned())
                }
                _ => None,
            })
            .collect()
    }
}

/// Channel `i` of connection `c`.
pub fn ch(c: u16, i: u16) -> ChannelId {
    ChannelId {
        connection: ConnectionId(c),
        index: i,
    }
}

/// A world of `connections` x `channels`, every channel Ready.
pub fn ready_world(connections: usize, channels: usize) -> World {
    let mut w = World::new(config(connections, channels, 1));
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    w
}

/// Starts a consumer of `queue` tagged `tag`, with the default options.
pub fn consume_as(w: &mut World, queue: QueueRef, tag: &str) -> ConsumerId {
    w.app(|s, now| s.consume(now, queue, Some(tag.into()), ConsumeOptions::default()))
        .unwrap()
}
