//! The `onceflow-processor` binary; everything lives in the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    onceflow_runtime::cli::main(
        "onceflow-processor",
        onceflow_processor::config::DEFAULTS,
        onceflow_processor::migrators,
        onceflow_processor::start,
    )
    .await
}
