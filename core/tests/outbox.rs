//! The outbox: placement, confirm windows, confirms, returns, deadlines, requeue
//! on loss, backpressure, blocked connections and close.

mod common;

use std::sync::Arc;
use std::time::Duration;

use amqp_rebound_core::{
    AMQPValue, ChannelId, ChannelInput, Command, Confirmation, ConnectionId, Event, FieldTable,
    Input, Message, Properties, PublishError, PublishId, Returned, TransportError,
};
use common::{World, config, msg};

const C0: ConnectionId = ConnectionId(0);

fn ch(c: u16, i: u16) -> ChannelId {
    ChannelId {
        connection: ConnectionId(c),
        index: i,
    }
}

fn ready_world(connections: usize, channels: usize) -> World {
    let mut w = World::new(config(connections, channels, 1));
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    w
}

fn result_of(w: &World, id: PublishId) -> Vec<common::PublishResult> {
    w.resolutions()
        .into_iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, r)| r)
        .collect()
}

fn publishes(w: &World) -> Vec<(ChannelId, u64, u64)> {
    w.commands
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Publish {
                channel,
                generation,
                seq,
                ..
            } => Some((*channel, *generation, *seq)),
            _ => None,
        })
        .collect()
}

#[test]
fn publish_waits_until_a_channel_is_ready_then_is_confirmed() {
    let mut w = World::new(config(1, 1, 1));
    let id = w.publish(msg(1)).unwrap();
    assert!(publishes(&w).is_empty(), "nothing is Ready yet");
    w.run_for(Duration::from_millis(20));
    assert_eq!(publishes(&w), vec![(ch(0, 0), 1, 1)]);
    assert_eq!(result_of(&w, id), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(w.sup.stats().confirmed, 1);
    assert_eq!(w.sup.stats().outbox_depth, 0);
}

#[test]
fn confirm_window_bounds_messages_in_flight_per_channel() {
    let mut cfg = config(1, 1, 1);
    cfg.confirm_window = 3;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    for n in 0..10 {
        w.publish(msg(n)).unwrap();
    }
    assert_eq!(publishes(&w).len(), 3, "window of 3");
    assert_eq!(w.sup.stats().in_flight, 3);
    // one multiple ack frees the whole window at once: pipelined, not one by one
    w.confirm(ch(0, 0), 3, true, true);
    assert_eq!(publishes(&w).len(), 6);
    let seqs: Vec<u64> = publishes(&w).iter().map(|p| p.2).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(w.sup.stats().confirmed, 3);
}

#[test]
fn nack_resolves_as_nacked_or_is_retried_by_policy() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let id = w.publish(msg(1)).unwrap();
    w.confirm(ch(0, 0), 1, false, false);
    assert_eq!(result_of(&w, id), vec![Err(PublishError::Nacked)]);

    let mut cfg = config(1, 1, 1);
    cfg.retry_nacked = true;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    let id = w.publish(msg(1)).unwrap();
    w.confirm(ch(0, 0), 1, false, false);
    assert!(
        result_of(&w, id).is_empty(),
        "a retried nack does not resolve"
    );
    // sent again after the backoff's initial delay, then after twice that
    // (a full queue that rejects publishes does not get it back in a loop)
    let initial = w.sup.config().backoff.initial;
    assert_eq!(w.sent_payloads(), vec!["1"], "not sent again at once");
    w.run_for(initial - Duration::from_millis(1));
    assert_eq!(w.sent_payloads(), vec!["1"], "not before the pause is over");
    w.run_for(Duration::from_millis(2));
    assert_eq!(w.sent_payloads(), vec!["1", "1"], "re-sent after the nack");
    w.confirm(ch(0, 0), 2, false, false);
    w.run_for(initial + initial / 2);
    assert_eq!(w.sent_payloads(), vec!["1", "1"], "the pause doubled");
    w.run_for(initial);
    assert_eq!(w.sent_payloads(), vec!["1", "1", "1"]);
    assert!(result_of(&w, id).is_empty());
    w.confirm(ch(0, 0), 3, false, true);
    assert_eq!(result_of(&w, id), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(w.sup.stats().republished, 2);

    // a close resolves a message still pausing as Nacked, at once
    let id = w.publish(msg(2)).unwrap();
    w.confirm(ch(0, 0), 4, false, false);
    w.app(|s, now| s.handle(now, Input::CloseNow));
    assert_eq!(result_of(&w, id), vec![Err(PublishError::Nacked)]);
}

/// Nacked messages pausing before their retry count against the outbox's
/// capacity, not as in flight: a broker that nacks everything (a full queue
/// that rejects publishes) does not let the outbox grow past capacity plus
/// window.
#[test]
fn messages_pausing_after_a_nack_count_against_the_capacity() {
    let mut cfg = config(1, 1, 1);
    cfg.retry_nacked = true;
    cfg.outbox_capacity = 8;
    cfg.confirm_window = 4;
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.auto_confirm = false;
    let mut n = 0u64;
    for _ in 0..30 {
        loop {
            n += 1;
            match w.publish(msg(n)) {
                Ok(_) => {}
                Err(PublishError::Backpressure { .. }) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        // the broker nacks the whole window
        w.confirm(ch(0, 0), 4, true, false);
        w.run_for(Duration::from_millis(1));
        let stats = w.sup.stats();
        assert!(stats.in_flight <= 4, "in flight {}", stats.in_flight);
        assert!(
            stats.outbox_depth <= 8 + 4,
            "the outbox holds {}",
            stats.outbox_depth
        );
    }
}

/// The broker returns a message on channel (0, 0) as unroutable.
fn no_route(
    w: &mut World,
    exchange: &str,
    routing_key: &str,
    payload: &'static str,
    properties: Properties,
) {
    let generation = w.sup.channel_generation(ch(0, 0)).unwrap();
    w.input(Input::Channel {
        channel: ch(0, 0),
        generation,
        event: ChannelInput::Returned(Box::new(Returned {
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties,
            payload: payload.into(),
        })),
    });
}

#[test]
fn mandatory_unroutable_resolves_as_returned() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let routed = w
        .publish(Arc::new(Message::new("x", "a", "1").mandatory(true)))
        .unwrap();
    let unroutable = w
        .publish(Arc::new(Message::new("x", "b", "2").mandatory(true)))
        .unwrap();
    no_route(&mut w, "x", "b", "2", Properties::default());
    w.confirm(ch(0, 0), 2, true, true);
    assert_eq!(result_of(&w, routed), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(
        result_of(&w, unroutable),
        vec![Ok(Confirmation::Returned {
            reply_code: 312,
            reply_text: "NO_ROUTE".into()
        })]
    );
}

/// On a headers exchange messages with one routing key are routed apart, and
/// the confirm of a routed one can come after the return of an unroutable one:
/// the return goes to the message it carries (its payload, then its
/// properties), not to the oldest with the same exchange and key.
#[test]
fn a_return_goes_to_the_message_it_carries_among_those_with_its_key() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let kind = |k: &str| {
        let mut headers = FieldTable::default();
        headers.insert(
            "kind".into(),
            AMQPValue::LongString(k.as_bytes().to_vec().into()),
        );
        Properties::default().with_headers(headers)
    };
    let publish = |w: &mut World, payload: &'static str, k: &str| {
        w.publish(Arc::new(
            Message::new("hx", "", payload)
                .with_properties(kind(k))
                .mandatory(true),
        ))
        .unwrap()
    };
    // routed, unroutable, then two alike but for their headers
    let routed = publish(&mut w, "a", "a");
    let unroutable = publish(&mut w, "b", "b");
    let same_routed = publish(&mut w, "same", "a");
    let same_unroutable = publish(&mut w, "same", "b");
    for (payload, k) in [("b", "b"), ("same", "b")] {
        no_route(&mut w, "hx", "", payload, kind(k));
    }
    w.confirm(ch(0, 0), 4, true, true);
    let returned = Ok(Confirmation::Returned {
        reply_code: 312,
        reply_text: "NO_ROUTE".into(),
    });
    assert_eq!(result_of(&w, routed), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(result_of(&w, unroutable), vec![returned.clone()]);
    assert_eq!(
        result_of(&w, same_routed),
        vec![Ok(Confirmation::Confirmed)]
    );
    assert_eq!(result_of(&w, same_unroutable), vec![returned]);
}

#[test]
fn a_resolved_id_is_not_given_to_a_new_publish_before_its_event_is_polled_nor_after() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    // confirmed and then published again before anyone polled the resolution:
    // whoever keys its reply by the id must not see it taken over
    let a = w.app(|sup, now| sup.publish(now, msg(1), None).unwrap());
    let (channel, generation, delivery_tag) = publishes(&w)[0];
    let b = w.app(|sup, now| {
        sup.handle(
            now,
            Input::Channel {
                channel,
                generation,
                event: ChannelInput::Confirm {
                    delivery_tag,
                    multiple: false,
                    ack: true,
                },
            },
        );
        sup.publish(now, msg(2), None).unwrap()
    });
    // an id shows the outbox's slot key: the slot in its low 32 bits, the
    // slot's version above them (memory stays flat: resolved slots are reused)
    let slot = |id: PublishId| {
        let text = format!("{id:?}");
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        digits.parse::<u64>().expect("a number in the id's Debug") as u32
    };
    assert_ne!(
        slot(a),
        slot(b),
        "the slot is kept until the event is polled"
    );
    assert_eq!(result_of(&w, a), vec![Ok(Confirmation::Confirmed)]);
    // polled now: the slot is free again (and taken first), its id is not
    let c = w.publish(msg(3)).unwrap();
    assert_eq!(slot(c), slot(a));
    assert!(c != a && c != b, "{a:?} {b:?} {c:?}");
    // the broker side of the world still holds message 1 (confirmed by hand)
    w.confirm(ch(0, 0), 3, true, true);
    assert_eq!(result_of(&w, a).len(), 1, "a resolved once");
    assert_eq!(result_of(&w, b), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(result_of(&w, c), vec![Ok(Confirmation::Confirmed)]);
}

#[test]
fn loss_republishes_in_publish_order_whatever_slots_the_messages_took() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    // two slots freed in order: the next publishes take them last-freed first,
    // so their ids run against publish order
    w.publish(msg(1)).unwrap();
    w.publish(msg(2)).unwrap();
    w.confirm(ch(0, 0), 2, true, true);
    for n in 10..14 {
        w.publish(msg(n)).unwrap();
    }
    w.kill(C0, TransportError::Io("reset".into()));
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        w.sent_payloads()[6..],
        ["10", "11", "12", "13"],
        "republished oldest first"
    );
}

