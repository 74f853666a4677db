//! Translations between core's types and amqprs's: dial arguments, errors, field
//! tables, properties, names.
//!
//! Everything here is a pure function, so the mapping is unit-tested without a broker.
//! amqprs turns names into AMQP short strings with `try_into().unwrap()`, so every
//! string that ends up as one is checked here first.

use std::sync::Arc;

use amqp_rebound_core::TransportError;
use amqp_rebound_core::endpoint::Endpoint;
use amqp_rebound_core::message::{AMQPValue, Delivery, FieldTable, Properties, Returned};
use amqp_rebound_core::tls::rustls;
use amqp_rebound_core::topology::ExchangeKind;
use amqp_rebound_core::transport::ConnectOptions;
use amqprs::channel::ConsumerMessage;
use amqprs::connection::OpenConnectionArguments;
use amqprs::error::Error as AmqprsError;
use amqprs::security::SecurityCredentials;
use amqprs::{
    BasicProperties, ByteArray, DecimalValue, FieldArray, FieldValue, LongStr, Return, ShortStr,
};
use tokio_rustls::rustls::ClientConfig;

use amqp_rebound_core::transport::support::too_long;
pub(crate) use amqp_rebound_core::transport::support::{
    check_short as checked, scrub, uri_connect_timeout,
};

/// The heartbeat amqprs asks for when the URI names none (and when it names 0:
/// see [`heartbeat`]).
const DEFAULT_HEARTBEAT: u16 = 60;

/// Builds amqprs's dial arguments from an endpoint, refusing what amqprs would
/// panic on or cannot express.
pub(crate) fn open_arguments(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    tls: Option<Arc<ClientConfig>>,
) -> Result<OpenConnectionArguments, TransportError> {
    let uri = endpoint.amqp_uri();
    // amqprs dials `format!("{host}:{port}")`, which needs an IPv6 literal bracketed.
    let host = if endpoint.host().contains(':') {
        format!("[{}]", endpoint.host())
    } else {
        endpoint.host().to_owned()
    };
    let vhost = short("virtual host", endpoint.vhost())?;
    let credentials = credentials(endpoint)?;
    let mut args = OpenConnectionArguments::new(
        &host,
        endpoint.port(),
        endpoint.username(),
        endpoint.password(),
    );
    args.virtual_host(&vhost)
        .credentials(credentials)
        .heartbeat(heartbeat(uri.query.heartbeat));
    if let Some(name) = &options.connection_name {
        args.connection_name(name);
    }
    if let Some(config) = tls {
        args.tls_adaptor(tls_adaptor(endpoint, options, config)?);
    }
    Ok(args)
}

/// The heartbeat to ask amqprs for, in seconds.
///
/// amqprs cannot run without heartbeats: with 0 negotiated on both sides its reader
/// gives up at once, and with 1 its writer sends heartbeats in a busy loop (it waits
/// `heartbeat / 2` seconds between them, in integers). So 0 asks for amqprs's default
/// (the broker's value wins if it is lower), and 1 becomes 2.
pub(crate) fn heartbeat(asked: Option<u16>) -> u16 {
    match asked {
        None | Some(0) => DEFAULT_HEARTBEAT,
        Some(1) => 2,
        Some(seconds) => seconds,
    }
}

fn credentials(endpoint: &Endpoint) -> Result<SecurityCredentials, TransportError> {
    use amq_protocol_uri::SASLMechanism;
    let (user, password) = (endpoint.username(), endpoint.password());
    match endpoint.amqp_uri().query.auth_mechanism.unwrap_or_default() {
        SASLMechanism::Plain => Ok(SecurityCredentials::new_plain(user, password)),
        SASLMechanism::AMQPlain => {
            // amqprs builds the AMQPLAIN response as a `String` from binary length
            // prefixes and unwraps it: a length byte of 128 or more is not UTF-8.
            if user.len() >= 128 || password.len() >= 128 {
                return Err(TransportError::Protocol(
                    "AMQPLAIN through amqprs needs a user name and password shorter \
                     than 128 bytes; use PLAIN"
                        .into(),
                ));
            }
            Ok(SecurityCredentials::new_amqplain(user, password))
        }
        SASLMechanism::External => Ok(SecurityCredentials::new_external()),
        other => Err(TransportError::Protocol(format!(
            "amqprs does not support the {} authentication mechanism",
            other.name()
        ))),
    }
}

