//! Many compute hosts in one process, for load runs: each is a whole `zova-compute` service
//! (its own ZeroMQ socket on loopback, its own registration, heartbeats and resource reports
//! through the conductor, its own libvirt connection to the test hypervisor), named
//! `<prefix><first>` … `<prefix><first + hosts - 1>`, with sizes cycling through three.
//! Hundreds of separate processes would cost the machine more than the fabric under test.
//!
//! With `libvirt_uri = "test:///default"` (the default) each host gets a test hypervisor of its
//! own, described by `DIR/<host name>.hypervisor.xml`, as each real host has its own libvirtd:
//! `test:///default` is one driver per process, behind one lock, that every host would share,
//! and every host would see the others' domains.
//!
//!     ZOVA_CONFIG=zova.toml zova-sim-hosts --hosts 1000 --instances-path DIR
//!
//! It reads `[rpc]`, `[log]` and `[compute]` from the config as zova-compute does (host, bind,
//! sizes and instance directory are its own) and runs until Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "zova-sim-hosts",
    about = "Run many simulated compute hosts (libvirt's test hypervisor) in one process"
)]
struct Args {
    /// The zova.toml to read.
    #[arg(long, env = "ZOVA_CONFIG")]
    config: Option<PathBuf>,
    /// Hosts to run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    hosts: u32,
    /// Number of the first host.
    #[arg(long, default_value_t = 1)]
    first: u32,
    /// Host names are this prefix and a number.
    #[arg(long, default_value = "node-")]
    prefix: String,
    /// Each host keeps its files in DIR/<host name>.
    #[arg(long)]
    instances_path: PathBuf,
    /// Threads for the hosts' libvirt calls and file work, all hosts together: with tokio's
    /// default of 512, a load run grew the process to 518 threads.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=512))]
    blocking_threads: u16,
}

/// vCPUs, MB of RAM, GB of disk: the all-in-one's three sizes.
const SIZES: [(i64, i64, i64); 3] = [(4, 8192, 80), (8, 16384, 160), (16, 32768, 320)];

/// A host failed to start: says why, stops the hosts already running, and fails.
async fn stop_all(
    log: &slog::Logger,
    host: &str,
    failure: &str,
    handles: Vec<proto::service::ServiceHandle>,
) -> std::process::ExitCode {
    slog::crit!(log, "a host failed to start"; "host" => host, "error" => failure);
    eprintln!("zova-sim-hosts: {host}: {failure}");
    for handle in handles {
        handle.stop().await;
    }
    std::process::ExitCode::FAILURE
}

/// The test hypervisor every connection of a process shares.
const SHARED_TEST_HYPERVISOR: &str = "test:///default";

/// Writes the description of a test hypervisor with `vcpus` and `memory_mb` to `file` (its
/// directory is created) and returns the URI that opens a hypervisor of its own on it.
fn own_test_hypervisor(file: &Path, vcpus: i64, memory_mb: i64) -> std::io::Result<String> {
    let file = std::path::absolute(file)?;
    // The path goes into a URI as it is: refuse what libvirt would read as something else.
    let fits = file
        .to_str()
        .is_some_and(|path| !path.contains([' ', '%', '#', '?']));
    if !fits {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a test hypervisor's file must have a UTF-8 path without spaces, %, # or ?, \
             since it goes into a test:// URI",
        ));
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The test driver's node file: no domains, networks or pools, this host's CPUs and RAM (KiB).
    let memory_kib = memory_mb.saturating_mul(1024);
    std::fs::write(
        &file,
        format!(
            "<node>\n  <cpu>\n    <mhz>2000</mhz>\n    <model>x86_64</model>\n    \
             <active>{vcpus}</active>\n    <nodes>1</nodes>\n    <sockets>1</sockets>\n    \
             <cores>{vcpus}</cores>\n    <threads>1</threads>\n  </cpu>\n  \
             <memory>{memory_kib}</memory>\n</node>\n"
        ),
    )?;
    Ok(format!("test://{}", file.display()))
}

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    proto::service::block_on_with_blocking_threads(usize::from(args.blocking_threads), run(args))
}

