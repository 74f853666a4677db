//! The publish side of the supervisor: outbox placement, confirm windows,
//! confirms, returns, deadlines and requeue on loss.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Command, Supervisor};
use crate::error::{ErrorClass, TransportError};
use crate::event::Event;
use crate::ids::{ChannelId, ConnectionId};
use crate::message::{Message, Returned};
use crate::outbox::{Confirmation, Entry, FlushId, NO_REPLY, PublishError, PublishId};
use crate::state::ConnectionState;
use crate::telemetry::targets;
use crate::topology::check_name;

/// After this many channel-level errors while it was in flight, a message is taken
/// for the cause and resolves with the error instead of closing channels forever.
const MAX_STRIKES: u8 = 3;

/// Counters, depths and latency summaries for operators, from
/// [`Supervisor::stats`] (or [`Client::stats`](crate::Client::stats)).
///
/// The counters count from the client's start; with the `metrics` feature each
/// one is also the counter of the same name in [`telemetry`](crate::telemetry).
/// With the `serde` feature it serializes with these field names, durations
/// as seconds (`f64`) and absent ones as `null`:
///
/// ```
/// # #[cfg(feature = "serde")]
/// # fn f(client: amqp_rebound_core::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let stats = client.stats();
/// let json = serde_json::to_string(&stats)?;
/// // {"reconnects":0,...,"confirm_latency_p50":0.0012,...}
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Stats {
    /// Dials after the first one of each slot.
    pub reconnects: u64,
    /// Connections that came back after a loss.
    pub recoveries: u64,
    /// Publishes accepted into the outbox.
    pub published: u64,
    /// Publish commands emitted (first sends and re-sends).
    pub sent: u64,
    /// Publish commands for messages sent before (after a loss, or after a
    /// nack with [`ClientBuilder::retry_nacked`](crate::ClientBuilder::retry_nacked)).
    pub republished: u64,
    /// Publishes resolved as confirmed.
    pub confirmed: u64,
    /// Publishes resolved as returned (mandatory, unroutable).
    pub returned: u64,
    /// Publishes resolved as nacked.
    pub nacked: u64,
    /// Accepted publishes resolved as timed out (one whose deadline had
    /// already passed at the call is refused there, and not counted).
    pub timed_out: u64,
    /// Publishes resolved as rejected by a channel error.
    pub rejected: u64,
    /// Publishes resolved as closed.
    pub closed: u64,
    /// Deliveries handed to consumers.
    pub deliveries: u64,
    /// Acks refused as stale (never sent).
    pub stale_acks: u64,
    /// Topology replay steps that failed.
    pub replay_failures: u64,
    /// Messages in the outbox now (waiting and in flight).
    pub outbox_depth: usize,
    /// Messages in flight now (sent, awaiting a confirm).
    pub in_flight: usize,
    /// Median time from a publish's acceptance to the broker's ack or nack,
    /// over every confirm since the start (at most 1/8 above the true value);
    /// `None` before the first.
    #[cfg_attr(feature = "serde", serde(serialize_with = "seconds"))]
    pub confirm_latency_p50: Option<Duration>,
    /// The 99th percentile of the same.
    #[cfg_attr(feature = "serde", serde(serialize_with = "seconds"))]
    pub confirm_latency_p99: Option<Duration>,
    /// The stall of the last recovery: from the loss of a Ready connection to a
    /// channel of it Ready again; `None` before the first recovery.
    #[cfg_attr(feature = "serde", serde(serialize_with = "seconds"))]
    pub last_recovery_stall: Option<Duration>,
}

#[cfg(feature = "serde")]
fn seconds<S: serde::Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

