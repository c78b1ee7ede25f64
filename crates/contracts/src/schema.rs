//! The Avro schemas, parsed once, and how messages name them.
//!
//! A message's `schema-id` header is `<full name>@<Rabin fingerprint in hex>` of
//! the schema that wrote it. Readers look the writer schema up here and resolve
//! it against their own reader schema, so a field added with a default in a
//! later version is read by older readers and vice versa.

use std::{collections::HashMap, sync::LazyLock};

use apache_avro::{Schema, rabin::Rabin};

use crate::{ContractError, Result};

/// The command schema, as shipped in `schemas/command.avsc`.
pub const COMMAND_AVSC: &str = include_str!("../../../schemas/command.avsc");
/// The result event schema, as shipped in `schemas/result.avsc`.
pub const RESULT_AVSC: &str = include_str!("../../../schemas/result.avsc");

/// A parsed schema with its wire identifier.
#[derive(Debug)]
pub struct KnownSchema {
    pub id: String,
    pub schema: Schema,
}

impl KnownSchema {
    fn parse(text: &str) -> Self {
        // apache-avro fixes its limit on first use, parsing included.
        limit_allocations();
        // The schemas are compiled in and covered by unit tests, so a parse
        // failure is a build defect, not an input error.
        #[allow(clippy::expect_used)]
        let schema = Schema::parse_str(text).expect("bundled Avro schema must parse");
        Self { id: schema_id(&schema), schema }
    }
}

/// The wire identifier of a schema: full name and Rabin fingerprint.
pub fn schema_id(schema: &Schema) -> String {
    let name = schema.name().map(|n| n.fullname(None)).unwrap_or_default();
    format!("{name}@{}", schema.fingerprint::<Rabin>())
}

/// The current command schema (what this build writes and reads into).
pub static COMMAND: LazyLock<KnownSchema> = LazyLock::new(|| KnownSchema::parse(COMMAND_AVSC));
/// The current result schema.
pub static RESULT: LazyLock<KnownSchema> = LazyLock::new(|| KnownSchema::parse(RESULT_AVSC));

/// Every writer schema this build can read, by id. Older versions are added
/// here, never removed, when a schema evolves.
static WRITERS: LazyLock<HashMap<String, &'static Schema>> =
    LazyLock::new(|| [&*COMMAND, &*RESULT].into_iter().map(|known| (known.id.clone(), &known.schema)).collect());

/// Encode a serde value as an Avro datum of `schema`.
pub fn encode<T: serde::Serialize>(schema: &Schema, value: &T) -> Result<Vec<u8>> {
    let value = apache_avro::to_value(value)?.resolve(schema)?;
    Ok(apache_avro::to_avro_datum(schema, value)?)
}

/// The most one decoded string, byte array or collection may claim. A Kafka
/// record is at most 1 MiB by default, so anything larger is a crafted or
/// corrupt length prefix; apache-avro's own default (512 MiB) would let one
/// poison message make a consumer allocate that much.
pub const MAX_DECODE_ALLOCATION: usize = 4 * 1024 * 1024;

/// Install [`MAX_DECODE_ALLOCATION`]. apache-avro keeps the first value it is
/// given, and its first use of any kind (parsing a schema, too) fixes its
/// 512 MiB default, so this runs before each of those.
fn limit_allocations() {
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
}

/// Decode an Avro datum written with `writer` into `T`, resolving it against `reader`.
pub fn decode_with<T: serde::de::DeserializeOwned>(writer: &Schema, reader: &Schema, mut bytes: &[u8]) -> Result<T> {
    let value = apache_avro::from_avro_datum(writer, &mut bytes, Some(reader))?;
    if !bytes.is_empty() {
        return Err(ContractError::Avro(format!("{} trailing bytes after the datum", bytes.len())));
    }
    Ok(apache_avro::from_value(&value)?)
}

/// Decode a datum whose writer schema is named by `schema_id`, reading it as `reader`.
pub fn decode<T: serde::de::DeserializeOwned>(schema_id: &str, reader: &Schema, bytes: &[u8]) -> Result<T> {
    let writer = WRITERS.get(schema_id).ok_or_else(|| ContractError::UnknownSchema(schema_id.to_owned()))?;
    decode_with(writer, reader, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_prefix_claiming_100_mib_is_refused_without_allocating() {
        // A command whose first string (job_id) claims 100 MiB (zig-zag varint):
        // under apache-avro's default limit, over ours.
        let mut bytes = vec![0x80, 0x80, 0x80, 0x64];
        bytes.extend_from_slice(b"short");
        let error = decode_with::<crate::Command>(&COMMAND.schema, &COMMAND.schema, &bytes).unwrap_err();
        assert!(error.to_string().contains("allocat"), "{error}");
    }

    #[test]
    fn schema_ids_name_the_record_and_its_fingerprint() {
        assert!(COMMAND.id.starts_with("io.onceflow.v1.Command@"), "{}", COMMAND.id);
        assert!(RESULT.id.starts_with("io.onceflow.v1.ResultEvent@"), "{}", RESULT.id);
        assert_ne!(COMMAND.id, RESULT.id);
    }
}

/// The AsyncAPI document must name the schemas and headers this code really
/// writes, so the contract cannot drift from the wire.
#[cfg(test)]
mod asyncapi_tests {
    use super::*;
    use crate::envelope;

    const ASYNCAPI: &str = include_str!("../../../asyncapi.yaml");

    #[test]
    fn asyncapi_names_the_schema_ids_on_the_wire() {
        for id in [&COMMAND.id, &RESULT.id] {
            assert!(ASYNCAPI.contains(id.as_str()), "asyncapi.yaml does not mention schema id {id}");
        }
    }

    #[test]
    fn asyncapi_documents_every_envelope_header() {
        for header in [
            envelope::MESSAGE_ID,
            envelope::CORRELATION_ID,
            envelope::CAUSATION_ID,
            envelope::TENANT_ID,
            envelope::MESSAGE_TYPE,
            envelope::SCHEMA_ID,
            envelope::CONTENT_TYPE,
            envelope::TRACEPARENT,
            envelope::TRACESTATE,
        ] {
            assert!(ASYNCAPI.contains(&format!("{header}:")), "asyncapi.yaml does not document header {header}");
        }
    }
}
