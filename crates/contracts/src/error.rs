//! The one error type of the contracts crate.

/// What can go wrong reading or writing a contract.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// A required envelope header is absent.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// A header is present but not what the contract says it holds.
    #[error("invalid header `{name}`: {reason}")]
    InvalidHeader { name: &'static str, reason: String },
    /// The value's writer schema, named by this fingerprint (hex, as on the
    /// wire), is no released schema this build knows.
    #[error("unknown writer schema: fingerprint `{0}`")]
    UnknownSchema(String),
    /// The value is not Avro single-object encoded (nor a bare datum of the
    /// older format that its `schema-id` header names).
    #[error("not an Avro single-object encoded value: {0}")]
    NotSingleObject(String),
    /// The bytes are not a valid Avro datum of the named schema.
    #[error("avro: {0}")]
    Avro(String),
    /// The command type is not in the catalogue.
    #[error("unknown command type `{0}`")]
    UnknownCommandType(String),
    /// The payload does not have the shape its command type requires.
    #[error("invalid payload for `{command_type}`: {reason}")]
    InvalidPayload { command_type: String, reason: String },
}

impl From<apache_avro::Error> for ContractError {
    fn from(error: apache_avro::Error) -> Self {
        Self::Avro(error.to_string())
    }
}

pub type Result<T, E = ContractError> = std::result::Result<T, E>;
