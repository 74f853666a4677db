//! Cost of one `handle` + drain step of the supervisor over a 10 x 100 pool, in a
//! connection-loss-and-recovery cycle: ConnectionLost, Timeout (the backoff
//! elapses), Connected, then 100 ChannelOpened. Criterion's throughput line gives
//! inputs per second; ns per input = 1e9 / that.
//!
//! `cargo bench -p amqp-rebound-core --bench machine`

use std::hint::black_box;
use std::time::{Duration, Instant};

use amqp_rebound_core::{
    ChannelInput, Command, Config, ConnectionId, Input, Supervisor, TransportError,
    endpoint::parse_hosts,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CONNECTIONS: usize = 10;
const CHANNELS: usize = 100;

struct Bench {
    sup: Supervisor,
    now: Instant,
    opens: Vec<(amqp_rebound_core::ChannelId, u64)>,
    dial: Option<u64>,
}

impl Bench {
    fn drain(&mut self) {
        while let Some(command) = self.sup.poll_command() {
            match command {
                Command::Dial { epoch, .. } => self.dial = Some(epoch),
                Command::OpenChannel {
                    channel,
                    generation,
                    ..
                } => self.opens.push((channel, generation)),
                other => {
                    black_box(other);
                }
            }
        }
        while let Some(event) = self.sup.poll_event() {
            black_box(event);
        }
    }

    fn step(&mut self, input: Input) {
        self.sup.handle(self.now, input);
        self.drain();
    }

    /// One loss-and-recovery cycle of `connection`; returns the inputs fed.
    fn cycle(&mut self, connection: ConnectionId) -> u64 {
        let epoch = self.sup.connection_epoch(connection).expect("slot");
        self.now += Duration::from_millis(1);
        self.step(Input::ConnectionLost {
            connection,
            epoch,
            error: TransportError::Io("reset".into()),
        });
        let mut inputs = 1;
        if self.dial.is_none() {
            self.now = self.now.max(self.sup.poll_timeout().expect("retry timer"));
            self.step(Input::Timeout);
            inputs += 1;
        }
        let epoch = self.dial.take().expect("a dial after the backoff");
        self.step(Input::Connected { connection, epoch });
        inputs += 1;
        let opens = std::mem::take(&mut self.opens);
        for &(channel, generation) in &opens {
            self.step(Input::Channel {
                channel,
                generation,
                event: ChannelInput::Opened,
            });
        }
        inputs += opens.len() as u64;
        self.opens = opens;
        self.opens.clear();
        inputs
    }
}

fn setup() -> Bench {
    let hosts = parse_hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"]).expect("hosts");
    let mut config = Config::new(hosts);
    config.connections = CONNECTIONS;
    config.channels_per_connection = CHANNELS;
    #[allow(clippy::disallowed_methods)] // the caller owns the clock, not the machine
    let now = Instant::now();
    let sup = Supervisor::new(config, now).expect("config");
    let mut b = Bench {
        sup,
        now,
        opens: Vec::new(),
        dial: None,
    };
    // bring the whole pool up
    let mut dials = Vec::new();
    while let Some(command) = b.sup.poll_command() {
        if let Command::Dial {
            connection, epoch, ..
        } = command
        {
            dials.push((connection, epoch));
        }
    }
    for (connection, epoch) in dials {
        b.step(Input::Connected { connection, epoch });
    }
    for (channel, generation) in std::mem::take(&mut b.opens) {
        b.step(Input::Channel {
            channel,
            generation,
            event: ChannelInput::Opened,
        });
    }
    assert!(b.sup.is_all_ready());
    b
}

fn machine(c: &mut Criterion) {
    let mut group = c.benchmark_group("supervisor_10x100");
    let mut b = setup();
    let inputs = b.cycle(ConnectionId(0));
    group.throughput(Throughput::Elements(inputs));
    let mut next = 1u16;
    group.bench_function("loss_and_recovery_cycle", |bencher| {
        bencher.iter(|| {
            let n = b.cycle(ConnectionId(next % CONNECTIONS as u16));
            next = next.wrapping_add(1);
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, machine);
criterion_main!(benches);
