//! The adapter suite: one transport's [`Transport`], [`Connection`] and
//! [`Channel`] against a real RabbitMQ at `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/test` makes sure one is
//! running), without the core's client on top (but one case). A broker that
//! cannot be reached fails the cases, never skips them.
//! [`adapter_suite!`](crate::adapter_suite) makes them `#[tokio::test]`s for a
//! transport, from its crate's `tests/broker.rs`:
//!
//! ```ignore
//! amqp_rebound_tests::adapter_suite!(amqp_rebound_lapin::LapinTransport);
//! ```
//!
//! The cases are the same for every transport. Where clients differ, a case
//! asserts what the transport says of itself
//! ([`Transport::capabilities`]), never what its name suggests; what a case needs
//! beyond the transport traits (a runtime handle, a dial timeout, the negotiated
//! heartbeat) comes through [`Adapter`].
//!
//! The broker is shared: every case uses names with a random suffix and cleans up
//! after itself (exclusive or deleted queues), and none touches other
//! connections: faults go through a [`FaultProxy`], and the one `rabbitmqctl`
//! call closes the case's own connection by name.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use amqp_rebound_amqprs::AmqprsTransport;
use amqp_rebound_core::message::{AMQPValue, FieldTable, Message, Properties};
use amqp_rebound_core::topology::{ConsumeOptions, ExchangeDecl, ExchangeKind, QueueDecl};
use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, Transport,
};
use amqp_rebound_core::{Endpoint, ErrorClass, TlsErrorKind, TransportError};
use amqp_rebound_lapin::LapinTransport;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::runtime::Handle;

use crate::broker::{Access, BrokerLock, BrokerUrl};
use crate::proxy::FaultProxy;

/// What the adapter suite needs of a transport beyond the [`Transport`] traits:
/// the builder methods every adapter on tokio has, and the one fact of a
/// connection only the client can tell.
pub trait Adapter: Transport + Clone {
    /// Short name, for the names of queues and connections (`lapin`).
    const NAME: &'static str;
    /// A fresh transport on the runtime that calls `connect`.
    fn make() -> Self;
    /// Runs the client on this runtime, whichever executor calls `connect`.
    fn with_handle(self, handle: Handle) -> Self;
    /// Fails a dial slower than `timeout` with [`TransportError::Timeout`].
    fn with_connect_timeout(self, timeout: Duration) -> Self;
    /// The heartbeat interval the connection negotiated, in seconds.
    fn heartbeat(connection: &Self::Connection) -> u16;
}

impl Adapter for LapinTransport {
    const NAME: &'static str = "lapin";

    fn make() -> Self {
        LapinTransport::new()
    }

    fn with_handle(self, handle: Handle) -> Self {
        LapinTransport::with_handle(self, handle)
    }

    fn with_connect_timeout(self, timeout: Duration) -> Self {
        LapinTransport::with_connect_timeout(self, timeout)
    }

    fn heartbeat(connection: &Self::Connection) -> u16 {
        connection.lapin().configuration().heartbeat()
    }
}

impl Adapter for AmqprsTransport {
    const NAME: &'static str = "amqprs";

    fn make() -> Self {
        AmqprsTransport::new()
    }

    fn with_handle(self, handle: Handle) -> Self {
        AmqprsTransport::with_handle(self, handle)
    }

    fn with_connect_timeout(self, timeout: Duration) -> Self {
        AmqprsTransport::with_connect_timeout(self, timeout)
    }

    fn heartbeat(connection: &Self::Connection) -> u16 {
        connection.amqprs().heartbeat()
    }
}

type ChannelOf<T> = <<T as Transport>::Connection as Connection>::Channel;

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
/// connection) take it exclusively, so they never run beside these cases.
fn endpoint() -> Endpoint {
    static SHARED: std::sync::OnceLock<BrokerLock> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| BrokerLock::acquire(Access::Shared));
    Endpoint::parse(&url()).expect("AMQP_URL is a valid AMQP URI")
}

