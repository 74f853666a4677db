//! Scenario tests of the supervisor, stepped by the virtual-clock harness.

mod common;

use std::time::Duration;

use amqp_rebound_core::{
    ChannelId, ChannelInput, ChannelState, Command, ConnectionId, ConnectionState, Event, Input,
    Object, Phase, Reason, TransportError,
};
use common::{World, config};

const C0: ConnectionId = ConnectionId(0);

fn ch(c: u16, i: u16) -> ChannelId {
    ChannelId {
        connection: ConnectionId(c),
        index: i,
    }
}

fn io() -> TransportError {
    TransportError::Io("connection reset".into())
}

#[test]
fn starts_dials_every_connection_and_opens_every_channel() {
    let mut w = World::new(config(3, 4, 1));
    assert_eq!(w.dials(), 3, "one dial per connection slot at start");
    assert_eq!(
        w.sup.ready_channels(),
        0,
        "nothing is ready before the dials answer"
    );
    let took = w.run_until_ready(Duration::from_secs(1)).expect("ready");
    assert_eq!(took, 2 * common::LATENCY, "dial + open");
    assert_eq!(w.sup.ready_channels(), 12);
    for id in w.sup.channel_ids().collect::<Vec<_>>() {
        assert_eq!(w.sup.channel_generation(id), Some(1));
    }
}

/// The channels that carried `n` publishes made now, in order.
fn placements(w: &mut World, n: u64) -> Vec<ChannelId> {
    let before = w.commands.len();
    for k in 0..n {
        w.publish(common::msg(k)).unwrap();
    }
    w.commands[before..]
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Publish { channel, .. } => Some(*channel),
            _ => None,
        })
        .collect()
}

#[test]
fn publishes_go_round_robin_over_ready_channels_only() {
    let mut w = World::new(config(2, 2, 7));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    assert_eq!(
        placements(&mut w, 4),
        vec![ch(0, 0), ch(0, 1), ch(1, 0), ch(1, 1)]
    );
    // a channel-level error takes one channel out of rotation
    w.channel_error(ch(0, 1), 404);
    assert_eq!(
        w.sup.channel_state(ch(0, 1)).unwrap().phase(),
        Phase::Reopening
    );
    let picks = placements(&mut w, 9);
    assert!(!picks.contains(&ch(0, 1)), "a Reopening channel was used");
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn no_ready_channel_holds_publishes_and_a_close_refuses_them() {
    let mut w = World::new(config(1, 2, 1));
    assert!(placements(&mut w, 1).is_empty(), "nothing is Ready yet");
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.input(Input::Close);
    assert_eq!(
        w.publish(common::msg(9)),
        Err(amqp_rebound_core::PublishError::Closed)
    );
}

#[test]
fn channel_error_reopens_only_that_channel_with_a_new_generation() {
    let mut w = World::new(config(1, 3, 1));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let dials = w.dials();
    w.channel_error(ch(0, 1), 406);
    assert_eq!(w.sup.connection_state(C0).unwrap().phase(), Phase::Ready);
    assert_eq!(w.sup.channel_state(ch(0, 0)), Some(ChannelState::Ready));
    assert_eq!(w.sup.channel_state(ch(0, 2)), Some(ChannelState::Ready));
    w.run_until_ready(Duration::from_secs(1))
        .expect("the channel reopens");
    assert_eq!(w.dials(), dials, "a channel error must not redial");
    assert_eq!(w.sup.channel_generation(ch(0, 1)), Some(2));
    assert_eq!(w.sup.channel_generation(ch(0, 0)), Some(1));
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::StateChanged {
            reason: Reason::ChannelFailed(Some(406)),
            to: Phase::Reopening,
            ..
        }
    )));
}

