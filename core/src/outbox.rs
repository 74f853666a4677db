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
use std::time::Instant;

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

/// Where a message is while in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) conn: usize,
    pub(crate) chan: usize,
    pub(crate) generation: u64,
}

pub(crate) struct Entry {
    /// Its place in publish order (ids do not tell it).
    pub(crate) order: u64,
    pub(crate) message: Arc<Message>,
    pub(crate) deadline: Instant,
    pub(crate) placed: Option<Placement>,
    /// Set by basic.return: resolve as Returned when the ack comes.
    pub(crate) returned: Option<(u16, String)>,
    /// Channel-level errors suffered while in flight; past a limit the message is
    /// the likely culprit and resolves with the error instead of looping.
    pub(crate) strikes: u8,
    /// Times it went out.
    pub(crate) sends: u32,
    /// When it was accepted (for its confirm latency).
    pub(crate) accepted: Instant,
    /// Its `publish` span, at TRACE only.
    pub(crate) span: Option<Box<tracing::Span>>,
    /// Accepted while the outbox was full: it enters `pending` when there is room.
    pub(crate) waiting: bool,
}

slotmap::new_key_type! {
    /// Where an entry is stored; a [`PublishId`] is its FFI form. Slots are
    /// reused (the last one freed first, so the storage stays as small as the
    /// outbox and warm in the cache), and a reused slot has a new version, so an
    /// id that was resolved does not find the entry that took its place (until
    /// the 32-bit version wraps, 2^31 reuses of one slot later).
    ///
    /// A resolved entry keeps its slot (empty) until its `PublishResolved`
    /// event is polled: whoever keys something by the id (the driver, its
    /// reply) sees the resolution before the slot can carry a new id.
    pub(crate) struct Slot;
}

impl PublishId {
    pub(crate) fn slot(self) -> Slot {
        Slot::from(KeyData::from_ffi(self.0))
    }

    fn of(slot: Slot) -> PublishId {
        PublishId(slot.data().as_ffi())
    }
}

fn slot(id: u64) -> Slot {
    PublishId(id).slot()
}

/// Publishes waiting or in flight.
#[derive(Default)]
pub(crate) struct Outbox {
    /// `None`: resolved, its event not polled yet.
    entries: SlotMap<Slot, Option<Entry>>,
    live: usize,
    /// Ids waiting for a channel, oldest first; ids already resolved are skipped.
    pending: VecDeque<u64>,
    pending_live: usize,
    /// Accepted over capacity (the caller waits for room), oldest first.
    waiting: VecDeque<u64>,
    waiting_live: usize,
    /// Deadlines of publishes that took the default timeout: with a constant
    /// timeout and a clock that never goes back they come in order, so a FIFO
    /// replaces a sorted set on the hot path. Resolved ids are skipped lazily.
    default_deadlines: VecDeque<(Instant, u64)>,
    /// Deadlines the caller chose, in any order.
    custom_deadlines: BTreeSet<(Instant, u64)>,
    next_order: u64,
}

impl Outbox {
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

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let default = self.default_deadlines.front().map(|(at, _)| *at);
        let custom = self.custom_deadlines.first().map(|(at, _)| *at);
        match (default, custom) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Accepts a message at the back of the queue. `default_deadline` says the
    /// deadline is now + the configured timeout (so deadlines arrive in order).
    pub(crate) fn push(
        &mut self,
        message: Arc<Message>,
        deadline: Instant,
        default_deadline: bool,
        accepted: Instant,
        span: Option<Box<tracing::Span>>,
        waiting: bool,
    ) -> PublishId {
        let order = self.next_order;
        self.next_order += 1;
        let id = PublishId::of(self.entries.insert(Some(Entry {
            order,
            message,
            deadline,
            placed: None,
            returned: None,
            strikes: 0,
            sends: 0,
            accepted,
            span,
            waiting,
        })))
        .0;
        self.live += 1;
        if default_deadline
            && self
                .default_deadlines
                .back()
                .is_none_or(|(at, _)| *at <= deadline)
        {
            self.default_deadlines.push_back((deadline, id));
        } else {
            self.custom_deadlines.insert((deadline, id));
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
        self.entries.get(slot(id))?.as_ref()
    }

    /// The unresolved message `id`.
    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(slot(id))?.as_mut()
    }

    /// Frees the slot of resolved message `id` (see [`Slot`]).
    pub(crate) fn release(&mut self, id: u64) {
        let slot = slot(id);
        if self.entries.get(slot).is_some_and(Option::is_none) {
            self.entries.remove(slot);
        }
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
                && entry.waiting
            {
                entry.waiting = false;
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
            if self.get(id).is_some_and(|e| e.placed.is_none()) {
                return Some(id);
            }
            self.pending.pop_front();
        }
        None
    }

    /// Takes the oldest waiting message and records where it goes; returns it and
    /// how many times it has been sent, this time included.
    pub(crate) fn place(&mut self, id: u64, placement: Placement) -> (Arc<Message>, u32) {
        let front = self.pending.pop_front();
        debug_assert_eq!(
            front,
            Some(id),
            "place() takes the message peek_pending() gave"
        );
        self.pending_live -= 1;
        // peek_pending() returned this id from `entries`, so it is there.
        let entry = self.get_mut(id).expect("peeked entry exists");
        entry.placed = Some(placement);
        entry.returned = None;
        entry.sends += 1;
        (Arc::clone(&entry.message), entry.sends)
    }

    /// Puts in-flight messages back at the front, oldest first. Returns how many
    /// were still unresolved.
    pub(crate) fn requeue(&mut self, mut ids: Vec<u64>, strike: bool) -> usize {
        ids.sort_unstable_by_key(|&id| self.get(id).map(|e| e.order));
        let mut n = 0;
        for &id in ids.iter().rev() {
            if let Some(entry) = self.get_mut(id)
                && entry.placed.is_some()
            {
                entry.placed = None;
                entry.returned = None;
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

    /// Removes a message for good; `None` if it was already resolved.
    pub(crate) fn take(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.get_mut(slot(id))?.take()?;
        self.live -= 1;
        if !self.custom_deadlines.remove(&(entry.deadline, id)) {
            // drop resolved ids from the front so the FIFO stays near the live size
            while let Some(&(_, front)) = self.default_deadlines.front() {
                if self.get(front).is_some() {
                    break;
                }
                self.default_deadlines.pop_front();
            }
        }
        if entry.waiting {
            self.waiting_live -= 1;
            // drop resolved ids from the front so the queue stays near its live size
            while let Some(&front) = self.waiting.front() {
                if self.get(front).is_some_and(|e| e.waiting) {
                    break;
                }
                self.waiting.pop_front();
            }
        } else if entry.placed.is_none() {
            self.pending_live -= 1;
        }
        Some(entry)
    }

    /// Ids whose deadline is at or before `now`, removed from the deadline index.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.default_deadlines.front() {
            if at > now {
                break;
            }
            self.default_deadlines.pop_front();
            if self.get(id).is_some() {
                out.push(id);
            }
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
            .filter_map(|(slot, e)| Some((e.as_ref()?.order, PublishId::of(slot).0)))
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