impl Supervisor {
    /// Counters, current depths and latency summaries.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.outbox_depth = self.outbox.len();
        stats.in_flight = self.outbox.len() - self.outbox.pending_len() - self.outbox.waiting_len();
        stats.confirm_latency_p50 = self.confirm_latency.quantile(0.5);
        stats.confirm_latency_p99 = self.confirm_latency.quantile(0.99);
        stats.last_recovery_stall = self.last_stall;
        stats
    }

    /// Messages waiting for a channel (not in flight).
    pub fn outbox_pending(&self) -> usize {
        self.outbox.pending_len()
    }

    /// Accepts a message for publishing. It goes out on a Ready channel as soon as
    /// one has room in its confirm window, and resolves exactly once with
    /// [`Event::PublishResolved`]. `deadline` defaults to now + the publish timeout.
    ///
    /// Errors: [`PublishError::Closed`] once a close was asked for,
    /// [`PublishError::TimedOut`] for a deadline already passed,
    /// [`PublishError::Backpressure`] when the outbox holds its capacity of waiting
    /// messages, [`PublishError::Invalid`] for names AMQP cannot carry.
    pub fn publish(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        deadline: Option<Instant>,
    ) -> Result<PublishId, PublishError> {
        self.publish_replying(now, message, deadline, false, NO_REPLY)
    }

    /// [`publish`](Self::publish) for a caller that waits for room: when the
    /// outbox holds its capacity of waiting messages (or others already wait for
    /// room), the message is accepted all the same and enters the outbox, in
    /// order, as soon as there is room. Its deadline runs from now: past it, it
    /// resolves [`PublishError::TimedOut`] wherever it is. A close drains it like
    /// any accepted message; a close without draining resolves it
    /// [`PublishError::Closed`].
    pub fn publish_or_wait(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        deadline: Option<Instant>,
    ) -> Result<PublishId, PublishError> {
        self.publish_replying(now, message, deadline, true, NO_REPLY)
    }

    /// [`publish_or_wait`](Self::publish_or_wait) if `wait`, else
    /// [`publish`](Self::publish), for a publish whose reply is the driver's
    /// `reply` key: [`next_event`](Self::next_event) gives it back with the
    /// publish's resolution.
    pub(crate) fn publish_replying(
        &mut self,
        now: Instant,
        message: Arc<Message>,
        deadline: Option<Instant>,
        wait: bool,
        reply: u64,
    ) -> Result<PublishId, PublishError> {
        self.advance(now);
        if self.is_closing() {
            return Err(PublishError::Closed);
        }
        check_message(&message, self.frame_max, self.max_message_size)?;
        if deadline.unwrap_or_else(|| super::deadline_after(self.now, self.config.publish_timeout))
            <= self.now
        {
            return Err(PublishError::TimedOut);
        }
        let full = self.outbox.pending_len() >= self.config.outbox_capacity;
        if full && !wait {
            return Err(PublishError::Backpressure {
                capacity: self.config.outbox_capacity,
            });
        }
        // behind messages already waiting for room: it waits too, so that a
        // caller's messages keep their order
        let waits = full || self.outbox.waiting_len() > 0;
        let span = publish_span(&message);
        let id = self
            .outbox
            .push(message, deadline, self.now, reply, span, waits);
        self.stats.published += 1;
        self.pump();
        self.sync_metrics();
        Ok(id)
    }

    /// Asks to hear when every message accepted so far has resolved: an
    /// [`Event::Flushed`] with this id comes then (at once when none is
    /// unresolved), saying how many of them did not resolve Confirmed, those
    /// that had resolved before the call included.
    pub fn flush(&mut self, now: Instant) -> FlushId {
        self.advance(now);
        let id = FlushId(self.next_flush);
        self.next_flush += 1;
        let flush = Flush {
            id,
            before: self.outbox.next_order(),
            waiting: self.outbox.len(),
            // everything resolved so far was accepted before this call
            not_confirmed: self.not_confirmed,
        };
        if flush.waiting == 0 {
            self.events.push_back(flush.done());
        } else {
            self.flushes.push(flush);
        }
        id
    }

    /// A message accepted as `order` resolved: the flushes that wait for it count
    /// it, and those with nothing left to wait for are done.
    fn flush_count(&mut self, order: u64, confirmed: bool) {
        self.not_confirmed += u64::from(!confirmed);
        if self.flushes.is_empty() {
            return;
        }
        let events = &mut self.events;
        self.flushes.retain_mut(|f| {
            if order >= f.before {
                return true;
            }
            f.waiting -= 1;
            f.not_confirmed += u64::from(!confirmed);
            if f.waiting == 0 {
                events.push_back(f.done());
                return false;
            }
            true
        });
    }

    /// Sends waiting messages while some Ready channel has room.
    pub(super) fn pump(&mut self) {
        if self.closed {
            return;
        }
        let capacity = self.config.outbox_capacity;
        self.outbox.admit(capacity);
        if (!self.holds.is_empty() && self.held()) || !self.room {
            return;
        }
        loop {
            let Some(id) = self.outbox.peek_pending() else {
                if self.outbox.admit(capacity) == 0 {
                    return;
                }
                continue;
            };
            let Some((c, i)) = self.publish_channel() else {
                self.room = false;
                self.outbox.admit(capacity);
                return;
            };
            // peek_pending() gave an unresolved id: place() finds it
            let Some((message, sends)) = self.outbox.place(id) else {
                continue;
            };
            let ch = &mut self.conns[c].channels[i];
            ch.current.next_seq += 1;
            let (seq, generation) = (ch.current.next_seq, ch.generation);
            ch.current.in_flight.push_back((seq, id));
            self.stats.sent += 1;
            if sends > 1 {
                self.stats.republished += 1;
            }
            self.commands.push_back(Command::Publish {
                channel: ChannelId {
                    connection: ConnectionId(c as u16),
                    index: i as u16,
                },
                generation,
                seq,
                message,
            });
        }
    }

    /// The next Ready channel (round-robin) on an unblocked connection with room in
    /// its confirm window.
    fn publish_channel(&mut self) -> Option<(usize, usize)> {
        if self.ready_channels == 0 {
            return None;
        }
        let per = self.config.channels_per_connection;
        let total = self.conns.len() * per;
        let window = self.config.confirm_window;
        // walk (connection, channel) from the cursor without a division per step
        let (mut c, mut i) = (self.cursor / per, self.cursor % per);
        for _ in 0..total {
            let conn = &self.conns[c];
            let ch = &conn.channels[i];
            let found = conn.state.is_sendable()
                && conn.suspect_until.is_none()
                && ch.state.is_ready()
                && ch.current.in_flight.len() < window;
            let here = (c, i);
            i += 1;
            if i == per {
                i = 0;
                c += 1;
                if c == self.conns.len() {
                    c = 0;
                }
            }
            if found {
                self.cursor = c * per + i;
                return Some(here);
            }
        }
        None
    }

    pub(super) fn on_confirm(
        &mut self,
        channel: ChannelId,
        generation: u64,
        tag: u64,
        multiple: bool,
        ack: bool,
    ) {
        let Some((c, i)) = self.current_chan(channel, generation) else {
            return;
        };
        // A lost channel's messages went back to the outbox. A channel closed by
        // the client's close keeps its messages in flight until their confirms
        // come (or the close timeout passes): its connection is Closing.
        if !self.conns[c].channels[i].state.is_open()
            && !matches!(self.conns[c].state, ConnectionState::Closing { .. })
        {
            return;
        }
        let published = self.conns[c].channels[i].current.next_seq;
        if tag > published {
            // The transport confirmed a number this generation never published:
            // its count and ours disagree, and every later confirm would resolve
            // the wrong message. The channel goes; its messages are re-sent.
            let error = TransportError::Protocol(format!(
                "confirm for publish {tag}, but {published} were published on this channel"
            ));
            tracing::error!(target: targets::CHANNEL, %channel, generation, %error, "confirm out of sequence");
            if self.conns[c].state.is_ready() {
                self.channel_failed(c, i, error);
            }
            return;
        }
        let mut done = std::mem::take(&mut self.scratch);
        let in_flight = &mut self.conns[c].channels[i].current.in_flight;
        if multiple {
            while let Some(&(seq, id)) = in_flight.front() {
                if seq > tag {
                    break;
                }
                in_flight.pop_front();
                done.push(id);
            }
        } else if in_flight.front().is_some_and(|&(seq, _)| seq == tag) {
            // the usual case: confirms come in publish order
            if let Some((_, id)) = in_flight.pop_front() {
                done.push(id);
            }
        } else if let Ok(pos) = in_flight.binary_search_by_key(&tag, |&(seq, _)| seq)
            && let Some((_, id)) = in_flight.remove(pos)
        {
            done.push(id);
        }
        for &id in &done {
            self.confirmed(id, ack);
        }
        done.clear();
        self.scratch = done;
        // the freed window is on this channel: let the next pump look here first
        self.room = true;
        self.cursor = c * self.config.channels_per_connection + i;
        self.close_when_drained(c);
    }

    fn confirmed(&mut self, id: u64, ack: bool) {
        if !ack && self.config.retry_nacked && !self.closed {
            // sent again after a pause that grows by the backoff's multiplier
            // with each send, from its initial delay to its cap: a queue that
            // rejects publishes while full would otherwise get the message
            // back thousands of times a second
            let Some(entry) = self.outbox.get(id) else {
                return;
            };
            let (sends, order) = (entry.sends.max(1), entry.order);
            let backoff = &self.config.backoff;
            let factor = backoff.multiplier.max(1.0).powi(sends.min(64) as i32 - 1);
            let pause = Duration::try_from_secs_f64(backoff.initial.as_secs_f64() * factor)
                .unwrap_or(backoff.cap)
                .min(backoff.cap);
            if self.outbox.park(id) {
                self.nack_retries
                    .insert((super::deadline_after(self.now, pause), id, order));
            }
            return;
        }
        let Some(mut entry) = self.outbox.take(id) else {
            return; // already resolved (timed out while in flight)
        };
        let latency = self.outbox.age(&entry, self.now);
        self.confirm_latency.record(latency);
        self.metrics.confirm_latency(latency);
        self.flush_count(entry.order, ack && !entry.is_returned());
        let result = match (ack, entry.take_returned()) {
            (true, None) => {
                self.stats.confirmed += 1;
                Ok(Confirmation::Confirmed)
            }
            (true, Some((reply_code, reply_text))) => {
                self.stats.returned += 1;
                Ok(Confirmation::Returned {
                    reply_code,
                    reply_text,
                })
            }
            (false, _) => {
                self.stats.nacked += 1;
                Err(PublishError::Nacked)
            }
        };
        self.close_publish_span(&entry, result.as_ref());
        self.events.push_back(Event::PublishResolved {
            id: PublishId(id),
            result,
        });
    }

    /// basic.return comes before the ack of the same message and carries no
    /// sequence number: it belongs to an in-flight mandatory message of the
    /// channel not yet marked returned, with the same exchange and routing key,
    /// the oldest of those whose payload and properties match it best. The
    /// exchange and key alone do not tell: on a headers exchange (or with `CC`
    /// / `BCC` headers) messages with one key are routed apart, and the
    /// confirm of a routed one can come after the return of an unroutable one.
    /// The payload comes back as sent; the properties nearly so (a transport may
    /// turn a short-string header into a long string), so they only break ties.
    pub(super) fn on_returned(&mut self, channel: ChannelId, generation: u64, r: &Returned) {
        let Some((c, i)) = self.current_chan(channel, generation) else {
            return;
        };
        // (payload equal, properties equal), the oldest first among equals
        let mut best: Option<((bool, bool), u64)> = None;
        for &(_, id) in &self.conns[c].channels[i].current.in_flight {
            let Some(entry) = self.outbox.get(id) else {
                continue;
            };
            let message = &entry.message;
            if !message.mandatory
                || entry.is_returned()
                || message.exchange != r.exchange
                || message.routing_key != r.routing_key
            {
                continue;
            }
            let fit = (
                message.payload == r.payload,
                message.properties == r.properties,
            );
            if best.is_none_or(|(best_fit, _)| fit > best_fit) {
                best = Some((fit, id));
                if fit == (true, true) {
                    break;
                }
            }
        }
        if let Some((_, id)) = best
            && let Some(entry) = self.outbox.get_mut(id)
        {
            entry.set_returned(r.reply_code, r.reply_text.clone());
        }
    }

    pub(super) fn resolve_publish(&mut self, id: u64, error: PublishError) {
        let Some(entry) = self.outbox.take(id) else {
            return;
        };
        self.flush_count(entry.order, false);
        self.close_publish_span(&entry, Err(&error));
        match error {
            PublishError::TimedOut | PublishError::Unreachable(_) => self.stats.timed_out += 1,
            PublishError::Closed => self.stats.closed += 1,
            PublishError::Rejected { .. } => self.stats.rejected += 1,
            PublishError::Nacked => self.stats.nacked += 1,
            _ => {}
        }
        self.events.push_back(Event::PublishResolved {
            id: PublishId(id),
            result: Err(error),
        });
    }

    pub(super) fn expire_publishes(&mut self) {
        let mut any = false;
        for id in self.outbox.expired(self.now) {
            let error = match &self.first_error {
                Some(e) if !self.ever_ready => PublishError::Unreachable(e.clone()),
                _ => PublishError::TimedOut,
            };
            self.resolve_publish(id, error);
            any = true;
        }
        // a closing connection may have waited only for these
        if any && self.closed {
            for c in 0..self.conns.len() {
                self.close_when_drained(c);
            }
        }
    }

    /// The driver is gone before it ended (dropped with its runtime): every
    /// unresolved publish resolves [`PublishError::Closed`] here, as its
    /// future does, so that [`stats`](Self::stats) counts it (`closed`) and no
    /// longer shows it in the outbox or in flight. Returns how many.
    pub(crate) fn abandon_publishes(&mut self) -> u64 {
        self.nack_retries.clear();
        let ids = self.outbox.all_ids();
        let n = ids.len() as u64;
        for id in ids {
            self.resolve_publish(id, PublishError::Closed);
        }
        self.sync_metrics();
        n
    }

    /// Sends again the nacked messages whose pause is over.
    pub(super) fn retry_nacked_due(&mut self) {
        let mut any = false;
        while let Some(&(at, id, order)) = self.nack_retries.first() {
            if at > self.now {
                break;
            }
            self.nack_retries.pop_first();
            // resolved meanwhile (timed out), its slot maybe taken since
            if self.outbox.get(id).is_some_and(|e| e.order == order) {
                self.outbox.unpark(id);
                any = true;
            }
        }
        if any {
            self.pump();
        }
    }

    /// At close, messages not yet sent will never be: they resolve as Closed.
    pub(super) fn close_outbox_pending(&mut self) {
        // nacked and waiting to be sent again: their last answer stands
        for (_, id, order) in std::mem::take(&mut self.nack_retries) {
            if self.outbox.get(id).is_some_and(|e| e.order == order) {
                self.resolve_publish(id, PublishError::Nacked);
            }
        }
        for id in self.outbox.all_ids() {
            if self.outbox.get(id).is_some_and(|e| !e.is_placed()) {
                self.resolve_publish(id, PublishError::Closed);
            }
        }
    }

    /// The publishes a lost channel generation carried (`ids`, in publish order):
    /// they go back to the front of the outbox, or resolve when closing or when
    /// `culprit` (read from `error`) names them as the cause.
    pub(super) fn publishes_lost(
        &mut self,
        ids: Vec<u64>,
        error: Option<&TransportError>,
        culprit: Option<Culprit>,
    ) {
        if let Some(Culprit::Size { max, .. }) = culprit {
            self.max_message_size = Some(max);
        }
        if ids.is_empty() {
            return;
        }
        if self.closed {
            for id in ids {
                self.resolve_publish(id, PublishError::Closed);
            }
            return;
        }
        // only a broker reply can name a culprit or strike a message
        let reply = match error {
            Some(TransportError::Reply { code, text }) => Some((*code, text.as_str())),
            _ => None,
        };
        // 403 is a soft (channel) error too when it closes a channel: its class
        // says Refused because at the handshake it is a refused login
        let channel_level = error.is_some_and(|e| {
            e.class() == ErrorClass::ChannelLevel
                || matches!(e, TransportError::Reply { code: 403, .. })
        });
        let rejected = |(code, text): (u16, &str)| PublishError::Rejected {
            code,
            text: text.to_string(),
        };
        let mut back = Vec::with_capacity(ids.len());
        for id in ids {
            let guilty = culprit.as_ref().is_some_and(|x| self.is_culprit(id, x));
            match (guilty, reply) {
                (true, Some(r)) => self.resolve_publish(id, rejected(r)),
                _ => back.push(id),
            }
        }
        // a strike is for a refusal that names no culprit: one that does has
        // failed its culprits above, and the others were only in flight with it
        let strike = channel_level && culprit.is_none();
        self.outbox.requeue(back.clone(), strike);
        if let (true, Some(r)) = (strike, reply) {
            for id in back {
                if self
                    .outbox
                    .get(id)
                    .is_some_and(|entry| entry.strikes >= MAX_STRIKES)
                {
                    self.resolve_publish(id, rejected(r));
                }
            }
        }
        self.room = true;
    }
}