#[test]
fn loss_republishes_unconfirmed_in_original_order_on_the_new_generation() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    for n in 1..=5 {
        w.publish(msg(n)).unwrap();
    }
    w.confirm(ch(0, 0), 2, true, true); // 1 and 2 confirmed
    w.kill(C0, TransportError::Io("reset".into()));
    w.publish(msg(6)).unwrap(); // waits behind the requeued ones
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        w.sent_payloads(),
        vec!["1", "2", "3", "4", "5", "3", "4", "5", "6"]
    );
    let second: Vec<_> = publishes(&w)[5..].to_vec();
    assert_eq!(
        second,
        vec![
            (ch(0, 0), 2, 1),
            (ch(0, 0), 2, 2),
            (ch(0, 0), 2, 3),
            (ch(0, 0), 2, 4)
        ],
        "seq restarts at 1 on the new generation"
    );
    let results = w.resolutions();
    assert_eq!(results.len(), 6, "every publish resolves exactly once");
    assert!(
        results
            .iter()
            .all(|(_, r)| *r == Ok(Confirmation::Confirmed))
    );
    let stats = w.sup.stats();
    assert_eq!((stats.republished, stats.confirmed), (3, 6));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn confirmed_messages_are_never_republished() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    for n in 1..=4 {
        w.publish(msg(n)).unwrap();
    }
    w.confirm(ch(0, 0), 2, true, true);
    w.channel_error(ch(0, 0), 406);
    w.auto_confirm = true;
    w.run_for(Duration::from_secs(1));
    assert_eq!(w.sent_payloads(), vec!["1", "2", "3", "4", "3", "4"]);
    assert_eq!(w.resolutions().len(), 4);
}

