//! The broker model through core's transport traits: routing, confirms, queues,
//! consumers and the errors RabbitMQ sends.

mod common;

use amqp_rebound_core::message::{AMQPValue, FieldTable};
use amqp_rebound_core::{
    Channel, ChannelEvent, Connection, ConsumeOptions, ExchangeDecl, ExchangeKind, Message,
    Properties, QueueDecl,
};
use amqp_rebound_sim::BindingDestination;
use common::*;

fn transient(name: &str) -> QueueDecl {
    QueueDecl {
        name: name.into(),
        ..QueueDecl::default()
    }
}

fn msg(exchange: &str, key: &str, body: &str) -> Message {
    Message::new(exchange, key, body.as_bytes().to_vec())
}

fn ready(h: &Harness, queue: &str) -> Vec<String> {
    h.broker
        .queue(queue)
        .expect("queue exists")
        .ready
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

fn bind(h: &mut Harness, chan: &Chan, queue: &str, exchange: &str, key: &str) {
    h.block_on(
        chan.chan
            .bind_queue(queue, exchange, key, &FieldTable::default()),
    )
    .expect("bind");
}

fn publish(h: &mut Harness, chan: &Chan, message: Message) {
    h.block_on(chan.chan.publish(&message)).expect("publish");
}

#[test]
fn direct_fanout_and_default_exchanges_route() {
    let mut h = Harness::new(1);
    let (_c, ch) = h.confirm_channel();
    for q in ["q1", "q2"] {
        h.declare(&ch, transient(q));
    }
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("d", ExchangeKind::Direct)),
    )
    .unwrap();
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("f", ExchangeKind::Fanout)),
    )
    .unwrap();
    bind(&mut h, &ch, "q1", "d", "k");
    bind(&mut h, &ch, "q1", "f", "ignored");
    bind(&mut h, &ch, "q2", "f", "");
    bind(&mut h, &ch, "q2", "amq.direct", "k2");
    publish(&mut h, &ch, msg("d", "k", "direct"));
    publish(&mut h, &ch, msg("d", "nope", "lost"));
    publish(&mut h, &ch, msg("f", "whatever", "fanout"));
    publish(&mut h, &ch, msg("", "q2", "default"));
    publish(&mut h, &ch, msg("", "missing", "lost too"));
    publish(&mut h, &ch, msg("amq.direct", "k2", "amq"));
    h.advance(ms(10));
    assert_eq!(ready(&h, "q1"), ["direct", "fanout"]);
    assert_eq!(ready(&h, "q2"), ["fanout", "default", "amq"]);
    let stats = h.broker.stats();
    assert_eq!((stats.published, stats.routed, stats.unroutable), (6, 5, 2));
}

#[test]
fn topic_patterns_route() {
    let mut h = Harness::new(1);
    let (_c, ch) = h.confirm_channel();
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("t", ExchangeKind::Topic)),
    )
    .unwrap();
    for (q, pattern) in [
        ("star", "a.*.c"),
        ("hash", "a.#"),
        ("all", "#"),
        ("lit", "a.b"),
    ] {
        h.declare(&ch, transient(q));
        bind(&mut h, &ch, q, "t", pattern);
    }
    for key in ["a.b.c", "a.b", "a", "x.y", "a.x.y.c", ""] {
        publish(&mut h, &ch, msg("t", key, key));
    }
    h.advance(ms(10));
    assert_eq!(ready(&h, "star"), ["a.b.c"]);
    assert_eq!(ready(&h, "hash"), ["a.b.c", "a.b", "a", "a.x.y.c"]);
    assert_eq!(
        ready(&h, "all"),
        ["a.b.c", "a.b", "a", "x.y", "a.x.y.c", ""]
    );
    assert_eq!(ready(&h, "lit"), ["a.b"]);
}

