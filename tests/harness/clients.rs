//! Clients of the services' HTTP APIs over real HTTP, and the answer as a
//! client sees it ([`ApiResponse`]): ingest's commands and jobs, the
//! notifier's webhook deliveries.

use std::time::Duration;

use crate::{DEV_API_KEY, Service, eventually};

/// An HTTP response as a client sees it.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// Send `request` and read the whole answer.
    pub async fn send(request: reqwest::RequestBuilder) -> Self {
        let response = request.send().await.expect("the service answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("response body").to_vec();
        Self { status, headers, body }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `type` of a problem+json body.
    pub fn problem_type(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{self:?}");
        self.json()["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// A client of ingest's API over real HTTP.
#[derive(Debug, Clone)]
pub struct IngestClient {
    base: String,
    http: reqwest::Client,
    api_key: String,
}

impl IngestClient {
    pub fn new(ingest: &Service) -> Self {
        Self::with_key(ingest, DEV_API_KEY)
    }

    pub fn with_key(ingest: &Service, api_key: &str) -> Self {
        Self::at(&ingest.url(""), api_key)
    }

    /// A client of the ingest at `base` (`http://host:port`), e.g. one run as a process.
    pub fn at(base: &str, api_key: &str) -> Self {
        Self { base: base.to_owned(), http: reqwest::Client::new(), api_key: api_key.to_owned() }
    }

    /// `POST /v1/commands` with this client's API key, `key` and a JSON body.
    pub async fn submit(&self, key: &str, body: &serde_json::Value) -> ApiResponse {
        let request = self
            .http
            .post(format!("{}/v1/commands", self.base))
            .bearer_auth(&self.api_key)
            .header("idempotency-key", key)
            .json(body);
        Self::send(request).await
    }

    /// `POST /v1/commands` built by `build` from a bare request (no headers, no body).
    pub async fn submit_raw(
        &self,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> ApiResponse {
        Self::send(build(self.http.post(format!("{}/v1/commands", self.base)))).await
    }

    /// `GET /v1/jobs/{job_id}`.
    pub async fn job(&self, job_id: &str) -> ApiResponse {
        Self::send(self.http.get(format!("{}/v1/jobs/{job_id}", self.base)).bearer_auth(&self.api_key)).await
    }

    /// `POST /v1/jobs/{job_id}/cancel`.
    pub async fn cancel(&self, job_id: &str) -> ApiResponse {
        let url = format!("{}/v1/jobs/{job_id}/cancel", self.base);
        Self::send(self.http.post(url).bearer_auth(&self.api_key)).await
    }

    async fn send(request: reqwest::RequestBuilder) -> ApiResponse {
        ApiResponse::send(request).await
    }
}

/// A client of the notifier's webhook deliveries API over real HTTP.
#[derive(Debug, Clone)]
pub struct DeliveriesClient {
    base: String,
    http: reqwest::Client,
    api_key: Option<String>,
}

impl DeliveriesClient {
    /// With `api_key`, or none at all.
    pub fn new(notifier: &Service, api_key: Option<&str>) -> Self {
        Self { base: notifier.url(""), http: reqwest::Client::new(), api_key: api_key.map(str::to_owned) }
    }

    /// `GET /v1/jobs/{job_id}/deliveries`.
    pub async fn for_job(&self, job_id: &str) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/jobs/{job_id}/deliveries", self.base))).await
    }

    /// `GET /v1/deliveries/{id}`.
    pub async fn get(&self, id: &str) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/deliveries/{id}", self.base))).await
    }

    /// `POST /v1/deliveries/{id}/redrive`.
    pub async fn redrive(&self, id: &str) -> ApiResponse {
        self.send(self.http.post(format!("{}/v1/deliveries/{id}/redrive", self.base))).await
    }

    /// `GET /v1/webhook-endpoints`.
    pub async fn endpoints(&self) -> ApiResponse {
        self.send(self.http.get(format!("{}/v1/webhook-endpoints", self.base))).await
    }

    /// `POST /v1/webhook-endpoints/{id}/enable`.
    pub async fn enable_endpoint(&self, id: &str) -> ApiResponse {
        self.send(self.http.post(format!("{}/v1/webhook-endpoints/{id}/enable", self.base))).await
    }

    /// The job's only delivery once `done` says it is where the test wants it.
    pub async fn wait_for_delivery(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(&format!("the webhook delivery of job {job_id}"), timeout, || async {
            let response = self.for_job(job_id).await;
            assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
            let deliveries = response.json()["deliveries"].as_array().cloned().unwrap_or_default();
            assert!(deliveries.len() <= 1, "one delivery per job: {deliveries:?}");
            deliveries.into_iter().next().filter(|delivery| done(delivery))
        })
        .await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> ApiResponse {
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        ApiResponse::send(request).await
    }
}