/// A TLS adaptor with the core's rustls configuration for `options.tls` and its
/// server name (amqprs's own constructors know no client certificate from
/// memory, and use `ClientConfig::builder()`, which panics when more than one
/// crypto provider is compiled in and none was installed).
fn tls_adaptor(
    endpoint: &Endpoint,
    options: &ConnectOptions,
    config: Arc<ClientConfig>,
) -> Result<amqprs::tls::TlsAdaptor, TransportError> {
    // amqprs parses the name itself and reports a bad one as a network error;
    // checked here, it is a configuration error
    let name = rustls::server_name(options.tls.as_ref(), endpoint.host())?;
    Ok(amqprs::tls::TlsAdaptor::new(
        tokio_rustls::TlsConnector::from(config),
        name.to_str().into_owned(),
    ))
}

/// Maps an error from an amqprs call.
///
/// | amqprs                                   | core                          |
/// |------------------------------------------|-------------------------------|
/// | `NetworkError`                           | `Io`                          |
/// | `ConnectionOpenError` with a `connection.close` in it | `Reply { code, text }` |
/// | anything else (internal channels, usage, unexpected frames) | `Protocol` |
///
/// A call on a channel or connection that has closed fails with an internal-channel
/// error; the callers replace it with the reason the object closed.
pub(crate) fn map_error(error: &AmqprsError) -> TransportError {
    match error {
        AmqprsError::NetworkError(text) => match rustls::error_kind_from_text(text) {
            Some(kind) => TransportError::Tls {
                kind,
                detail: text.clone(),
            },
            None => TransportError::Io(text.clone()),
        },
        AmqprsError::ConnectionOpenError(text) => match parse_close(text) {
            Some((code, text)) => TransportError::Reply { code, text },
            None => TransportError::Protocol(error.to_string()),
        },
        other => TransportError::Protocol(other.to_string()),
    }
}

/// Maps an error from `Connection::open`.
///
/// - A `connection.close` with 403 ACCESS_REFUSED is [`TransportError::Auth`].
/// - The server not offering amqprs's SASL mechanism is `Auth` too: these
///   credentials cannot work there.
/// - The socket closed or reset by the broker during the handshake is `Auth`:
///   amqprs does not advertise `authentication_failure_close`, so RabbitMQ refuses
///   bad credentials by dropping the socket without a word, and that is the only
///   handshake step at which it drops one (a broker that is down refuses the TCP
///   connection instead). amqprs does not say at which step its handshake failed:
///   a close that comes sooner than RabbitMQ's 3 s delay for a refused login is
///   [explained](amqp_rebound_core::tls::rustls::explain_dead_handshake) by
///   asking the port again, so a server that is not AMQP (or a proxy with no
///   broker behind it) is `Protocol`; a slower one stays `Auth`.
///
/// The password is scrubbed from the text.
pub(crate) fn map_open_error(error: &AmqprsError, password: &str) -> TransportError {
    let mapped = match error {
        AmqprsError::NetworkError(text) if is_peer_close(text) => TransportError::Auth(format!(
            "the broker closed the connection during the handshake ({text}); with amqprs \
             this is how RabbitMQ refuses a user name or password"
        )),
        AmqprsError::ConnectionOpenError(text) if text.contains("authentication '") => {
            TransportError::Auth(text.clone())
        }
        other => match map_error(other) {
            TransportError::Reply { code: 403, text } => TransportError::Auth(text),
            mapped => mapped,
        },
    };
    scrub(mapped, password)
}

/// Whether a failed `Connection::open` died without a word: the socket was
/// closed or reset under the handshake, or what came back was not AMQP (a
/// refused or unreachable port, a TLS error or a broker's `connection.close`
/// say what they are). Such a failure may hide a TLS error (see
/// [`explain_dead_handshake`](rustls::explain_dead_handshake)).
pub(crate) fn died_without_a_word(error: &AmqprsError) -> bool {
    match error {
        AmqprsError::NetworkError(text) => {
            is_peer_close(text)
                || text.starts_with("framing error")
                || text.starts_with("serde error")
        }
        _ => false,
    }
}

