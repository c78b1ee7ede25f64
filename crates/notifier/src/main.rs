//! The `onceflow-notifier` binary; everything lives in the library.

/// jemalloc rather than the system allocator, for a process that holds tens
/// of thousands of long-lived connections: with it (and the connection boxed
/// once in `onceflow_runtime::http::serve`, and the shared stream state) an
/// idle SSE subscriber costs about 10 KiB, most of it hyper's buffers;
/// `scripts/bench.sh` measures it, and the README's Performance section
/// gives the figures.
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
