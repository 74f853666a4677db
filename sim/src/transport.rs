//! [`SimTransport`], [`SimConnection`] and [`SimChannel`]: core's transport traits
//! over [`SimBroker`]s.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::topology::{ConsumeOptions, TopologyOp};
use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, TopologyOutcome, Transport,
};
use async_trait::async_trait;
use futures::channel::{mpsc, oneshot};
use futures::stream::{BoxStream, StreamExt};

use crate::broker::{SimBroker, SimConnectionId, host_key};
use crate::clock::VirtualClock;
use crate::model::{Op, Reply, Request};

/// Core's [`Transport`] over simulated brokers.
///
/// Dials go to the first broker that serves the endpoint's `host:port` (see
/// [`host_key`]); a host no broker serves refuses, after one latency. Every
/// operation takes virtual time, so nothing happens until the test advances the
/// [`VirtualClock`].
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_core::{Channel, Connection, Endpoint, QueueDecl, Transport};
/// use amqp_rebound_core::transport::ConnectOptions;
/// use amqp_rebound_sim::{BrokerConfig, SimBroker, VirtualClock};
/// use futures::executor::LocalPool;
/// use futures::task::LocalSpawnExt;
///
/// let clock = VirtualClock::new();
/// let broker = SimBroker::new(clock.clone(), BrokerConfig::default()).with_host("rabbit");
/// let transport = broker.transport();
/// let mut pool = LocalPool::new();
/// let handle = pool.spawner().spawn_local_with_handle(async move {
///     let endpoint = Endpoint::parse("amqp://guest:guest@rabbit").unwrap();
///     let conn = transport.connect(&endpoint, &ConnectOptions::default()).await.unwrap();
///     let channel = conn.open_channel().await.unwrap();
///     channel.declare_queue(&QueueDecl::server_named()).await.unwrap().name
/// }).unwrap();
/// clock.run_for(Duration::from_millis(10), || pool.run_until_stalled());
/// let name = pool.run_until(handle);
/// assert!(name.starts_with("amq.gen-"));
/// assert_eq!(clock.elapsed(), Duration::from_millis(10));
/// ```
#[derive(Clone)]
pub struct SimTransport {
    clock: VirtualClock,
    brokers: Vec<SimBroker>,
    latency: Duration,
}

impl fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTransport")
            .field("brokers", &self.brokers)
            .field("latency", &self.latency)
            .finish()
    }
}

impl SimTransport {
    /// A transport with no broker behind it: every dial is refused. Brokers must
    /// share `clock`.
    pub fn new(clock: VirtualClock) -> SimTransport {
        SimTransport {
            clock,
            brokers: Vec::new(),
            latency: Duration::from_millis(1),
        }
    }

    /// Adds a broker; it answers for the hosts it serves (now and later).
    pub fn with_broker(mut self, broker: SimBroker) -> SimTransport {
        self.add_broker(broker);
        self
    }

    /// Adds a broker.
    pub fn add_broker(&mut self, broker: SimBroker) {
        self.brokers.push(broker);
    }

    /// The brokers, in the order they were added.
    pub fn brokers(&self) -> &[SimBroker] {
        &self.brokers
    }

    /// The broker that answers for `host` (any form [`crate::normalize_host`]
    /// accepts).
    pub fn broker_for(&self, host: &str) -> Option<SimBroker> {
        let key = crate::broker::normalize_host(host);
        self.brokers.iter().find(|b| b.serves(&key)).cloned()
    }

    /// The clock.
    pub fn clock(&self) -> &VirtualClock {
        &self.clock
    }
}

#[async_trait]
impl Transport for SimTransport {
    type Connection = SimConnection;

    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<SimConnection, TransportError> {
        let host = host_key(endpoint.host(), endpoint.port());
        match self.brokers.iter().find(|b| b.serves(&host)) {
            Some(broker) => broker.dial(host, endpoint.clone(), options.clone()).await,
            None => {
                self.clock.sleep(self.latency).await;
                Err(TransportError::Io(format!(
                    "connection refused by {host} (simulated: no broker there)"
                )))
            }
        }
    }
}

