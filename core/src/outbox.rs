//! The outbox: every publish from the moment it is accepted until it resolves.
//!
//! A publish waits in `pending` (FIFO) until a Ready channel with room in its
//! confirm window takes it; then it is *in flight* on (channel, generation, seq)
//! until the broker confirms it. When a channel or connection is lost, its
//! in-flight messages go back to the front of `pending`, in their original order,
//! and are published again after recovery: at-least-once, never lost.
//!
//! The supervisor owns the channel side (windows, seq numbers); this module owns the
//! messages, their deadlines and the exactly-once resolution.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slotmap::{Key, KeyData, SlotMap};

use crate::message::Message;

/// Identifies one publish from [`Supervisor::publish`](crate::Supervisor::publish)
/// until its [`Event::PublishResolved`](crate::Event::PublishResolved).
///
/// Opaque: ids are unique among unresolved publishes, but they do not count up
/// (their order is not the publish order). A resolved publish's id can come back
/// for a later publish only after its slot has been reused 2^31 times (slot
/// versions are 32-bit and wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishId(pub(crate) u64);

/// Identifies one [`Supervisor::flush`](crate::Supervisor::flush) until its
/// [`Event::Flushed`](crate::Event::Flushed). Opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlushId(pub(crate) u64);

/// How a publish ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Confirmation {
    /// The broker took responsibility for the message (publisher confirm ack).
    Confirmed,
    /// A mandatory message no queue took: the broker returned it, then confirmed.
    Returned {
        /// Usually 312 NO_ROUTE.
        reply_code: u16,
        /// The broker's reason.
        reply_text: String,
    },
}

/// Why a publish did not end with a confirmation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker nacked it (internal error in the broker; the message may be lost).
    #[error("the broker nacked the message")]
    Nacked,
    /// Its deadline passed before a confirm. It is never sent again after that;
    /// but a message that was in flight at its deadline may have reached the
    /// broker (its confirm was what was late), so the queue may hold it.
    #[error("no confirm before the publish deadline")]
    TimedOut,
    /// The client was closed before a confirm: the publish came after the close,
    /// or the close's drain ran out of time (or [`Client::close_discarding`]
    /// discarded it). A message that was in flight may have reached the broker.
    ///
    /// [`Client::close_discarding`]: crate::Client::close_discarding
    #[error("the client is closed")]
    Closed,
    /// The outbox is full and the caller asked not to wait.
    #[error("the outbox is full ({capacity} messages waiting)")]
    Backpressure {
        /// The configured outbox capacity.
        capacity: usize,
    },
    /// The broker refused it with a channel error, e.g. 404 for a missing exchange.
    #[error("the broker refused the message: {code} {text}")]
    Rejected {
        /// AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// Its deadline passed and the client has never had a Ready connection: the
    /// last error of its dials (bad credentials, unknown vhost, refused,
    /// unreachable, TLS). Like [`TimedOut`](Self::TimedOut) otherwise: nothing was
    /// sent.
    #[error("no connection was ever made before the publish deadline: {0}")]
    Unreachable(crate::error::TransportError),
    /// The message can never be published (e.g. a name longer than 255 bytes).
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// The reply key of a publish that has none (a key of the driver's is never 0:
/// slot 0 of a slot map is its sentinel).
pub(crate) const NO_REPLY: u64 = 0;

/// Where an unresolved message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In `pending`, waiting for a channel.
    Pending,
    /// Accepted while the outbox was full: it enters `pending` when there is room.
    Waiting,
    /// Sent, awaiting its confirm.
    InFlight,
}

/// What few messages carry, out of the entry every message has: a deadline the
/// caller chose, a return, a span (TRACE only).
#[derive(Default)]
struct Rare {
    /// The caller's deadline (a default one is worked out from `accepted`).
    deadline: Option<Instant>,
    /// Set by basic.return: resolve as Returned when the ack comes.
    returned: Option<(u16, String)>,
    /// Its `publish` span, at TRACE only.
    span: Option<tracing::Span>,
}