/// Whether an amqprs network error says the peer closed or reset the socket
/// (rather than refusing the dial, or a TLS failure). RabbitMQ does either after a
/// failed login, depending on timing (seen: a reset, on Linux).
fn is_peer_close(text: &str) -> bool {
    [
        "peer shutdown",
        "connection interrupted",
        "reset by peer",
        "forcibly closed",
    ]
    .iter()
    .any(|sign| text.contains(sign))
}

/// Finds the reply code and text of a `connection.close` in amqprs's text for an
/// unexpected handshake frame (it prints the frame with `Debug`:
/// `Close { reply_code: 530, reply_text: ShortStr(50, "NOT_ALLOWED - ..."), .. }`).
pub(crate) fn parse_close(text: &str) -> Option<(u16, String)> {
    let rest = text.split_once("Close { reply_code: ")?.1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let code = digits.parse().ok()?;
    let quoted = rest
        .split_once("reply_text: ShortStr(")?
        .1
        .split_once(", \"")?
        .1;
    // Undo the `Debug` escaping up to the closing quote.
    let mut reply = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some((code, reply)),
            '\\' => match chars.next()? {
                'n' => reply.push('\n'),
                't' => reply.push('\t'),
                'r' => reply.push('\r'),
                '0' => reply.push('\0'),
                'u' => {
                    let hex: String = chars
                        .by_ref()
                        .skip_while(|&c| c == '{')
                        .take_while(|&c| c != '}')
                        .collect();
                    reply.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => reply.push(other),
            },
            c => reply.push(c),
        }
    }
    None
}

/// An AMQP short string, refused (rather than panicking in amqprs) when longer
/// than 255 bytes.
pub(crate) fn short(what: &'static str, value: &str) -> Result<String, TransportError> {
    checked(what, value).map(str::to_owned)
}

/// Core's exchange kind as the type name amqprs sends.
pub(crate) fn exchange_kind(kind: &ExchangeKind) -> Result<String, TransportError> {
    short("exchange type", kind.as_str())
}

/// Core's field table as amqprs's.
///
/// amqprs has no short-string field value (RabbitMQ reads `s` as a short integer),
/// so a `ShortString` value is sent as a long string; and its long strings are
/// Rust `String`s, so a `LongString` that is not UTF-8 is refused.
pub(crate) fn to_table(
    what: &'static str,
    table: &FieldTable,
) -> Result<amqprs::FieldTable, TransportError> {
    let mut out = amqprs::FieldTable::new();
    for (key, value) in table {
        let key =
            ShortStr::try_from(key.as_str()).map_err(|_| too_long(what, key.as_str().len()))?;
        out.insert(key, to_value(what, value)?);
    }
    Ok(out)
}

fn to_value(what: &'static str, value: &AMQPValue) -> Result<FieldValue, TransportError> {
    let long = |text: String| {
        let len = text.len();
        LongStr::try_from(text).map_err(|_| too_big(what, len))
    };
    Ok(match value {
        AMQPValue::Boolean(v) => FieldValue::t(*v),
        AMQPValue::ShortShortInt(v) => FieldValue::b(*v),
        AMQPValue::ShortShortUInt(v) => FieldValue::B(*v),
        AMQPValue::ShortInt(v) => FieldValue::s(*v),
        AMQPValue::ShortUInt(v) => FieldValue::u(*v),
        AMQPValue::LongInt(v) => FieldValue::I(*v),
        AMQPValue::LongUInt(v) => FieldValue::i(*v),
        AMQPValue::LongLongInt(v) => FieldValue::l(*v),
        AMQPValue::Float(v) => FieldValue::f(*v),
        AMQPValue::Double(v) => FieldValue::d(*v),
        // Same 32 bits: RabbitMQ reads the value as signed, amq-protocol as unsigned.
        AMQPValue::DecimalValue(d) => FieldValue::D(DecimalValue::new(
            d.scale,
            i32::from_ne_bytes(d.value.to_ne_bytes()),
        )),
        AMQPValue::ShortString(s) => FieldValue::S(long(s.as_str().to_owned())?),
        AMQPValue::LongString(s) => {
            let text = std::str::from_utf8(s.as_bytes()).map_err(|_| {
                TransportError::Protocol(format!(
                    "{what} holds a long string that is not UTF-8, which amqprs cannot send"
                ))
            })?;
            FieldValue::S(long(text.to_owned())?)
        }
        AMQPValue::FieldArray(array) => {
            let values = array
                .as_slice()
                .iter()
                .map(|v| to_value(what, v))
                .collect::<Result<Vec<_>, _>>()?;
            FieldValue::A(FieldArray::try_from(values).map_err(|_| too_big(what, usize::MAX))?)
        }
        AMQPValue::Timestamp(v) => FieldValue::T(*v),
        AMQPValue::FieldTable(table) => FieldValue::F(to_table(what, table)?),
        AMQPValue::ByteArray(bytes) => {
            let len = bytes.len();
            FieldValue::x(
                ByteArray::try_from(bytes.as_slice().to_vec()).map_err(|_| too_big(what, len))?,
            )
        }
        AMQPValue::Void => FieldValue::V,
    })
}

