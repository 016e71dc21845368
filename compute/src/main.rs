use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = compute::Args::parse().into_config();
    proto::service::run_binary(compute::BINARY, config, |c| c.log.clone(), compute::start).await
}
