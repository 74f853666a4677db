//! Fault injection: kills, refusals, partitions, restarts, channel closes,
//! confirm faults, flow control, broker cancels, hosts and brokers.

mod common;

use std::time::Duration;

use amqp_rebound_core::transport::ConnectOptions;
use amqp_rebound_core::{
    Channel, ChannelEvent, Connection, ConnectionEvent, ConsumeOptions, Endpoint, Message,
    Properties, QueueDecl, Transport, TransportError,
};
use amqp_rebound_sim::{BrokerConfig, ConfirmMode, SimBroker, SimTransport};
use common::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn msg(key: &str, body: &str) -> Message {
    Message::new("", key, body.as_bytes().to_vec())
}

fn conn_closed(events: &[ConnectionEvent]) -> Option<TransportError> {
    events.iter().find_map(|e| match e {
        ConnectionEvent::Closed(err) => Some(err.clone()),
        _ => None,
    })
}

fn chan_closed(events: &[ChannelEvent]) -> Option<TransportError> {
    events.iter().find_map(|e| match e {
        ChannelEvent::Closed(err) => Some(err.clone()),
        _ => None,
    })
}

#[test]
fn kill_closes_connection_and_channels_with_io_and_requeues() {
    let mut h = Harness::new(1);
    let mut conn = h.connect();
    let mut ch = h.channel(&conn);
    let mut ch2 = h.channel(&conn);
    h.declare(&ch, QueueDecl::durable("q"));
    h.broker.publish(&msg("q", "a")).unwrap();
    h.block_on(ch.chan.consume("q", "c", &ConsumeOptions::default()))
        .unwrap();
    h.advance(ms(5));
    assert_eq!(deliveries(&drain(&mut ch.events)).len(), 1);
    // A call in flight when the connection dies fails with the same error.
    let decl = QueueDecl::durable("other");
    let pending = ch2.chan.declare_queue(&decl);
    assert!(h.broker.kill_connection(conn.conn.id()));
    let err = h.block_on(pending).unwrap_err();
    assert!(matches!(err, TransportError::Io(_)), "{err:?}");
    assert!(matches!(
        conn_closed(&drain(&mut conn.events)),
        Some(TransportError::Io(_))
    ));
    assert!(matches!(
        chan_closed(&drain(&mut ch.events)),
        Some(TransportError::Io(_))
    ));
    assert!(matches!(
        chan_closed(&drain(&mut ch2.events)),
        Some(TransportError::Io(_))
    ));
    assert!(ended(&mut conn.events) && ended(&mut ch.events));
    assert!(conn.conn.is_closed() && ch.chan.is_closed());
    assert!(h.block_on(ch.chan.ack(1, false)).is_err());
    assert!(h.block_on(conn.conn.open_channel()).is_err());
    h.block_on(conn.conn.close()).unwrap();
    let q = h.broker.queue("q").unwrap();
    assert_eq!((q.ready.len(), q.ready[0].redelivered), (1, true));
    assert!(!h.broker.kill_connection(conn.conn.id()), "already dead");
    assert!(h.broker.stats().is_conserved());
}

#[test]
fn refused_dials_fail_with_io_until_the_refusal_ends() {
    let mut h = Harness::new(1);
    assert!(h.broker.refuse_dials(HOST, secs(5)));
    let err = h.connect_to(URI).err().unwrap();
    assert!(
        matches!(err, TransportError::Io(ref m) if m.contains("refused")),
        "{err:?}"
    );
    h.advance(secs(5));
    assert!(h.connect_to(URI).is_ok());
    h.broker.refuse_dials_indefinitely(HOST);
    h.advance(secs(3600));
    assert!(h.connect_to(URI).is_err());
    h.broker.accept_dials(HOST);
    assert!(h.connect_to(URI).is_ok());
    // No broker behind a host: refused as well.
    assert!(h.connect_to("amqp://guest:guest@elsewhere").is_err());
}

