//! onceflow's command types: what ingest accepts and who applies it, declared
//! in configuration, so that a team's own work needs no Rust and no rebuild.
//!
//! A command type has a name, its payload's JSON Schema, an optional ordering
//! key (a JSON pointer into the payload) and a handler ([`declaration`] gives
//! the file format). The ledger that ships with onceflow is declared the same
//! way (`builtin/ledger.toml`, embedded); an operator adds types in a file of
//! their own, named by the `command_types_file` setting of ingest and the
//! processor, which must both read the same one.
//!
//! Ingest validates each submitted payload here before it stores anything, so
//! a bad payload is a `422` rather than a dead letter later; it judges the
//! payload's canonical JSON (RFC 8785), which is what the processor reads.
//! Both services derive a command's ordering key here, and from it the Kafka
//! key of the command and of its results ([`OrderingKey::message_key`]): one
//! key, one partition, one order from ingest to the results topic.

pub mod declaration;
mod ordering;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use onceflow_contracts::{ContractError, payload::canonical_json};
use serde_json::Value;

use declaration::{Declaration, Declarations, HandlerDeclaration, SchemaSource};
pub use declaration::{RetryPolicy, default_retry};
pub use ordering::{MAX_ORDERING_KEY_BYTES, Ordering, OrderingKey, unordered_message_key};

/// The built-in declarations (the ledger's, onceflow's own probe) and their
/// schemas, built into every service.
const BUILTIN_DECLARATIONS: &[(&str, &str)] = &[
    ("ledger.toml", include_str!("../builtin/ledger.toml")),
    ("onceflow.toml", include_str!("../builtin/onceflow.toml")),
];
const BUILTIN_SCHEMAS: &[(&str, &str)] = &[
    ("onceflow/probe.schema.json", include_str!("../builtin/onceflow/probe.schema.json")),
    ("ledger/open_account.schema.json", include_str!("../builtin/ledger/open_account.schema.json")),
    ("ledger/deposit.schema.json", include_str!("../builtin/ledger/deposit.schema.json")),
    ("ledger/transfer.schema.json", include_str!("../builtin/ledger/transfer.schema.json")),
    ("ledger/statement.schema.json", include_str!("../builtin/ledger/statement.schema.json")),
];

/// The longest command type name.
pub const MAX_TYPE_NAME_BYTES: usize = 128;

/// The shortest heartbeat timeout a type may declare: shorter ones take
/// a worker paused by a garbage collection or a slow network for dead.
pub const MIN_HEARTBEAT_TIMEOUT_MS: u64 = 5_000;

/// Why a declarations file cannot be used (reported at start).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path} is not a valid declarations file: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("command type `{name}` ({path}): {reason}")]
    Invalid { name: String, path: PathBuf, reason: String },
}

/// A command that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedCommand {
    pub command_type: String,
    /// Canonical JSON (RFC 8785: sorted keys, no white space) of the payload.
    pub payload_json: String,
    /// Commands of a tenant with the same key take effect in order.
    pub ordering_key: Option<OrderingKey>,
}

/// One declared command type, its schema compiled.
#[derive(Debug)]
pub struct CommandType {
    pub name: String,
    pub description: Option<String>,
    /// The payload's JSON Schema, as declared (for API documents).
    pub schema: Value,
    validator: jsonschema::Validator,
    pub ordering: Option<Ordering>,
    pub handler: Handler,
    /// A built-in handler applies a command in the transaction that records
    /// it while its key is free (never a push handler).
    pub inline: bool,
    /// The longest one attempt may take, call or callbacks included.
    pub attempt_timeout: Duration,
    /// The longest a running asynchronous attempt may go without a heartbeat.
    pub heartbeat_timeout: Duration,
    /// The longest a command may wait to start, and take in all, from its
    /// `202` (then it ends `failed`, `timed_out`).
    pub start_timeout: Option<Duration>,
    pub job_timeout: Option<Duration>,
    /// Calls in flight at once per processor instance.
    pub concurrency: u32,
    /// Attempts a handler's own failures may spend, and the waits between.
    pub retry: RetryPolicy,
}

/// Who applies a command type, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    /// A handler compiled into the processor, by name.
    Builtin(String),
    /// An `http`/`https` endpoint the processor POSTs each command to.
    Push(url::Url),
    /// Pull workers fetch its commands.
    Pull,
}

