//! The Avro schemas, and the wire format of every value onceflow writes to Kafka.
//!
//! A value is Avro *single-object encoded* (Avro specification, "Single object
//! encoding"): the marker `C3 01`, the 8-byte little-endian CRC-64-AVRO
//! fingerprint of the writer schema's Parsing Canonical Form, then the Avro
//! binary datum. Any Avro library (the Java SDK, fastavro, ...) reads it with
//! no schema registry: it finds the writer schema by that fingerprint among the
//! released ones and resolves it against its own reader schema.
//!
//! Every released writer schema is kept in `schemas/history/<family>/v<N>.avsc`
//! and compiled in here ([`RELEASES`]); a released file never changes. The files
//! in `schemas/` are copies of the newest release of each family: what this
//! build writes, and the reader schema it resolves every release to.
//! `tests/schema_history.rs` checks that every pair of releases is backward and
//! forward compatible and that no released file changed.
//!
//! The `schema-id` header still names the writer, `<full name>@<fingerprint in
//! hex>`, so routing and logs need no decoding. Values written before
//! single-object encoding (a bare datum, named only by that header) are still
//! read, so nothing in flight during an upgrade is lost: see [`LEGACY_IDS`].

use std::{collections::HashMap, sync::LazyLock};

use apache_avro::{
    Schema,
    headers::{HeaderBuilder, RabinFingerprintHeader},
    rabin::Rabin,
    schema::SchemaFingerprint,
};
use serde_json::Value;

use crate::{ContractError, Result};

/// The current command schema, `schemas/command.avsc`.
pub const COMMAND_AVSC: &str = include_str!("../../../schemas/command.avsc");
/// The current result event schema, `schemas/result.avsc`.
pub const RESULT_AVSC: &str = include_str!("../../../schemas/result.avsc");

/// The two bytes that open every single-object encoded value (format version 1).
pub const MARKER: [u8; 2] = [0xC3, 0x01];

/// One released writer schema, `schemas/history/<family>/v<version>.avsc`.
#[derive(Debug)]
pub struct Release {
    /// The schema's file name in `schemas/` without `.avsc`: `command`,
    /// `result` or `webhook-endpoint-state`.
    pub family: &'static str,
    pub version: u32,
    /// The file's text, compiled in.
    pub text: &'static str,
}

impl Release {
    /// Where it lives under `schemas/history/`.
    pub fn path(&self) -> String {
        format!("{}/v{}.avsc", self.family, self.version)
    }

    pub fn parse(&self) -> KnownSchema {
        KnownSchema::parse(self.text)
    }
}

macro_rules! release {
    ($family:literal, $version:literal) => {
        Release {
            family: $family,
            version: $version,
            text: include_str!(concat!("../../../schemas/history/", $family, "/v", $version, ".avsc")),
        }
    };
}

/// Every released writer schema, oldest first within a family. Releasing a
/// version adds its file and its line here and in
/// `schemas/history/fingerprints.txt`; nothing is ever removed.
pub const RELEASES: &[Release] = &[
    release!("command", 1),
    release!("command", 2),
    release!("result", 1),
    release!("result", 2),
    release!("result", 3),
    release!("webhook-endpoint-state", 1),
];

/// The `schema-id` headers of the values written before single-object
/// encoding, and the release (family, version) that wrote them: bare datums
/// of the first release, named by apache-avro's own fingerprint of it (see
/// [`without_logical_types`] for why that differs from the wire fingerprint).
/// Nothing writes them any more, but outbox rows, topics and dead letters may
/// hold some across the upgrade.
pub const LEGACY_IDS: &[(&str, &str, u32)] = &[
    ("io.onceflow.v1.Command@06fe92d2d898872b", "command", 1),
    ("io.onceflow.v1.ResultEvent@a449c7ad42c46911", "result", 1),
];

/// A parsed schema with its wire identity.
#[derive(Debug)]
pub struct KnownSchema {
    /// The `schema-id` header: `<full name>@<fingerprint in hex>`.
    pub id: String,
    pub schema: Schema,
    /// [`MARKER`] and the fingerprint: what precedes the datum on the wire.
    header: Vec<u8>,
}

impl KnownSchema {
    pub(crate) fn parse(text: &str) -> Self {
        // The schemas are compiled in and covered by tests, so a parse failure
        // is a build defect, not an input error.
        #[allow(clippy::expect_used)]
        let json: Value = serde_json::from_str(text).expect("bundled Avro schema must be JSON");
        let schema = parse(&json);
        let plain = parse(&without_logical_types(json));
        let name = schema.name().map(|n| n.fullname(None)).unwrap_or_default();
        Self {
            id: format!("{name}@{}", plain.fingerprint::<Rabin>()),
            header: RabinFingerprintHeader::from_schema(&plain).build_header(),
            schema,
        }
    }

