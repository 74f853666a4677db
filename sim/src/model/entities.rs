//! Exchanges, queues and bindings: declaring, deleting, binding.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use amqp_rebound_core::error::reply_code;
use amqp_rebound_core::message::{FieldTable, Properties};
use amqp_rebound_core::topology::{ExchangeDecl, ExchangeKind, QueueDecl, TopologyOp};
use amqp_rebound_core::transport::{ChannelEvent, QueueInfo, TopologyOutcome};
use bytes::Bytes;

use super::{
    Down, DropCause, Fail, State, channel_fail, count_u32, locked, not_found_exchange,
    not_found_queue, random_suffix, reply, reply_code_command_invalid,
};

/// A message held by the broker (ready in a queue or delivered and unacked).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The broker's number for the publish; every queue copy of one publish shares
    /// it.
    pub id: u64,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: Properties,
    /// Its body.
    pub payload: Bytes,
    /// It was delivered before and came back.
    pub redelivered: bool,
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BindingDestination {
    /// A queue.
    Queue(String),
    /// An exchange (exchange-to-exchange binding).
    Exchange(String),
}

pub(super) struct Exchange {
    pub(super) kind: ExchangeKind,
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    pub(super) internal: bool,
    pub(super) arguments: FieldTable,
    pub(super) builtin: bool,
    pub(super) had_binding: bool,
}

pub(super) struct Queue {
    pub(super) id: u64,
    pub(super) durable: bool,
    pub(super) owner: Option<u64>,
    pub(super) auto_delete: bool,
    pub(super) arguments: FieldTable,
    pub(super) ready: VecDeque<StoredMessage>,
    /// Consumers in registration order, for round-robin.
    pub(super) consumers: Vec<(u64, String)>,
    pub(super) next_consumer: usize,
    pub(super) had_consumer: bool,
}

#[derive(Clone, PartialEq)]
pub(super) struct Binding {
    pub(super) source: String,
    pub(super) destination: BindingDestination,
    pub(super) routing_key: String,
    pub(super) arguments: FieldTable,
}