/// What a message must meet before it is accepted, whatever the connection:
/// names AMQP can carry, properties that fit in one frame of `frame_max`, and a
/// payload within the broker's size limit once a refusal told it. A client
/// runs these on the caller's thread as well when the driver takes its
/// publish, so a message that fails them fails at the call either way.
pub(crate) fn check_message(
    message: &Message,
    frame_max: u32,
    max_message_size: Option<usize>,
) -> Result<(), PublishError> {
    check_name("exchange name", &message.exchange).map_err(PublishError::Invalid)?;
    check_name("routing key", &message.routing_key).map_err(PublishError::Invalid)?;
    message
        .properties
        .check(frame_max)
        .map_err(PublishError::Invalid)?;
    if let Some(max) = max_message_size
        && message.payload.len() > max
    {
        return Err(PublishError::Invalid(format!(
            "the payload is {} bytes; the broker refuses messages above {max} bytes",
            message.payload.len()
        )));
    }
    Ok(())
}

/// A [`Supervisor::flush`] waiting for the messages accepted before it.
pub(super) struct Flush {
    id: FlushId,
    /// Messages whose order is below this were accepted before the flush.
    before: u64,
    /// How many of them are unresolved.
    waiting: usize,
    /// How many of them resolved other than Confirmed (those resolved before
    /// the flush included).
    not_confirmed: u64,
}