fn too_big(what: &'static str, len: usize) -> TransportError {
    TransportError::Protocol(format!(
        "{what} is too large ({len} bytes) for an AMQP field"
    ))
}

/// Whether every long string in `table` (nested ones too) is UTF-8, as amqprs
/// needs; the path of the first that is not.
pub(crate) fn check_utf8_table(path: &str, table: &FieldTable) -> Result<(), String> {
    for (key, value) in table {
        check_utf8_value(&format!("{path}.{}", key.as_str()), value)?;
    }
    Ok(())
}

fn check_utf8_value(path: &str, value: &AMQPValue) -> Result<(), String> {
    match value {
        AMQPValue::LongString(s) if std::str::from_utf8(s.as_bytes()).is_err() => Err(format!(
            "{path} is a long string that is not UTF-8, which amqprs cannot send \
             (send bytes as a byte array)"
        )),
        AMQPValue::FieldTable(table) => check_utf8_table(path, table),
        AMQPValue::FieldArray(array) => array
            .as_slice()
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_utf8_value(&format!("{path}[{i}]"), v)),
        _ => Ok(()),
    }
}

/// amqprs's field table as core's.
pub(crate) fn from_table(table: &amqprs::FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (key, value) in table.as_ref() {
        out.insert(key.as_ref().as_str().into(), from_value(value));
    }
    out
}

fn from_value(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::t(v) => AMQPValue::Boolean(*v),
        FieldValue::b(v) => AMQPValue::ShortShortInt(*v),
        FieldValue::B(v) => AMQPValue::ShortShortUInt(*v),
        FieldValue::s(v) => AMQPValue::ShortInt(*v),
        FieldValue::u(v) => AMQPValue::ShortUInt(*v),
        FieldValue::I(v) => AMQPValue::LongInt(*v),
        FieldValue::i(v) => AMQPValue::LongUInt(*v),
        FieldValue::l(v) => AMQPValue::LongLongInt(*v),
        FieldValue::f(v) => AMQPValue::Float(*v),
        FieldValue::d(v) => AMQPValue::Double(*v),
        FieldValue::D(d) => match parse_decimal(&d.to_string()) {
            Some((scale, value)) => AMQPValue::DecimalValue(amq_protocol_types::DecimalValue {
                scale,
                value: u32::from_ne_bytes(value.to_ne_bytes()),
            }),
            // Unreachable with amqp_serde 0.4 (see `parse_decimal`); keep the text.
            None => AMQPValue::LongString(d.to_string().into()),
        },
        FieldValue::S(s) => AMQPValue::LongString(s.as_ref().as_str().into()),
        FieldValue::A(array) => AMQPValue::FieldArray(
            Vec::<FieldValue>::from(array.clone())
                .iter()
                .map(from_value)
                .collect::<Vec<_>>()
                .into(),
        ),
        FieldValue::T(v) => AMQPValue::Timestamp(*v),
        FieldValue::F(table) => AMQPValue::FieldTable(from_table(table)),
        FieldValue::V => AMQPValue::Void,
        FieldValue::x(bytes) => AMQPValue::ByteArray(Vec::<u8>::from(bytes.clone()).into()),
    }
}