impl CommandType {
    /// Check `payload` (already canonical) against the schema; the reason
    /// names the first few places that do not fit.
    fn check(&self, payload: &Value) -> Result<(), String> {
        let problems: Vec<String> = self
            .validator
            .iter_errors(payload)
            .take(3)
            .map(|error| {
                let path = error.instance_path().to_string();
                let at = if path.is_empty() { "the payload".to_owned() } else { format!("`{path}`") };
                shortened(&format!("{at}: {error}"))
            })
            .collect();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

/// Keeps an error about a huge value readable.
fn shortened(text: &str) -> String {
    const LIMIT: usize = 300;
    if text.len() <= LIMIT {
        return text.to_owned();
    }
    let end = (0..=LIMIT).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &text[..end])
}

/// Every command type a service knows, by name. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CommandTypes {
    types: Arc<BTreeMap<String, CommandType>>,
}

impl CommandTypes {
    /// The built-in types only (the ledger, the probe).
    pub fn builtin() -> Self {
        Self::load(None).unwrap_or_else(|error| unreachable!("the built-in declarations are checked by tests: {error}"))
    }

    /// The built-in types and those declared in `file`, if given. A type
    /// declared twice, a schema that does not compile or cannot be read, or
    /// an ordering key that is not a JSON pointer is an error.
    pub fn load(file: Option<&Path>) -> Result<Self, LoadError> {
        let mut types = BTreeMap::new();
        for (file_name, text) in BUILTIN_DECLARATIONS {
            let builtin_path = PathBuf::from(format!("<built-in>/{file_name}"));
            let builtin = parse(text, &builtin_path)?;
            add_all(&mut types, builtin, &builtin_path, |name| {
                BUILTIN_SCHEMAS.iter().find(|(path, _)| *path == name).map(|(_, text)| (*text).to_owned()).ok_or_else(
                    || std::io::Error::new(std::io::ErrorKind::NotFound, format!("no built-in schema {name}")),
                )
            })?;
        }
        if let Some(file) = file {
            let text = std::fs::read_to_string(file).map_err(|error| LoadError::Read { path: file.into(), error })?;
            let declared = parse(&text, file)?;
            let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            add_all(&mut types, declared, file, |name| std::fs::read_to_string(dir.join(name)))?;
        }
        Ok(Self { types: Arc::new(types) })
    }

    pub fn get(&self, name: &str) -> Option<&CommandType> {
        self.types.get(name)
    }

    /// Every type, by name.
    pub fn iter(&self) -> impl Iterator<Item = &CommandType> {
        self.types.values()
    }

    /// Check `payload` against the shape of `command_type`, as its canonical
    /// JSON (where a number with no fraction, `500.0`, is the integer `500`),
    /// and find its ordering key.
    pub fn validate(&self, command_type: &str, payload: &Value) -> Result<ValidatedCommand, ContractError> {
        let declared =
            self.get(command_type).ok_or_else(|| ContractError::UnknownCommandType(shortened(command_type)))?;
        let invalid = |reason: String| ContractError::InvalidPayload { command_type: command_type.to_owned(), reason };
        let payload_json = canonical_json(payload);
        let canonical: Value = serde_json::from_str(&payload_json).map_err(|e| invalid(e.to_string()))?;
        declared.check(&canonical).map_err(invalid)?;
        let ordering_key = match &declared.ordering {
            Some(ordering) => Some(ordering.key_of(&canonical).map_err(invalid)?),
            None => None,
        };
        Ok(ValidatedCommand { command_type: command_type.to_owned(), payload_json, ordering_key })
    }
}

fn parse(text: &str, path: &Path) -> Result<Declarations, LoadError> {
    toml::from_str(text).map_err(|error| LoadError::Parse { path: path.into(), error: error.to_string() })
}

/// Compile every declaration of one file into `types`.
fn add_all(
    types: &mut BTreeMap<String, CommandType>,
    declarations: Declarations,
    path: &Path,
    read_schema: impl Fn(&str) -> std::io::Result<String>,
) -> Result<(), LoadError> {
    for (name, declaration) in declarations.types {
        let invalid = |reason: String| LoadError::Invalid { name: name.clone(), path: path.into(), reason };
        if types.contains_key(&name) {
            return Err(invalid("declared twice (the ledger's types are built in)".to_owned()));
        }
        let compiled = compile(&name, declaration, &read_schema).map_err(invalid)?;
        types.insert(name, compiled);
    }
    Ok(())
}

