//! The delivery worker: one per notifier instance, running up to
//! `webhooks.workers` attempts at once.
//!
//! It claims due deliveries from the shared table (so each attempt is made by
//! one instance only), checks the callback URL against the SSRF rules again
//! (DNS may have changed since submission), signs the stored body with every
//! active secret of the tenant, POSTs it without following redirects, and
//! records the attempt: success, a retry at the next point of the schedule, or
//! failure (`410 Gone`, schedule used up, URL refused, no secret).
//!
//! Each outcome also feeds the circuit breaker of its tenant and destination
//! (see [`super::breakers`]): while it is open, that tenant's deliveries
//! there are not claimed (they wait without spending attempts) and, once its
//! cool-down is over, exactly one is claimed as the probe. A `410 Gone` disables the endpoint
//! (see [`super::endpoints`]); a delivery claimed for a disabled endpoint
//! ends as `endpoint_disabled` without a request.
//!
//! It is woken by `NOTIFY` when a delivery is created or redriven (or a
//! breaker closes), and when one of its attempts ends (which frees a worker,
//! a place in its tenant's share, and the next delivery of its key); it
//! sleeps until the next delivery it could claim comes due otherwise (a
//! retry, a breaker's probe; see [`claims::NextDue`]), and polls every
//! `webhooks.poll_interval_ms` as a fallback.
//!
//! Bounded: at most `workers` deliveries are claimed and in flight, and at
//! most a tenant's share (`webhooks.per_tenant.max_in_flight`, see
//! [`super::share`]) of one tenant; the claim lets tenants take turns (see
//! [`super::claims`]). When all workers are busy, or a tenant's share is,
//! nothing more is claimed (for that tenant) and due deliveries wait in the
//! table (durable, visible to the other instances) until a worker, or a
//! place in the share, is free. A receiver's answer is read up to
//! [`EXCERPT_BYTES`] and the rest dropped.
//!
//! On shutdown, attempts in flight are cut off, recorded as interrupted and
//! made due again at once, so the next instance to run retries them without
//! waiting for their lease to expire. A crash leaves the lease to expire
//! instead (`WebhooksConfig::lease`).

use std::{sync::Arc, time::Duration};

use onceflow_webhook::{
    SsrfResolver,
    breaker::{self, Signal},
    check_callback_url,
    retry::{self, Verdict},
    signing,
};
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use sqlx::{PgPool, postgres::PgListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    attempts::{self, AttemptRecord, Effects, Next},
    breakers,
    claims::{self, Claimed},
    share::{InFlight, Slot},
    store,
};
use crate::config::WebhooksConfig;

/// The shortest wait between two looks for due deliveries.
const MIN_SLEEP: Duration = Duration::from_millis(10);

/// How much of a receiver's answer is kept with the attempt.
pub const EXCERPT_BYTES: usize = 1024;

/// How often the breakers' metrics are refreshed from the shared table.
const BREAKER_METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// Delivers webhooks; cheap to clone.
#[derive(Clone, Debug)]
pub struct Worker {
    pool: PgPool,
    client: reqwest::Client,
    config: Arc<WebhooksConfig>,
    /// Where endpoint state changes (`410 Gone`) are published.
    endpoints_topic: Arc<str>,
    /// This instance's attempts in flight per tenant, against their shares.
    in_flight: InFlight,
}