pub(super) const BUILTIN_EXCHANGES: [(&str, ExchangeKind); 6] = [
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// Every exchange, queue and binding: what `exchange.*`, `queue.*` and routing
/// read and change.
pub(super) struct Entities {
    pub(super) exchanges: BTreeMap<String, Exchange>,
    pub(super) queues: BTreeMap<String, Queue>,
    pub(super) bindings: Vec<Binding>,
    /// Tells a queue from an earlier one of the same name (unacked messages and
    /// consumers remember it).
    pub(super) next_queue_id: u64,
}

impl Entities {
    pub(super) fn with_builtin_exchanges() -> Entities {
        let mut entities = Entities {
            exchanges: BTreeMap::new(),
            queues: BTreeMap::new(),
            bindings: Vec::new(),
            next_queue_id: 1,
        };
        for (name, kind) in BUILTIN_EXCHANGES {
            entities.exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                    builtin: true,
                    had_binding: false,
                },
            );
        }
        entities
    }

    // ---- exchanges -------------------------------------------------------------

    pub(super) fn declare_exchange(&mut self, decl: &ExchangeDecl) -> Result<(), Fail> {
        let name = &decl.name;
        if name.is_empty() || name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        if let ExchangeKind::Custom(kind) = &decl.kind {
            return Err(Fail::Connection(reply(
                reply_code_command_invalid(),
                format!("COMMAND_INVALID - unknown exchange type '{kind}'"),
            )));
        }
        if let Some(existing) = self.exchanges.get(name) {
            let mismatch = if existing.kind != decl.kind {
                Some((
                    "type",
                    existing.kind.as_str().to_owned(),
                    decl.kind.as_str().to_owned(),
                ))
            } else if existing.durable != decl.durable {
                Some((
                    "durable",
                    existing.durable.to_string(),
                    decl.durable.to_string(),
                ))
            } else if existing.auto_delete != decl.auto_delete {
                Some((
                    "auto_delete",
                    existing.auto_delete.to_string(),
                    decl.auto_delete.to_string(),
                ))
            } else if existing.internal != decl.internal {
                Some((
                    "internal",
                    existing.internal.to_string(),
                    decl.internal.to_string(),
                ))
            } else if existing.arguments != decl.arguments {
                Some(("arguments", "...".to_owned(), "...".to_owned()))
            } else {
                None
            };
            return match mismatch {
                None => Ok(()),
                Some((arg, current, received)) => Err(channel_fail(
                    reply_code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{name}' in \
                         vhost '/': received '{received}' but current is '{current}'"
                    ),
                )),
            };
        }
        self.exchanges.insert(
            name.clone(),
            Exchange {
                kind: decl.kind.clone(),
                durable: decl.durable,
                auto_delete: decl.auto_delete,
                internal: decl.internal,
                arguments: decl.arguments.clone(),
                builtin: false,
                had_binding: false,
            },
        );
        Ok(())
    }

    pub(super) fn delete_exchange(&mut self, name: &str) -> Result<(), Fail> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!("ACCESS_REFUSED - operation not permitted on exchange '{name}'"),
            ));
        }
        if self.exchanges.remove(name).is_none() {
            return Ok(());
        }
        let mut sources = BTreeSet::new();
        self.bindings.retain(|b| {
            let involved =
                b.source == name || b.destination == BindingDestination::Exchange(name.to_owned());
            if involved && b.source != name {
                sources.insert(b.source.clone());
            }
            !involved
        });
        for source in sources {
            self.maybe_auto_delete_exchange(&source);
        }
        Ok(())
    }

    pub(super) fn maybe_auto_delete_exchange(&mut self, name: &str) {
        let Some(ex) = self.exchanges.get(name) else {
            return;
        };
        if ex.builtin || !ex.auto_delete || !ex.had_binding {
            return;
        }
        if self.bindings.iter().any(|b| b.source == name) {
            return;
        }
        let _ = self.delete_exchange(name);
    }

    // ---- queues ----------------------------------------------------------------

    /// Declares a queue; true if it is new.
    pub(super) fn declare_queue(
        &mut self,
        conn_id: u64,
        decl: &QueueDecl,
        rng: &mut fastrand::Rng,
    ) -> Result<(QueueInfo, bool), Fail> {
        let name = if decl.name.is_empty() {
            loop {
                let candidate = format!("amq.gen-{}", random_suffix(rng));
                if !self.queues.contains_key(&candidate) {
                    break candidate;
                }
            }
        } else if decl.name.starts_with("amq.") {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - queue name '{}' contains reserved prefix 'amq.*'",
                    decl.name
                ),
            ));
        } else {
            decl.name.clone()
        };
        let owner = decl.exclusive.then_some(conn_id);
        if let Some(q) = self.queues.get(&name) {
            if q.owner != owner {
                return Err(locked(&name));
            }
            let mismatch = if q.durable != decl.durable {
                Some(("durable", q.durable.to_string(), decl.durable.to_string()))
            } else if q.auto_delete != decl.auto_delete {
                Some((
                    "auto_delete",
                    q.auto_delete.to_string(),
                    decl.auto_delete.to_string(),
                ))
            } else if q.arguments != decl.arguments {
                Some(("arguments", "...".to_owned(), "...".to_owned()))
            } else {
                None
            };
            if let Some((arg, current, received)) = mismatch {
                return Err(channel_fail(
                    reply_code::PRECONDITION_FAILED,
                    format!(
                        "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{name}' in \
                         vhost '/': received '{received}' but current is '{current}'"
                    ),
                ));
            }
            let info = QueueInfo {
                name: name.clone(),
                message_count: count_u32(q.ready.len()),
                consumer_count: count_u32(q.consumers.len()),
            };
            return Ok((info, false));
        }
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        self.queues.insert(
            name.clone(),
            Queue {
                id,
                durable: decl.durable,
                owner,
                auto_delete: decl.auto_delete,
                arguments: decl.arguments.clone(),
                ready: VecDeque::new(),
                consumers: Vec::new(),
                next_consumer: 0,
                had_consumer: false,
            },
        );
        let info = QueueInfo {
            name,
            message_count: 0,
            consumer_count: 0,
        };
        Ok((info, true))
    }

    /// Removes every binding to `destination`; exchanges left without bindings
    /// auto-delete.
    pub(super) fn unbind_all_to(&mut self, destination: &BindingDestination) {
        let mut sources = BTreeSet::new();
        self.bindings.retain(|b| {
            let involved = b.destination == *destination;
            if involved {
                sources.insert(b.source.clone());
            }
            !involved
        });
        for source in sources {
            self.maybe_auto_delete_exchange(&source);
        }
    }

    // ---- bindings --------------------------------------------------------------

    pub(super) fn check_queue_binding(
        &self,
        conn_id: u64,
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: FieldTable,
    ) -> Result<Binding, Fail> {
        if exchange.is_empty() {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            ));
        }
        let Some(q) = self.queues.get(&queue) else {
            return Err(not_found_queue(&queue));
        };
        if !self.exchanges.contains_key(&exchange) {
            return Err(not_found_exchange(&exchange));
        }
        if q.owner.is_some_and(|o| o != conn_id) {
            return Err(locked(&queue));
        }
        Ok(Binding {
            source: exchange,
            destination: BindingDestination::Queue(queue),
            routing_key,
            arguments,
        })
    }

    pub(super) fn check_exchange_binding(
        &self,
        destination: String,
        source: String,
        routing_key: String,
        arguments: FieldTable,
    ) -> Result<Binding, Fail> {
        if destination.is_empty() || source.is_empty() {
            return Err(channel_fail(
                reply_code::ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
            ));
        }
        for name in [&destination, &source] {
            if !self.exchanges.contains_key(name) {
                return Err(not_found_exchange(name));
            }
        }
        Ok(Binding {
            source,
            destination: BindingDestination::Exchange(destination),
            routing_key,
            arguments,
        })
    }

    pub(super) fn add_binding(&mut self, binding: Binding) {
        if let Some(ex) = self.exchanges.get_mut(&binding.source) {
            ex.had_binding = true;
        }
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
    }

    pub(super) fn remove_binding(&mut self, binding: &Binding) {
        let before = self.bindings.len();
        self.bindings.retain(|b| b != binding);
        if self.bindings.len() != before {
            self.maybe_auto_delete_exchange(&binding.source);
        }
    }
}