#[test]
fn wrong_credentials_fail_with_auth() {
    let mut h = Harness::new(1);
    let err = h.connect_to("amqp://guest:wrong@rabbit").err().unwrap();
    assert!(matches!(err, TransportError::Auth(_)), "{err:?}");
    h.broker.set_credentials("app", "s3cret");
    assert!(h.connect_to("amqp://app:s3cret@rabbit").is_ok());
    assert!(!format!("{:?}", h.broker).contains("s3cret"));
}

#[test]
fn partition_reports_heartbeat_timeout_after_twice_the_interval() {
    let mut h = Harness::new(1);
    let mut default_hb = h.connect();
    let mut ch = h.channel(&default_hb);
    let mut short_hb = h
        .connect_to("amqp://guest:guest@rabbit/%2f?heartbeat=3")
        .unwrap();
    let mut no_hb = h
        .connect_to("amqp://guest:guest@rabbit/%2f?heartbeat=0")
        .unwrap();
    let start = h.now();
    assert!(h.broker.partition(HOST));
    // Calls hang; dials never complete.
    let decl = QueueDecl::durable("q");
    let pending = ch.chan.declare_queue(&decl);
    let endpoint = Endpoint::parse(URI).unwrap();
    let transport = h.transport.clone();
    let dial = async move {
        transport
            .connect(&endpoint, &ConnectOptions::default())
            .await
    };
    let mut dial = Box::pin(dial);
    assert!(h.try_block_on(&mut dial, secs(5)).is_none());
    // 2 x 3 s.
    assert_eq!(h.now() - start, secs(5));
    h.advance(ms(999));
    assert!(drain(&mut short_hb.events).is_empty());
    h.advance(ms(1));
    assert_eq!(
        conn_closed(&drain(&mut short_hb.events)),
        Some(TransportError::HeartbeatTimeout)
    );
    // 2 x 10 s (the default).
    let err = h.block_on(pending).unwrap_err();
    assert_eq!(err, TransportError::HeartbeatTimeout);
    assert_eq!(h.now() - start, secs(20));
    assert_eq!(
        conn_closed(&drain(&mut default_hb.events)),
        Some(TransportError::HeartbeatTimeout)
    );
    assert_eq!(
        chan_closed(&drain(&mut ch.events)),
        Some(TransportError::HeartbeatTimeout)
    );
    // Without heartbeats nothing is ever detected.
    h.advance(secs(600));
    assert!(drain(&mut no_hb.events).is_empty());
    assert!(
        h.broker
            .connection(no_hb.conn.id())
            .unwrap()
            .closed
            .is_none()
    );
    // The dial started during the partition stays hung even after the heal.
    h.broker.heal(HOST);
    assert!(h.try_block_on(&mut dial, secs(60)).is_none());
    assert!(h.connect_to(URI).is_ok());
}

#[test]
fn a_short_partition_only_delays_frames() {
    let mut h = Harness::new(1);
    let (mut conn, mut ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("q"));
    h.broker.partition(HOST);
    h.block_on(ch.chan.publish(&msg("q", "held"))).unwrap();
    let decl = QueueDecl::durable("q2");
    let mut declare = Box::pin(ch.chan.declare_queue(&decl));
    assert!(h.try_block_on(&mut declare, secs(15)).is_none());
    assert!(h.broker.queue("q").unwrap().ready.is_empty());
    h.broker.heal(HOST);
    assert_eq!(h.block_on(declare).unwrap().name, "q2");
    h.advance(ms(5));
    assert_eq!(acks(&drain(&mut ch.events)), [1]);
    assert_eq!(h.broker.queue("q").unwrap().ready.len(), 1);
    h.advance(secs(30));
    assert!(
        drain(&mut conn.events).is_empty(),
        "the old heartbeat check is void"
    );
}

