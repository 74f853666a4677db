//! [`InstrumentedTransport`]: a transport wrapper that counts what the client does
//! (dials, with their times) and, as a test double, can plant a client bug
//! ([`ClientBug`]) to show that the simulation's invariant checks catch it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::message::Message;
use amqp_rebound_core::topology::{ConsumeOptions, TopologyOp};
use amqp_rebound_core::transport::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, QueueInfo, Timer,
    TopologyOutcome, Transport,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

/// A bug planted between the client and its transport (test-only fault switch).
///
/// The real client is untouched; the wrapper makes it *behave* as a buggy client
/// would, so that the invariant checks can be shown to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientBug {
    /// No bug: the wrapper only counts.
    #[default]
    None,
    /// Messages published a second time (the re-publish after a connection or
    /// channel loss) are silently dropped: a client without re-publish on loss.
    /// The broker numbers confirms by what it received, so the client's later
    /// messages are confirmed in place of the dropped ones: confirmed loss.
    NoRepublish,
    /// After the first connection or channel loss, new channels are reported set
    /// up at once: `confirm.select` and the topology replay are answered `Ok`
    /// without reaching the broker. The client then hands out channels that are
    /// really still being reopened.
    SkipReopenSetup,
}

/// What an [`InstrumentedTransport`] saw, shared by every clone.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct Instruments {
    /// When each dial started.
    pub dials: Vec<Instant>,
    /// Publishes the transport accepted (sent to the broker).
    pub publishes: u64,
    /// Publishes on a channel after its `Closed` event reached the client.
    pub publishes_after_close: u64,
    /// Publishes dropped by [`ClientBug::NoRepublish`].
    pub dropped_republishes: u64,
    /// Channels whose set-up [`ClientBug::SkipReopenSetup`] faked.
    pub faked_setups: u64,
    /// Connection or channel losses seen (not counting closes the client asked
    /// for).
    pub losses: u64,
    seen_payloads: BTreeSet<Bytes>,
}

struct Shared {
    bug: ClientBug,
    timer: Arc<dyn Timer>,
    instruments: Mutex<Instruments>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("bug", &self.bug)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Instruments> {
        self.instruments
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wraps a [`Transport`]: counts dials (with their times, for dial-storm figures)
/// and publishes, and optionally plants a [`ClientBug`].
///
/// ```
/// use std::sync::Arc;
/// use amqp_rebound_sim::{BrokerConfig, ClientBug, InstrumentedTransport, SimBroker, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let broker = SimBroker::new(clock.clone(), BrokerConfig::default()).with_host("rabbit");
/// let transport = InstrumentedTransport::new(broker.transport(), Arc::new(clock), ClientBug::None);
/// assert_eq!(transport.instruments().dials.len(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct InstrumentedTransport<T> {
    inner: Arc<T>,
    shared: Arc<Shared>,
}

impl<T: Transport> InstrumentedTransport<T> {
    /// Wraps `inner`; `timer` stamps the dials.
    pub fn new(inner: T, timer: Arc<dyn Timer>, bug: ClientBug) -> InstrumentedTransport<T> {
        InstrumentedTransport {
            inner: Arc::new(inner),
            shared: Arc::new(Shared {
                bug,
                timer,
                instruments: Mutex::new(Instruments::default()),
            }),
        }
    }

    /// A snapshot of what it saw.
    pub fn instruments(&self) -> Instruments {
        let mut i = self.shared.lock().clone();
        i.seen_payloads.clear();
        i
    }

    /// Dials so far.
    pub fn dials(&self) -> usize {
        self.shared.lock().dials.len()
    }

    /// The planted bug.
    pub fn bug(&self) -> ClientBug {
        self.shared.bug
    }
}

#[async_trait]
impl<T: Transport> Transport for InstrumentedTransport<T> {
    type Connection = InstrumentedConnection<T::Connection>;

    async fn connect(
        &self,
        endpoint: &Endpoint,
        options: &ConnectOptions,
    ) -> Result<Self::Connection, TransportError> {
        let now = self.shared.timer.now();
        self.shared.lock().dials.push(now);
        let inner = self.inner.connect(endpoint, options).await?;
        Ok(InstrumentedConnection {
            inner,
            shared: Arc::clone(&self.shared),
        })
    }
}

fn is_loss(err: &TransportError) -> bool {
    !matches!(err, TransportError::ClosedByClient)
}

/// A connection of an [`InstrumentedTransport`].
#[derive(Debug)]
pub struct InstrumentedConnection<C> {
    inner: C,
    shared: Arc<Shared>,
}

#[async_trait]
impl<C: Connection> Connection for InstrumentedConnection<C> {
    type Channel = InstrumentedChannel<C::Channel>;

