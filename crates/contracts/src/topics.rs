//! Topic names. Every service takes a prefix (empty in production) so tests can
//! run side by side on one broker without seeing each other's messages.

/// The topics of onceflow, resolved against a prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topics {
    pub commands: String,
    pub results: String,
    pub dead_letter: String,
    /// Compacted: the latest state of every webhook endpoint (notifier → ingest).
    pub webhook_endpoints: String,
}

impl Topics {
    /// Topic names with `prefix` in front of each (`""` gives the documented names).
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            commands: format!("{prefix}onceflow.commands"),
            results: format!("{prefix}onceflow.results"),
            dead_letter: format!("{prefix}onceflow.commands.dlq"),
            webhook_endpoints: format!("{prefix}onceflow.webhook-endpoints"),
        }
    }
}
