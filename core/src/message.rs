//! What is published and delivered: [`Message`], [`Properties`], [`Delivery`],
//! [`Returned`].

use bytes::Bytes;

pub use amq_protocol_types::{AMQPValue, FieldTable};

/// AMQP basic properties of a message. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Properties {
    /// MIME content type, e.g. `application/json`.
    pub content_type: Option<String>,
    /// MIME content encoding, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Option<FieldTable>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: Option<u8>,
    /// Priority, 0 to 9.
    pub priority: Option<u8>,
    /// Correlates a reply with its request.
    pub correlation_id: Option<String>,
    /// Queue to reply to.
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a string.
    pub expiration: Option<String>,
    /// Application message id.
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub timestamp: Option<u64>,
    /// Message type name (the AMQP `type` property).
    pub kind: Option<String>,
    /// The publishing user; RabbitMQ checks it against the connection's user.
    pub user_id: Option<String>,
    /// The publishing application.
    pub app_id: Option<String>,
}

impl Properties {
    /// Whether no property is set: equality with the defaults, asked as
    /// `is_none` of each field (cheaper than `==`, on every publish).
    fn is_default(&self) -> bool {
        let Properties {
            content_type,
            content_encoding,
            headers,
            delivery_mode,
            priority,
            correlation_id,
            reply_to,
            expiration,
            message_id,
            timestamp,
            kind,
            user_id,
            app_id,
        } = self;
        content_type.is_none()
            && content_encoding.is_none()
            && headers.is_none()
            && delivery_mode.is_none()
            && priority.is_none()
            && correlation_id.is_none()
            && reply_to.is_none()
            && expiration.is_none()
            && message_id.is_none()
            && timestamp.is_none()
            && kind.is_none()
            && user_id.is_none()
            && app_id.is_none()
    }

    /// Marks the message persistent (delivery mode 2).
    pub fn persistent(mut self) -> Self {
        self.delivery_mode = Some(2);
        self
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, value: impl Into<String>) -> Self {
        self.content_type = Some(value.into());
        self
    }

    /// Sets the message id.
    pub fn with_message_id(mut self, value: impl Into<String>) -> Self {
        self.message_id = Some(value.into());
        self
    }

    /// Sets the application headers.
    pub fn with_headers(mut self, headers: FieldTable) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Sets the content encoding.
    pub fn with_content_encoding(mut self, value: impl Into<String>) -> Self {
        self.content_encoding = Some(value.into());
        self
    }

    /// Sets the delivery mode (1 transient, 2 persistent).
    pub fn with_delivery_mode(mut self, mode: u8) -> Self {
        self.delivery_mode = Some(mode);
        self
    }

    /// Sets the priority (0 to 9 for a priority queue).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, value: impl Into<String>) -> Self {
        self.correlation_id = Some(value.into());
        self
    }

    /// Sets the queue to reply to.
    pub fn with_reply_to(mut self, value: impl Into<String>) -> Self {
        self.reply_to = Some(value.into());
        self
    }

    /// Sets the per-message TTL, in milliseconds (sent as the decimal string
    /// AMQP wants).
    pub fn with_expiration_ms(mut self, ms: u64) -> Self {
        self.expiration = Some(ms.to_string());
        self
    }

    /// Sets the timestamp, in seconds since the Unix epoch.
    pub fn with_timestamp(mut self, seconds: u64) -> Self {
        self.timestamp = Some(seconds);
        self
    }

    /// Sets the message type name (the AMQP `type` property).
    pub fn with_kind(mut self, value: impl Into<String>) -> Self {
        self.kind = Some(value.into());
        self
    }

    /// Sets the publishing user (RabbitMQ checks it against the connection's).
    pub fn with_user_id(mut self, value: impl Into<String>) -> Self {
        self.user_id = Some(value.into());
        self
    }

    /// Sets the publishing application.
    pub fn with_app_id(mut self, value: impl Into<String>) -> Self {
        self.app_id = Some(value.into());
        self
    }
}

/// The longest AMQP short string (property values, header keys, names).
pub const SHORT_STRING_MAX: usize = 255;