    async fn open_channel(&self) -> Result<Self::Channel, TransportError> {
        let inner = self.inner.open_channel().await?;
        let fake_setup = {
            let mut i = self.shared.lock();
            let fake = self.shared.bug == ClientBug::SkipReopenSetup && i.losses > 0;
            if fake {
                i.faked_setups += 1;
            }
            fake
        };
        Ok(InstrumentedChannel {
            inner,
            shared: Arc::clone(&self.shared),
            fake_setup,
            closed: Arc::new(Mutex::new(false)),
        })
    }

    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        let shared = Arc::clone(&self.shared);
        self.inner
            .events()
            .inspect(move |e| {
                if let ConnectionEvent::Closed(err) = e
                    && is_loss(err)
                {
                    shared.lock().losses += 1;
                }
            })
            .boxed()
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}

/// A channel of an [`InstrumentedTransport`].
#[derive(Debug)]
pub struct InstrumentedChannel<H> {
    inner: H,
    shared: Arc<Shared>,
    /// [`ClientBug::SkipReopenSetup`] fakes this channel's set-up.
    fake_setup: bool,
    closed: Arc<Mutex<bool>>,
}

impl<H: Channel> InstrumentedChannel<H> {
    fn faked(&self) -> bool {
        self.fake_setup
    }
}

#[async_trait]
impl<H: Channel> Channel for InstrumentedChannel<H> {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        let shared = Arc::clone(&self.shared);
        let closed = Arc::clone(&self.closed);
        self.inner
            .events()
            .inspect(move |e| {
                if let ChannelEvent::Closed(err) = e {
                    *closed.lock().unwrap_or_else(PoisonError::into_inner) = true;
                    if is_loss(err) {
                        shared.lock().losses += 1;
                    }
                }
            })
            .boxed()
    }

    async fn confirm_select(&self) -> Result<(), TransportError> {
        if self.faked() {
            return Ok(());
        }
        self.inner.confirm_select().await
    }

    async fn qos(&self, prefetch_count: u16) -> Result<(), TransportError> {
        if self.faked() {
            return Ok(());
        }
        self.inner.qos(prefetch_count).await
    }

    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        if self.faked() {
            // Declares and binds answer without reaching the broker; deletes and
            // unbinds still go.
            match op {
                TopologyOp::DeclareQueue(decl) => {
                    let name = if decl.name.is_empty() {
                        "amq.gen-never-declared".to_owned()
                    } else {
                        decl.name.clone()
                    };
                    return Ok(TopologyOutcome::Queue(QueueInfo {
                        name,
                        message_count: 0,
                        consumer_count: 0,
                    }));
                }
                TopologyOp::DeclareExchange(_)
                | TopologyOp::BindQueue { .. }
                | TopologyOp::BindExchange { .. } => return Ok(TopologyOutcome::Done),
                _ => {}
            }
        }
        self.inner.run(op).await
    }

    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        if self.shared.bug == ClientBug::NoRepublish {
            let mut i = self.shared.lock();
            if !i.seen_payloads.insert(message.payload.clone()) {
                i.dropped_republishes += 1;
                return Ok(());
            }
        }
        let was_closed = *self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.publish(message).await?;
        let mut i = self.shared.lock();
        i.publishes += 1;
        if was_closed {
            i.publishes_after_close += 1;
        }
        Ok(())
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        options: &ConsumeOptions,
    ) -> Result<(), TransportError> {
        if self.faked() {
            return Ok(());
        }
        self.inner.consume(queue, consumer_tag, options).await
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<(), TransportError> {
        self.inner.cancel(consumer_tag).await
    }

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), TransportError> {
        self.inner.ack(delivery_tag, multiple).await
    }

    async fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TransportError> {
        self.inner.nack(delivery_tag, multiple, requeue).await
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), TransportError> {
        self.inner.reject(delivery_tag, requeue).await
    }

    async fn close(&self) -> Result<(), TransportError> {
        self.inner.close().await
    }
}
