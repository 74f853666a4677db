//! A connection's topology replay that runs while the application's delete is in
//! flight on another channel: what the delete removes is skipped, run after all
//! if the delete fails, and ended with it if it succeeds.
mod common;

use std::time::Duration;

use amqp_rebound_core::{
    ChannelId, ChannelState, Command, ConsumerId, Event, ExchangeDecl, ExchangeKind, FieldTable,
    QueueDecl, QueueRef, TopologyOp, TransportError,
};
use common::{World, ch, consume_as, ready_world};

/// Loses `lost`'s connection and steps time until its replay has sent a
/// step that `at` picks on `lost`, then `then` more.
fn replay_until(w: &mut World, lost: ChannelId, at: impl Fn(&TopologyOp) -> bool, then: Duration) {
    let from = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    until_sent(
        w,
        from,
        |c| matches!(c, Command::Topology { channel, op, .. } if *channel == lost && at(op)),
    );
    w.run_for(then);
}

/// Loses `lost`'s connection and, once its replay reached the consumer's
/// `basic.qos`, has the application delete `queue` (on another connection).
fn delete_during_the_replay(w: &mut World, lost: ChannelId, queue: QueueRef) {
    replay_until(
        w,
        lost,
        |op| matches!(op, TopologyOp::Qos { .. }),
        Duration::from_micros(100),
    );
    w.app(|s, now| s.delete_queue(now, queue)).unwrap();
}

/// Declares the durable queue `queue` and consumes it as `tag`, by name or by
/// the declaration's handle; both taken.
fn declared_and_consumed(
    w: &mut World,
    queue: &str,
    tag: &str,
    by_handle: bool,
) -> (QueueRef, ConsumerId) {
    let (_, h) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable(queue)))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    let queue: QueueRef = if by_handle { h.into() } else { queue.into() };
    let k = consume_as(w, queue.clone(), tag);
    w.run_for(Duration::from_millis(20));
    (queue, k)
}

/// Whether the broker ends with the binding that `bind` recognises: the last
/// such op in the topology log is a bind (`Some(true)`), not an unbind
/// (`Some(false)`).
fn bound_at_the_end(w: &World, bind: impl Fn(&TopologyOp) -> Option<bool>) -> bool {
    w.topology_log
        .iter()
        .filter_map(|(_, op)| bind(op))
        .last()
        .unwrap_or(false)
}

/// Steps time by 100us until `pred` holds on the commands sent since `from`.
fn until_sent(w: &mut World, from: usize, pred: impl Fn(&Command) -> bool) {
    for _ in 0..10_000 {
        if w.commands[from..].iter().any(|(_, c)| pred(c)) {
            return;
        }
        w.run_for(Duration::from_micros(100));
    }
    panic!("never sent\n{}", w.trace);
}

fn until_ready(w: &mut World, channel: ChannelId) {
    for _ in 0..10_000 {
        if w.sup.channel_state(channel) == Some(ChannelState::Ready) {
            return;
        }
        w.run_for(Duration::from_micros(100));
    }
    panic!("never ready\n{}", w.trace);
}

fn topology_on(w: &World, from: usize, channel: ChannelId) -> Vec<TopologyOp> {
    w.commands[from..]
        .iter()
        .filter_map(|(_, c)| match c {
            Command::Topology {
                channel: at, op, ..
            } if *at == channel => Some(op.clone()),
            _ => None,
        })
        .collect()
}

fn topology_resolutions(w: &World) -> usize {
    w.events
        .iter()
        .filter(|(_, e)| matches!(e, Event::TopologyResolved { result: Err(_), .. }))
        .count()
}

