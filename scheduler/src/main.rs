use clap::Parser;

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let config = scheduler::Args::parse().into_config();
    let pool = config.as_ref().ok().map(|c| c.database.max_connections);
    let run = proto::service::run_binary(
        scheduler::BINARY,
        config,
        |c| c.log.clone(),
        scheduler::start,
    );
    proto::service::block_on_database_service(pool, run)
}
