//! The command message: what ingest publishes to `onceflow.commands`.

use crate::{Result, schema};

/// A command as it travels on Kafka (the Avro record `io.onceflow.v1.Command`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    pub job_id: String,
    pub tenant: String,
    pub command_type: String,
    /// Canonical JSON of the payload; its shape is checked by [`crate::catalogue`].
    pub payload_json: String,
    pub callback_url: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub accepted_at: i64,
}

impl Command {
    /// Avro-encode with the current command schema.
    pub fn encode(&self) -> Result<Vec<u8>> {
        schema::encode(&schema::COMMAND.schema, self)
    }

    /// Decode a command written with the schema named by `schema_id`.
    pub fn decode(schema_id: &str, bytes: &[u8]) -> Result<Self> {
        schema::decode(schema_id, &schema::COMMAND.schema, bytes)
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::Schema;

    use super::*;
    use crate::ContractError;

    fn sample() -> Command {
        Command {
            job_id: "0190b3c4-0000-7000-8000-000000000001".to_owned(),
            tenant: "acme".to_owned(),
            command_type: "ledger.deposit".to_owned(),
            payload_json: r#"{"account_id":"a","amount":5}"#.to_owned(),
            callback_url: None,
            accepted_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trips_through_avro() {
        let command = sample();
        let bytes = command.encode().unwrap();
        assert_eq!(Command::decode(&schema::COMMAND.id, &bytes).unwrap(), command);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let error = Command::decode(&schema::COMMAND.id, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(error, ContractError::Avro(_)), "{error}");
        let error = Command::decode("io.onceflow.v1.Command@0000", &[]).unwrap_err();
        assert!(matches!(error, ContractError::UnknownSchema(_)), "{error}");
    }

    /// A later version adds a field with a default: the current reader reads what
    /// it writes (the new field is skipped) and a reader on the new schema reads
    /// what the current version writes (the default fills in).
    #[test]
    fn schema_evolution_works_both_ways() {
        let mut v2: serde_json::Value = serde_json::from_str(schema::COMMAND_AVSC).unwrap();
        v2["fields"].as_array_mut().unwrap().push(serde_json::json!(
            {"name": "priority", "type": "int", "default": 0}
        ));
        let v2 = Schema::parse(&v2).unwrap();

        #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
        struct CommandV2 {
            #[serde(flatten)]
            v1: Command,
            priority: i32,
        }
        let old = sample();
        let new = CommandV2 { v1: sample(), priority: 7 };

        let written_by_v2 = schema::encode(&v2, &new).unwrap();
        let read_by_v1: Command = schema::decode_with(&v2, &schema::COMMAND.schema, &written_by_v2).unwrap();
        assert_eq!(read_by_v1, old);

        let written_by_v1 = old.encode().unwrap();
        let read_by_v2: serde_json::Value = {
            let value =
                apache_avro::from_avro_datum(&schema::COMMAND.schema, &mut &written_by_v1[..], Some(&v2)).unwrap();
            apache_avro::from_value(&value).unwrap()
        };
        assert_eq!(read_by_v2["priority"], 0);
        assert_eq!(read_by_v2["tenant"], "acme");
    }
}