    /// The CRC-64-AVRO fingerprint of its Parsing Canonical Form, in wire
    /// order (little-endian).
    pub fn fingerprint(&self) -> &[u8] {
        &self.header[MARKER.len()..]
    }
}

#[allow(clippy::expect_used)] // see KnownSchema::parse
fn parse(json: &Value) -> Schema {
    // apache-avro fixes its limit on first use, parsing included.
    limit_allocations();
    Schema::parse(json).expect("bundled Avro schema must parse")
}

/// `json` without its `logicalType` attributes (default values aside).
///
/// The Parsing Canonical Form strips logical types anyway, but apache-avro
/// 0.21 leaves a logical type's base type as an object (`{"type":"long"}`)
/// where the specification reduces it to its name (`"long"`), so its
/// fingerprint of a schema with a logical type differs from every other
/// implementation's. The same schema without them has the canonical form the
/// specification defines.
fn without_logical_types(mut json: Value) -> Value {
    fn strip(json: &mut Value) {
        match json {
            Value::Object(map) => {
                map.remove("logicalType");
                map.iter_mut().filter(|(key, _)| *key != "default").for_each(|(_, value)| strip(value));
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut json);
    json
}

/// The current command schema (what this build writes and reads into).
pub static COMMAND: LazyLock<KnownSchema> = LazyLock::new(|| KnownSchema::parse(COMMAND_AVSC));
/// The current result schema.
pub static RESULT: LazyLock<KnownSchema> = LazyLock::new(|| KnownSchema::parse(RESULT_AVSC));

/// Every released writer schema by fingerprint. Releases that differ only in
/// what the canonical form strips share a fingerprint and read the same bytes;
/// the newest of them is kept.
static WRITERS: LazyLock<HashMap<Vec<u8>, KnownSchema>> =
    LazyLock::new(|| RELEASES.iter().map(Release::parse).map(|known| (known.fingerprint().to_vec(), known)).collect());

/// The writers of bare datums, by their `schema-id` header.
static LEGACY: LazyLock<HashMap<&'static str, KnownSchema>> = LazyLock::new(|| {
    let release = |family: &str, version: u32| RELEASES.iter().find(|r| r.family == family && r.version == version);
    LEGACY_IDS
        .iter()
        .filter_map(|&(id, family, version)| release(family, version).map(|release| (id, release.parse())))
        .collect()
});

/// Single-object encode a serde value with `writer`.
pub fn encode<T: serde::Serialize>(writer: &KnownSchema, value: &T) -> Result<Vec<u8>> {
    let value = apache_avro::to_value(value)?.resolve(&writer.schema)?;
    Ok([writer.header.as_slice(), &apache_avro::to_avro_datum(&writer.schema, value)?].concat())
}