#[test]
fn outbox_capacity_gives_backpressure_and_memory_stays_bounded() {
    let mut cfg = config(1, 1, 1);
    cfg.outbox_capacity = 5;
    let mut w = World::new(cfg);
    for n in 0..5 {
        w.publish(msg(n)).unwrap();
    }
    assert_eq!(
        w.publish(msg(99)),
        Err(PublishError::Backpressure { capacity: 5 })
    );
    assert_eq!(w.sup.stats().outbox_depth, 5);
    w.run_for(Duration::from_millis(50));
    assert!(
        w.publish(msg(100)).is_ok(),
        "room again once the outbox drains"
    );
}

/// A caller that waits for room is accepted at once: its message enters the
/// outbox, in order, when there is room; it times out where it waits; a close
/// drains it, a close without draining resolves it Closed.
#[test]
fn a_full_outbox_keeps_waiting_publishes_in_order_until_there_is_room() {
    let mut cfg = config(1, 1, 1);
    cfg.outbox_capacity = 2;
    let mut w = World::new(cfg);
    let wait = |w: &mut World, n: u64| {
        w.app(|s, now| s.publish_or_wait(now, msg(n), None))
            .unwrap()
    };
    let ids: Vec<PublishId> = (1..=5).map(|n| wait(&mut w, n)).collect();
    assert_eq!(w.sup.outbox_pending(), 2, "only the capacity is pending");
    assert_eq!(
        w.publish(msg(99)),
        Err(PublishError::Backpressure { capacity: 2 }),
        "a caller that does not wait hears the outbox is full"
    );
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(w.sent_payloads(), vec!["1", "2", "3", "4", "5"]);
    for id in &ids {
        assert_eq!(result_of(&w, *id), vec![Ok(Confirmation::Confirmed)]);
    }

    // nothing is Ready: waiting ones time out where they wait
    w.broker_down();
    w.kill(C0, TransportError::Io("reset".into()));
    let late: Vec<PublishId> = (6..=9).map(|n| wait(&mut w, n)).collect();
    w.run_for(Duration::from_secs(31));
    for id in &late {
        assert_eq!(result_of(&w, *id), vec![Err(PublishError::TimedOut)]);
    }

    // a draining close sends the waiting ones too, beyond the capacity, once a
    // channel is back
    let sent = w.sent_payloads().len();
    let drained: Vec<PublishId> = (10..=14).map(|n| wait(&mut w, n)).collect();
    assert_eq!(w.sup.outbox_pending(), 2);
    w.input(Input::Close);
    w.broker_up = true;
    w.run_for(Duration::from_secs(5));
    assert_eq!(
        w.sent_payloads()[sent..].to_vec(),
        vec!["10", "11", "12", "13", "14"]
    );
    for id in &drained {
        assert_eq!(result_of(&w, *id), vec![Ok(Confirmation::Confirmed)]);
    }
}

