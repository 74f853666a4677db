//! What a `tracing` subscriber saw, for the tests of the client's logs.

use std::collections::BTreeMap;

/// Records an event's or a span's fields as text, by name.
pub struct Fields<'a>(pub &'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}