/// The consumer's basic.consume is skipped while the delete is in flight;
/// the broker then refuses the delete: the consumer is subscribed after all,
/// on the same channel generation.
#[test]
fn a_consumer_skipped_for_a_delete_that_is_refused_is_subscribed_after_all() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    let (_, k) = declared_and_consumed(&mut w, "doomed", "k", false);
    assert_eq!(w.sup.consumer_channel(k), Some(lost));
    let from = w.commands.len();
    let refusals = topology_resolutions(&w);
    delete_during_the_replay(&mut w, lost, "doomed".into());
    until_ready(&mut w, lost);
    // the delete is still in flight on (1, 0); the broker refuses it
    assert_eq!(topology_resolutions(&w), refusals, "delete still in flight");
    w.channel_closed(
        ch(1, 0),
        TransportError::Reply {
            code: 403,
            text: "ACCESS_REFUSED - configure access to queue 'doomed' refused".into(),
        },
    );
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        topology_resolutions(&w),
        refusals + 1,
        "the delete was refused"
    );
    assert!(
        !w.events
            .iter()
            .any(|(_, e)| matches!(e, Event::ConsumerEnded { .. })),
        "the consumer lives on"
    );
    assert_eq!(w.sup.consumer_channel(k), Some(lost));
    assert_eq!(w.sup.channel_state(lost), Some(ChannelState::Ready));
    let consumes: Vec<_> = topology_on(&w, from, lost)
        .into_iter()
        .filter(|op| matches!(op, TopologyOp::Consume { .. }))
        .collect();
    assert!(
        !consumes.is_empty(),
        "BUG: the consumer is registered and its channel Ready, but no basic.consume went out since the loss: {:?}",
        topology_on(&w, from, lost)
    );
}

/// The delete succeeds: the consumer whose consume was skipped (never
/// subscribed, so never cancelled by the broker) ends with the delete.
#[test]
fn a_consumer_skipped_for_a_delete_ends_when_the_delete_succeeds() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    let (h, k) = declared_and_consumed(&mut w, "doomed", "k", true);
    assert_eq!(w.sup.consumer_channel(k), Some(lost));
    let from = w.commands.len();
    delete_during_the_replay(&mut w, lost, h);
    w.run_for(Duration::from_secs(5));
    assert!(
        w.events
            .iter()
            .any(|(_, e)| matches!(e, Event::TopologyResolved { result: Ok(_), .. })),
        "the delete was taken"
    );
    assert!(
        w.events
            .iter()
            .any(|(_, e)| matches!(e, Event::ConsumerEnded { consumer, .. } if *consumer == k)),
        "BUG: the consumer of the deleted queue never ends (still on {:?}); its consume since the loss: {:?}",
        w.sup.consumer_channel(k),
        topology_on(&w, from, lost)
    );
}

/// An exclusive queue of connection 0 is bound to exchange x. While the delete
/// of x is in flight on connection 1, connection 0's replay re-creates the
/// exclusive queue (it died with the connection) and skips its binding to x;
/// the broker refuses the delete: the new queue is bound to x after all.
#[test]
fn an_exclusive_queue_binding_skipped_for_a_refused_exchange_delete_is_made_after_all() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Direct)))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    let decl = QueueDecl {
        name: "mine".into(),
        exclusive: true,
        ..QueueDecl::default()
    };
    let (_, h) = w.app(|s, now| s.declare_queue(now, decl)).unwrap();
    w.run_for(Duration::from_millis(20));
    w.app(|s, now| s.bind_queue(now, h.into(), "x", "k", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    // the exclusive queue lives on connection 0
    assert!(
        w.topology_log
            .iter()
            .any(|(c, op)| *c == lost
                && matches!(op, TopologyOp::DeclareQueue(d) if d.name == "mine"))
    );
    let from = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    until_sent(
        &mut w,
        from,
        |c| matches!(c, Command::Topology { channel, op: TopologyOp::DeclareQueue(d), .. } if *channel == lost && d.name == "mine"),
    );
    w.run_for(Duration::from_micros(100));
    let refusals = topology_resolutions(&w);
    w.app(|s, now| s.delete_exchange(now, "x")).unwrap();
    until_ready(&mut w, lost);
    assert_eq!(topology_resolutions(&w), refusals, "delete still in flight");
    w.channel_closed(
        ch(1, 0),
        TransportError::Reply {
            code: 403,
            text: "ACCESS_REFUSED - configure access to exchange 'x' refused".into(),
        },
    );
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        topology_resolutions(&w),
        refusals + 1,
        "the delete was refused"
    );
    let replayed = topology_on(&w, from, lost);
    // the registry still holds the binding: the next recovery replays it
    let again = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    let next = topology_on(&w, again, lost);
    assert!(
        next.iter()
            .any(|op| matches!(op, TopologyOp::BindQueue { queue, .. } if queue == "mine")),
        "the registry kept the binding: {next:?}"
    );
    assert!(
        replayed
            .iter()
            .any(|op| matches!(op, TopologyOp::BindQueue { queue, .. } if queue == "mine")),
        "BUG: the re-created exclusive queue was never bound to x, which the broker kept: {replayed:?}"
    );
}

