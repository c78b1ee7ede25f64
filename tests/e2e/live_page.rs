//! The live page (`GET /live`) in a real browser: headless Chromium (Debian's
//! `chromium` package), driven over the DevTools protocol, loads the page
//! with a stream token and a correlation filter in the fragment; a command
//! submitted through ingest shows up in the DOM; the notifier restarts on
//! the same address meanwhile another command completes; the page says it
//! reconnected and shows the second command, and every event of the
//! correlation on the results topic is on the page once, in order.
//!
//! Skips (saying so) when no `chromium` is installed.

use std::{collections::HashSet, path::PathBuf, process::Stdio, time::Duration};

use futures::{SinkExt as _, StreamExt as _};
use onceflow_tests::{IngestClient, OUTCOME_TIMEOUT, TestEnv, eventually, published_event_ids, stream_token};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "the-live-page-test-secret-32-bytes+";

/// The Chromium binary, if installed.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Headless Chromium and one page of it, spoken to over the DevTools protocol.
struct Browser {
    _process: tokio::process::Child,
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Browser {
    async fn launch(binary: &std::path::Path, profile: &std::path::Path) -> Self {
        let process = tokio::process::Command::new(binary)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it picked into the profile directory.
        let port_file = profile.join("DevToolsActivePort");
        let port = eventually("chromium's DevTools port", Duration::from_secs(60), || async {
            let text = std::fs::read_to_string(&port_file).ok()?;
            text.lines().next()?.trim().parse::<u16>().ok()
        })
        .await;
        let page = eventually("chromium's page", Duration::from_secs(30), || async {
            let targets: Value =
                reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await.ok()?.json().await.ok()?;
            targets.as_array()?.iter().find(|target| target["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_owned)
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(page.as_str()).await.expect("DevTools connection");
        Self { _process: process, socket, next_id: 0 }
    }

    /// Call `method` and wait for its answer (events in between are ignored).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(request)).await.expect("DevTools send");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("DevTools answers")
                .expect("DevTools open")
                .expect("DevTools message");
            let Message::Text(text) = message else { continue };
            let answer: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if answer["id"] == id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of the JavaScript `expression` in the page.
    async fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        result["result"]["value"].clone()
    }

    /// The page as the test reads it: status, notices and event rows.
    async fn snapshot(&mut self) -> Value {
        self.evaluate(
            "JSON.stringify({
                status: document.getElementById('status')?.dataset.state,
                notices: [...document.querySelectorAll('#notices li')].map((li) => li.dataset.kind),
                rows: [...document.querySelectorAll('#events tr')].map((tr) => ({
                    id: Number(tr.dataset.id), type: tr.dataset.type, job: tr.dataset.job, event_id: tr.dataset.eventId,
                })),
                url: window.location.href,
            })",
        )
        .await
        .as_str()
        .map(|text| serde_json::from_str(text).expect("snapshot JSON"))
        .unwrap_or(Value::Null)
    }

    /// The page's [`Self::snapshot`] once `done` holds of it (panics naming
    /// `what` and the last snapshot after [`OUTCOME_TIMEOUT`]).
    async fn wait_for(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + OUTCOME_TIMEOUT;
        loop {
            let page = self.snapshot().await;
            if done(&page) {
                return page;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {page}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until the page shows `job`'s `job.succeeded` row.
    async fn wait_for_success(&mut self, job: &str) -> Value {
        self.wait_for(&format!("job {job} on the page"), |page| {
            page["rows"]
                .as_array()
                .is_some_and(|rows| rows.iter().any(|row| row["job"] == job && row["type"] == "job.succeeded"))
        })
        .await
    }
}

async fn submit(ingest: &IngestClient, correlation: &str, account: &str) -> String {
    let body = json!({"type": "ledger.open_account", "payload": {"account_id": account, "currency": "EUR"}});
    let accepted = ingest
        .submit_raw(|request| {
            request
                .bearer_auth(onceflow_tests::DEV_API_KEY)
                .header("idempotency-key", account)
                .header("x-correlation-id", correlation)
                .json(&body)
        })
        .await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    accepted.json()["job_id"].as_str().expect("job id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_page_shows_events_and_resumes_after_a_notifier_restart() {
    let Some(binary) = chromium() else {
        println!("SKIPPED: no chromium on PATH (apt-get install chromium); the live page was not tested");
        return;
    };
    let mut env = TestEnv::new();
    let ingest_service = env.start_ingest().await;
    let processor = env.start_processor().await;
    let notifier = env.start_notifier_with(|config| config.sse.token_secret = SECRET.to_owned()).await;
    let notifier_addr = notifier.addr;
    let ingest = IngestClient::new(&ingest_service);
    let correlation = format!("live-page-{}", env.id);

    // The page has the CSP it promises.
    let served = reqwest::get(notifier.url("/live")).await.unwrap();
    assert_eq!(served.status(), 200);
    let csp = served.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");

    let token = stream_token(&notifier, &json!({})).await.expect("a token");
    let profile = env.scratch_dir().join("chromium");
    std::fs::create_dir_all(&profile).unwrap();
    let mut browser = Browser::launch(&binary, &profile).await;
    browser.call("Page.enable", json!({})).await;
    let url = notifier.url(&format!("/live#token={token}&correlation_id={correlation}"));
    browser.call("Page.navigate", json!({"url": url})).await;
    let opened = browser.wait_for("the page to connect", |page| page["status"] == "live").await;
    assert!(!opened["url"].as_str().unwrap().contains(&token), "the token is dropped from the address bar");

    let first = submit(&ingest, &correlation, &format!("live-1-{}", env.id)).await;
    browser.wait_for_success(&first).await;

    // The notifier goes away; a command completes meanwhile; the notifier
    // comes back on the same address (same secret: the token still works).
    notifier.stop().await;
    let second = submit(&ingest, &correlation, &format!("live-2-{}", env.id)).await;
    eventually("the second job to succeed in ingest", OUTCOME_TIMEOUT, || async {
        (ingest.job(&second).await.json()["status"] == "succeeded").then_some(())
    })
    .await;
    let notifier = env
        .start_notifier_with(|config| {
            config.listen = notifier_addr.to_string();
            config.sse.token_secret = SECRET.to_owned();
        })
        .await;
    let page = browser.wait_for_success(&second).await;
    let notices: Vec<&str> = page["notices"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(notices.contains(&"disconnected") && notices.contains(&"reconnected"), "{page}");

    // Every event of the correlation on the results topic, each once, in id order.
    let rows = page["rows"].as_array().unwrap();
    let ids: Vec<i64> = rows.iter().map(|row| row["id"].as_i64().expect("an event id")).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids increase: {ids:?}");
    let shown: Vec<String> = rows.iter().map(|row| row["event_id"].as_str().unwrap().to_owned()).collect();
    let unique: HashSet<String> = shown.iter().cloned().collect();
    assert_eq!(unique.len(), shown.len(), "no event twice: {shown:?}");
    let published = published_event_ids(&env.kafka, &correlation).await;
    assert_eq!(unique, published, "every event of the correlation, none missed");

    drop(browser);
    notifier.stop().await;
    processor.stop().await;
    ingest_service.stop().await;
    env.teardown().await;
}