impl Flush {
    fn done(&self) -> Event {
        Event::Flushed {
            flush: self.id,
            not_confirmed: self.not_confirmed,
        }
    }
}

impl Supervisor {
    /// Records how a publish ended on its span (TRACE only), which closes.
    fn close_publish_span(&self, entry: &Entry, result: Result<&Confirmation, &PublishError>) {
        let Some(span) = entry.span() else {
            return;
        };
        let outcome = match result {
            Ok(Confirmation::Confirmed) => "confirmed",
            Ok(Confirmation::Returned { .. }) => "returned",
            Err(PublishError::Nacked) => "nacked",
            Err(PublishError::TimedOut | PublishError::Unreachable(_)) => "timed_out",
            Err(PublishError::Rejected { .. }) => "rejected",
            Err(PublishError::Closed) => "closed",
            Err(_) => "failed",
        };
        span.record("outcome", outcome);
        span.record("sends", entry.sends);
        span.record(
            "latency_ms",
            self.now
                .saturating_duration_since(self.outbox.accepted(entry))
                .as_secs_f64()
                * 1e3,
        );
    }

    pub(super) fn is_culprit(&self, id: u64, culprit: &Culprit) -> bool {
        let Some(entry) = self.outbox.get(id) else {
            return false;
        };
        let message = &entry.message;
        match culprit {
            Culprit::Exchange(x) => message.exchange == *x,
            Culprit::Size { size, .. } => message.payload.len() == *size,
            Culprit::UserId(user) => message.properties.user_id.as_deref() == Some(user),
        }
    }
}