impl Worker {
    /// A worker with its HTTP client: no redirects, bounded time, and the
    /// SSRF rules applied to every address it connects to.
    pub fn new(pool: PgPool, config: WebhooksConfig, endpoints_topic: &str) -> Result<Self, String> {
        config.validate()?;
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .dns_resolver(Arc::new(SsrfResolver::new(config.allowlist.clone())))
            .user_agent(concat!("onceflow-notifier/", env!("CARGO_PKG_VERSION"), " (webhooks)"))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4);
        builder = match config.proxy.as_deref().filter(|p| !p.is_empty()) {
            // The proxy resolves and connects, so it should filter addresses
            // too (the SSRF check before each attempt still runs here).
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy).map_err(|e| format!("webhooks.proxy: {e}"))?),
            // Ignore HTTP(S)_PROXY: a proxy would bypass the resolver's checks.
            None => builder.no_proxy(),
        };
        let client = builder.build().map_err(|e| format!("webhook HTTP client: {e}"))?;
        Ok(Self {
            pool,
            client,
            config: Arc::new(config),
            endpoints_topic: Arc::from(endpoints_topic),
            in_flight: InFlight::default(),
        })
    }

    /// Deliver until `shutdown`, and report the breakers' states meanwhile.
    pub async fn run(self, shutdown: CancellationToken) {
        let report = breakers::report(self.pool.clone(), BREAKER_METRICS_INTERVAL, shutdown.clone());
        tokio::join!(self.deliver(shutdown), report);
    }

    async fn deliver(self, shutdown: CancellationToken) {
        let workers = self.config.workers;
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        if !self.config.breaker.enabled {
            match breakers::close_all(&self.pool).await {
                Ok(0) => {}
                Ok(closed) => tracing::warn!(closed, "webhook circuit breakers are off: closed the open ones"),
                Err(error) => tracing::warn!(%error, "cannot close the webhook circuit breakers"),
            }
        }
        let mut attempts = JoinSet::new();
        let mut listener: Option<PgListener> = None;
        let mut next_due = claims::NextDue::default();
        tracing::info!(
            workers,
            per_tenant = ?self.config.per_tenant,
            schedule = ?self.config.retry.schedule(),
            breaker = ?self.config.breaker,
            allowlist = ?Vec::<String>::from(self.config.allowlist.clone()),
            "webhook worker started"
        );
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if listener.is_none() {
                listener = listen(&self.pool).await;
            }
            while attempts.try_join_next().is_some() {}
            let free = workers.saturating_sub(attempts.len());
            if free > 0 {
                match self.claim(free).await {
                    Ok(claimed) => {
                        let full = claimed.len() == free;
                        for (delivery, slot) in claimed {
                            attempts.spawn(self.clone().attempt(delivery, slot, shutdown.clone()));
                        }
                        if full {
                            // More may be due: claim again if workers are free.
                            continue;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot claim webhook deliveries; retrying"),
                }
            }
            let until_due = if free == 0 {
                // Every worker is busy: due deliveries wait in the table
                // until one finishes (the `join_next` branch below).
                Duration::MAX
            } else {
                // Tenants without room wait for an attempt of theirs to end
                // (the `join_next` branch), not for their due deliveries.
                let full = self.in_flight.rooms(&self.config.per_tenant).full();
                match next_due.within(&self.pool, &full, poll).await {
                    // The floor lets deliveries that come due one after
                    // another be claimed a few at a time, not one a look.
                    Ok(Some(due)) => due.clamp(MIN_SLEEP, poll),
                    Ok(None) | Err(_) => poll,
                }
            };
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        if l.recv().await.is_err() {
                            listener = None;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = notified => {}
                () = sleep_at_most(until_due) => {}
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
            }
        }
        // Each attempt in flight sees the shutdown and records itself as
        // interrupted; wait for those records.
        while attempts.join_next().await.is_some() {}
        tracing::info!("webhook worker stopped");
    }

    /// Claim up to `free` deliveries, each tenant within what is left of its
    /// share: first the probes of breakers whose cool-down is over, then due
    /// deliveries behind closed ones. Each comes with its place in its
    /// tenant's share, taken at once so the next claim sees it.
    async fn claim(&self, free: usize) -> Result<Vec<(Claimed, Slot)>, sqlx::Error> {
        let lease = self.config.lease();
        let shares = &self.config.per_tenant;
        let take = |delivery: Claimed| {
            let slot = self.in_flight.take(&delivery.tenant);
            (delivery, slot)
        };
        let mut claimed: Vec<(Claimed, Slot)> = if self.config.breaker.enabled {
            let rooms = self.in_flight.rooms(shares);
            claims::claim_probes(&self.pool, lease, &rooms, free as i64).await?.into_iter().map(take).collect()
        } else {
            vec![]
        };
        let left = free - claimed.len();
        if left > 0 {
            let rooms = self.in_flight.rooms(shares);
            claimed.extend(claims::claim_due(&self.pool, lease, &rooms, left as i64).await?.into_iter().map(take));
        }
        Ok(claimed)
    }

    /// Make one attempt at `delivery` and record what came of it; `slot`,
    /// its place in its tenant's share, is given back when it ends.
    async fn attempt(self, delivery: Claimed, slot: Slot, shutdown: CancellationToken) {
        // A CLIENT span (OpenTelemetry's HTTP client conventions); the
        // destination, not the URL, whose path or query may carry secrets.
        let span = tracing::info_span!(
            "webhook.attempt",
            otel.name = "POST",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = delivery.destination.as_deref().unwrap_or_default(),
            http.response.status_code = tracing::field::Empty,
            correlation_id = %delivery.correlation_id,
            job_id = %delivery.job_id,
            webhook_id = %delivery.id,
            attempt = delivery.attempt,
            destination = delivery.destination.as_deref().unwrap_or_default(),
        );
        onceflow_runtime::telemetry::set_parent_from(
            &span,
            delivery.traceparent.as_deref(),
            delivery.tracestate.as_deref(),
        );
        async move {
            if delivery.previous_abandoned
                && let Err(error) = attempts::log_abandoned(&self.pool, &delivery).await
            {
                tracing::warn!(%error, "cannot log the abandoned attempt");
            }
            if delivery.probe {
                tracing::info!("webhook circuit breaker half-open: this attempt is the probe");
                metrics::counter!("onceflow_webhook_breaker_transitions_total", "to" => "half_open").increment(1);
            }
            let started_at = chrono::Utc::now();
            let clock = tokio::time::Instant::now();
            let outcome = match delivery.endpoint_disabled {
                Some(endpoint) => Outcome::EndpointDisabled(endpoint),
                None => tokio::select! {
                    () = shutdown.cancelled() => Outcome::Interrupted,
                    outcome = self.send(&delivery) => outcome,
                },
            };
            let latency = clock.elapsed();
            let next = self.next_step(&delivery, &outcome);
            let signal = outcome.signal();
            if next != Next::EndpointDisabled {
                metrics::counter!("onceflow_webhook_attempts_total", "outcome" => outcome.label()).increment(1);
            }
            let record = outcome.record(started_at, latency);
            metrics::histogram!("onceflow_webhook_attempt_duration_seconds").record(latency.as_secs_f64());
            match next {
                Next::Succeeded => tracing::info!(latency_ms = latency.as_millis(), "webhook delivered"),
                Next::RetryIn(delay) => tracing::info!(
                    error = record.error.as_deref().unwrap_or_default(),
                    retry_in_ms = delay.as_millis(),
                    "webhook attempt failed; retrying"
                ),
                Next::Failed | Next::Gone => tracing::warn!(
                    error = record.error.as_deref().unwrap_or_default(),
                    "webhook delivery failed; it can be redriven"
                ),
                Next::EndpointDisabled => tracing::info!("webhook endpoint disabled; the delivery ends unsent"),
            }
            let ended = match next {
                Next::Succeeded => Some("succeeded"),
                Next::Failed | Next::Gone => Some("failed"),
                Next::EndpointDisabled => Some("endpoint_disabled"),
                Next::RetryIn(_) => None,
            };
            if let Some(outcome) = ended {
                metrics::counter!("onceflow_webhook_deliveries_total", "outcome" => outcome).increment(1);
            }
            self.record(&delivery, &record, next, signal).await;
        }
        .instrument(span)
        .await;
        // Given back only now that the outcome is recorded: until then the
        // delivery is leased, so it is still this tenant's attempt.
        drop(slot);
    }

    /// Store the outcome, retrying a failing database briefly: the attempt
    /// happened, and losing its record would leave the delivery leased until
    /// the lease expires (then it is retried, which is still correct).
    async fn record(&self, delivery: &Claimed, record: &AttemptRecord, next: Next, signal: Option<Signal>) {
        let effects = Effects { signal, breaker: &self.config.breaker, endpoints_topic: &self.endpoints_topic };
        let mut backoff = Duration::from_millis(100);
        for _ in 0..5 {
            match attempts::finish(&self.pool, delivery, record, next, effects).await {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!("the lease of this delivery ran out during the attempt; another worker owns it");
                    return;
                }
                Err(error) => tracing::warn!(%error, "cannot record the webhook attempt; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        tracing::error!("the webhook attempt could not be recorded; it is retried when its lease expires");
    }

    /// Check, sign and POST.
    async fn send(&self, delivery: &Claimed) -> Outcome {
        let secrets = self.config.secrets_of(&delivery.tenant);
        if secrets.is_empty() {
            return Outcome::Refused(format!(
                "no webhook signing secret is configured for tenant `{}` (webhooks.secrets)",
                delivery.tenant
            ));
        }
        if let Err(error) = check_callback_url(&delivery.url, &self.config.allowlist).await {
            return if error.is_transient() {
                Outcome::Transport(error.to_string())
            } else {
                Outcome::Refused(format!("refused by SSRF protection: {error}"))
            };
        }
        let webhook_id = delivery.id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signing::sign(secrets, &webhook_id, timestamp, delivery.body.as_bytes());
        let mut request = self
            .client
            .post(&delivery.url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(signing::HEADER_ID, &webhook_id)
            .header(signing::HEADER_TIMESTAMP, timestamp.to_string())
            .header(signing::HEADER_SIGNATURE, signature)
            .body(delivery.body.clone());
        // The receiver may continue the command's trace from this attempt.
        let (traceparent, tracestate) = onceflow_runtime::telemetry::current_trace_context();
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(tracestate) = tracestate {
            request = request.header("tracestate", tracestate);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                tracing::Span::current().record("http.response.status_code", status);
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(retry::parse_retry_after);
                let excerpt = excerpt(response).await;
                Outcome::Answered { status, retry_after, excerpt }
            }
            Err(error) => Outcome::Transport(describe(&error, self.config.timeout_ms)),
        }
    }

    fn next_step(&self, delivery: &Claimed, outcome: &Outcome) -> Next {
        let retry = |retry_after| match self.config.retry.next_delay(delivery.attempts_in_round, retry_after) {
            Some(delay) => Next::RetryIn(delay),
            None => Next::Failed,
        };
        match outcome {
            Outcome::Answered { status, retry_after, .. } => match retry::classify_status(*status) {
                Verdict::Delivered => Next::Succeeded,
                Verdict::Gone => Next::Gone,
                Verdict::Retry => retry(*retry_after),
            },
            Outcome::Transport(_) => retry(None),
            Outcome::Refused(_) => Next::Failed,
            Outcome::EndpointDisabled(_) => Next::EndpointDisabled,
            // Not the receiver's fault: due again at once, on the next run.
            Outcome::Interrupted => Next::RetryIn(Duration::ZERO),
        }
    }
}

/// How one attempt went.
#[derive(Debug)]
enum Outcome {
    /// The receiver answered.
    Answered { status: u16, retry_after: Option<Duration>, excerpt: Option<String> },
    /// No answer: timeout, connection or TLS failure, DNS failure.
    Transport(String),
    /// Never sent, and sending later would not help.
    Refused(String),
    /// Cut off by shutdown.
    Interrupted,
    /// Not sent: the tenant's endpoint (this URL) is disabled.
    EndpointDisabled(uuid::Uuid),
}

impl Outcome {
    /// What the attempt says about its destination, for its circuit breaker:
    /// no answer, `5xx` and `429` count against it; any other answer shows it
    /// up (see `onceflow_webhook::breaker`); an attempt never sent or cut off
    /// says nothing.
    fn signal(&self) -> Option<Signal> {
        match self {
            Self::Answered { status, .. } => Some(breaker::signal_of_status(*status)),
            Self::Transport(_) => Some(Signal::Unhealthy),
            Self::Refused(_) | Self::Interrupted | Self::EndpointDisabled(_) => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Answered { status, .. } => match retry::classify_status(*status) {
                Verdict::Delivered => "delivered",
                Verdict::Gone => "gone",
                Verdict::Retry => "http_error",
            },
            Self::Transport(_) => "transport_error",
            Self::Refused(_) => "refused",
            Self::Interrupted => "interrupted",
            Self::EndpointDisabled(_) => "endpoint_disabled",
        }
    }

    fn record(self, started_at: chrono::DateTime<chrono::Utc>, latency: Duration) -> AttemptRecord {
        let (status_code, error, response_excerpt) = match self {
            Self::Answered { status, excerpt, .. } => {
                let error = match retry::classify_status(status) {
                    Verdict::Delivered => None,
                    Verdict::Gone => Some(
                        "HTTP 410 Gone: the receiver wants no more deliveries; this endpoint is disabled".to_owned(),
                    ),
                    Verdict::Retry => Some(format!("HTTP {status}")),
                };
                (Some(status), error, excerpt)
            }
            Self::Transport(error) | Self::Refused(error) => (None, Some(error), None),
            Self::Interrupted => {
                (None, Some("interrupted: the notifier shut down during the attempt".to_owned()), None)
            }
            Self::EndpointDisabled(endpoint) => (None, Some(super::endpoints::disabled_error(endpoint)), None),
        };
        AttemptRecord { started_at, latency, status_code, error, response_excerpt }
    }
}

/// The first [`EXCERPT_BYTES`] of the answer's body; the rest is not read.
async fn excerpt(mut response: reqwest::Response) -> Option<String> {
    let mut kept = Vec::new();
    while kept.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk[..chunk.len().min(EXCERPT_BYTES - kept.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    (!kept.is_empty()).then(|| String::from_utf8_lossy(&kept).into_owned())
}

/// A transport error with its causes, e.g. `connection failed: … Connection refused`.
fn describe(error: &reqwest::Error, timeout_ms: u64) -> String {
    if error.is_timeout() {
        return format!("timed out after {timeout_ms} ms");
    }
    let mut text = if error.is_connect() { "connection failed".to_owned() } else { "request failed".to_owned() };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sleep `duration`, where `Duration::MAX` means until cancelled.
async fn sleep_at_most(duration: Duration) {
    if duration == Duration::MAX {
        std::future::pending::<()>().await;
    } else {
        tokio::time::sleep(duration).await;
    }
}

async fn listen(pool: &PgPool) -> Option<PgListener> {
    let mut listener = PgListener::connect_with(pool).await.ok()?;
    listener.listen(store::CHANNEL).await.ok()?;
    Some(listener)
}
