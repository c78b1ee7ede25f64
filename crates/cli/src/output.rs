//! Where output goes: results on stdout (text for people, or one JSON
//! document per line with `--json`), notes and errors on stderr.

use std::io::Write as _;

use crate::error::CliError;

/// Print one line on stdout. A reader that went away (`onceflow watch |
/// head -1`) ends the program quietly with success: it has what it wanted.
pub fn line(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(error) => Err(CliError::Internal(format!("cannot write to stdout: {error}"))),
    }
}

/// Print one JSON document on one line of stdout.
pub fn json(value: &serde_json::Value) -> Result<(), CliError> {
    line(&value.to_string())
}

/// A note for the person at the terminal (or a script's log) on stderr; a
/// stderr that cannot be written to is no reason to fail the command.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC, milliseconds).
pub fn millis_rfc3339(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| millis.to_string())
}

/// A JSON value as text: strings bare, anything else compact JSON.
pub fn text_of(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `code: message` of an `{"code", "message"}` error object.
pub fn error_text(error: &serde_json::Value) -> Option<String> {
    if error.is_null() {
        return None;
    }
    let code = error.get("code").map(text_of).unwrap_or_default();
    let message = error.get("message").map(text_of).unwrap_or_default();
    Some(match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code,
        _ => text_of(error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_errors_read_code_first() {
        assert_eq!(millis_rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        let error = serde_json::json!({"code": "insufficient_funds", "message": "balance 5 < 10"});
        assert_eq!(error_text(&error).as_deref(), Some("insufficient_funds: balance 5 < 10"));
        assert_eq!(error_text(&serde_json::Value::Null), None);
    }
}
