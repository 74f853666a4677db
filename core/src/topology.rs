//! Topology: exchanges, queues, bindings and consumers, as declared by the
//! application and replayed after every recovery.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::message::FieldTable;

/// Exchange type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    #[default]
    Direct,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by pattern (`*` one word, `#` zero or more words).
    Topic,
    /// Routes by headers.
    Headers,
    /// A plugin's exchange type, e.g. `x-delayed-message`.
    Custom(String),
}

impl ExchangeKind {
    /// The name AMQP uses for it.
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
            ExchangeKind::Custom(name) => name,
        }
    }
}

/// An exchange declaration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExchangeDecl {
    /// Name. Must not be empty (that is the default exchange) nor start with `amq.`.
    pub name: String,
    /// Type.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted by the broker when its last binding goes. An unbind (or a
    /// delete) through the client that takes its last binding this client
    /// knows of forgets it too: it is not declared again at a recovery.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    pub internal: bool,
    /// Extra arguments (`alternate-exchange`, ...).
    pub arguments: FieldTable,
}

impl ExchangeDecl {
    /// A durable exchange of the given kind.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        ExchangeDecl {
            name: name.into(),
            kind,
            durable: true,
            ..ExchangeDecl::default()
        }
    }
}

/// A queue declaration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueDecl {
    /// Name; empty for a server-named queue (`amq.gen-...`), which the client
    /// re-creates under a new name after recovery.
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Owned by this connection; deleted when it closes.
    pub exclusive: bool,
    /// Deleted by the broker when its last consumer goes. When the broker takes
    /// the cancel of the last consumer this client has on it, the client
    /// forgets it too (with its bindings): it is not declared again at a
    /// recovery. Its handle still names it in later requests.
    pub auto_delete: bool,
    /// Extra arguments (`x-queue-type`, `x-message-ttl`, ...).
    pub arguments: FieldTable,
}

impl QueueDecl {
    /// A durable, shared queue.
    pub fn durable(name: impl Into<String>) -> Self {
        QueueDecl {
            name: name.into(),
            durable: true,
            ..QueueDecl::default()
        }
    }

    /// A server-named, exclusive, auto-delete queue (the usual reply or fan-out
    /// queue).
    pub fn server_named() -> Self {
        QueueDecl {
            name: String::new(),
            exclusive: true,
            auto_delete: true,
            ..QueueDecl::default()
        }
    }

    /// Whether the broker picks the name.
    pub fn is_server_named(&self) -> bool {
        self.name.is_empty()
    }
}

/// How to consume.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConsumeOptions {
    /// The broker considers messages acknowledged on delivery.
    pub no_ack: bool,
    /// No other consumer on the queue.
    pub exclusive: bool,
    /// Unacknowledged deliveries allowed to this consumer (basic.qos before
    /// basic.consume). `None`: no limit. It also bounds the consumer's stream
    /// (unless `no_ack`): deliveries wait there for the application up to this
    /// many, the broker sending no more until some are acked.
    pub prefetch: Option<u16>,
    /// Extra arguments (`x-priority`, ...).
    pub arguments: FieldTable,
}

/// One topology operation with resolved names: what a transport executes. The
/// declare, delete, bind and unbind ops go to
/// [`Channel::run`](crate::transport::Channel::run); `Qos`, `Consume` and `Cancel`
/// to the channel's methods of the same names.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TopologyOp {
    /// exchange.declare
    DeclareExchange(ExchangeDecl),
    /// exchange.delete
    DeleteExchange {
        /// Name.
        name: String,
    },
    /// queue.declare; answers with the queue's real name.
    DeclareQueue(QueueDecl),
    /// queue.delete
    DeleteQueue {
        /// Name.
        name: String,
    },
    /// queue.bind
    BindQueue {
        /// Queue name.
        queue: String,
        /// Exchange name.
        exchange: String,
        /// Binding key.
        routing_key: String,
        /// Binding arguments.
        arguments: FieldTable,
    },
    /// queue.unbind
    UnbindQueue {
        /// Queue name.
        queue: String,
        /// Exchange name.
        exchange: String,
        /// Binding key.
        routing_key: String,
        /// Binding arguments.
        arguments: FieldTable,
    },
    /// exchange.bind
    BindExchange {
        /// Receiving exchange.
        destination: String,
        /// Sending exchange.
        source: String,
        /// Binding key.
        routing_key: String,
        /// Binding arguments.
        arguments: FieldTable,
    },
    /// exchange.unbind
    UnbindExchange {
        /// Receiving exchange.
        destination: String,
        /// Sending exchange.
        source: String,
        /// Binding key.
        routing_key: String,
        /// Binding arguments.
        arguments: FieldTable,
    },
    /// basic.qos (per consumer, `global = false`).
    Qos {
        /// Prefetch count; 0 = unlimited.
        prefetch_count: u16,
    },
    /// basic.consume
    Consume {
        /// Queue name.
        queue: String,
        /// Consumer tag (the client always picks it, so it survives recovery).
        consumer_tag: String,
        /// Options.
        options: ConsumeOptions,
    },
    /// basic.cancel
    Cancel {
        /// Consumer tag.
        consumer_tag: String,
    },
}