#[test]
fn connection_loss_reopens_all_its_channels_after_reconnect() {
    // one host: the lost connection waits for its backoff (with a host list it
    // dials the next host at once, see below)
    let mut cfg = config(2, 2, 3);
    cfg.hosts.truncate(1);
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.kill(C0, io());
    assert_eq!(
        w.sup.connection_state(C0).unwrap().phase(),
        Phase::Reconnecting
    );
    for i in 0..2 {
        assert_eq!(
            w.sup.channel_state(ch(0, i)),
            Some(ChannelState::Reopening { retry_at: None })
        );
        assert_eq!(w.sup.channel_state(ch(1, i)), Some(ChannelState::Ready));
    }
    let took = w.run_until_ready(Duration::from_secs(1)).expect("recovers");
    // first retry waits a full-jitter delay in [0, initial], then dial + open
    assert!(
        took <= Duration::from_millis(50) + 2 * common::LATENCY,
        "{took:?}"
    );
    assert_eq!(w.sup.channel_generation(ch(0, 0)), Some(2));
    assert_eq!(w.sup.channel_generation(ch(1, 0)), Some(1));
}

#[test]
fn dial_failure_rotates_to_the_next_host_before_backing_off() {
    let mut w = World::new(config(1, 1, 5));
    w.broker_up = false;
    w.run_for(Duration::from_millis(1));
    w.run_for(Duration::from_millis(10));
    let hosts: Vec<String> = w
        .commands
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Dial { endpoint, .. } => Some(endpoint.host().to_string()),
            _ => None,
        })
        .collect();
    // the first failure moves on at once to the other host; the second (every
    // host failed) waits for the backoff
    assert!(hosts.len() >= 2, "{hosts:?}");
    assert_ne!(hosts[0], hosts[1]);
    let at: Vec<_> = w
        .commands
        .iter()
        .filter(|(_, c)| matches!(c, Command::Dial { .. }))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        at[1],
        at[0] + common::LATENCY,
        "failover to the next host is immediate"
    );
    w.broker_up = true;
    w.run_until_ready(Duration::from_secs(11))
        .expect("recovers when the broker is back");
}

#[test]
fn refused_credentials_retry_at_the_cap_and_are_reported() {
    let mut cfg = config(1, 1, 9);
    cfg.hosts.truncate(1);
    let mut w = World::new(cfg);
    w.refuse_with = Some(TransportError::Auth("ACCESS_REFUSED".into()));
    w.run_for(Duration::from_secs(60));
    let dials = w.dials();
    // at the cap (2 s, jittered in [1 s, 2 s]) 60 s allow 30 to 61 dials
    assert!(
        (30..=61).contains(&dials),
        "{dials} dials in 60 s: hot loop or stall"
    );
    let reported = w
        .events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                Event::RecoveryFailed {
                    error: TransportError::Auth(_),
                    ..
                }
            )
        })
        .count();
    assert_eq!(reported, dials - 1 + usize::from(reported == dials));
    match w.sup.connection_state(C0).unwrap() {
        ConnectionState::Reconnecting { last_error, .. } => {
            assert!(matches!(last_error, TransportError::Auth(_)))
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
}

#[test]
fn a_refusal_moves_to_the_next_host_at_once_then_waits_at_the_cap() {
    // two hosts: each refusal round tries both, then waits at the cap
    let mut w = World::new(config(1, 1, 9));
    w.refuse_with = Some(TransportError::Auth("ACCESS_REFUSED".into()));
    w.run_for(Duration::from_secs(60));
    let dials = dials(&w);
    assert!(dials.len() >= 4, "{dials:?}");
    for round in dials.chunks(2).filter(|r| r.len() == 2) {
        assert_ne!(
            round[0].1, round[1].1,
            "a round tries both hosts: {dials:?}"
        );
        assert!(
            round[1].0 - round[0].0 <= common::LATENCY,
            "the second host at once: {dials:?}"
        );
    }
    let cap = w.sup.config().backoff.cap;
    for pair in dials.chunks(2).collect::<Vec<_>>().windows(2) {
        let gap = pair[1][0].0 - pair[0][pair[0].len() - 1].0;
        assert!(
            gap >= cap / 2 - common::LATENCY,
            "rounds wait at the cap ({cap:?}, jittered in [cap / 2, cap]): {dials:?}"
        );
    }
}

#[test]
fn blackholed_dial_times_out() {
    let mut w = World::new(config(1, 1, 2));
    w.blackhole = true;
    w.run_for(Duration::from_secs(6));
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::StateChanged {
            reason: Reason::ConnectTimeout,
            ..
        }
    )));
    w.blackhole = false;
    w.run_until_ready(Duration::from_secs(11))
        .expect("recovers");
}