#[test]
fn headers_and_exchange_to_exchange_bindings_route() {
    let mut h = Harness::new(1);
    let (_c, ch) = h.confirm_channel();
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("src", ExchangeKind::Topic)),
    )
    .unwrap();
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("dst", ExchangeKind::Fanout)),
    )
    .unwrap();
    h.block_on(
        ch.chan
            .bind_exchange("dst", "src", "orders.#", &FieldTable::default()),
    )
    .unwrap();
    // A cycle must not loop.
    h.block_on(
        ch.chan
            .bind_exchange("src", "dst", "", &FieldTable::default()),
    )
    .unwrap();
    h.declare(&ch, transient("e2e"));
    bind(&mut h, &ch, "e2e", "dst", "");
    bind(&mut h, &ch, "e2e", "src", "orders.eu");

    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("any".into()));
    args.insert("kind".into(), AMQPValue::LongString("invoice".into()));
    h.declare(&ch, transient("hdr"));
    h.block_on(ch.chan.bind_queue("hdr", "amq.headers", "", &args))
        .unwrap();

    publish(&mut h, &ch, msg("src", "orders.eu", "one copy"));
    publish(&mut h, &ch, msg("src", "payments", "none"));
    let mut headers = FieldTable::default();
    headers.insert("kind".into(), AMQPValue::LongString("invoice".into()));
    let props = Properties::default().with_headers(headers);
    publish(
        &mut h,
        &ch,
        msg("amq.headers", "", "hdr").with_properties(props),
    );
    publish(&mut h, &ch, msg("amq.headers", "", "no headers"));
    h.advance(ms(10));
    assert_eq!(ready(&h, "e2e"), ["one copy"]);
    assert_eq!(ready(&h, "hdr"), ["hdr"]);
    let bindings = h.broker.bindings();
    assert!(
        bindings
            .iter()
            .any(|b| b.source == "src"
                && b.destination == BindingDestination::Exchange("dst".into()))
    );
}

#[test]
fn confirms_are_numbered_in_order_and_returns_come_first() {
    let mut h = Harness::new(1);
    let (_c, mut ch) = h.confirm_channel();
    h.declare(&ch, transient("q"));
    publish(&mut h, &ch, msg("", "q", "1"));
    publish(&mut h, &ch, msg("", "nowhere", "2").mandatory(true));
    publish(&mut h, &ch, msg("", "q", "3").mandatory(true));
    publish(&mut h, &ch, msg("", "nowhere", "4"));
    assert!(
        drain(&mut ch.events).is_empty(),
        "nothing before time passes"
    );
    h.advance(ms(1));
    assert!(drain(&mut ch.events).is_empty(), "one latency up, one down");
    h.advance(ms(1));
    let events = drain(&mut ch.events);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(acks(&events), [1, 2, 3, 4]);
    match (&events[1], &events[2]) {
        (
            ChannelEvent::Return(r),
            ChannelEvent::Ack {
                delivery_tag: 2,
                multiple: false,
            },
        ) => {
            assert_eq!((r.reply_code, r.routing_key.as_str()), (312, "nowhere"));
            assert_eq!(&r.payload[..], b"2");
        }
        other => panic!("return must precede its ack: {other:?}"),
    }
}

#[test]
fn publishing_to_a_missing_exchange_closes_the_channel_with_404() {
    let mut h = Harness::new(1);
    let (_c, mut ch) = h.confirm_channel();
    publish(&mut h, &ch, msg("missing", "k", "x"));
    h.advance(ms(5));
    let events = drain(&mut ch.events);
    assert_eq!(closed_code(&events), Some(404));
    assert!(acks(&events).is_empty());
    assert!(ended(&mut ch.events));
    let err = h.block_on(ch.chan.publish(&msg("", "q", "y"))).unwrap_err();
    assert_eq!(code(&err), Some(404));
    // Calls on a closed channel fail at once; close is a no-op.
    h.block_on(ch.chan.close()).unwrap();
}

