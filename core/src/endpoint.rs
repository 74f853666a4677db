//! Broker endpoints: parsing `amqp://` and `amqps://` URIs into [`Endpoint`]s, and
//! keeping their passwords out of every printed form.
//!
//! Parsing goes through [`amq_protocol_uri::AMQPUri`], which both adapters understand,
//! with three of its flaws worked around here:
//!
//! - its `Display` prints the password, so [`Endpoint`] prints [`Endpoint::redacted`]
//!   instead and never exposes the `AMQPUri` through a formatting trait;
//! - it takes the host from `Url::domain()`, which is `None` for an IPv6 literal, so
//!   `amqp://[::1]` would silently connect to `localhost`; the real host is put back;
//! - its error messages can echo the whole input, password included, so they are never
//!   passed on: every [`ConfigError::InvalidUri`] carries a reason written here and the
//!   URI run through [`redact`].
//!
//! ```
//! use amqp_rebound_core::endpoint::{parse_host_list, Endpoint};
//!
//! let ep = Endpoint::parse("amqp://app:s3cr3t@[::1]:5673/%2f?heartbeat=5")?;
//! assert_eq!(ep.host(), "::1");
//! assert_eq!(ep.port(), 5673);
//! assert_eq!(ep.vhost(), "/");
//! assert_eq!(ep.heartbeat(), Some(5));
//! assert_eq!(ep.to_string(), "amqp://app:***@[::1]:5673/%2f?heartbeat=5");
//!
//! let hosts = parse_host_list("amqp://a, amqps://b")?;
//! assert_eq!(hosts.len(), 2);
//! # Ok::<(), amqp_rebound_core::error::ConfigError>(())
//! ```

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use amq_protocol_uri::{AMQPScheme, AMQPUri, SASLMechanism};
use url::{Host, Url};

use crate::error::ConfigError;

/// One broker to connect to: a parsed, validated `amqp://` or `amqps://` URI.
///
/// `Debug` and `Display` both print the [redacted](Endpoint::redacted) form, so an
/// `Endpoint` can go into logs and errors as it is; [`Endpoint::password`] is the only
/// way to read the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    // Invariant: `uri.authority.host` is the real host (IP literals included, IPv6
    // without brackets), non-empty, and `uri.authority.port` is not 0.
    uri: AMQPUri,
}

impl Endpoint {
    /// Parses one `amqp://` or `amqps://` URI.
    ///
    /// Follows the [RabbitMQ URI spec](https://www.rabbitmq.com/docs/uri-spec) as
    /// `amq-protocol-uri` implements it: user and password default to `guest`, the port
    /// to 5672 (`amqp`) or 5671 (`amqps`), a missing path means vhost `/`, and a bare `/`
    /// means the empty vhost. The query options `heartbeat`, `frame_max`, `channel_max`,
    /// `connection_timeout` and `auth_mechanism` are kept; unknown ones are ignored.
    ///
    /// Errors are [`ConfigError::InvalidUri`] with index 0; use [`parse_hosts`] to get
    /// the position in a list.
    pub fn parse(uri: &str) -> Result<Endpoint, ConfigError> {
        parse_at(uri, 0)
    }

    /// The parsed URI, for adapters that hand it to their client library.
    ///
    /// Its host is the real one (see the module docs), IPv6 without brackets. It holds
    /// the password, and its `Display` prints it: never log it.
    pub fn amqp_uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// The host: a name (`rabbit.example`), an IPv4 literal (`127.0.0.1`) or an IPv6
    /// literal without brackets (`::1`).
    ///
    /// Without brackets because that is what `(host, port)` socket-address lookups and
    /// TLS server names take. To build a `host:port` string, wrap an IPv6 host (one that
    /// contains `:`) in brackets first.
    pub fn host(&self) -> &str {
        &self.uri.authority.host
    }

    /// The TCP port, never 0.
    pub fn port(&self) -> u16 {
        self.uri.authority.port
    }

    /// The virtual host, percent-decoded (`%2f` gives `/`).
    pub fn vhost(&self) -> &str {
        &self.uri.vhost
    }

