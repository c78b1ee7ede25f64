//! The error type of the runtime crate.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("telemetry: {0}")]
    Telemetry(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("contract: {0}")]
    Contract(#[from] onceflow_contracts::ContractError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
