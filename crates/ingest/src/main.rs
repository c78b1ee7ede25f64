//! The `onceflow-ingest` binary; everything lives in the library.

/// jemalloc rather than the system allocator: a request allocates its JSON,
/// its command and its answer across the runtime's threads, and a profile of
/// ingest under load spent about a seventh of its time in glibc's allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