#[test]
fn late_dial_after_timeout_is_closed_not_used() {
    let mut w = World::new(config(1, 1, 2));
    let Some((_, Command::Dial { epoch, .. })) = w.commands.first().cloned() else {
        panic!("no dial")
    };
    w.blackhole = true;
    w.run_for(Duration::from_secs(5)); // connect timeout fires at 5 s
    w.blackhole = false;
    w.input(Input::Connected {
        connection: C0,
        epoch,
    });
    assert_eq!(
        w.commands.last().map(|(_, c)| c.clone()),
        Some(Command::CloseConnection {
            connection: C0,
            epoch
        })
    );
    assert_ne!(w.sup.connection_state(C0).unwrap().phase(), Phase::Ready);
}

#[test]
fn publishes_skip_a_blocked_connection() {
    let mut w = World::new(config(2, 1, 1));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    let epoch = w.sup.connection_epoch(C0).unwrap();
    w.input(Input::Blocked {
        connection: C0,
        epoch,
        reason: "low on memory".into(),
    });
    assert!(matches!(w.events.last(), Some((_, Event::Blocked { .. }))));
    assert_eq!(placements(&mut w, 4), vec![ch(1, 0); 4]);
    w.input(Input::Unblocked {
        connection: C0,
        epoch,
    });
    assert!(placements(&mut w, 2).contains(&ch(0, 0)));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn close_is_terminal_even_while_reconnecting() {
    let mut w = World::new(config(2, 2, 4));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.broker_down();
    w.input(Input::Close);
    let dials = w.dials();
    w.broker_up = true;
    w.run_for(Duration::from_secs(60));
    assert_eq!(w.dials(), dials, "no dial after close");
    assert!(w.sup.is_fully_closed());
    assert_eq!(
        w.sup.poll_timeout(),
        None,
        "no timer left armed after close"
    );
    for id in w.sup.channel_ids().collect::<Vec<_>>() {
        assert_eq!(w.sup.channel_state(id), Some(ChannelState::Closed));
    }
}

#[test]
fn close_of_ready_connections_waits_for_the_transport() {
    let mut w = World::new(config(1, 1, 4));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.input(Input::Close);
    assert_eq!(w.sup.connection_state(C0).unwrap().phase(), Phase::Closing);
    assert!(matches!(
        w.commands.last(),
        Some((_, Command::CloseConnection { .. }))
    ));
    w.run_for(Duration::from_millis(10));
    assert_eq!(w.sup.connection_state(C0), Some(&ConnectionState::Closed));
}

#[test]
fn stale_and_unknown_inputs_change_nothing() {
    let mut w = World::new(config(1, 2, 1));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let before = (w.commands.len(), w.events.len());
    let bogus = [
        Input::ConnectionLost {
            connection: ConnectionId(9),
            epoch: 1,
            error: io(),
        },
        Input::ConnectionLost {
            connection: C0,
            epoch: 999,
            error: io(),
        },
        Input::Channel {
            channel: ch(0, 7),
            generation: 1,
            event: ChannelInput::Lost(io()),
        },
        Input::Channel {
            channel: ch(0, 0),
            generation: 0,
            event: ChannelInput::Lost(io()),
        },
        Input::DialFailed {
            connection: C0,
            epoch: 1,
            error: io(),
        },
        Input::Unblocked {
            connection: C0,
            epoch: 1,
        },
        Input::Timeout,
    ];
    for input in bogus {
        w.input(input);
    }
    assert_eq!((w.commands.len(), w.events.len()), before);
    assert!(w.sup.is_all_ready());
}

#[test]
fn time_going_backwards_is_ignored() {
    let mut w = World::new(config(1, 1, 1));
    w.broker_up = false;
    w.run_for(Duration::from_millis(5));
    let (commands, events) = (w.commands.len(), w.events.len());
    let timeout = w.sup.poll_timeout();
    w.sup.handle(w.start, Input::Timeout);
    assert!(w.sup.poll_command().is_none());
    assert!(w.sup.poll_event().is_none());
    assert_eq!(w.sup.poll_timeout(), timeout);
    assert_eq!((w.commands.len(), w.events.len()), (commands, events));
}

#[test]
fn every_state_change_is_an_event() {
    let mut w = World::new(config(1, 1, 1));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.kill(C0, io());
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let conn: Vec<_> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::StateChanged {
                object: Object::Connection(_),
                from,
                to,
                ..
            } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        conn,
        vec![
            (Phase::Connecting, Phase::Connecting), // start
            (Phase::Connecting, Phase::Ready),
            (Phase::Ready, Phase::Reconnecting),
            (Phase::Reconnecting, Phase::Connecting),
            (Phase::Connecting, Phase::Ready),
        ]
    );
}