#[test]
fn restart_forces_320_and_keeps_only_durable_state() {
    let mut h = Harness::new(1);
    let (mut conn, mut ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("keep"));
    h.declare(
        &ch,
        QueueDecl {
            name: "lose".into(),
            ..QueueDecl::default()
        },
    );
    let excl = h.declare(&ch, QueueDecl::server_named());
    for q in ["keep", "lose"] {
        let persistent = Properties::default().persistent();
        h.block_on(ch.chan.publish(&msg(q, "m").with_properties(persistent)))
            .unwrap();
    }
    h.block_on(ch.chan.publish(&msg(&excl, "m"))).unwrap();
    h.advance(ms(5));
    assert_eq!(acks(&drain(&mut ch.events)), [1, 2, 3]);
    // One more publish is in flight when the broker goes down: it is lost.
    h.block_on(ch.chan.publish(&msg("keep", "in flight")))
        .unwrap();
    h.broker.restart(secs(2));
    h.advance(ms(5));
    let forced = conn_closed(&drain(&mut conn.events)).unwrap();
    assert_eq!(forced.reply_code(), Some(320));
    assert_eq!(
        chan_closed(&drain(&mut ch.events)).unwrap().reply_code(),
        Some(320)
    );
    assert_eq!(h.broker.queue_names(), ["keep"]);
    assert_eq!(h.broker.queue("keep").unwrap().ready.len(), 1);
    let stats = h.broker.stats();
    assert_eq!((stats.dropped_by_restart, stats.restarts), (2, 1));
    assert!(stats.is_conserved());
    // Down for 2 s, then back.
    assert!(h.connect_to(URI).is_err());
    h.advance(secs(2));
    assert!(h.connect_to(URI).is_ok());
}

#[test]
fn restart_can_drop_transient_messages_from_durable_queues() {
    let config = BrokerConfig {
        restart_keeps_transient_messages: false,
        ..BrokerConfig::default()
    };
    let mut h = Harness::with_config(config);
    let (_conn, ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("q"));
    h.block_on(ch.chan.publish(&msg("q", "transient"))).unwrap();
    let persistent = Properties::default().persistent();
    h.block_on(
        ch.chan
            .publish(&msg("q", "persistent").with_properties(persistent)),
    )
    .unwrap();
    h.advance(ms(5));
    h.broker.restart(Duration::ZERO);
    let q = h.broker.queue("q").unwrap();
    assert_eq!(q.ready.len(), 1);
    assert_eq!(&q.ready[0].payload[..], b"persistent");
    assert!(h.broker.stats().is_conserved());
}

#[test]
fn broker_closes_a_channel_or_a_connection_with_a_code() {
    let mut h = Harness::new(1);
    let mut conn = h.connect();
    let mut a = h.channel(&conn);
    let mut b = h.channel(&conn);
    assert!(
        h.broker
            .close_channel(conn.conn.id(), a.chan.number(), 541, "INTERNAL_ERROR")
    );
    h.advance(ms(5));
    assert_eq!(
        chan_closed(&drain(&mut a.events)).unwrap().reply_code(),
        Some(541)
    );
    assert!(drain(&mut b.events).is_empty());
    // Channel numbers are reused.
    let c = h.channel(&conn);
    assert_eq!(c.chan.number(), a.chan.number());
    assert!(
        h.broker
            .close_connection(conn.conn.id(), 320, "CONNECTION_FORCED - admin")
    );
    h.advance(ms(5));
    assert_eq!(
        conn_closed(&drain(&mut conn.events)).unwrap().reply_code(),
        Some(320)
    );
    assert_eq!(
        chan_closed(&drain(&mut b.events)).unwrap().reply_code(),
        Some(320)
    );
}

