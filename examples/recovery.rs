//! The supervisor on its own, in virtual time: a 2 x 2 pool over two hosts loses a
//! connection, fails over while one broker is down, and recovers. Every command and
//! event is printed with its virtual timestamp.
//!
//! `cargo run --example recovery`

use std::time::{Duration, Instant};

use amqp_rebound::TransportError;
use amqp_rebound::engine::{ChannelInput, Command, Config, Input, Supervisor, parse_hosts};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hosts = parse_hosts([
        "amqp://guest:guest@rabbit-a:5672/%2f",
        "amqp://guest:guest@rabbit-b:5672/%2f",
    ])?;
    let mut config = Config::new(hosts);
    config.connections = 2;
    config.channels_per_connection = 2;
    config.seed = 42;
    #[allow(clippy::disallowed_methods)] // the caller owns the clock, not the machine
    let start = Instant::now();
    let mut sup = Supervisor::new(config, start)?;
    let mut now = start;
    // A toy "network": host rabbit-a goes down at 100 ms; everything takes 2 ms.
    let mut queue: Vec<(Instant, Input)> = Vec::new();
    let mut a_down = false;
    let mut killed = false;
    let end = start + Duration::from_secs(2);
    loop {
        while let Some(command) = sup.poll_command() {
            println!("{:>10?}  -> {command:?}", now - start);
            let at = now + Duration::from_millis(2);
            match command {
                Command::Dial {
                    connection,
                    epoch,
                    endpoint,
                } => {
                    let input = if a_down && endpoint.host() == "rabbit-a" {
                        Input::DialFailed {
                            connection,
                            epoch,
                            error: TransportError::Io("connection refused".into()),
                        }
                    } else {
                        Input::Connected { connection, epoch }
                    };
                    queue.push((at, input));
                }
                Command::OpenChannel {
                    channel,
                    generation,
                    ..
                } => queue.push((
                    at,
                    Input::Channel {
                        channel,
                        generation,
                        event: ChannelInput::Opened,
                    },
                )),
                _ => {}
            }
        }
        while let Some(event) = sup.poll_event() {
            println!("{:>10?}  !  {event:?}", now - start);
        }
        if !killed && now >= start + Duration::from_millis(100) {
            killed = true;
            a_down = true;
            println!("{:>10?}  ** rabbit-a goes down", now - start);
            // connection 0 was on rabbit-a: it drops
            let c0 = amqp_rebound::ConnectionId(0);
            if let Some(epoch) = sup.connection_epoch(c0) {
                let error = TransportError::Io("connection reset".into());
                sup.handle(
                    now,
                    Input::ConnectionLost {
                        connection: c0,
                        epoch,
                        error,
                    },
                );
            }
            continue;
        }
        queue.sort_by_key(|(at, _)| *at);
        let next_input = queue.first().map(|(at, _)| *at);
        let wake = [
            next_input,
            sup.poll_timeout(),
            (!killed).then(|| start + Duration::from_millis(100)),
        ]
        .into_iter()
        .flatten()
        .min();
        match wake {
            Some(at) if at <= end => now = now.max(at),
            _ => break,
        }
        if next_input == Some(now) {
            let (_, input) = queue.remove(0);
            sup.handle(now, input);
        } else {
            sup.handle(now, Input::Timeout);
        }
    }
    println!("ready channels: {} of 4", sup.ready_channels());
    Ok(())
}
