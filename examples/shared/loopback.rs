//! A tiny transport that needs no broker: every publish is confirmed at once and
//! kept in memory. Shared by the `custom_transport` and `custom_runtime` examples.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use amqp_rebound::engine::{
    Channel, ChannelEvent, ConnectOptions, Connection, ConnectionEvent, Endpoint, QueueInfo, Sleep,
    Timer, TopologyOp, TopologyOutcome, Transport,
};
use amqp_rebound::{ConsumeOptions, Message, TransportError};
// Not among `amqp_rebound::engine`'s re-exports: the core crate's path.
use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use futures::stream::BoxStream;

/// Connects to nothing; remembers what was published.
#[derive(Clone, Default)]
pub struct LoopbackTransport {
    pub published: Arc<Mutex<Vec<Message>>>,
}

pub struct LoopbackConnection {
    published: Arc<Mutex<Vec<Message>>>,
}

pub struct LoopbackChannel {
    published: Arc<Mutex<Vec<Message>>>,
    events: mpsc::UnboundedSender<ChannelEvent>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<ChannelEvent>>>,
    seq: Mutex<u64>,
}

#[async_trait]
impl Transport for LoopbackTransport {
    type Connection = LoopbackConnection;
    async fn connect(
        &self,
        endpoint: &Endpoint,
        _options: &ConnectOptions,
    ) -> Result<LoopbackConnection, TransportError> {
        // `endpoint` prints without its password
        println!("loopback: connecting to {endpoint}");
        Ok(LoopbackConnection {
            published: Arc::clone(&self.published),
        })
    }
}

#[async_trait]
impl Connection for LoopbackConnection {
    type Channel = LoopbackChannel;
    async fn open_channel(&self) -> Result<LoopbackChannel, TransportError> {
        let (tx, rx) = mpsc::unbounded();
        Ok(LoopbackChannel {
            published: Arc::clone(&self.published),
            events: tx,
            receiver: Mutex::new(Some(rx)),
            seq: Mutex::new(0),
        })
    }
    fn events(&self) -> BoxStream<'static, ConnectionEvent> {
        // a loopback connection never fails
        futures::stream::pending().boxed()
    }
    async fn close(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

#[async_trait]
impl Channel for LoopbackChannel {
    fn events(&self) -> BoxStream<'static, ChannelEvent> {
        match self.receiver.lock().unwrap().take() {
            Some(rx) => rx.boxed(),
            None => futures::stream::empty().boxed(),
        }
    }
    async fn confirm_select(&self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn qos(&self, _: u16) -> Result<(), TransportError> {
        Ok(())
    }
    async fn run(&self, op: &TopologyOp) -> Result<TopologyOutcome, TransportError> {
        match op {
            TopologyOp::DeclareQueue(decl) => Ok(TopologyOutcome::Queue(QueueInfo {
                name: decl.name.clone(),
                message_count: 0,
                consumer_count: 0,
            })),
            TopologyOp::DeleteQueue { .. } => {
                Ok(TopologyOutcome::QueueDeleted { message_count: 0 })
            }
            TopologyOp::DeclareExchange(_)
            | TopologyOp::DeleteExchange { .. }
            | TopologyOp::BindQueue { .. }
            | TopologyOp::UnbindQueue { .. }
            | TopologyOp::BindExchange { .. }
            | TopologyOp::UnbindExchange { .. } => Ok(TopologyOutcome::Done),
            // basic.qos / consume / cancel come through their own methods
            op => Err(op.unsupported()),
        }
    }
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        self.published.lock().unwrap().push(message.clone());
        let mut seq = self.seq.lock().unwrap();
        *seq += 1;
        // confirm numbers count publishes on the channel from 1
        let _ = self.events.unbounded_send(ChannelEvent::Ack {
            delivery_tag: *seq,
            multiple: false,
        });
        Ok(())
    }
    async fn consume(&self, _: &str, _: &str, _: &ConsumeOptions) -> Result<(), TransportError> {
        Ok(())
    }
    async fn cancel(&self, _: &str) -> Result<(), TransportError> {
        Ok(())
    }
    async fn ack(&self, _: u64, _: bool) -> Result<(), TransportError> {
        Ok(())
    }
    async fn nack(&self, _: u64, _: bool, _: bool) -> Result<(), TransportError> {
        Ok(())
    }
    async fn reject(&self, _: u64, _: bool) -> Result<(), TransportError> {
        Ok(())
    }
    async fn close(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// A Timer for any executor: each sleep is a thread that wakes its future.
#[derive(Clone, Copy, Default)]
pub struct ThreadTimer;

impl Timer for ThreadTimer {
    fn now(&self) -> Instant {
        #[allow(clippy::disallowed_methods)] // this timer is the clock
        Instant::now()
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let now = ThreadTimer.now();
            std::thread::sleep(deadline.saturating_duration_since(now));
            let _ = tx.send(());
        });
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
