//! Binding matchers for the exchange types the simulated broker knows.

use std::collections::BTreeSet;

use amqp_rebound_core::message::{AMQPValue, FieldTable};
use amqp_rebound_core::topology::ExchangeKind;

use super::{BindingDestination, Entities};

/// Whether a topic binding `pattern` matches a routing `key`.
///
/// Both are split on `.` into words (an empty string has no words). In the pattern,
/// `*` matches exactly one word and `#` zero or more words, as in RabbitMQ.
///
/// ```
/// use amqp_rebound_sim::routing::topic_matches;
///
/// assert!(topic_matches("a.*.c", "a.b.c"));
/// assert!(!topic_matches("a.*.c", "a.c"));
/// assert!(topic_matches("a.#", "a"));
/// assert!(topic_matches("a.#", "a.b.c"));
/// assert!(topic_matches("#", ""));
/// assert!(!topic_matches("*", ""));
/// ```
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let pattern = words(pattern);
    let key = words(key);
    matches_words(&pattern, &key)
}

fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

fn matches_words(pattern: &[&str], key: &[&str]) -> bool {
    // Dynamic programming over (pattern position, key position) keeps adversarial
    // patterns such as `#.#.#.#.x` polynomial.
    let k = key.len();
    // reach[j]: pattern[..i] can match key[..j].
    let mut reach = vec![false; k + 1];
    reach[0] = true;
    for word in pattern {
        let mut next = vec![false; k + 1];
        match *word {
            "#" => {
                let mut any = false;
                for j in 0..=k {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            "*" => next[1..].copy_from_slice(&reach[..k]),
            literal => {
                for j in 1..=k {
                    next[j] = reach[j - 1] && key[j - 1] == literal;
                }
            }
        }
        reach = next;
    }
    reach[k]
}

/// Whether a headers-exchange binding (its arguments) matches a message's headers.
///
/// `x-match` is `all` (the default), `any`, `all-with-x` or `any-with-x`. Keys
/// starting with `x-` are ignored unless the mode ends in `-with-x`. A binding value
/// of `Void` only asks for the key to be present.
pub fn headers_match(binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = binding
        .inner()
        .get("x-match")
        .and_then(string_value)
        .unwrap_or_else(|| "all".to_owned());
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "all-with-x" => (false, true),
        "any-with-x" => (true, true),
        _ => (false, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut wanted = binding
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
        .peekable();
    if wanted.peek().is_none() {
        // No conditions: `all` of nothing holds, `any` of nothing does not.
        return !any;
    }
    let mut hits = wanted.map(|(k, v)| match headers.get(k.as_str()) {
        None => false,
        Some(_) if matches!(v, AMQPValue::Void) => true,
        Some(h) => values_equal(v, h),
    });
    if any {
        hits.any(|hit| hit)
    } else {
        hits.all(|hit| hit)
    }
}

fn string_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    // Strings compare by content whatever their AMQP string type.
    match (string_value(a), string_value(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl Entities {
    // ---- publishing ------------------------------------------------------------

    /// The queues a message published to `exchange` with `routing_key` reaches,
    /// following exchange-to-exchange bindings, each queue once.
    pub(super) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> BTreeSet<String> {
        let mut queues = BTreeSet::new();
        if exchange.is_empty() {
            if self.queues.contains_key(routing_key) {
                queues.insert(routing_key.to_owned());
            }
            return queues;
        }
        let mut visited = BTreeSet::new();
        let mut stack = vec![exchange.to_owned()];
        while let Some(name) = stack.pop() {
            if !visited.insert(name.clone()) {
                continue;
            }
            let Some(ex) = self.exchanges.get(&name) else {
                continue;
            };
            for b in self.bindings.iter().filter(|b| b.source == name) {
                let hit = match &ex.kind {
                    ExchangeKind::Direct => b.routing_key == routing_key,
                    ExchangeKind::Fanout => true,
                    ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                    ExchangeKind::Headers => headers_match(&b.arguments, headers),
                    _ => false,
                };
                if !hit {
                    continue;
                }
                match &b.destination {
                    BindingDestination::Queue(q) => {
                        if self.queues.contains_key(q) {
                            queues.insert(q.clone());
                        }
                    }
                    BindingDestination::Exchange(e) => stack.push(e.clone()),
                }
            }
        }
        queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns() {
        let cases = [
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.b.c", false),
            ("a.*.c", "a.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b", true),
            ("a.#", "a.b.c", true),
            ("a.#", "b.a", false),
            ("#", "", true),
            ("#", "x.y.z", true),
            ("*", "", false),
            ("*", "x", true),
            ("*", "x.y", false),
            ("#.c", "c", true),
            ("#.c", "a.b.c", true),
            ("#.c", "a.b", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.b", "a.b", true),
            ("a.b", "a.bb", false),
            ("", "", true),
            ("", "a", false),
            ("a..b", "a..b", true),
            ("a.*.b", "a..b", true),
            (
                "#.#.#.#.#.#.#.x",
                "a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.y",
                false,
            ),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(
                topic_matches(pattern, key),
                expected,
                "{pattern:?} vs {key:?}"
            );
        }
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn headers_modes() {
        let headers = table(&[("a", s("1")), ("b", AMQPValue::LongInt(2))]);
        let all = table(&[("a", s("1")), ("b", AMQPValue::LongInt(2))]);
        assert!(headers_match(&all, Some(&headers)));
        let all_miss = table(&[("a", s("1")), ("c", s("3"))]);
        assert!(!headers_match(&all_miss, Some(&headers)));
        let any = table(&[("x-match", s("any")), ("a", s("1")), ("c", s("3"))]);
        assert!(headers_match(&any, Some(&headers)));
        let any_miss = table(&[("x-match", s("any")), ("c", s("3"))]);
        assert!(!headers_match(&any_miss, Some(&headers)));
        let presence = table(&[("b", AMQPValue::Void)]);
        assert!(headers_match(&presence, Some(&headers)));
        assert!(!headers_match(&presence, None));
        let short = table(&[("a", AMQPValue::ShortString("1".into()))]);
        assert!(headers_match(&short, Some(&headers)));
        assert!(headers_match(&FieldTable::default(), None));
    }
}