/// What about a message a channel-closing refusal names, in RabbitMQ's texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Culprit {
    /// 404 "NOT_FOUND - no exchange 'x' in vhost '/'"; 403 "ACCESS_REFUSED -
    /// cannot publish to internal exchange 'x' in vhost '/'".
    Exchange(String),
    /// 406 "PRECONDITION_FAILED - message size 200 is larger than configured max
    /// size 100".
    Size { size: usize, max: usize },
    /// 406 "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated
    /// user was 'guest'".
    UserId(String),
}

impl Culprit {
    pub(super) fn of(error: &TransportError) -> Option<Culprit> {
        let TransportError::Reply { code, text } = error else {
            return None;
        };
        match code {
            404 => between(text, "no exchange '", "' in vhost").map(Culprit::Exchange),
            // only a publish draws this 403; "access to exchange 'x' ... refused"
            // may answer a declare or a bind as well (the strike rule takes it)
            403 => between(text, "internal exchange '", "' in vhost").map(Culprit::Exchange),
            406 => {
                if let Some(user) = between(text, "user_id property set to '", "' but") {
                    return Some(Culprit::UserId(user));
                }
                let size = between(text, "message size ", " is larger")?.parse().ok()?;
                let max = text
                    .rsplit("max size ")
                    .next()?
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()?;
                Some(Culprit::Size { size, max })
            }
            _ => None,
        }
    }
}

