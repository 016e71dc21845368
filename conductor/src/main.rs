use clap::Parser;

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = conductor::Args::parse().into_config();
    proto::service::run_binary(
        conductor::BINARY,
        config,
        |c| c.log.clone(),
        conductor::start,
    )
    .await
}
