//! Helpers for transport authors: what every adapter over an AMQP client needs
//! beside the translation itself. The lapin and amqprs adapters use them; a new
//! adapter should too, so that all of them behave alike where the client does not
//! decide.
//!
//! - [`scrub`]: the endpoint's password out of an error's text;
//! - [`check_short`] and [`too_long`]: AMQP short strings (at most
//!   [`SHORT_STRING_MAX`] bytes), refused before a client that would panic on
//!   them sees them;
//! - [`uri_connect_timeout`]: the dial timeout a URI asks for
//!   (`connection_timeout`), for a client with no timeout of its own;
//! - [`runtime_handle`] (feature `tokio`): the tokio runtime a dial runs on;
//! - [`lock`]: a mutex lock that ignores poisoning.
//!
//! ```
//! use amqp_rebound_core::TransportError;
//! use amqp_rebound_core::transport::support::{check_short, scrub};
//!
//! assert!(check_short("routing key", "orders").is_ok());
//! assert!(check_short("routing key", &"k".repeat(256)).is_err());
//! let error = TransportError::Io("login as guest:s3cret failed".into());
//! assert_eq!(
//!     scrub(error, "s3cret"),
//!     TransportError::Io("login as guest:*** failed".into())
//! );
//! ```

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::endpoint::Endpoint;
use crate::error::TransportError;
pub use crate::message::SHORT_STRING_MAX;

/// Removes `password` from the text of `error` (each occurrence becomes `***`).
///
/// Neither lapin, amqprs nor RabbitMQ is known to put it there; this makes sure
/// of it. A password shorter than 3 bytes is left alone: it would blank out
/// ordinary words, and cannot be told apart from the text around it anyway.
pub fn scrub(error: TransportError, password: &str) -> TransportError {
    if password.len() < 3 {
        return error;
    }
    let clean = |text: String| text.replace(password, "***");
    match error {
        TransportError::Io(text) => TransportError::Io(clean(text)),
        TransportError::Auth(text) => TransportError::Auth(clean(text)),
        TransportError::Protocol(text) => TransportError::Protocol(clean(text)),
        TransportError::Tls { kind, detail } => TransportError::Tls {
            kind,
            detail: clean(detail),
        },
        TransportError::Reply { code, text } => TransportError::Reply {
            code,
            text: clean(text),
        },
        other => other,
    }
}

/// `value` if it fits an AMQP short string (at most [`SHORT_STRING_MAX`] bytes),
/// else the [`too_long`] error naming `what`.
pub fn check_short<'a>(what: &'static str, value: &'a str) -> Result<&'a str, TransportError> {
    if value.len() > SHORT_STRING_MAX {
        return Err(too_long(what, value.len()));
    }
    Ok(value)
}

/// The error for a short string of `len` bytes, past [`SHORT_STRING_MAX`]: a
/// [`TransportError::Protocol`] naming `what` (`"routing key"`, `"queue name"`).
pub fn too_long(what: &'static str, len: usize) -> TransportError {
    TransportError::Protocol(format!(
        "{what} is {len} bytes long; AMQP allows at most {SHORT_STRING_MAX}"
    ))
}

/// The dial timeout the endpoint's URI asks for: its `connection_timeout`, in
/// milliseconds (0 or absent: none).
///
/// The client's [`Config::connect_timeout`](crate::Config::connect_timeout)
/// bounds every dial already (the driver gives up on it); this is for an adapter
/// whose client has no timeout of its own and that honours the URI's.
pub fn uri_connect_timeout(endpoint: &Endpoint) -> Option<Duration> {
    endpoint
        .amqp_uri()
        .query
        .connection_timeout
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// The tokio runtime a dial runs on: `given` (the adapter's `with_handle`), else
/// the runtime the caller is on; outside of one, a [`TransportError::Protocol`]
/// that names `adapter` (`"amqp-rebound-lapin"`) and `with_handle`
/// (`"LapinTransport::with_handle"`), instead of tokio's panic.
#[cfg(feature = "tokio")]
pub fn runtime_handle(
    given: Option<&tokio::runtime::Handle>,
    adapter: &str,
    with_handle: &str,
) -> Result<tokio::runtime::Handle, TransportError> {
    given
        .cloned()
        .or_else(|| tokio::runtime::Handle::try_current().ok())
        .ok_or_else(|| {
            TransportError::Protocol(format!(
                "{adapter} needs a tokio runtime: connect from one, \
                 or give one with {with_handle}"
            ))
        })
}

/// Locks a mutex, ignoring poisoning: for values that stay valid even if a holder
/// panicked (counters, queues of events, snapshots).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_the_password_from_every_text() {
        let password = "hunter2";
        let scrubbed = scrub(
            TransportError::Reply {
                code: 403,
                text: "no hunter2 here, hunter2".into(),
            },
            password,
        );
        assert_eq!(
            scrubbed,
            TransportError::Reply {
                code: 403,
                text: "no *** here, ***".into()
            }
        );
        // too short to scrub without blanking words
        assert_eq!(
            scrub(TransportError::Io("a b".into()), "a"),
            TransportError::Io("a b".into())
        );
    }

    #[test]
    fn short_strings_stop_at_255_bytes() {
        assert!(check_short("routing key", &"k".repeat(255)).is_ok());
        let error = check_short("routing key", &"k".repeat(256)).unwrap_err();
        assert_eq!(
            error,
            TransportError::Protocol(
                "routing key is 256 bytes long; AMQP allows at most 255".into()
            )
        );
    }

    #[test]
    fn the_uri_connect_timeout_is_in_milliseconds() {
        let ep = |uri: &str| Endpoint::parse(uri).unwrap();
        assert_eq!(
            uri_connect_timeout(&ep("amqp://h?connection_timeout=1500")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            uri_connect_timeout(&ep("amqp://h?connection_timeout=0")),
            None
        );
        assert_eq!(uri_connect_timeout(&ep("amqp://h")), None);
    }

    #[test]
    fn lock_survives_a_poisoned_mutex() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let poisoner = std::sync::Arc::clone(&mutex);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
