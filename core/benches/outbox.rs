//! Cost of the publish -> Publish command -> confirm -> resolution cycle in the core
//! alone, per message, for confirm windows of 1, 64 and 1024 (1 x 1 pool). Each
//! iteration publishes `window` messages, drains the commands, confirms each one
//! with a single (non-multiple) ack and drains the resolutions.
//!
//! `cargo bench -p amqp-rebound-core --bench outbox`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rebound_core::{
    ChannelId, ChannelInput, Command, Config, Input, Message, Supervisor, endpoint::parse_hosts,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn ready(window: usize) -> (Supervisor, Instant, ChannelId, u64) {
    let hosts = parse_hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"]).expect("hosts");
    let mut config = Config::new(hosts);
    config.channels_per_connection = 1;
    config.confirm_window = window;
    config.publish_timeout = Duration::from_secs(3600);
    #[allow(clippy::disallowed_methods)] // the caller owns the clock, not the machine
    let now = Instant::now();
    let mut sup = Supervisor::new(config, now).expect("config");
    let Some(Command::Dial {
        connection, epoch, ..
    }) = sup.poll_command()
    else {
        panic!("dial")
    };
    sup.handle(now, Input::Connected { connection, epoch });
    let Some(Command::OpenChannel {
        channel,
        generation,
        ..
    }) = sup.poll_command()
    else {
        panic!("open")
    };
    sup.handle(
        now,
        Input::Channel {
            channel,
            generation,
            event: ChannelInput::Opened,
        },
    );
    while sup.poll_event().is_some() {}
    while sup.poll_command().is_some() {}
    (sup, now, channel, generation)
}

fn outbox(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_confirm_cycle");
    let message = Arc::new(Message::new("", "q", vec![0u8; 64]));
    for window in [1usize, 64, 1024] {
        let (mut sup, now, channel, generation) = ready(window);
        let mut seqs = Vec::with_capacity(window);
        group.throughput(Throughput::Elements(window as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(window),
            &window,
            |b, &window| {
                b.iter(|| {
                    for _ in 0..window {
                        black_box(sup.publish(now, Arc::clone(&message), None).ok());
                        while let Some(command) = sup.poll_command() {
                            if let Command::Publish { seq, .. } = command {
                                seqs.push(seq);
                            }
                        }
                    }
                    for seq in seqs.drain(..) {
                        sup.handle(
                            now,
                            Input::Channel {
                                channel,
                                generation,
                                event: ChannelInput::Confirm {
                                    delivery_tag: seq,
                                    multiple: false,
                                    ack: true,
                                },
                            },
                        );
                        while let Some(command) = sup.poll_command() {
                            black_box(command);
                        }
                        while let Some(event) = sup.poll_event() {
                            black_box(event);
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, outbox);
criterion_main!(benches);