#[test]
fn backoff_resets_after_staying_ready() {
    let mut cfg = config(1, 1, 11);
    cfg.hosts.truncate(1);
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    // flap: each loss right after recovery grows the attempt counter
    for _ in 0..5 {
        w.kill(C0, io());
        w.run_until_ready(Duration::from_secs(20)).unwrap();
    }
    w.kill(C0, io());
    let ConnectionState::Reconnecting {
        attempt: flapping, ..
    } = w.sup.connection_state(C0).unwrap().clone()
    else {
        panic!()
    };
    assert_eq!(flapping, 6);
    w.run_until_ready(Duration::from_secs(20)).unwrap();
    w.run_for(Duration::from_millis(200)); // past reset_after (150 ms)
    w.kill(C0, io());
    let ConnectionState::Connecting { attempt, .. } = w.sup.connection_state(C0).unwrap().clone()
    else {
        panic!("redialled at once after a stable period")
    };
    assert_eq!(attempt, 0, "the counter restarts after a stable period");
}

/// The dials `w` made, as (time since start, host).
fn dials(w: &World) -> Vec<(Duration, String)> {
    w.commands
        .iter()
        .filter_map(|(t, c)| match c {
            Command::Dial { endpoint, .. } => Some((*t, endpoint.host().to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn loss_of_a_stable_connection_dials_the_next_host_at_once() {
    let mut w = World::new(config(1, 1, 3));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_secs(6)); // stable: past reset_after
    let before = dials(&w);
    w.kill(C0, io());
    let killed_at = w.elapsed();
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let after = dials(&w);
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    let (at, host) = after.last().unwrap();
    assert_ne!(
        host,
        &before.last().unwrap().1,
        "the host that dropped us is not dialled first"
    );
    assert!(
        *at <= killed_at + common::LATENCY,
        "dialled {at:?} after start, the loss was at {killed_at:?}: not at once"
    );
}

#[test]
fn a_stable_period_resets_the_failure_count_of_a_host_list() {
    // one early loss counts a failure; after staying Ready past reset_after the
    // next loss starts a fresh round: the next host at once, not a backoff wait
    let mut cfg = config(1, 1, 5);
    cfg.backoff.jitter = amqp_rebound_core::Jitter::None;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.kill(C0, io()); // unstable: failures = 1, next host at once
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_secs(6)); // stable
    let lost = w.elapsed();
    w.kill(C0, io());
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let (at, _) = *dials(&w).last().unwrap();
    assert!(
        at <= lost + common::LATENCY,
        "dialled {:?} after the loss: the failure count was not reset",
        at.saturating_sub(lost)
    );
}

#[test]
fn a_flapping_host_list_backs_off_after_every_host_failed() {
    // connections that die right after coming up (a flapping cluster) get one
    // immediate dial per host, then wait for the backoff: no hot loop
    let mut cfg = config(1, 1, 4);
    cfg.backoff.jitter = amqp_rebound_core::Jitter::None;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let mut gaps = Vec::new();
    for _ in 0..6 {
        let lost = w.elapsed();
        w.kill(C0, io());
        w.run_until_ready(Duration::from_secs(20)).unwrap();
        let (at, _) = *dials(&w).last().unwrap();
        gaps.push(at.saturating_sub(lost));
    }
    let immediate = gaps.iter().filter(|g| **g <= common::LATENCY).count();
    assert_eq!(
        immediate, 3,
        "one immediate dial per host and round: {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(50) && gaps[3] >= Duration::from_millis(100),
        "then the backoff grows: {gaps:?}"
    );
}

#[test]
fn a_lost_connection_that_did_useful_work_is_redialled_at_once_however_many_losses_came_before() {
    // one host: nothing to rotate to, so only the useful-work rule makes it at once
    let mut cfg = config(1, 2, 21);
    cfg.hosts.truncate(1);
    let reset_after = cfg.backoff.reset_after;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    for n in 0..40 {
        w.run_for(reset_after); // Ready for reset_after: useful
        let lost = w.elapsed();
        w.kill(C0, io());
        let ConnectionState::Connecting { attempt, .. } = w.sup.connection_state(C0).unwrap()
        else {
            panic!(
                "loss {n}: not redialled at once: {:?}",
                w.sup.connection_state(C0)
            );
        };
        assert_eq!(*attempt, 0, "loss {n}: the backoff grew");
        let (at, _) = *dials(&w).last().unwrap();
        assert_eq!(at, lost, "loss {n}: the redial waited");
        w.run_until_ready(Duration::from_secs(1)).unwrap();
    }
}

#[test]
fn a_broker_that_drops_every_connection_soon_after_ready_meets_a_growing_backoff() {
    // Ready, then lost 100 ms later, for 60 s: the dial rate is the backoff's, not
    // one per handshake
    for hosts in [1, 2] {
        let mut cfg = config(1, 1, 22);
        cfg.hosts.truncate(hosts);
        let cap = cfg.backoff.cap;
        let mut w = World::new(cfg);
        let end = w.elapsed() + Duration::from_secs(60);
        while w.elapsed() < end {
            w.run_until_ready(Duration::from_secs(60)).unwrap();
            w.run_for(Duration::from_millis(100));
            w.kill(C0, io());
        }
        let dials = w.dials();
        // after the growth to the cap, one dial per round of hosts per 1-2 s
        // (equal jitter): at most (60 s / (cap / 2) + the ramp) rounds
        let rounds = 60 / (cap.as_secs_f64() / 2.0) as usize + 8;
        assert!(
            dials <= rounds * hosts,
            "{hosts} host(s): {dials} dials in 60 s, more than {}",
            rounds * hosts
        );
        assert!(
            dials >= 20,
            "{hosts} host(s): only {dials} dials: it gave up?"
        );
    }
}

#[test]
fn a_channel_closed_with_a_connection_error_is_the_connections_loss() {
    // lapin reports 320 on every channel before the connection: what the first
    // channel carried must not be re-sent on a sibling that dies with it
    let mut w = World::new(config(1, 2, 23));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    for id in 0..10 {
        w.publish(common::msg(id)).unwrap();
    }
    let sent_before = w.sent_payloads().len();
    assert_eq!(sent_before, 10);
    w.channel_error(ch(0, 0), 320);
    assert!(
        matches!(
            w.sup.connection_state(C0),
            Some(ConnectionState::Connecting { .. })
        ),
        "the connection is redialled: {:?}",
        w.sup.connection_state(C0)
    );
    assert_eq!(
        w.sent_payloads().len(),
        sent_before,
        "nothing re-sent before the new connection is up"
    );
    assert!(
        w.commands
            .iter()
            .any(|(_, c)| matches!(c, Command::CloseConnection { epoch: 1, .. }))
    );
    // the transport's own report of the loss comes later, for the old epoch
    w.channel_error(ch(0, 1), 320);
    w.kill(C0, io());
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(
        w.sent_payloads().len(),
        20,
        "each in-flight message re-sent once: {:?}",
        w.sent_payloads()
    );
    assert_eq!(w.sup.stats().reconnects, 1);
}

#[test]
fn a_channel_lost_without_a_reply_code_holds_its_siblings_until_the_connection_shows_its_fate() {
    // lapin reports every channel's end without a code just before the
    // connection's loss: the first channel's messages wait, then go out once
    let mut w = World::new(config(1, 2, 24));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    for id in 0..10 {
        w.publish(common::msg(id)).unwrap();
    }
    assert_eq!(w.sent_payloads().len(), 10);
    w.channel_closed(ch(0, 0), io());
    w.run_for(Duration::from_millis(5));
    assert_eq!(
        w.sent_payloads().len(),
        10,
        "nothing re-sent on the sibling yet"
    );
    w.channel_closed(ch(0, 1), io());
    w.kill(C0, io());
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(
        w.sent_payloads().len(),
        20,
        "each re-sent once: {:?}",
        w.sent_payloads()
    );

    // the connection lives on: after the grace, the sibling takes them
    let mut w = World::new(config(1, 2, 25));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    for id in 0..10 {
        w.publish(common::msg(id)).unwrap();
    }
    let lost = w.elapsed();
    w.channel_closed(ch(0, 0), io());
    w.run_for(Duration::from_millis(100));
    let resent: Vec<_> = w
        .commands
        .iter()
        .filter(|(t, c)| *t > lost && matches!(c, Command::Publish { .. }))
        .collect();
    assert!(
        !resent.is_empty(),
        "the messages of the lost channel went out again"
    );
    assert!(
        resent
            .iter()
            .all(|(t, _)| *t >= lost + Duration::from_millis(50)),
        "re-sent before the grace ended: {resent:?}"
    );
}

#[test]
fn supervisor_refuses_a_bad_config_without_panicking() {
    let mut c = config(1, 1, 1);
    c.channels_per_connection = 0;
    #[allow(clippy::disallowed_methods)] // the test owns the clock
    let err = amqp_rebound_core::Supervisor::new(c, std::time::Instant::now()).unwrap_err();
    assert_eq!(err, amqp_rebound_core::ConfigError::ZeroChannels);
    // each dimension within its limit, the whole too large to allocate: refused
    // at once, not an abort on allocation
    let mut c = config(1, 1, 1);
    c.connections = 65_535;
    c.channels_per_connection = 65_535;
    #[allow(clippy::disallowed_methods)] // the test owns the clock
    let err = amqp_rebound_core::Supervisor::new(c, std::time::Instant::now()).unwrap_err();
    assert!(
        matches!(err, amqp_rebound_core::ConfigError::PoolTooLarge { .. }),
        "{err:?}"
    );
}

/// Each step of an open is its own state, named for what the channel waits for;
/// the application hears of one change only (Opening -> Ready).
#[test]
fn channel_states_name_what_the_open_waits_for() {
    use amqp_rebound_core::{ExchangeDecl, ExchangeKind, Supervisor};
    fn drain(sup: &mut Supervisor) -> Vec<Command> {
        std::iter::from_fn(|| sup.poll_command()).collect()
    }
    fn connect(sup: &mut Supervisor, at: std::time::Instant) {
        let epoch = sup.connection_epoch(C0).unwrap();
        sup.handle(
            at,
            Input::Connected {
                connection: C0,
                epoch,
            },
        );
    }
    fn opened(sup: &mut Supervisor, at: std::time::Instant, channel: ChannelId) {
        let generation = sup.channel_generation(channel).unwrap();
        sup.handle(
            at,
            Input::Channel {
                channel,
                generation,
                event: ChannelInput::Opened,
            },
        );
    }
    fn topology_done(sup: &mut Supervisor, at: std::time::Instant, channel: ChannelId) {
        let generation = sup.channel_generation(channel).unwrap();
        sup.handle(
            at,
            Input::Channel {
                channel,
                generation,
                event: ChannelInput::TopologyDone(Ok(None)),
            },
        );
    }
    #[allow(clippy::disallowed_methods)] // the test owns the clock, not the machine
    let t0 = std::time::Instant::now();
    let mut sup = Supervisor::new(config(1, 2, 1), t0).unwrap();
    let (c0, c1) = (ch(0, 0), ch(0, 1));
    assert_eq!(sup.channel_state(c0), Some(ChannelState::Idle));
    connect(&mut sup, t0);
    assert_eq!(sup.channel_state(c0), Some(ChannelState::AwaitingOpenOk));
    assert_eq!(sup.channel_state(c1), Some(ChannelState::AwaitingOpenOk));
    opened(&mut sup, t0, c0);
    opened(&mut sup, t0, c1);
    assert_eq!(sup.channel_state(c0), Some(ChannelState::Ready));
    // an exchange the broker accepted: each new connection's channel 0 replays it
    let _ = sup.declare_exchange(t0, ExchangeDecl::new("x", ExchangeKind::Topic));
    let on = drain(&mut sup)
        .iter()
        .find_map(|c| match c {
            Command::Topology { channel, .. } => Some(*channel),
            _ => None,
        })
        .expect("the declaration went out");
    topology_done(&mut sup, t0, on);
    // lost after useful work: redialled at once
    let t1 = t0 + Duration::from_secs(1);
    let epoch = sup.connection_epoch(C0).unwrap();
    sup.handle(
        t1,
        Input::ConnectionLost {
            connection: C0,
            epoch,
            error: io(),
        },
    );
    assert_eq!(
        sup.channel_state(c0),
        Some(ChannelState::Reopening { retry_at: None })
    );
    while sup.poll_event().is_some() {}
    connect(&mut sup, t1);
    assert_eq!(sup.channel_state(c1), Some(ChannelState::AwaitingOpenOk));
    // channel 1 opens first: it waits for channel 0 to declare the entities
    opened(&mut sup, t1, c1);
    assert_eq!(sup.channel_state(c1), Some(ChannelState::AwaitingTopology));
    opened(&mut sup, t1, c0);
    assert_eq!(
        sup.channel_state(c0),
        Some(ChannelState::Replaying { done: 0, total: 1 })
    );
    assert_eq!(sup.channel_state(c1), Some(ChannelState::AwaitingTopology));
    assert!(
        drain(&mut sup)
            .iter()
            .any(|c| matches!(c, Command::Topology { channel, .. } if *channel == c0)),
        "the replay step went out"
    );
    topology_done(&mut sup, t1, c0);
    assert_eq!(sup.channel_state(c0), Some(ChannelState::Ready));
    assert_eq!(sup.channel_state(c1), Some(ChannelState::Ready));
    let mut changes = Vec::new();
    while let Some(e) = sup.poll_event() {
        if let Event::StateChanged {
            object: Object::Channel(id),
            from,
            to,
            ..
        } = e
        {
            changes.push((id, from, to));
        }
    }
    assert_eq!(
        changes,
        vec![
            (c0, Phase::Reopening, Phase::Opening),
            (c1, Phase::Reopening, Phase::Opening),
            (c0, Phase::Opening, Phase::Ready),
            (c1, Phase::Opening, Phase::Ready)
        ]
    );
}

/// The config's other host (it has two).
fn other_host(host: &str) -> &'static str {
    if host == "127.0.0.1" {
        "127.0.0.2"
    } else {
        "127.0.0.1"
    }
}

fn dialled_hosts(w: &World, from: usize) -> Vec<String> {
    w.commands[from..]
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Dial { endpoint, .. } => Some(endpoint.host().to_string()),
            _ => None,
        })
        .collect()
}