    /// The user name, percent-decoded.
    pub fn username(&self) -> &str {
        &self.uri.authority.userinfo.username
    }

    /// The password, percent-decoded. The only accessor that reveals it.
    pub fn password(&self) -> &str {
        &self.uri.authority.userinfo.password
    }

    /// Whether this endpoint uses TLS (`amqps://`).
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The heartbeat interval in seconds asked for in the URI, if any.
    pub fn heartbeat(&self) -> Option<u16> {
        self.uri.query.heartbeat
    }

    /// The URI with the password replaced by `***`, safe to log.
    ///
    /// Rebuilt from the parsed fields rather than cut out of the input, so nothing the
    /// parser ignored (a fragment, an unknown query option that might hold a secret)
    /// can leak through. Parsing it again gives the same endpoint, bar the password.
    ///
    /// ```
    /// # use amqp_rebound_core::endpoint::Endpoint;
    /// let ep = Endpoint::parse("amqp://127.0.0.1/%2f?heartbeat=2")?;
    /// assert_eq!(ep.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=2");
    /// # Ok::<(), amqp_rebound_core::error::ConfigError>(())
    /// ```
    pub fn redacted(&self) -> String {
        let uri = &self.uri;
        let host = &uri.authority.host;
        // Only an IPv6 literal can contain ':' (parse allows no punctuation in names
        // but '-', '.' and '_'), and a URI needs it bracketed.
        let host: Cow<'_, str> = if host.contains(':') {
            Cow::Owned(format!("[{host}]"))
        } else {
            Cow::Borrowed(host)
        };
        let mut out = format!(
            "{}://{}:***@{}:{}/{}",
            uri.scheme,
            percent_encode(&uri.authority.userinfo.username),
            host,
            uri.authority.port,
            percent_encode(&uri.vhost),
        );
        let q = &uri.query;
        let options: [(&str, Option<String>); 5] = [
            ("heartbeat", q.heartbeat.map(|v| v.to_string())),
            ("frame_max", q.frame_max.map(|v| v.to_string())),
            ("channel_max", q.channel_max.map(|v| v.to_string())),
            (
                "connection_timeout",
                q.connection_timeout.map(|v| v.to_string()),
            ),
            (
                "auth_mechanism",
                q.auth_mechanism.map(|v| v.name().to_owned()),
            ),
        ];
        let mut sep = '?';
        for (key, value) in options {
            if let Some(value) = value {
                out.push(sep);
                out.push_str(key);
                out.push('=');
                out.push_str(&value);
                sep = '&';
            }
        }
        out
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Endpoint").field(&self.redacted()).finish()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Parses a list of URIs, in order.
///
/// The index in a [`ConfigError::InvalidUri`] is the URI's position in `uris`. An empty
/// list is [`ConfigError::EmptyHostList`].
pub fn parse_hosts<I, S>(uris: I) -> Result<Vec<Endpoint>, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let endpoints = uris
        .into_iter()
        .enumerate()
        .map(|(index, uri)| parse_at(uri.as_ref(), index))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(ConfigError::EmptyHostList);
    }
    Ok(endpoints)
}

/// Parses a comma-separated list of URIs, as found in environment variables such as
/// `AMQP_URL="amqp://a,amqp://b"`.
///
/// Items are trimmed and empty items skipped, so `"amqp://a, ,amqp://b,"` gives two
/// endpoints; the index in an error counts only the non-empty items. A password that
/// contains `,` must be percent-encoded (`%2C`), as the split happens before parsing.
/// No item at all is [`ConfigError::EmptyHostList`].
pub fn parse_host_list(list: &str) -> Result<Vec<Endpoint>, ConfigError> {
    parse_hosts(
        list.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty()),
    )
}