#[test]
fn a_close_without_draining_resolves_waiting_publishes_closed() {
    let mut cfg = config(1, 1, 1);
    cfg.outbox_capacity = 1;
    let mut w = World::new(cfg);
    let ids: Vec<PublishId> = (1..=3)
        .map(|n| {
            w.app(|s, now| s.publish_or_wait(now, msg(n), None))
                .unwrap()
        })
        .collect();
    w.input(Input::CloseNow);
    for id in &ids {
        assert_eq!(result_of(&w, *id), vec![Err(PublishError::Closed)]);
    }
}

#[test]
fn deadline_resolves_timed_out_and_the_message_is_never_sent_after() {
    let mut w = World::new(config(1, 1, 1));
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.broker_down();
    let id = w.publish(msg(1)).unwrap();
    w.run_for(Duration::from_secs(31));
    assert_eq!(result_of(&w, id), vec![Err(PublishError::TimedOut)]);
    w.broker_up = true;
    w.run_until_ready(Duration::from_secs(20)).unwrap();
    w.run_for(Duration::from_millis(50));
    assert!(w.sent_payloads().is_empty(), "sent after its deadline");
    assert_eq!(w.sup.stats().timed_out, 1);
}

#[test]
fn in_flight_past_deadline_times_out_and_is_not_republished() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let id = w
        .app(|s, now| s.publish(now, msg(1), Some(now + Duration::from_secs(2))))
        .unwrap();
    w.run_for(Duration::from_secs(3));
    assert_eq!(result_of(&w, id), vec![Err(PublishError::TimedOut)]);
    w.kill(C0, TransportError::Io("reset".into()));
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        w.sent_payloads(),
        vec!["1"],
        "not re-sent after its deadline"
    );
    assert_eq!(result_of(&w, id).len(), 1, "resolved exactly once");
}

