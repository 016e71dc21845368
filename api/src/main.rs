use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = api::Args::parse().into_config();
    proto::service::run_binary(api::BINARY, config, |c| c.log.clone(), api::start).await
}