impl TopologyOp {
    /// What a transport answers, from [`Channel::run`](crate::transport::Channel::run),
    /// to an op that is not a declare, delete, bind or unbind, or that it does not
    /// know.
    pub fn unsupported(&self) -> crate::error::TransportError {
        crate::error::TransportError::Protocol(format!(
            "not a declare, delete, bind or unbind: {self:?}"
        ))
    }
}

/// A stable handle to a declared queue. For a server-named queue the name changes
/// on every recovery; the handle does not. See
/// [`Supervisor::queue_name`](crate::Supervisor::queue_name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueHandle(pub(crate) u64);

/// A queue, by name or by the handle its declaration returned (which follows
/// renames of server-named queues).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QueueRef {
    /// A queue known by name (declared elsewhere, or a fixed name). Never
    /// `""`: in AMQP that names the queue declared last on the channel, and
    /// the client picks the channel, so requests naming `""` fail with
    /// `Invalid` (a server-named queue is reached by its handle).
    Named(String),
    /// A queue declared through this client.
    Handle(QueueHandle),
}

impl From<QueueHandle> for QueueRef {
    fn from(handle: QueueHandle) -> Self {
        QueueRef::Handle(handle)
    }
}

impl From<&str> for QueueRef {
    fn from(name: &str) -> Self {
        QueueRef::Named(name.to_string())
    }
}

impl From<String> for QueueRef {
    fn from(name: String) -> Self {
        QueueRef::Named(name)
    }
}

/// `client.consume(&name, ..)` with a `String` name, as `publish(.., &name, ..)`
/// takes it.
impl From<&String> for QueueRef {
    fn from(name: &String) -> Self {
        QueueRef::Named(name.clone())
    }
}

/// Identifies a consumer across recoveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub(crate) u64);

/// Identifies a topology operation the application asked for, until its
/// [`Event::TopologyResolved`](crate::Event::TopologyResolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub(crate) u64);

/// Why a topology operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// Refused before anything was sent: a bad name or argument.
    #[error("invalid topology request: {0}")]
    Invalid(String),
    /// The queue handle is not (or no longer) known to this client.
    #[error("unknown queue handle {0:?}")]
    UnknownQueue(QueueHandle),
    /// The broker refused it (e.g. 406 for a redeclare with other flags).
    #[error("the broker refused it: {code} {text}")]
    Broker {
        /// AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The transport failed it without a broker reply (the channel broke, or the
    /// client library refused the frame).
    #[error("the transport failed it: {0}")]
    Transport(crate::error::TransportError),
    /// No channel became ready before the deadline.
    #[error("no channel became ready in time")]
    TimedOut,
    /// No channel became ready before the deadline, and the client has never had
    /// a Ready connection: the last error of its dials.
    #[error("no connection was ever made before the deadline: {0}")]
    Unreachable(crate::error::TransportError),
    /// The client is closed.
    #[error("the client is closed")]
    Closed,
}