/// The largest frame RabbitMQ negotiates by default (its `frame_max`, 131,072
/// bytes): a message's properties travel in one content-header frame, so they
/// must fit in it.
pub const FRAME_MAX_DEFAULT: u32 = 131_072;

/// How deep tables and arrays may nest in headers. Clients parse nested tables
/// recursively: lapin's reader overflows its thread's stack on a delivery
/// nested about 200 deep, and amqprs's a few hundred deep, so deeper headers
/// are refused before they reach a queue (any consumer of it would crash).
pub const HEADERS_DEPTH_MAX: usize = 64;

/// The largest `expiration` RabbitMQ takes, in milliseconds (2^32 - 1).
pub const EXPIRATION_MAX: u64 = u32::MAX as u64;

impl Properties {
    /// Checks what the AMQP wire format and RabbitMQ limit, naming the field at
    /// fault:
    ///
    /// - every short-string property (`content_type`, `content_encoding`,
    ///   `correlation_id`, `reply_to`, `expiration`, `message_id`, `type`,
    ///   `user_id`, `app_id`) at most 255 bytes;
    /// - `expiration` a number of milliseconds up to [`EXPIRATION_MAX`];
    /// - `delivery_mode` 1 (transient) or 2 (persistent);
    /// - header keys and short-string header values at most 255 bytes, floats
    ///   finite (RabbitMQ closes the connection on a NaN or an infinity),
    ///   tables and arrays nested at most [`HEADERS_DEPTH_MAX`] deep;
    /// - the properties, encoded as the transports send them, fit in one frame
    ///   of [`FRAME_MAX_DEFAULT`] bytes (the client checks against the URI's
    ///   `frame_max` when it sets a smaller one).
    ///
    /// RabbitMQ answers each of these with the loss of the channel or the
    /// connection, so the client refuses them first:
    /// [`Client::publish`](crate::Client::publish) runs the checks on the
    /// caller's thread and fails the one message with
    /// [`PublishError::Invalid`](crate::PublishError::Invalid).
    pub fn validate(&self) -> Result<(), String> {
        self.check(FRAME_MAX_DEFAULT)
    }

    /// [`validate`](Self::validate), against frames of `frame_max` bytes.
    pub(crate) fn check(&self, frame_max: u32) -> Result<(), String> {
        let short = [
            ("content_type", &self.content_type),
            ("content_encoding", &self.content_encoding),
            ("correlation_id", &self.correlation_id),
            ("reply_to", &self.reply_to),
            ("expiration", &self.expiration),
            ("message_id", &self.message_id),
            ("type", &self.kind),
            ("user_id", &self.user_id),
            ("app_id", &self.app_id),
        ];
        // the content header: class, weight, body size, property flags
        let mut size = 14usize;
        for (field, value) in short {
            if let Some(value) = value {
                if value.len() > SHORT_STRING_MAX {
                    return Err(format!(
                        "property {field} is {} bytes long; AMQP allows {SHORT_STRING_MAX}",
                        value.len()
                    ));
                }
                size += 1 + value.len();
            }
        }
        if let Some(expiration) = &self.expiration
            && (expiration.is_empty()
                || !expiration.bytes().all(|b| b.is_ascii_digit())
                || expiration
                    .parse::<u64>()
                    .map_or(true, |ms| ms > EXPIRATION_MAX))
        {
            return Err(format!(
                "property expiration {expiration:?} is not a number of milliseconds from 0 \
                 to {EXPIRATION_MAX}"
            ));
        }
        if let Some(mode) = self.delivery_mode
            && mode != 1
            && mode != 2
        {
            return Err(format!(
                "property delivery_mode is {mode}; AMQP defines 1 (transient) and 2 (persistent)"
            ));
        }
        if let Some(headers) = &self.headers {
            size += check_table("headers", headers, 1)?;
        }
        size += usize::from(self.delivery_mode.is_some())
            + usize::from(self.priority.is_some())
            + if self.timestamp.is_some() { 8 } else { 0 };
        let room = (frame_max as usize).saturating_sub(8);
        if frame_max != 0 && size > room {
            return Err(format!(
                "the properties take {size} bytes encoded; a frame carries {room} \
                 (frame_max {frame_max}), and they must fit in one"
            ));
        }
        Ok(())
    }
}