#[test]
fn confirm_modes_delay_drop_and_nack() {
    let mut h = Harness::new(1);
    let (_conn, mut ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("q"));
    h.broker.set_confirm_mode(ConfirmMode::Delay(secs(1)));
    h.block_on(ch.chan.publish(&msg("q", "slow"))).unwrap();
    h.advance(ms(500));
    assert!(acks(&drain(&mut ch.events)).is_empty());
    assert_eq!(
        h.broker.queue("q").unwrap().ready.len(),
        1,
        "routed at once"
    );
    h.advance(ms(502));
    assert_eq!(acks(&drain(&mut ch.events)), [1]);

    h.broker.set_confirm_mode(ConfirmMode::Drop);
    h.block_on(ch.chan.publish(&msg("q", "dropped"))).unwrap();
    h.advance(secs(10));
    assert!(drain(&mut ch.events).is_empty());
    assert_eq!(h.broker.queue("q").unwrap().ready.len(), 2);

    h.broker.set_confirm_mode(ConfirmMode::Nack);
    h.block_on(ch.chan.publish(&msg("q", "refused"))).unwrap();
    h.advance(ms(5));
    let events = drain(&mut ch.events);
    assert!(
        matches!(
            &events[..],
            [ChannelEvent::Nack {
                delivery_tag: 3,
                multiple: false
            }]
        ),
        "{events:?}"
    );
    assert_eq!(h.broker.queue("q").unwrap().ready.len(), 2);

    h.broker.set_confirm_mode(ConfirmMode::Normal);
    h.block_on(ch.chan.publish(&msg("q", "fine"))).unwrap();
    h.advance(ms(5));
    assert_eq!(acks(&drain(&mut ch.events)), [4]);
    let stats = h.broker.stats();
    assert_eq!(
        (
            stats.confirms_acked,
            stats.confirms_dropped,
            stats.confirms_nacked
        ),
        (2, 1, 1)
    );
    assert!(stats.is_conserved());
}

#[test]
fn blocked_connections_hold_publishes_until_unblocked() {
    let mut h = Harness::new(1);
    let (mut conn, mut ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("q"));
    assert!(h.broker.block_connection(conn.conn.id(), "low on memory"));
    h.advance(ms(5));
    assert_eq!(
        drain(&mut conn.events),
        [ConnectionEvent::Blocked("low on memory".into())]
    );
    h.block_on(ch.chan.publish(&msg("q", "held"))).unwrap();
    // Frames behind the publish wait too.
    let decl = QueueDecl::durable("q2");
    let mut declare = Box::pin(ch.chan.declare_queue(&decl));
    assert!(h.try_block_on(&mut declare, secs(30)).is_none());
    assert!(h.broker.queue("q").unwrap().ready.is_empty());
    h.broker.unblock_connection(conn.conn.id());
    h.block_on(declare).unwrap();
    h.advance(ms(5));
    assert_eq!(drain(&mut conn.events), [ConnectionEvent::Unblocked]);
    assert_eq!(acks(&drain(&mut ch.events)), [1]);

    // A broker-wide alarm blocks new connections too.
    h.broker.set_alarm("disk");
    let mut other = h.connect();
    h.advance(ms(5));
    assert_eq!(
        drain(&mut conn.events),
        [ConnectionEvent::Blocked("disk".into())]
    );
    assert_eq!(
        drain(&mut other.events),
        [ConnectionEvent::Blocked("disk".into())]
    );
    h.broker.clear_alarm();
    h.advance(ms(5));
    assert_eq!(drain(&mut other.events), [ConnectionEvent::Unblocked]);
}