/// Why a consumer could not start or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// Another live consumer of this client has that tag.
    #[error("consumer tag {0:?} is already in use")]
    DuplicateTag(String),
    /// A bad tag or queue name.
    #[error("invalid consume request: {0}")]
    Invalid(String),
    /// The queue handle is not known to this client.
    #[error("unknown queue handle {0:?}")]
    UnknownQueue(QueueHandle),
    /// The broker cancelled the consumer and its queue is not in this client's
    /// topology, so there is nothing to re-subscribe to.
    #[error("the broker cancelled the consumer")]
    CancelledByBroker,
    /// The broker refused basic.consume (404: no such queue, 403: access
    /// refused, 405: exclusive queue of another connection): at the first try,
    /// or on every re-subscription in a row after a recovery until the client
    /// gave up.
    #[error("the broker refused the consumer: {code} {text}")]
    Broker {
        /// AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The transport failed basic.consume without a broker reply.
    #[error("the transport failed basic.consume: {0}")]
    Transport(crate::error::TransportError),
    /// No broker answer to the first basic.consume within the publish timeout
    /// (no channel came up); the consumer is not kept.
    #[error("no answer to basic.consume before the deadline")]
    TimedOut,
    /// The client is closed.
    #[error("the client is closed")]
    Closed,
}

/// Why an ack, nack or reject was refused. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The delivery came on a channel generation that is gone; the broker will
    /// redeliver the message. Sending its tag on the new channel would close it
    /// with 406 PRECONDITION_FAILED.
    #[error("stale delivery: its channel was recovered since; the broker redelivers it")]
    Stale,
    /// No unacknowledged delivery with that tag on the channel (already acked, or
    /// from a no-ack consumer).
    #[error("unknown delivery tag {0}")]
    UnknownTag(u64),
    /// The client is closed.
    #[error("the client is closed")]
    Closed,
}

/// What to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// basic.ack
    Ack {
        /// Also every earlier unacknowledged delivery of the channel.
        multiple: bool,
    },
    /// basic.nack
    Nack {
        /// Also every earlier unacknowledged delivery of the channel.
        multiple: bool,
        /// Put it back in the queue (otherwise drop or dead-letter it).
        requeue: bool,
    },
    /// basic.reject
    Reject {
        /// Put it back in the queue.
        requeue: bool,
    },
}

/// An entity of the registry, replayed on recovery.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entity {
    Exchange(ExchangeDecl),
    Queue {
        handle: QueueHandle,
        decl: QueueDecl,
        /// The real name; for a server-named queue, the latest one the broker gave.
        name: String,
        /// Exclusive and server-named queues live on one connection slot.
        owner: Option<usize>,
    },
    QueueBinding {
        queue: QueueRef,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    },
    ExchangeBinding {
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
    },
}

impl Entity {
    /// The exchange a binding routes from (`None` for a queue or an exchange).
    pub(crate) fn binding_source(&self) -> Option<&str> {
        match self {
            Entity::QueueBinding { exchange, .. } => Some(exchange),
            Entity::ExchangeBinding { source, .. } => Some(source),
            Entity::Exchange(_) | Entity::Queue { .. } => None,
        }
    }
}