impl State {
    /// A declare, delete, bind or unbind from a client on `conn_id`.
    pub(super) fn run_topology(
        &mut self,
        conn_id: u64,
        op: TopologyOp,
    ) -> Result<TopologyOutcome, Fail> {
        match op {
            TopologyOp::DeclareExchange(decl) => self.entities.declare_exchange(&decl)?,
            TopologyOp::DeleteExchange { name } => self.entities.delete_exchange(&name)?,
            TopologyOp::DeclareQueue(decl) => {
                return self
                    .declare_queue(conn_id, &decl)
                    .map(TopologyOutcome::Queue);
            }
            TopologyOp::DeleteQueue { name } => {
                return self
                    .delete_queue(conn_id, &name)
                    .map(|message_count| TopologyOutcome::QueueDeleted { message_count });
            }
            TopologyOp::BindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let binding = self.entities.check_queue_binding(
                    conn_id,
                    queue,
                    exchange,
                    routing_key,
                    arguments,
                )?;
                self.entities.add_binding(binding);
            }
            TopologyOp::UnbindQueue {
                queue,
                exchange,
                routing_key,
                arguments,
            } => {
                let binding = self.entities.check_queue_binding(
                    conn_id,
                    queue,
                    exchange,
                    routing_key,
                    arguments,
                )?;
                self.entities.remove_binding(&binding);
            }
            TopologyOp::BindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let binding = self.entities.check_exchange_binding(
                    destination,
                    source,
                    routing_key,
                    arguments,
                )?;
                self.entities.add_binding(binding);
            }
            TopologyOp::UnbindExchange {
                destination,
                source,
                routing_key,
                arguments,
            } => {
                let binding = self.entities.check_exchange_binding(
                    destination,
                    source,
                    routing_key,
                    arguments,
                )?;
                self.entities.remove_binding(&binding);
            }
            // basic.qos / consume / cancel have methods of their own: as a broker
            // would, treat one arriving here as a method out of place.
            _ => {
                return Err(Fail::Connection(reply(
                    reply_code_command_invalid(),
                    "COMMAND_INVALID - unexpected method",
                )));
            }
        }
        Ok(TopologyOutcome::Done)
    }

    fn declare_queue(&mut self, conn_id: u64, decl: &QueueDecl) -> Result<QueueInfo, Fail> {
        let (info, created) = self.entities.declare_queue(conn_id, decl, &mut self.rng)?;
        if created {
            self.log(|| format!("queue '{}' declared", info.name));
        }
        Ok(info)
    }

    pub(super) fn delete_queue(&mut self, conn_id: u64, name: &str) -> Result<u32, Fail> {
        match self.entities.queues.get(name) {
            None => Ok(0),
            Some(q) if q.owner.is_some_and(|o| o != conn_id) => Err(locked(name)),
            Some(_) => Ok(self.delete_queue_internal(name, DropCause::Delete)),
        }
    }

    /// Deletes a queue: its ready messages are dropped, its consumers get a
    /// `basic.cancel`, its bindings go. Returns how many ready messages it held.
    pub(super) fn delete_queue_internal(&mut self, name: &str, cause: DropCause) -> u32 {
        let Some(q) = self.entities.queues.remove(name) else {
            return 0;
        };
        let dropped = q.ready.len() as u64;
        for m in &q.ready {
            self.ledger.dropped(m.id, 1);
        }
        match cause {
            DropCause::Delete => self.stats.dropped_by_delete += dropped,
            DropCause::Restart => self.stats.dropped_by_restart += dropped,
        }
        for (chan_id, tag) in q.consumers {
            self.consumers.remove(&(chan_id, tag.clone()));
            let Some(chan) = self.chans.get_mut(&chan_id) else {
                continue;
            };
            chan.consumers.remove(&tag);
            if chan.broker_open {
                let conn = chan.conn;
                self.send_down(
                    conn,
                    Down::chan(
                        chan_id,
                        ChannelEvent::ConsumerCancelled { consumer_tag: tag },
                    ),
                );
            }
        }
        self.entities
            .unbind_all_to(&BindingDestination::Queue(name.to_owned()));
        self.dirty.remove(name);
        self.log(|| format!("queue '{name}' deleted ({dropped} ready messages dropped)"));
        count_u32(dropped as usize)
    }
}