#[test]
fn bad_publishes_are_typed_errors() {
    let mut w = ready_world(1, 1);
    let past = w.app(|s, now| s.publish(now, msg(1), Some(now)));
    assert_eq!(past, Err(PublishError::TimedOut));
    let long = Arc::new(Message::new("x".repeat(256), "k", "p"));
    assert!(matches!(w.publish(long), Err(PublishError::Invalid(_))));
    w.input(Input::Close);
    assert_eq!(w.publish(msg(2)), Err(PublishError::Closed));
}

#[test]
fn nothing_new_is_published_on_a_blocked_connection() {
    let mut w = ready_world(1, 1);
    let epoch = w.sup.connection_epoch(C0).unwrap();
    w.input(Input::Blocked {
        connection: C0,
        epoch,
        reason: "low on memory".into(),
    });
    let id = w.publish(msg(1)).unwrap();
    w.run_for(Duration::from_secs(1));
    assert!(w.sent_payloads().is_empty());
    w.input(Input::Unblocked {
        connection: C0,
        epoch,
    });
    w.run_for(Duration::from_millis(20));
    assert_eq!(result_of(&w, id), vec![Ok(Confirmation::Confirmed)]);
}

#[test]
fn close_resolves_everything_confirmed_or_closed() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let in_flight = w.publish(msg(1)).unwrap();
    let unconfirmed = w.publish(msg(2)).unwrap();
    w.broker_up = false;
    let mut cfg_waiting = Vec::new();
    // fill the window so a third waits in the outbox
    for n in 3..1030 {
        cfg_waiting.push(w.publish(msg(n)).unwrap());
    }
    w.input(Input::Close);
    let closing = w
        .commands
        .iter()
        .any(|(_, c)| matches!(c, Command::CloseConnection { .. }));
    assert!(!closing, "waits for in-flight confirms before closing");
    w.confirm(ch(0, 0), 1, false, true);
    w.run_for(Duration::from_secs(6)); // past the close timeout
    assert_eq!(result_of(&w, in_flight), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(result_of(&w, unconfirmed), vec![Err(PublishError::Closed)]);
    let waiting = cfg_waiting.last().unwrap();
    assert_eq!(result_of(&w, *waiting), vec![Err(PublishError::Closed)]);
    assert_eq!(
        w.resolutions().len(),
        2 + cfg_waiting.len(),
        "nothing unresolved"
    );
    assert!(w.sup.is_fully_closed());
}

#[test]
fn publish_to_a_missing_exchange_fails_that_publish_only() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let good = w.publish(Arc::new(Message::new("", "q", "good"))).unwrap();
    let bad = w
        .publish(Arc::new(Message::new("missing-x", "k", "bad")))
        .unwrap();
    let generation = w.sup.channel_generation(ch(0, 0)).unwrap();
    w.live_chans.remove(&ch(0, 0));
    w.input(Input::Channel {
        channel: ch(0, 0),
        generation,
        event: ChannelInput::Lost(TransportError::Reply {
            code: 404,
            text: "NOT_FOUND - no exchange 'missing-x' in vhost '/'".into(),
        }),
    });
    assert!(matches!(
        result_of(&w, bad).as_slice(),
        [Err(PublishError::Rejected { code: 404, .. })]
    ));
    w.auto_confirm = true;
    w.run_for(Duration::from_secs(1));
    assert_eq!(result_of(&w, good), vec![Ok(Confirmation::Confirmed)]);
    assert_eq!(w.sent_payloads(), vec!["good", "bad", "good"]);
}