/// Queue "doomed" is the only binding of auto-delete exchange "ax", which the
/// broker deletes with it: the replay that starts while the delete of "doomed"
/// is in flight skips "ax" too, or it would re-create it for good.
#[test]
fn a_replay_during_a_queue_delete_skips_the_auto_delete_exchange_it_removes() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    let ax = ExchangeDecl {
        auto_delete: true,
        ..ExchangeDecl::new("ax", ExchangeKind::Direct)
    };
    w.app(|s, now| s.declare_exchange(now, ax)).unwrap();
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("doomed")))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, "doomed".into(), "ax", "k", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    let from = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    until_sent(
        &mut w,
        from,
        |c| matches!(c, Command::OpenChannel { channel, .. } if *channel == lost),
    );
    w.run_for(Duration::from_micros(100));
    let deleted_at = w.commands.len();
    w.app(|s, now| s.delete_queue(now, "doomed".into()))
        .unwrap();
    w.run_until_ready(Duration::from_secs(2)).unwrap();
    let after = topology_on(&w, deleted_at, lost);
    // the client forgot ax: the next recovery does not declare it
    let again = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    let next = topology_on(&w, again, lost);
    assert!(
        !next
            .iter()
            .any(|op| matches!(op, TopologyOp::DeclareExchange(d) if d.name == "ax")),
        "the registry forgot ax: {next:?}"
    );
    assert!(
        !after
            .iter()
            .any(|op| matches!(op, TopologyOp::DeclareExchange(d) if d.name == "ax")),
        "BUG: auto-delete exchange ax (deleted by the broker with the queue's binding) declared again after the delete went out, bindingless for good: {after:?}"
    );
}

/// Single connection, single channel. The broker cancels consumer k (its
/// queue went away); its re-declaration is queued behind another consumer's
/// steps, and the application's delete of the queue behind it on the same
/// channel: the re-declaration is not skipped (it reaches the broker before
/// the delete), and after the broker refuses the delete, a later cancel of k
/// re-declares and re-subscribes.
#[test]
fn a_redeclaration_queued_before_a_delete_on_its_channel_is_not_skipped() {
    use amqp_rebound_core::{ChannelInput, Input};
    let mut w = ready_world(1, 1);
    let c00 = ch(0, 0);
    let (_, k) = declared_and_consumed(&mut w, "q", "k", false);
    // another consumer's steps keep the channel busy
    consume_as(&mut w, "other".into(), "k2");
    let cancel = |w: &mut World| {
        let generation = w.sup.channel_generation(c00).unwrap();
        w.input(Input::Channel {
            channel: c00,
            generation,
            event: ChannelInput::ConsumerCancelled {
                consumer_tag: "k".into(),
            },
        });
    };
    cancel(&mut w);
    let from = w.commands.len();
    w.app(|s, now| s.delete_queue(now, "q".into())).unwrap();
    until_sent(&mut w, from, |c| {
        matches!(
            c,
            Command::Topology {
                op: TopologyOp::DeleteQueue { .. },
                ..
            }
        )
    });
    let before_refusal = topology_on(&w, from, c00);
    w.channel_closed(
        c00,
        TransportError::Reply {
            code: 403,
            text: "ACCESS_REFUSED".into(),
        },
    );
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.sup.channel_state(c00), Some(ChannelState::Ready));
    assert_eq!(w.sup.consumer_channel(k), Some(c00), "k lives on");
    // later the broker cancels k again (its queue's node went down, say)
    let again = w.commands.len();
    cancel(&mut w);
    w.run_for(Duration::from_secs(2));
    let after = topology_on(&w, again, c00);
    assert!(
        after.iter().any(
            |op| matches!(op, TopologyOp::Consume { consumer_tag, .. } if consumer_tag == "k")
        ),
        "BUG: k, cancelled by the broker again, is neither re-declared nor re-subscribed: {after:?}; \
         before the refusal: {before_refusal:?}"
    );
}