async fn run(args: Args) -> std::process::ExitCode {
    let config: compute::Config = match proto::service::load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("zova-sim-hosts: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let log = proto::service::root_logger(&config.log, "zova-sim-hosts");
    // One ZeroMQ context (one I/O thread) for all the hosts, not two threads per host.
    proto::share_one_context();
    // Each host holds a few sockets and a libvirt connection.
    match proto::service::raise_open_file_limit() {
        Ok(files) => slog::info!(log, "open-file limit"; "files" => files),
        Err(e) => slog::warn!(log, "cannot raise the open-file limit"; "error" => %e),
    }
    let mut handles = Vec::new();
    for (n, number) in (args.first..args.first.saturating_add(args.hosts)).enumerate() {
        let host = format!("{}{number}", args.prefix);
        let (vcpus, memory_mb, local_gb) = SIZES[n % SIZES.len()];
        let mut host_config = config.clone();
        host_config.compute.host = host.clone();
        host_config.compute.bind = "tcp://127.0.0.1:*".into();
        host_config.compute.advertise = None;
        host_config.compute.instances_path = args.instances_path.join(&host);
        host_config.compute.vcpus = Some(vcpus);
        host_config.compute.memory_mb = Some(memory_mb);
        host_config.compute.local_gb = Some(local_gb);
        if host_config.compute.libvirt_uri == SHARED_TEST_HYPERVISOR {
            let file = args.instances_path.join(format!("{host}.hypervisor.xml"));
            match own_test_hypervisor(&file, vcpus, memory_mb) {
                Ok(uri) => host_config.compute.libvirt_uri = uri,
                Err(e) => {
                    let failure = format!("{}: {e}", file.display());
                    return stop_all(&log, &host, &failure, handles).await;
                }
            }
        }
        // One metrics port per process would clash; the hosts are seen through the conductor.
        host_config.metrics.listen = String::new();
        let host_log = log.new(slog::o!("host" => host.clone()));
        match compute::start(host_config, host_log).await {
            Ok(handle) => handles.push(handle),
            Err(e) => return stop_all(&log, &host, &e.to_string(), handles).await,
        }
    }
    slog::info!(log, "hosts running"; "hosts" => handles.len());
    proto::service::shutdown_signal().await;
    slog::info!(log, "stopping"; "hosts" => handles.len());
    for handle in handles {
        handle.stop().await;
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use compute::driver::LibvirtDriver;

    fn domain(name: &str) -> String {
        let uuid = uuid::Uuid::new_v4();
        format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
    }

    #[test]
    fn each_host_has_a_hypervisor_of_its_own_size_and_domains() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let small = own_test_hypervisor(&dir.path().join("a/node-1.hypervisor.xml"), 4, 8192)
            .expect("first hypervisor");
        let big = own_test_hypervisor(&dir.path().join("a/node-2.hypervisor.xml"), 16, 32768)
            .expect("second hypervisor");
        let small = LibvirtDriver::open(&small).expect("open the first");
        let big = LibvirtDriver::open(&big).expect("open the second");
        let info = small.node_info().expect("node info");
        assert_eq!((info.vcpus, info.memory_mb), (4, 8192));
        let info = big.node_info().expect("node info");
        assert_eq!((info.vcpus, info.memory_mb), (16, 32768));

        let spaced = own_test_hypervisor(&dir.path().join("a b/node-3.hypervisor.xml"), 4, 8192);
        assert_eq!(
            spaced.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::InvalidInput)
        );

        small
            .define_and_start(&domain("instance-00000001"))
            .expect("boot on the first");
        assert_eq!(
            small.domain_names().expect("first's domains"),
            vec!["instance-00000001".to_string()]
        );
        assert!(big.domain_names().expect("second's domains").is_empty());
    }
}