/// amqprs's `DecimalValue` keeps its fields private; its `Display` is the only way
/// out: `Decimal(scale, value)`.
fn parse_decimal(text: &str) -> Option<(u8, i32)> {
    let inner = text.strip_prefix("Decimal(")?.strip_suffix(')')?;
    let (scale, value) = inner.split_once(", ")?;
    Some((scale.parse().ok()?, value.parse().ok()?))
}

/// Core's properties as amqprs's. Every short string is checked first: amqprs's
/// constructor unwraps them.
pub(crate) fn to_properties(p: &Properties) -> Result<BasicProperties, TransportError> {
    // From the default, setting only what is there: most messages carry few
    // properties, and `BasicProperties::new` weighs all fourteen every time.
    type Setter = for<'a> fn(&'a mut BasicProperties, &str) -> &'a mut BasicProperties;
    let texts: [(&'static str, &Option<String>, Setter); 9] = [
        (
            "content_type",
            &p.content_type,
            BasicProperties::with_content_type,
        ),
        (
            "content_encoding",
            &p.content_encoding,
            BasicProperties::with_content_encoding,
        ),
        (
            "correlation_id",
            &p.correlation_id,
            BasicProperties::with_correlation_id,
        ),
        ("reply_to", &p.reply_to, BasicProperties::with_reply_to),
        (
            "expiration",
            &p.expiration,
            BasicProperties::with_expiration,
        ),
        (
            "message_id",
            &p.message_id,
            BasicProperties::with_message_id,
        ),
        ("type", &p.kind, BasicProperties::with_message_type),
        ("user_id", &p.user_id, BasicProperties::with_user_id),
        ("app_id", &p.app_id, BasicProperties::with_app_id),
    ];
    let mut out = BasicProperties::default();
    for (what, value, set) in texts {
        if let Some(value) = value {
            set(&mut out, checked(what, value)?);
        }
    }
    if let Some(headers) = &p.headers {
        out.with_headers(to_table("a header", headers)?);
    }
    if let Some(v) = p.delivery_mode {
        out.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        out.with_priority(v);
    }
    if let Some(v) = p.timestamp {
        out.with_timestamp(v);
    }
    Ok(out)
}

/// amqprs's properties as core's. `cluster-id` (deprecated in 0-9-1) is dropped.
pub(crate) fn from_properties(p: &BasicProperties) -> Properties {
    let text = |v: Option<&String>| v.cloned();
    let mut out = Properties::default();
    out.content_type = text(p.content_type());
    out.content_encoding = text(p.content_encoding());
    out.headers = p.headers().map(from_table);
    out.delivery_mode = p.delivery_mode();
    out.priority = p.priority();
    out.correlation_id = text(p.correlation_id());
    out.reply_to = text(p.reply_to());
    out.expiration = text(p.expiration());
    out.message_id = text(p.message_id());
    out.timestamp = p.timestamp();
    out.kind = text(p.message_type());
    out.user_id = text(p.user_id());
    out.app_id = text(p.app_id());
    out
}

/// An amqprs consumer message as core's delivery. amqprs documents every part as
/// present; a message missing one is dropped rather than trusted.
pub(crate) fn delivery(message: ConsumerMessage) -> Option<Delivery> {
    let ConsumerMessage {
        deliver,
        basic_properties,
        content,
        ..
    } = message;
    let (deliver, properties, content) = (deliver?, basic_properties?, content?);
    Some(Delivery {
        consumer_tag: deliver.consumer_tag().clone(),
        delivery_tag: deliver.delivery_tag(),
        redelivered: deliver.redelivered(),
        exchange: deliver.exchange().clone(),
        routing_key: deliver.routing_key().clone(),
        properties: from_properties(&properties),
        payload: content.into(),
    })
}