/// Sends a request and waits for its answer.
async fn call(
    broker: &SimBroker,
    conn: u64,
    chan: Option<u64>,
    op: Op,
) -> Result<Reply, TransportError> {
    let (tx, rx) = oneshot::channel();
    broker.lock().send_up(
        conn,
        Request {
            chan,
            op,
            reply: Some(tx),
        },
    )?;
    match rx.await {
        Ok(result) => result,
        // Every queued reply is answered; a dropped one means the broker went away.
        Err(_) => Err(broker.lock().closed_error(conn, chan)),
    }
}

/// Sends a request that has no answer (publish, ack, ...).
fn cast(broker: &SimBroker, conn: u64, chan: u64, op: Op) -> Result<(), TransportError> {
    broker.lock().send_up(
        conn,
        Request {
            chan: Some(chan),
            op,
            reply: None,
        },
    )
}

fn unexpected() -> TransportError {
    TransportError::Protocol("unexpected reply from the simulated broker".into())
}

fn take_stream<T: Send + 'static>(
    slot: &Mutex<Option<mpsc::UnboundedReceiver<T>>>,
) -> BoxStream<'static, T> {
    match slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
        Some(rx) => rx.boxed(),
        // `events` is called once; a second caller gets an ended stream.
        None => futures::stream::empty().boxed(),
    }
}

/// A connection to a [`SimBroker`].
///
/// Dropping it closes the connection (a `connection.close` goes out, then its
/// event stream reports `Closed(ClosedByClient)` and ends), as core's contract
/// asks of event streams.
pub struct SimConnection {
    broker: SimBroker,
    id: u64,
    events: Mutex<Option<mpsc::UnboundedReceiver<ConnectionEvent>>>,
}

impl fmt::Debug for SimConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConnection")
            .field("id", &self.id())
            .finish()
    }
}

impl SimConnection {
    pub(crate) fn new(
        broker: SimBroker,
        id: u64,
        events: mpsc::UnboundedReceiver<ConnectionEvent>,
    ) -> SimConnection {
        SimConnection {
            broker,
            id,
            events: Mutex::new(Some(events)),
        }
    }

    /// Its identity, for the broker's fault and inspection methods.
    pub fn id(&self) -> SimConnectionId {
        SimConnectionId(self.id)
    }

    /// The broker it is connected to.
    pub fn broker(&self) -> &SimBroker {
        &self.broker
    }

    /// Whether the client side knows it is closed.
    pub fn is_closed(&self) -> bool {
        self.broker.lock().is_client_closed(self.id, None)
    }
}

impl Drop for SimConnection {
    fn drop(&mut self) {
        close_on_drop(&self.broker, self.id, None, Op::CloseConnection);
    }
}

impl Drop for SimChannel {
    fn drop(&mut self) {
        close_on_drop(&self.broker, self.conn, Some(self.key), Op::CloseChannel);
    }
}

fn close_on_drop(broker: &SimBroker, conn: u64, chan: Option<u64>, op: Op) {
    let mut state = broker.lock();
    if !state.is_client_closed(conn, chan) {
        // Nobody waits for the answer; a failure means it is closed already.
        let _ = state.send_up(
            conn,
            Request {
                chan,
                op,
                reply: None,
            },
        );
    }
}

#[async_trait]
impl Connection for SimConnection {
    type Channel = SimChannel;

