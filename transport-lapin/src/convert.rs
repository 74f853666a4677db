//! Translations between core's types and lapin's: errors, properties, names.
//!
//! Everything here is a pure function, so the mapping is unit-tested without a broker.

use amqp_rebound_core::TransportError;
use amqp_rebound_core::message::{AMQPValue, Delivery, FieldTable, Properties, Returned};
use amqp_rebound_core::tls::rustls;
use amqp_rebound_core::topology::ExchangeKind;
use lapin::message::BasicReturnMessage;
use lapin::types::ShortString;
use lapin::{BasicProperties, ErrorKind};

pub(crate) use amqp_rebound_core::transport::support::scrub;
use amqp_rebound_core::transport::support::{SHORT_STRING_MAX, too_long};

/// Maps a lapin error to core's classified error.
///
/// | lapin                                   | core                          |
/// |-----------------------------------------|-------------------------------|
/// | `IOError`, `RuntimeShutdownError`       | `Io`; `Tls` when it wraps a rustls error |
/// | `MissingHeartbeatError`                 | `HeartbeatTimeout`            |
/// | `ProtocolError` (AMQP reply code)       | `Reply { code, text }`        |
/// | `AuthProviderError`                     | `Auth`                        |
/// | anything else (state, parsing, limits)  | `Protocol`                    |
pub(crate) fn map_error(error: &lapin::Error) -> TransportError {
    match error.kind() {
        ErrorKind::IOError(io) | ErrorKind::RuntimeShutdownError(io) => {
            rustls::from_io_error(io).unwrap_or_else(|| TransportError::Io(io.to_string()))
        }
        ErrorKind::MissingHeartbeatError => TransportError::HeartbeatTimeout,
        ErrorKind::ProtocolError(amqp) => TransportError::Reply {
            code: amqp.get_id(),
            text: amqp.get_message().to_string(),
        },
        ErrorKind::AuthProviderError(text) => TransportError::Auth(text.clone()),
        _ => TransportError::Protocol(error.to_string()),
    }
}

/// Maps an error from the dial and handshake.
///
/// RabbitMQ refuses bad credentials with `connection.close` 403 ACCESS_REFUSED during
/// the handshake (lapin advertises `authentication_failure_close`), which only ever
/// means "these credentials": it becomes [`TransportError::Auth`].
pub(crate) fn map_connect_error(error: &lapin::Error, password: &str) -> TransportError {
    let mapped = match map_error(error) {
        TransportError::Reply { code: 403, text } => TransportError::Auth(text),
        other => other,
    };
    scrub(mapped, password)
}

/// Whether `error` says "the object was already closed" rather than why it closed.
pub(crate) fn is_state_error(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannel(_)
    )
}

/// Whether lapin's error event is about one channel (a soft AMQP error: the broker
/// closed that channel) rather than about the connection.
pub(crate) fn is_channel_level(error: &lapin::Error) -> bool {
    error.is_amqp_soft_error()
}

/// An AMQP short string, refused (rather than panicking in lapin, which is what
/// `ShortString::from` does) when longer than 255 bytes.
pub(crate) fn short(what: &'static str, value: &str) -> Result<ShortString, TransportError> {
    ShortString::try_new(value).map_err(|_| too_long(what, value.len()))
}

/// Checks a field table before it reaches the encoder. Keys and `ShortString` values
/// are length-checked when they are built, so this only walks nested values to make
/// sure nothing slipped through.
pub(crate) fn check_table(what: &'static str, table: &FieldTable) -> Result<(), TransportError> {
    for (key, value) in table.inner() {
        if key.as_str().len() > SHORT_STRING_MAX {
            return Err(too_long(what, key.as_str().len()));
        }
        check_value(what, value)?;
    }
    Ok(())
}

fn check_value(what: &'static str, value: &AMQPValue) -> Result<(), TransportError> {
    match value {
        AMQPValue::ShortString(s) if s.as_str().len() > SHORT_STRING_MAX => {
            Err(too_long(what, s.as_str().len()))
        }
        AMQPValue::FieldTable(table) => check_table(what, table),
        AMQPValue::FieldArray(array) => array
            .as_slice()
            .iter()
            .try_for_each(|value| check_value(what, value)),
        _ => Ok(()),
    }
}

/// Whether a table holds a `ShortString` value anywhere. RabbitMQ reads the `s`
/// tag as a short integer (the 0-9-1 errata), fails to parse the frame and
/// closes the connection with 541; lapin writes `ShortString` values with it.
fn has_short_string(table: &FieldTable) -> bool {
    fn value(v: &AMQPValue) -> bool {
        match v {
            AMQPValue::ShortString(_) => true,
            AMQPValue::FieldTable(t) => has_short_string(t),
            AMQPValue::FieldArray(a) => a.as_slice().iter().any(value),
            _ => false,
        }
    }
    table.inner().values().any(value)
}