#[test]
fn missing_entities_give_404_and_close_only_that_channel() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut a = h.channel(&conn);
    let b = h.channel(&conn);
    let err = h
        .block_on(
            a.chan
                .bind_queue("nope", "amq.direct", "", &FieldTable::default()),
        )
        .unwrap_err();
    assert_eq!(code(&err), Some(404));
    assert_eq!(closed_code(&drain(&mut a.events)), Some(404));
    let err = h
        .block_on(b.chan.consume("nope", "t", &ConsumeOptions::default()))
        .unwrap_err();
    assert_eq!(code(&err), Some(404));
    let c = h.channel(&conn);
    h.declare(&c, transient("q"));
    let err = h
        .block_on(
            c.chan
                .bind_queue("q", "missing", "", &FieldTable::default()),
        )
        .unwrap_err();
    assert_eq!(code(&err), Some(404));
    // Deleting what does not exist is fine; the default exchange is off limits.
    let d = h.channel(&conn);
    assert_eq!(h.block_on(d.chan.delete_queue("never")), Ok(0));
    h.block_on(d.chan.delete_exchange("never")).unwrap();
    let err = h
        .block_on(d.chan.bind_queue("q", "", "q", &FieldTable::default()))
        .unwrap_err();
    assert_eq!(code(&err), Some(403));
    assert!(!conn.conn.is_closed());
}

#[test]
fn redeclare_with_other_flags_is_406() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let ch = h.channel(&conn);
    h.declare(&ch, QueueDecl::durable("q"));
    h.declare(&ch, QueueDecl::durable("q"));
    let err = h
        .block_on(ch.chan.declare_queue(&transient("q")))
        .unwrap_err();
    assert_eq!(code(&err), Some(406));
    let ch = h.channel(&conn);
    h.block_on(
        ch.chan
            .declare_exchange(&ExchangeDecl::new("x", ExchangeKind::Topic)),
    )
    .unwrap();
    let err = h
        .block_on(
            ch.chan
                .declare_exchange(&ExchangeDecl::new("x", ExchangeKind::Direct)),
        )
        .unwrap_err();
    assert_eq!(code(&err), Some(406));
    let ch = h.channel(&conn);
    let err = h
        .block_on(
            ch.chan
                .declare_exchange(&ExchangeDecl::new("amq.mine", ExchangeKind::Topic)),
        )
        .unwrap_err();
    assert_eq!(code(&err), Some(403));
}

