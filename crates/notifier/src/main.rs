//! The `onceflow-notifier` binary; everything lives in the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    onceflow_runtime::cli::main(
        "onceflow-notifier",
        onceflow_notifier::config::DEFAULTS,
        onceflow_notifier::migrators,
        onceflow_notifier::start,
    )
    .await
}
