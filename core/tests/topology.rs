//! Topology replay, server-named queue renames, consumers and stale-ack protection.

mod common;

use std::time::Duration;

use amqp_rebound_core::{
    AMQPValue, AckError, AckKind, ChannelId, ChannelInput, ChannelState, ConnectionId,
    ConsumeError, ConsumeOptions, Event, ExchangeDecl, ExchangeKind, FieldTable, QueueDecl,
    QueueRef, TopologyError, TopologyOp, TransportError,
};
use common::{World, config, consume_as};

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

/// The broker closes channel (0, 0) with `code` and `text`.
fn broker_closes(w: &mut World, code: u16, text: &str) {
    w.channel_closed(
        ch(0, 0),
        TransportError::Reply {
            code,
            text: text.into(),
        },
    );
}

fn kill(w: &mut World) {
    w.kill(C0, TransportError::Io("reset".into()));
}

/// Declares exchange "x", durable queue "q", binding q<-x "k", server-named queue
/// bound to x "all"; returns the server-named handle.
fn declare_topology(w: &mut World) -> amqp_rebound_core::QueueHandle {
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Topic)))
        .unwrap();
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, q.into(), "x", "k", FieldTable::default()))
        .unwrap();
    let (_, anon) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::server_named()))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, anon.into(), "x", "#", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    anon
}

fn op_names(log: &[(ChannelId, TopologyOp)]) -> Vec<String> {
    log.iter()
        .map(|(_, op)| match op {
            TopologyOp::DeclareExchange(d) => format!("exchange {}", d.name),
            TopologyOp::DeclareQueue(d) => format!("queue {:?}", d.name),
            TopologyOp::BindQueue {
                queue, routing_key, ..
            } => format!("bind {queue} {routing_key}"),
            TopologyOp::Qos { prefetch_count } => format!("qos {prefetch_count}"),
            TopologyOp::Consume {
                queue,
                consumer_tag,
                ..
            } => format!("consume {queue} {consumer_tag}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn declarations_run_in_order_and_resolve() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w);
    assert_eq!(
        op_names(&w.topology_log),
        vec![
            "exchange x",
            "queue \"q\"",
            "bind q k",
            "queue \"\"",
            "bind amq.gen-1 #"
        ]
    );
    assert_eq!(w.sup.queue_name(anon).as_deref(), Some("amq.gen-1"));
    let resolved = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::TopologyResolved { result: Ok(_), .. }))
        .count();
    assert_eq!(resolved, 5);
}

#[test]
fn replay_restores_topology_before_the_channel_is_ready_and_renames_server_named_queues() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w);
    let consumer = consume_as(&mut w, anon.into(), "c1");
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    w.auto_confirm = false;
    kill(&mut w);
    w.publish(common::msg(1)).unwrap();
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    assert_eq!(
        op_names(&w.topology_log),
        vec![
            "exchange x",
            "queue \"q\"",
            "bind q k",
            "queue \"\"", // declared with "" again: never the old amq.gen name
            "bind amq.gen-2 #",
            "qos 0",
            "consume amq.gen-2 c1",
        ]
    );
    assert_eq!(w.sup.queue_name(anon).as_deref(), Some("amq.gen-2"));
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::QueueRenamed { old, new, .. } if old == "amq.gen-1" && new == "amq.gen-2"
    )));
    // the publish went out only after the replay (the channel was not Ready before)
    let publish_at = w
        .commands
        .iter()
        .rposition(|(_, c)| matches!(c, amqp_rebound_core::Command::Publish { .. }))
        .unwrap();
    let last_topology = w
        .commands
        .iter()
        .rposition(|(_, c)| matches!(c, amqp_rebound_core::Command::Topology { .. }))
        .unwrap();
    assert!(publish_at > last_topology);
    assert!(w.sup.consumer_channel(consumer).is_some());
}

#[test]
fn failed_replay_step_is_reported_and_retried_not_skipped() {
    let mut w = ready_world(1, 1);
    declare_topology(&mut w);
    w.topology_log.clear();
    kill(&mut w);
    w.fail_topology = Some(TransportError::Reply {
        code: 403,
        text: "ACCESS_REFUSED".into(),
    });
    w.run_until_ready(Duration::from_secs(20))
        .expect("recovers after the failure");
    let failed: Vec<_> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ReplayFailed { step, error, .. } => Some((step.clone(), error.reply_code())),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].0.contains("DeclareExchange"), "{failed:?}");
    assert_eq!(failed[0].1, Some(403));
    // after the retry every step ran: nothing silently skipped
    let names = op_names(&w.topology_log);
    for expected in ["exchange x", "queue \"q\"", "bind q k", "queue \"\""] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    assert_eq!(w.sup.stats().replay_failures, 1);
}

#[test]
fn deletions_remove_entries_from_replay() {
    let mut w = ready_world(1, 1);
    let anon = declare_topology(&mut w);
    w.app(|s, now| s.delete_queue(now, anon.into())).unwrap();
    w.app(|s, now| s.unbind_queue(now, "q".into(), "x", "k", FieldTable::default()))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    assert_eq!(op_names(&w.topology_log), vec!["exchange x", "queue \"q\""]);
    assert_eq!(w.sup.queue_name(anon), None);
}

#[test]
fn a_declaration_made_again_replays_as_the_broker_last_took_it() {
    let mut w = ready_world(1, 1);
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Topic)))
        .unwrap();
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    // deleted by another application, then declared again otherwise
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Fanout)))
        .unwrap();
    let mut transient = QueueDecl::durable("q");
    transient.durable = false;
    w.app(|s, now| s.declare_queue(now, transient)).unwrap();
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let replayed: Vec<_> = w.topology_log.iter().map(|(_, op)| op).collect();
    assert!(
        matches!(
            replayed[..],
            [
                TopologyOp::DeclareExchange(ExchangeDecl {
                    kind: ExchangeKind::Fanout,
                    ..
                }),
                TopologyOp::DeclareQueue(QueueDecl { durable: false, .. })
            ]
        ),
        "{replayed:?}"
    );
}

/// An auto-delete queue whose last consumer the application cancels, and an
/// auto-delete exchange that loses its last binding (also through what that
/// takes with it), are deleted by the broker: they are not declared again at
/// the next recovery. Those that keep a consumer or a binding, and the others,
/// are.
#[test]
fn auto_delete_entities_the_broker_deleted_are_not_declared_again() {
    let mut w = ready_world(1, 1);
    let auto_exchange = |name: &str| {
        let mut decl = ExchangeDecl::new(name, ExchangeKind::Direct);
        decl.auto_delete = true;
        decl
    };
    let (_, lone) = w
        .app(|s, now| s.declare_queue(now, auto_delete_queue("lone")))
        .unwrap();
    w.app(|s, now| s.declare_queue(now, auto_delete_queue("shared")))
        .unwrap();
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("plain")))
        .unwrap();
    for name in ["ax", "src", "dst", "kept"] {
        w.app(|s, now| s.declare_exchange(now, auto_exchange(name)))
            .unwrap();
    }
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("px", ExchangeKind::Direct)))
        .unwrap();
    for (exchange, key) in [("ax", "a"), ("dst", "d"), ("kept", "k1"), ("kept", "k2")] {
        w.app(|s, now| s.bind_queue(now, "plain".into(), exchange, key, FieldTable::default()))
            .unwrap();
    }
    w.app(|s, now| s.bind_queue(now, "plain".into(), "px", "p", FieldTable::default()))
        .unwrap();
    w.app(|s, now| s.bind_exchange(now, "dst", "src", "e", FieldTable::default()))
        .unwrap();
    let mut consumers = Vec::new();
    for queue in ["lone", "shared", "shared", "plain"] {
        let id = w
            .app(|s, now| s.consume(now, queue.into(), None, ConsumeOptions::default()))
            .unwrap();
        consumers.push(id);
    }
    w.run_for(Duration::from_millis(50));
    // the last consumer of "lone", one of two of "shared", the only one of "plain"
    for id in [consumers[0], consumers[1], consumers[3]] {
        w.app(|s, now| s.cancel(now, id)).unwrap();
    }
    // the last binding of "ax" and of "dst" (whose loss unbinds "src"), one of
    // two of "kept", the only one of the plain "px"
    for (exchange, key) in [("ax", "a"), ("dst", "d"), ("kept", "k1"), ("px", "p")] {
        w.app(|s, now| s.unbind_queue(now, "plain".into(), exchange, key, FieldTable::default()))
            .unwrap();
    }
    w.run_for(Duration::from_millis(50));
    // the forgotten queue's handle still names it: a delete of it goes to the
    // broker (which deletes nothing, and says so)
    let log = w.topology_log.len();
    w.app(|s, now| s.delete_queue(now, lone.into()))
        .expect("a delete by the handle of a forgotten queue");
    w.run_for(Duration::from_millis(20));
    assert!(
        matches!(&w.topology_log[log..], [(_, TopologyOp::DeleteQueue { name, .. })] if name == "lone"),
        "{:?}",
        &w.topology_log[log..]
    );
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let declared: Vec<String> = op_names(&w.topology_log)
        .into_iter()
        .filter(|op| op.starts_with("exchange ") || op.starts_with("queue "))
        .collect();
    assert_eq!(
        declared,
        vec![
            "queue \"shared\"",
            "queue \"plain\"",
            "exchange kept",
            "exchange px"
        ],
        "{:?}",
        op_names(&w.topology_log)
    );
}