pub(crate) struct Entry {
    /// Its place in publish order (ids do not tell it).
    pub(crate) order: u64,
    pub(crate) message: Arc<Message>,
    /// When it was accepted, in nanoseconds after the outbox's epoch. A time
    /// the supervisor's clock never gives (before the epoch, or 584 years
    /// after it) is stored as the epoch; such a message's deadline is kept as
    /// a caller's, so only its age is measured from the epoch.
    accepted: u64,
    /// The publisher's reply, as the driver keys it (0: none).
    pub(crate) reply: u64,
    rare: Option<Box<Rare>>,
    /// Times it went out.
    pub(crate) sends: u32,
    /// Channel-level errors suffered while in flight; past a limit the message is
    /// the likely culprit and resolves with the error instead of looping.
    pub(crate) strikes: u8,
    place: Place,
}

impl Entry {
    /// Sent and awaiting its confirm.
    pub(crate) fn is_placed(&self) -> bool {
        self.place == Place::InFlight
    }

    /// A basic.return came for it since it was last sent.
    pub(crate) fn is_returned(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.returned.is_some())
    }

    pub(crate) fn set_returned(&mut self, code: u16, text: String) {
        self.rare.get_or_insert_default().returned = Some((code, text));
    }

    pub(crate) fn take_returned(&mut self) -> Option<(u16, String)> {
        self.rare.as_mut()?.returned.take()
    }

    /// Its `publish` span, at TRACE only.
    pub(crate) fn span(&self) -> Option<&tracing::Span> {
        self.rare.as_ref()?.span.as_ref()
    }

    fn custom_deadline(&self) -> Option<Instant> {
        self.rare.as_ref()?.deadline
    }
}

/// A slot of the outbox.
enum Stored {
    Live(Entry),
    /// Resolved, its `PublishResolved` event not polled yet; the reply it had.
    Resolved {
        reply: u64,
    },
}

impl Stored {
    fn live(&self) -> Option<&Entry> {
        match self {
            Stored::Live(entry) => Some(entry),
            Stored::Resolved { .. } => None,
        }
    }

    fn live_mut(&mut self) -> Option<&mut Entry> {
        match self {
            Stored::Live(entry) => Some(entry),
            Stored::Resolved { .. } => None,
        }
    }

    fn reply(&self) -> u64 {
        match self {
            Stored::Live(entry) => entry.reply,
            Stored::Resolved { reply } => *reply,
        }
    }
}

slotmap::new_key_type! {
    /// Where an entry is stored; a [`PublishId`] is its FFI form. Slots are
    /// reused (the last one freed first, so the storage stays as small as the
    /// outbox and warm in the cache), and a reused slot has a new version, so an
    /// id that was resolved does not find the entry that took its place (until
    /// the 32-bit version wraps, 2^31 reuses of one slot later).
    ///
    /// A resolved entry keeps its slot (with its reply's key only) until its
    /// `PublishResolved` event is polled: whoever keys something by the id (the
    /// driver, its reply) sees the resolution before the slot can carry a new id.
    pub(crate) struct Slot;
}

impl PublishId {
    fn of(slot: Slot) -> PublishId {
        PublishId(slot.data().as_ffi())
    }
}

fn slot(id: u64) -> Slot {
    Slot::from(KeyData::from_ffi(id))
}

/// Publishes waiting or in flight.
pub(crate) struct Outbox {
    entries: SlotMap<Slot, Stored>,
    live: usize,
    /// Ids waiting for a channel, oldest first; ids already resolved are skipped.
    pending: VecDeque<u64>,
    pending_live: usize,
    /// Accepted over capacity (the caller waits for room), oldest first.
    waiting: VecDeque<u64>,
    waiting_live: usize,
    /// Ids of publishes that took the default timeout, oldest first: their
    /// deadlines (worked out from when each was accepted) come in that order, so
    /// a FIFO replaces a sorted set on the hot path. Resolved ids are skipped
    /// lazily; the front one is always unresolved.
    default_deadlines: VecDeque<u64>,
    /// The deadline of the front of `default_deadlines` (read on every
    /// input, so kept here rather than worked out from its entry each time).
    front_deadline: Option<Instant>,
    /// When the newest of `default_deadlines` was accepted (ns after `epoch`).
    last_default: u64,
    /// Deadlines the caller chose, in any order.
    custom_deadlines: BTreeSet<(Instant, u64)>,
    next_order: u64,
    /// The default publish timeout.
    timeout: Duration,
    /// What entries' acceptance times count from.
    epoch: Instant,
    /// `epoch` + `timeout`: a default deadline is this + the acceptance time.
    deadline_base: Option<Instant>,
    /// The last time converted by `since_epoch`, and what it gave: the
    /// supervisor's clock is read once per batch of inputs, so the next
    /// conversion is usually of the same time.
    clock: (Instant, Option<u64>),
}

