//! The amqprs adapter against a real RabbitMQ at `AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/test` makes sure one
//! is running). A broker that cannot be reached fails the tests, never skips them.
//!
//! The broker is shared: every test uses names with a random suffix and cleans up
//! after itself (exclusive or deleted queues), and none touches other connections.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use amqp_rebound_amqprs::{AmqprsChannel, AmqprsConnection, AmqprsTransport};
use amqp_rebound_core::message::{AMQPValue, FieldTable, Message, Properties};
use amqp_rebound_core::topology::{ConsumeOptions, ExchangeDecl, ExchangeKind, QueueDecl};
use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, Transport,
};
use amqp_rebound_core::{Endpoint, TlsErrorKind, TransportError};
use amqp_rebound_tests::broker::{Access, BrokerLock};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

/// How long any single expected event may take.
const DEADLINE: Duration = Duration::from_secs(10);

fn url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .and_then(|list| list.split(',').next().map(str::to_owned))
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's endpoint, with a shared hold on the broker lock for the rest of
/// the test's process: the conformance suite's fault cases (which close every
/// connection) take it exclusively, so they never run beside these tests.
fn endpoint() -> Endpoint {
    static SHARED: std::sync::OnceLock<BrokerLock> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| BrokerLock::acquire(Access::Shared));
    Endpoint::parse(&url()).expect("AMQP_URL is a valid AMQP URI")
}

/// `AMQP_URL` with another scheme and authority (`host:port`), and `query` appended;
/// user, password and vhost stay as they are spelled there.
fn rewrite(scheme: &str, authority: &str, query: &str) -> Endpoint {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let (userinfo, rest) = match rest.split_once('@') {
        Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
        None => (String::new(), rest),
    };
    let path = rest.find(['/', '?']).map_or("", |at| &rest[at..]);
    let path = path.split('?').next().unwrap_or("");
    Endpoint::parse(&format!("{scheme}://{userinfo}{authority}{path}{query}"))
        .expect("the rewritten URI parses")
}

fn authority(ep: &Endpoint) -> String {
    if ep.host().contains(':') {
        format!("[{}]:{}", ep.host(), ep.port())
    } else {
        format!("{}:{}", ep.host(), ep.port())
    }
}

fn unique(prefix: &str) -> String {
    format!(
        "rebound-amqprs-test.{prefix}.{}.{:016x}",
        std::process::id(),
        fastrand::u64(..)
    )
}

async fn connect_named(name: &str) -> AmqprsConnection {
    let ep = endpoint();
    AmqprsTransport::new()
        .connect(&ep, &ConnectOptions::named(name))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the broker at {ep}: {e}"))
}

