use clap::Parser;

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = scheduler::Args::parse().into_config();
    proto::service::run_binary(
        scheduler::BINARY,
        config,
        |c| c.log.clone(),
        scheduler::start,
    )
    .await
}