/// Checks the argument table of a declaration, a binding or a consumer
/// (`what` names it) as [`Properties::check`] checks headers: short strings,
/// finite floats, nesting at most [`HEADERS_DEPTH_MAX`] deep, and room for the
/// table, beside the method's other strings (`names` bytes encoded), in one frame of
/// `frame_max` bytes. RabbitMQ closes the whole connection on a method frame
/// past `frame_max` (501 FRAME_ERROR).
pub(crate) fn check_arguments(
    what: &str,
    table: &FieldTable,
    names: usize,
    frame_max: u32,
) -> Result<(), String> {
    if table.inner().is_empty() {
        return Ok(());
    }
    // class and method ids, the reserved short, the flags octet
    let size = 4 + 2 + 1 + names + check_table(what, table, 1)?;
    let room = (frame_max as usize).saturating_sub(8);
    if frame_max != 0 && size > room {
        return Err(format!(
            "the {what} take {size} bytes encoded with the method; a frame carries {room} \
             (frame_max {frame_max}), and they must fit in one"
        ));
    }
    Ok(())
}

/// The encoded size of short strings.
pub(crate) fn short_strings(names: &[&str]) -> usize {
    names.iter().map(|name| 1 + name.len()).sum()
}

/// Checks a table nested `depth` deep (the headers are 1); its encoded size.
fn check_table(path: &str, table: &FieldTable, depth: usize) -> Result<usize, String> {
    too_deep(path, depth)?;
    let mut size = 4;
    for (key, value) in table.inner() {
        let key = key.as_str();
        if key.len() > SHORT_STRING_MAX {
            return Err(format!(
                "{path}: a key is {} bytes long; AMQP allows {SHORT_STRING_MAX}",
                key.len()
            ));
        }
        size += 1 + key.len() + check_value(&format!("{path}.{key}"), value, depth)?;
    }
    Ok(size)
}

/// Refuses a table or array nested `depth` deep past [`HEADERS_DEPTH_MAX`].
fn too_deep(path: &str, depth: usize) -> Result<(), String> {
    if depth > HEADERS_DEPTH_MAX {
        return Err(format!(
            "{path} nests tables or arrays more than {HEADERS_DEPTH_MAX} deep"
        ));
    }
    Ok(())
}

/// Checks a value held at `depth`; its encoded size, its type tag included.
fn check_value(path: &str, value: &AMQPValue, depth: usize) -> Result<usize, String> {
    let size = match value {
        AMQPValue::ShortString(s) if s.as_str().len() > SHORT_STRING_MAX => {
            return Err(format!(
                "{path} is a short string of {} bytes; AMQP allows {SHORT_STRING_MAX}",
                s.as_str().len()
            ));
        }
        AMQPValue::LongString(s) if u32::try_from(s.as_bytes().len()).is_err() => {
            return Err(format!(
                "{path} is longer than a long string can be (4 GiB)"
            ));
        }
        AMQPValue::Float(f) if !f.is_finite() => {
            return Err(format!("{path} is {f}; RabbitMQ takes finite floats only"));
        }
        AMQPValue::Double(f) if !f.is_finite() => {
            return Err(format!("{path} is {f}; RabbitMQ takes finite floats only"));
        }
        AMQPValue::FieldTable(table) => check_table(path, table, depth + 1)?,
        AMQPValue::FieldArray(array) => {
            too_deep(path, depth + 1)?;
            let mut size = 4;
            for (i, value) in array.as_slice().iter().enumerate() {
                size += check_value(&format!("{path}[{i}]"), value, depth + 1)?;
            }
            size
        }
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        // both transports send a short-string value as a long string (RabbitMQ
        // takes no short strings in tables)
        AMQPValue::ShortString(s) => 4 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::Void => 0,
    };
    Ok(1 + size)
}