async fn connect() -> AmqprsConnection {
    connect_named(&unique("conn")).await
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn next<T>(what: &str, events: &mut BoxStream<'static, T>) -> T {
    within(what, events.next())
        .await
        .unwrap_or_else(|| panic!("the stream ended while waiting for {what}"))
}

/// Waits for `Closed` (skipping anything else), then checks that the stream ends.
async fn expect_channel_closed(events: &mut BoxStream<'static, ChannelEvent>) -> TransportError {
    loop {
        if let ChannelEvent::Closed(error) = next("ChannelEvent::Closed", events).await {
            assert!(
                within("the end of the channel stream", events.next())
                    .await
                    .is_none(),
                "the channel stream goes on after Closed"
            );
            return error;
        }
    }
}

async fn expect_connection_closed(
    events: &mut BoxStream<'static, ConnectionEvent>,
) -> TransportError {
    loop {
        if let ConnectionEvent::Closed(error) = next("ConnectionEvent::Closed", events).await {
            assert!(
                within("the end of the connection stream", events.next())
                    .await
                    .is_none(),
                "the connection stream goes on after Closed"
            );
            return error;
        }
    }
}

/// A channel in confirm mode, with its events.
async fn confirm_channel(
    conn: &AmqprsConnection,
) -> (AmqprsChannel, BoxStream<'static, ChannelEvent>) {
    let channel = within("open_channel", conn.open_channel())
        .await
        .expect("open_channel");
    let events = channel.events();
    within("confirm_select", channel.confirm_select())
        .await
        .expect("confirm_select");
    (channel, events)
}

fn temp_queue(name: &str) -> QueueDecl {
    // Non-exclusive so that a second connection can delete it; auto-delete so that it
    // goes away with its last consumer, and every test deletes it anyway.
    QueueDecl {
        name: name.to_owned(),
        auto_delete: true,
        ..QueueDecl::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_1000_and_gets_1000_acks_then_consumes_them() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let queue = unique("q1000");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();

    let started = Instant::now();
    for i in 0..1000u32 {
        let message = Message::new("", queue.as_str(), format!("m{i}").into_bytes());
        channel.publish(&message).await.expect("publish");
    }
    let published = started.elapsed();
    // amqprs passes the broker's `multiple` flag on: an ack covers every tag up to
    // its own that no earlier ack covered.
    let mut acked = BTreeSet::new();
    let (mut acks, mut multiples) = (0, 0);
    while acked.len() < 1000 {
        match next("publisher acks", &mut events).await {
            ChannelEvent::Ack {
                delivery_tag,
                multiple,
            } => {
                acks += 1;
                assert!(!acked.contains(&delivery_tag), "ack {delivery_tag} twice");
                if multiple {
                    multiples += 1;
                    let low = acked.last().map_or(1, |last| last + 1);
                    acked.extend(low..=delivery_tag);
                } else {
                    acked.insert(delivery_tag);
                }
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(acked, (1..=1000).collect::<BTreeSet<u64>>());
    let confirmed = started.elapsed();

    let consumer = within("open_channel", conn.open_channel()).await.unwrap();
    let mut deliveries = consumer.events();
    let options = ConsumeOptions {
        prefetch: Some(100),
        ..ConsumeOptions::default()
    };
    consumer.consume(&queue, "c-1000", &options).await.unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < 1000 {
        match next("deliveries", &mut deliveries).await {
            ChannelEvent::Delivery(d) => {
                assert_eq!(d.consumer_tag, "c-1000");
                consumer.ack(d.delivery_tag, false).await.unwrap();
                bodies.push(String::from_utf8(d.payload.to_vec()).unwrap());
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    let consumed = started.elapsed();
    let expected: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected, "deliveries in publish order");
    eprintln!(
        "1000 messages: published in {published:?}, all acked at {confirmed:?} \
         ({acks} acks, {multiples} of them multiple), consumed and acked at {consumed:?}"
    );

    consumer.cancel("c-1000").await.unwrap();
    assert_eq!(channel.delete_queue(&queue).await.unwrap(), 0);
    consumer.close().await.unwrap();
    assert_eq!(
        expect_channel_closed(&mut deliveries).await,
        TransportError::ClosedByClient,
        "our own cancel is not reported as a broker cancel"
    );
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_and_headers_round_trip() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let queue = unique("props");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();

    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::Boolean(true));
    let mut headers = FieldTable::default();
    headers.insert("x-int".into(), AMQPValue::LongInt(-42));
    headers.insert("x-long".into(), AMQPValue::LongLongInt(1 << 40));
    headers.insert("x-text".into(), AMQPValue::LongString("héllo".into()));
    headers.insert("x-bool".into(), AMQPValue::Boolean(false));
    headers.insert("x-double".into(), AMQPValue::Double(1.5));
    headers.insert("x-table".into(), AMQPValue::FieldTable(nested));
    headers.insert(
        "x-array".into(),
        AMQPValue::FieldArray(
            vec![AMQPValue::LongInt(1), AMQPValue::LongString("two".into())].into(),
        ),
    );
    headers.insert("x-time".into(), AMQPValue::Timestamp(1_700_000_000));
    let mut properties = Properties::default()
        .with_content_type("application/json")
        .with_message_id("msg-1")
        .with_headers(headers)
        .persistent();
    properties.content_encoding = Some("identity".into());
    properties.priority = Some(3);
    properties.correlation_id = Some("corr-1".into());
    properties.reply_to = Some("reply-queue".into());
    properties.expiration = Some("600000".into());
    properties.timestamp = Some(1_700_000_123);
    properties.kind = Some("order.created".into());
    // RabbitMQ checks user-id against the connection's user.
    properties.user_id = Some(endpoint().username().to_owned());
    properties.app_id = Some("rebound-tests".into());

    let message =
        Message::new("", queue.as_str(), &b"{\"n\":1}"[..]).with_properties(properties.clone());
    channel.publish(&message).await.unwrap();
    assert_eq!(
        next("ack", &mut events).await,
        ChannelEvent::Ack {
            delivery_tag: 1,
            multiple: false
        }
    );

    channel
        .consume(&queue, "c-props", &ConsumeOptions::default())
        .await
        .unwrap();
    let ChannelEvent::Delivery(delivery) = next("the delivery", &mut events).await else {
        panic!("expected a delivery");
    };
    assert_eq!(delivery.properties, properties);
    assert_eq!(&delivery.payload[..], b"{\"n\":1}");
    assert_eq!(delivery.exchange, "");
    assert_eq!(delivery.routing_key, queue);
    assert!(!delivery.redelivered);
    channel.ack(delivery.delivery_tag, false).await.unwrap();
    channel.cancel("c-props").await.unwrap();
    channel.delete_queue(&queue).await.unwrap();
    conn.close().await.unwrap();
}

// A current-thread runtime, to show that amqprs's tasks and ours share one thread.
#[tokio::test]
async fn server_named_queue_gets_its_amq_gen_name() {
    let conn = connect().await;
    let channel = conn.open_channel().await.unwrap();
    let info = channel
        .declare_queue(&QueueDecl::server_named())
        .await
        .unwrap();
    assert!(info.name.starts_with("amq.gen-"), "got {}", info.name);
    assert_eq!((info.message_count, info.consumer_count), (0, 0));

    // Bindings and exchange-to-exchange bindings on it work by its real name.
    let source = unique("src");
    let destination = unique("dst");
    for name in [&source, &destination] {
        let mut decl = ExchangeDecl::new(name.as_str(), ExchangeKind::Fanout);
        decl.durable = false;
        decl.auto_delete = false;
        channel.declare_exchange(&decl).await.unwrap();
    }
    let none = FieldTable::default();
    channel
        .bind_exchange(&destination, &source, "", &none)
        .await
        .unwrap();
    channel
        .bind_queue(&info.name, &destination, "", &none)
        .await
        .unwrap();
    channel
        .unbind_queue(&info.name, &destination, "", &none)
        .await
        .unwrap();
    channel
        .unbind_exchange(&destination, &source, "", &none)
        .await
        .unwrap();
    channel.delete_exchange(&source).await.unwrap();
    channel.delete_exchange(&destination).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_missing_exchange_closes_the_channel_with_404() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let message = Message::new(unique("no-such-exchange"), "rk", &b"x"[..]);
    channel.publish(&message).await.unwrap();
    let error = expect_channel_closed(&mut events).await;
    assert_eq!(error.reply_code(), Some(404), "got {error:?}");
    // Later calls say why the channel closed.
    let again = channel.publish(&message).await.unwrap_err();
    assert_eq!(again.reply_code(), Some(404), "got {again:?}");
    // The connection lives on.
    let other = conn.open_channel().await.unwrap();
    other
        .declare_queue(&QueueDecl::server_named())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// `try_publish` hands messages over without a future, mixes with `publish` in
/// order, and sends nothing once the channel is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_publish_hands_over_in_order_and_sends_nothing_on_a_closed_channel() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let queue = unique("try");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();
    let mut synchronous = 0;
    for i in 0..500u32 {
        let message = Message::new("", queue.as_str(), format!("m{i}").into_bytes());
        // every third one through the async path, the others synchronously if they can
        match (i % 3 != 0)
            .then(|| channel.try_publish(&message))
            .flatten()
        {
            Some(taken) => {
                taken.expect("try_publish");
                synchronous += 1;
            }
            None => channel.publish(&message).await.expect("publish"),
        }
    }
    assert!(synchronous > 0, "no message went the synchronous way");
    let mut acked = 0;
    while acked < 500 {
        match next("the acks", &mut events).await {
            ChannelEvent::Ack {
                delivery_tag,
                multiple: true,
            } => acked = delivery_tag,
            ChannelEvent::Ack { delivery_tag, .. } if delivery_tag == acked + 1 => acked += 1,
            other => panic!("unexpected {other:?} after {acked} acks"),
        }
    }
    let (tx, mut deliveries) = futures::channel::mpsc::unbounded();
    let reader = connect().await;
    let (consumer, mut consumer_events) = confirm_channel(&reader).await;
    consumer
        .consume(&queue, "c", &ConsumeOptions::default())
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(event) = consumer_events.next().await {
            if let ChannelEvent::Delivery(d) = event {
                let _ = tx.unbounded_send(String::from_utf8_lossy(&d.payload).into_owned());
            }
        }
    });
    for i in 0..500u32 {
        let got = within("a delivery", deliveries.next())
            .await
            .expect("deliveries");
        assert_eq!(got, format!("m{i}"), "in publish order");
    }
    // a publish to a missing exchange closes the channel (404)
    let bad = Message::new(unique("no-such-exchange"), "rk", &b"x"[..]);
    channel.publish(&bad).await.unwrap();
    expect_channel_closed(&mut events).await;
    let late = Message::new("", queue.as_str(), &b"late"[..]);
    assert!(
        channel.try_publish(&late).is_none(),
        "nothing is taken on a closed channel"
    );
    let refused = channel.publish(&late).await.unwrap_err();
    assert_eq!(refused.reply_code(), Some(404), "got {refused:?}");
    reader.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_the_brokers_channel_close_cost_only_the_channel() {
    // The broker closes the channel (404) while publishes keep coming: none may be
    // written after amqprs's close-ok, or the broker closes the whole connection
    // (504 CHANNEL_ERROR, "expected 'channel.open'").
    let conn = connect().await;
    let mut conn_events = conn.events();
    for round in 0..20 {
        let (channel, mut events) = confirm_channel(&conn).await;
        let bad = Message::new(unique("no-such-exchange"), "rk", &b"x"[..]);
        channel.publish(&bad).await.unwrap();
        let good = Message::new("", unique("nowhere"), &b"y"[..]);
        let mut sent = 0u32;
        // odd rounds go through the synchronous path first, as the core does
        let synchronous = round % 2 == 1;
        let refusal = loop {
            let taken = match synchronous.then(|| channel.try_publish(&good)).flatten() {
                Some(taken) => taken,
                None => channel.publish(&good).await,
            };
            match taken {
                Ok(()) => sent += 1,
                Err(error) => break error,
            }
            assert!(sent < 1_000_000, "round {round}: the channel never closed");
        };
        assert_eq!(
            refusal.reply_code(),
            Some(404),
            "round {round}: {refusal:?}"
        );
        assert_eq!(
            expect_channel_closed(&mut events).await.reply_code(),
            Some(404),
            "round {round}"
        );
    }
    // A round trip after every frame above: it fails if any of them was a
    // connection error.
    let other = within("open_channel", conn.open_channel())
        .await
        .expect("the connection lives on");
    within("a declare", other.declare_queue(&QueueDecl::server_named()))
        .await
        .expect("the connection lives on");
    assert!(
        conn_events.next().now_or_never().is_none(),
        "the connection reported an event"
    );
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_returns_the_error_and_the_channel_reports_it() {
    let conn = connect().await;
    let channel = conn.open_channel().await.unwrap();
    let mut events = channel.events();
    // Redeclaring a queue with other flags: 406 PRECONDITION_FAILED.
    let queue = unique("redeclare");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();
    let mut different = temp_queue(&queue);
    different.auto_delete = false;
    let error = channel.declare_queue(&different).await.unwrap_err();
    assert_eq!(error.reply_code(), Some(406), "got {error:?}");
    assert_eq!(
        expect_channel_closed(&mut events).await.reply_code(),
        Some(406)
    );
    let cleanup = conn.open_channel().await.unwrap();
    cleanup.delete_queue(&queue).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_with_an_unknown_tag_closes_the_channel_with_406() {
    // No confirm and no consumer pending: the closure is only seen through amqprs's
    // channel callback.
    let conn = connect().await;
    let channel = conn.open_channel().await.unwrap();
    let mut events = channel.events();
    channel.ack(999, false).await.unwrap();
    let error = expect_channel_closed(&mut events).await;
    assert_eq!(error.reply_code(), Some(406), "got {error:?}");
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_consumed_queue_cancels_the_consumer() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let queue = unique("deleted");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();
    channel
        .consume(&queue, "c-deleted", &ConsumeOptions::default())
        .await
        .unwrap();

    let admin = connect().await;
    let admin_channel = admin.open_channel().await.unwrap();
    admin_channel.delete_queue(&queue).await.unwrap();

    assert_eq!(
        next("ConsumerCancelled", &mut events).await,
        ChannelEvent::ConsumerCancelled {
            consumer_tag: "c-deleted".into()
        }
    );
    // The channel stays usable.
    let again = unique("after-cancel");
    channel.declare_queue(&temp_queue(&again)).await.unwrap();
    channel.delete_queue(&again).await.unwrap();
    channel.close().await.unwrap();
    assert_eq!(
        expect_channel_closed(&mut events).await,
        TransportError::ClosedByClient
    );
    admin.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_auth_error_without_the_password() {
    let password = format!("wrong-{:x}", fastrand::u64(..));
    let ep = endpoint();
    let mut uri = url();
    let userinfo = format!("{}:{}@", ep.username(), ep.password());
    assert!(
        uri.contains(&userinfo),
        "AMQP_URL must spell out user and password"
    );
    uri = uri.replacen(&userinfo, &format!("{}:{password}@", ep.username()), 1);
    let wrong = Endpoint::parse(&uri).unwrap();

    let error = within(
        "the refused connect",
        AmqprsTransport::new().connect(&wrong, &ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    // amqprs does not advertise authentication_failure_close: RabbitMQ just closes
    // the socket, which the adapter reports as Auth.
    assert!(matches!(error, TransportError::Auth(_)), "got {error:?}");
    assert_eq!(error.class(), amqp_rebound_core::ErrorClass::Refused);
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(&password), "the password leaks: {shown}");
    eprintln!("wrong password: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_vhost_is_the_brokers_530() {
    // RabbitMQ answers connection.open with connection.close; amqprs puts that frame
    // in an error text, from which the adapter takes the reply code back.
    let ep = endpoint();
    let missing = rewrite("amqp", &authority(&ep), "");
    let uri = missing
        .to_string()
        .replace(":***@", &format!(":{}@", ep.password()));
    let path = format!("/{}", unique("no-such-vhost"));
    let uri = match uri.rfind('/') {
        Some(at) => format!("{}{path}", &uri[..at]),
        None => panic!("no path in {uri}"),
    };
    let missing = Endpoint::parse(&uri).unwrap();
    let error = within(
        "the refused open",
        AmqprsTransport::new().connect(&missing, &ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(error.reply_code(), Some(530), "got {error:?}");
    eprintln!("missing vhost: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dial_is_an_io_error() {
    let ep = Endpoint::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
    let error = within(
        "the refused dial",
        AmqprsTransport::new().connect(&ep, &ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, TransportError::Io(_)), "got {error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plain_port_fails_cleanly() {
    // Exercises the rustls path (ring provider, webpki roots) without a TLS broker:
    // the handshake meets an AMQP server and must fail with a typed error, not a
    // panic.
    let ep = endpoint();
    let tls = rewrite("amqps", &authority(&ep), "");
    let error = within(
        "the failed TLS dial",
        AmqprsTransport::new().connect(&tls, &ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            TransportError::Tls {
                kind: TlsErrorKind::NotTlsPort,
                ..
            }
        ),
        "got {error:?}"
    );
    eprintln!("TLS to a plain AMQP port: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mandatory_unroutable_publish_comes_back_before_its_ack() {
    let conn = connect().await;
    let (channel, mut events) = confirm_channel(&conn).await;
    let routing_key = unique("nobody-home");
    let message = Message::new("", routing_key.as_str(), &b"bounce"[..])
        .with_properties(Properties::default().with_message_id("m-bounce"))
        .mandatory(true);
    channel.publish(&message).await.unwrap();
    match next("the return", &mut events).await {
        ChannelEvent::Return(returned) => {
            assert_eq!(returned.reply_code, 312);
            assert!(
                returned.reply_text.contains("NO_ROUTE"),
                "{}",
                returned.reply_text
            );
            assert_eq!(returned.exchange, "");
            assert_eq!(returned.routing_key, routing_key);
            assert_eq!(returned.properties.message_id.as_deref(), Some("m-bounce"));
            assert_eq!(&returned.payload[..], b"bounce");
        }
        other => panic!("expected the Return first, got {other:?}"),
    }
    assert_eq!(
        next("the ack", &mut events).await,
        ChannelEvent::Ack {
            delivery_tag: 1,
            multiple: false
        }
    );
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_from_our_side_ends_every_stream() {
    let conn = connect().await;
    let mut conn_events = conn.events();
    let (channel, mut channel_events) = confirm_channel(&conn).await;
    let queue = unique("close");
    channel
        .declare_queue(&QueueDecl {
            exclusive: true,
            ..temp_queue(&queue)
        })
        .await
        .unwrap();
    channel
        .consume(&queue, "c-close", &ConsumeOptions::default())
        .await
        .unwrap();
    within("close", conn.close()).await.unwrap();
    assert_eq!(
        expect_connection_closed(&mut conn_events).await,
        TransportError::ClosedByClient
    );
    assert_eq!(
        expect_channel_closed(&mut channel_events).await,
        TransportError::ClosedByClient,
        "no ConsumerCancelled for a consumer that goes with its connection"
    );
    // Calls after the close fail with a typed error, and a second close is a no-op.
    assert_eq!(
        conn.open_channel().await.unwrap_err(),
        TransportError::ClosedByClient
    );
    assert_eq!(
        channel
            .publish(&Message::new("", "x", &b""[..]))
            .await
            .unwrap_err(),
        TransportError::ClosedByClient
    );
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_side_close_reports_320_on_the_connection_and_its_channels() {
    let name = unique("forced");
    let conn = connect_named(&name).await;
    let mut conn_events = conn.events();
    let (channel, mut channel_events) = confirm_channel(&conn).await;

    // rabbitmqctl takes about a second; it closes exactly our connection, by name
    // (a connection still in its handshake has no client properties yet: `none`).
    let script = format!(
        "[rabbit_networking:close_connection(P, \"rebound test\") \
         || P <- rabbit_networking:connections(), \
            {{client_properties, Props}} <- rabbit_networking:connection_info(P, [client_properties]), \
            is_list(Props), lists:member({{<<\"connection_name\">>, longstr, <<\"{name}\">>}}, Props)]."
    );
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", &script])
        .output()
        .await
        .expect("rabbitmqctl runs (scripts/test installs it with the broker)");
    assert!(
        output.status.success(),
        "rabbitmqctl eval failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let conn_error = expect_connection_closed(&mut conn_events).await;
    assert_eq!(conn_error.reply_code(), Some(320), "got {conn_error:?}");
    let channel_error = expect_channel_closed(&mut channel_events).await;
    assert_eq!(
        channel_error.reply_code(),
        Some(320),
        "got {channel_error:?}"
    );
    assert_eq!(
        channel
            .publish(&Message::new("", "x", &b""[..]))
            .await
            .unwrap_err()
            .reply_code(),
        Some(320)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_detected_by_missed_heartbeats() {
    // A proxy that stops forwarding (both ways) without closing anything: to amqprs
    // the broker just goes silent. amqprs needs a heartbeat of 2 s at least, and
    // reports missed heartbeats like a socket error: Io, not HeartbeatTimeout.
    let ep = endpoint();
    let proxy = proxy::Freezer::start(ep.host(), ep.port()).await;
    let via_proxy = rewrite(
        "amqp",
        &format!("127.0.0.1:{}", proxy.port()),
        "?heartbeat=2",
    );
    let conn = AmqprsTransport::new()
        .connect(&via_proxy, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(conn.amqprs().heartbeat(), 2);
    let mut conn_events = conn.events();
    let channel = conn.open_channel().await.unwrap();
    let mut channel_events = channel.events();
    let frozen_at = Instant::now();
    proxy.freeze();
    let error = expect_connection_closed(&mut conn_events).await;
    let detected = frozen_at.elapsed();
    assert!(matches!(error, TransportError::Io(_)), "got {error:?}");
    assert_eq!(expect_channel_closed(&mut channel_events).await, error);
    // Calls after the end say why it ended.
    assert_eq!(conn.open_channel().await.unwrap_err(), error);
    assert_eq!(
        channel
            .publish(&Message::new("", "x", &b""[..]))
            .await
            .unwrap_err(),
        error
    );
    eprintln!("heartbeat=2s: missed heartbeats reported after {detected:?}: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_timeout_fails_with_timeout() {
    // A listener that accepts and never speaks: the AMQP handshake never starts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let ep = Endpoint::parse(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f")).unwrap();
    let error = within(
        "the timed-out dial",
        AmqprsTransport::new()
            .with_connect_timeout(Duration::from_millis(300))
            .connect(&ep, &ConnectOptions::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(error, TransportError::Timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_are_refused_before_amqprs_sees_them() {
    let conn = connect().await;
    let channel = conn.open_channel().await.unwrap();
    let long = "k".repeat(256);
    let error = channel
        .publish(&Message::new("", long.as_str(), &b""[..]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, TransportError::Protocol(_)),
        "got {error:?}"
    );
    assert!(channel.declare_queue(&temp_queue(&long)).await.is_err());
    // Nothing reached the broker: the channel is still fine.
    channel
        .declare_queue(&QueueDecl::server_named())
        .await
        .unwrap();
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_and_unblocked_are_reported() {
    // RabbitMQ never sends these to amqprs (it does not advertise the capability),
    // so the two frames are slipped in by a proxy: this checks the callback's
    // wiring, for a broker that sends them anyway. amqprs cannot tell.
    let ep = endpoint();
    let proxy = proxy::Freezer::start(ep.host(), ep.port()).await;
    let via_proxy = rewrite("amqp", &format!("127.0.0.1:{}", proxy.port()), "");
    let conn = AmqprsTransport::new()
        .connect(&via_proxy, &ConnectOptions::default())
        .await
        .unwrap();
    let mut events = conn.events();
    let channel = conn.open_channel().await.unwrap();
    channel
        .declare_queue(&QueueDecl::server_named())
        .await
        .unwrap();

    let reason = b"low on memory";
    let mut arguments = vec![u8::try_from(reason.len()).unwrap()];
    arguments.extend_from_slice(reason);
    proxy.inject(proxy::connection_method(60, &arguments));
    assert_eq!(
        next("Blocked", &mut events).await,
        ConnectionEvent::Blocked("low on memory".into())
    );
    proxy.inject(proxy::connection_method(61, &[]));
    assert_eq!(
        next("Unblocked", &mut events).await,
        ConnectionEvent::Unblocked
    );
    // The connection works on after the unblock.
    within(
        "a declare after the unblock",
        channel.declare_queue(&QueueDecl::server_named()),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert_eq!(
        expect_connection_closed(&mut events).await,
        TransportError::ClosedByClient
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_publishes_and_consumes_1000_confirmed_messages_over_amqprs() {
    use amqp_rebound_core::{Client, Confirmation, TokioTimer};

    let (client, driver) = Client::builder()
        .hosts([url()])
        .connection_name(unique("client"))
        .build(AmqprsTransport::new(), TokioTimer)
        .expect("a valid configuration");
    let driver = tokio::spawn(driver);
    let queue = unique("client");
    let declared = within("declare_queue", client.declare_queue(temp_queue(&queue)))
        .await
        .expect("declare_queue");
    assert_eq!(declared.name(), queue);

    let started = Instant::now();
    let publishes = (0..1000u32).map(|i| {
        let client = client.clone();
        let queue = queue.clone();
        async move {
            client
                .publish(
                    "",
                    &queue,
                    format!("m{i}").into_bytes(),
                    Properties::default(),
                )
                .await
        }
    });
    let results = within("1000 confirms", futures::future::join_all(publishes)).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result, Ok(Confirmation::Confirmed), "publish {i}");
    }
    let confirmed = started.elapsed();

    let mut consumer = within(
        "consume",
        client.consume(
            &declared,
            ConsumeOptions {
                prefetch: Some(200),
                ..ConsumeOptions::default()
            },
        ),
    )
    .await
    .expect("consume");
    let mut bodies = BTreeSet::new();
    while bodies.len() < 1000 {
        let received = within("a delivery", consumer.next())
            .await
            .expect("the consumer stream goes on")
            .expect("a delivery, not an error");
        within("ack", received.ack()).await.expect("ack");
        let body = String::from_utf8(received.payload().to_vec()).unwrap();
        assert!(bodies.insert(body), "a duplicate");
    }
    let consumed = started.elapsed();
    let expected: BTreeSet<String> = (0..1000).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    eprintln!(
        "client over amqprs: 1000 publishes confirmed in {confirmed:?}, \
         consumed and acked at {consumed:?}"
    );

    consumer.cancel();
    within("delete_queue", client.delete_queue(&declared))
        .await
        .expect("delete_queue");
    within("close", client.close()).await;
    within("the driver's end", driver)
        .await
        .expect("the driver task ends without a panic");
}

#[test]
fn works_when_driven_from_another_executor() {
    // The core's driver may run on any executor: every call, and every drop, must
    // work on a thread that is not in the tokio runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    // Timers must be made inside the runtime; they can be polled from outside.
    let deadline = |what: &'static str| {
        let _runtime = handle.enter();
        let sleep = tokio::time::sleep(DEADLINE);
        async move {
            sleep.await;
            panic!("timed out waiting for {what}")
        }
    };
    let transport = AmqprsTransport::new().with_handle(handle.clone());
    futures::executor::block_on(async {
        let (ep, options) = (endpoint(), ConnectOptions::named(unique("foreign")));
        let connect = transport.connect(&ep, &options);
        let conn = futures::select! {
            conn = connect.fuse() => conn.unwrap(),
            () = Box::pin(deadline("connect")).fuse() => unreachable!(),
        };
        let mut conn_events = conn.events();
        let channel = conn.open_channel().await.unwrap();
        let mut events = channel.events();
        channel.confirm_select().await.unwrap();
        let queue = channel
            .declare_queue(&QueueDecl::server_named())
            .await
            .unwrap();
        channel
            .publish(&Message::new("", queue.name.as_str(), &b"x"[..]))
            .await
            .unwrap();
        let ack = futures::select! {
            event = events.next().fuse() => event,
            () = Box::pin(deadline("the ack")).fuse() => unreachable!(),
        };
        assert_eq!(
            ack,
            Some(ChannelEvent::Ack {
                delivery_tag: 1,
                multiple: false
            })
        );
        // A dropped channel is closed by amqprs on the runtime.
        drop(channel);
        let other = conn.open_channel().await.unwrap();
        drop(other);
        conn.close().await.unwrap();
        let closed = futures::select! {
            event = conn_events.next().fuse() => event,
            () = Box::pin(deadline("Closed")).fuse() => unreachable!(),
        };
        assert_eq!(
            closed,
            Some(ConnectionEvent::Closed(TransportError::ClosedByClient))
        );
        drop(conn);
    });
    // A connection dropped without close, outside the runtime.
    let conn = futures::executor::block_on(
        transport.connect(&endpoint(), &ConnectOptions::named(unique("dropped"))),
    )
    .unwrap();
    drop(conn);
    runtime.shutdown_timeout(Duration::from_secs(5));
}

mod proxy {
    //! A one-connection TCP proxy that can go silent, or slip frames of its own to
    //! the client.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    pub struct Freezer {
        port: u16,
        frozen: Arc<AtomicBool>,
        inject: Arc<Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>>,
    }

    impl Freezer {
        pub async fn start(host: &str, port: u16) -> Freezer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let local = listener.local_addr().unwrap().port();
            let frozen = Arc::new(AtomicBool::new(false));
            let inject = Arc::new(Mutex::new(None));
            let target = (host.to_owned(), port);
            let (flag, injector) = (frozen.clone(), inject.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let upstream = TcpStream::connect((target.0.as_str(), target.1))
                        .await
                        .unwrap();
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    let (tx, rx) = mpsc::unbounded_channel();
                    *injector.lock().unwrap() = Some(tx);
                    tokio::spawn(pipe(cr, uw, flag.clone(), None));
                    tokio::spawn(pipe(ur, cw, flag.clone(), Some(rx)));
                }
            });
            Freezer {
                port: local,
                frozen,
                inject,
            }
        }

        pub fn port(&self) -> u16 {
            self.port
        }

        pub fn freeze(&self) {
            self.frozen.store(true, Ordering::SeqCst);
        }

        /// Sends `bytes` to the client as if the broker had. Only safe between
        /// frames, i.e. while the broker is idle.
        pub fn inject(&self, bytes: Vec<u8>) {
            let sender = self.inject.lock().unwrap();
            sender
                .as_ref()
                .expect("a client is connected")
                .send(bytes)
                .unwrap();
        }
    }

    async fn pipe(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        frozen: Arc<AtomicBool>,
        mut injected: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let extra = async {
                match injected.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = from.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // Frozen: swallow everything, keep both sockets open.
                    if !frozen.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Some(bytes) = extra => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// A connection-class method frame on channel 0 (`connection.blocked` is 10/60,
    /// `connection.unblocked` 10/61).
    pub fn connection_method(method: u16, arguments: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&10u16.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(arguments);
        let mut frame = vec![1u8, 0, 0];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        frame
    }
}