#[test]
fn exclusive_queue_is_replayed_only_on_its_own_connection() {
    let mut w = ready_world(2, 1);
    w.app(|s, now| s.declare_queue(now, QueueDecl::server_named()))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    w.broker_down();
    w.broker_up = true;
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let declares: Vec<_> = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::DeclareQueue(_)))
        .collect();
    assert_eq!(declares.len(), 1, "one connection owns it: {declares:?}");
}

#[test]
fn invalid_topology_requests_are_typed_errors() {
    let mut w = ready_world(1, 1);
    let bad = [
        w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("", ExchangeKind::Direct))),
        w.app(|s, now| {
            s.declare_exchange(now, ExchangeDecl::new("amq.mine", ExchangeKind::Direct))
        }),
        w.app(|s, now| {
            s.declare_exchange(
                now,
                ExchangeDecl::new("x", ExchangeKind::Custom(String::new())),
            )
        }),
        w.app(|s, now| {
            s.declare_queue(now, QueueDecl::durable("amq.q"))
                .map(|r| r.0)
        }),
        w.app(|s, now| {
            s.declare_queue(now, QueueDecl::durable("q".repeat(300)))
                .map(|r| r.0)
        }),
    ];
    for r in bad {
        assert!(matches!(r, Err(TopologyError::Invalid(_))), "{r:?}");
    }
    // a handle this client never gave out (another client's 50th)
    let mut other = World::new(config(1, 1, 2));
    let unknown = (0..50)
        .map(|_| {
            other
                .app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
                .unwrap()
                .1
        })
        .last()
        .unwrap();
    assert_eq!(
        w.app(|s, now| s.bind_queue(now, unknown.into(), "x", "k", FieldTable::default())),
        Err(TopologyError::UnknownQueue(unknown))
    );
    assert!(
        w.commands
            .iter()
            .all(|(_, c)| !matches!(c, amqp_rebound_core::Command::Topology { .. }))
    );
}

/// `""` as a queue name means, in AMQP, the queue declared last on the
/// channel; argument tables past one frame make the broker close the whole
/// connection (501). Both are refused at the call, before anything reaches the
/// broker; a server-named declaration and arguments that fit still go.
#[test]
fn empty_queue_names_and_arguments_past_a_frame_are_refused_at_the_call() {
    let mut w = ready_world(1, 1);
    let mut big = FieldTable::default();
    big.insert(
        "x-big".into(),
        AMQPValue::LongString(vec![b'b'; 200_000].into()),
    );
    let mut nan = FieldTable::default();
    nan.insert("x-odd".into(), AMQPValue::Double(f64::NAN));
    let empty = || QueueRef::Named(String::new());
    let bad = [
        w.app(|s, now| s.delete_queue(now, empty())),
        w.app(|s, now| s.bind_queue(now, empty(), "x", "k", FieldTable::default())),
        w.app(|s, now| s.unbind_queue(now, empty(), "x", "k", FieldTable::default())),
        w.app(|s, now| {
            s.declare_queue(
                now,
                QueueDecl {
                    arguments: big.clone(),
                    ..QueueDecl::durable("q")
                },
            )
            .map(|r| r.0)
        }),
        w.app(|s, now| {
            s.declare_exchange(
                now,
                ExchangeDecl {
                    arguments: nan.clone(),
                    ..ExchangeDecl::new("x", ExchangeKind::Direct)
                },
            )
        }),
        w.app(|s, now| s.bind_queue(now, "q".into(), "x", "k", big.clone())),
        w.app(|s, now| s.bind_exchange(now, "x", "y", "k", big.clone())),
    ];
    for r in &bad {
        assert!(matches!(r, Err(TopologyError::Invalid(_))), "{r:?}");
    }
    assert!(
        matches!(&bad[3], Err(TopologyError::Invalid(e)) if e.contains("frame_max")),
        "{:?}",
        bad[3]
    );
    let consumes = [
        w.app(|s, now| s.consume(now, empty(), None, ConsumeOptions::default())),
        w.app(|s, now| {
            s.consume(
                now,
                "q".into(),
                None,
                ConsumeOptions {
                    arguments: big.clone(),
                    ..ConsumeOptions::default()
                },
            )
        }),
    ];
    for r in &consumes {
        assert!(matches!(r, Err(ConsumeError::Invalid(_))), "{r:?}");
    }
    assert!(
        w.commands
            .iter()
            .all(|(_, c)| !matches!(c, amqp_rebound_core::Command::Topology { .. })),
        "nothing went to the broker"
    );
    let mut fits = FieldTable::default();
    fits.insert("x-max-length".into(), AMQPValue::LongInt(10));
    assert!(
        w.app(|s, now| s.declare_queue(
            now,
            QueueDecl {
                arguments: fits,
                ..QueueDecl::server_named()
            }
        ))
        .is_ok()
    );
    w.run_for(Duration::from_millis(50));
    assert!(
        w.events
            .iter()
            .any(|(_, e)| matches!(e, Event::TopologyResolved { result: Ok(_), .. })),
        "the server-named declaration went through"
    );
}

/// A consume the broker answers by closing the connection for the command
/// itself (501 FRAME_ERROR, 503 COMMAND_INVALID) ends with that answer: run
/// again after each reconnect, it would take the connection down each time.
#[test]
fn a_consume_the_broker_closes_the_connection_for_ends_with_the_refusal() {
    let mut w = ready_world(1, 2);
    w.fail_consume = Some(TransportError::Reply {
        code: 501,
        text: "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,200076,131064}".into(),
    });
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| s.consume(now, "q".into(), None, ConsumeOptions::default()))
        .unwrap();
    w.run_for(Duration::from_secs(10));
    assert!(
        matches!(
            consume_resolutions(&w).as_slice(),
            [Err(ConsumeError::Broker { code: 501, .. })]
        ),
        "{:?}",
        consume_resolutions(&w)
    );
    assert_eq!(consumes(&w), 0, "the refused consume is not run again");
    assert!(w.sup.is_all_ready(), "the client came back without it");
}

/// A 501 while a publish awaits its confirm on the connection may be the
/// publish's (content too large for the broker's frames): it is not laid on
/// the consume in flight beside it, which is run again after the reconnect.
#[test]
fn a_501_with_a_publish_in_flight_is_not_laid_on_the_consume_beside_it() {
    let mut w = ready_world(1, 2);
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    w.auto_confirm = false;
    w.publish(std::sync::Arc::new(amqp_rebound_core::Message::new(
        "",
        "q",
        "big-headers",
    )))
    .unwrap();
    w.app(|s, now| s.consume(now, "q".into(), None, ConsumeOptions::default()))
        .unwrap();
    // basic.qos answered, basic.consume in flight
    w.run_for(Duration::from_millis(2));
    w.kill(
        C0,
        TransportError::Reply {
            code: 501,
            text: "FRAME_ERROR - type 2, all octets = <<>>: {frame_too_large,9000,8184}".into(),
        },
    );
    w.auto_confirm = true;
    w.run_for(Duration::from_secs(2));
    assert_eq!(
        consume_resolutions(&w),
        vec![Ok(())],
        "consumed after the reconnect"
    );
}

