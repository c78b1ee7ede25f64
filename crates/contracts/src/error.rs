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
    /// The message names a schema this build does not know.
    #[error("unknown schema id `{0}`")]
    UnknownSchema(String),
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
