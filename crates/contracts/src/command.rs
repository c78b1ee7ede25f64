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
    /// Single-object encode with the current command schema.
    pub fn encode(&self) -> Result<Vec<u8>> {
        schema::encode(&schema::COMMAND, self)
    }

    /// Decode a command written with any released command schema;
    /// `schema_id`, the `schema-id` header, is read only for a value of the
    /// older bare format (see [`schema::decode`]).
    pub fn decode(schema_id: &str, bytes: &[u8]) -> Result<Self> {
        schema::decode(schema_id, &schema::COMMAND.schema, bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use apache_avro::Schema;

    use super::*;
    use crate::ContractError;

    /// A command for tests of this crate.
    pub(crate) fn sample() -> Command {
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
        assert!(matches!(error, ContractError::NotSingleObject(_)), "{error}");
        let mut bytes = sample().encode().unwrap();
        bytes.truncate(bytes.len() - 3);
        let error = Command::decode(&schema::COMMAND.id, &bytes).unwrap_err();
        assert!(matches!(error, ContractError::Avro(_)), "{error}");
    }

    #[test]
    fn a_job_id_that_is_not_a_uuid_is_refused_both_ways() {
        let command = Command { job_id: "job-1".to_owned(), ..sample() };
        assert!(matches!(command.encode(), Err(ContractError::Avro(_))));
        let written_by_v1 = {
            let v1 = schema::RELEASES.iter().find(|r| r.family == "command" && r.version == 1).unwrap().parse();
            let value = apache_avro::to_value(&command).unwrap().resolve(&v1.schema).unwrap();
            apache_avro::to_avro_datum(&v1.schema, value).unwrap()
        };
        let error = Command::decode(schema::LEGACY_IDS[0].0, &written_by_v1).unwrap_err();
        assert!(matches!(error, ContractError::Avro(_)), "{error}");
    }

    /// The rule for a later version: add a field with a default. The current
    /// reader reads what it writes (the new field is skipped) and a reader on
    /// the new schema reads what the current version writes (the default fills in).
    #[test]
    fn schema_evolution_works_both_ways() {
        let mut v3: serde_json::Value = serde_json::from_str(schema::COMMAND_AVSC).unwrap();
        v3["fields"].as_array_mut().unwrap().push(serde_json::json!(
            {"name": "priority", "type": "int", "default": 0, "doc": "A later field."}
        ));
        let v3 = Schema::parse(&v3).unwrap();

        #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
        struct CommandV3 {
            #[serde(flatten)]
            v2: Command,
            priority: i32,
        }
        let current = sample();
        let new = CommandV3 { v2: sample(), priority: 7 };

        let written_by_v3 =
            apache_avro::to_avro_datum(&v3, apache_avro::to_value(&new).unwrap().resolve(&v3).unwrap()).unwrap();
        let read_by_v2: Command = schema::decode_datum(&v3, &schema::COMMAND.schema, &written_by_v3).unwrap();
        assert_eq!(read_by_v2, current);

        let written_by_v2 = current.encode().unwrap();
        let read_by_v3: serde_json::Value =
            schema::decode_datum(&schema::COMMAND.schema, &v3, &written_by_v2[10..]).unwrap();
        assert_eq!(read_by_v3["priority"], 0);
        assert_eq!(read_by_v3["tenant"], "acme");
    }
}