/// Replaces what looks like a password in `uri` with `***`, for strings that may not
/// even parse. Used for the URI shown in [`ConfigError::InvalidUri`].
///
/// Best effort, erring towards hiding too much:
///
/// - the user info runs to the *last* `@`, so a password with a stray `/` or `@` is
///   still hidden; everything after its first `:` is hidden, and without a `://` the
///   whole user info is, since the scheme or user cannot be told apart from a password;
/// - without an `@`, a "port" that is not a valid port number is hidden with all that
///   follows it, because `amqp://user:password` (host forgotten) reads as host `user`,
///   port `password`;
/// - the value of every query option but the numeric ones AMQP URIs define
///   (`heartbeat`, `frame_max`, `channel_max`, `connection_timeout`) and
///   `auth_mechanism` is hidden.
///
/// ```
/// # use amqp_rebound_core::endpoint::redact;
/// assert_eq!(redact("amqp://app:s3cr3t@host:5672/%2f"), "amqp://app:***@host:5672/%2f");
/// assert_eq!(redact("amqp://app:s3cr3t"), "amqp://app:***");
/// ```
pub fn redact(uri: &str) -> String {
    let (prefix, rest) = match uri.find("://") {
        Some(i) => uri.split_at(i + 3),
        None => ("", uri),
    };
    let mut out = String::with_capacity(uri.len());
    out.push_str(prefix);
    let tail = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, tail) = rest.split_at(at);
            if prefix.is_empty() {
                out.push_str("***");
            } else if let Some(colon) = userinfo.find(':') {
                out.push_str(&userinfo[..=colon]);
                out.push_str("***");
            } else {
                out.push_str(userinfo);
            }
            tail
        }
        None => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let authority = &rest[..end];
            // Skip an IPv6 literal's colons when looking for the port.
            let search_from = match authority.strip_prefix('[') {
                Some(inner) => inner.find(']').map_or(authority.len(), |i| i + 2),
                None => 0,
            };
            match authority[search_from..].find(':') {
                // Not a port, so a password: what follows it may be the rest of the
                // password (a raw '/', '?' or '#'), so it goes too.
                Some(colon) if !is_port(&authority[search_from + colon + 1..]) => {
                    out.push_str(&authority[..=search_from + colon]);
                    out.push_str("***");
                    return out;
                }
                _ => rest,
            }
        }
    };
    match tail.split_once('?') {
        Some((before, query)) => {
            out.push_str(before);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                // only the options AMQP URIs define, whose values are numbers or
                // mechanism names, are shown; any other value may be a secret
                match pair.split_once('=') {
                    Some((key, _)) if !SHOWN_OPTIONS.contains(&key) => {
                        out.push_str(key);
                        out.push_str("=***");
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(tail),
    }
    out
}

/// Query options whose values [`redact`] shows.
const SHOWN_OPTIONS: [&str; 5] = [
    "heartbeat",
    "frame_max",
    "channel_max",
    "connection_timeout",
    "auth_mechanism",
];

/// Whether `s` is what a URI may carry as a port: empty, or digits up to 65535.
fn is_port(s: &str) -> bool {
    s.is_empty() || (s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok())
}

fn parse_at(uri: &str, index: usize) -> Result<Endpoint, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidUri {
        index,
        uri: redact(uri),
        reason,
    };
    // `url` does the syntax: its `ParseError` messages are fixed strings that never
    // quote the input, unlike `amq-protocol-uri`'s.
    let url = Url::parse(uri).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return Err(invalid("the scheme must be amqp:// or amqps://".into()));
    }
    if url.cannot_be_a_base() {
        return Err(invalid("expected `//` and a host after the scheme".into()));
    }
    let ip_host = match url.host() {
        None => return Err(invalid("the host is missing".into())),
        Some(Host::Domain("")) => return Err(invalid("the host is empty".into())),
        // Names are taken from `AMQPUri`, which percent-decodes them.
        Some(Host::Domain(_)) => None,
        // `amqp` is not a "special" scheme to `url`, so IPv4 literals arrive as
        // `Domain` in practice; handled anyway in case that changes.
        Some(Host::Ipv4(addr)) => Some(addr.to_string()),
        // No brackets: lapin (through amq-protocol-tcp 10) resolves the tuple
        // `(host, port)` and uses `host` as the TLS server name, and both parse
        // `::1` as an IP but would send `[::1]` to DNS. Adapters that build a
        // `host:port` string (amqprs does) must add the brackets themselves.
        Some(Host::Ipv6(addr)) => Some(addr.to_string()),
    };
    if url.port() == Some(0) {
        return Err(invalid("port 0 is not a port one can connect to".into()));
    }
    check_query(&url).map_err(invalid)?;
    if !is_percent_encoded(url.path()) {
        return Err(invalid(
            "the vhost holds a '%' not followed by two hex digits (write %25 for '%')".into(),
        ));
    }

    let mut parsed = AMQPUri::from_str(uri).map_err(|_| {
        // Everything else was checked above; what remains is percent-decoding.
        invalid(
            "the user name, password, host or vhost is not valid UTF-8 once percent-decoded".into(),
        )
    })?;
    match ip_host {
        Some(ip) => parsed.authority.host = ip,
        None => {
            let name = &parsed.authority.host;
            // Allow-listed, so a decoded `%2F`, `%3A` or `%25` cannot make `host:port`
            // strings, DNS lookups or the redacted form ambiguous.
            let allowed = |c: char| c.is_alphanumeric() || matches!(c, '-' | '.' | '_');
            if name.is_empty() {
                return Err(invalid("the host is empty".into()));
            }
            if !name.chars().all(allowed) {
                return Err(invalid(
                    "the host name may only hold letters, digits, '-', '.' and '_'".into(),
                ));
            }
        }
    }
    if parsed.vhost.len() > crate::message::SHORT_STRING_MAX {
        return Err(invalid(format!(
            "the vhost is {} bytes long; AMQP allows {}",
            parsed.vhost.len(),
            crate::message::SHORT_STRING_MAX
        )));
    }
    Ok(Endpoint { uri: parsed })
}