#[test]
fn broker_refusal_of_a_request_is_reported_and_the_channel_reopens() {
    let mut w = ready_world(1, 1);
    w.fail_topology = Some(TransportError::Reply {
        code: 406,
        text: "PRECONDITION_FAILED - inequivalent arg 'durable'".into(),
    });
    let op = w
        .app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Fanout)))
        .unwrap();
    w.run_for(common::LATENCY);
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::TopologyResolved { op: o, result: Err(TopologyError::Broker { code: 406, .. }) } if *o == op
    )));
    w.run_until_ready(Duration::from_secs(1))
        .expect("the channel reopens");
    assert_eq!(w.sup.channel_generation(ch(0, 0)), Some(2));
    // refused: not recorded, so not replayed
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    assert!(w.topology_log.is_empty());
}

/// The broker's refusal of a request can reach the client as the channel's end
/// before the request's own failed reply (seen with lapin: a declare of a classic
/// queue whose node is down). It is the request's answer, not a reason to run it
/// again on the next channel.
#[test]
fn a_channel_closed_by_the_broker_under_a_request_answers_the_request() {
    let mut w = ready_world(1, 1);
    let (op, _) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("q-on-a-dead-node")))
        .unwrap();
    broker_closes(
        &mut w,
        404,
        "NOT_FOUND - home node 'rabbit@c1' of durable queue 'q-on-a-dead-node' is down",
    );
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::TopologyResolved { op: o, result: Err(TopologyError::Broker { code: 404, .. }) } if *o == op
    )));
    w.run_until_ready(Duration::from_secs(1))
        .expect("the channel reopens");
    w.run_for(Duration::from_millis(50));
    assert!(
        !op_names(&w.topology_log).contains(&"queue \"q-on-a-dead-node\"".to_string()),
        "not run again: {:?}",
        op_names(&w.topology_log)
    );
}

/// The same for a replay step: a channel closed under it by the broker reports
/// the step as failed (once the step's own reply comes, its generation is gone
/// and it would say nothing), and the next replay runs it again.
#[test]
fn a_channel_closed_by_the_broker_under_a_replay_step_reports_it() {
    let mut w = ready_world(1, 1);
    declare_topology(&mut w);
    kill(&mut w);
    // run until the replay has its first step in flight on the new channel (its
    // answer comes common::LATENCY later)
    let before = w.commands.len();
    while !w.commands[before..]
        .iter()
        .any(|(_, c)| matches!(c, amqp_rebound_core::Command::Topology { .. }))
    {
        w.run_for(Duration::from_millis(1));
    }
    broker_closes(&mut w, 403, "ACCESS_REFUSED");
    let failed: Vec<_> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ReplayFailed { error, .. } => Some(error.reply_code()),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![Some(403)], "{}", w.trace);
    assert_eq!(w.sup.stats().replay_failures, 1);
    w.run_until_ready(Duration::from_secs(20))
        .expect("the next replay runs it again");
}

/// ... unless a publish in flight on that channel explains the error (a missing
/// exchange it was sent to): then the request runs again and the publish is the
/// one refused.
#[test]
fn a_channel_closed_for_a_publish_to_a_missing_exchange_retries_the_request() {
    let mut w = ready_world(1, 1);
    // in flight: nothing is answered before the world's clock moves
    let publish = w
        .publish(std::sync::Arc::new(amqp_rebound_core::Message::new(
            "gone", "k", "m",
        )))
        .unwrap();
    let (op, _) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("q2")))
        .unwrap();
    broker_closes(&mut w, 404, "NOT_FOUND - no exchange 'gone' in vhost '/'");
    w.run_until_ready(Duration::from_secs(1))
        .expect("the channel reopens");
    w.run_for(Duration::from_millis(50));
    let resolved = |want: fn(&Result<Option<String>, TopologyError>) -> bool| {
        w.events.iter().any(|(_, e)| {
            matches!(e, Event::TopologyResolved { op: o, result } if *o == op && want(result))
        })
    };
    assert!(
        resolved(|r| r.is_ok()),
        "the declare ran again and succeeded"
    );
    assert!(w.resolutions().iter().any(|(id, r)| *id == publish
        && matches!(
            r,
            Err(amqp_rebound_core::PublishError::Rejected { code: 404, .. })
        )));
}

#[test]
fn deliveries_carry_their_generation_and_stale_acks_are_refused() {
    let mut w = ready_world(1, 1);
    let consumer = consume_as(&mut w, "jobs".into(), "c1");
    w.run_for(Duration::from_millis(20));
    let tag = w.deliver(ch(0, 0), "c1", "m1").unwrap();
    let Some((
        _,
        Event::Delivery {
            consumer: c,
            generation,
            ..
        },
    )) = w.events.last().cloned()
    else {
        panic!("no delivery event")
    };
    assert_eq!(c, consumer);
    assert_eq!(generation, 1);
    let tag2 = w.deliver(ch(0, 0), "c1", "m2").unwrap();
    // ack the first now: fine
    w.app(|s, now| {
        s.ack(
            now,
            ch(0, 0),
            generation,
            tag,
            AckKind::Ack { multiple: false },
        )
    })
    .unwrap();
    // acking it twice would close the channel with 406: refused, nothing sent
    assert_eq!(
        w.app(|s, now| s.ack(
            now,
            ch(0, 0),
            generation,
            tag,
            AckKind::Ack { multiple: false }
        )),
        Err(AckError::UnknownTag(tag))
    );
    // connection lost and recovered: the second delivery is now stale
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    assert_eq!(
        w.app(|s, now| s.ack(
            now,
            ch(0, 0),
            generation,
            tag2,
            AckKind::Ack { multiple: false }
        )),
        Err(AckError::Stale)
    );
    assert_eq!(w.sup.channel_state(ch(0, 0)), Some(ChannelState::Ready));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    assert_eq!(w.sup.stats().stale_acks, 1);
    // and the consumer was re-subscribed with the same tag
    assert!(
        op_names(&w.topology_log)
            .iter()
            .filter(|n| *n == "consume jobs c1")
            .count()
            == 2
    );
}

/// An automatic tag never collides with a tag the application chose in the
/// same pattern.
#[test]
fn automatic_consumer_tags_step_around_the_applications() {
    let mut w = ready_world(1, 1);
    // ids are handed out in order from 1: these 30 take the tags of the next
    // 30 ids
    for n in 31..=60 {
        let tag = format!("rebound-{n}");
        w.app(|s, now| s.consume(now, "q".into(), Some(tag), ConsumeOptions::default()))
            .unwrap();
    }
    for _ in 0..10 {
        let auto = w.app(|s, now| s.consume(now, "q".into(), None, ConsumeOptions::default()));
        assert!(auto.is_ok(), "{auto:?}");
    }
}

#[test]
fn duplicate_consumer_tag_is_refused() {
    let mut w = ready_world(1, 1);
    consume_as(&mut w, "q".into(), "c1");
    assert_eq!(
        w.app(|s, now| s.consume(
            now,
            "q2".into(),
            Some("c1".into()),
            ConsumeOptions::default()
        )),
        Err(ConsumeError::DuplicateTag("c1".into()))
    );
    assert!(matches!(
        w.app(|s, now| s.consume(
            now,
            "q".into(),
            Some(String::new()),
            ConsumeOptions::default()
        )),
        Err(ConsumeError::Invalid(_))
    ));
}

#[test]
fn broker_cancel_resubscribes_a_registered_queue_and_ends_an_unknown_one() {
    let mut w = ready_world(1, 1);
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("known")))
        .unwrap();
    w.run_for(Duration::from_millis(10));
    let known = consume_as(&mut w, QueueRef::Handle(q), "k");
    let unknown = consume_as(&mut w, "elsewhere".into(), "u");
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    let generation = w.sup.channel_generation(ch(0, 0)).unwrap();
    for tag in ["k", "u"] {
        w.input(amqp_rebound_core::Input::Channel {
            channel: ch(0, 0),
            generation,
            event: ChannelInput::ConsumerCancelled {
                consumer_tag: tag.into(),
            },
        });
    }
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        op_names(&w.topology_log),
        vec!["queue \"known\"", "qos 0", "consume known k"]
    );
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::ConsumerCancelled { consumer, resubscribing: true } if *consumer == known
    )));
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::ConsumerEnded { consumer, error: ConsumeError::CancelledByBroker } if *consumer == unknown
    )));
}

