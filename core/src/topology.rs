//! Topology: exchanges, queues, bindings and consumers, as declared by the
//! application and replayed after every recovery.

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
    /// Deleted when its last binding goes.
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
    /// Deleted when its last consumer goes.
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
    /// basic.consume). `None`: no limit.
    pub prefetch: Option<u16>,
    /// Extra arguments (`x-priority`, ...).
    pub arguments: FieldTable,
}

/// One topology operation with resolved names: what a transport executes.
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