fn compile(
    name: &str,
    declaration: Declaration,
    read_schema: impl Fn(&str) -> std::io::Result<String>,
) -> Result<CommandType, String> {
    let name_fits = (1..=MAX_TYPE_NAME_BYTES).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_fits {
        return Err(format!("a type name is 1-{MAX_TYPE_NAME_BYTES} characters of [A-Za-z0-9._-]"));
    }
    let schema = match declaration.schema {
        SchemaSource::Inline(schema) => Value::Object(schema),
        SchemaSource::File(file) => {
            let text = read_schema(&file).map_err(|e| format!("schema {file}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("schema {file} is not JSON: {e}"))?
        }
    };
    let validator = jsonschema::validator_for(&schema).map_err(|e| format!("its schema does not compile: {e}"))?;
    let ordering = match declaration.ordering_key {
        Some(pointer) => {
            let scope = declaration.ordering_scope.unwrap_or_else(|| name.to_owned());
            Some(Ordering::new(pointer, scope)?)
        }
        None if declaration.ordering_scope.is_some() => {
            return Err("ordering_scope without ordering_key".to_owned());
        }
        None => None,
    };
    let handler = match declaration.handler {
        HandlerDeclaration::Builtin(name) => Handler::Builtin(name),
        HandlerDeclaration::Push(_) | HandlerDeclaration::Pull if declaration.inline.is_some() => {
            return Err("inline is for built-in handlers only".to_owned());
        }
        HandlerDeclaration::Pull => Handler::Pull,
        HandlerDeclaration::Push(url) => {
            let parsed = url::Url::parse(&url).map_err(|e| format!("push URL `{url}`: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(format!("push URL `{url}` must be an absolute http(s) URL"));
            }
            Handler::Push(parsed)
        }
    };
    if declaration.attempt_timeout_ms < 100 {
        return Err("attempt_timeout_ms must be at least 100".to_owned());
    }
    if declaration.heartbeat_timeout_ms < MIN_HEARTBEAT_TIMEOUT_MS {
        return Err(format!("heartbeat_timeout_ms must be at least {MIN_HEARTBEAT_TIMEOUT_MS}"));
    }
    if declaration.start_timeout_ms.is_some_and(|ms| ms < 100) || declaration.job_timeout_ms.is_some_and(|ms| ms < 100)
    {
        return Err("start_timeout_ms and job_timeout_ms must be at least 100".to_owned());
    }
    if declaration.concurrency == 0 {
        return Err("concurrency must be at least 1".to_owned());
    }
    let mut retry = serde_json::to_value(default_retry()).map_err(|e| e.to_string())?;
    for (field, value) in declaration.retry {
        match retry.get_mut(&field) {
            Some(slot) => *slot = value,
            None => return Err(format!("retry has no setting `{field}`")),
        }
    }
    let retry: RetryPolicy = serde_json::from_value(retry).map_err(|e| format!("retry: {e}"))?;
    retry.validate().map_err(|e| e.replace("webhooks.retry.", "retry."))?;
    Ok(CommandType {
        name: name.to_owned(),
        description: declaration.description,
        schema,
        validator,
        ordering,
        inline: matches!(handler, Handler::Builtin(_)) && declaration.inline.unwrap_or(true),
        handler,
        attempt_timeout: Duration::from_millis(declaration.attempt_timeout_ms),
        heartbeat_timeout: Duration::from_millis(declaration.heartbeat_timeout_ms),
        start_timeout: declaration.start_timeout_ms.map(Duration::from_millis),
        job_timeout: declaration.job_timeout_ms.map(Duration::from_millis),
        concurrency: declaration.concurrency,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use onceflow_contracts::payload::MAX_AMOUNT;
    use serde_json::json;

    use super::*;

    fn key(scope: &str, value: &str) -> Option<OrderingKey> {
        Some(OrderingKey { scope: scope.to_owned(), value: value.to_owned() })
    }

    #[test]
    fn accepts_each_ledger_command_and_canonicalises_the_payload() {
        let types = CommandTypes::builtin();
        let v = types.validate("ledger.transfer", &json!({"to": "b", "amount": 5, "from": "a"})).unwrap();
        assert_eq!(v.payload_json, r#"{"amount":5,"from":"a","to":"b"}"#);
        assert_eq!(v.ordering_key, key("ledger", "a"), "a transfer is ordered by its source account");
        let opened = types.validate("ledger.open_account", &json!({"account_id": "a", "currency": "EUR"})).unwrap();
        assert_eq!(opened.ordering_key, key("ledger", "a"), "one scope for the ledger's types");
        types.validate("ledger.deposit", &json!({"account_id": "a", "amount": 1})).unwrap();
        types.validate("ledger.deposit", &json!({"account_id": "a", "amount": MAX_AMOUNT})).unwrap();
        let whole = types.validate("ledger.deposit", &json!({"account_id": "a", "amount": 500.0})).unwrap();
        assert_eq!(whole.payload_json, r#"{"account_id":"a","amount":500}"#, "500.0 is the integer 500");
        let statement = types.validate("ledger.statement", &json!({"account_id": "acc-1"})).unwrap();
        assert_eq!(statement.ordering_key, key("ledger", "acc-1"), "a statement is ordered by its account");
    }

    #[test]
    fn refuses_bad_payloads_with_a_reason() {
        let types = CommandTypes::builtin();
        let cases = [
            ("ledger.deposit", json!({"account_id": "a", "amount": 0})),
            ("ledger.deposit", json!({"account_id": "a", "amount": MAX_AMOUNT + 1})),
            ("ledger.deposit", json!({"account_id": "a", "amount": i64::MAX})),
            ("ledger.transfer", json!({"from": "a", "to": "b", "amount": MAX_AMOUNT + 1})),
            ("ledger.deposit", json!({"account_id": "a", "amount": "5"})),
            ("ledger.deposit", json!({"account_id": "a", "amount": 5.5})),
            ("ledger.deposit", json!({"account_id": "a", "amount": 5, "extra": true})),
            ("ledger.open_account", json!({"account_id": "a", "currency": "eur"})),
            ("ledger.open_account", json!({"account_id": "a b", "currency": "EUR"})),
            ("ledger.open_account", json!({"account_id": "a".repeat(65), "currency": "EUR"})),
            ("ledger.open_account", json!({"account_id": "a\n", "currency": "EUR"})),
            ("ledger.transfer", json!([1, 2])),
            ("ledger.statement", json!({})),
            ("ledger.statement", json!({"account_id": ""})),
            ("ledger.statement", json!({"account_id": "a", "from": "2024-01-01"})),
        ];
        for (command_type, payload) in cases {
            let error = types.validate(command_type, &payload).unwrap_err();
            assert!(matches!(error, ContractError::InvalidPayload { .. }), "{payload}: {error}");
        }
        let error = types.validate("ledger.deposit", &json!({"account_id": "a", "amount": 0})).unwrap_err();
        assert!(error.to_string().contains("`/amount`"), "the reason names the place: {error}");
        let error = types.validate("ledger.mint", &json!({})).unwrap_err();
        assert!(matches!(error, ContractError::UnknownCommandType(_)));
    }

    #[test]
    fn the_largest_amount_survives_canonical_json_exactly() {
        let types = CommandTypes::builtin();
        let v = types.validate("ledger.deposit", &json!({"account_id": "a", "amount": MAX_AMOUNT})).unwrap();
        let payload: onceflow_contracts::payload::ledger::Deposit = serde_json::from_str(&v.payload_json).unwrap();
        assert_eq!(payload.amount, MAX_AMOUNT);
    }

    fn declared(file: &str, schemas: &[(&str, &str)]) -> Result<CommandTypes, LoadError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("onceflow-catalogue-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in schemas {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let path = dir.join("types.toml");
        std::fs::write(&path, file).unwrap();
        let loaded = CommandTypes::load(Some(&path));
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    #[test]
    fn a_type_of_ones_own_is_declared_with_a_schema_file_or_an_inline_schema() {
        let types = declared(
            r#"
            [types."demo.greet"]
            description = "Say hello."
            schema = "greet.json"
            ordering_key = "/name"
            handler = { builtin = "ledger.deposit" }

            [types."demo.render"]
            schema = { type = "object", required = ["pages"], properties = { pages = { type = "integer" } } }
            handler = { push = "https://render.example/onceflow" }
            attempt_timeout_ms = 120000
            retry = { max_attempts = 3 }
            "#,
            &[(
                "greet.json",
                r#"{"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}"#,
            )],
        )
        .unwrap();
        let greet = types.validate("demo.greet", &json!({"name": "ada"})).unwrap();
        assert_eq!(greet.ordering_key, key("demo.greet", "ada"), "the scope is the type's name by default");
        assert_eq!(types.get("demo.greet").unwrap().description.as_deref(), Some("Say hello."));
        let render = types.validate("demo.render", &json!({"pages": 3})).unwrap();
        assert_eq!(render.ordering_key, None, "no ordering key: each command alone");
        assert!(types.validate("demo.render", &json!({"pages": "3"})).is_err());
        let render = types.get("demo.render").unwrap();
        assert_eq!(render.handler, Handler::Push("https://render.example/onceflow".parse().unwrap()));
        assert_eq!(render.attempt_timeout, Duration::from_secs(120));
        assert_eq!(render.concurrency, 32, "the default");
        assert!(!render.inline && types.get("ledger.deposit").unwrap().inline);
        assert_eq!(render.retry.max_attempts, 3);
        assert_eq!(render.retry.initial_backoff_ms, default_retry().initial_backoff_ms, "the rest by default");
        assert!(types.get("ledger.deposit").is_some(), "the ledger is still there");
    }

    #[test]
    fn a_pull_type_declares_its_timeouts() {
        let types = declared(
            r#"
            [types."demo.report"]
            schema = {}
            handler = "pull"
            attempt_timeout_ms = 3600000
            heartbeat_timeout_ms = 5000
            start_timeout_ms = 60000
            job_timeout_ms = 7200000
            "#,
            &[],
        )
        .unwrap();
        let report = types.get("demo.report").unwrap();
        assert_eq!(report.handler, Handler::Pull);
        assert_eq!(report.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(report.start_timeout, Some(Duration::from_secs(60)));
        assert_eq!(report.job_timeout, Some(Duration::from_secs(7200)));
        let render = declared("[types.\"r\"]\nschema = {}\nhandler = { push = \"http://h/\" }", &[]).unwrap();
        let render = render.get("r").unwrap();
        assert_eq!(
            (render.heartbeat_timeout, render.start_timeout, render.job_timeout),
            (Duration::from_secs(30), None, None)
        );
    }

    #[test]
    fn a_declaration_that_cannot_work_is_refused_with_its_name() {
        let cases = [
            ("[types.\"ledger.deposit\"]\nschema = {}\nhandler = { builtin = \"ledger.deposit\" }", "declared twice"),
            ("[types.\"a\"]\nschema = \"missing.json\"\nhandler = { builtin = \"x\" }", "missing.json"),
            ("[types.\"a\"]\nschema = { type = 5 }\nhandler = { builtin = \"x\" }", "does not compile"),
            ("[types.\"a\"]\nschema = {}\nordering_key = \"name\"\nhandler = { builtin = \"x\" }", "JSON pointer"),
            ("[types.\"a b\"]\nschema = {}\nhandler = { builtin = \"x\" }", "type name"),
            ("[types.\"a\"]\nschema = {}\nordering_scope = \"s\"\nhandler = { builtin = \"x\" }", "without"),
            ("[types.\"a\"]\nschema = {}\nhandler = { builtin = \"x\" }\ntimeout = 1", "valid declarations"),
            ("[types.\"a\"]\nschema = {}\nhandler = { push = \"ftp://x/y\" }", "http(s)"),
            ("[types.\"a\"]\nschema = {}\nhandler = { push = \"not a url\" }", "push URL"),
            ("[types.\"a\"]\nschema = {}\nhandler = { push = \"http://h/\" }\nconcurrency = 0", "concurrency"),
            (
                "[types.\"a\"]\nschema = {}\nhandler = { push = \"http://h/\" }\nretry = { max_attempts = 0 }",
                "max_attempts",
            ),
            ("[types.\"a\"]\nschema = {}\nhandler = { push = \"http://h/\" }\nretry = { attempts = 3 }", "no setting"),
            ("[types.\"a\"]\nschema = {}\nhandler = \"pull\"\nheartbeat_timeout_ms = 1000", "heartbeat_timeout_ms"),
            ("[types.\"a\"]\nschema = {}\nhandler = \"pull\"\njob_timeout_ms = 5", "job_timeout_ms"),
            ("[types.\"a\"]\nschema = {}\nhandler = \"pull\"\ninline = true", "inline"),
            ("[types.\"a\"]\nschema = {}\nhandler = \"poll\"", "valid declarations"),
        ];
        for (file, expected) in cases {
            let error = declared(file, &[]).unwrap_err().to_string();
            assert!(error.contains(expected), "{file}: {error}");
        }
    }
}