/// Whether every `%` in `s` starts a `%XX` escape.
fn is_percent_encoded(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(i, &c)| {
        c != b'%'
            || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// The largest `frame_max` a URI may ask for (1 MiB; RabbitMQ's default is
/// 128 KiB).
pub const FRAME_MAX_LIMIT: u32 = 1 << 20;

/// Checks the query options `AMQPUri` would parse, so that its errors (which quote the
/// input) never happen.
fn check_query(url: &Url) -> Result<(), String> {
    // `AMQPUri` reads the first occurrence of each key; so must this.
    let first = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value)
    };
    let number = |key: &str, fits: fn(&str) -> bool, range: &str| match first(key) {
        Some(value) if !fits(&value) => Err(format!(
            "query option {key} must be a whole number from {range}"
        )),
        _ => Ok(()),
    };
    number("heartbeat", |v| v.parse::<u16>().is_ok(), "0 to 65535")?;
    number("channel_max", |v| v.parse::<u16>().is_ok(), "0 to 65535")?;
    // AMQP's smallest frame is 4096 bytes; lapin sets aside 32 frames of
    // buffer per direction before it negotiates, so a huge one is an
    // allocation failure (an abort), not a setting
    number(
        "frame_max",
        |v| {
            v.parse::<u32>()
                .is_ok_and(|v| v == 0 || (4096..=FRAME_MAX_LIMIT).contains(&v))
        },
        "0 (the broker's) or 4096 to 1048576",
    )?;
    number(
        "connection_timeout",
        |v| v.parse::<u64>().is_ok(),
        "0 to 18446744073709551615 (milliseconds)",
    )?;
    match first("auth_mechanism") {
        Some(value) if SASLMechanism::from_str(&value).is_err() => Err(
            "query option auth_mechanism must be one of PLAIN, AMQPLAIN, EXTERNAL, \
             ANONYMOUS, RABBIT-CR-DEMO"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, with lowercase hex to
/// match the `%2f` customary in AMQP URIs.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            // Writing to a `String` cannot fail.
            let _ = write!(out, "%{b:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    const PW: &str = "s3cr3t-pw";

    fn parse_ok(uri: &str) -> Endpoint {
        match Endpoint::parse(uri) {
            Ok(ep) => ep,
            Err(e) => panic!("{uri} should parse: {e}"),
        }
    }

    /// Every printed form of a parse result, for leak checks.
    fn outputs(result: &Result<Endpoint, ConfigError>) -> Vec<String> {
        match result {
            Ok(ep) => vec![ep.to_string(), format!("{ep:?}"), ep.redacted()],
            Err(e) => vec![e.to_string(), format!("{e:?}")],
        }
    }

    fn invalid_reason(uri: &str) -> (usize, String) {
        match Endpoint::parse(uri) {
            Err(ConfigError::InvalidUri { index, reason, .. }) => (index, reason),
            other => panic!("{uri} should be InvalidUri, got {other:?}"),
        }
    }

    #[test]
    fn ipv4_literal_is_kept() {
        let ep = parse_ok(&format!("amqp://app:{PW}@127.0.0.1:5673/%2f"));
        assert_eq!(ep.host(), "127.0.0.1");
        assert_eq!(ep.amqp_uri().authority.host, "127.0.0.1");
        assert_eq!(ep.port(), 5673);
        assert_eq!(ep.redacted(), "amqp://app:***@127.0.0.1:5673/%2f");
    }

    #[test]
    fn ipv6_literal_is_kept_without_brackets() {
        // amq-protocol-uri alone turns this host into "localhost".
        let ep = parse_ok(&format!("amqp://app:{PW}@[::1]:5672"));
        assert_eq!(ep.host(), "::1");
        assert_eq!(ep.amqp_uri().authority.host, "::1");
        assert_eq!(ep.port(), 5672);
        assert_eq!(ep.redacted(), "amqp://app:***@[::1]:5672/%2f");

        let ep = parse_ok("amqps://[2001:DB8:0:0::1]");
        assert_eq!(ep.host(), "2001:db8::1");
        assert_eq!(ep.port(), 5671);
        assert!(ep.is_tls());
        assert_eq!(ep.redacted(), "amqps://guest:***@[2001:db8::1]:5671/%2f");
    }

    #[test]
    fn host_name_and_defaults() {
        let ep = parse_ok("amqp://rabbit.example");
        assert_eq!(ep.host(), "rabbit.example");
        assert_eq!(ep.port(), 5672);
        assert_eq!(ep.vhost(), "/");
        assert_eq!(ep.username(), "guest");
        assert_eq!(ep.password(), "guest");
        assert!(!ep.is_tls());
        assert_eq!(ep.heartbeat(), None);

        let ep = parse_ok("amqps://app:pw@rabbit-1.example:6000");
        assert_eq!(ep.port(), 6000);
        assert!(ep.is_tls());
        assert_eq!(ep.username(), "app");
        assert_eq!(ep.password(), "pw");

        assert_eq!(
            Endpoint::parse("amqps://rabbit.example").map(|e| e.port()),
            Ok(5671)
        );
    }

    #[test]
    fn vhosts() {
        assert_eq!(parse_ok("amqp://h/%2f").vhost(), "/");
        assert_eq!(parse_ok("amqp://h/%2F").vhost(), "/");
        assert_eq!(parse_ok("amqp://h").vhost(), "/");
        // The URI spec: a bare "/" names the empty vhost.
        assert_eq!(parse_ok("amqp://h/").vhost(), "");
        assert_eq!(parse_ok("amqp://h/prod").vhost(), "prod");
        assert_eq!(parse_ok("amqp://h/team%2fprod").vhost(), "team/prod");
        assert_eq!(
            parse_ok("amqp://h/team%2fprod").redacted(),
            "amqp://guest:***@h:5672/team%2fprod"
        );
    }

    #[test]
    fn query_options_survive() {
        let ep = parse_ok(
            "amqp://h/?heartbeat=2&frame_max=131072&channel_max=64\
                     &connection_timeout=1500&auth_mechanism=external&unknown=1",
        );
        let q = &ep.amqp_uri().query;
        assert_eq!(ep.heartbeat(), Some(2));
        assert_eq!(q.heartbeat, Some(2));
        assert_eq!(q.frame_max, Some(131_072));
        assert_eq!(q.channel_max, Some(64));
        assert_eq!(q.connection_timeout, Some(1500));
        assert_eq!(q.auth_mechanism, Some(SASLMechanism::External));
        assert_eq!(
            ep.redacted(),
            "amqp://guest:***@h:5672/?heartbeat=2&frame_max=131072&channel_max=64\
             &connection_timeout=1500&auth_mechanism=EXTERNAL"
        );
    }

    #[test]
    fn printed_forms_hide_the_password() {
        let ep = parse_ok(&format!("amqp://guest:{PW}@127.0.0.1:5672/%2f?heartbeat=2"));
        assert_eq!(ep.password(), PW);
        assert_eq!(
            ep.redacted(),
            "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=2"
        );
        assert_eq!(ep.to_string(), ep.redacted());
        assert_eq!(
            format!("{ep:?}"),
            r#"Endpoint("amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=2")"#
        );
        assert!(!format!("{ep:#?}").contains(PW));
        assert!(!format!("{:?}", vec![ep.clone()]).contains(PW));
    }

    #[test]
    fn percent_encoded_credentials() {
        let ep = parse_ok("amqp://us%40er:p%40ss%3Aw%2Frd%25x@h");
        assert_eq!(ep.username(), "us@er");
        assert_eq!(ep.password(), "p@ss:w/rd%x");
        assert_eq!(ep.redacted(), "amqp://us%40er:***@h:5672/%2f");
        for out in outputs(&Ok(ep)) {
            assert!(!out.contains("p@ss") && !out.contains("p%40ss"), "{out}");
        }
    }

    #[test]
    fn vhosts_past_the_wire_limit_or_badly_escaped_are_refused() {
        let long = "v".repeat(256);
        assert!(
            invalid_reason(&format!("amqp://h/{long}"))
                .1
                .contains("256 bytes")
        );
        assert_eq!(
            parse_ok(&format!("amqp://h/{}", &long[..255]))
                .vhost()
                .len(),
            255
        );
        assert!(invalid_reason("amqp://h/%zz").1.contains("'%'"));
        assert!(invalid_reason("amqp://h/a%2").1.contains("'%'"));
        assert_eq!(parse_ok("amqp://h/a%25b").vhost(), "a%b");
    }

    #[test]
    fn unparsed_uris_hide_every_query_value_but_the_numeric_options() {
        let out = redact(&format!(
            "amqp://h/?pw={PW}&token={PW}&heartbeat=5&auth_mechanism=external"
        ));
        assert!(!out.contains(PW), "{out}");
        assert!(out.contains("pw=***") && out.contains("token=***"), "{out}");
        assert!(out.contains("heartbeat=5") && out.contains("auth_mechanism=external"));
    }

    #[test]
    fn redacted_parses_back() {
        let original =
            parse_ok("amqps://us%40er:pw@[fe80::1]:1234/v%2fh?heartbeat=9&auth_mechanism=plain");
        let again = parse_ok(&original.redacted());
        let mut expected = original.amqp_uri().clone();
        expected.authority.userinfo.password = "***".into();
        assert_eq!(again.amqp_uri(), &expected);
    }

    #[test]
    fn invalid_uris_are_typed_errors_without_the_password() {
        let cases = [
            "garbage".to_owned(),
            String::new(),
            format!("http://u:{PW}@x"),
            "amqp://".to_owned(),
            format!("amqp://u:{PW}@"),
            format!("amqp://u:{PW}@h:0"),
            format!("amqp://u:{PW}@h:99999"),
            format!("amqp://u:{PW}@h:port"),
            format!("amqp://u:{PW}@h?heartbeat=abc"),
            format!("amqp://u:{PW}@h?heartbeat=70000"),
            format!("amqp://u:{PW}@h?frame_max=-1"),
            format!("amqp://u:{PW}@h?frame_max=1"),
            format!("amqp://u:{PW}@h?frame_max=4095"),
            format!("amqp://u:{PW}@h?frame_max=1048577"),
            format!("amqp://u:{PW}@h?frame_max=4294967295"),
            format!("amqp://u:{PW}@h?auth_mechanism=magic"),
            format!("amqp://u:{PW}@[::1"),
            format!("amqp://u:{PW}@h%2Fx"),
            format!("amqp://u:{PW}@h%20x"),
            format!("amqp:u:{PW}@h"),
            format!("amqp:/u:{PW}@h"),
            // The host was forgotten: `url` reads host "u" and port "s3cr3t-pw".
            format!("amqp://u:{PW}"),
            "amqp://u:%ff%fe@h".to_owned(),
        ];
        for uri in &cases {
            let (index, reason) = invalid_reason(uri);
            assert_eq!(index, 0);
            assert!(!reason.is_empty());
            for out in outputs(&Endpoint::parse(uri)) {
                assert!(!out.contains(PW), "{uri} leaked in {out}");
            }
        }
        assert_eq!(
            invalid_reason("amqp://h:0").1,
            "port 0 is not a port one can connect to"
        );
        assert!(
            invalid_reason("amqp://h?heartbeat=x")
                .1
                .contains("heartbeat")
        );
        assert!(invalid_reason("http://x").1.contains("scheme"));
        let Err(ConfigError::InvalidUri { uri, .. }) =
            Endpoint::parse(&format!("amqp://u:{PW}@h:0"))
        else {
            panic!("port 0 must be refused");
        };
        assert_eq!(uri, "amqp://u:***@h:0");
    }

    #[test]
    fn host_lists() {
        let hosts = parse_host_list(" amqp://a , amqps://b:1,, ,amqp://[::1],").map(|v| {
            v.iter()
                .map(|e| (e.host().to_owned(), e.port()))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            hosts,
            Ok(vec![
                ("a".into(), 5672),
                ("b".into(), 1),
                ("::1".into(), 5672)
            ])
        );
        assert_eq!(parse_host_list(""), Err(ConfigError::EmptyHostList));
        assert_eq!(parse_host_list(" , ,"), Err(ConfigError::EmptyHostList));
        let Err(ConfigError::InvalidUri { index, .. }) = parse_host_list("amqp://a,, http://b")
        else {
            panic!("http must be refused");
        };
        assert_eq!(index, 1);
    }

    #[test]
    fn host_vectors() {
        assert_eq!(
            parse_hosts(Vec::<String>::new()),
            Err(ConfigError::EmptyHostList)
        );
        assert_eq!(
            parse_hosts(["amqp://a", "amqp://b"]).map(|v| v.len()),
            Ok(2)
        );
        let owned = vec![
            "amqp://a".to_owned(),
            "amqp://b".to_owned(),
            "amqp://c:0".to_owned(),
        ];
        let Err(ConfigError::InvalidUri { index, .. }) = parse_hosts(&owned) else {
            panic!("port 0 must be refused");
        };
        assert_eq!(index, 2);
    }

    #[test]
    fn redact_best_effort() {
        let cases = [
            ("amqp://u:pw@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u@h", "amqp://u@h"),
            ("amqp://h:5672/v", "amqp://h:5672/v"),
            ("amqp://[::1]:5672", "amqp://[::1]:5672"),
            ("amqp://u:pw", "amqp://u:***"),
            ("amqp://u:pw/v?x=1", "amqp://u:***"),
            ("amqp://h:5672/v?x=1", "amqp://h:5672/v?x=***"),
            ("amqp://u:p/w@h", "amqp://u:***@h"),
            ("amqp://u:p@w@h", "amqp://u:***@h"),
            ("u:pw@h", "***@h"),
            // The tail of a password with a raw ',' after a host-list split.
            ("w9@h", "***@h"),
            (
                "amqps://h?certfile=c&password=kp&x",
                "amqps://h?certfile=***&password=***&x",
            ),
            ("", ""),
            ("://", "://"),
            ("amqp://é:ü@ö", "amqp://é:***@ö"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact(input), expected, "redact({input:?})");
        }
    }

    fn config() -> Config {
        Config {
            cases: 512,
            rng_seed: RngSeed::Fixed(0x5eed),
            failure_persistence: None,
            ..Config::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_input_never_panics(s in any::<String>()) {
            let _ = Endpoint::parse(&s);
            let _ = redact(&s);
            let _ = parse_host_list(&s);
        }

        #[test]
        fn uri_like_input_never_panics_and_redacted_round_trips(
            s in prop_oneof![
                "(amqps?|http)?(:|://)?[a-zA-Z0-9:@/%?=&.,#\\[\\]_-]{0,40}",
                "amqps?://([a-z0-9%]{0,6}(:[a-zA-Z0-9%]{0,6})?@)?([a-z0-9%._-]{0,10}|\\[[0-9a-f:]{2,12}\\])\
                 (:[0-9]{0,6})?(/[a-zA-Z0-9%]{0,6})?(\\?[a-z_]{1,18}=[a-z0-9]{0,6})?",
            ],
        ) {
            let _ = redact(&s);
            let _ = parse_host_list(&s);
            if let Ok(ep) = Endpoint::parse(&s) {
                let again = Endpoint::parse(&ep.redacted());
                prop_assert!(again.is_ok(), "{} from {s:?}", ep.redacted());
                let mut expected = ep.amqp_uri().clone();
                expected.authority.userinfo.password = "***".into();
                prop_assert_eq!(again.as_ref().map(Endpoint::amqp_uri), Ok(&expected));
            }
        }

        /// Passwords start with letters then digits, a run no template or message
        /// holds, so a hit is a real leak.
        #[test]
        fn no_output_holds_the_password(
            head in "[a-z]{3}[0-9]{3}[a-zA-Z0-9]{0,8}",
            special in proptest::option::of(proptest::sample::select(
                vec!['@', ':', '/', '%', '#', '?', ',', ' ', '!', '&'],
            )),
            tail in "[a-z]{3}[0-9]{3}[a-zA-Z0-9]{0,8}",
            encode in any::<bool>(),
            template in 0usize..14,
        ) {
            let password = match special {
                Some(c) => format!("{head}{c}{tail}"),
                None => head.clone(),
            };
            let written = if encode { percent_encode(&password) } else { password.clone() };
            let p = &written;
            let uri = match template {
                0 => format!("amqp://u:{p}@h-1.ex:5672/%2f?heartbeat=2"),
                1 => format!("amqps://u:{p}@[::1]/v"),
                2 => format!("amqp://u:{p}@127.0.0.1"),
                3 => format!("amqp://u:{p}@h-1.ex:0"),
                4 => format!("amqp://u:{p}@h-1.ex:99999"),
                5 => format!("http://u:{p}@h-1.ex"),
                6 => format!("amqp://u:{p}@h-1.ex?heartbeat=x"),
                7 => format!("amqp://u:{p}@"),
                8 => format!("amqp://u:{p}@[::1"),
                9 => format!("amqp:u:{p}@h"),
                10 => format!("amqp://u:{p}@h-1.ex?auth_mechanism=nope"),
                11 => format!("amqp://u:{p}@h%2Fx"),
                12 => format!("amqps://u:{p}@h-1.ex/?channel_max=70000"),
                // Host forgotten; only meaningful without a raw '@' in the password,
                // which would make the rest of it the host.
                _ if encode || special != Some('@') => format!("amqp://u:{p}"),
                _ => format!("amqp://u:{p}@h"),
            };
            let parsed = Endpoint::parse(&uri);
            if let (Ok(ep), true) = (&parsed, encode) {
                prop_assert_eq!(ep.password(), password.as_str());
            }
            let mut all = outputs(&parsed);
            all.push(redact(&uri));
            all.extend(outputs(&parse_host_list(&uri).map(|mut v| v.remove(0))));
            for out in &all {
                prop_assert!(!out.contains(&head), "{uri:?} leaked in {out:?}");
                if special.is_some() {
                    prop_assert!(!out.contains(&tail), "{uri:?} leaked in {out:?}");
                }
            }
        }
    }
}
