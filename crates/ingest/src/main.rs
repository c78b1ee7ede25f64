//! The `onceflow-ingest` binary; everything lives in the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    onceflow_runtime::cli::main(
        "onceflow-ingest",
        onceflow_ingest::config::DEFAULTS,
        onceflow_ingest::migrators,
        onceflow_ingest::start,
    )
    .await
}
