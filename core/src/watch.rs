//! The bounded event stream of [`Client::watch`](crate::Client::watch): one ring
//! per watcher, the oldest event dropped when it is full, and the number
//! dropped reported as [`Event::Lagged`] before the events kept.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::Stream;

use crate::contract::lock;
use crate::event::Event;

struct Ring {
    events: VecDeque<Event>,
    capacity: usize,
    /// Dropped since the watcher last heard of it.
    missed: u64,
    waker: Option<Waker>,
    /// The driver is gone: nothing more comes.
    closed: bool,
    /// The watcher is gone: the driver forgets it.
    watcher_gone: bool,
}

/// A ring of `capacity` events: the driver's end and the watcher's.
pub(crate) fn channel(capacity: usize) -> (Sender, Watch) {
    let ring = Arc::new(Mutex::new(Ring {
        events: VecDeque::new(),
        capacity: capacity.max(1),
        missed: 0,
        waker: None,
        closed: false,
        watcher_gone: false,
    }));
    (
        Sender {
            ring: Arc::clone(&ring),
        },
        Watch { ring },
    )
}

/// The driver's end.
pub(crate) struct Sender {
    ring: Arc<Mutex<Ring>>,
}

impl Sender {
    /// Queues a copy of `event`, dropping the oldest when full; `false` once
    /// the watcher is gone.
    pub(crate) fn send(&self, event: &Event) -> bool {
        let mut ring = lock(&self.ring);
        if ring.watcher_gone {
            return false;
        }
        if ring.events.len() >= ring.capacity {
            ring.events.pop_front();
            ring.missed += 1;
        }
        ring.events.push_back(event.clone());
        let waker = ring.waker.take();
        drop(ring);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut ring = lock(&self.ring);
        ring.closed = true;
        let waker = ring.waker.take();
        drop(ring);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The watcher's end: a stream of events, [`Event::Lagged`] first after a
/// loss.
pub(crate) struct Watch {
    ring: Arc<Mutex<Ring>>,
}

impl Stream for Watch {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut ring = lock(&self.ring);
        if ring.missed > 0 {
            let missed = std::mem::take(&mut ring.missed);
            return Poll::Ready(Some(Event::Lagged { missed }));
        }
        if let Some(event) = ring.events.pop_front() {
            return Poll::Ready(Some(event));
        }
        if ring.closed {
            return Poll::Ready(None);
        }
        if !ring.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            ring.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut ring = lock(&self.ring);
        ring.watcher_gone = true;
        ring.events.clear();
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::ids::ConnectionId;

    fn event(i: u16) -> Event {
        Event::Unblocked {
            connection: ConnectionId(i),
        }
    }

    #[test]
    fn a_lagging_watcher_loses_the_oldest_and_is_told_how_many() {
        let (tx, mut rx) = channel(3);
        for i in 0..10 {
            assert!(tx.send(&event(i)));
        }
        drop(tx);
        let got: Vec<Event> = futures::executor::block_on(rx.by_ref().collect());
        assert_eq!(
            got,
            vec![Event::Lagged { missed: 7 }, event(7), event(8), event(9)]
        );
    }

    #[test]
    fn a_watcher_that_keeps_up_sees_everything_and_the_end() {
        let (tx, mut rx) = channel(2);
        futures::executor::block_on(async {
            for i in 0..5 {
                assert!(tx.send(&event(i)));
                assert_eq!(rx.next().await, Some(event(i)));
            }
            drop(tx);
            assert_eq!(rx.next().await, None);
        });
    }

    #[test]
    fn a_dropped_watcher_is_forgotten() {
        let (tx, rx) = channel(2);
        drop(rx);
        assert!(!tx.send(&event(0)));
    }
}