/// A topology request of the application, with queue references still unresolved.
#[derive(Debug, Clone)]
pub(crate) enum UserOp {
    DeclareExchange(ExchangeDecl),
    DeleteExchange(String),
    DeclareQueue(QueueHandle, QueueDecl),
    DeleteQueue(QueueRef),
    BindQueue {
        queue: QueueRef,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
        bind: bool,
    },
    BindExchange {
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
        bind: bool,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct ConsumerEntry {
    pub(crate) tag: String,
    pub(crate) queue: QueueRef,
    pub(crate) options: ConsumeOptions,
    /// The channel slot it lives on, once its queue's name (and owner) is known.
    pub(crate) conn: Option<usize>,
    pub(crate) chan: Option<usize>,
    /// The queue name its last basic.consume went to.
    pub(crate) subscribed: Option<String>,
    /// Whether a basic.consume of it ever succeeded: until then the caller of
    /// `consume` waits for the first outcome.
    pub(crate) started: bool,
    /// basic.consume refusals in a row since it last succeeded.
    pub(crate) refusals: u8,
    /// Since when the broker has refused it as "in exclusive use" (the dead
    /// connection it replaces still holds it), while that lasts.
    pub(crate) exclusive_since: Option<Instant>,
    /// When a consumer the broker refused as "in exclusive use" is tried again:
    /// until then its channel replays without it.
    pub(crate) retry_at: Option<Instant>,
}

/// Declared topology in declaration order, and the consumers.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Keyed by a growing id: iteration order is declaration order.
    pub(crate) entities: std::collections::BTreeMap<u64, Entity>,
    next_entity: u64,
    next_handle: u64,
    pub(crate) consumers: std::collections::BTreeMap<u64, ConsumerEntry>,
    pub(crate) tags: std::collections::HashMap<String, u64>,
    next_consumer: u64,
    /// Queues being re-declared after the broker cancelled their consumers, with
    /// the consumers to re-subscribe once the declaration is back: one
    /// re-declaration per queue, however many of its consumers were cancelled.
    /// (consumer, whether it is still subscribed to the old queue and must be
    /// cancelled there first)
    pub(crate) redeclaring: std::collections::BTreeMap<u64, Vec<(u64, bool)>>,
    /// A fixed-name queue declared again: the later declaration's handle, and
    /// the handle of the entry it shares.
    aliases: std::collections::HashMap<QueueHandle, QueueHandle>,
    /// Handles of auto-delete queues the broker deleted with their last
    /// consumer (see [`Registry::forget_auto_delete_queue`]), with the queue's
    /// name: no longer replayed, they still name the queue in a request (a
    /// delete of it, say), which the broker then answers. At most
    /// [`RETIRED_KEPT`], the oldest forgotten first (`retired_order`).
    retired: std::collections::HashMap<QueueHandle, String>,
    /// The retired handles, in the order they were forgotten.
    retired_order: std::collections::VecDeque<QueueHandle>,
    /// Fixed-name queues whose declaration the broker refused to replay again
    /// and again (another application declared the queue again with other
    /// arguments, say): no longer declared by a replay, they still name the
    /// queue the broker has, for their bindings and consumers. A declaration
    /// the broker takes again (the application's, or one after a cancel)
    /// brings it back into the replay.
    pub(crate) undeclared: std::collections::BTreeSet<u64>,
}

/// How many retired handles a registry keeps.
const RETIRED_KEPT: usize = 1024;

/// Longest AMQP short string.
const MAX_NAME: usize = 255;

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME {
        return Err(format!(
            "{what} is {} bytes long; AMQP allows {MAX_NAME}",
            name.len()
        ));
    }
    Ok(())
}

impl Registry {
    pub(crate) fn new_handle(&mut self) -> QueueHandle {
        self.next_handle += 1;
        QueueHandle(self.next_handle)
    }

    pub(crate) fn new_consumer_id(&mut self) -> u64 {
        self.next_consumer += 1;
        self.next_consumer
    }

    /// The handle of the declaration `handle` repeated (a fixed-name queue
    /// declared again keeps one entry; the later handles name it too).
    fn primary(&self, handle: QueueHandle) -> QueueHandle {
        self.aliases.get(&handle).copied().unwrap_or(handle)
    }

    fn queue_entity(&self, handle: QueueHandle) -> Option<(u64, &Entity)> {
        let handle = self.primary(handle);
        self.entities
            .iter()
            .find(|(_, e)| matches!(e, Entity::Queue { handle: h, .. } if *h == handle))
            .map(|(id, e)| (*id, e))
    }

    pub(crate) fn has_handle(&self, handle: QueueHandle) -> bool {
        self.queue_entity(handle).is_some() || self.retired.contains_key(&handle)
    }

    /// `queue` as the registry keeps references: a server-named queue of this
    /// client given by its current name becomes that queue's handle (a binding
    /// or a consumer of it then follows its renames; by the old name, its
    /// replay would be refused, as that queue is gone), and the handle of a
    /// repeated declaration becomes the first one's.
    pub(crate) fn canonical(&self, queue: &QueueRef) -> QueueRef {
        let n = match queue {
            QueueRef::Handle(h) => {
                return match self.retired.get(h) {
                    Some(name) => QueueRef::Named(name.clone()),
                    None => QueueRef::Handle(self.primary(*h)),
                };
            }
            QueueRef::Named(n) => n,
        };
        self.entities
            .values()
            .find_map(|e| match e {
                Entity::Queue {
                    handle, decl, name, ..
                } if decl.is_server_named() && !n.is_empty() && name == n => {
                    Some(QueueRef::Handle(*handle))
                }
                _ => None,
            })
            .unwrap_or_else(|| queue.clone())
    }

    /// The name to send for a queue reference right now.
    pub(crate) fn resolve(&self, queue: &QueueRef) -> Option<String> {
        match queue {
            QueueRef::Named(name) => Some(name.clone()),
            QueueRef::Handle(handle) => match self.queue_entity(*handle)? {
                (_, Entity::Queue { name, .. }) => Some(name.clone()),
                _ => None,
            },
        }
    }