/// `table` with every `ShortString` value sent as a long string (what amqprs,
/// the Java client and RabbitMQ itself send).
fn long_strings(table: &FieldTable) -> FieldTable {
    fn value(v: &AMQPValue) -> AMQPValue {
        match v {
            AMQPValue::ShortString(s) => AMQPValue::LongString(s.as_str().into()),
            AMQPValue::FieldTable(t) => AMQPValue::FieldTable(long_strings(t)),
            AMQPValue::FieldArray(a) => {
                AMQPValue::FieldArray(a.as_slice().iter().map(value).collect::<Vec<_>>().into())
            }
            other => other.clone(),
        }
    }
    let mut out = FieldTable::default();
    for (k, v) in table.inner() {
        out.insert(k.clone(), value(v));
    }
    out
}

/// Core's exchange kind as lapin's.
pub(crate) fn exchange_kind(kind: &ExchangeKind) -> Result<lapin::ExchangeKind, TransportError> {
    Ok(match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        other => {
            // lapin turns the name into a short string with a panicking conversion.
            let name = short("exchange type", other.as_str())?;
            lapin::ExchangeKind::Custom(name.to_string())
        }
    })
}

/// Core's properties as lapin's.
pub(crate) fn to_lapin_properties(p: &Properties) -> Result<BasicProperties, TransportError> {
    let mut out = BasicProperties::default();
    if let Some(v) = &p.content_type {
        out = out.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(short("content_encoding", v)?);
    }
    if let Some(v) = &p.headers {
        check_table("a header", v)?;
        out = out.with_headers(if has_short_string(v) {
            long_strings(v)
        } else {
            v.clone()
        });
    }
    if let Some(v) = p.delivery_mode {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        out = out.with_correlation_id(short("correlation_id", v)?);
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(short("reply_to", v)?);
    }
    if let Some(v) = &p.expiration {
        out = out.with_expiration(short("expiration", v)?);
    }
    if let Some(v) = &p.message_id {
        out = out.with_message_id(short("message_id", v)?);
    }
    if let Some(v) = p.timestamp {
        out = out.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        out = out.with_type(short("type", v)?);
    }
    if let Some(v) = &p.user_id {
        out = out.with_user_id(short("user_id", v)?);
    }
    if let Some(v) = &p.app_id {
        out = out.with_app_id(short("app_id", v)?);
    }
    Ok(out)
}

/// lapin's properties as core's. `cluster-id` (deprecated in 0-9-1) is dropped.
pub(crate) fn from_lapin_properties(p: &BasicProperties) -> Properties {
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let mut out = Properties::default();
    out.content_type = text(p.content_type());
    out.content_encoding = text(p.content_encoding());
    out.headers = p.headers().clone();
    out.delivery_mode = *p.delivery_mode();
    out.priority = *p.priority();
    out.correlation_id = text(p.correlation_id());
    out.reply_to = text(p.reply_to());
    out.expiration = text(p.expiration());
    out.message_id = text(p.message_id());
    out.timestamp = *p.timestamp();
    out.kind = text(p.kind());
    out.user_id = text(p.user_id());
    out.app_id = text(p.app_id());
    out
}

/// A lapin delivery as core's (the acker is dropped: acks go by delivery tag).
pub(crate) fn delivery(consumer_tag: String, d: lapin::message::Delivery) -> Delivery {
    Delivery {
        consumer_tag,
        delivery_tag: d.delivery_tag,
        redelivered: d.redelivered,
        exchange: d.exchange.to_string(),
        routing_key: d.routing_key.to_string(),
        properties: from_lapin_properties(&d.properties),
        payload: d.data.into(),
    }
}