/// Whether the broker, from the ops it ran in order, ends with queue `q`
/// bound to exchange `x` with key `k`.
/// Whether the broker ends with q bound to x with key k.
fn broker_has_binding(w: &World) -> bool {
    bound_at_the_end(w, |op| match op {
        TopologyOp::BindQueue {
            queue,
            exchange,
            routing_key,
            ..
        } if queue == "q" && exchange == "x" && routing_key == "k" => Some(true),
        TopologyOp::UnbindQueue {
            queue,
            exchange,
            routing_key,
            ..
        } if queue == "q" && exchange == "x" && routing_key == "k" => Some(false),
        _ => None,
    })
}

/// Queue q is bound to x. Connection 0's replay sends that binding again
/// while the application's unbind of it is in flight on connection 1: the
/// binding reaches the broker after the unbind and would stay there for good,
/// the registry having forgotten it. The replay skips it instead.
#[test]
fn a_replay_during_an_unbind_in_flight_does_not_bind_again() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Direct)))
        .unwrap();
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, "q".into(), "x", "k", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    assert!(broker_has_binding(&w));
    // the replay's step before the binding is in flight
    replay_until(
        &mut w,
        lost,
        |op| matches!(op, TopologyOp::DeclareQueue(d) if d.name == "q"),
        Duration::from_millis(1),
    );
    let unbind_at = w.commands.len();
    w.app(|s, now| s.unbind_queue(now, "q".into(), "x", "k", FieldTable::default()))
        .unwrap();
    assert!(
        topology_on(&w, unbind_at, ch(1, 0))
            .iter()
            .any(|op| matches!(op, TopologyOp::UnbindQueue { .. })),
        "the unbind runs on connection 1"
    );
    w.run_until_ready(Duration::from_secs(2)).unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(topology_resolutions(&w), 0, "nothing failed");
    assert!(
        !broker_has_binding(&w),
        "BUG: the replay re-bound q to x after the unbind: the broker keeps a binding the client forgot\n{:?}",
        w.topology_log
    );
}

/// The same for an exchange-to-exchange binding.
#[test]
fn a_replay_during_an_exchange_unbind_in_flight_does_not_bind_again() {
    let mut w = ready_world(2, 1);
    let lost = ch(0, 0);
    for name in ["x", "y"] {
        w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new(name, ExchangeKind::Direct)))
            .unwrap();
    }
    w.app(|s, now| s.bind_exchange(now, "y", "x", "k", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    replay_until(
        &mut w,
        lost,
        |op| matches!(op, TopologyOp::DeclareExchange(d) if d.name == "y"),
        Duration::from_millis(1),
    );
    w.app(|s, now| s.unbind_exchange(now, "y", "x", "k", FieldTable::default()))
        .unwrap();
    w.run_until_ready(Duration::from_secs(2)).unwrap();
    w.run_for(Duration::from_millis(50));
    let bound = bound_at_the_end(&w, |op| match op {
        TopologyOp::BindExchange { .. } => Some(true),
        TopologyOp::UnbindExchange { .. } => Some(false),
        _ => None,
    });
    assert!(
        !bound,
        "BUG: the replay re-bound y to x after the unbind\n{:?}",
        w.topology_log
    );
}
