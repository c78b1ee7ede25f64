//! The file that declares command types, as an operator writes it (TOML):
//!
//! ```toml
//! [types."demo.greet"]
//! description = "Say hello."                 # shown in ingest's OpenAPI document
//! schema = "demo.greet.schema.json"          # the payload's JSON Schema: a file beside
//!                                            # this one, or an inline table
//! ordering_key = "/name"                     # JSON pointer into the payload (optional)
//! ordering_scope = "demo"                    # types sharing a scope share key queues
//! handler = { builtin = "ledger.deposit" }   # who serves it
//! ```
//!
//! Everything here is checked when a service starts ([`crate::CommandTypes::load`]):
//! a declaration that cannot work stops the service with its name, instead of
//! refusing or dead-lettering commands later.

use std::collections::BTreeMap;

/// A whole declarations file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declarations {
    /// Command types by name.
    #[serde(default)]
    pub types: BTreeMap<String, Declaration>,
}

/// One command type as declared.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// What the type does, for the API document.
    #[serde(default)]
    pub description: Option<String>,
    /// The payload's JSON Schema.
    pub schema: SchemaSource,
    /// A JSON pointer (RFC 6901) to the payload's ordering key: commands of
    /// a tenant with the same key (in the same scope) take effect in the
    /// order their `202`s were given, one at a time. Without one, each
    /// command stands alone.
    #[serde(default)]
    pub ordering_key: Option<String>,
    /// Types that name the same scope order their commands together (the
    /// ledger's types, all keyed by account); the type's own name otherwise.
    #[serde(default)]
    pub ordering_scope: Option<String>,
    /// Who applies the command.
    pub handler: HandlerDeclaration,
}

/// Where a payload schema comes from.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum SchemaSource {
    /// A JSON file, relative to the declarations file.
    File(String),
    /// The schema itself, written as a TOML table.
    Inline(serde_json::Map<String, serde_json::Value>),
}

/// Who applies a command type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HandlerDeclaration {
    /// A handler compiled into the processor, by name (the ledger's).
    Builtin(String),
}