/// A lapin returned message as core's.
pub(crate) fn returned(r: BasicReturnMessage) -> Returned {
    let BasicReturnMessage {
        delivery,
        reply_code,
        reply_text,
    } = r;
    Returned {
        reply_code,
        reply_text: reply_text.to_string(),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        properties: from_lapin_properties(&delivery.properties),
        payload: delivery.data.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_rebound_core::ErrorClass;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use std::io;

    fn protocol(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn io_errors_are_io() {
        let e: lapin::Error = io::Error::from(io::ErrorKind::ConnectionRefused).into();
        assert!(matches!(map_error(&e), TransportError::Io(_)));
        assert_eq!(map_error(&e).class(), ErrorClass::Transient);
    }

    #[test]
    fn missing_heartbeat_is_heartbeat_timeout() {
        let e: lapin::Error = ErrorKind::MissingHeartbeatError.into();
        assert_eq!(map_error(&e), TransportError::HeartbeatTimeout);
    }

    #[test]
    fn reply_codes_are_kept() {
        let e = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'x' in vhost '/'",
        );
        assert_eq!(
            map_error(&e),
            TransportError::Reply {
                code: 404,
                text: "NOT_FOUND - no exchange 'x' in vhost '/'".into()
            }
        );
        assert!(is_channel_level(&e));
        let e = protocol(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - shutdown",
        );
        assert_eq!(map_error(&e).reply_code(), Some(320));
        assert!(!is_channel_level(&e));
    }

    #[test]
    fn access_refused_while_connecting_is_auth_and_scrubbed() {
        let e = protocol(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused for s3cret-pw",
        );
        let mapped = map_connect_error(&e, "s3cret-pw");
        assert_eq!(
            mapped,
            TransportError::Auth("ACCESS_REFUSED - Login was refused for ***".into())
        );
        assert_eq!(mapped.class(), ErrorClass::Refused);
    }

    #[test]
    fn long_names_are_refused_not_panicking() {
        assert!(short("routing key", &"k".repeat(255)).is_ok());
        let err = short("routing key", &"k".repeat(256)).unwrap_err();
        assert!(err.to_string().contains("routing key is 256 bytes"));
        let mut p = Properties::default();
        p.message_id = Some("m".repeat(300));
        assert!(to_lapin_properties(&p).is_err());
        assert!(exchange_kind(&ExchangeKind::Custom("x".repeat(256))).is_err());
    }

    #[test]
    fn short_string_header_values_go_as_long_strings() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::ShortString("deep".into()));
        let mut headers = FieldTable::default();
        headers.insert("s".into(), AMQPValue::ShortString("x".into()));
        headers.insert("t".into(), AMQPValue::FieldTable(inner));
        headers.insert("i".into(), AMQPValue::LongInt(7));
        let p = Properties::default().with_headers(headers);
        let out = to_lapin_properties(&p).unwrap();
        let sent = out.headers().as_ref().unwrap().inner();
        assert_eq!(sent["s"], AMQPValue::LongString("x".into()));
        assert_eq!(sent["i"], AMQPValue::LongInt(7));
        let AMQPValue::FieldTable(t) = &sent["t"] else {
            panic!("{sent:?}")
        };
        assert_eq!(t.inner()["n"], AMQPValue::LongString("deep".into()));
        assert!(!has_short_string(out.headers().as_ref().unwrap()));
    }

    #[test]
    fn properties_round_trip() {
        let mut headers = FieldTable::default();
        headers.insert("x-n".into(), AMQPValue::LongInt(7));
        let mut p = Properties::default()
            .with_content_type("application/json")
            .with_message_id("m-1")
            .with_headers(headers)
            .persistent();
        p.content_encoding = Some("gzip".into());
        p.priority = Some(5);
        p.correlation_id = Some("c".into());
        p.reply_to = Some("r".into());
        p.expiration = Some("60000".into());
        p.timestamp = Some(1_700_000_000);
        p.kind = Some("t".into());
        p.user_id = Some("guest".into());
        p.app_id = Some("a".into());
        let back = from_lapin_properties(&to_lapin_properties(&p).unwrap());
        assert_eq!(back, p);
    }

    /// The content header lapin would write for `p`: class, weight and body size
    /// (12 bytes), then the flags and the properties.
    fn content_header_len(p: &Properties) -> usize {
        let lapin = to_lapin_properties(p).expect("convertible");
        let written = lapin::protocol::basic::gen_properties(&lapin)(Vec::<u8>::new().into())
            .expect("encodes");
        12 + written.write.len()
    }

    /// `Properties::validate` accepts exactly the properties whose content
    /// header fits in one frame of RabbitMQ's default size, as lapin encodes
    /// them: every value type, short-string values (sent as long strings),
    /// and with or without the fixed-size properties.
    #[test]
    fn the_size_check_agrees_with_the_encoding_at_the_frame_limit() {
        let room = amqp_rebound_core::message::FRAME_MAX_DEFAULT as usize - 8;
        let value = |kind: usize, n: usize| match kind {
            0 => AMQPValue::ShortString("v".repeat(200).into()),
            1 => AMQPValue::LongString("v".repeat(n % 300).into()),
            2 => AMQPValue::ByteArray(vec![7u8; n % 300].into()),
            3 => AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::Double(0.5)].into()),
            _ => {
                let mut inner = FieldTable::default();
                inner.insert("t".into(), AMQPValue::Timestamp(1));
                inner.insert(
                    "d".into(),
                    AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 1, value: 2 }),
                );
                AMQPValue::FieldTable(inner)
            }
        };
        for kind in 0..5 {
            for fixed in [false, true] {
                let make = |n: usize| {
                    let mut headers = FieldTable::default();
                    // a filler long string that brings the size near the limit
                    headers.insert(
                        "filler".into(),
                        AMQPValue::LongString("f".repeat(room - n).into()),
                    );
                    for i in 0..8 {
                        headers.insert(format!("k{i}").as_str().into(), value(kind, n + i));
                    }
                    let mut p = Properties::default()
                        .with_headers(headers)
                        .with_message_id("m");
                    if fixed {
                        p = p.persistent().with_timestamp(1);
                        p.priority = Some(1);
                    }
                    p
                };
                let mut crossed = (false, false);
                for n in (0..3_000).step_by(13) {
                    let p = make(n);
                    let fits = content_header_len(&p) <= room;
                    assert_eq!(
                        p.validate().is_ok(),
                        fits,
                        "kind {kind}, fixed {fixed}, n {n}: encoded {} against {room}: {:?}",
                        content_header_len(&p),
                        p.validate()
                    );
                    crossed = (crossed.0 || fits, crossed.1 || !fits);
                }
                assert_eq!(
                    crossed,
                    (true, true),
                    "kind {kind}: the cases cross the limit"
                );
            }
        }
    }
}