impl Outbox {
    /// An empty outbox whose default deadline is `timeout` after acceptance;
    /// nothing it is given is accepted before `now`.
    pub(crate) fn new(now: Instant, timeout: Duration) -> Outbox {
        Outbox {
            entries: SlotMap::with_key(),
            live: 0,
            pending: VecDeque::new(),
            pending_live: 0,
            waiting: VecDeque::new(),
            waiting_live: 0,
            default_deadlines: VecDeque::new(),
            front_deadline: None,
            last_default: 0,
            custom_deadlines: BTreeSet::new(),
            next_order: 0,
            timeout,
            epoch: now,
            deadline_base: now.checked_add(timeout),
            clock: (now, Some(0)),
        }
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending_live
    }

    /// Messages accepted while the outbox was full, not yet in `pending`.
    pub(crate) fn waiting_len(&self) -> usize {
        self.waiting_live
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The order number the next accepted message gets: every live entry's
    /// order is below it.
    pub(crate) fn next_order(&self) -> u64 {
        self.next_order
    }

    /// `at` as nanoseconds after the epoch; `None` before the epoch or 584
    /// years after it.
    fn since_epoch(&mut self, at: Instant) -> Option<u64> {
        if at != self.clock.0 {
            let since = at
                .checked_duration_since(self.epoch)
                .and_then(|d| u64::try_from(d.as_nanos()).ok());
            self.clock = (at, since);
        }
        self.clock.1
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or(self.epoch)
    }

    /// When `entry` was accepted.
    pub(crate) fn accepted(&self, entry: &Entry) -> Instant {
        self.instant(entry.accepted)
    }

    /// How long before `now` `entry` was accepted.
    pub(crate) fn age(&mut self, entry: &Entry, now: Instant) -> Duration {
        match self.since_epoch(now) {
            Some(since) => Duration::from_nanos(since.saturating_sub(entry.accepted)),
            None => now.saturating_duration_since(self.accepted(entry)),
        }
    }

    /// The default deadline of a message accepted `accepted` ns after the
    /// epoch: the timeout after its acceptance.
    fn default_deadline(&self, accepted: u64) -> Instant {
        self.deadline_base
            .and_then(|base| base.checked_add(Duration::from_nanos(accepted)))
            .unwrap_or_else(|| {
                crate::supervisor::deadline_after(self.instant(accepted), self.timeout)
            })
    }

    /// `entry`'s deadline.
    fn deadline(&self, entry: &Entry) -> Instant {
        match entry.custom_deadline() {
            Some(at) => at,
            None => self.default_deadline(entry.accepted),
        }
    }

    /// Sets `front_deadline` from the front of `default_deadlines`, dropping
    /// resolved ids from it.
    fn new_front(&mut self) {
        while let Some(&front) = self.default_deadlines.front() {
            if let Some(entry) = self.get(front) {
                self.front_deadline = Some(self.default_deadline(entry.accepted));
                return;
            }
            self.default_deadlines.pop_front();
        }
        self.front_deadline = None;
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let default = self.front_deadline;
        let custom = self.custom_deadlines.first().map(|(at, _)| *at);
        match (default, custom) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Accepts a message at the back of the queue, accepted at `accepted`,
    /// with `deadline`, or with the default one (the outbox's timeout after
    /// `accepted`) if `None`. `reply` is the driver's key for the publish's
    /// reply.
    pub(crate) fn push(
        &mut self,
        message: Arc<Message>,
        deadline: Option<Instant>,
        accepted: Instant,
        reply: u64,
        span: Option<tracing::Span>,
        waiting: bool,
    ) -> PublishId {
        let order = self.next_order;
        self.next_order += 1;
        let exact = self.since_epoch(accepted);
        let since = exact.unwrap_or(0);
        // a default deadline is worked out from the acceptance time: it goes in
        // the FIFO if that time is exact and not before the newest there's
        let deadline = match (deadline, exact) {
            (None, Some(since)) if since >= self.last_default => None,
            (None, _) => Some(crate::supervisor::deadline_after(accepted, self.timeout)),
            (Some(at), _) => Some(at),
        };
        let rare = (deadline.is_some() || span.is_some()).then(|| {
            Box::new(Rare {
                deadline,
                returned: None,
                span,
            })
        });
        let place = if waiting {
            Place::Waiting
        } else {
            Place::Pending
        };
        let id = PublishId::of(self.entries.insert(Stored::Live(Entry {
            order,
            message,
            accepted: since,
            reply,
            rare,
            sends: 0,
            strikes: 0,
            place,
        })))
        .0;
        self.live += 1;
        match deadline {
            None => {
                if self.default_deadlines.is_empty() {
                    self.front_deadline = Some(self.default_deadline(since));
                }
                self.default_deadlines.push_back(id);
                self.last_default = since;
            }
            Some(at) => {
                self.custom_deadlines.insert((at, id));
            }
        }
        if waiting {
            self.waiting.push_back(id);
            self.waiting_live += 1;
        } else {
            self.pending.push_back(id);
            self.pending_live += 1;
        }
        PublishId(id)
    }

    /// The unresolved message `id`.
    pub(crate) fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(slot(id))?.live()
    }

    /// The unresolved message `id`.
    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(slot(id))?.live_mut()
    }

