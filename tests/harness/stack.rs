//! The whole stack with a canary tenant: hostile-input tests send something
//! nasty as one tenant, then prove that another tenant's command still goes
//! all the way through within seconds (guarantee G8).

use std::time::Duration;

use crate::{IngestClient, OUTCOME_TIMEOUT, Service, SseClient, TestEnv, eventually};

/// The second tenant of [`Stack`], whose work must never be stalled by
/// anything tenant `dev` sends.
pub const CANARY_TENANT: &str = "canary";
/// Its API key (configured as its SHA-256 digest, as any tenant's).
pub const CANARY_API_KEY: &str = "canary-onceflow-key";
/// How soon a canary command must complete once the stack is warm.
pub const CANARY_TIMEOUT: Duration = Duration::from_secs(20);

/// The canary tenant's configured key.
pub fn canary_tenant_key() -> onceflow_runtime::auth::TenantKey {
    use sha2::Digest as _;
    onceflow_runtime::auth::TenantKey {
        tenant: CANARY_TENANT.to_owned(),
        api_key_sha256: hex::encode(sha2::Sha256::digest(CANARY_API_KEY.as_bytes())),
    }
}

/// Ingest, processor and notifier of one test, in-process, with tenants
/// `dev` and [`CANARY_TENANT`].
#[derive(Debug)]
pub struct Stack {
    pub ingest: Service,
    pub processor: Service,
    pub notifier: Service,
}

impl TestEnv {
    /// Start all three services and wait until a first canary command has gone
    /// all the way through (consumer groups joined), so later canaries measure
    /// the pipeline, not the warm-up.
    pub async fn start_stack(&mut self) -> Stack {
        let ingest = self.start_ingest_with(|config| config.tenants.push(canary_tenant_key())).await;
        let processor = self.start_processor().await;
        let notifier = self.start_notifier_with(|config| config.tenants.push(canary_tenant_key())).await;
        let stack = Stack { ingest, processor, notifier };
        stack.canary_completes(OUTCOME_TIMEOUT).await;
        stack
    }
}

impl Stack {
    /// A client of ingest as tenant `dev`.
    pub fn dev(&self) -> IngestClient {
        IngestClient::new(&self.ingest)
    }

    /// A client of ingest as the canary tenant.
    pub fn canary(&self) -> IngestClient {
        IngestClient::with_key(&self.ingest, CANARY_API_KEY)
    }

    /// Submit a fresh canary command (an account opening) and assert that,
    /// within `within`, its `job.succeeded` event reaches the canary's SSE
    /// stream and ingest reports the job `succeeded`.
    pub async fn canary_completes(&self, within: Duration) {
        let account = format!("canary-{}", uuid::Uuid::new_v4().simple());
        let body =
            serde_json::json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
        let accepted = self.canary().submit(&account, &body).await;
        assert_eq!(accepted.status, 202, "canary refused: {}", String::from_utf8_lossy(&accepted.body));
        let accepted = accepted.json();
        let job_id = accepted["job_id"].as_str().expect("job id").to_owned();
        let mut stream =
            SseClient::connect_as(&self.notifier.url(&format!("/v1/jobs/{job_id}/events")), CANARY_API_KEY, None).await;
        let event = stream.next_event(within).await.expect("the canary's event");
        assert_eq!(event.event, "job.succeeded", "canary: {}", event.data);
        let canary = self.canary();
        eventually("the canary job to succeed in ingest", within, || async {
            (canary.job(&job_id).await.json()["status"] == "succeeded").then_some(())
        })
        .await;
    }
}