/// The broker cancels the consumers of a queue the application deletes, and
/// its cancel can come before the delete's answer: the consumer first waits for
/// a re-declaration, then the delete forgets the queue. It ends then, as it
/// would had the cancel come second, instead of waiting for good.
#[test]
fn a_consumer_of_a_queue_deleted_by_handle_ends_whichever_answer_comes_first() {
    let mut w = ready_world(1, 1);
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("doomed")))
        .unwrap();
    w.run_for(Duration::from_millis(10));
    let consumer = consume_as(&mut w, QueueRef::Handle(q), "d");
    w.run_for(Duration::from_millis(20));
    w.app(|s, now| s.delete_queue(now, QueueRef::Handle(q)))
        .unwrap();
    let generation = w.sup.channel_generation(ch(0, 0)).unwrap();
    w.input(amqp_rebound_core::Input::Channel {
        channel: ch(0, 0),
        generation,
        event: ChannelInput::ConsumerCancelled {
            consumer_tag: "d".into(),
        },
    });
    w.run_for(Duration::from_millis(50));
    assert!(
        ended_by_broker(&w, consumer),
        "the consumer still waits: {:?}",
        w.events.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
}

/// The same with the consumer on another channel than the delete: the
/// broker's cancel, taken before the delete's answer, must not declare the
/// queue again on the consumer's channel (that declaration would reach the
/// broker after the delete and bring the queue back for good).
#[test]
fn a_queue_deleted_while_its_consumer_lives_on_another_channel_is_not_declared_again() {
    let mut w = ready_world(1, 2);
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("doomed")))
        .unwrap();
    // a first consumer takes channel 0 (where requests run), so the doomed
    // queue's lives on 1
    consume_as(&mut w, "q".into(), "first");
    let consumer = consume_as(&mut w, QueueRef::Handle(q), "d");
    w.run_for(Duration::from_millis(20));
    let channel = w.sup.consumer_channel(consumer).unwrap();
    assert_eq!(channel, ch(0, 1));
    w.app(|s, now| s.delete_queue(now, QueueRef::Handle(q)))
        .unwrap();
    w.topology_log.clear();
    let generation = w.sup.channel_generation(channel).unwrap();
    w.input(amqp_rebound_core::Input::Channel {
        channel,
        generation,
        event: ChannelInput::ConsumerCancelled {
            consumer_tag: "d".into(),
        },
    });
    w.run_for(Duration::from_millis(50));
    let declares: Vec<String> = op_names(&w.topology_log)
        .into_iter()
        .filter(|n| n.starts_with("queue"))
        .collect();
    assert!(
        declares.is_empty(),
        "the deleted queue declared again: {:?}",
        op_names(&w.topology_log)
    );
    assert!(
        ended_by_broker(&w, consumer),
        "{:?}",
        w.events.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
}

/// A connection's replay that starts while the application's delete of a
/// queue is in flight on another connection: the ops the lost connection sent
/// after the delete went out. `refused` makes the broker refuse the delete.
fn replay_during_a_delete(refused: bool) -> Vec<String> {
    let mut w = ready_world(2, 1);
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("doomed")))
        .unwrap();
    w.app(|s, now| {
        s.bind_queue(
            now,
            "doomed".into(),
            "amq.direct",
            "k",
            FieldTable::default(),
        )
    })
    .unwrap();
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("kept")))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    let lost = ch(1, 0);
    let from = w.commands.len();
    w.kill(lost.connection, TransportError::Io("reset".into()));
    // the lost connection is back and opens its channel; the delete goes out
    // on the other one just after, and its answer comes after the replay began
    let opening = |w: &World| {
        w.commands[from..].iter().any(|(_, c)| {
            matches!(c, amqp_rebound_core::Command::OpenChannel { channel, .. } if *channel == lost)
        })
    };
    for _ in 0..10_000 {
        if opening(&w) {
            break;
        }
        w.run_for(Duration::from_micros(100));
    }
    assert!(opening(&w), "the lost connection reopens its channel");
    w.run_for(Duration::from_micros(100));
    let deleted_at = w.commands.len();
    if refused {
        w.fail_topology = Some(TransportError::Reply {
            code: 403,
            text: "ACCESS_REFUSED - access to queue 'doomed' refused".into(),
        });
    }
    w.app(|s, now| s.delete_queue(now, "doomed".into()))
        .unwrap();
    w.run_until_ready(Duration::from_secs(2))
        .expect("the lost connection comes back");
    w.run_for(Duration::from_millis(50));
    let sent: Vec<(ChannelId, TopologyOp)> = w.commands[deleted_at..]
        .iter()
        .filter_map(|(_, c)| match c {
            amqp_rebound_core::Command::Topology { channel, op, .. } => {
                Some((*channel, op.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(
        sent.iter()
            .any(|(channel, op)| *channel != lost && matches!(op, TopologyOp::DeleteQueue { .. })),
        "the delete ran on the other connection: {:?}",
        op_names(&sent)
    );
    let replayed: Vec<_> = sent
        .into_iter()
        .filter(|(channel, _)| *channel == lost)
        .collect();
    op_names(&replayed)
}

/// The replay skips what the delete in flight removes: sent after the delete,
/// the declaration would bring the queue back for good.
#[test]
fn a_replay_during_a_delete_in_flight_does_not_bring_the_queue_back() {
    assert_eq!(
        replay_during_a_delete(false),
        vec!["queue \"kept\"".to_string()],
        "the lost connection's replay after the delete went out"
    );
}

/// If that delete fails, the steps the replay skipped run after all: the
/// queue is still there, and so must be its declaration and binding.
#[test]
fn replay_steps_skipped_for_a_delete_that_fails_run_after_all() {
    let replayed = replay_during_a_delete(true);
    assert!(
        replayed.iter().any(|n| n == "queue \"doomed\""),
        "{replayed:?}"
    );
    assert!(replayed.iter().any(|n| n.contains("bind")), "{replayed:?}");
}

/// While a close drains, nothing new is accepted: a declaration or a consumer
/// asked for after `Input::Close` fails with `Closed` and sends nothing.
#[test]
fn topology_requests_and_consumers_are_refused_while_a_close_drains() {
    let mut w = ready_world(1, 1);
    w.broker_down();
    w.kill(C0, TransportError::Io("reset".into()));
    w.publish(common::msg(1)).unwrap();
    w.input(amqp_rebound_core::Input::Close);
    assert!(w.sup.is_closing() && !w.sup.is_closed(), "draining");
    let declared = w.app(|s, now| s.declare_queue(now, QueueDecl::durable("late")));
    assert_eq!(declared.err(), Some(TopologyError::Closed));
    let bound = w.app(|s, now| s.bind_queue(now, "q".into(), "x", "k", FieldTable::default()));
    assert_eq!(bound.err(), Some(TopologyError::Closed));
    let consumed = w.app(|s, now| s.consume(now, "q".into(), None, ConsumeOptions::default()));
    assert_eq!(consumed.err(), Some(ConsumeError::Closed));
    w.topology_log.clear();
    w.broker_up = true;
    w.run_for(Duration::from_secs(5));
    assert_eq!(op_names(&w.topology_log), Vec::<String>::new());
}

#[test]
fn consumer_prefetch_is_set_before_consume() {
    let mut w = ready_world(1, 1);
    let options = ConsumeOptions {
        prefetch: Some(10),
        ..ConsumeOptions::default()
    };
    w.app(|s, now| s.consume(now, "q".into(), Some("c".into()), options))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(op_names(&w.topology_log), vec!["qos 10", "consume q c"]);
}

// ----- found by the simulator (sim/tests/known_core_bugs.rs) -----

fn declares_of_server_named(log: &[(ChannelId, TopologyOp)]) -> usize {
    log.iter()
        .filter(|(_, op)| matches!(op, TopologyOp::DeclareQueue(d) if d.name.is_empty()))
        .count()
}

#[test]
fn a_channel_0_reopen_does_not_redeclare_a_live_server_named_queue() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w);
    // a first consumer takes channel 0, so the server-named queue's lives on 1
    consume_as(&mut w, "q".into(), "first");
    let on_anon = consume_as(&mut w, anon.into(), "c");
    w.run_for(Duration::from_millis(20));
    assert_eq!(w.sup.consumer_channel(on_anon), Some(ch(0, 1)));
    w.topology_log.clear();
    w.channel_error(ch(0, 0), 406);
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(
        declares_of_server_named(&w.topology_log),
        0,
        "the connection (and its server-named queue) lived on: {:?}",
        op_names(&w.topology_log)
    );
    assert_eq!(op_names(&w.topology_log), vec!["qos 0", "consume q first"]);
    assert_eq!(w.sup.queue_name(anon).as_deref(), Some("amq.gen-1"));
}

#[test]
fn a_channel_error_under_the_only_consumer_of_an_auto_delete_queue_redeclares_it_first() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w); // server-named queues are auto-delete
    let consumer = consume_as(&mut w, anon.into(), "c");
    w.run_for(Duration::from_millis(20));
    let channel = w.sup.consumer_channel(consumer).unwrap();
    w.topology_log.clear();
    w.channel_error(channel, 406);
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    assert_eq!(
        op_names(&w.topology_log),
        vec![
            "queue \"\"",
            "bind amq.gen-2 #",
            "qos 0",
            "consume amq.gen-2 c"
        ],
        "the broker deleted the queue with its last consumer: declare, bind, consume"
    );
}