    /// Frees the slot of resolved message `id` (see [`Slot`]); returns the
    /// reply key it had.
    pub(crate) fn release(&mut self, id: u64) -> Option<u64> {
        let slot = slot(id);
        match self.entries.get(slot)? {
            Stored::Resolved { reply } => {
                let reply = *reply;
                self.entries.remove(slot);
                Some(reply)
            }
            Stored::Live(_) => None,
        }
    }

    /// The reply key of every publish not released yet (unresolved, or
    /// resolved with its event not polled), in slot order.
    pub(crate) fn replies(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.values().map(Stored::reply)
    }

    /// Moves messages accepted over capacity into `pending`, oldest first, while
    /// `pending` holds fewer than `capacity`. Returns how many moved.
    pub(crate) fn admit(&mut self, capacity: usize) -> usize {
        let mut moved = 0;
        while self.waiting_live > 0 && self.pending_live < capacity {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            if let Some(entry) = self.get_mut(id)
                && entry.place == Place::Waiting
            {
                entry.place = Place::Pending;
                self.waiting_live -= 1;
                self.pending.push_back(id);
                self.pending_live += 1;
                moved += 1;
            }
        }
        moved
    }

    /// The oldest message waiting for a channel, without taking it.
    pub(crate) fn peek_pending(&mut self) -> Option<u64> {
        while let Some(&id) = self.pending.front() {
            if self.get(id).is_some_and(|e| e.place == Place::Pending) {
                return Some(id);
            }
            self.pending.pop_front();
        }
        None
    }

    /// Takes the oldest waiting message and marks it in flight; returns it and
    /// how many times it has been sent, this time included.
    pub(crate) fn place(&mut self, id: u64) -> Option<(Arc<Message>, u32)> {
        let front = self.pending.pop_front();
        debug_assert_eq!(
            front,
            Some(id),
            "place() takes the message peek_pending() gave"
        );
        self.pending_live -= 1;
        let entry = self.get_mut(id)?;
        entry.place = Place::InFlight;
        if let Some(rare) = entry.rare.as_mut() {
            rare.returned = None;
        }
        entry.sends += 1;
        Some((Arc::clone(&entry.message), entry.sends))
    }

