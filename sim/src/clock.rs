//! [`VirtualClock`]: simulated time that moves only when the test moves it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use amqp_rebound_core::transport::{Sleep, Timer};

/// Simulated time, shared by every clone.
///
/// The clock keeps one list of timers, ordered by deadline and, for equal deadlines,
/// by registration order. A timer is either a sleeper (a future from
/// [`sleep_until`](Timer::sleep_until)) or a scheduled action (a closure from
/// [`schedule_at`](VirtualClock::schedule_at), which the simulated broker uses to
/// deliver frames after their latency). Time moves only through
/// [`advance_to`](VirtualClock::advance_to), [`advance_by`](VirtualClock::advance_by)
/// and [`advance_to_next`](VirtualClock::advance_to_next), which fire due timers in
/// order. No thread, no wall clock, no runtime: it works under any executor.
///
/// Waking a sleeper only schedules its task; the task runs when the executor polls it.
/// To keep cause before effect, step one deadline at a time and let the executor run
/// in between, which is what [`run_until`](VirtualClock::run_until) does:
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_core::Timer;
/// use amqp_rebound_sim::VirtualClock;
/// use futures::executor::LocalPool;
/// use futures::task::LocalSpawnExt;
///
/// let clock = VirtualClock::new();
/// let mut pool = LocalPool::new();
/// let done = std::rc::Rc::new(std::cell::Cell::new(false));
/// let (c, d) = (clock.clone(), done.clone());
/// pool.spawner().spawn_local(async move {
///     c.sleep_until(c.now() + Duration::from_secs(5)).await;
///     d.set(true);
/// }).unwrap();
/// clock.run_until(clock.now() + Duration::from_secs(4), || pool.run_until_stalled());
/// assert!(!done.get());
/// clock.run_until(clock.now() + Duration::from_secs(1), || pool.run_until_stalled());
/// assert!(done.get());
/// assert_eq!(clock.elapsed(), Duration::from_secs(5));
/// ```
#[derive(Clone)]
pub struct VirtualClock {
    inner: Arc<Mutex<ClockState>>,
}

struct ClockState {
    origin: Instant,
    now: Instant,
    next_seq: u64,
    timers: BTreeMap<(Instant, u64), Entry>,
}

enum Entry {
    Sleeper(Arc<Mutex<SleepState>>),
    Action(Box<dyn FnOnce() + Send>),
}

#[derive(Default)]
struct SleepState {
    fired: bool,
    waker: Option<Waker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VirtualClock {
    /// A clock at its origin. The origin is read once from the system clock, only
    /// because `Instant` has no other constructor; nothing depends on its value, only
    /// on differences from it.
    pub fn new() -> VirtualClock {
        VirtualClock::with_origin(Instant::now())
    }

    /// A clock whose time starts at `origin`.
    pub fn with_origin(origin: Instant) -> VirtualClock {
        VirtualClock {
            inner: Arc::new(Mutex::new(ClockState {
                origin,
                now: origin,
                next_seq: 0,
                timers: BTreeMap::new(),
            })),
        }
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        lock(&self.inner).now
    }

    /// The time the clock started at.
    pub fn origin(&self) -> Instant {
        lock(&self.inner).origin
    }

    /// Virtual time elapsed since the origin (what logs print).
    pub fn elapsed(&self) -> Duration {
        let state = lock(&self.inner);
        state.now - state.origin
    }

    /// A future that completes `duration` from now.
    pub fn sleep(&self, duration: Duration) -> Sleep {
        let deadline = self.now() + duration;
        Timer::sleep_until(self, deadline)
    }

    /// Runs `action` when the clock reaches `deadline` (on the next advance if the
    /// deadline has passed). Actions and sleepers fire in one order: deadline, then
    /// registration.
    ///
    /// The action runs with no clock lock held, so it may use the clock.
    pub fn schedule_at(&self, deadline: Instant, action: impl FnOnce() + Send + 'static) {
        let mut state = lock(&self.inner);
        let seq = state.next_seq;
        state.next_seq += 1;
        state
            .timers
            .insert((deadline, seq), Entry::Action(Box::new(action)));
    }

    /// The earliest pending deadline, if any timer is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        lock(&self.inner).timers.keys().next().map(|(at, _)| *at)
    }

    /// How many timers (sleepers and actions) are pending.
    pub fn pending_timers(&self) -> usize {
        lock(&self.inner).timers.len()
    }

    /// Moves time to `target`, firing every timer due by then in order (a timer an
    /// action registers fires too, if it is due by `target`). Time never goes
    /// backwards: an earlier `target` only fires timers due by now. Returns how many
    /// timers fired.
    pub fn advance_to(&self, target: Instant) -> usize {
        let mut fired = 0;
        loop {
            let entry = {
                let mut state = lock(&self.inner);
                let target = target.max(state.now);
                match state.timers.first_key_value() {
                    Some((&(at, seq), _)) if at <= target => {
                        state.now = state.now.max(at);
                        state.timers.remove(&(at, seq))
                    }
                    _ => {
                        state.now = target;
                        None
                    }
                }
            };
            match entry {
                Some(entry) => {
                    fired += 1;
                    fire(entry);
                }
                None => return fired,
            }
        }
    }

    /// Moves time forward by `duration` (see [`advance_to`](Self::advance_to)).
    pub fn advance_by(&self, duration: Duration) -> usize {
        let target = self.now() + duration;
        self.advance_to(target)
    }