/// A consumer started on a channel that the broker just closed (a refused
/// declaration, a publish to a missing exchange) waits for it to reopen; it
/// was never subscribed, so the broker did not delete its auto-delete queue:
/// the reopened channel subscribes it to the queue as it is. Declared again,
/// a server-named queue got a new name, and the old one stayed on the broker
/// with its bindings, filling up with what they route for as long as the
/// connection lived.
#[test]
fn a_consumer_waiting_for_its_channel_to_reopen_does_not_redeclare_its_queue() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w);
    assert_eq!(w.sup.queue_name(anon).as_deref(), Some("amq.gen-1"));
    w.topology_log.clear();
    w.channel_error(ch(0, 0), 406);
    let consumer = consume_as(&mut w, anon.into(), "c");
    assert_eq!(w.sup.consumer_channel(consumer), Some(ch(0, 0)));
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        op_names(&w.topology_log),
        vec!["qos 0", "consume amq.gen-1 c"],
        "BUG: the live server-named queue was declared again under a new name"
    );
    assert_eq!(w.sup.queue_name(anon).as_deref(), Some("amq.gen-1"));
}

/// A fixed-name exclusive queue declared while connection 0 was down lives
/// on connection 1; declared again, it goes there too (on connection 0 the
/// broker would refuse it: 405 RESOURCE_LOCKED).
#[test]
fn an_exclusive_queue_declared_again_goes_to_the_connection_that_has_it() {
    let mut w = ready_world(2, 1);
    kill(&mut w);
    let decl = QueueDecl {
        name: "ex".into(),
        exclusive: true,
        ..QueueDecl::default()
    };
    w.app(|s, now| s.declare_queue(now, decl.clone())).unwrap();
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    w.run_for(Duration::from_millis(50));
    w.app(|s, now| s.declare_queue(now, decl)).unwrap();
    w.run_for(Duration::from_millis(50));
    let on: Vec<ChannelId> = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::DeclareQueue(d) if d.name == "ex"))
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(
        on,
        vec![ch(1, 0), ch(1, 0)],
        "BUG: declared again on a connection that does not have it"
    );
}

#[test]
fn a_deleted_queue_with_two_consumers_is_declared_once_and_both_follow() {
    let mut w = ready_world(1, 2);
    let anon = declare_topology(&mut w);
    let mut consumers = Vec::new();
    for tag in ["a", "b"] {
        consumers.push(
            w.app(|s, now| {
                s.consume(
                    now,
                    anon.into(),
                    Some(tag.into()),
                    ConsumeOptions::default(),
                )
            })
            .unwrap(),
        );
    }
    w.run_for(Duration::from_millis(20));
    w.topology_log.clear();
    // the queue is deleted: the broker cancels both, each on its own channel
    for (consumer, tag) in consumers.iter().zip(["a", "b"]) {
        let channel = w.sup.consumer_channel(*consumer).unwrap();
        let generation = w.sup.channel_generation(channel).unwrap();
        w.input(amqp_rebound_core::Input::Channel {
            channel,
            generation,
            event: ChannelInput::ConsumerCancelled {
                consumer_tag: tag.into(),
            },
        });
    }
    w.run_for(Duration::from_millis(50));
    assert_eq!(
        declares_of_server_named(&w.topology_log),
        1,
        "{:?}",
        op_names(&w.topology_log)
    );
    let mut consumes: Vec<_> = op_names(&w.topology_log)
        .into_iter()
        .filter(|n| n.starts_with("consume"))
        .collect();
    consumes.sort();
    assert_eq!(consumes, vec!["consume amq.gen-2 a", "consume amq.gen-2 b"]);
}

fn not_found() -> TransportError {
    TransportError::Reply {
        code: 404,
        text: "NOT_FOUND - no queue 'missing' in vhost '/'".into(),
    }
}

fn consume_resolutions(w: &World) -> Vec<Result<(), ConsumeError>> {
    w.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ConsumeResolved { result, .. } => Some(result.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn consume_on_a_missing_queue_answers_the_broker_refusal_once_and_keeps_nothing() {
    let mut w = ready_world(1, 2);
    w.fail_consume = Some(not_found());
    w.app(|s, now| {
        s.consume(
            now,
            QueueRef::Named("missing".into()),
            None,
            ConsumeOptions::default(),
        )
    })
    .unwrap();
    w.run_for(Duration::from_secs(10));
    assert_eq!(
        consume_resolutions(&w),
        vec![Err(ConsumeError::Broker {
            code: 404,
            text: "NOT_FOUND - no queue 'missing' in vhost '/'".into()
        })]
    );
    assert_eq!(consumes(&w), 0, "the refused consume is not run again");
    assert!(w.sup.is_all_ready(), "its channel came back without it");
}

#[test]
fn consume_answers_ok_once_the_broker_accepted_it() {
    let mut w = ready_world(1, 1);
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| {
        s.consume(
            now,
            QueueRef::Named("q".into()),
            None,
            ConsumeOptions::default(),
        )
    })
    .unwrap();
    assert!(
        consume_resolutions(&w).is_empty(),
        "not before the broker's answer"
    );
    w.run_for(Duration::from_millis(50));
    assert_eq!(consume_resolutions(&w), vec![Ok(())]);
}

#[test]
fn a_consumer_whose_queue_never_comes_back_ends_after_bounded_refusals() {
    let mut w = ready_world(1, 1);
    w.app(|s, now| {
        s.consume(
            now,
            QueueRef::Named("q".into()),
            None,
            ConsumeOptions::default(),
        )
    })
    .unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(consume_resolutions(&w), vec![Ok(())]);
    // the queue is gone for good: every re-subscription after a recovery fails
    w.fail_consume = Some(not_found());
    kill(&mut w);
    w.run_for(Duration::from_secs(120));
    let ended: Vec<_> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ConsumerEnded { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert!(
        matches!(ended.as_slice(), [ConsumeError::Broker { code: 404, .. }]),
        "{ended:?}"
    );
    let tries = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::Consume { .. }))
        .count();
    assert_eq!(
        tries, 1,
        "only the first, accepted consume reached the broker's log"
    );
    let refusals = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ReplayFailed { .. }))
        .count();
    assert_eq!(
        refusals,
        usize::from(amqp_rebound_core::supervisor::MAX_CONSUME_REFUSALS) - 1
    );
    assert!(
        w.sup.is_all_ready(),
        "the channel recovers without the consumer"
    );
}

/// The basic.consume calls the broker accepted.
fn consumes(w: &World) -> usize {
    w.topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::Consume { .. }))
        .count()
}

fn exclusive_use() -> TransportError {
    TransportError::Reply {
        code: 403,
        text: "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use".into(),
    }
}

/// Starts a consumer of `queue` tagged `tag`.
/// Whether `consumer` ended with `CancelledByBroker`.
fn ended_by_broker(w: &World, consumer: amqp_rebound_core::ConsumerId) -> bool {
    w.events.iter().any(|(_, e)| {
        matches!(
            e,
            Event::ConsumerEnded { consumer: c, error: ConsumeError::CancelledByBroker } if *c == consumer
        )
    })
}

fn consumers_ended(w: &World) -> Vec<(Duration, ConsumeError)> {
    w.events
        .iter()
        .filter_map(|(at, e)| match e {
            Event::ConsumerEnded { error, .. } => Some((*at, error.clone())),
            _ => None,
        })
        .collect()
}

fn exclusive_consumer(w: &mut World) {
    w.app(|s, now| {
        s.consume(
            now,
            QueueRef::Named("q".into()),
            None,
            ConsumeOptions {
                exclusive: true,
                ..ConsumeOptions::default()
            },
        )
    })
    .unwrap();
    w.run_for(Duration::from_millis(50));
    assert_eq!(consume_resolutions(w), vec![Ok(())]);
}

