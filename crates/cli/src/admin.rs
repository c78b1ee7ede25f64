//! The operators' and tenants' repair commands:
//!
//! - `dead-letters list|redrive ID`: the processor's
//!   `GET /admin/dead-letters` and `POST /admin/dead-letters/{id}/redrive`,
//!   with the admin token;
//! - `deliveries list JOB|redrive ID`: the notifier's
//!   `GET /v1/jobs/{job}/deliveries` and `POST /v1/deliveries/{id}/redrive`,
//!   with the tenant's API key.
//!
//! A redrive is not keyed, so it is sent again only when it cannot have
//! reached the service; a second redrive of the same record is refused
//! (`409`) by the service anyway.

use reqwest::Method;
use serde_json::Value;

use crate::{
    Context,
    api::{Repeat, Service},
    args::{DeadLetterCommand, DeliveryCommand},
    error::CliError,
    output,
};

pub async fn dead_letters(ctx: &Context, command: DeadLetterCommand) -> Result<(), CliError> {
    let token = ctx.admin_token.as_deref().ok_or_else(|| {
        CliError::Usage(
            "dead letters need the processor's admin token: --admin-token or ONCEFLOW_ADMIN_TOKEN".to_owned(),
        )
    })?;
    let processor = Service::new("processor", &ctx.processor_url, Some(token));
    // The processor serves no admin route at all without `admin.token`.
    dead_letter_command(ctx, &processor, command).await.map_err(|error| match error {
        CliError::Rejected { status: 404, kind, detail, service } if kind.as_deref() != Some("not-a-dead-letter") => {
            CliError::Rejected {
                service,
                status: 404,
                kind,
                detail: format!("{detail} (is the processor's admin.token set, e.g. ONCEFLOW_ADMIN__TOKEN?)"),
            }
        }
        other => other,
    })
}

async fn dead_letter_command(ctx: &Context, processor: &Service, command: DeadLetterCommand) -> Result<(), CliError> {
    match command {
        DeadLetterCommand::List { limit } => {
            let listing = get(ctx, processor, &format!("/admin/dead-letters?limit={limit}")).await?;
            let items = listing["dead_letters"].as_array().cloned().unwrap_or_default();
            print_list(ctx, &listing, &items, "no dead letters", dead_letter_line)
        }
        DeadLetterCommand::Redrive { message_id } => {
            let done = post(ctx, processor, &format!("/admin/dead-letters/{message_id}/redrive")).await?;
            print_one(ctx, &done, || {
                format!(
                    "redriven: {message_id} is back on the commands topic (redrive {})",
                    output::text_of(&done["redrive_count"])
                )
            })
        }
    }
}

pub async fn deliveries(ctx: &Context, command: DeliveryCommand) -> Result<(), CliError> {
    let notifier = &ctx.notifier;
    match command {
        DeliveryCommand::List { job_id } => {
            let listing = get(ctx, notifier, &format!("/v1/jobs/{job_id}/deliveries")).await?;
            let items = listing["deliveries"].as_array().cloned().unwrap_or_default();
            print_list(ctx, &listing, &items, "no webhook deliveries for this job", delivery_line)
        }
        DeliveryCommand::Redrive { delivery_id } => {
            let delivery = post(ctx, notifier, &format!("/v1/deliveries/{delivery_id}/redrive")).await?;
            print_one(ctx, &delivery, || format!("redriven: {}", delivery_line(&delivery)))
        }
    }
}

async fn get(ctx: &Context, service: &Service, path: &str) -> Result<Value, CliError> {
    ctx.api.call(service, Repeat::Safe, |http| service.request(http, Method::GET, path)).await?.json(service)
}

async fn post(ctx: &Context, service: &Service, path: &str) -> Result<Value, CliError> {
    ctx.api.call(service, Repeat::OnlyIfUnsent, |http| service.request(http, Method::POST, path)).await?.json(service)
}

fn print_list(
    ctx: &Context,
    listing: &Value,
    items: &[Value],
    none: &str,
    line: fn(&Value) -> String,
) -> Result<(), CliError> {
    if ctx.json {
        return output::json(listing);
    }
    if items.is_empty() {
        output::note(none);
    }
    for item in items {
        output::line(&line(item))?;
    }
    Ok(())
}

fn print_one(ctx: &Context, value: &Value, text: impl FnOnce() -> String) -> Result<(), CliError> {
    if ctx.json { output::json(value) } else { output::line(&text()) }
}

/// A field as text, `-` when absent.
fn field(value: &Value, name: &str) -> String {
    value.get(name).filter(|v| !v.is_null()).map_or_else(|| "-".to_owned(), output::text_of)
}

fn dead_letter_line(item: &Value) -> String {
    let mut state = format!("redriven {}x", field(item, "redrive_count"));
    if item["redrive_pending"] == true {
        state.push_str(", redrive pending");
    }
    format!(
        "{}  {}  {}  tenant {}  {}  [{state}; inbox {}]",
        field(item, "message_id"),
        field(item, "dead_lettered_at"),
        field(item, "command_type"),
        field(item, "tenant"),
        output::error_text(&item["error"]).unwrap_or_default(),
        field(item, "inbox_outcome"),
    )
}

fn delivery_line(item: &Value) -> String {
    let last = match (item["last_status_code"].as_i64(), item["last_error"].as_str()) {
        (Some(code), _) => format!("last answer {code}"),
        (None, Some(error)) => format!("last error {error}"),
        (None, None) => "no attempt yet".to_owned(),
    };
    let next = item["next_attempt_at"].as_str().map(|at| format!(", next at {at}")).unwrap_or_default();
    format!(
        "{}  {:<9} {}  attempts {}  {}  ({last}{next})",
        field(item, "id"),
        field(item, "status"),
        field(item, "event_type"),
        field(item, "attempt_count"),
        field(item, "url"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_read_one_line_each() {
        let delivery = serde_json::json!({
            "id": "d1", "status": "failed", "event_type": "job.succeeded", "attempt_count": 10,
            "url": "http://127.0.0.1:9999/hook", "last_status_code": 500, "next_attempt_at": null
        });
        assert_eq!(
            delivery_line(&delivery),
            "d1  failed    job.succeeded  attempts 10  http://127.0.0.1:9999/hook  (last answer 500)"
        );
        let dead = serde_json::json!({
            "message_id": "m1", "dead_lettered_at": "2026-12-02T10:00:00Z", "command_type": "ledger.deposit",
            "tenant": "dev", "error": {"code": "unknown_type", "message": "no handler"}, "redrive_count": 1,
            "redrive_pending": true, "inbox_outcome": "dead_lettered"
        });
        assert_eq!(
            dead_letter_line(&dead),
            "m1  2026-12-02T10:00:00Z  ledger.deposit  tenant dev  unknown_type: no handler  \
             [redriven 1x, redrive pending; inbox dead_lettered]"
        );
    }
}