/// A message to publish.
///
/// Its properties are stored apart, and only when set ([`MessageProperties`]):
/// a message with the default properties is 96 bytes, not 360, which is what a
/// message waiting in the outbox costs beside its payload and names.
#[derive(Debug, PartialEq)]
pub struct Message {
    /// Exchange name; `""` is the default exchange (routes by queue name).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub payload: Bytes,
    /// Properties: reads and writes go through to a [`Properties`]
    /// (`message.properties.content_type`, `&message.properties` where a
    /// `&Properties` is wanted); set them whole with
    /// [`Message::with_properties`] or `Properties::into()`.
    pub properties: MessageProperties,
    /// Ask the broker to return the message if no queue takes it
    /// (it then resolves as `Returned`).
    pub mandatory: bool,
}

impl Clone for Message {
    fn clone(&self) -> Self {
        Message {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            payload: self.payload.clone(),
            properties: MessageProperties(self.properties.0.clone()),
            mandatory: self.mandatory,
        }
    }
}

/// A message's [`Properties`], boxed, and absent while they are the defaults
/// (most messages set none, or a few): 8 bytes in the [`Message`] instead of
/// the ~270 of an inline `Properties`.
///
/// It dereferences to `Properties`, for reading (the defaults when none are
/// set) and for writing (which stores them). `.clone()` on it, through that,
/// gives a `Properties`. Equality compares the properties, so none set equals
/// the defaults set.
#[derive(Default)]
pub struct MessageProperties(Option<Box<Properties>>);

/// The defaults, for a message that has none set.
static DEFAULT_PROPERTIES: Properties = Properties {
    content_type: None,
    content_encoding: None,
    headers: None,
    delivery_mode: None,
    priority: None,
    correlation_id: None,
    reply_to: None,
    expiration: None,
    message_id: None,
    timestamp: None,
    kind: None,
    user_id: None,
    app_id: None,
};

impl MessageProperties {
    /// Whether any property is stored (a write through `DerefMut` stores them,
    /// even if it leaves the defaults).
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// [`Properties::check`]; the defaults pass without a look (they fit any
    /// frame the client accepts).
    pub(crate) fn check(&self, frame_max: u32) -> Result<(), String> {
        match &self.0 {
            None => Ok(()),
            Some(properties) => properties.check(frame_max),
        }
    }
}

impl From<Properties> for MessageProperties {
    /// Stores `properties`, or nothing when they are the defaults.
    fn from(properties: Properties) -> Self {
        if properties.is_default() {
            // every field is `None`: there is nothing to drop, so the drop
            // glue (thirteen fields, on every publish) is skipped
            std::mem::forget(properties);
            MessageProperties(None)
        } else {
            MessageProperties(Some(Box::new(properties)))
        }
    }
}

impl std::ops::Deref for MessageProperties {
    type Target = Properties;

    fn deref(&self) -> &Properties {
        self.0.as_deref().unwrap_or(&DEFAULT_PROPERTIES)
    }
}

impl std::ops::DerefMut for MessageProperties {
    fn deref_mut(&mut self) -> &mut Properties {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for MessageProperties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl PartialEq<Properties> for MessageProperties {
    fn eq(&self, other: &Properties) -> bool {
        **self == *other
    }
}

impl std::fmt::Debug for MessageProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl Message {
    /// A message with default properties, not mandatory.
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload: payload.into(),
            properties: MessageProperties::default(),
            mandatory: false,
        }
    }

    /// Sets the properties.
    pub fn with_properties(mut self, properties: Properties) -> Self {
        self.properties = properties.into();
        self
    }

    /// Sets the mandatory flag.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }
}

/// A message delivered to a consumer, as the transport reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The consumer it was delivered to.
    pub consumer_tag: String,
    /// The broker's tag for it, valid on this channel generation only.
    pub delivery_tag: u64,
    /// The broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: Properties,
    /// Its body.
    pub payload: Bytes,
}

/// A mandatory message the broker could not route (`basic.return`).
#[derive(Debug, Clone, PartialEq)]
pub struct Returned {
    /// The reply code, usually 312 NO_ROUTE.
    pub reply_code: u16,
    /// The broker's reason.
    pub reply_text: String,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Its properties.
    pub properties: Properties,
    /// Its body.
    pub payload: Bytes,
}