/// After a silent network failure the broker keeps the dead connection's
/// exclusive subscription until its heartbeat check drops that connection (up
/// to two heartbeat intervals, 60 s each by default), and refuses the new one
/// as "in exclusive use" until then. The consumer waits that out; its channel
/// publishes meanwhile.
#[test]
fn an_exclusive_consumer_the_dead_connection_holds_comes_back_when_the_broker_lets_go() {
    let mut w = ready_world(1, 1);
    exclusive_consumer(&mut w);
    w.fail_consume = Some(exclusive_use());
    kill(&mut w);
    // the broker holds the old subscription for 100 s
    let mut ready_seconds = 0;
    let mut published = 0;
    for n in 0..100u64 {
        w.run_for(Duration::from_secs(1));
        if w.sup.is_all_ready() {
            ready_seconds += 1;
        }
        if w.publish(common::msg(n)).is_ok() {
            published += 1;
        }
    }
    assert!(
        consumers_ended(&w).is_empty(),
        "ended while the broker held the old subscription: {:?}",
        consumers_ended(&w)
    );
    assert!(
        ready_seconds >= 90,
        "its channel was Ready {ready_seconds} of 100 s: the refused consumer held it down"
    );
    let tries = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ReplayFailed { .. }))
        .count();
    assert!(
        (5..=20).contains(&tries),
        "{tries} refused tries in 100 s: neither given up nor a hot loop"
    );
    w.fail_consume = None;
    w.run_for(Duration::from_secs(20));
    assert_eq!(consumes(&w), 2, "subscribed again once the broker let go");
    assert!(consumers_ended(&w).is_empty());
    assert!(w.sup.is_all_ready());
    let stored = w.stored.len();
    assert_eq!(stored, published, "every publish of the outage was stored");
}

#[test]
fn an_exclusive_consumer_refused_past_the_grace_ends() {
    let mut w = ready_world(1, 1);
    exclusive_consumer(&mut w);
    // another application holds the queue's exclusive consumer for good
    w.fail_consume = Some(exclusive_use());
    let killed = w.elapsed();
    kill(&mut w);
    w.run_for(amqp_rebound_core::supervisor::EXCLUSIVE_USE_GRACE + Duration::from_secs(30));
    let ended = consumers_ended(&w);
    let [(at, ConsumeError::Broker { code: 403, .. })] = ended.as_slice() else {
        panic!("one end, with the broker's refusal: {ended:?}");
    };
    let after = *at - killed;
    assert!(
        after >= amqp_rebound_core::supervisor::EXCLUSIVE_USE_GRACE
            && after
                <= amqp_rebound_core::supervisor::EXCLUSIVE_USE_GRACE + Duration::from_secs(20),
        "ended {after:?} after the cut"
    );
    assert!(
        w.sup.is_all_ready(),
        "the channel recovers without the consumer"
    );
}

#[test]
fn an_exclusive_consumer_cancelled_while_it_waits_is_not_tried_again() {
    let mut w = ready_world(1, 1);
    exclusive_consumer(&mut w);
    let consumer = w
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::ConsumeResolved { consumer, .. } => Some(*consumer),
            _ => None,
        })
        .expect("the consumer");
    w.fail_consume = Some(exclusive_use());
    kill(&mut w);
    w.run_for(Duration::from_secs(3));
    assert!(
        w.events
            .iter()
            .any(|(_, e)| matches!(e, Event::ReplayFailed { .. })),
        "refused as in exclusive use"
    );
    assert!(w.sup.is_all_ready(), "its channel is up without it");
    w.app(|s, now| s.cancel(now, consumer)).unwrap();
    w.fail_consume = None;
    let logged = w.topology_log.len();
    w.run_for(Duration::from_secs(60));
    let after: Vec<_> = w.topology_log[logged..].iter().map(|(_, op)| op).collect();
    assert!(
        after.is_empty(),
        "neither a cancel of a tag the broker does not know nor a new consume: {after:?}"
    );
    assert!(consumers_ended(&w).is_empty());
    assert!(w.sup.is_all_ready());
}

#[test]
fn a_longer_heartbeat_in_the_uri_lengthens_the_exclusive_use_grace() {
    let mut cfg = config(1, 1, 1);
    cfg.hosts = amqp_rebound_core::endpoint::parse_hosts([
        "amqp://guest:pw@127.0.0.1:5672/%2f?heartbeat=600",
    ])
    .expect("a host");
    let mut w = World::new(cfg);
    w.run_until_ready(Duration::from_secs(1)).expect("ready");
    exclusive_consumer(&mut w);
    w.fail_consume = Some(exclusive_use());
    kill(&mut w);
    // longer than EXCLUSIVE_USE_GRACE, shorter than three 600 s heartbeats
    w.run_for(Duration::from_secs(1_000));
    assert!(consumers_ended(&w).is_empty(), "{:?}", consumers_ended(&w));
    w.fail_consume = None;
    w.run_for(Duration::from_secs(20));
    assert_eq!(consumes(&w), 2, "subscribed again once the broker let go");
    assert!(consumers_ended(&w).is_empty());
}

fn deliveries_to(w: &World, consumer: amqp_rebound_core::ConsumerId) -> usize {
    w.events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Delivery { consumer: k, .. } if *k == consumer))
        .count()
}

fn requeued(w: &World) -> usize {
    w.commands
        .iter()
        .filter(|(_, c)| {
            matches!(
                c,
                amqp_rebound_core::Command::Ack {
                    kind: AckKind::Nack { requeue: true, .. },
                    ..
                }
            )
        })
        .count()
}

/// A tag given again after a cancel: what the broker still delivers to the
/// cancelled consumer (it had not taken the cancel yet) goes back to its queue,
/// never to the new consumer of another queue, on the same channel or another.
#[test]
fn a_tag_given_again_after_a_cancel_does_not_take_the_cancelled_consumers_deliveries() {
    fn consume(w: &mut World, queue: &str, tag: &str) -> amqp_rebound_core::ConsumerId {
        w.app(|s, now| {
            s.consume(
                now,
                QueueRef::Named(queue.into()),
                Some(tag.into()),
                ConsumeOptions::default(),
            )
        })
        .unwrap()
    }
    // one channel: the new consumer goes where the old one was; the old one's
    // deliveries come before the broker took the cancel and the new consume
    let mut w = ready_world(1, 1);
    let old = consume(&mut w, "q1", "worker");
    w.run_for(Duration::from_millis(50));
    let channel = w.sup.consumer_channel(old).expect("a channel");
    w.app(|s, now| s.cancel(now, old)).unwrap();
    let new = consume(&mut w, "q2", "worker");
    for n in 0..3 {
        w.deliver(channel, "worker", &format!("old {n}"));
    }
    w.run_for(Duration::from_millis(50));
    assert_eq!(deliveries_to(&w, new), 0);
    assert_eq!(requeued(&w), 3, "given back");
    w.deliver(channel, "worker", "new");
    assert_eq!(deliveries_to(&w, new), 1, "its own deliveries reach it");

    // two channels: the new consumer lives on the other one; the old one's
    // deliveries may come at any time
    let mut w = ready_world(1, 2);
    let old = consume(&mut w, "q1", "worker");
    w.run_for(Duration::from_millis(50));
    let old_channel = w.sup.consumer_channel(old).expect("a channel");
    w.app(|s, now| s.cancel(now, old)).unwrap();
    consume(&mut w, "q0", "filler");
    let new = consume(&mut w, "q2", "worker");
    w.run_for(Duration::from_millis(50));
    let new_channel = w.sup.consumer_channel(new).expect("a channel");
    assert_ne!(new_channel, old_channel);
    for n in 0..3 {
        w.deliver(old_channel, "worker", &format!("old {n}"));
    }
    assert_eq!(deliveries_to(&w, new), 0);
    assert_eq!(requeued(&w), 3, "given back");
    w.deliver(new_channel, "worker", "new");
    assert_eq!(deliveries_to(&w, new), 1, "its own deliveries reach it");
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

/// A message published right after an auto-ack consumer is cancelled must not
/// reach it (it would count as delivered, and nobody reads it): publishes wait
/// for the broker to take the cancel. A consumer that acks needs no wait (what
/// reaches it after its cancel goes back to the queue).
#[test]
fn publishes_wait_for_the_broker_to_take_an_auto_ack_consumers_cancel() {
    for no_ack in [true, false] {
        let mut w = ready_world(1, 2);
        let consumer = w
            .app(|s, now| {
                s.consume(
                    now,
                    QueueRef::Named("q".into()),
                    None,
                    ConsumeOptions {
                        no_ack,
                        ..ConsumeOptions::default()
                    },
                )
            })
            .unwrap();
        w.run_for(Duration::from_millis(50));
        w.app(|s, now| s.cancel(now, consumer)).unwrap();
        w.publish(common::msg(1)).unwrap();
        let sent_at_once = w.sent_payloads().contains(&"1".to_string());
        assert_eq!(sent_at_once, !no_ack, "no_ack {no_ack}");
        let cancels = |w: &World| {
            w.topology_log
                .iter()
                .filter(|(_, op)| matches!(op, TopologyOp::Cancel { .. }))
                .count()
        };
        assert_eq!(cancels(&w), 0, "the broker has not taken the cancel yet");
        w.run_for(Duration::from_millis(50));
        assert_eq!(cancels(&w), 1);
        assert!(
            w.sent_payloads().contains(&"1".to_string()),
            "no_ack {no_ack}: sent once the broker took the cancel"
        );
        w.run_for(Duration::from_millis(50));
        assert_eq!(w.stored.len(), 1, "no_ack {no_ack}");
    }
}

fn auto_delete_queue(name: &str) -> QueueDecl {
    let mut decl = QueueDecl::durable(name);
    decl.auto_delete = true;
    decl
}

/// A delete by handle of an auto-delete queue, asked for before the last
/// consumer's cancel but still queued (behind another request, or waiting for
/// a Ready channel) when the cancel comes, must go to the broker as one asked
/// for after the cancel does: not fail UnknownQueue.
#[test]
fn a_delete_queued_before_the_last_cancel_still_names_the_queue() {
    let mut w = ready_world(1, 1);
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, auto_delete_queue("lone")))
        .unwrap();
    let consumer = w
        .app(|s, now| s.consume(now, q.into(), None, ConsumeOptions::default()))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    // another request in flight: the delete waits behind it
    w.app(|s, now| s.declare_exchange(now, ExchangeDecl::new("x", ExchangeKind::Topic)))
        .unwrap();
    let delete = w.app(|s, now| s.delete_queue(now, q.into())).unwrap();
    w.app(|s, now| s.cancel(now, consumer)).unwrap();
    w.run_for(Duration::from_millis(50));
    let result = w.events.iter().find_map(|(_, e)| match e {
        Event::TopologyResolved { op, result } if *op == delete => Some(result.clone()),
        _ => None,
    });
    assert!(matches!(result, Some(Ok(_))), "{result:?}");
}