    /// Holds an in-flight message back for a while (a nack to be retried
    /// later): it counts as waiting to be sent (in [`pending_len`](Self::pending_len),
    /// so against the capacity), but `peek_pending` does not give it until
    /// [`unpark`](Self::unpark). Whether it was in flight.
    pub(crate) fn park(&mut self, id: u64) -> bool {
        let Some(entry) = self.get_mut(id) else {
            return false;
        };
        if entry.place != Place::InFlight {
            return false;
        }
        entry.place = Place::Pending;
        if let Some(rare) = entry.rare.as_mut() {
            rare.returned = None;
        }
        self.pending_live += 1;
        true
    }

    /// Puts a parked message at the front of the queue.
    pub(crate) fn unpark(&mut self, id: u64) {
        if self.get(id).is_some_and(|e| e.place == Place::Pending) {
            self.pending.push_front(id);
        }
    }

    /// Puts in-flight messages back at the front, oldest first. Returns how many
    /// were still unresolved.
    pub(crate) fn requeue(&mut self, mut ids: Vec<u64>, strike: bool) -> usize {
        ids.sort_unstable_by_key(|&id| self.get(id).map(|e| e.order));
        let mut n = 0;
        for &id in ids.iter().rev() {
            if let Some(entry) = self.get_mut(id)
                && entry.place == Place::InFlight
            {
                entry.place = Place::Pending;
                if let Some(rare) = entry.rare.as_mut() {
                    rare.returned = None;
                }
                if strike {
                    entry.strikes = entry.strikes.saturating_add(1);
                }
                self.pending.push_front(id);
                self.pending_live += 1;
                n += 1;
            }
        }
        n
    }

    /// Removes a message for good; `None` if it was already resolved. Its slot
    /// keeps the reply's key until [`release`](Self::release).
    pub(crate) fn take(&mut self, id: u64) -> Option<Entry> {
        let stored = self.entries.get_mut(slot(id))?;
        let reply = stored.live()?.reply;
        let Stored::Live(entry) = std::mem::replace(stored, Stored::Resolved { reply }) else {
            return None;
        };
        self.live -= 1;
        match entry.custom_deadline() {
            Some(at) => {
                self.custom_deadlines.remove(&(at, id));
            }
            // drop resolved ids from the front so the FIFO stays near the
            // live size and its front is unresolved
            None if self.default_deadlines.front() == Some(&id) => self.new_front(),
            None => {}
        }
        match entry.place {
            Place::Waiting => {
                self.waiting_live -= 1;
                // drop resolved ids from the front so the queue stays near its
                // live size
                while let Some(&front) = self.waiting.front() {
                    if self.get(front).is_some_and(|e| e.place == Place::Waiting) {
                        break;
                    }
                    self.waiting.pop_front();
                }
            }
            Place::Pending => self.pending_live -= 1,
            Place::InFlight => {}
        }
        Some(entry)
    }

    /// Ids whose deadline is at or before `now`, removed from the deadline index.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        if self.front_deadline.is_some_and(|at| at <= now) {
            while let Some(&id) = self.default_deadlines.front() {
                if let Some(entry) = self.get(id) {
                    if self.deadline(entry) > now {
                        break;
                    }
                    out.push(id);
                }
                self.default_deadlines.pop_front();
            }
            self.new_front();
        }
        while let Some(&(at, id)) = self.custom_deadlines.first() {
            if at > now {
                break;
            }
            self.custom_deadlines.pop_first();
            out.push(id);
        }
        out
    }

    /// Every unresolved id, oldest first.
    pub(crate) fn all_ids(&self) -> Vec<u64> {
        let mut ids: Vec<(u64, u64)> = self
            .entries
            .iter()
            .filter_map(|(slot, e)| Some((e.live()?.order, PublishId::of(slot).0)))
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(|(_, id)| id).collect()
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("unresolved", &self.live)
            .field("pending", &self.pending_live)
            .field("waiting", &self.waiting_live)
            .finish()
    }
}
