//! Command payloads: their canonical JSON, which makes two bodies "the same
//! request", and the ledger's payload types, which its built-in handlers read.
//!
//! Which payloads are accepted is declared per command type with a JSON
//! Schema (the `onceflow-catalogue` crate; the ledger's schemas say what
//! these types hold).

use serde::de::DeserializeOwned;

use crate::{ContractError, Result};

/// The largest amount one command may move, in minor units: 10^15 (ten
/// trillion in a currency with cents; the `maximum` of the ledger's
/// schemas). Refused at the door above it, so that
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