/// The retired handles kept are the most recently forgotten: a queue
/// forgotten last keeps its handle (the doc says the oldest forgotten go
/// first), whatever its handle's number.
#[test]
fn the_handle_forgotten_last_is_kept() {
    let mut w = ready_world(1, 1);
    let (_, first) = w
        .app(|s, now| s.declare_queue(now, auto_delete_queue("first")))
        .unwrap();
    let first_consumer = w
        .app(|s, now| s.consume(now, first.into(), None, ConsumeOptions::default()))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    for n in 0..1024 {
        let name = format!("temp-{n}");
        let (_, q) = w
            .app(|s, now| s.declare_queue(now, auto_delete_queue(&name)))
            .unwrap();
        let consumer = w
            .app(|s, now| s.consume(now, q.into(), None, ConsumeOptions::default()))
            .unwrap();
        w.run_for(Duration::from_millis(20));
        w.app(|s, now| s.cancel(now, consumer)).unwrap();
    }
    w.app(|s, now| s.cancel(now, first_consumer)).unwrap();
    // forgotten just now: its handle still names it
    let deleted = w.app(|s, now| s.delete_queue(now, first.into()));
    assert!(deleted.is_ok(), "{deleted:?}");
}

/// A consumer started on an auto-delete queue right after the application
/// cancelled its previous last consumer (by the same handle) can land on
/// another channel and subscribe before the broker takes the cancel: the
/// queue then lives on with that consumer. It must still be declared again at
/// the next recovery, before the consumer subscribes to it again.
#[test]
fn a_queue_consumed_again_after_its_last_cancel_is_still_replayed() {
    let mut w = ready_world(1, 2);
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("other")))
        .unwrap();
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, auto_delete_queue("ad")))
        .unwrap();
    w.run_for(Duration::from_millis(20));
    let consume = |w: &mut World, queue: QueueRef, tag: &str| {
        w.app(|s, now| s.consume(now, queue, Some(tag.into()), ConsumeOptions::default()))
            .unwrap()
    };
    // ch0: x1, x2, x4; ch1: a, x3, x5
    let x1 = consume(&mut w, "other".into(), "x1");
    let a = consume(&mut w, q.into(), "a");
    for tag in ["x2", "x3", "x4", "x5"] {
        consume(&mut w, "other".into(), tag);
    }
    w.run_for(Duration::from_millis(20));
    assert_eq!(w.sup.consumer_channel(a), Some(ch(0, 1)));
    w.app(|s, now| s.cancel(now, x1)).unwrap();
    w.run_for(Duration::from_millis(20));
    // restart the consumer of "ad": cancel, consume again by its handle
    w.app(|s, now| s.cancel(now, a)).unwrap();
    let b = consume(&mut w, q.into(), "b");
    assert_eq!(w.sup.consumer_channel(b), Some(ch(0, 0)));
    w.run_for(Duration::from_millis(20));
    assert!(
        w.events.iter().any(|(_, e)| matches!(
            e,
            Event::ConsumeResolved { consumer, result: Ok(()) } if *consumer == b
        )),
        "b subscribed"
    );
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(1)).unwrap();
    let names = op_names(&w.topology_log);
    let declared = names.iter().position(|n| n == "queue \"ad\"");
    let consumed = names.iter().position(|n| n == "consume ad b");
    assert!(consumed.is_some(), "{names:?}");
    assert!(
        declared.is_some_and(|d| Some(d) < consumed),
        "consumer b subscribes to \"ad\", which is not declared again: {names:?}"
    );
}

fn inequivalent() -> TransportError {
    TransportError::Reply {
        code: 406,
        text: "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/'"
            .into(),
    }
}

/// The queue.declare ops of "q" the broker took.
fn declares_of_q(w: &World) -> usize {
    w.topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::DeclareQueue(d) if d.name == "q"))
        .count()
}

/// Another application deleted a consumer's queue and declared it again with
/// other arguments: every replay of the client's declaration is refused (406).
/// After a few refusals the declaration is left out of the replay
/// (`ReplayAbandoned`), and the connection's channels are Ready again with the
/// consumer back on the queue the broker has, instead of held for good (no
/// publish, no delivery). A declaration the broker takes again is replayed
/// again.
#[test]
fn a_queue_declared_again_elsewhere_with_other_arguments_does_not_hold_the_connection() {
    let mut w = ready_world(1, 2);
    worker_on_q(&mut w);
    w.fail_declare = Some(("q".into(), inequivalent()));
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(60))
        .expect("the connection's channels come back without the declaration");
    let abandoned: Vec<_> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ReplayAbandoned { step, error } => Some((step.clone(), error.reply_code())),
            _ => None,
        })
        .collect();
    assert!(
        matches!(abandoned.as_slice(), [(step, Some(406))] if step.contains("DeclareQueue")),
        "{abandoned:?}"
    );
    // its binding and its consumer came back, on the queue's name
    let names = op_names(&w.topology_log);
    assert!(names.iter().any(|n| n == "bind q k"), "{names:?}");
    assert!(
        w.topology_log.iter().any(
            |(_, op)| matches!(op, TopologyOp::Consume { queue, consumer_tag, .. }
                if queue == "q" && consumer_tag == "worker")
        ),
        "{:?}",
        w.topology_log
    );
    // the next recovery does not try the declaration again
    let failures = replay_failures(&w);
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(5))
        .expect("recovers at once");
    assert_eq!(replay_failures(&w), failures, "refused again");
    // the application declares it as the broker has it: replayed again
    w.fail_declare = None;
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    w.topology_log.clear();
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(5))
        .expect("recovers at once");
    assert_eq!(declares_of_q(&w), 1, "{:?}", w.topology_log);
}

fn replay_failures(w: &World) -> usize {
    w.events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ReplayFailed { .. }))
        .count()
}

/// A queue named by a `String` the application keeps is taken by reference,
/// as `publish` takes its routing key: `client.consume(&name, ..)`.
#[test]
fn a_queue_name_in_a_string_is_taken_by_reference() {
    fn by_name(queue: impl Into<QueueRef>) -> QueueRef {
        queue.into()
    }
    let name = String::from("orders");
    assert_eq!(by_name(&name), QueueRef::Named("orders".into()));
    assert_eq!(name, "orders", "still the application's");
}

