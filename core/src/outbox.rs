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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use crate::message::Message;

/// Identifies one publish from [`Supervisor::publish`](crate::Supervisor::publish)
/// until its [`Event::PublishResolved`](crate::Event::PublishResolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublishId(pub u64);

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
    /// Its deadline passed before a confirm. It is never sent after that.
    #[error("no confirm before the publish deadline")]
    TimedOut,
    /// The client was closed before a confirm.
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
}

/// Hashes the outbox's sequential ids with one multiply (Fibonacci hashing): the
/// publish path does two map operations per message, and SipHash's DoS resistance
/// buys nothing for ids we generate ourselves.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Builds [`IdHasher`]s.
pub(crate) type IdHash = BuildHasherDefault<IdHasher>;

pub(crate) type IdMap<V> = HashMap<u64, V, IdHash>;

/// Publishes waiting or in flight.
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) entries: IdMap<Entry>,
    /// Ids waiting for a channel, oldest first; ids already resolved are skipped.
    pending: VecDeque<u64>,
    pending_live: usize,
    /// Deadlines of publishes that took the default timeout: with a constant
    /// timeout and a clock that never goes back they come in order, so a FIFO
    /// replaces a sorted set on the hot path. Resolved ids are skipped lazily.
    default_deadlines: VecDeque<(Instant, u64)>,
    /// Deadlines the caller chose, in any order.
    custom_deadlines: BTreeSet<(Instant, u64)>,
    next_id: u64,
}

impl Outbox {
    pub(crate) fn pending_len(&self) -> usize {
        self.pending_live
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
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
    ) -> PublishId {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                message,
                deadline,
                placed: None,
                returned: None,
                strikes: 0,
                sends: 0,
            },
        );
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
        self.pending.push_back(id);
        self.pending_live += 1;
        PublishId(id)
    }

    /// The oldest waiting message, without taking it.
    pub(crate) fn peek_pending(&mut self) -> Option<u64> {
        while let Some(&id) = self.pending.front() {
            if self.entries.get(&id).is_some_and(|e| e.placed.is_none()) {
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
        let entry = self.entries.get_mut(&id).expect("peeked entry exists");
        entry.placed = Some(placement);
        entry.returned = None;
        entry.sends += 1;
        (Arc::clone(&entry.message), entry.sends)
    }

    /// Puts in-flight messages back at the front, oldest first. Returns how many
    /// were still unresolved.
    pub(crate) fn requeue(&mut self, mut ids: Vec<u64>, strike: bool) -> usize {
        ids.sort_unstable();
        let mut n = 0;
        for &id in ids.iter().rev() {
            if let Some(entry) = self.entries.get_mut(&id)
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

    /// Whether unresolved message `id` was published to `exchange`.
    pub(crate) fn is_for_exchange(&self, id: u64, exchange: &str) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.message.exchange == exchange)
    }

    /// Removes a message for good; `None` if it was already resolved.
    pub(crate) fn take(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if !self.custom_deadlines.remove(&(entry.deadline, id)) {
            // drop resolved ids from the front so the FIFO stays near the live size
            while let Some(&(_, front)) = self.default_deadlines.front() {
                if self.entries.contains_key(&front) {
                    break;
                }
                self.default_deadlines.pop_front();
            }
        }
        if entry.placed.is_none() {
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
            if self.entries.contains_key(&id) {
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
        let mut ids: Vec<u64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("unresolved", &self.entries.len())
            .field("pending", &self.pending_live)
            .finish()
    }
}