#[test]
fn broker_cancels_consumers_and_deletes_queues() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let mut ch = h.channel(&conn);
    h.declare(&ch, QueueDecl::durable("q"));
    h.block_on(ch.chan.consume("q", "tag-1", &ConsumeOptions::default()))
        .unwrap();
    assert_eq!(h.broker.cancel_consumer("tag-1"), 1);
    h.advance(ms(5));
    assert_eq!(
        drain(&mut ch.events),
        [ChannelEvent::ConsumerCancelled {
            consumer_tag: "tag-1".into()
        }]
    );
    h.block_on(ch.chan.consume("q", "tag-1", &ConsumeOptions::default()))
        .unwrap();
    h.broker.publish(&msg("q", "x")).unwrap();
    assert_eq!(h.broker.delete_queue("q"), Some(0));
    assert_eq!(h.broker.delete_queue("q"), None);
    h.advance(ms(5));
    let events = drain(&mut ch.events);
    assert_eq!(deliveries(&events).len(), 1);
    assert!(matches!(
        events.last(),
        Some(ChannelEvent::ConsumerCancelled { .. })
    ));
}

#[test]
fn one_host_refuses_while_another_serves() {
    // A cluster: one broker behind two addresses.
    let mut h = Harness::new(1);
    h.broker.add_host("rabbit-b");
    h.broker.refuse_dials(HOST, secs(60));
    assert!(h.connect_to(URI).is_err());
    let b = h.connect_to("amqp://guest:guest@rabbit-b").unwrap();
    assert_eq!(
        h.broker.connection(b.conn.id()).unwrap().host,
        "rabbit-b:5672"
    );
    // Separate brokers: restarting one leaves the other alone.
    let clock = h.clock.clone();
    let other = SimBroker::new(clock.clone(), BrokerConfig::default()).with_host("rabbit-c");
    let transport = SimTransport::new(clock)
        .with_broker(h.broker.clone())
        .with_broker(other.clone());
    h.transport = transport;
    let mut c = h.connect_to("amqp://guest:guest@rabbit-c").unwrap();
    let mut b = b;
    h.broker.restart(Duration::ZERO);
    h.advance(ms(5));
    assert!(conn_closed(&drain(&mut b.events)).is_some());
    assert!(drain(&mut c.events).is_empty());
    assert_eq!(other.open_connections(), [c.conn.id()]);
    assert!(h.transport.broker_for("rabbit-c:5672").is_some());
    // Partitioning one host leaves the other's connections alone.
    let mut b2 = h.connect_to("amqp://guest:guest@rabbit-b").unwrap();
    h.broker.partition(HOST);
    h.advance(secs(60));
    assert!(drain(&mut b2.events).is_empty());
}

#[test]
fn latency_is_per_connection_and_keeps_order() {
    let mut h = Harness::new(1);
    let (conn, mut ch) = h.confirm_channel();
    h.declare(&ch, QueueDecl::durable("q"));
    h.broker.set_latency(conn.conn.id(), ms(50));
    let start = h.now();
    h.block_on(ch.chan.publish(&msg("q", "1"))).unwrap();
    h.broker.set_latency(conn.conn.id(), ms(1));
    h.block_on(ch.chan.publish(&msg("q", "2"))).unwrap();
    // Both reach the broker at 50 ms (the second waits behind the first) and the
    // acks come back at the new latency.
    h.advance(ms(50));
    assert!(drain(&mut ch.events).is_empty());
    h.advance(ms(1));
    assert_eq!(acks(&drain(&mut ch.events)), [1, 2]);
    assert_eq!(h.now() - start, ms(51));
}

#[test]
fn dropping_a_handle_closes_it() {
    let mut h = Harness::new(1);
    let conn = h.connect();
    let ch = h.channel(&conn);
    let mut events = ch.events;
    drop(ch.chan);
    h.advance(ms(5));
    assert_eq!(
        drain(&mut events),
        [ChannelEvent::Closed(TransportError::ClosedByClient)]
    );
    assert!(ended(&mut events));
    let id = conn.conn.id();
    let mut events = conn.events;
    drop(conn.conn);
    h.advance(ms(5));
    assert_eq!(
        drain(&mut events),
        [ConnectionEvent::Closed(TransportError::ClosedByClient)]
    );
    assert!(h.broker.open_connections().is_empty());
    assert_eq!(
        h.broker.connection(id).unwrap().closed,
        Some(TransportError::ClosedByClient)
    );
}
