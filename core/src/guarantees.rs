//! # What each outcome guarantees
//!
//! This page says exactly what the broker may hold after each way a publish,
//! an ack or a close can end, where duplicates come from and how to remove
//! them, and what RabbitMQ itself may drop whatever the client does.
//!
//! ## The short version
//!
//! - **At-least-once.** A message whose [`PublishFuture`] resolved
//!   [`Confirmed`] is in the broker: the broker took responsibility for it. The
//!   client never loses a message it accepted while it keeps trying: after a
//!   connection or channel loss it re-publishes every message the broker had
//!   not confirmed. So the broker may hold **duplicates**, never fewer.
//! - **Accepted means owed.** A message is accepted when [`Client::publish`]
//!   returns (it does not wait; dropping the future does not withdraw the
//!   message). [`Client::close`] and dropping the last [`Client`] keep
//!   publishing what was accepted until the close timeout, as long as the
//!   client's [`Driver`](crate::Driver) runs: a runtime that shuts down (`main`
//!   returning from `#[tokio::main]`) drops it, and what was not yet sent is
//!   lost. Await [`Client::close`] before the runtime ends.
//! - **Deduplicate by `message_id`** on the consumer side if duplicates matter
//!   (recipe below).
//!
//! ## Every outcome of a publish
//!
//! | Outcome | What happened | What the broker may hold |
//! |---|---|---|
//! | `Ok(`[`Confirmed`]`)` | The broker acked it (publisher confirm). | The message, once or more (more if it was re-sent after a loss: see duplicates). |
//! | `Ok(`[`Returned`]`)` | A `mandatory` message no queue took: returned, then acked. The return carries no sequence number: it goes to the in-flight message with its exchange, routing key and payload (then properties), so messages of one key routed apart (a headers exchange) each get their own answer; of two byte-identical messages, the older is marked. | Nothing routed it: no queue holds it. |
//! | `Err(`[`Nacked`]`)` | The broker nacked it (an internal error, or a queue with `x-overflow: reject-publish` that is full). | Usually nothing; RabbitMQ does not promise either way for an internal error. With [`ClientBuilder::retry_nacked`] the client re-publishes instead, after a pause that grows as the backoff does (50 ms doubling to 2 s with the defaults). |
//! | `Err(`[`TimedOut`]`)` | No confirm by its deadline (default 30 s). It is never sent again. | Nothing if it was never sent (it waited in the outbox through an outage or a blocked connection). **If it was in flight at its deadline, the broker may have it**: only its confirm was late. |
//! | `Err(`[`Unreachable`]`)` | As `TimedOut`, on a client that never had a Ready connection; carries the last dial error. | Nothing: no connection was ever made. |
//! | `Err(`[`Rejected`]`)` | The broker closed the channel for this message (404: its exchange does not exist; 406: its size or `user_id`). | Nothing. |
//! | `Err(`[`Invalid`]`)` | Refused at the call (a property past 255 bytes, a header the transport cannot encode, a payload above a limit the broker told). | Nothing: it was never sent. |
//! | `Err(`[`Backpressure`]`)` | The outbox was full and the caller asked not to wait. | Nothing: never accepted. |
//! | `Err(`[`Closed`]`)` | The publish came after a close, or the close's drain ran out of time, or [`Client::close_discarding`] discarded it. | Nothing if it was never sent; if it was in flight, the broker may have it. |
//!
//! ## Where duplicates come from
//!
//! A message is *in flight* from the moment it is written to a channel until
//! its confirm arrives. When the connection or channel dies in between, the
//! client cannot know whether the broker stored it, so it publishes it again
//! on the next Ready channel. Each loss therefore duplicates at most the
//! messages in flight at that moment: at most `confirm_window` per channel
//! (default 1,024), usually far fewer (those sent in the last round trip).
//! Re-sends per loss never exceed the messages in flight at the loss, on both
//! transports. BENCHMARKS.md gives the measured duplicates per
//! `close_all_connections` under load.
//!
//! Consumers see duplicates from a second source: a delivery that was not acked
//! when its channel died is redelivered by the broker (with `redelivered`
//! set), even if the application had processed it.
//!
//! ## A deduplication recipe
//!
//! Give every message a unique `message_id` when it is created (not when it is
//! sent: a re-sent message keeps its id), and let the consumer remember the ids
//! it has processed for longer than a message can take to be re-sent (the
//! publish timeout, 30 s by default, plus the consumer's own backlog):
//!
//! ```
//! use std::collections::{HashSet, VecDeque};
//! use amqp_rebound_core::Properties;
//!
//! // publisher side: the id travels with every re-send
//! let props = Properties::default().persistent().with_message_id("order-42-v1");
//!
//! // consumer side: a bounded memory of processed ids
//! struct Seen { ids: HashSet<String>, order: VecDeque<String>, cap: usize }
//! impl Seen {
//!     /// true the first time an id is seen
//!     fn first(&mut self, id: &str) -> bool {
//!         if self.ids.contains(id) { return false; }
//!         if self.order.len() == self.cap {
//!             if let Some(old) = self.order.pop_front() { self.ids.remove(&old); }
//!         }
//!         self.ids.insert(id.to_owned());
//!         self.order.push_back(id.to_owned());
//!         true
//!     }
//! }
//! let mut seen = Seen { ids: HashSet::new(), order: VecDeque::new(), cap: 100_000 };
//! assert!(seen.first(props.message_id.as_deref().unwrap()));
//! assert!(!seen.first("order-42-v1"), "the re-sent copy is skipped");
//! ```
//!
//! Ack a duplicate like any other delivery. Where the processing writes to a
//! database, the strongest form is a unique constraint on the message id in the
//! same transaction as the effect.
//!
//! ## Acks across recovery
//!
//! [`Received::ack`] returning `Ok` means the ack was handed to the transport on
//! the delivery's own channel, not that the broker received it: if the
//! connection dies right after, the broker redelivers the message. An ack for a
//! delivery whose channel was recovered since returns [`AckError::Stale`] and is
//! never sent (its tag would close the new channel with 406); the broker
//! redelivers that message too. Either way the consumer sees it again: process
//! idempotently (the recipe above).
//!
//! A channel is recovered not only with its connection: the broker closes a
//! channel for any command on it that it refuses, and AMQP 0-9-1 has no
//! refusal that leaves the channel open. So a `consume` the broker refuses (a
//! missing queue, one another connection holds exclusively), a publish to a
//! missing exchange, or a replay step refused after a reconnect costs the other
//! consumers of that channel their unacknowledged deliveries (their acks return
//! [`AckError::Stale`], the broker redelivers them), and the channel's
//! unconfirmed publishes are sent again. An exclusive consumer refused as "in
//! exclusive use" after a reconnect is retried for up to
//! [`EXCLUSIVE_USE_GRACE`] (the previous connection's hold may still be
//! there), and each retry does the same, about fifteen times in the three
//! minutes if another application took the queue for good; watch for
//! [`Event::ReplayFailed`] to see it.
//!
//! ## Closing
//!
//! - [`Client::close`]: nothing new is accepted; every message accepted before
//!   the call is published and its confirm awaited, across recoveries, until the
//!   close timeout ([`ClientBuilder::close_timeout`], default 5 s). Then the
//!   connections close cleanly (acks already queued go out first). What is
//!   still unresolved resolves `Closed`; [`CloseSummary::unresolved`] counts it.
//! - [`Client::close_discarding`]: closes without draining. **Messages not yet
//!   sent are lost** (they resolve `Closed` at the call); those in flight keep
//!   their channel until their confirms come (up to the close timeout), then the
//!   connections close.
//! - Dropping the last [`Client`] handle: the driver drains like `close` within
//!   the close timeout, then ends; no task of the client outlives it.
//! - Dropping the driver (its runtime shutting down, say, when `main` returns
//!   from `#[tokio::main]` right after the last handle is dropped): nothing
//!   drains. What was not confirmed resolves `Closed` at once: if it was in
//!   flight the broker may have it; if it was not yet sent, it is lost. A WARN
//!   of target `amqp_rebound::client` counts them (`unresolved`).
//! - [`Client::flush`]: waits until every message accepted before it resolved
//!   and reports how many of them (since the client was built, those failed
//!   before the call included) did not resolve `Confirmed`, without closing.
//!
//! ## Blocked connections
//!
//! While the broker blocks a connection (a memory or disk alarm), nothing new is
//! published on it: messages wait in the outbox (the publisher waits when it is
//! full) and resolve `TimedOut` at their deadline if the alarm outlasts it. Over
//! amqprs the client cannot see the block (see [`Client::reports_blocked`]):
//! publishes are written and wait for their confirms instead; the outcome is the
//! same.
//!
//! ## What RabbitMQ itself may drop
//!
//! A confirm means the broker took responsibility *as configured*. With these
//! settings it can still lose a confirmed message:
//!
//! | The broker drops | When | Prevent it with |
//! |---|---|---|
//! | An unroutable message | No queue is bound for its routing key: the broker confirms it and discards it. | `mandatory` ([`Message::mandatory`]): it resolves [`Returned`] instead of `Confirmed`. |
//! | Transient messages | A broker restart (messages with delivery mode 1, or in a non-durable queue). | Durable queues ([`QueueDecl::durable`](crate::QueueDecl::durable)) and persistent messages ([`Properties::persistent`]). |
//! | A classic queue's messages | The node holding a classic (non-replicated) queue is lost. | Quorum queues (`x-queue-type: quorum`). |
//! | Messages past a limit | `x-max-length` / `x-max-length-bytes` drop the oldest by default; `x-message-ttl` / `expiration` expire them. | `x-overflow: reject-publish` (new publishes are nacked: `Nacked`), or limits sized for the backlog. |
//!
//! [`PublishFuture`]: crate::PublishFuture
//! [`Confirmed`]: crate::Confirmation::Confirmed
//! [`Returned`]: crate::Confirmation::Returned
//! [`Nacked`]: crate::PublishError::Nacked
//! [`TimedOut`]: crate::PublishError::TimedOut
//! [`Unreachable`]: crate::PublishError::Unreachable
//! [`Rejected`]: crate::PublishError::Rejected
//! [`Invalid`]: crate::PublishError::Invalid
//! [`Backpressure`]: crate::PublishError::Backpressure
//! [`Closed`]: crate::PublishError::Closed
//! [`Client`]: crate::Client
//! [`Client::publish`]: crate::Client::publish
//! [`Client::close`]: crate::Client::close
//! [`Client::close_discarding`]: crate::Client::close_discarding
//! [`Client::flush`]: crate::Client::flush
//! [`Client::reports_blocked`]: crate::Client::reports_blocked
//! [`ClientBuilder::retry_nacked`]: crate::ClientBuilder::retry_nacked
//! [`ClientBuilder::close_timeout`]: crate::ClientBuilder::close_timeout
//! [`CloseSummary::unresolved`]: crate::CloseSummary::unresolved
//! [`Received::ack`]: crate::Received::ack
//! [`AckError::Stale`]: crate::AckError::Stale
//! [`EXCLUSIVE_USE_GRACE`]: crate::supervisor::EXCLUSIVE_USE_GRACE
//! [`Event::ReplayFailed`]: crate::Event::ReplayFailed
//! [`Message::mandatory`]: crate::Message::mandatory
//! [`Properties::persistent`]: crate::Properties::persistent