    /// Moves time to the earliest pending deadline and fires every timer due then.
    /// Returns the new time, or `None` (time unchanged) if nothing is pending.
    pub fn advance_to_next(&self) -> Option<Instant> {
        let next = self.next_deadline()?;
        self.advance_to(next);
        Some(self.now())
    }

    /// Steps time to `target` one deadline at a time, calling `run_until_stalled`
    /// (for example `|| pool.run_until_stalled()`) before the first step and after
    /// every step, so that woken tasks run, and register their next timers, before
    /// time moves on.
    pub fn run_until(&self, target: Instant, mut run_until_stalled: impl FnMut()) {
        run_until_stalled();
        while let Some(next) = self.next_deadline() {
            if next > target {
                break;
            }
            self.advance_to(next);
            run_until_stalled();
        }
        self.advance_to(target);
        run_until_stalled();
    }

    /// Like [`run_until`](Self::run_until), `duration` from now.
    pub fn run_for(&self, duration: Duration, run_until_stalled: impl FnMut()) {
        let target = self.now() + duration;
        self.run_until(target, run_until_stalled);
    }

    fn register_sleeper(
        &self,
        deadline: Instant,
    ) -> Option<(Instant, u64, Arc<Mutex<SleepState>>)> {
        let mut state = lock(&self.inner);
        if deadline <= state.now {
            return None;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let shared = Arc::new(Mutex::new(SleepState::default()));
        state
            .timers
            .insert((deadline, seq), Entry::Sleeper(shared.clone()));
        Some((deadline, seq, shared))
    }
}

fn fire(entry: Entry) {
    match entry {
        Entry::Sleeper(shared) => {
            let waker = {
                let mut s = lock(&shared);
                s.fired = true;
                s.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        Entry::Action(action) => action(),
    }
}

impl Default for VirtualClock {
    fn default() -> Self {
        VirtualClock::new()
    }
}

impl fmt::Debug for VirtualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.inner);
        f.debug_struct("VirtualClock")
            .field("elapsed", &(state.now - state.origin))
            .field("pending_timers", &state.timers.len())
            .finish()
    }
}

impl Timer for VirtualClock {
    fn now(&self) -> Instant {
        VirtualClock::now(self)
    }

    /// Registers the timer at once (so that equal deadlines fire in call order);
    /// dropping the future unregisters it.
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(VirtualSleep {
            clock: self.clone(),
            registration: self.register_sleeper(deadline),
        })
    }
}

/// The future behind [`VirtualClock`]'s `sleep_until`.
struct VirtualSleep {
    clock: VirtualClock,
    /// `None`: the deadline had passed at creation.
    registration: Option<(Instant, u64, Arc<Mutex<SleepState>>)>,
}

impl Future for VirtualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some((_, _, shared)) = &self.registration else {
            return Poll::Ready(());
        };
        let mut s = lock(shared);
        if s.fired {
            Poll::Ready(())
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

impl Drop for VirtualSleep {
    fn drop(&mut self) {
        if let Some((at, seq, _)) = self.registration.take() {
            lock(&self.clock.inner).timers.remove(&(at, seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn fires_in_deadline_then_registration_order() {
        let clock = VirtualClock::new();
        let t0 = clock.now();
        let order = Arc::new(Mutex::new(Vec::new()));
        for (i, ms) in [(0, 30u64), (1, 10), (2, 30), (3, 20)] {
            let o = order.clone();
            clock.schedule_at(t0 + Duration::from_millis(ms), move || {
                lock(&o).push(i);
            });
        }
        assert_eq!(clock.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(
            clock.advance_to_next(),
            Some(t0 + Duration::from_millis(10))
        );
        assert_eq!(*lock(&order), vec![1]);
        assert_eq!(clock.advance_to(t0 + Duration::from_millis(100)), 3);
        assert_eq!(*lock(&order), vec![1, 3, 0, 2]);
        assert_eq!(clock.elapsed(), Duration::from_millis(100));
        assert_eq!(clock.advance_to_next(), None);
    }

    #[test]
    fn time_never_goes_back() {
        let clock = VirtualClock::new();
        clock.advance_by(Duration::from_secs(2));
        clock.advance_to(clock.origin());
        assert_eq!(clock.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn sleepers_wake_and_unregister_on_drop() {
        let clock = VirtualClock::new();
        let mut past = Timer::sleep_until(&clock, clock.now());
        assert!((&mut past).now_or_never().is_some());
        let mut s = clock.sleep(Duration::from_secs(1));
        assert!((&mut s).now_or_never().is_none());
        let dropped = clock.sleep(Duration::from_millis(500));
        assert_eq!(clock.pending_timers(), 2);
        drop(dropped);
        assert_eq!(clock.pending_timers(), 1);
        assert_eq!(
            clock.advance_to_next(),
            Some(clock.origin() + Duration::from_secs(1))
        );
        assert!(s.now_or_never().is_some());
    }

    #[test]
    fn actions_may_schedule_more() {
        let clock = VirtualClock::new();
        let count = Arc::new(AtomicUsize::new(0));
        let (c, n) = (clock.clone(), count.clone());
        clock.schedule_at(clock.now() + Duration::from_millis(1), move || {
            n.fetch_add(1, Ordering::SeqCst);
            let n2 = n.clone();
            c.schedule_at(c.now() + Duration::from_millis(1), move || {
                n2.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(clock.advance_by(Duration::from_millis(5)), 2);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
