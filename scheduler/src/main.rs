use clap::Parser;

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
