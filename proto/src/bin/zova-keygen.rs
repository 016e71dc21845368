//! Prints a fresh CURVE key pair for a service's `[rpc.curve]` section.

use std::process::ExitCode;

use clap::Parser;

/// Prints a fresh CURVE key pair as TOML for `[rpc.curve]`.
#[derive(Parser)]
#[command(name = "zova-keygen")]
struct Args {}

fn main() -> ExitCode {
    Args::parse();
    match proto::curve::generate_key_pair() {
        Ok((public_key, secret_key)) => {
            println!("[rpc.curve]");
            println!("# Give this to the service's peers: in their trusted_clients, and as their");
            println!("# server_public_key (or through Rpc::set_peer_key) to reach this service.");
            println!("public_key = \"{public_key}\"");
            println!("# Only in this service's own configuration, readable by it alone.");
            println!("secret_key = \"{secret_key}\"");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zova-keygen: {e}");
            ExitCode::FAILURE
        }
    }
}