/// A fixed-name auto-delete queue left out of the replay (the broker has it
/// with other arguments) whose only consumer's channel closes alone: the
/// channel's replay must not declare it again as an orphaned auto-delete
/// queue, which the broker refuses (406) at every reopen, holding the channel
/// (and its consumer) from Ready for good.
#[test]
fn an_undeclared_auto_delete_queue_is_not_declared_again_when_its_consumers_channel_closes() {
    let mut w = ready_world(1, 2);
    let decl = QueueDecl {
        auto_delete: true,
        ..QueueDecl::durable("q")
    };
    let (_, q) = w.app(|s, now| s.declare_queue(now, decl)).unwrap();
    let consumer = consume_as(&mut w, q.into(), "worker");
    w.run_for(Duration::from_millis(50));
    w.fail_declare = Some(("q".into(), inequivalent()));
    kill(&mut w);
    w.run_until_ready(Duration::from_secs(60))
        .expect("the connection's channels come back without the declaration");
    let abandoned = |w: &World| {
        w.events
            .iter()
            .filter(|(_, e)| matches!(e, Event::ReplayAbandoned { .. }))
            .count()
    };
    assert_eq!(abandoned(&w), 1);
    let channel = w.sup.consumer_channel(consumer).unwrap();
    w.topology_log.clear();
    let failures = replay_failures(&w);
    w.channel_error(channel, 406);
    if w.run_until_ready(Duration::from_secs(60)).is_none() {
        panic!(
            "the consumer's channel is held from Ready: {} replay failures, {} ReplayAbandoned",
            replay_failures(&w) - failures,
            abandoned(&w)
        );
    }
    assert_eq!(declares_of_q(&w), 0, "{:?}", op_names(&w.topology_log));
    assert_eq!(replay_failures(&w), failures, "refused again");
    assert_eq!(abandoned(&w), 1, "abandoned once");
    assert!(
        op_names(&w.topology_log)
            .iter()
            .any(|n| n == "consume q worker"),
        "{:?}",
        op_names(&w.topology_log)
    );
}

/// Each connection of a pool replays a shared queue's declaration: the broker
/// refusing it on both is one abandonment, and both connections come back.
#[test]
fn a_pool_abandons_a_refused_queue_declaration_once() {
    let mut w = ready_world(2, 2);
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, q.into(), "amq.topic", "k", FieldTable::default()))
        .unwrap();
    consume_as(&mut w, q.into(), "a");
    consume_as(&mut w, q.into(), "b");
    w.run_for(Duration::from_millis(50));
    w.fail_declare = Some(("q".into(), inequivalent()));
    w.topology_log.clear();
    w.kill(C0, TransportError::Io("reset".into()));
    w.kill(ConnectionId(1), TransportError::Io("reset".into()));
    w.run_until_ready(Duration::from_secs(60))
        .expect("both connections come back without the declaration");
    let abandoned = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ReplayAbandoned { .. }))
        .count();
    assert_eq!(abandoned, 1);
    let binds: Vec<_> = w
        .topology_log
        .iter()
        .filter(|(_, op)| matches!(op, TopologyOp::BindQueue { .. }))
        .map(|(c, _)| c.connection)
        .collect();
    assert!(
        binds.contains(&C0) && binds.contains(&ConnectionId(1)),
        "{binds:?}"
    );
}

/// Refusals that come back (404: a durable queue whose node is down) hold the
/// declaration in the replay; only 406 refusals count towards leaving it out.
/// A queue refused four times as not found and then once with 406 (its node
/// came back, and another application had declared it again meanwhile) is
/// still declared at the next replay, not left out at the first 406.
#[test]
fn refusals_other_than_406_do_not_count_towards_leaving_a_queue_out() {
    let mut w = ready_world(1, 2);
    w.app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.run_for(Duration::from_millis(50));
    w.fail_declare = Some(("q".into(), not_found()));
    let before = replay_failures(&w);
    kill(&mut w);
    let start = w.elapsed();
    while replay_failures(&w) < before + 4 {
        w.run_for(Duration::from_millis(10));
        assert!(w.elapsed() - start < Duration::from_secs(60), "four 404s");
    }
    w.fail_declare = Some(("q".into(), inequivalent()));
    while replay_failures(&w) < before + 5
        && !w
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::ReplayAbandoned { .. }))
    {
        w.run_for(Duration::from_millis(10));
        assert!(w.elapsed() - start < Duration::from_secs(120), "a 406");
    }
    let abandoned: Vec<_> = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ReplayAbandoned { .. }))
        .collect();
    assert!(
        abandoned.is_empty(),
        "left out at the first 406: {abandoned:?}"
    );
}

/// RabbitMQ also refuses a queue.declare with 406 when the vhost's queue limit
/// is reached ("cannot declare queue 'q': queue limit in vhost '/' (N) is
/// reached"): the queue is not there, and the refusal passes once other queues
/// go. Such a declaration is not another application's queue to leave it to:
/// left out of the replay, the queue would never be declared again (its
/// bindings refused, then dropped; its consumers refused, then ended). It
/// holds in the replay, as a 404 or 405 does, and is declared once the limit
/// lets it.
#[test]
fn a_queue_refused_for_the_vhost_queue_limit_is_declared_again_once_the_limit_lets_it() {
    let mut w = ready_world(1, 2);
    worker_on_q(&mut w);
    w.fail_declare = Some((
        "q".into(),
        TransportError::Reply {
            code: 406,
            text: "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in vhost '/' (100) \
                   is reached"
                .into(),
        },
    ));
    let before = replay_failures(&w);
    kill(&mut w);
    // refused more than MAX_REPLAY_REFUSALS times
    let start = w.elapsed();
    let abandoned = |w: &World| {
        w.events
            .iter()
            .filter(|(_, e)| matches!(e, Event::ReplayAbandoned { .. }))
            .count()
    };
    while replay_failures(&w) < before + 7 && abandoned(&w) == 0 {
        w.run_for(Duration::from_millis(10));
        assert!(w.elapsed() - start < Duration::from_secs(300), "refusals");
    }
    // the limit lets it now
    w.fail_declare = None;
    w.topology_log.clear();
    w.run_until_ready(Duration::from_secs(120))
        .expect("the connection comes back");
    assert_eq!(abandoned(&w), 0, "left out of the replay");
    assert_eq!(declares_of_q(&w), 1, "{:?}", op_names(&w.topology_log));
}

/// Declares the durable queue "q", binds it to amq.topic with key "k" and
/// consumes it as "worker"; all of it taken.
fn worker_on_q(w: &mut World) {
    let (_, q) = w
        .app(|s, now| s.declare_queue(now, QueueDecl::durable("q")))
        .unwrap();
    w.app(|s, now| s.bind_queue(now, q.into(), "amq.topic", "k", FieldTable::default()))
        .unwrap();
    consume_as(w, q.into(), "worker");
    w.run_for(Duration::from_millis(50));
}

/// The only subscribed consumer of an auto-delete queue loses its channel (the
/// broker deletes the queue with it); while the channel reopens, the
/// application starts another consumer of the queue there and cancels the
/// first one. The new consumer was never subscribed, but the queue is gone all
/// the same: the reopened channel declares it again before subscribing.
#[test]
fn a_consumer_cancelled_while_its_channel_reopens_leaves_its_auto_delete_queue_to_be_redeclared() {
    let mut w = ready_world(1, 1);
    let anon = declare_topology(&mut w);
    let first = consume_as(&mut w, anon.into(), "c0");
    w.run_for(Duration::from_millis(20));
    assert_eq!(w.sup.consumer_channel(first), Some(ch(0, 0)));
    w.topology_log.clear();
    w.channel_error(ch(0, 0), 406);
    let second = consume_as(&mut w, anon.into(), "c1");
    assert_eq!(w.sup.consumer_channel(second), Some(ch(0, 0)));
    w.app(|s, now| s.cancel(now, first)).unwrap();
    w.run_until_ready(Duration::from_secs(5)).unwrap();
    w.run_for(Duration::from_millis(20));
    assert_eq!(
        op_names(&w.topology_log),
        vec![
            "queue \"\"",
            "bind amq.gen-2 #",
            "qos 0",
            "consume amq.gen-2 c1"
        ],
        "BUG: subscribed to the queue the broker deleted with the first consumer"
    );
}
