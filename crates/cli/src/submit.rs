//! `onceflow submit TYPE --payload JSON`: one command to ingest under one
//! Idempotency-Key, however many times it has to be sent. The key is printed
//! (stderr) before the first attempt, so a submission cut short can be
//! repeated with `--idempotency-key` and still take effect once.

use std::io::Read as _;

use reqwest::{Method, header::CONTENT_TYPE};

use crate::{Context, api::Repeat, args::SubmitArgs, error::CliError, job, output};

/// The most payload read from a file or stdin: far above ingest's own limit
/// (`max_body_bytes`, 64 KiB by default), which judges the real size.
const MAX_PAYLOAD_BYTES: u64 = 16 * 1024 * 1024;

pub async fn run(ctx: &Context, args: SubmitArgs) -> Result<(), CliError> {
    let payload = payload(&args.payload)?;
    let key = args.idempotency_key.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    output::note(&format!("Idempotency-Key: {key}"));
    let mut body = serde_json::json!({"type": args.command_type, "payload": payload});
    if let Some(url) = &args.callback_url {
        body["callback_url"] = url.as_str().into();
    }
    let body = body.to_string();
    let answer = ctx
        .api
        .call(&ctx.ingest, Repeat::Safe, |http| {
            let request = ctx
                .ingest
                .request(http, Method::POST, "/v1/commands")
                .header("idempotency-key", &key)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
            match &args.correlation_id {
                Some(id) => request.header("x-correlation-id", id),
                None => request,
            }
        })
        .await?;
    if answer.header("idempotent-replayed") == Some("true") {
        output::note("this key was used before: ingest replayed its first answer (no new command)");
    }
    let accepted = answer.json(&ctx.ingest)?;
    output::line(&String::from_utf8_lossy(&answer.body))?;
    if !args.wait.wait {
        return Ok(());
    }
    let job_id =
        accepted["job_id"].as_str().ok_or_else(|| CliError::unreadable("ingest", "202 answer", "no job_id"))?;
    let job = job::wait(ctx, job_id, &args.wait).await?;
    job::print(ctx, &job)?;
    job.outcome()
}

/// `--payload`: JSON itself, `@FILE`, or `-` for stdin.
fn payload(arg: &str) -> Result<serde_json::Value, CliError> {
    let (text, source) = match arg {
        "-" => (read_bounded(std::io::stdin().lock(), "stdin")?, "stdin".to_owned()),
        _ if arg.starts_with('@') => {
            let path = &arg[1..];
            let file = std::fs::File::open(path)
                .map_err(|e| CliError::Usage(format!("cannot read the payload file {path}: {e}")))?;
            (read_bounded(file, path)?, path.to_owned())
        }
        _ => (arg.to_owned(), "--payload".to_owned()),
    };
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("the payload ({source}) is not JSON: {e}")))
}

fn read_bounded(reader: impl std::io::Read, source: &str) -> Result<String, CliError> {
    let mut text = String::new();
    reader
        .take(MAX_PAYLOAD_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| CliError::Usage(format!("cannot read the payload from {source}: {e}")))?;
    if text.len() as u64 > MAX_PAYLOAD_BYTES {
        return Err(CliError::Usage(format!("the payload in {source} is over {MAX_PAYLOAD_BYTES} bytes")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_json_inline_or_from_a_file() {
        assert_eq!(payload(r#"{"amount": 5}"#).unwrap(), serde_json::json!({"amount": 5}));
        let file = std::env::temp_dir().join(format!("onceflow-cli-payload-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&file, r#"{"account_id": "alice"}"#).unwrap();
        assert_eq!(payload(&format!("@{}", file.display())).unwrap(), serde_json::json!({"account_id": "alice"}));
        std::fs::remove_file(&file).unwrap();
        let missing = payload(&format!("@{}", file.display())).unwrap_err();
        assert!(matches!(missing, CliError::Usage(ref m) if m.contains("cannot read")), "{missing}");
        assert!(matches!(payload("{amount: 5}"), Err(CliError::Usage(_))));
    }

    #[test]
    fn a_payload_over_the_bound_is_refused_unread() {
        let big = std::io::repeat(b' ').take(MAX_PAYLOAD_BYTES + 10);
        assert!(matches!(read_bounded(big, "stdin"), Err(CliError::Usage(m)) if m.contains("over")));
    }
}