#[test]
fn a_message_that_keeps_closing_channels_is_rejected_after_three_strikes() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let id = w.publish(msg(1)).unwrap();
    for _ in 0..3 {
        w.run_until_ready(Duration::from_secs(20)).unwrap();
        w.channel_error(ch(0, 0), 406);
    }
    assert!(matches!(
        result_of(&w, id).as_slice(),
        [Err(PublishError::Rejected { code: 406, .. })]
    ));
}

/// 403 closing a channel is a soft error too (at the handshake it is a refused
/// login): a message that keeps drawing it strikes out like one drawing 406.
#[test]
fn a_message_that_keeps_drawing_403_is_rejected_after_three_strikes() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let id = w.publish(msg(1)).unwrap();
    for _ in 0..3 {
        w.run_until_ready(Duration::from_secs(20)).unwrap();
        w.channel_error(ch(0, 0), 403);
    }
    assert!(matches!(
        result_of(&w, id).as_slice(),
        [Err(PublishError::Rejected { code: 403, .. })]
    ));
}

#[test]
fn events_report_every_resolution_once() {
    let mut w = ready_world(2, 2);
    for n in 0..100 {
        w.publish(msg(n)).unwrap();
    }
    w.run_for(Duration::from_millis(100));
    let ids: std::collections::BTreeSet<_> = w.resolutions().iter().map(|(i, _)| *i).collect();
    assert_eq!(ids.len(), 100);
    assert_eq!(w.resolutions().len(), 100);
    assert!(
        w.events
            .iter()
            .all(|(_, e)| !matches!(e, Event::PublishResolved { result: Err(_), .. }))
    );
}

/// A confirm for a number the channel never published means the transport's
/// count and the supervisor's disagree: every later confirm would resolve the
/// wrong message, so the channel goes and its messages are sent again.
#[test]
fn a_confirm_beyond_what_was_published_fails_the_channel_and_resends() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let id = w.publish(msg(1)).unwrap();
    let generation = w.sup.channel_generation(ch(0, 0)).unwrap();
    w.input(Input::Channel {
        channel: ch(0, 0),
        generation,
        event: ChannelInput::Confirm {
            delivery_tag: 7,
            multiple: true,
            ack: true,
        },
    });
    assert!(
        result_of(&w, id).is_empty(),
        "not confirmed by a wrong number"
    );
    w.auto_confirm = true;
    w.run_until_ready(Duration::from_secs(5))
        .expect("the channel reopens");
    w.run_for(Duration::from_millis(20));
    assert_eq!(w.sup.channel_generation(ch(0, 0)), Some(generation + 1));
    assert_eq!(w.sent_payloads(), vec!["1", "1"]);
    assert_eq!(result_of(&w, id), vec![Ok(Confirmation::Confirmed)]);
}

/// A refusal that names its culprit fails the culprit only: the messages in
/// flight beside it are sent again without a strike, however many such
/// refusals come (three bad messages must not take the good ones with them).
#[test]
fn refusals_that_name_their_culprit_strike_nobody_else() {
    let mut w = ready_world(1, 1);
    w.auto_confirm = false;
    let good: Vec<_> = (0..5)
        .map(|n| {
            w.publish(Arc::new(Message::new("", "q", format!("good {n}"))))
                .unwrap()
        })
        .collect();
    let mut bad = Vec::new();
    for exchange in ["missing-a", "missing-b", "missing-c", "missing-d"] {
        w.run_until_ready(Duration::from_secs(20)).unwrap();
        bad.push(
            w.publish(Arc::new(Message::new(exchange, "k", "bad")))
                .unwrap(),
        );
        w.channel_closed(
            ch(0, 0),
            TransportError::Reply {
                code: 404,
                text: format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'"),
            },
        );
    }
    for id in bad {
        assert!(matches!(
            result_of(&w, id).as_slice(),
            [Err(PublishError::Rejected { code: 404, .. })]
        ));
    }
    w.auto_confirm = true;
    w.run_for(Duration::from_secs(5));
    for id in good {
        assert_eq!(result_of(&w, id), vec![Ok(Confirmation::Confirmed)]);
    }
}
