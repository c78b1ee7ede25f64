//! The `onceflow-notifier` binary; everything lives in the library.

/// jemalloc rather than the system allocator: every idle SSE subscriber holds
/// hyper's 8 KiB connection buffers, mostly never written; jemalloc keeps no
/// bookkeeping inside an allocation, so those untouched pages never become
/// resident (`scripts/bench.sh` measures memory per idle subscriber).
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
