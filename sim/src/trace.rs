//! [`Trace`]: a text record of a simulation, every line stamped with virtual time,
//! and [`SimTime`], the `tracing` timestamp that shows virtual time.

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use amqp_rebound_core::Timer;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

use crate::clock::VirtualClock;

/// A shared, append-only text record of what happened in a simulation: faults,
/// state changes, publish outcomes, deliveries. Clones are the same record.
///
/// Two runs of the same scenario must produce byte-identical traces (Invariant 9),
/// so a line may only hold what the simulation decides: virtual time, ids, names
/// from the seeded broker, never a wall-clock reading or a hash order.
///
/// ```
/// use std::time::Duration;
/// use amqp_rebound_sim::{Trace, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let trace = Trace::new(clock.clone());
/// clock.advance_by(Duration::from_millis(1500));
/// trace.record("fault", format_args!("kill conn#1"));
/// assert_eq!(trace.text(), "[     1.500s] fault: kill conn#1\n");
/// ```
#[derive(Clone)]
pub struct Trace {
    timer: Arc<dyn Timer>,
    origin: Instant,
    inner: Arc<Mutex<TraceText>>,
}

struct TraceText {
    enabled: bool,
    text: String,
    lines: usize,
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("lines", &self.lock().lines)
            .finish_non_exhaustive()
    }
}

/// Formats a virtual time offset the way traces and logs show it: `[  12.345s]`.
pub fn stamp(elapsed: Duration) -> String {
    format!("[{:>6}.{:03}s]", elapsed.as_secs(), elapsed.subsec_millis())
}

impl Trace {
    /// An empty, recording trace on `clock`, stamped from its origin.
    pub fn new(clock: VirtualClock) -> Trace {
        let origin = clock.origin();
        Trace::with_timer(Arc::new(clock), origin)
    }

    /// An empty, recording trace stamped with `timer`'s time since `origin` (any
    /// clock: the real-broker mode uses tokio's).
    pub fn with_timer(timer: Arc<dyn Timer>, origin: Instant) -> Trace {
        Trace {
            timer,
            origin,
            inner: Arc::new(Mutex::new(TraceText {
                enabled: true,
                text: String::new(),
                lines: 0,
            })),
        }
    }

    /// A trace that only counts lines (for long benchmark runs).
    pub fn disabled(clock: VirtualClock) -> Trace {
        let trace = Trace::new(clock);
        trace.set_enabled(false);
        trace
    }

    /// Turns recording on or off (lines are counted either way).
    pub fn set_enabled(&self, enabled: bool) {
        self.lock().enabled = enabled;
    }

    /// Time since the origin, on the trace's timer.
    pub fn elapsed(&self) -> Duration {
        self.timer.now().saturating_duration_since(self.origin)
    }

    /// The trace's timer.
    pub fn timer(&self) -> &Arc<dyn Timer> {
        &self.timer
    }

    fn lock(&self) -> MutexGuard<'_, TraceText> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `[time] kind: what`.
    pub fn record(&self, kind: &str, what: fmt::Arguments<'_>) {
        let elapsed = self.elapsed();
        let mut t = self.lock();
        t.lines += 1;
        if t.enabled {
            let _ = writeln!(t.text, "{} {kind}: {what}", stamp(elapsed));
        }
    }

    /// The whole record.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// Lines recorded (also when disabled).
    pub fn lines(&self) -> usize {
        self.lock().lines
    }
}

/// A `tracing_subscriber` timestamp showing virtual time, so that log lines of a
/// simulation read in simulated seconds.
///
/// ```
/// use amqp_rebound_sim::{SimTime, VirtualClock};
///
/// let clock = VirtualClock::new();
/// let subscriber = tracing_subscriber::fmt()
///     .with_timer(SimTime::new(clock.clone()))
///     .with_writer(std::io::sink)
///     .finish();
/// tracing::subscriber::with_default(subscriber, || tracing::info!("stamped in virtual time"));
/// ```
#[derive(Debug, Clone)]
pub struct SimTime {
    clock: VirtualClock,
}

impl SimTime {
    /// Stamps with `clock`.
    pub fn new(clock: VirtualClock) -> SimTime {
        SimTime { clock }
    }
}

impl FormatTime for SimTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(w, "{}", stamp(self.clock.elapsed()))
    }
}