#[test]
fn exclusive_queues_are_locked_to_their_connection() {
    let mut h = Harness::new(1);
    let owner = h.connect();
    let och = h.channel(&owner);
    let decl = QueueDecl {
        name: "mine".into(),
        exclusive: true,
        ..QueueDecl::default()
    };
    h.declare(&och, decl.clone());
    h.declare(&och, decl.clone());
    let other = h.connect();
    for attempt in 0..3 {
        let mut ch = h.channel(&other);
        let err = match attempt {
            0 => h.block_on(ch.chan.declare_queue(&decl)).map(|_| ()),
            1 => h.block_on(ch.chan.consume("mine", "c", &ConsumeOptions::default())),
            _ => h.block_on(ch.chan.delete_queue("mine")).map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(code(&err), Some(405), "attempt {attempt}");
        assert_eq!(closed_code(&drain(&mut ch.events)), Some(405));
    }
    // Publishing to it is allowed.
    let ch = h.channel(&other);
    publish(&mut h, &ch, msg("", "mine", "hi"));
    h.advance(ms(5));
    assert_eq!(ready(&h, "mine"), ["hi"]);
    // The owner leaves: the queue goes.
    h.block_on(owner.conn.close()).unwrap();
    assert!(h.broker.queue("mine").is_none());
}

#[test]
fn server_named_queues_get_amq_gen_names() {
    let mut h = Harness::new(42);
    let conn = h.connect();
    let ch = h.channel(&conn);
    let a = h.declare(&ch, QueueDecl::server_named());
    let b = h.declare(&ch, QueueDecl::server_named());
    assert!(
        a.starts_with("amq.gen-") && a.len() == "amq.gen-".len() + 22,
        "{a}"
    );
    assert_ne!(a, b);
    let err = h
        .block_on(ch.chan.declare_queue(&transient("amq.custom")))
        .unwrap_err();
    assert_eq!(code(&err), Some(403));

    let mut again = Harness::new(42);
    let conn = again.connect();
    let ch = again.channel(&conn);
    assert_eq!(again.declare(&ch, QueueDecl::server_named()), a);
    let mut other = Harness::new(43);
    let conn = other.connect();
    let ch = other.channel(&conn);
    assert_ne!(other.declare(&ch, QueueDecl::server_named()), a);
}

fn fill(h: &mut Harness, queue: &str, n: usize) {
    for i in 0..n {
        h.broker
            .publish(&msg("", queue, &format!("m{i}")))
            .expect("inject");
    }
}

#[test]
fn prefetch_is_honoured_and_acks_free_room() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    fill(&mut h, "q", 5);
    let options = ConsumeOptions {
        prefetch: Some(2),
        ..ConsumeOptions::default()
    };
    h.block_on(ch.chan.consume("q", "c1", &options)).unwrap();
    h.advance(ms(5));
    let got = deliveries(&drain(&mut ch.events));
    assert_eq!(
        got.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(got[0].consumer_tag, "c1");
    assert_eq!(&got[0].payload[..], b"m0");
    h.block_on(ch.chan.ack(1, false)).unwrap();
    h.advance(ms(5));
    let got = deliveries(&drain(&mut ch.events));
    assert_eq!(got.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(), [3]);
    // ack multiple up to 3 frees two slots.
    h.block_on(ch.chan.ack(3, true)).unwrap();
    h.advance(ms(5));
    let got = deliveries(&drain(&mut ch.events));
    assert_eq!(
        got.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        [4, 5]
    );
    let q = h.broker.queue("q").unwrap();
    assert_eq!((q.ready.len(), q.unacked.len()), (0, 2));
    assert_eq!(h.broker.stats().acked, 3);
    assert!(h.broker.stats().is_conserved());
}

#[test]
fn round_robin_between_consumers() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    let options = ConsumeOptions {
        no_ack: true,
        ..ConsumeOptions::default()
    };
    h.block_on(ch.chan.consume("q", "a", &options)).unwrap();
    h.block_on(ch.chan.consume("q", "b", &options)).unwrap();
    fill(&mut h, "q", 4);
    h.advance(ms(5));
    let tags: Vec<String> = deliveries(&drain(&mut ch.events))
        .into_iter()
        .map(|d| d.consumer_tag)
        .collect();
    assert_eq!(tags, ["a", "b", "a", "b"]);
    assert!(h.broker.stats().is_conserved());
}

#[test]
fn requeue_sets_redelivered_and_reject_discards() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    fill(&mut h, "q", 2);
    h.block_on(ch.chan.qos(1)).unwrap();
    h.block_on(ch.chan.consume("q", "c", &ConsumeOptions::default()))
        .unwrap();
    h.advance(ms(5));
    let first = deliveries(&drain(&mut ch.events));
    assert_eq!(first.len(), 1);
    assert!(!first[0].redelivered);
    h.block_on(ch.chan.nack(1, false, true)).unwrap();
    h.advance(ms(5));
    let again = deliveries(&drain(&mut ch.events));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].delivery_tag, again[0].redelivered), (2, true));
    assert_eq!(again[0].payload, first[0].payload);
    h.block_on(ch.chan.reject(2, false)).unwrap();
    h.advance(ms(5));
    let next = deliveries(&drain(&mut ch.events));
    assert_eq!(
        (&next[0].payload[..], next[0].redelivered),
        (&b"m1"[..], false)
    );
    let stats = h.broker.stats();
    assert_eq!(
        (stats.requeued, stats.discarded, stats.redelivered),
        (1, 1, 1)
    );
    assert!(stats.is_conserved());
}

#[test]
fn unknown_delivery_tag_closes_the_channel_with_406_and_is_counted() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.block_on(ch.chan.ack(7, false)).unwrap();
    h.advance(ms(5));
    assert_eq!(closed_code(&drain(&mut ch.events)), Some(406));
    assert_eq!(h.broker.unknown_tag_acks(), 1);
    let info = h.broker.connection(conn.conn.id()).unwrap();
    assert_eq!(info.stats.unknown_tag_acks, 1);
    // A double ack is an unknown tag too.
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    fill(&mut h, "q", 1);
    h.block_on(ch.chan.consume("q", "c", &ConsumeOptions::default()))
        .unwrap();
    h.advance(ms(5));
    let tag = deliveries(&drain(&mut ch.events))[0].delivery_tag;
    h.block_on(ch.chan.ack(tag, false)).unwrap();
    h.block_on(ch.chan.ack(tag, false)).unwrap();
    h.advance(ms(5));
    assert_eq!(closed_code(&drain(&mut ch.events)), Some(406));
    assert_eq!(h.broker.unknown_tag_acks(), 2);
    assert!(!conn.conn.is_closed());
}

