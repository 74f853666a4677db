//! The contract between a [`Client`](crate::Client) handle and its
//! [`Driver`](crate::Driver): the requests a handle sends, what they share, the
//! replies and consumer items the driver sends back, and the results both name.
//! Neither side imports the other's internals; both import this.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::channel::{mpsc, oneshot};

use crate::error::TransportError;
use crate::ids::ChannelId;
use crate::message::{Delivery, Message};
use crate::outbox::{Confirmation, PublishError};
use crate::state::Phase;
use crate::supervisor::{Stats, Supervisor};
use crate::topology::{
    AckError, AckKind, ConsumeError, ConsumeOptions, ConsumerId, OpId, QueueDecl, QueueHandle,
    QueueRef, TopologyError,
};

/// What the driver and every client handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<ClientState>,
    pub(crate) queue_names: Mutex<HashMap<QueueHandle, String>>,
    pub(crate) closed: AtomicBool,
}

/// A snapshot of the pool's state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientState {
    /// Each connection slot's state.
    pub connections: Vec<Phase>,
    /// Channels Ready now.
    pub ready_channels: usize,
    /// Channels in the pool.
    pub channels: usize,
    /// `close()` was called (or every handle dropped).
    pub closed: bool,
}

impl ClientState {
    pub(crate) fn of(sup: &Supervisor) -> ClientState {
        ClientState {
            connections: sup
                .connection_ids()
                .filter_map(|id| sup.connection_state(id).map(|s| s.phase()))
                .collect(),
            ready_channels: sup.ready_channels(),
            channels: sup.channel_ids().count(),
            closed: sup.is_closing(),
        }
    }

    /// Every connection and channel is Ready.
    pub fn is_ready(&self) -> bool {
        !self.closed && self.ready_channels == self.channels
    }
}

pub(crate) type TopologyOpFn =
    Box<dyn FnOnce(&mut Supervisor, Instant) -> Result<OpId, TopologyError> + Send + 'static>;

/// What a client handle asks of the driver.
pub(crate) enum Request {
    Publish {
        message: Arc<Message>,
        /// Measured from when the driver accepts it, on the driver's clock.
        timeout: Option<Duration>,
        wait: bool,
        reply: oneshot::Sender<Result<Confirmation, PublishError>>,
    },
    Topology {
        op: TopologyOpFn,
        reply: TopologyReply,
    },
    DeclareQueue {
        decl: QueueDecl,
        reply: oneshot::Sender<Result<(QueueHandle, String), TopologyError>>,
    },
    Consume {
        queue: QueueRef,
        tag: Option<String>,
        options: ConsumeOptions,
        items: mpsc::UnboundedSender<ConsumerItem>,
        reply: oneshot::Sender<Result<ConsumerId, ConsumeError>>,
    },
    Cancel {
        consumer: ConsumerId,
    },
    Ack {
        channel: ChannelId,
        generation: u64,
        delivery_tag: u64,
        kind: AckKind,
        reply: oneshot::Sender<Result<(), AckError>>,
    },
    Watch {
        events: crate::watch::Sender,
    },
    Close {
        /// Discard what was not sent instead of draining.
        discard: bool,
        done: oneshot::Sender<CloseSummary>,
    },
    Flush {
        reply: oneshot::Sender<Flushed>,
    },
    Connected {
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
}

/// How a [`Client::close`](crate::Client::close) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CloseSummary {
    /// Publishes the close resolved [`PublishError::Closed`]: not confirmed
    /// when the close timeout ran out (or discarded by
    /// [`Client::close_discarding`](crate::Client::close_discarding)). Zero: everything accepted was confirmed
    /// (or had resolved otherwise) before the connections closed.
    pub unresolved: u64,
}

/// What [`Client::flush`](crate::Client::flush) waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Flushed {
    /// How many of the messages accepted before the flush resolved other than
    /// [`Confirmation::Confirmed`](crate::Confirmation::Confirmed) (returned, nacked, timed out, rejected,
    /// closed). Zero: every one of them is confirmed by the broker.
    pub not_confirmed: u64,
}

/// What the driver sends a consumer.
#[derive(Debug)]
pub(crate) enum ConsumerItem {
    /// A delivery, and the channel generation it came on (for its ack).
    Delivery {
        delivery: Box<Delivery>,
        channel: ChannelId,
        generation: u64,
    },
    Ended(ConsumeError),
}

pub(crate) type Reply<T> = oneshot::Sender<T>;

pub(crate) enum TopologyReply {
    Unit(Reply<Result<(), TopologyError>>),
    Queue(
        QueueHandle,
        Reply<Result<(QueueHandle, String), TopologyError>>,
    ),
}

/// The client's state as the driver and the client handles see it, without its
/// transport's types.
pub(crate) trait Engine: Send + Sync + 'static {
    /// One poll of the driver.
    fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<()>;
    /// Runs a publish request on the caller's thread, if the state is free;
    /// gives it back otherwise (the caller then sends it as a request).
    fn try_publish(&self, request: Request) -> Result<(), Request>;
    /// The driver was dropped: everything pending resolves `Closed`.
    fn abandon(&self);
    /// The supervisor's counters now.
    fn stats(&self) -> Stats;
}

pub(crate) use crate::transport::support::lock;
