use clap::Parser;

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