    /// [`resolve`](Self::resolve), or the name of a queue forgotten since a
    /// request named it by handle (a request queued before the forgetting).
    fn resolve_or_retired(&self, queue: &QueueRef) -> Option<String> {
        self.resolve(queue).or_else(|| match queue {
            QueueRef::Handle(h) => self.retired.get(h).cloned(),
            QueueRef::Named(_) => None,
        })
    }

    /// The connection slot a queue is tied to (exclusive or server-named), if any.
    pub(crate) fn owner(&self, queue: &QueueRef) -> Option<usize> {
        self.entities.values().find_map(|e| match (e, queue) {
            (Entity::Queue { handle, owner, .. }, QueueRef::Handle(h))
                if *handle == self.primary(*h) =>
            {
                *owner
            }
            (Entity::Queue { name, owner, .. }, QueueRef::Named(n)) if name == n => *owner,
            _ => None,
        })
    }

    /// Entity ids of the queue bindings that name queue entity `queue`.
    pub(crate) fn bindings_of(&self, queue: u64) -> Vec<u64> {
        self.entities
            .iter()
            .filter(|(_, e)| {
                matches!(e, Entity::QueueBinding { queue: q, .. }
                    if self.queue_entity_id(q) == Some(queue))
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether entity `id` is a server-named queue.
    pub(crate) fn is_server_named_queue(&self, id: u64) -> bool {
        matches!(self.entities.get(&id), Some(Entity::Queue { decl, .. }) if decl.is_server_named())
    }

    /// Whether entity `id` is an auto-delete queue.
    pub(crate) fn is_auto_delete_queue(&self, id: u64) -> bool {
        matches!(self.entities.get(&id), Some(Entity::Queue { decl, .. }) if decl.auto_delete)
    }

    /// The registry's declaration of a queue, if it has one.
    pub(crate) fn queue_entity_id(&self, queue: &QueueRef) -> Option<u64> {
        self.entities.iter().find_map(|(id, e)| match (e, queue) {
            (Entity::Queue { handle, .. }, QueueRef::Handle(h)) if *handle == self.primary(*h) => {
                Some(*id)
            }
            (Entity::Queue { name, .. }, QueueRef::Named(n)) if name == n => Some(*id),
            _ => None,
        })
    }

    /// Ids of the entities to replay on a new epoch of connection slot `conn`, in
    /// declaration order. Queues tied to another slot, and their bindings, are left
    /// to that slot.
    pub(crate) fn replay_plan(&self, conn: usize) -> Vec<u64> {
        self.entities
            .iter()
            .filter(|(id, _)| !self.undeclared.contains(id))
            .filter(|(_, e)| match e {
                Entity::Queue { owner, .. } => owner.is_none_or(|o| o == conn),
                Entity::QueueBinding { queue, .. } => self.owner(queue).is_none_or(|o| o == conn),
                Entity::Exchange(_) | Entity::ExchangeBinding { .. } => true,
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The operation that replays entity `id`, names resolved now.
    pub(crate) fn replay_op(&self, id: u64) -> Option<TopologyOp> {
        Some(match self.entities.get(&id)? {
            Entity::Exchange(decl) => TopologyOp::DeclareExchange(decl.clone()),
            Entity::Queue { decl, .. } => {
                // A server-named queue is declared with "" again: the broker refuses
                // a client-chosen amq.gen-* name.
                TopologyOp::DeclareQueue(decl.clone())
            }
            Entity::QueueBinding {
                queue,
                exchange,
                routing_key,
                arguments,
            } => TopologyOp::BindQueue {
                queue: self.resolve(queue)?,
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                arguments: arguments.clone(),
            },
            Entity::ExchangeBinding {
                destination,
                source,
                routing_key,
                arguments,
            } => TopologyOp::BindExchange {
                destination: destination.clone(),
                source: source.clone(),
                routing_key: routing_key.clone(),
                arguments: arguments.clone(),
            },
        })
    }

    /// Records the new name of a replayed queue; returns `(old, new)` on a rename.
    pub(crate) fn renamed(&mut self, id: u64, new_name: &str) -> Option<(QueueHandle, String)> {
        if let Some(Entity::Queue { handle, name, .. }) = self.entities.get_mut(&id)
            && name != new_name
        {
            let old = std::mem::replace(name, new_name.to_string());
            return Some((*handle, old));
        }
        None
    }

    /// The operation for a user request, names resolved now.
    pub(crate) fn user_op(&self, op: &UserOp) -> Result<TopologyOp, TopologyError> {
        let resolve = |q: &QueueRef| {
            self.resolve_or_retired(q).ok_or(match q {
                QueueRef::Handle(h) => TopologyError::UnknownQueue(*h),
                QueueRef::Named(_) => TopologyError::Invalid("unknown queue".into()),
            })
        };
        Ok(match op {
            UserOp::DeclareExchange(decl) => TopologyOp::DeclareExchange(decl.clone()),
            UserOp::DeleteExchange(name) => TopologyOp::DeleteExchange { name: name.clone() },
            UserOp::DeclareQueue(_, decl) => TopologyOp::DeclareQueue(decl.clone()),
            UserOp::DeleteQueue(queue) => TopologyOp::DeleteQueue {
                name: resolve(queue)?,
            },
            UserOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
                bind,
            } => {
                let queue = resolve(queue)?;
                let (exchange, routing_key, arguments) =
                    (exchange.clone(), routing_key.clone(), arguments.clone());
                if *bind {
                    TopologyOp::BindQueue {
                        queue,
                        exchange,
                        routing_key,
                        arguments,
                    }
                } else {
                    TopologyOp::UnbindQueue {
                        queue,
                        exchange,
                        routing_key,
                        arguments,
                    }
                }
            }
            UserOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
                bind,
            } => {
                let (destination, source, routing_key, arguments) = (
                    destination.clone(),
                    source.clone(),
                    routing_key.clone(),
                    arguments.clone(),
                );
                if *bind {
                    TopologyOp::BindExchange {
                        destination,
                        source,
                        routing_key,
                        arguments,
                    }
                } else {
                    TopologyOp::UnbindExchange {
                        destination,
                        source,
                        routing_key,
                        arguments,
                    }
                }
            }
        })
    }

    /// Applies a user request the broker accepted. `name` is the real queue name for
    /// a queue declaration; `conn` the slot it ran on.
    ///
    /// An auto-delete exchange that loses its last binding as a source (an
    /// unbind, or the delete of a queue or exchange bound to it) is deleted by
    /// the broker: it is forgotten too, not declared again at the next recovery.
    pub(crate) fn apply(&mut self, op: &UserOp, name: Option<&str>, conn: usize) {
        let unbinds = match op {
            UserOp::DeleteQueue(_) | UserOp::DeleteExchange(_) => true,
            UserOp::BindQueue { bind, .. } | UserOp::BindExchange { bind, .. } => !bind,
            _ => false,
        };
        if let UserOp::DeclareQueue(_, decl) = op {
            // the broker took this declaration: it is replayed again
            let declared = name.unwrap_or(&decl.name);
            let entities = &self.entities;
            self.undeclared.retain(|id| {
                !matches!(entities.get(id), Some(Entity::Queue { name: n, .. }) if n == declared)
            });
        }
        if !unbinds {
            return self.apply_one(op, name, conn);
        }
        let before = self.binding_sources();
        self.apply_one(op, name, conn);
        self.forget_unbound_auto_delete(before);
    }

    /// Forgets an auto-delete queue whose last consumer the application
    /// cancelled (the broker deletes it then), with its bindings, and the
    /// auto-delete exchanges that leaves without a binding.
    pub(crate) fn forget_auto_delete_queue(&mut self, queue: &QueueRef) {
        let auto_delete = self.queue_entity_id(queue).is_some_and(|id| {
            matches!(self.entities.get(&id), Some(Entity::Queue { decl, .. }) if decl.auto_delete)
        });
        let target = self.resolve(queue);
        let consumed = self
            .consumers
            .values()
            .any(|k| self.resolve(&k.queue) == target);
        let Some(target) = target.filter(|_| auto_delete && !consumed) else {
            return;
        };
        let primaries = self.handles_named(&target);
        let aliases = self
            .aliases
            .iter()
            .filter(|(_, primary)| primaries.contains(primary))
            .map(|(alias, _)| *alias);
        let handles: Vec<QueueHandle> = primaries.iter().copied().chain(aliases).collect();
        self.apply(&UserOp::DeleteQueue(queue.clone()), None, 0);
        for handle in handles {
            if self.retired.insert(handle, target.clone()).is_none() {
                self.retired_order.push_back(handle);
            }
        }
        while self.retired.len() > RETIRED_KEPT
            && let Some(oldest) = self.retired_order.pop_front()
        {
            self.retired.remove(&oldest);
        }
    }

    /// The handles of the queue entries whose real name is `name`.
    fn handles_named(&self, name: &str) -> Vec<QueueHandle> {
        self.entities
            .values()
            .filter_map(|e| match e {
                Entity::Queue {
                    handle, name: n, ..
                } if n == name => Some(*handle),
                _ => None,
            })
            .collect()
    }

    /// How many bindings each exchange is the source of.
    pub(crate) fn binding_sources(&self) -> BTreeMap<String, usize> {
        let mut sources = BTreeMap::new();
        for source in self.entities.values().filter_map(Entity::binding_source) {
            *sources.entry(source.to_owned()).or_insert(0) += 1;
        }
        sources
    }

    /// Forgets each auto-delete exchange that was a binding's source in
    /// `before` and is none now, and so on for what forgetting it unbinds.
    fn forget_unbound_auto_delete(&mut self, mut before: BTreeMap<String, usize>) {
        loop {
            let now = self.binding_sources();
            let unbound: Vec<String> = before
                .keys()
                .filter(|source| !now.contains_key(*source))
                .filter(|source| {
                    self.entities.values().any(
                        |e| matches!(e, Entity::Exchange(d) if d.name == **source && d.auto_delete),
                    )
                })
                .cloned()
                .collect();
            if unbound.is_empty() {
                return;
            }
            for name in unbound {
                self.apply_one(&UserOp::DeleteExchange(name), None, 0);
            }
            before = now;
        }
    }

    /// The entities a delete removes: the queue or exchange itself and the
    /// bindings to or from it; the binding an unbind removes (none for any
    /// other request).
    pub(crate) fn removed_by(&self, op: &UserOp) -> Vec<u64> {
        let removes: Box<dyn Fn(&Entity) -> bool + '_> = match op {
            UserOp::DeleteExchange(name) => Box::new(move |e| match e {
                Entity::Exchange(d) => d.name == *name,
                Entity::QueueBinding { exchange, .. } => exchange == name,
                Entity::ExchangeBinding {
                    destination,
                    source,
                    ..
                } => destination == name || source == name,
                Entity::Queue { .. } => false,
            }),
            UserOp::DeleteQueue(queue) => {
                let Some(target) = self.resolve_or_retired(queue) else {
                    return Vec::new();
                };
                // every handle that currently names the deleted queue
                let handles = self.handles_named(&target);
                Box::new(move |e| match e {
                    Entity::Queue { handle, .. } => handles.contains(handle),
                    Entity::QueueBinding {
                        queue: QueueRef::Named(n),
                        ..
                    } => *n == target,
                    Entity::QueueBinding {
                        queue: QueueRef::Handle(h),
                        ..
                    } => handles.contains(self.aliases.get(h).unwrap_or(h)),
                    _ => false,
                })
            }
            // an unbind removes the binding it names
            UserOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
                bind: false,
            } => {
                return self.same_bindings(&Entity::QueueBinding {
                    queue: queue.clone(),
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                });
            }
            UserOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
                bind: false,
            } => {
                return self.same_bindings(&Entity::ExchangeBinding {
                    destination: destination.clone(),
                    source: source.clone(),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                });
            }
            _ => return Vec::new(),
        };
        self.entities
            .iter()
            .filter(|(_, e)| removes(e))
            .map(|(id, _)| *id)
            .collect()
    }

    fn apply_one(&mut self, op: &UserOp, name: Option<&str>, conn: usize) {
        match op {
            UserOp::DeclareExchange(decl) => {
                // declared again: the broker took this declaration, so it is the
                // one to replay (the first may name an exchange deleted since)
                match self.entities.values_mut().find_map(|e| match e {
                    Entity::Exchange(d) if d.name == decl.name => Some(d),
                    _ => None,
                }) {
                    Some(existing) => *existing = decl.clone(),
                    None => self.push(Entity::Exchange(decl.clone())),
                }
            }
            UserOp::DeleteExchange(_) => {
                for id in self.removed_by(op) {
                    self.entities.remove(&id);
                }
            }
            UserOp::DeclareQueue(handle, decl) => {
                let name = name.unwrap_or(&decl.name).to_string();
                let tied = decl.exclusive || decl.is_server_named();
                // a fixed-name queue declared twice keeps one entry
                let existing = if decl.is_server_named() {
                    None
                } else {
                    self.entities.values().find_map(|e| match e {
                        Entity::Queue {
                            handle: h, name: n, ..
                        } if *n == name => Some(*h),
                        _ => None,
                    })
                };
                if let Some(primary) = existing {
                    // the later handle names the same entry, which replays the
                    // declaration the broker took last
                    if primary != *handle {
                        self.aliases.insert(*handle, primary);
                    }
                    for entity in self.entities.values_mut() {
                        if let Entity::Queue {
                            handle: h,
                            decl: d,
                            owner,
                            ..
                        } = entity
                            && *h == primary
                        {
                            *d = decl.clone();
                            *owner = tied.then_some(conn);
                        }
                    }
                } else {
                    self.push(Entity::Queue {
                        handle: *handle,
                        decl: decl.clone(),
                        name,
                        owner: tied.then_some(conn),
                    });
                }
            }
            UserOp::DeleteQueue(queue) => {
                let Some(target) = self.resolve_or_retired(queue) else {
                    return;
                };
                // every handle that currently names the deleted queue
                let handles = self.handles_named(&target);
                for id in self.removed_by(op) {
                    self.entities.remove(&id);
                }
                self.retired.retain(|_, name| *name != target);
                let retired = &self.retired;
                self.retired_order.retain(|h| retired.contains_key(h));
                self.aliases.retain(|alias, primary| {
                    !handles.contains(primary) && !handles.contains(alias)
                });
            }
            UserOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
                bind,
            } => {
                let entity = Entity::QueueBinding {
                    queue: queue.clone(),
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                };
                self.bind_or_unbind(entity, *bind);
            }
            UserOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
                bind,
            } => {
                let entity = Entity::ExchangeBinding {
                    destination: destination.clone(),
                    source: source.clone(),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                };
                self.bind_or_unbind(entity, *bind);
            }
        }
    }

    /// Ids of the bindings that are `entity`: the same exchange(s), key and
    /// arguments, and for a queue binding the same queue whether it is named
    /// by handle or by name. The queues' names are looked up in a map made
    /// once per call, so this stays linear in the entities even when many
    /// bindings share the exchange, key and arguments (a fanout's).
    fn same_bindings(&self, entity: &Entity) -> Vec<u64> {
        let target = match entity {
            Entity::QueueBinding { queue, .. } => Some(self.resolve(queue)),
            _ => None,
        };
        // `resolve` of every handle, without a scan of the registry for each:
        // made at the first binding that matches on the rest
        let names = std::cell::OnceCell::new();
        let names = || {
            names.get_or_init(|| {
                let mut names = std::collections::HashMap::new();
                for e in self.entities.values() {
                    if let Entity::Queue { handle, name, .. } = e {
                        names.entry(*handle).or_insert(name.as_str());
                    }
                }
                names
            })
        };
        fn resolve<'a>(
            names: &std::collections::HashMap<QueueHandle, &'a str>,
            registry: &Registry,
            queue: &'a QueueRef,
        ) -> Option<&'a str> {
            match queue {
                QueueRef::Named(name) => Some(name.as_str()),
                QueueRef::Handle(handle) => names.get(&registry.primary(*handle)).copied(),
            }
        }
        self.entities
            .iter()
            .filter(|(_, e)| match (e, entity, &target) {
                (
                    Entity::QueueBinding {
                        queue: q1,
                        exchange: x1,
                        routing_key: k1,
                        arguments: a1,
                    },
                    Entity::QueueBinding {
                        queue: q2,
                        exchange: x2,
                        routing_key: k2,
                        arguments: a2,
                    },
                    Some(target),
                ) => {
                    x1 == x2
                        && k1 == k2
                        && a1 == a2
                        && (q1 == q2 || resolve(names(), self, q1) == target.as_deref())
                }
                _ => *e == entity,
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn bind_or_unbind(&mut self, entity: Entity, bind: bool) {
        let same = self.same_bindings(&entity);
        if bind {
            if same.is_empty() {
                self.push(entity);
            }
        } else {
            for id in same {
                self.entities.remove(&id);
            }
        }
    }

    fn push(&mut self, entity: Entity) {
        self.next_entity += 1;
        self.entities.insert(self.next_entity, entity);
    }
}
