//! Ordering keys: which commands of a tenant take effect one after another.
//!
//! A command type names a JSON pointer into its payload and a scope; the
//! value it points at (a string, or a number or boolean as its JSON text) is
//! the key. Commands of one tenant with the same scope and value take effect
//! in the order their `202`s were given. The Kafka key of the command, and of
//! every result of it, is made from the tenant, the scope and the value, so
//! one key's commands and results each stay on one partition, in order.

use serde_json::Value;

/// The longest ordering key value: it is part of a Kafka key and of the
/// primary key of the processor's key queues.
pub const MAX_ORDERING_KEY_BYTES: usize = 256;

/// Where a command type finds its ordering key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordering {
    /// An RFC 6901 JSON pointer into the payload, e.g. `/account_id`.
    pub pointer: String,
    /// Types that share a scope order their commands together.
    pub scope: String,
}

/// The ordering key of one command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderingKey {
    pub scope: String,
    pub value: String,
}

impl Ordering {
    pub(crate) fn new(pointer: String, scope: String) -> Result<Self, String> {
        if !pointer.starts_with('/') {
            return Err(format!("ordering_key `{pointer}` is not a JSON pointer (e.g. \"/account_id\")"));
        }
        if scope.is_empty() || scope.len() > crate::MAX_TYPE_NAME_BYTES || scope.contains('/') {
            return Err(format!("ordering_scope `{scope}` must be 1-128 characters without `/`"));
        }
        Ok(Self { pointer, scope })
    }

    /// The key of `payload`, or why it has none.
    pub fn key_of(&self, payload: &Value) -> Result<OrderingKey, String> {
        let value = match payload.pointer(&self.pointer) {
            Some(Value::String(text)) => text.clone(),
            Some(scalar @ (Value::Number(_) | Value::Bool(_))) => scalar.to_string(),
            Some(_) => return Err(format!("its ordering key `{}` must be a string or a number", self.pointer)),
            None => return Err(format!("its ordering key `{}` is missing", self.pointer)),
        };
        if value.is_empty() || value.len() > MAX_ORDERING_KEY_BYTES || value.contains('\0') {
            return Err(format!(
                "its ordering key `{}` must be 1-{MAX_ORDERING_KEY_BYTES} bytes without NUL",
                self.pointer
            ));
        }
        Ok(OrderingKey { scope: self.scope.clone(), value })
    }
}

impl OrderingKey {
    /// The Kafka key of a tenant's command with this key, and of its results:
    /// `tenant/scope/value`.
    pub fn message_key(&self, tenant: &str) -> String {
        format!("{tenant}/{}/{}", self.scope, self.value)
    }
}

/// The Kafka key of a command without an ordering key (and of its results):
/// `tenant/job_id`, so such commands spread over every partition.
pub fn unordered_message_key(tenant: &str, job_id: &str) -> String {
    format!("{tenant}/{job_id}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_key_is_a_string_or_a_number_that_is_there() {
        let ordering = Ordering::new("/customer/id".to_owned(), "billing".to_owned()).unwrap();
        let key = ordering.key_of(&json!({"customer": {"id": "c-1"}})).unwrap();
        assert_eq!(key.message_key("acme"), "acme/billing/c-1");
        assert_eq!(ordering.key_of(&json!({"customer": {"id": 42}})).unwrap().value, "42");
        for payload in [json!({}), json!({"customer": {"id": null}}), json!({"customer": {"id": ["a"]}})] {
            assert!(ordering.key_of(&payload).is_err(), "{payload}");
        }
        let long = "k".repeat(MAX_ORDERING_KEY_BYTES + 1);
        assert!(ordering.key_of(&json!({"customer": {"id": long}})).is_err());
        assert!(ordering.key_of(&json!({"customer": {"id": ""}})).is_err());
        assert_eq!(unordered_message_key("acme", "0190"), "acme/0190");
    }
}