    async fn open_channel(&self) -> Result<SimChannel, TransportError> {
        match call(&self.broker, self.id, None, Op::OpenChannel).await? {
            Reply::Channel {
                key,
                number,
                events,
            } => Ok(SimChannel {
                broker: self.broker.clone(),
                conn: self.id,
                key,
                number,
                events: Mutex::new(Some(events)),
            }),
            _ => Err(unexpected()),
        }
    }

    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        take_stream(&self.events)
    }

    /// Closes the connection; `Ok` at once if it is already closed.
    async fn close(&self) -> Result<(), TransportError> {
        if self.is_closed() {
            return Ok(());
        }
        match call(&self.broker, self.id, None, Op::CloseConnection).await {
            Ok(_) | Err(TransportError::ClosedByClient) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// A channel on a [`SimConnection`].
///
/// Dropping it closes the channel (see [`SimConnection`]).
pub struct SimChannel {
    broker: SimBroker,
    conn: u64,
    key: u64,
    number: u16,
    events: Mutex<Option<mpsc::UnboundedReceiver<ChannelEvent>>>,
}

impl fmt::Debug for SimChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimChannel")
            .field("connection", &self.connection_id())
            .field("number", &self.number)
            .finish()
    }
}

impl SimChannel {
    /// The AMQP channel number (from 1).
    pub fn number(&self) -> u16 {
        self.number
    }

    /// The connection it belongs to.
    pub fn connection_id(&self) -> SimConnectionId {
        SimConnectionId(self.conn)
    }

    /// Whether the client side knows it is closed.
    pub fn is_closed(&self) -> bool {
        self.broker
            .lock()
            .is_client_closed(self.conn, Some(self.key))
    }

    async fn call(&self, op: Op) -> Result<Reply, TransportError> {
        call(&self.broker, self.conn, Some(self.key), op).await
    }

    async fn done(&self, op: Op) -> Result<(), TransportError> {
        match self.call(op).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    fn cast(&self, op: Op) -> Result<(), TransportError> {
        cast(&self.broker, self.conn, self.key, op)
    }
}

#[async_trait]
impl Channel for SimChannel {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        take_stream(&self.events)
    }

    async fn confirm_select(&self) -> Result<(), TransportError> {
        self.done(Op::ConfirmSelect).await
    }

    async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError> {
        self.done(Op::Qos(prefetch_count)).await
    }

    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        let topology = matches!(
            op,
            TopologyOp::DeclareExchange(_)
                | TopologyOp::DeleteExchange { .. }
                | TopologyOp::DeclareQueue(_)
                | TopologyOp::DeleteQueue { .. }
                | TopologyOp::BindQueue { .. }
                | TopologyOp::UnbindQueue { .. }
                | TopologyOp::BindExchange { .. }
                | TopologyOp::UnbindExchange { .. }
        );
        if !topology {
            return Err(op.unsupported());
        }
        match self.call(Op::Topology(Box::new(op.clone()))).await? {
            Reply::Topology(outcome) => Ok(outcome),
            _ => Err(unexpected()),
        }
    }

    /// Queues the message on the wire and returns at once (no virtual time passes).
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        self.cast(Op::Publish(Box::new(message.clone())))
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: &ConsumeOptions,
    ) -> Result<(), TransportError> {
        self.done(Op::Consume {
            queue: queue.to_owned(),
            consumer_tag: consumer_tag.to_owned(),
            options: Box::new(options.clone()),
        })
        .await
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError> {
        self.done(Op::Cancel(consumer_tag.to_owned())).await
    }

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError> {
        self.cast(Op::Ack {
            delivery_tag,
            multiple,
        })
    }

    async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TransportError> {
        self.cast(Op::Nack {
            delivery_tag,
            multiple,
            requeue,
        })
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError> {
        self.cast(Op::Reject {
            delivery_tag,
            requeue,
        })
    }

    /// Closes the channel; `Ok` at once if it is already closed.
    async fn close(&self) -> Result<(), TransportError> {
        if self.is_closed() {
            return Ok(());
        }
        match self.call(Op::CloseChannel).await {
            Ok(_) | Err(TransportError::ClosedByClient) => Ok(()),
            Err(err) => Err(err),
        }
    }
}
