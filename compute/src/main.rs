use clap::Parser;

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = compute::Args::parse().into_config();
    proto::service::run_binary(compute::BINARY, config, |c| c.log.clone(), compute::start).await
}
