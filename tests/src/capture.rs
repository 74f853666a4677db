//! Captured tracing output, to check that nothing secret is ever logged.
//!
//! A process-wide subscriber is installed once ([`Capture::start`]); it formats
//! every event and span at TRACE level into an in-memory buffer, but only while a
//! [`Capture`] is alive (otherwise its filter turns everything away, so the other
//! tests of the process pay one atomic load per log call). It is process-wide
//! because the client's driver, lapin's socket thread and the runtime's workers
//! all log from threads of their own: a thread-local subscriber would miss them.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<bool> = OnceLock::new();

fn buffer() -> MutexGuard<'static, Vec<u8>> {
    BUFFER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Clone, Copy)]
struct BufferWriter;

impl Write for BufferWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferWriter {
    type Writer = BufferWriter;

    fn make_writer(&'a self) -> BufferWriter {
        BufferWriter
    }
}

/// Everything logged while it lives (at TRACE level, spans included).
#[derive(Debug)]
pub struct Capture {
    _private: (),
}

impl Capture {
    /// Starts capturing. Panics if another global subscriber was installed first
    /// (the capture would see nothing).
    pub fn start() -> Capture {
        let installed = *INSTALLED.get_or_init(|| {
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(BufferWriter)
                .with_ansi(false)
                .with_target(true)
                .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
                .with_filter(tracing_subscriber::filter::filter_fn(|_| {
                    ACTIVE.load(Ordering::Relaxed) > 0
                }));
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::set_global_default(subscriber).is_ok()
        });
        assert!(
            installed,
            "another global tracing subscriber is installed: cannot capture"
        );
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        tracing::callsite::rebuild_interest_cache();
        Capture { _private: () }
    }

    /// The output so far (of every capture of this process).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&buffer()).into_owned()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}
