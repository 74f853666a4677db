//! A set of streams polled as one, each only when its own waker was called.
//!
//! `futures`' `SelectAll` takes a stream out of its `FuturesUnordered` for every
//! item and pushes it back in, which allocates a task node per item: per
//! confirm event, on the publish path. Here each stream gets one waker when it
//! is added; waking it queues the stream's key, and a poll visits only queued
//! streams (no scan of every channel of a large pool).

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use futures::task::{ArcWake, AtomicWaker};

/// Streams yielding items of one type, each polled when it has woken us.
pub(crate) struct StreamSet<S> {
    streams: BTreeMap<u64, Slot<S>>,
    next_key: u64,
    ready: Arc<ReadyQueue>,
    /// Keys taken from `ready` and not visited yet, in wake order.
    local: VecDeque<u64>,
}

struct Slot<S> {
    stream: S,
    flag: Arc<SlotWaker>,
    waker: Waker,
}

/// The keys of streams that were woken, and the waker of whoever polls the set.
#[derive(Default)]
struct ReadyQueue {
    keys: Mutex<Vec<u64>>,
    parent: AtomicWaker,
}

struct SlotWaker {
    key: u64,
    /// In `ready` or `local` already: a second wake adds nothing.
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl ArcWake for SlotWaker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        if !arc_self.queued.swap(true, Ordering::AcqRel) {
            arc_self
                .ready
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(arc_self.key);
            arc_self.ready.parent.wake();
        }
    }
}

impl<S> Default for StreamSet<S> {
    fn default() -> Self {
        StreamSet {
            streams: BTreeMap::new(),
            next_key: 0,
            ready: Arc::default(),
            local: VecDeque::new(),
        }
    }
}

impl<S: Stream + Unpin> StreamSet<S> {
    /// Adds a stream; it is polled at the next poll of the set.
    pub(crate) fn push(&mut self, stream: S) {
        let key = self.next_key;
        self.next_key += 1;
        let flag = Arc::new(SlotWaker {
            key,
            queued: AtomicBool::new(true),
            ready: Arc::clone(&self.ready),
        });
        let waker = futures::task::waker(Arc::clone(&flag));
        self.streams.insert(
            key,
            Slot {
                stream,
                flag,
                waker,
            },
        );
        self.local.push_back(key);
        // whoever polls the set must come back for it
        self.ready.parent.wake();
    }

    fn take_ready(&mut self) {
        let mut keys = self
            .ready
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.local.extend(keys.drain(..));
    }

    /// How many streams have not ended.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }

    /// The next item of a woken stream; `Pending` (with `cx` registered) when
    /// none has one, also when the set is empty. A stream that ends is dropped.
    ///
    /// A call polls each stream at most once: a stream that wakes itself while
    /// pending (tokio's cooperative budget does, when it runs out outside a
    /// worker) would otherwise be polled again and again within the call. Past
    /// that, the call wakes `cx` and yields.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let mut registered = false;
        let budget = self.streams.len();
        let mut polled = 0;
        loop {
            if self.local.is_empty() {
                self.take_ready();
            }
            let Some(key) = self.local.pop_front() else {
                if registered {
                    return Poll::Pending;
                }
                // registered before the last look, so a wake after it is not lost
                self.ready.parent.register(cx.waker());
                registered = true;
                self.take_ready();
                continue;
            };
            let Some(slot) = self.streams.get_mut(&key) else {
                continue; // ended already
            };
            if polled == budget {
                // still queued: the next call comes back for it
                self.local.push_front(key);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            polled += 1;
            slot.flag.queued.store(false, Ordering::Release);
            let mut scx = Context::from_waker(&slot.waker);
            match Pin::new(&mut slot.stream).poll_next(&mut scx) {
                Poll::Ready(Some(item)) => {
                    // it may have more: visit it again, after the others queued
                    if !slot.flag.queued.swap(true, Ordering::AcqRel) {
                        self.local.push_back(key);
                    }
                    return Poll::Ready(Some(item));
                }
                Poll::Ready(None) => {
                    self.streams.remove(&key);
                }
                Poll::Pending => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use futures::task::noop_waker;

    fn next<S: Stream + Unpin>(set: &mut StreamSet<S>) -> Poll<Option<S::Item>> {
        set.poll_next(&mut Context::from_waker(&noop_waker()))
    }

    #[test]
    fn yields_every_item_of_every_stream_and_drops_ended_streams() {
        let mut set = StreamSet::default();
        let (a_tx, a_rx) = mpsc::unbounded::<u32>();
        let (b_tx, b_rx) = mpsc::unbounded::<u32>();
        set.push(a_rx);
        set.push(b_rx);
        assert_eq!(next(&mut set), Poll::Pending);
        a_tx.unbounded_send(1).unwrap();
        a_tx.unbounded_send(2).unwrap();
        b_tx.unbounded_send(10).unwrap();
        let mut got = Vec::new();
        while let Poll::Ready(Some(item)) = next(&mut set) {
            got.push(item);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 10]);
        drop(a_tx);
        assert_eq!(next(&mut set), Poll::Pending);
        assert_eq!(set.len(), 1, "the ended stream is dropped");
        b_tx.unbounded_send(11).unwrap();
        assert_eq!(next(&mut set), Poll::Ready(Some(11)));
    }

    #[test]
    fn a_stream_is_polled_only_after_its_waker_was_called() {
        use std::sync::atomic::AtomicUsize;
        /// Never ready; counts its polls and keeps the last waker it was given.
        struct Idle(Arc<AtomicUsize>, Arc<Mutex<Option<Waker>>>);
        impl Stream for Idle {
            type Item = ();
            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                *self.1.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
        let polls = Arc::new(AtomicUsize::new(0));
        let waker = Arc::new(Mutex::new(None));
        let mut set = StreamSet::default();
        set.push(Idle(Arc::clone(&polls), Arc::clone(&waker)));
        assert_eq!(next(&mut set), Poll::Pending);
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once when added");
        for _ in 0..3 {
            assert_eq!(next(&mut set), Poll::Pending);
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled again unwoken");
        let stream_waker = waker.lock().unwrap().take().unwrap();
        stream_waker.wake_by_ref();
        stream_waker.wake();
        assert_eq!(next(&mut set), Poll::Pending);
        assert_eq!(next(&mut set), Poll::Pending);
        assert_eq!(polls.load(Ordering::SeqCst), 2, "polled once per wake-up");
    }

    #[test]
    fn a_stream_that_wakes_itself_while_pending_makes_the_call_yield_not_spin() {
        use std::sync::atomic::AtomicUsize;
        /// Pending, with its waker woken at once: as a tokio channel whose
        /// cooperative budget ran out.
        struct Restless(Arc<AtomicUsize>);
        impl Stream for Restless {
            type Item = u8;
            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u8>> {
                let polls = self.0.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(polls < 1000, "polled {polls} times: the set spins");
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        struct Count(AtomicUsize);
        impl ArcWake for Count {
            fn wake_by_ref(arc_self: &Arc<Self>) {
                arc_self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let polls = Arc::new(AtomicUsize::new(0));
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures::task::waker(Arc::clone(&woken));
        let mut set: StreamSet<futures::stream::BoxStream<'static, u8>> = StreamSet::default();
        set.push(Box::pin(Restless(Arc::clone(&polls))));
        let (tx, rx) = mpsc::unbounded::<u8>();
        set.push(Box::pin(rx));
        tx.unbounded_send(1).unwrap();
        // the other stream's item still comes out
        let mut got = None;
        for _ in 0..4 {
            if let Poll::Ready(item) = set.poll_next(&mut Context::from_waker(&waker)) {
                got = item;
                break;
            }
        }
        assert_eq!(got, Some(1));
        let before = woken.0.load(Ordering::SeqCst);
        assert!(set.poll_next(&mut Context::from_waker(&waker)).is_pending());
        assert!(
            polls.load(Ordering::SeqCst) <= 4,
            "each call polls the restless stream at most once"
        );
        assert!(
            woken.0.load(Ordering::SeqCst) > before,
            "the caller is woken to come back"
        );
    }

    #[test]
    fn a_wake_reaches_the_task_that_polled_the_set() {
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl ArcWake for Count {
            fn wake_by_ref(arc_self: &Arc<Self>) {
                arc_self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures::task::waker(Arc::clone(&count));
        let mut set = StreamSet::default();
        let (tx, rx) = mpsc::unbounded::<u8>();
        set.push(rx);
        assert!(set.poll_next(&mut Context::from_waker(&waker)).is_pending());
        let before = count.0.load(Ordering::SeqCst);
        tx.unbounded_send(7).unwrap();
        assert!(
            count.0.load(Ordering::SeqCst) > before,
            "the send woke the poller"
        );
        assert_eq!(
            set.poll_next(&mut Context::from_waker(&waker)),
            Poll::Ready(Some(7))
        );
    }
}