/// Decode a value into `T`, resolving its writer schema against `reader`.
///
/// A single-object encoded value names its writer by fingerprint, which must
/// be a release's; anything else must be a bare datum of a release that
/// `schema_id` (the `schema-id` header) names in [`LEGACY_IDS`].
pub fn decode<T: serde::de::DeserializeOwned>(schema_id: &str, reader: &Schema, bytes: &[u8]) -> Result<T> {
    let Some(framed) = bytes.strip_prefix(&MARKER) else {
        let writer = LEGACY.get(schema_id).ok_or_else(|| {
            ContractError::NotSingleObject(format!(
                "no C3 01 marker, and schema-id `{schema_id}` names no schema of the older bare format"
            ))
        })?;
        return decode_datum(&writer.schema, reader, bytes);
    };
    let (fingerprint, datum) = framed
        .split_first_chunk::<8>()
        .ok_or_else(|| ContractError::NotSingleObject(format!("{} bytes after the marker", framed.len())))?;
    let writer = WRITERS
        .get(fingerprint.as_slice())
        .ok_or_else(|| ContractError::UnknownSchema(SchemaFingerprint { bytes: fingerprint.to_vec() }.to_string()))?;
    decode_datum(&writer.schema, reader, datum)
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

/// Decode a bare Avro datum written with `writer` into `T`, resolving it against `reader`.
pub(crate) fn decode_datum<T: serde::de::DeserializeOwned>(
    writer: &Schema,
    reader: &Schema,
    mut bytes: &[u8],
) -> Result<T> {
    let value = apache_avro::from_avro_datum(writer, &mut bytes, Some(reader))?;
    if !bytes.is_empty() {
        return Err(ContractError::Avro(format!("{} trailing bytes after the datum", bytes.len())));
    }
    Ok(apache_avro::from_value(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, ResultEvent, command::tests::sample as command};

    fn result() -> ResultEvent {
        ResultEvent {
            event_id: "0190b3c4-1111-7000-8000-000000000002".to_owned(),
            job_id: "0190b3c4-0000-7000-8000-000000000001".to_owned(),
            tenant: "acme".to_owned(),
            correlation_id: "corr-1".to_owned(),
            command_type: "ledger.deposit".to_owned(),
            status: crate::JobStatus::Failed,
            progress_percent: None,
            result_json: None,
            error: Some(crate::JobError { code: "unknown_account".to_owned(), message: "no such account".to_owned() }),
            callback_url: None,
            occurred_at: 1_700_000_000_250,
        }
    }

    #[test]
    fn a_value_is_the_marker_the_fingerprint_and_the_datum() {
        let bytes = command().encode().unwrap();
        assert_eq!(bytes[..2], MARKER);
        assert_eq!(&bytes[2..10], COMMAND.fingerprint());
        let datum: Command = decode_datum(&COMMAND.schema, &COMMAND.schema, &bytes[10..]).unwrap();
        assert_eq!(datum, command());
    }

    #[test]
    fn schema_ids_name_the_record_and_its_wire_fingerprint() {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(COMMAND.id, format!("io.onceflow.v1.Command@{}", hex(COMMAND.fingerprint())));
        assert_eq!(RESULT.id, format!("io.onceflow.v1.ResultEvent@{}", hex(RESULT.fingerprint())));
        assert_ne!(COMMAND.id, RESULT.id);
    }

    /// The canonical form knows nothing of logical types, so neither does the fingerprint.
    #[test]
    fn a_logical_type_does_not_change_the_fingerprint() {
        let record = |field_type: &str| {
            KnownSchema::parse(&format!(
                r#"{{"type":"record","name":"R","fields":[{{"name":"at","type":{field_type}}}]}}"#
            ))
        };
        let plain = record(r#""long""#);
        assert_eq!(record(r#"{"type":"long","logicalType":"timestamp-millis"}"#).fingerprint(), plain.fingerprint());
        assert_eq!(record(r#"{"type":"long"}"#).fingerprint(), plain.fingerprint());
        assert_ne!(record(r#""int""#).fingerprint(), plain.fingerprint());
    }

    #[test]
    fn a_length_prefix_claiming_100_mib_is_refused_without_allocating() {
        // A command whose first string (job_id) claims 100 MiB (zig-zag varint):
        // under apache-avro's default limit, over ours.
        let mut bytes = [&MARKER[..], COMMAND.fingerprint(), &[0x80u8, 0x80, 0x80, 0x64][..]].concat();
        bytes.extend_from_slice(b"short");
        let error = Command::decode(&COMMAND.id, &bytes).unwrap_err();
        assert!(error.to_string().contains("allocat"), "{error}");
    }

    #[test]
    fn what_is_not_a_value_of_a_known_writer_is_a_typed_error() {
        let good = command().encode().unwrap();
        let unknown = [&good[..2], &[0u8; 8][..], &good[10..]].concat();
        assert!(
            matches!(Command::decode(&COMMAND.id, &unknown), Err(ContractError::UnknownSchema(fp)) if fp == "0000000000000000")
        );
        for bad in [&[0xC3, 0x01, 0x03][..], &[][..], &good[1..], &[0xff, 0xfe, 0x00][..]] {
            let error = Command::decode(&COMMAND.id, bad).unwrap_err();
            assert!(matches!(error, ContractError::NotSingleObject(_)), "{bad:02x?}: {error}");
        }
        // A result's writer is not a command's.
        let result = result().encode().unwrap();
        assert!(matches!(Command::decode(&RESULT.id, &result), Err(ContractError::Avro(_))));
        let trailing = [&good[..], &[0u8][..]].concat();
        assert!(matches!(Command::decode(&COMMAND.id, &trailing), Err(ContractError::Avro(_))));
    }

    /// A bare datum of the first release, named by the header the builds before
    /// single-object encoding wrote, is still read; under any other name it is not.
    #[test]
    fn a_bare_datum_of_the_older_format_is_read_by_its_schema_id() {
        let v1 = |family: &str| RELEASES.iter().find(|r| r.family == family && r.version == 1).unwrap().parse();
        let bare = bare_datum(&v1("command").schema, &command());
        assert_eq!(Command::decode(LEGACY_IDS[0].0, &bare).unwrap(), command());
        assert!(matches!(Command::decode(&COMMAND.id, &bare), Err(ContractError::NotSingleObject(_))));

        let bare = bare_datum(&v1("result").schema, &result());
        assert_eq!(ResultEvent::decode(LEGACY_IDS[1].0, &bare).unwrap(), result());
    }

    fn bare_datum<T: serde::Serialize>(schema: &Schema, value: &T) -> Vec<u8> {
        apache_avro::to_avro_datum(schema, apache_avro::to_value(value).unwrap().resolve(schema).unwrap()).unwrap()
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
