//! The driver against mockall mocks of the transport traits: exact call counts and
//! arguments, not a broker model.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, TopologyOutcome, Transport,
};
use amqp_rebound_core::{Client, ConsumeOptions, Endpoint, Message, TopologyOp, TransportError};
use async_trait::async_trait;
use futures::StreamExt;
use futures::executor::LocalPool;
use futures::stream::BoxStream;
use futures::task::LocalSpawnExt;
use mockall::mock;
use support::{ManualClock, drive};

mock! {
    pub Chan {}
    #[async_trait]
    impl Channel for Chan {
        fn events(&self) -> BoxStream<'static, ChannelEvent>;
        async fn confirm_select(&self) -> Result<(), TransportError>;
        async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError>;
        async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError>;
        async fn publish(&self, message: &Message) -> Result<(), TransportError>;
        async fn consume(&self, queue: &str, consumer_tag: &str, options: &ConsumeOptions) -> Result<(), TransportError>;
        async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError>;
        async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError>;
        async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<(), TransportError>;
        async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError>;
        async fn close(&self) -> Result<(), TransportError>;
    }
}

mock! {
    pub Conn {}
    #[async_trait]
    impl Connection for Conn {
        type Channel = MockChan;
        async fn open_channel(&self) -> Result<MockChan, TransportError>;
        fn events(&self) -> BoxStream<'static, ConnectionEvent>;
        async fn close(&self) -> Result<(), TransportError>;
    }
}

mock! {
    pub Trans {}
    #[async_trait]
    impl Transport for Trans {
        type Connection = MockConn;
        async fn connect(&self, endpoint: &Endpoint, options: &ConnectOptions) -> Result<MockConn, TransportError>;
    }
}

fn quiet_channel() -> MockChan {
    let mut ch = MockChan::new();
    ch.expect_events()
        .returning(|| futures::stream::pending().boxed());
    ch.expect_confirm_select().returning(|| Ok(()));
    ch.expect_close().returning(|| Ok(()));
    ch
}

#[test]
fn failed_dials_are_retried_with_backoff_then_channels_open_with_confirms() {
    let dials = Arc::new(AtomicUsize::new(0));
    let mut transport = MockTrans::new();
    let counter = Arc::clone(&dials);
    transport
        .expect_connect()
        .withf(|endpoint, options| {
            endpoint.host() == "127.0.0.1" && options.connection_name.as_deref() == Some("mocked")
        })
        .returning(move |_, _| {
            // two refusals, then a connection with two channels
            if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(TransportError::Io("connection refused".into()));
            }
            let mut conn = MockConn::new();
            conn.expect_events()
                .returning(|| futures::stream::pending().boxed());
            conn.expect_open_channel()
                .times(2)
                .returning(|| Ok(quiet_channel()));
            conn.expect_close().returning(|| Ok(()));
            Ok(conn)
        });
    let clock = ManualClock::new();
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"])
        .pool(1, 2)
        .connection_name("mocked")
        .build(transport, clock.clone())
        .expect("config");
    let mut pool = LocalPool::new();
    pool.spawner().spawn_local(driver).expect("spawn");
    pool.run_until_stalled();
    assert_eq!(
        dials.load(Ordering::SeqCst),
        1,
        "one dial at start, then a backoff wait"
    );
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || client
        .state()
        .is_ready()));
    assert_eq!(dials.load(Ordering::SeqCst), 3);
    assert!(client.stats().reconnects >= 2);
}

#[test]
fn a_publish_error_from_the_transport_reopens_the_channel_and_republishes() {
    let mut transport = MockTrans::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let opened2 = Arc::clone(&opened);
    transport.expect_connect().returning(move |_, _| {
        let mut conn = MockConn::new();
        conn.expect_events()
            .returning(|| futures::stream::pending().boxed());
        conn.expect_close().returning(|| Ok(()));
        let opened = Arc::clone(&opened2);
        conn.expect_open_channel().returning(move || {
            let generation = opened.fetch_add(1, Ordering::SeqCst);
            let mut ch = MockChan::new();
            ch.expect_confirm_select().returning(|| Ok(()));
            ch.expect_close().returning(|| Ok(()));
            if generation == 0 {
                // the first channel fails its publish (as a closed channel does)
                ch.expect_events()
                    .returning(|| futures::stream::pending().boxed());
                ch.expect_publish().times(1).returning(|_| {
                    Err(TransportError::Reply {
                        code: 406,
                        text: "PRECONDITION_FAILED".into(),
                    })
                });
            } else {
                // the second confirms message 1 at once
                let (tx, rx) = futures::channel::mpsc::unbounded();
                ch.expect_events().return_once(move || rx.boxed());
                ch.expect_publish().times(1).returning(move |m| {
                    assert_eq!(&m.payload[..], b"payload");
                    let _ = tx.unbounded_send(ChannelEvent::Ack {
                        delivery_tag: 1,
                        multiple: false,
                    });
                    Ok(())
                });
            }
            Ok(ch)
        });
        Ok(conn)
    });
    let clock = ManualClock::new();
    let (client, driver) = Client::builder()
        .hosts(["amqp://guest:guest@127.0.0.1:5672/%2f"])
        .pool(1, 1)
        .build(transport, clock.clone())
        .expect("config");
    let mut pool = LocalPool::new();
    pool.spawner().spawn_local(driver).expect("spawn");
    let result = Arc::new(std::sync::Mutex::new(None));
    let out = Arc::clone(&result);
    pool.spawner()
        .spawn_local(async move {
            let r = client.publish("", "q", "payload", Default::default()).await;
            *out.lock().unwrap() = Some(r);
        })
        .expect("spawn");
    assert!(drive(&mut pool, &clock, Duration::from_secs(5), || result
        .lock()
        .unwrap()
        .is_some()));
    assert_eq!(
        *result.lock().unwrap(),
        Some(Ok(amqp_rebound_core::Confirmation::Confirmed))
    );
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "the channel was reopened once"
    );
}
