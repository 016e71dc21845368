use clap::Parser;

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = conductor::Args::parse().into_config();
    let pool = config.as_ref().ok().map(|c| c.database.max_connections);
    let run = proto::service::run_binary(
        conductor::BINARY,
        config,
        |c| c.log.clone(),
        conductor::start,
    );
    proto::service::block_on_database_service(pool, run)
}
