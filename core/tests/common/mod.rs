//! A deterministic harness that steps a [`Supervisor`] against a scripted broker
//! with a virtual clock (quinn's `Pair`, firezone's advance-until-quiet).
//!
//! The "world" answers commands after a fixed latency: dials succeed while the
//! broker is up and fail with an I/O error while it is down; channel opens succeed
//! while their connection is alive. Faults are injected by the test through
//! [`World`] methods.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use amqp_rebound_core::{
    ChannelId, Command, Config, ConnectionId, Event, Input, Supervisor, TransportError,
    endpoint::parse_hosts,
};

/// How long every simulated transport operation takes.
pub const LATENCY: Duration = Duration::from_millis(2);

/// A pending answer to a command, due at a virtual time.
#[derive(Debug, Clone)]
enum Pending {
    Dial {
        connection: ConnectionId,
        epoch: u64,
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
}

pub struct World {
    pub sup: Supervisor,
    pub start: Instant,
    pub now: Instant,
    /// Every command and event, stamped with virtual milliseconds.
    pub trace: String,
    pub commands: Vec<(Duration, Command)>,
    pub events: Vec<(Duration, Event)>,
    /// Whether dials succeed.
    pub broker_up: bool,
    /// Dials fail with this error while set (for example 403).
    pub refuse_with: Option<TransportError>,
    /// Dials never answer while set (a blackholed host).
    pub blackhole: bool,
    /// Live transport connections: slot -> epoch.
    pub live: BTreeMap<ConnectionId, u64>,
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
            broker_up: true,
            refuse_with: None,
            blackhole: false,
            live: BTreeMap::new(),
            pending: Vec::new(),
            seq: 0,
        };
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
            let due = self.now + LATENCY;
            let pending = match &command {
                Command::Dial {
                    connection, epoch, ..
                } => Some(Pending::Dial {
                    connection: *connection,
                    epoch: *epoch,
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
                _ => None,
            };
            if let Some(p) = pending {
                self.seq += 1;
                self.pending.push((due, self.seq, p));
            }
            self.commands.push((at, command));
        }
        while let Some(event) = self.sup.poll_event() {
            let _ = writeln!(self.trace, "{at:>8?} ! {event:?}");
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

    fn answer(&mut self, p: Pending) {
        match p {
            Pending::Dial { connection, epoch } => {
                if self.blackhole {
                    return; // never answers; the connect timeout must fire
                }
                if let Some(error) = self.refuse_with.clone() {
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
                    self.input(Input::ChannelOpened {
                        channel,
                        generation,
                    });
                } else {
                    self.input(Input::ChannelOpenFailed {
                        channel,
                        generation,
                        error: TransportError::Io("connection gone".into()),
                    });
                }
            }
            Pending::Close { connection, epoch } => {
                if self.live.get(&connection) == Some(&epoch) {
                    self.live.remove(&connection);
                }
                self.input(Input::ConnectionClosed { connection, epoch });
            }
        }
    }

    // ----- faults -----

    /// The broker drops a live connection.
    pub fn kill(&mut self, connection: ConnectionId, error: TransportError) {
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
        let Some(generation) = self.sup.channel_generation(channel) else {
            return;
        };
        if self.live.contains_key(&channel.connection) {
            self.input(Input::ChannelLost {
                channel,
                generation,
                error: TransportError::Reply {
                    code,
                    text: "channel error".into(),
                },
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
