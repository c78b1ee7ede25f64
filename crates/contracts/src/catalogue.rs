//! The command types onceflow accepts and the shape of each payload.
//!
//! Ingest validates a submitted command here before it stores anything, so a
//! bad payload is a `422` to the client rather than a dead letter later; the
//! processor parses the same types, so both sides agree on one definition.
//! Adding a command type means adding its payload here and a handler in the
//! processor.

use serde::de::DeserializeOwned;

use crate::{ContractError, Result};

/// A command that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCommand {
    pub command_type: String,
    /// Canonical JSON (sorted keys, no white space) of the payload.
    pub payload_json: String,
    /// Commands with the same key are applied in order (the Kafka message key).
    pub ordering_key: String,
}

/// The largest amount one command may move, in minor units: 10^15 (ten
/// trillion in a currency with cents). Refused at the door above it, so that
/// no realistic number of commands brings a balance near the 64-bit limit;
/// the processor still checks every balance it computes and refuses an
/// overflow as `amount_out_of_range` (a command that bypassed the door).
/// It is also below 2^53, so the canonical JSON of a payload (RFC 8785 writes
/// numbers as IEEE doubles) holds every accepted amount exactly.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// Ledger payloads. Amounts are integers in minor units (cents), 1 to [`MAX_AMOUNT`].
pub mod ledger {
    pub const OPEN_ACCOUNT: &str = "ledger.open_account";
    pub const DEPOSIT: &str = "ledger.deposit";
    pub const TRANSFER: &str = "ledger.transfer";
    /// Long-running: a statement of an account's entries, with progress events.
    pub const STATEMENT: &str = "ledger.statement";

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct OpenAccount {
        pub account_id: String,
        /// ISO 4217 code, three upper-case letters.
        pub currency: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Deposit {
        pub account_id: String,
        pub amount: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Transfer {
        pub from: String,
        pub to: String,
        pub amount: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Statement {
        pub account_id: String,
    }
}

/// Every command type in the catalogue.
pub const COMMAND_TYPES: &[&str] = &[ledger::OPEN_ACCOUNT, ledger::DEPOSIT, ledger::TRANSFER, ledger::STATEMENT];

/// Check `payload` against the shape of `command_type`.
pub fn validate_command(command_type: &str, payload: &serde_json::Value) -> Result<ValidatedCommand> {
    let invalid = |reason: String| ContractError::InvalidPayload { command_type: command_type.to_owned(), reason };
    // Judged as the processor will read it: its canonical JSON, where a
    // number with no fraction (`500.0`, which JSON Schema counts as an
    // integer too) is written as the integer `500`.
    let payload_json = canonical_json(payload);
    let canonical: serde_json::Value = serde_json::from_str(&payload_json).map_err(|e| invalid(e.to_string()))?;
    let payload = &canonical;
    let ordering_key = match command_type {
        ledger::OPEN_ACCOUNT => {
            let p: ledger::OpenAccount = parse(command_type, payload)?;
            check_account_id(&p.account_id).map_err(invalid)?;
            if !(p.currency.len() == 3 && p.currency.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(invalid("currency must be three upper-case letters".to_owned()));
            }
            p.account_id
        }
        ledger::DEPOSIT => {
            let p: ledger::Deposit = parse(command_type, payload)?;
            check_account_id(&p.account_id).map_err(invalid)?;
            check_amount(p.amount).map_err(invalid)?;
            p.account_id
        }
        ledger::TRANSFER => {
            let p: ledger::Transfer = parse(command_type, payload)?;
            check_account_id(&p.from).map_err(invalid)?;
            check_account_id(&p.to).map_err(invalid)?;
            check_amount(p.amount).map_err(invalid)?;
            // `from == to` is the processor's business refusal
            // (`same_account`), not a malformed command: no JSON Schema can
            // say two properties differ, and the API document describes
            // exactly what this door accepts.
            // Transfers are ordered by their source account: that is the
            // balance a transfer can overdraw.
            p.from
        }
        ledger::STATEMENT => {
            let p: ledger::Statement = parse(command_type, payload)?;
            check_account_id(&p.account_id).map_err(invalid)?;
            // Ordered with the account's deposits: a statement sees every
            // deposit submitted before it.
            p.account_id
        }
        other => return Err(ContractError::UnknownCommandType(other.to_owned())),
    };
    Ok(ValidatedCommand { command_type: command_type.to_owned(), payload_json, ordering_key })
}

/// Parse a payload into its typed form (used by the processor too).
pub fn parse<T: DeserializeOwned>(command_type: &str, payload: &serde_json::Value) -> Result<T> {
    T::deserialize(payload)
        .map_err(|e| ContractError::InvalidPayload { command_type: command_type.to_owned(), reason: e.to_string() })
}

/// RFC 8785 canonical JSON: what makes two bodies "the same request" whatever
/// their key order or white space.
pub fn canonical_json(value: &serde_json::Value) -> String {
    // Serialising a `serde_json::Value` cannot fail: its keys are strings and
    // its numbers finite.
    serde_json_canonicalizer::to_string(value).unwrap_or_else(|_| value.to_string())
}

fn check_account_id(id: &str) -> std::result::Result<(), String> {
    let ok = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(format!("account id `{id}` must be 1-64 characters of [A-Za-z0-9_-]")) }
}

fn check_amount(amount: i64) -> std::result::Result<(), String> {
    if (1..=MAX_AMOUNT).contains(&amount) {
        Ok(())
    } else {
        Err(format!("amount must be an integer in minor units from 1 to {MAX_AMOUNT}, got {amount}"))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accepts_each_ledger_command_and_canonicalises_the_payload() {
        let v = validate_command("ledger.transfer", &json!({"to": "b", "amount": 5, "from": "a"})).unwrap();
        assert_eq!(v.payload_json, r#"{"amount":5,"from":"a","to":"b"}"#);
        assert_eq!(v.ordering_key, "a");
        validate_command("ledger.open_account", &json!({"account_id": "a", "currency": "EUR"})).unwrap();
        validate_command("ledger.deposit", &json!({"account_id": "a", "amount": 1})).unwrap();
        validate_command("ledger.deposit", &json!({"account_id": "a", "amount": MAX_AMOUNT})).unwrap();
        let whole = validate_command("ledger.deposit", &json!({"account_id": "a", "amount": 500.0})).unwrap();
        assert_eq!(whole.payload_json, r#"{"account_id":"a","amount":500}"#, "500.0 is the integer 500");
        let statement = validate_command("ledger.statement", &json!({"account_id": "acc-1"})).unwrap();
        assert_eq!(statement.ordering_key, "acc-1", "a statement is ordered by its account");
        assert_eq!(statement.payload_json, r#"{"account_id":"acc-1"}"#);
    }

    #[test]
    fn refuses_bad_payloads_with_a_reason() {
        let cases = [
            ("ledger.deposit", json!({"account_id": "a", "amount": 0})),
            ("ledger.deposit", json!({"account_id": "a", "amount": MAX_AMOUNT + 1})),
            ("ledger.deposit", json!({"account_id": "a", "amount": i64::MAX})),
            ("ledger.transfer", json!({"from": "a", "to": "b", "amount": MAX_AMOUNT + 1})),
            ("ledger.deposit", json!({"account_id": "a", "amount": "5"})),
            ("ledger.deposit", json!({"account_id": "a", "amount": 5, "extra": true})),
            ("ledger.open_account", json!({"account_id": "a", "currency": "eur"})),
            ("ledger.open_account", json!({"account_id": "a b", "currency": "EUR"})),
            ("ledger.transfer", json!([1, 2])),
            ("ledger.statement", json!({})),
            ("ledger.statement", json!({"account_id": ""})),
            ("ledger.statement", json!({"account_id": "a", "from": "2024-01-01"})),
        ];
        for (command_type, payload) in cases {
            let error = validate_command(command_type, &payload).unwrap_err();
            assert!(matches!(error, ContractError::InvalidPayload { .. }), "{payload}: {error}");
        }
        let error = validate_command("ledger.mint", &json!({})).unwrap_err();
        assert!(matches!(error, ContractError::UnknownCommandType(_)));
    }

    #[test]
    fn the_largest_amount_survives_canonical_json_exactly() {
        let v = validate_command("ledger.deposit", &json!({"account_id": "a", "amount": MAX_AMOUNT})).unwrap();
        let payload: ledger::Deposit = serde_json::from_str(&v.payload_json).unwrap();
        assert_eq!(payload.amount, MAX_AMOUNT);
    }
}