#[test]
fn deleting_a_queue_cancels_its_consumers() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    fill(&mut h, "q", 3);
    h.block_on(ch.chan.qos(1)).unwrap();
    h.block_on(ch.chan.consume("q", "c", &ConsumeOptions::default()))
        .unwrap();
    let other = h.channel(&conn);
    assert_eq!(h.block_on(other.chan.delete_queue("q")), Ok(2));
    h.advance(ms(5));
    let events = drain(&mut ch.events);
    assert!(
        events.iter().any(
            |e| matches!(e, ChannelEvent::ConsumerCancelled { consumer_tag } if consumer_tag == "c")
        ),
        "{events:?}"
    );
    // The delivered message can still be acked.
    h.block_on(ch.chan.ack(1, false)).unwrap();
    h.advance(ms(5));
    assert!(drain(&mut ch.events).is_empty());
    let stats = h.broker.stats();
    assert_eq!((stats.dropped_by_delete, stats.acked), (2, 1));
    assert!(stats.is_conserved());
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let ch = h.channel(&conn);
    let decl = QueueDecl {
        name: "ad".into(),
        auto_delete: true,
        ..QueueDecl::default()
    };
    h.declare(&ch, decl);
    h.block_on(ch.chan.consume("ad", "a", &ConsumeOptions::default()))
        .unwrap();
    h.block_on(ch.chan.consume("ad", "b", &ConsumeOptions::default()))
        .unwrap();
    h.block_on(ch.chan.cancel("a")).unwrap();
    assert!(h.broker.queue("ad").is_some());
    h.block_on(ch.chan.cancel("b")).unwrap();
    assert!(h.broker.queue("ad").is_none());
}

#[test]
fn reusing_a_consumer_tag_closes_the_connection_with_530() {
    let mut h = Harness::new(1);
    let mut conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    h.block_on(ch.chan.consume("q", "same", &ConsumeOptions::default()))
        .unwrap();
    let err = h
        .block_on(ch.chan.consume("q", "same", &ConsumeOptions::default()))
        .unwrap_err();
    assert_eq!(code(&err), Some(530));
    h.advance(ms(5));
    let conn_events = drain(&mut conn.events);
    assert!(
        matches!(&conn_events[..], [amqp_rebound_core::ConnectionEvent::Closed(e)] if e.reply_code() == Some(530))
    );
    assert_eq!(closed_code(&drain(&mut ch.events)), Some(530));
    assert!(ended(&mut conn.events));
}

#[test]
fn closing_a_channel_requeues_its_unacked_messages() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, transient("q"));
    fill(&mut h, "q", 3);
    h.block_on(ch.chan.consume("q", "c", &ConsumeOptions::default()))
        .unwrap();
    h.advance(ms(5));
    assert_eq!(deliveries(&drain(&mut ch.events)).len(), 3);
    h.block_on(ch.chan.ack(2, false)).unwrap();
    h.block_on(ch.chan.close()).unwrap();
    let events = drain(&mut ch.events);
    assert!(matches!(
        &events[..],
        [ChannelEvent::Closed(
            amqp_rebound_core::TransportError::ClosedByClient
        )]
    ));
    let q = h.broker.queue("q").unwrap();
    let ready: Vec<(&[u8], bool)> = q
        .ready
        .iter()
        .map(|m| (&m.payload[..], m.redelivered))
        .collect();
    assert_eq!(ready, [(&b"m0"[..], true), (&b"m2"[..], true)]);
    assert!(q.consumers.is_empty());
    assert!(h.broker.stats().is_conserved());
}

fn ms(n: u64) -> std::time::Duration {
    std::time::Duration::from_millis(n)
}
