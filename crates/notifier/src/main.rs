//! The `onceflow-notifier` binary; everything lives in the library.

/// jemalloc rather than the system allocator, for a process that holds tens
/// of thousands of long-lived connections: with it (and the per-connection
/// trims of `onceflow_runtime::http::serve` and the shared stream state) an
/// idle SSE subscriber measured 10.5 KiB instead of 11.8 (`scripts/bench.sh`);
/// most of what is left is hyper's two 8 KiB per-connection buffers.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