/// A fault proxy in front of the broker.
fn proxy() -> FaultProxy {
    FaultProxy::start(BrokerUrl::from_env().socket_addr()).expect("a fault proxy")
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

fn unique<T: Adapter>(prefix: &str) -> String {
    format!(
        "rebound-{}-test.{prefix}.{}.{:016x}",
        T::NAME,
        std::process::id(),
        fastrand::u64(..)
    )
}

async fn connect_named<T: Adapter>(name: &str) -> T::Connection {
    let ep = endpoint();
    T::make()
        .connect(&ep, &ConnectOptions::named(name))
        .await
        .unwrap_or_else(|e| panic!("cannot reach the broker at {ep}: {e}"))
}

async fn connect<T: Adapter>() -> T::Connection {
    connect_named::<T>(&unique::<T>("conn")).await
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn next<E>(what: &str, events: &mut BoxStream<'static, E>) -> E {
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
async fn confirm_channel<T: Adapter>(
    conn: &T::Connection,
) -> (ChannelOf<T>, BoxStream<'static, ChannelEvent>) {
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
    // goes away with its last consumer, and every case deletes it anyway.
    QueueDecl {
        name: name.to_owned(),
        auto_delete: true,
        ..QueueDecl::default()
    }
}

// ---------------------------------------------------------------------------
// publishing and consuming

/// 1000 publishes get 1000 acks, each number once (one by one or as `multiple`
/// acks: a multiple ack covers every number up to its own that no earlier ack
/// covered), then 1000 deliveries in publish order.
pub async fn publishes_1000_and_gets_1000_acks_then_consumes_them<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let queue = unique::<T>("q1000");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();

    let started = Instant::now();
    for i in 0..1000u32 {
        let message = Message::new("", queue.as_str(), format!("m{i}").into_bytes());
        channel.publish(&message).await.expect("publish");
    }
    let published = started.elapsed();
    let mut acked = BTreeSet::new();
    let (mut acks, mut multiples) = (0, 0);
    while acked.len() < 1000 {
        match next("publisher acks", &mut events).await {
            ChannelEvent::Ack {
                delivery_tag,
                multiple,
            } => {
                acks += 1;
                multiples += usize::from(multiple);
                let first = if multiple { 1 } else { delivery_tag };
                let fresh: BTreeSet<u64> = (first..=delivery_tag)
                    .filter(|tag| !acked.contains(tag))
                    .collect();
                assert!(fresh.contains(&delivery_tag), "ack {delivery_tag} twice");
                acked.extend(fresh);
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

/// Each confirm is numbered for its own message: publishes alternate between a
/// queue that takes them and a full queue that refuses them (`reject-publish`:
/// the broker nacks), sent back to back without waiting, so acks and nacks must
/// alternate by number. `publish` may return before the client has written the
/// frames; were the adapter's numbering ever out of step with the client's, the
/// pattern would shift.
pub async fn back_to_back_publishes_get_the_confirm_of_their_own_message<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let open = unique::<T>("open");
    let full = unique::<T>("full");
    channel.declare_queue(&temp_queue(&open)).await.unwrap();
    let mut refusing = temp_queue(&full);
    refusing
        .arguments
        .insert("x-max-length".into(), AMQPValue::LongInt(0));
    refusing.arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel.declare_queue(&refusing).await.unwrap();
    const N: u64 = 400;
    for i in 1..=N {
        let queue = if i % 2 == 1 { &open } else { &full };
        let message = Message::new("", queue.as_str(), format!("m{i}").into_bytes());
        channel.publish(&message).await.expect("publish");
    }
    let mut seen = BTreeMap::new();
    while seen.len() < N as usize {
        let (tag, multiple, ack) = match next("confirms", &mut events).await {
            ChannelEvent::Ack {
                delivery_tag,
                multiple,
            } => (delivery_tag, multiple, true),
            ChannelEvent::Nack {
                delivery_tag,
                multiple,
            } => (delivery_tag, multiple, false),
            other => panic!("unexpected event {other:?}"),
        };
        let first = if multiple { 1 } else { tag };
        for covered in first..=tag {
            if covered == tag || !seen.contains_key(&covered) {
                assert!(
                    seen.insert(covered, ack).is_none(),
                    "confirm {covered} twice"
                );
            }
        }
    }
    for (tag, ack) in seen {
        assert_eq!(ack, tag % 2 == 1, "confirm {tag}: ack {ack}");
    }
    channel.delete_queue(&open).await.unwrap();
    channel.delete_queue(&full).await.unwrap();
    conn.close().await.unwrap();
}

/// Every property and every kind of header value comes back as it was sent.
pub async fn properties_and_headers_round_trip<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let queue = unique::<T>("props");
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

/// A server-named queue gets its `amq.gen-` name, and bindings (queue and
/// exchange-to-exchange) work by it. [`adapter_suite!`](crate::adapter_suite) runs
/// it on a current-thread runtime, to show that the client's tasks (lapin: its
/// socket thread) work with one.
pub async fn server_named_queue_gets_its_amq_gen_name<T: Adapter>() {
    let conn = connect::<T>().await;
    let channel = conn.open_channel().await.unwrap();
    let info = channel
        .declare_queue(&QueueDecl::server_named())
        .await
        .unwrap();
    assert!(info.name.starts_with("amq.gen-"), "got {}", info.name);
    assert_eq!((info.message_count, info.consumer_count), (0, 0));

    let source = unique::<T>("src");
    let destination = unique::<T>("dst");
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

/// `try_publish` hands messages over without a future, mixes with `publish` in
/// order, and sends nothing once the channel is closed.
pub async fn try_publish_hands_over_in_order_and_sends_nothing_on_a_closed_channel<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let queue = unique::<T>("try");
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
    if T::make().capabilities().confirms_in_order {
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
    } else {
        // in any order, each number once
        let mut acked = BTreeSet::new();
        while acked.len() < 500 {
            match next("the acks", &mut events).await {
                ChannelEvent::Ack {
                    delivery_tag,
                    multiple,
                } => {
                    let first = if multiple { 1 } else { delivery_tag };
                    let fresh: Vec<u64> = (first..=delivery_tag)
                        .filter(|tag| !acked.contains(tag))
                        .collect();
                    assert!(fresh.contains(&delivery_tag), "ack {delivery_tag} twice");
                    acked.extend(fresh);
                }
                other => panic!("unexpected {other:?} after {} acks", acked.len()),
            }
        }
        assert_eq!(acked, (1..=500).collect::<BTreeSet<u64>>());
    }
    let (tx, mut deliveries) = futures::channel::mpsc::unbounded();
    let reader = connect::<T>().await;
    let (consumer, mut consumer_events) = confirm_channel::<T>(&reader).await;
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
    let bad = Message::new(unique::<T>("no-such-exchange"), "rk", &b"x"[..]);
    channel.publish(&bad).await.unwrap();
    expect_channel_closed(&mut events).await;
    let late = Message::new("", queue.as_str(), &b"late"[..]);
    // nothing is taken: `None` (amqprs), or the error the channel closed with
    // (lapin), both of which mean that nothing was sent
    match channel.try_publish(&late) {
        None => {}
        Some(Err(error)) => assert_eq!(error.reply_code(), Some(404), "got {error:?}"),
        Some(Ok(())) => panic!("a message was taken on a closed channel"),
    }
    let refused = channel.publish(&late).await.unwrap_err();
    assert_eq!(refused.reply_code(), Some(404), "got {refused:?}");
    reader.close().await.unwrap();
    conn.close().await.unwrap();
}

/// A mandatory message nobody can route comes back (312 NO_ROUTE, with its
/// content) before its ack.
pub async fn a_mandatory_unroutable_publish_comes_back_before_its_ack<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let routing_key = unique::<T>("nobody-home");
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

/// Names, routing keys and properties past 255 bytes are refused by the adapter
/// (a client may panic on them) without reaching the broker.
pub async fn overlong_names_are_refused_before_the_client_sees_them<T: Adapter>() {
    let conn = connect::<T>().await;
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

/// The core's client over the transport: 1000 publishes confirmed, consumed and
/// acked, each once.
pub async fn the_client_publishes_and_consumes_1000_confirmed_messages<T: Adapter>() {
    use amqp_rebound_core::{Client, Confirmation, TokioTimer};

    let (client, driver) = Client::builder()
        .hosts([url()])
        .connection_name(unique::<T>("client"))
        .build(T::make(), TokioTimer)
        .expect("a valid configuration");
    let driver = tokio::spawn(driver);
    let queue = unique::<T>("client");
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
        "client over {}: 1000 publishes confirmed in {confirmed:?}, \
         consumed and acked at {consumed:?}",
        T::NAME
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

// ---------------------------------------------------------------------------
// errors the broker answers with

/// A publish to a missing exchange closes the channel with 404; later calls on it
/// say why, and the connection lives on.
pub async fn publish_to_a_missing_exchange_closes_the_channel_with_404<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let message = Message::new(unique::<T>("no-such-exchange"), "rk", &b"x"[..]);
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

/// The broker closes the channel (404) while publishes keep coming: none may be
/// written after the client's `close-ok`, or the broker closes the whole
/// connection (504 CHANNEL_ERROR, "expected 'channel.open'"). Only for a
/// transport whose client fences the close
/// ([`Capabilities::fences_channel_close`](amqp_rebound_core::transport::Capabilities::fences_channel_close));
/// for the others the conformance suite's case 5 checks that the client
/// recovers from the lost connection.
pub async fn publishes_racing_the_brokers_channel_close_cost_only_the_channel<T: Adapter>() {
    if !T::make().capabilities().fences_channel_close {
        eprintln!(
            "{}: the client does not fence the broker's channel.close (see its crate \
             docs): nothing to check here",
            T::NAME
        );
        return;
    }
    let conn = connect::<T>().await;
    let mut conn_events = conn.events();
    for round in 0..20 {
        let (channel, mut events) = confirm_channel::<T>(&conn).await;
        let bad = Message::new(unique::<T>("no-such-exchange"), "rk", &b"x"[..]);
        channel.publish(&bad).await.unwrap();
        let good = Message::new("", unique::<T>("nowhere"), &b"y"[..]);
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

/// A call the broker refuses (406 on a redeclare with other flags) returns the
/// error, and the channel reports it as its end.
pub async fn a_failing_call_returns_the_error_and_the_channel_reports_it<T: Adapter>() {
    let conn = connect::<T>().await;
    let channel = conn.open_channel().await.unwrap();
    let mut events = channel.events();
    let queue = unique::<T>("redeclare");
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

/// An ack with an unknown tag closes the channel with 406, with no confirm and no
/// consumer pending to carry the error (lapin: only its connection events do;
/// amqprs: its channel callback).
pub async fn an_ack_with_an_unknown_tag_closes_the_channel_with_406<T: Adapter>() {
    let conn = connect::<T>().await;
    let channel = conn.open_channel().await.unwrap();
    let mut events = channel.events();
    channel.ack(999, false).await.unwrap();
    let error = expect_channel_closed(&mut events).await;
    assert_eq!(error.reply_code(), Some(406), "got {error:?}");
    conn.close().await.unwrap();
}

/// Deleting a queue from another connection cancels its consumer
/// (`ConsumerCancelled`); the channel stays usable.
pub async fn deleting_a_consumed_queue_cancels_the_consumer<T: Adapter>() {
    let conn = connect::<T>().await;
    let (channel, mut events) = confirm_channel::<T>(&conn).await;
    let queue = unique::<T>("deleted");
    channel.declare_queue(&temp_queue(&queue)).await.unwrap();
    channel
        .consume(&queue, "c-deleted", &ConsumeOptions::default())
        .await
        .unwrap();

    let admin = connect::<T>().await;
    let admin_channel = admin.open_channel().await.unwrap();
    admin_channel.delete_queue(&queue).await.unwrap();

    assert_eq!(
        next("ConsumerCancelled", &mut events).await,
        ChannelEvent::ConsumerCancelled {
            consumer_tag: "c-deleted".into()
        }
    );
    // The channel stays usable.
    let again = unique::<T>("after-cancel");
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

// ---------------------------------------------------------------------------
// dials

/// A wrong password is [`TransportError::Auth`] (refused, never retried at
/// once), and its text does not hold the password. A client that advertises
/// `authentication_failure_close` may report RabbitMQ's 403 instead; one that
/// does not gets the socket closed, which the adapter reports as `Auth`.
pub async fn a_wrong_password_is_an_auth_error_without_the_password<T: Adapter>() {
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

    let transport = T::make();
    let error = within(
        "the refused connect",
        transport.connect(&wrong, &ConnectOptions::default()),
    )
    .await
    .map(drop)
    .unwrap_err();
    if transport.capabilities().authentication_failure_close {
        assert!(
            matches!(error, TransportError::Auth(_)) || error.reply_code() == Some(403),
            "got {error:?}"
        );
    } else {
        assert!(matches!(error, TransportError::Auth(_)), "got {error:?}");
    }
    assert_eq!(error.class(), ErrorClass::Refused);
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(&password), "the password leaks: {shown}");
    eprintln!("wrong password: {error}");
}

/// A missing virtual host is the broker's 530 (RabbitMQ answers `connection.open`
/// with `connection.close`; amqprs puts that frame in an error text, from which
/// the adapter takes the reply code back).
pub async fn a_missing_vhost_is_the_brokers_530<T: Adapter>() {
    let ep = endpoint();
    let missing = rewrite("amqp", &authority(&ep), "");
    let uri = missing
        .to_string()
        .replace(":***@", &format!(":{}@", ep.password()));
    let path = format!("/{}", unique::<T>("no-such-vhost"));
    let uri = match uri.rfind('/') {
        Some(at) => format!("{}{path}", &uri[..at]),
        None => panic!("no path in {uri}"),
    };
    let missing = Endpoint::parse(&uri).unwrap();
    let error = within(
        "the refused open",
        T::make().connect(&missing, &ConnectOptions::default()),
    )
    .await
    .map(drop)
    .unwrap_err();
    assert_eq!(error.reply_code(), Some(530), "got {error:?}");
    eprintln!("missing vhost: {error}");
}

/// A dial to a port nothing listens on is an I/O error.
pub async fn a_refused_dial_is_an_io_error<T: Adapter>() {
    let ep = Endpoint::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
    let error = within(
        "the refused dial",
        T::make().connect(&ep, &ConnectOptions::default()),
    )
    .await
    .map(drop)
    .unwrap_err();
    assert!(matches!(error, TransportError::Io(_)), "got {error:?}");
}

/// TLS to the plain AMQP port fails with a typed error, not a panic: the rustls
/// path (ring provider, webpki roots) without a TLS broker.
pub async fn tls_to_a_plain_port_fails_cleanly<T: Adapter>() {
    let ep = endpoint();
    let tls = rewrite("amqps", &authority(&ep), "");
    let error = within(
        "the failed TLS dial",
        T::make().connect(&tls, &ConnectOptions::default()),
    )
    .await
    .map(drop)
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

/// A listener that accepts and never speaks: the dial fails with
/// [`TransportError::Timeout`] at the adapter's dial timeout.
pub async fn a_dial_timeout_fails_with_timeout<T: Adapter>() {
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
        T::make()
            .with_connect_timeout(Duration::from_millis(300))
            .connect(&ep, &ConnectOptions::default()),
    )
    .await
    .map(drop)
    .unwrap_err();
    assert_eq!(error, TransportError::Timeout);
}

// ---------------------------------------------------------------------------
// the end of a connection

/// Our own close ends the connection's and the channel's streams with
/// `ClosedByClient` (no `ConsumerCancelled` for a consumer that goes with its
/// connection); later calls fail with it, and a second close is a no-op.
pub async fn closing_from_our_side_ends_every_stream<T: Adapter>() {
    let conn = connect::<T>().await;
    let mut conn_events = conn.events();
    let (channel, mut channel_events) = confirm_channel::<T>(&conn).await;
    let queue = unique::<T>("close");
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
    assert_eq!(
        conn.open_channel().await.map(drop).unwrap_err(),
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

/// The broker closes the connection (`rabbitmqctl`, this connection only, by
/// name): 320 on the connection, its channels, and later calls.
pub async fn a_broker_side_close_reports_320_on_the_connection_and_its_channels<T: Adapter>() {
    let name = unique::<T>("forced");
    let conn = connect_named::<T>(&name).await;
    let mut conn_events = conn.events();
    let (channel, mut channel_events) = confirm_channel::<T>(&conn).await;

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

/// The link goes silent (a proxy stops forwarding both ways without closing
/// anything) under `heartbeat=2` (the least amqprs runs with): missed heartbeats
/// end the connection with a transient error, the same on its channels and on
/// later calls. A client that reports them as such says
/// [`TransportError::HeartbeatTimeout`] (or, on a loaded machine, the I/O error
/// of a writer that hit the silent socket first); one that does not
/// ([`Capabilities::reports_heartbeat_timeout`](amqp_rebound_core::transport::Capabilities::reports_heartbeat_timeout)
/// is `false`) says [`TransportError::Io`].
pub async fn a_silent_broker_is_detected_by_missed_heartbeats<T: Adapter>() {
    let proxy = proxy();
    let via_proxy = rewrite("amqp", &proxy.addr().to_string(), "?heartbeat=2");
    let transport = T::make();
    let conn = transport
        .connect(&via_proxy, &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(T::heartbeat(&conn), 2, "the negotiated heartbeat");
    let mut conn_events = conn.events();
    let channel = conn.open_channel().await.unwrap();
    let mut channel_events = channel.events();
    let frozen_at = Instant::now();
    proxy.blackhole_existing();
    let error = expect_connection_closed(&mut conn_events).await;
    let detected = frozen_at.elapsed();
    if transport.capabilities().reports_heartbeat_timeout {
        assert!(
            matches!(
                error,
                TransportError::HeartbeatTimeout | TransportError::Io(_)
            ),
            "got {error:?}"
        );
    } else {
        assert!(matches!(error, TransportError::Io(_)), "got {error:?}");
    }
    assert_eq!(error.class(), ErrorClass::Transient);
    assert_eq!(expect_channel_closed(&mut channel_events).await, error);
    // Calls after the end say why it ended.
    assert_eq!(conn.open_channel().await.map(drop).unwrap_err(), error);
    assert_eq!(
        channel
            .publish(&Message::new("", "x", &b""[..]))
            .await
            .unwrap_err(),
        error
    );
    eprintln!("heartbeat=2s: missed heartbeats reported after {detected:?}: {error}");
}

/// The broker's `connection.blocked` and `connection.unblocked` become
/// [`ConnectionEvent::Blocked`] and [`ConnectionEvent::Unblocked`], and the
/// connection works on after the unblock. A real memory alarm would block every
/// publisher on this shared broker, so the two frames are slipped in by a proxy
/// (the client cannot tell); this also checks the wiring of a client that does
/// not advertise the capability (amqprs), for a broker that sends them anyway.
pub async fn blocked_and_unblocked_are_reported<T: Adapter>() {
    let proxy = proxy();
    let via_proxy = rewrite("amqp", &proxy.addr().to_string(), "");
    let conn = T::make()
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
    assert_eq!(
        proxy.inject(&FaultProxy::connection_method(60, &arguments)),
        1
    );
    assert_eq!(
        next("Blocked", &mut events).await,
        ConnectionEvent::Blocked("low on memory".into())
    );
    proxy.inject(&FaultProxy::connection_method(61, &[]));
    assert_eq!(
        next("Unblocked", &mut events).await,
        ConnectionEvent::Unblocked
    );
    // A client may hold its writes while blocked; after the unblock they flow.
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

// ---------------------------------------------------------------------------
// runtimes

/// The core's driver may run on any executor: every call, and every drop, must
/// work on a thread that is not in the tokio runtime the transport was given
/// ([`Adapter::with_handle`]). A plain `#[test]`: it builds that runtime itself.
pub fn works_when_driven_from_another_executor<T: Adapter>() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    // `within`, for a step polled outside the runtime: its timer is made
    // inside it (where a timer must be made), then polled from here.
    fn within_on<F: Future>(
        handle: &tokio::runtime::Handle,
        what: &'static str,
        step: F,
    ) -> impl Future<Output = F::Output> {
        let _runtime = handle.enter();
        let timeout = tokio::time::timeout(DEADLINE, step);
        async move {
            timeout
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        }
    }
    let transport = T::make().with_handle(handle.clone());
    futures::executor::block_on(async {
        let (ep, options) = (endpoint(), ConnectOptions::named(unique::<T>("foreign")));
        let conn = within_on(&handle, "connect", transport.connect(&ep, &options).boxed())
            .await
            .unwrap();
        let mut conn_events = conn.events();
        let channel = within_on(&handle, "open_channel", conn.open_channel().boxed())
            .await
            .unwrap();
        let mut events = channel.events();
        within_on(&handle, "confirm_select", channel.confirm_select())
            .await
            .unwrap();
        let queue = within_on(
            &handle,
            "declare_queue",
            channel.declare_queue(&QueueDecl::server_named()),
        )
        .await
        .unwrap();
        let message = Message::new("", queue.name.as_str(), &b"x"[..]);
        within_on(&handle, "publish", channel.publish(&message))
            .await
            .unwrap();
        let ack = within_on(&handle, "the ack", events.next().boxed()).await;
        assert_eq!(
            ack,
            Some(ChannelEvent::Ack {
                delivery_tag: 1,
                multiple: false
            })
        );
        // A dropped channel is closed by the client on the runtime.
        drop(channel);
        let other = within_on(
            &handle,
            "a second open_channel",
            conn.open_channel().boxed(),
        )
        .await
        .unwrap();
        drop(other);
        within_on(&handle, "close", conn.close()).await.unwrap();
        let closed = within_on(&handle, "Closed", conn_events.next().boxed()).await;
        assert_eq!(
            closed,
            Some(ConnectionEvent::Closed(TransportError::ClosedByClient))
        );
        drop(conn);
    });
    // A connection dropped without close, outside the runtime.
    let conn = futures::executor::block_on(within_on(
        &handle,
        "connect",
        transport.connect(&endpoint(), &ConnectOptions::named(unique::<T>("dropped"))),
    ))
    .unwrap();
    drop(conn);
    runtime.shutdown_timeout(Duration::from_secs(5));
}

/// The adapter suite as tests over `$transport`, a type that implements
/// [`Adapter`]: one `#[tokio::test]` per case (multi-threaded, 2 workers; one
/// on a current-thread runtime), and a plain `#[test]` for the case that builds
/// its own runtime.
///
/// ```ignore
/// amqp_rebound_tests::adapter_suite!(amqp_rebound_lapin::LapinTransport);
/// ```
#[macro_export]
macro_rules! adapter_suite {
    ($transport:ty $(,)?) => {
        $crate::__adapter_case!(
            $transport,
            publishes_1000_and_gets_1000_acks_then_consumes_them
        );
        $crate::__adapter_case!(
            $transport,
            back_to_back_publishes_get_the_confirm_of_their_own_message
        );
        $crate::__adapter_case!($transport, properties_and_headers_round_trip);
        $crate::__adapter_case!(
            $transport,
            current_thread,
            server_named_queue_gets_its_amq_gen_name
        );
        $crate::__adapter_case!(
            $transport,
            try_publish_hands_over_in_order_and_sends_nothing_on_a_closed_channel
        );
        $crate::__adapter_case!(
            $transport,
            a_mandatory_unroutable_publish_comes_back_before_its_ack
        );
        $crate::__adapter_case!(
            $transport,
            overlong_names_are_refused_before_the_client_sees_them
        );
        $crate::__adapter_case!(
            $transport,
            the_client_publishes_and_consumes_1000_confirmed_messages
        );
        $crate::__adapter_case!(
            $transport,
            publish_to_a_missing_exchange_closes_the_channel_with_404
        );
        $crate::__adapter_case!(
            $transport,
            publishes_racing_the_brokers_channel_close_cost_only_the_channel
        );
        $crate::__adapter_case!(
            $transport,
            a_failing_call_returns_the_error_and_the_channel_reports_it
        );
        $crate::__adapter_case!(
            $transport,
            an_ack_with_an_unknown_tag_closes_the_channel_with_406
        );
        $crate::__adapter_case!($transport, deleting_a_consumed_queue_cancels_the_consumer);
        $crate::__adapter_case!(
            $transport,
            a_wrong_password_is_an_auth_error_without_the_password
        );
        $crate::__adapter_case!($transport, a_missing_vhost_is_the_brokers_530);
        $crate::__adapter_case!($transport, a_refused_dial_is_an_io_error);
        $crate::__adapter_case!($transport, tls_to_a_plain_port_fails_cleanly);
        $crate::__adapter_case!($transport, a_dial_timeout_fails_with_timeout);
        $crate::__adapter_case!($transport, closing_from_our_side_ends_every_stream);
        $crate::__adapter_case!(
            $transport,
            a_broker_side_close_reports_320_on_the_connection_and_its_channels
        );
        $crate::__adapter_case!($transport, a_silent_broker_is_detected_by_missed_heartbeats);
        $crate::__adapter_case!($transport, blocked_and_unblocked_are_reported);

        #[test]
        fn works_when_driven_from_another_executor() {
            $crate::adapter::works_when_driven_from_another_executor::<$transport>();
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __adapter_case {
    ($transport:ty, current_thread, $case:ident) => {
        #[tokio::test]
        async fn $case() {
            $crate::adapter::$case::<$transport>().await;
        }
    };
    ($transport:ty, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            $crate::adapter::$case::<$transport>().await;
        }
    };
}