/// An amqprs `basic.return` as core's.
pub(crate) fn returned(ret: &Return, properties: &BasicProperties, content: Vec<u8>) -> Returned {
    Returned {
        reply_code: ret.reply_code(),
        reply_text: ret.reply_text().clone(),
        exchange: ret.exchange().clone(),
        routing_key: ret.routing_key().clone(),
        properties: from_properties(properties),
        payload: content.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp_rebound_core::ErrorClass;

    #[test]
    fn long_strings_that_are_not_utf8_are_named_before_sending() {
        let mut inner = FieldTable::default();
        inner.insert("bin".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        let mut headers = FieldTable::default();
        headers.insert("ok".into(), AMQPValue::LongString("héllo".into()));
        headers.insert("t".into(), AMQPValue::FieldTable(inner));
        let err = check_utf8_table("headers", &headers).unwrap_err();
        assert!(err.contains("headers.t.bin"), "{err}");
        let mut fine = FieldTable::default();
        fine.insert("b".into(), AMQPValue::ByteArray(vec![0xff].into()));
        assert_eq!(check_utf8_table("headers", &fine), Ok(()));
    }

    #[test]
    fn network_errors_are_io() {
        let e = AmqprsError::NetworkError("network io error: Connection refused".into());
        assert!(matches!(map_error(&e), TransportError::Io(_)));
        assert_eq!(map_error(&e).class(), ErrorClass::Transient);
        // A refused dial is not mistaken for refused credentials.
        assert!(matches!(map_open_error(&e, "pw"), TransportError::Io(_)));
    }

    // What amqprs 2.1.5 prints for a `connection.close` instead of `open-ok`.
    const NOT_ALLOWED: &str = "AMQP connection open error: failed to open connection, reason: \
        Close(MethodHeader { class_id: 10, method_id: 50 }, Close { reply_code: 530, \
        reply_text: ShortStr(55, \"NOT_ALLOWED - access to vhost 'x' refused for user \\\"g\\\"\"), \
        class_id: 10, method_id: 40 })";

    #[test]
    fn a_close_during_the_handshake_keeps_its_reply_code() {
        assert_eq!(
            parse_close(NOT_ALLOWED),
            Some((
                530,
                "NOT_ALLOWED - access to vhost 'x' refused for user \"g\"".to_owned()
            ))
        );
        let e = AmqprsError::ConnectionOpenError(NOT_ALLOWED.into());
        assert_eq!(map_open_error(&e, "pw").reply_code(), Some(530));
        assert_eq!(map_open_error(&e, "pw").class(), ErrorClass::Refused);
        let refused = NOT_ALLOWED
            .replace("530", "403")
            .replace("NOT_ALLOWED", "ACCESS_REFUSED");
        let e = AmqprsError::ConnectionOpenError(refused);
        assert!(matches!(map_open_error(&e, "pw"), TransportError::Auth(_)));
        assert_eq!(parse_close("no frame here"), None);
        assert_eq!(parse_close("Close { reply_code: 1"), None);
    }

    #[test]
    fn a_silent_close_during_the_handshake_is_auth_and_scrubbed() {
        let e = AmqprsError::NetworkError("s3cret-pw: peer shutdown".into());
        let mapped = map_open_error(&e, "s3cret-pw");
        let TransportError::Auth(text) = &mapped else {
            panic!("expected Auth, got {mapped:?}");
        };
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert_eq!(mapped.class(), ErrorClass::Refused);
        // What RabbitMQ 3.10 does on Linux after a failed login.
        let e = AmqprsError::NetworkError(
            "network io error: Connection reset by peer (os error 104)".into(),
        );
        assert!(matches!(map_open_error(&e, "pw"), TransportError::Auth(_)));
    }

    #[test]
    fn heartbeats_that_amqprs_cannot_run_are_adjusted() {
        assert_eq!(heartbeat(None), 60);
        assert_eq!(heartbeat(Some(0)), 60);
        assert_eq!(heartbeat(Some(1)), 2);
        assert_eq!(heartbeat(Some(2)), 2);
        assert_eq!(heartbeat(Some(30)), 30);
    }

    #[test]
    fn long_names_are_refused_not_panicking() {
        assert!(short("routing key", &"k".repeat(255)).is_ok());
        let err = short("routing key", &"k".repeat(256)).unwrap_err();
        assert!(err.to_string().contains("routing key is 256 bytes"));
        let mut p = Properties::default();
        p.message_id = Some("m".repeat(300));
        assert!(to_properties(&p).is_err());
        assert!(exchange_kind(&ExchangeKind::Custom("x".repeat(256))).is_err());
    }

    #[test]
    fn long_endpoint_fields_are_refused() {
        // a vhost past 255 bytes is refused by Endpoint::parse already
        assert!(Endpoint::parse(&format!("amqp://u:p@localhost/{}", "v".repeat(256))).is_err());
        let ep = Endpoint::parse(&format!(
            "amqp://{}:p@localhost/%2f?auth_mechanism=amqplain",
            "u".repeat(200)
        ))
        .unwrap();
        assert!(open_arguments(&ep, &ConnectOptions::default(), None).is_err());
        let ep = Endpoint::parse("amqp://u:p@[::1]:5673/%2f?heartbeat=1").unwrap();
        let args = open_arguments(&ep, &ConnectOptions::named("n"), None).unwrap();
        assert_eq!(args.get_host(), "[::1]");
        assert_eq!(args.get_port(), 5673);
        assert_eq!(args.get_heartbeat(), 2);
        assert_eq!(args.get_connection_name(), Some("n"));
        assert_eq!(args.get_virtual_host(), "/");
    }

    #[test]
    fn tls_endpoints_get_an_adaptor() {
        let ep = Endpoint::parse("amqps://u:p@rabbit.example/%2f").unwrap();
        let config = rustls::client_config(None).unwrap();
        let args = open_arguments(&ep, &ConnectOptions::default(), Some(config)).unwrap();
        assert!(args.get_tls_adaptor().is_some());
        assert_eq!(args.get_port(), 5671);
    }

    #[test]
    fn non_utf8_long_strings_are_refused() {
        let mut table = FieldTable::default();
        table.insert("bin".into(), AMQPValue::LongString(vec![0xff, 0xfe].into()));
        assert!(to_table("a header", &table).is_err());
    }

    #[test]
    fn field_values_round_trip() {
        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::Boolean(true));
        let mut table = FieldTable::default();
        let values = [
            AMQPValue::Boolean(false),
            AMQPValue::ShortShortInt(-3),
            AMQPValue::ShortShortUInt(3),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(300),
            AMQPValue::LongInt(-70_000),
            AMQPValue::LongUInt(70_000),
            AMQPValue::LongLongInt(1 << 40),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(amq_protocol_types::DecimalValue {
                scale: 2,
                value: u32::MAX - 5,
            }),
            AMQPValue::LongString("héllo".into()),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::Void].into()),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(nested),
            AMQPValue::ByteArray(vec![0u8, 1, 255].into()),
            AMQPValue::Void,
        ];
        for (i, v) in values.iter().enumerate() {
            table.insert(format!("k{i}").into(), v.clone());
        }
        assert_eq!(from_table(&to_table("t", &table).unwrap()), table);
        // A short string comes back as a long one.
        let mut short_one = FieldTable::default();
        short_one.insert("s".into(), AMQPValue::ShortString("x".into()));
        let back = from_table(&to_table("t", &short_one).unwrap());
        assert_eq!(
            back.inner().get("s"),
            Some(&AMQPValue::LongString("x".into()))
        );
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
        let back = from_properties(&to_properties(&p).unwrap());
        assert_eq!(back, p);
        // the flags too (they decide what goes on the wire): as amqprs's own
        // all-fields constructor sets them
        let text = |v: &Option<String>| v.clone();
        let all = BasicProperties::new(
            text(&p.content_type),
            text(&p.content_encoding),
            p.headers.as_ref().map(|h| to_table("h", h).unwrap()),
            p.delivery_mode,
            p.priority,
            text(&p.correlation_id),
            text(&p.reply_to),
            text(&p.expiration),
            text(&p.message_id),
            p.timestamp,
            text(&p.kind),
            text(&p.user_id),
            text(&p.app_id),
            None,
        );
        assert_eq!(
            format!("{:?}", to_properties(&p).unwrap()),
            format!("{all:?}")
        );
        // none set, and some
        assert_eq!(
            format!("{:?}", to_properties(&Properties::default()).unwrap()),
            format!("{:?}", BasicProperties::default())
        );
        let mut some = Properties::default().persistent();
        some.app_id = Some("a".into());
        let mut expected = BasicProperties::default();
        expected.with_delivery_mode(2).with_app_id("a");
        assert_eq!(
            format!("{:?}", to_properties(&some).unwrap()),
            format!("{expected:?}")
        );
        assert_eq!(
            from_properties(&to_properties(&Properties::default()).unwrap()),
            Properties::default()
        );
    }
}