/// The span of one publish, from its acceptance to its resolution: only at
/// TRACE on the publish target (otherwise nothing is allocated or recorded).
fn publish_span(message: &Message) -> Option<tracing::Span> {
    let span = tracing::trace_span!(
        target: targets::PUBLISH,
        "publish",
        exchange = %message.exchange,
        routing_key = %message.routing_key,
        bytes = message.payload.len(),
        outcome = tracing::field::Empty,
        sends = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    (!span.is_disabled()).then_some(span)
}

/// The text between `start` and the next `end`.
fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(text[from..to].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> TransportError {
        TransportError::Reply {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn parses_rabbitmq_refusals_that_name_a_message() {
        let of = |code, text| Culprit::of(&reply(code, text));
        assert_eq!(
            of(404, "NOT_FOUND - no exchange 'orders-x' in vhost '/'"),
            Some(Culprit::Exchange("orders-x".into()))
        );
        assert_eq!(of(404, "NOT_FOUND - no queue 'q' in vhost '/'"), None);
        assert_eq!(
            of(
                403,
                "ACCESS_REFUSED - cannot publish to internal exchange 'inner' in vhost '/'"
            ),
            Some(Culprit::Exchange("inner".into()))
        );
        // the same text answers a declare or a bind: no culprit (strikes)
        assert_eq!(
            of(
                403,
                "ACCESS_REFUSED - access to exchange 'locked' in vhost '/' refused for user 'u'"
            ),
            None
        );
        assert_eq!(
            of(
                403,
                "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'"
            ),
            None
        );
        assert_eq!(
            of(
                406,
                "PRECONDITION_FAILED - message size 200000 is larger than configured max size 131072"
            ),
            Some(Culprit::Size {
                size: 200_000,
                max: 131_072
            })
        );
        assert_eq!(
            of(
                406,
                "PRECONDITION_FAILED - user_id property set to 'bob' but authenticated user was 'guest'"
            ),
            Some(Culprit::UserId("bob".into()))
        );
        assert_eq!(
            of(406, "PRECONDITION_FAILED - unknown delivery tag 7"),
            None
        );
        assert_eq!(Culprit::of(&TransportError::Timeout), None);
    }
}