/// A dial into a host that accepts and says nothing (a paused node) does not hold
/// the slot for the whole connect timeout: after `parallel_dial_after` the next
/// host is dialled beside it, and the first to connect is kept.
#[test]
fn an_unanswered_dial_gets_a_parallel_one_to_the_next_host() {
    let mut w = World::new(config(1, 2, 3));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let first = dialled_hosts(&w, 0)[0].clone();
    let other = other_host(&first);
    // the redial goes to the other host, which is silent
    w.silent_hosts.insert(other.to_string());
    let from = w.commands.len();
    w.run_for(Duration::from_secs(1));
    w.kill(C0, io());
    let took = w
        .run_until_ready(Duration::from_secs(10))
        .expect("ready again");
    assert_eq!(dialled_hosts(&w, from), vec![other.to_string(), first]);
    assert!(
        took <= Duration::from_secs(1) + 3 * common::LATENCY,
        "ready {took:?} after the loss; the connect timeout is 5 s"
    );
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

/// With every host silent, at most two dials per slot are in flight, each ends
/// at its connect timeout, and the backoff still paces the rounds.
#[test]
fn parallel_dials_into_silent_hosts_stay_bounded() {
    let mut w = World::new(config(1, 1, 3));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.silent_hosts.insert("127.0.0.1".into());
    w.silent_hosts.insert("127.0.0.2".into());
    let from = w.commands.len();
    w.run_for(Duration::from_secs(1));
    w.kill(C0, io());
    w.run_for(Duration::from_secs(60));
    let dials = dialled_hosts(&w, from).len();
    // a round (two hosts) takes at least the 5 s connect timeout plus up to the
    // 2 s backoff cap
    assert!(
        (8..=26).contains(&dials),
        "{dials} dials in 60 s into silent hosts"
    );
    w.silent_hosts.clear();
    w.run_until_ready(Duration::from_secs(10))
        .expect("ready once a host answers");
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

/// One host: nothing to dial beside it; the dial runs to its connect timeout.
#[test]
fn one_host_has_no_parallel_dial() {
    let hosts = amqp_rebound_core::endpoint::parse_hosts(["amqp://guest:guest@127.0.0.9:5672/%2f"])
        .unwrap();
    let mut cfg = amqp_rebound_core::Config::new(hosts);
    cfg.connections = 1;
    cfg.channels_per_connection = 1;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.silent_hosts.insert("127.0.0.9".into());
    let from = w.commands.len();
    w.kill(C0, io());
    w.run_for(Duration::from_millis(4_900));
    assert_eq!(dialled_hosts(&w, from).len(), 1);
}

/// One host silent, the other refusing 2 s into each dial: the parallel dial's
/// refusal and the silent dial's timeout both count, so every round over both
/// hosts fails, is waited out by the backoff, and (before a first contact) is
/// reported as the first contact's failure.
#[test]
fn a_refused_parallel_dial_counts_toward_the_round() {
    let mut cfg = config(1, 1, 3);
    cfg.backoff.reset_after = Duration::from_secs(3600);
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let first = dialled_hosts(&w, 0)[0].clone();
    let other = other_host(&first);
    w.silent_hosts.insert(other.to_string());
    w.refusing_hosts.insert(
        first,
        (
            TransportError::Io("connection reset".into()),
            Duration::from_secs(2),
        ),
    );
    let from = w.events.len();
    w.kill(C0, io());
    w.run_for(Duration::from_secs(120));
    let failures: Vec<Duration> = w.events[from..]
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RecoveryFailed { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .collect();
    let waits = failures.iter().filter(|d| !d.is_zero()).count();
    // every host fails once per round: a round is two failures, and each ends
    // in a backoff wait
    assert!(
        waits * 2 + 2 >= failures.len(),
        "{waits} backoff waits for {} failures: {failures:?}",
        failures.len()
    );
}

/// Before any first contact (one host silent, the other refusing 2 s into each
/// dial): the parallel dial's refusal counts, so the first contact's failure is
/// reported after the first round, and every round waits its backoff.
#[test]
fn a_first_contact_through_a_silent_and_a_slowly_refusing_host_fails_after_a_round() {
    let w = &mut World::new_with(config(1, 1, 3), |w| {
        w.silent_hosts.insert("127.0.0.1".into());
        w.refusing_hosts.insert(
            "127.0.0.2".into(),
            (
                TransportError::Io("connection reset".into()),
                Duration::from_secs(2),
            ),
        );
    });
    w.run_for(Duration::from_secs(120));
    let contacts: Vec<Duration> = w
        .events
        .iter()
        .filter_map(|(at, e)| matches!(e, Event::FirstContact { result: Err(_) }).then_some(*at))
        .collect();
    assert_eq!(contacts.len(), 1, "reported once: {contacts:?}");
    assert!(
        contacts[0] <= Duration::from_secs(7),
        "reported at {:?}",
        contacts[0]
    );
    let failures: Vec<Duration> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RecoveryFailed { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .collect();
    let waits = failures.iter().filter(|d| !d.is_zero()).count();
    assert!(
        waits * 2 + 2 >= failures.len(),
        "{waits} backoff waits for {} failures: {failures:?}",
        failures.len()
    );
}
