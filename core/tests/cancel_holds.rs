//! Publish holds after an auto-ack consumer's cancel, and cancels during a
//! replay: no timer left in the past, no expired publish sent, no subscription
//! left on the broker.

mod common;

use std::time::Duration;

use amqp_rebound_core::{
    ChannelState, ConnectionId, ConsumeOptions, Input, QueueRef, TopologyOp, TransportError,
};
use common::{World, config};

fn no_ack_consumer(w: &mut World, queue: &str) -> amqp_rebound_core::ConsumerId {
    let id = w
        .app(|s, now| {
            s.consume(
                now,
                QueueRef::Named(queue.into()),
                None,
                ConsumeOptions {
                    no_ack: true,
                    ..ConsumeOptions::default()
                },
            )
        })
        .unwrap();
    w.run_for(Duration::from_millis(50));
    id
}

fn assert_no_past_timer(w: &World, what: &str) {
    let next = w.sup.poll_timeout();
    assert!(
        next.is_none_or(|t| t > w.now),
        "{what}: poll_timeout is {:?} before now right after handle(Timeout): the driver spins",
        next.map(|t| w.now - t)
    );
}

/// No channel has room (confirm window full: a stalled broker, or a blocked
/// connection) when an auto-ack consumer is cancelled, and the broker does not
/// answer the cancel: past CANCEL_HOLD_MAX, the hold's deadline must not stay
/// armed in the past.
#[test]
fn an_expired_hold_leaves_no_past_deadline_while_no_channel_has_room() {
    let mut cfg = config(1, 1, 1);
    cfg.confirm_window = 1;
    cfg.publish_timeout = Duration::from_secs(600);
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    let consumer = no_ack_consumer(&mut w, "q");
    w.auto_confirm = false;
    w.publish(common::msg(1)).unwrap(); // in flight, never confirmed
    w.publish(common::msg(2)).unwrap(); // waits: no room -> room = false
    w.app(|s, now| s.cancel(now, consumer)).unwrap();
    // the broker answers nothing for 6 s (we do not run the world's answers)
    w.now += Duration::from_secs(6);
    w.input(Input::Timeout);
    assert_no_past_timer(&w, "first Timeout");
}

/// Closed right after an auto-ack consumer's cancel: the hold ends with the
/// close, and leaves no deadline armed.
#[test]
fn a_close_ends_the_holds_and_their_deadline() {
    let mut w = World::new(config(1, 1, 1));
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    let consumer = no_ack_consumer(&mut w, "q");
    w.app(|s, now| s.cancel(now, consumer)).unwrap();
    w.input(Input::CloseNow);
    w.run_for(Duration::from_secs(1));
    assert!(w.sup.is_closed(), "closed");
    w.now += Duration::from_secs(5);
    w.input(Input::Timeout);
    assert_no_past_timer(&w, "after close");
}

/// A consumer cancelled while its channel replays, after its basic.consume was
/// answered, gets its basic.cancel: else the broker keeps delivering to a tag
/// the client forgot.
#[test]
fn a_consumer_cancelled_mid_replay_after_its_consume_ok_is_cancelled_on_the_broker() {
    let mut w = World::new(config(1, 1, 1));
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    let a = no_ack_consumer(&mut w, "q1");
    let _b = no_ack_consumer(&mut w, "q2");
    w.kill(ConnectionId(0), TransportError::Io("reset".into()));
    let logged = w.topology_log.len();
    let consumes = |w: &World| {
        w.topology_log[logged..]
            .iter()
            .filter(|(_, op)| matches!(op, TopologyOp::Consume { queue, .. } if queue == "q1"))
            .count()
    };
    let mut steps = 0;
    while consumes(&w) == 0 {
        w.run_for(Duration::from_micros(500));
        steps += 1;
        assert!(steps < 100_000);
    }
    let channel = w.sup.consumer_channel(a).unwrap();
    assert!(
        matches!(
            w.sup.channel_state(channel),
            Some(ChannelState::Replaying { .. })
        ),
        "{:?}",
        w.sup.channel_state(channel)
    );
    w.app(|s, now| s.cancel(now, a)).unwrap();
    w.run_for(Duration::from_secs(1));
    let cancels = w.topology_log[logged..]
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::Cancel { .. }))
        .count();
    assert_eq!(
        cancels, 1,
        "basic.cancel sent for the consumer subscribed in this replay"
    );
}

/// A publish whose deadline passed while it was held, seen in the same advance
/// as the hold's end: it resolves TimedOut and is never sent (publishes expire
/// before a hold's end lets the rest go).
#[test]
fn a_publish_past_its_deadline_is_not_sent_when_a_hold_ends() {
    let mut cfg = config(1, 1, 1);
    cfg.publish_timeout = Duration::from_secs(2);
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    let consumer = no_ack_consumer(&mut w, "q");
    w.app(|s, now| s.cancel(now, consumer)).unwrap();
    w.publish(common::msg(1)).unwrap();
    assert!(w.sent_payloads().is_empty(), "held");
    // the driver wakes late (a suspended process, a coarse timer): both the
    // publish deadline and the hold bound have passed
    w.now += Duration::from_secs(6);
    w.input(Input::Timeout);
    let timed_out = w
        .resolutions()
        .iter()
        .any(|(_, r)| matches!(r, Err(amqp_rebound_core::PublishError::TimedOut)));
    assert!(timed_out, "{:?}", w.resolutions());
    assert!(
        w.sent_payloads().is_empty(),
        "sent after its deadline, and reported TimedOut: {:?}",
        w.sent_payloads()
    );
}
