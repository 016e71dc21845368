//! What every Zova service shares: the layered configuration, the logger, and the handle a
//! started service returns so the binaries, the all-in-one and the tests stop it the same way.

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use slog::{o, Drain, Logger};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::{MetricsConfig, MetricsServer};
use crate::{CurveConfig, RpcOptions};

/// Loads a service's configuration: its defaults, then the TOML file (if given), then
/// `ZOVA_<SECTION>__<KEY>` environment variables (e.g. `ZOVA_API__LISTEN=0.0.0.0:8774`).
pub fn load_config<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
) -> Result<T, Box<figment::Error>> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Box::new(figment::Error::from(format!(
                "configuration file {} does not exist",
                file.display()
            ))));
        }
        figment = figment.merge(Toml::file(file));
    }
    figment
        .merge(Env::prefixed("ZOVA_").split("__"))
        .extract()
        .map_err(Box::new)
}

/// `[database]`: where the database is (a SQLite file path, `sqlite://PATH`, or a
/// `postgres://` URL) and how many connections each service keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseConfig {
    pub url: String,
    /// Connections a service keeps open at most (its pool); opened as they are needed.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "zova-state/zova.sqlite".into(),
            max_connections: 8,
        }
    }
}

/// `[rpc]`: where the conductor and the scheduler listen, how long callers wait, how the sockets
/// behave, and (`[rpc.curve]`) the keys that encrypt and authenticate them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcConfig {
    /// The conductor's endpoint (and the one a conductor binds by default).
    pub conductor: String,
    /// Several conductors: the API and the computes spread work over them and move on when one
    /// does not take a request. Empty: just `conductor`.
    pub conductors: Vec<String>,
    /// The scheduler's endpoint (and the one a scheduler binds by default).
    pub scheduler: String,
    /// Several schedulers: callers spread work over them and move on when one does not take
    /// a cast. Empty: just `scheduler`.
    pub schedulers: Vec<String>,
    pub cast_timeout_ms: u64,
    pub call_timeout_ms: u64,
    /// How long a closed socket still tries to send what it holds; 0 drops it at once.
    pub linger_ms: u64,
    /// Messages queued per connection, each way, before a send is refused.
    pub sndhwm: u32,
    pub rcvhwm: u32,
    /// First and longest wait between attempts to reconnect to a peer that is away.
    pub reconnect_ivl_ms: u64,
    pub reconnect_ivl_max_ms: u64,
    /// ZMTP heartbeats: ping interval, how long without an answer drops the connection, and how
    /// long the peer waits before dropping it (0 turns heartbeats off).
    pub heartbeat_ivl_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub heartbeat_ttl_ms: u64,
    /// The largest message a socket sends or takes.
    pub max_message_bytes: u64,
    /// Requests to one peer that may wait for an answer at once; more are refused at once.
    pub max_in_flight_per_peer: usize,
    /// `[rpc.curve]`: absent, traffic is plain (tolerable on loopback only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<CurveConfig>,
}

impl Default for RpcConfig {
    fn default() -> Self {
        let options = RpcOptions::default();
        RpcConfig {
            conductor: "tcp://127.0.0.1:5560".into(),
            conductors: Vec::new(),
            scheduler: "tcp://127.0.0.1:5561".into(),
            schedulers: Vec::new(),
            cast_timeout_ms: millis(options.cast_timeout),
            call_timeout_ms: millis(options.call_timeout),
            linger_ms: millis(options.linger),
            sndhwm: options.sndhwm,
            rcvhwm: options.rcvhwm,
            reconnect_ivl_ms: millis(options.reconnect_ivl),
            reconnect_ivl_max_ms: millis(options.reconnect_ivl_max),
            heartbeat_ivl_ms: millis(options.heartbeat_ivl),
            heartbeat_timeout_ms: millis(options.heartbeat_timeout),
            heartbeat_ttl_ms: millis(options.heartbeat_ttl),
            max_message_bytes: options.max_message_bytes,
            max_in_flight_per_peer: options.max_in_flight_per_peer,
            curve: None,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RpcConfig {
    /// The conductors to send work to: `conductors`, or else `conductor`.
    pub fn conductor_endpoints(&self) -> Vec<String> {
        if self.conductors.is_empty() {
            vec![self.conductor.clone()]
        } else {
            self.conductors.clone()
        }
    }

    /// The schedulers to send work to: `schedulers`, or else `scheduler`.
    pub fn scheduler_endpoints(&self) -> Vec<String> {
        if self.schedulers.is_empty() {
            vec![self.scheduler.clone()]
        } else {
            self.schedulers.clone()
        }
    }

    /// The transport's options; keys are checked when `Rpc::start` takes them.
    pub fn options(&self) -> RpcOptions {
        RpcOptions {
            cast_timeout: Duration::from_millis(self.cast_timeout_ms),
            call_timeout: Duration::from_millis(self.call_timeout_ms),
            linger: Duration::from_millis(self.linger_ms),
            sndhwm: self.sndhwm,
            rcvhwm: self.rcvhwm,
            reconnect_ivl: Duration::from_millis(self.reconnect_ivl_ms),
            reconnect_ivl_max: Duration::from_millis(self.reconnect_ivl_max_ms),
            heartbeat_ivl: Duration::from_millis(self.heartbeat_ivl_ms),
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            heartbeat_ttl: Duration::from_millis(self.heartbeat_ttl_ms),
            max_message_bytes: self.max_message_bytes,
            max_in_flight_per_peer: self.max_in_flight_per_peer,
            curve: self.curve.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Terminal,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Also log debug lines.
    pub debug: bool,
}

/// The flags every service binary takes on top of its own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    /// Log format (default: [log] format).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Also log debug lines (default: [log] debug).
    #[arg(long)]
    pub debug: bool,
    /// Serve GET /metrics here: host:port, or a host for the service's own default port
    /// (default: [metrics] listen; empty: none).
    #[arg(long, value_name = "ADDRESS")]
    pub metrics_listen: Option<String>,
}

impl ServiceArgs {
    /// Lays the flags over the configuration's `[log]` and `[metrics]`.
    pub fn apply(&self, log: &mut LogConfig, metrics: &mut MetricsConfig) {
        if let Some(format) = self.log_format {
            log.format = format;
        }
        if self.debug {
            log.debug = true;
        }
        if let Some(listen) = &self.metrics_listen {
            metrics.listen = listen.clone();
        }
    }
}

/// The root logger of a service: every line carries the service name; request handlers add
/// `request_id` with `for_request`.
pub fn root_logger(config: &LogConfig, service: &str) -> Logger {
    let level = if config.debug {
        slog::Level::Debug
    } else {
        slog::Level::Info
    };
    // Buffered and flushed once per record: stderr is unbuffered, and the formatters write a
    // line in many pieces, so without it every line cost a dozen or more write(2) calls.
    let stderr = || std::io::BufWriter::new(std::io::stderr());
    let drain = match config.format {
        LogFormat::Terminal => {
            let decorator = slog_term::PlainDecorator::new(stderr());
            let drain = slog_term::FullFormat::new(decorator).build().fuse();
            slog_async::Async::new(drain).chan_size(4096).build().fuse()
        }
        LogFormat::Json => {
            let drain = slog_json::Json::new(stderr())
                .add_default_keys()
                .set_flush(true)
                .build()
                .fuse();
            slog_async::Async::new(drain).chan_size(4096).build().fuse()
        }
    };
    let drain = slog::LevelFilter::new(drain, level).fuse();
    Logger::root(drain, o!("service" => service.to_string()))
}

/// A child logger whose lines carry the request id (and project) of `context`.
pub fn for_request(log: &Logger, context: &crate::RequestContext) -> Logger {
    log.new(
        o!("request_id" => context.request_id.clone(), "project_id" => context.project_id.clone()),
    )
}

/// A running service: where it listens, and how to stop it.
pub struct ServiceHandle {
    /// The RPC endpoint (or, for the API, the HTTP address) the service is bound to.
    pub endpoint: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Its metrics endpoint, if `[metrics] listen` asked for one; stopped with the service.
    metrics: Option<MetricsServer>,
}

impl ServiceHandle {
    pub fn new(endpoint: String, stop: watch::Sender<bool>, task: JoinHandle<()>) -> Self {
        ServiceHandle {
            endpoint,
            stop,
            task,
            metrics: None,
        }
    }

    /// The handle with the service's metrics endpoint, served until the service has stopped.
    pub fn with_metrics(mut self, metrics: Option<MetricsServer>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where the service serves `GET /metrics`, if it does.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::address)
    }

    /// Asks the service to stop and waits until its loops have ended; its metrics are served
    /// until then.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        drop(self.metrics);
    }

    /// Waits until the service ends by itself (it only does on a fatal error) or Ctrl-C/SIGTERM.
    pub async fn run_until_signal(self) {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = self.stop.closed() => {}
        }
        self.stop().await;
    }
}

/// Resolves at Ctrl-C or SIGTERM: how every Zova process is asked to stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How long a stopping service waits for the requests it already took.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Waits (up to `DRAIN_LIMIT`) for a stopping service's requests in flight; returns how many were
/// abandoned.
pub async fn finish_in_flight(tasks: &mut tokio::task::JoinSet<()>) -> usize {
    let all_done = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN_LIMIT, all_done).await;
    let abandoned = tasks.len();
    tasks.abort_all();
    abandoned
}

/// Resolves once `stop` has been set (or its sender dropped).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// The blocking threads of a service whose pool holds `max_connections`: every database call
/// runs on one. Twice the pool (at least 8), so a burst of requests waits in the runtime's queue
/// for a thread rather than in hundreds of threads that each wait for a connection or for the
/// database's write lock, every one of those waits a sleep and a wake-up. Under zova-load the
/// conductor had 282 threads and 62 context switches per instance; capped, 25 and 53.
pub fn blocking_threads_for(max_connections: u32) -> usize {
    usize::try_from(max_connections)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .max(8)
}

/// Runs a database service's `main` on a multi-threaded runtime whose blocking threads are
/// capped for its pool (`None`, for a configuration that did not load: the default pool's).
pub fn block_on_database_service(
    max_connections: Option<u32>,
    main: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    let pool = max_connections.unwrap_or(DatabaseConfig::default().max_connections);
    block_on_with_blocking_threads(blocking_threads_for(pool), main)
}

/// Turns transparent huge pages off for this process and what it starts. mimalloc asks for
/// them on its arenas, so each first touch of a 2 MiB region zeroes all of it: in the first load
/// run after a start that zeroing was a fifth of the API's CPU. A service's heap is tens of MiB,
/// too small for huge pages to save anything in the TLB. Not for `zova-compute`: the flag is
/// inherited, and a libvirt daemon it starts (`qemu:///session`) would run its guests without
/// them. Best effort: false where the kernel refuses, which changes nothing else.
pub fn disable_transparent_huge_pages() -> bool {
    let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_THP_DISABLE takes integers (unsigned long, as passed) and touches no
    // memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) == 0 }
}

/// mimalloc's `mi_option_purge_delay`, which libmimalloc-sys (0.1.49, pinned in Cargo.lock)
/// leaves out of its list of options: its place in mimalloc 3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long the allocator keeps memory a service freed before it gives it back to the kernel.
/// mimalloc's default, a second, gives back the heap a burst of requests built up as soon as
/// the burst ends, and the next burst faults it back in page by page: about 18,000 page faults
/// in the API per run of 2,000 creates, 14% of its profile samples. A minute keeps the heap of a
/// service that is busy now and then, and still gives back what a one-off peak took.
pub const ALLOCATOR_PURGE_DELAY_MS: libc::c_long = 60_000;

/// Sets the allocator's purge delay to [`ALLOCATOR_PURGE_DELAY_MS`] for this process.
pub fn keep_freed_memory_a_while() {
    // SAFETY: sets one of mimalloc's options, which it reads whenever it considers a purge.
    // Called before the service's runtime starts, from its main thread (mimalloc does not
    // promise that setting an option is safe while other threads allocate).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) }
}

/// Lifts the soft open-file limit to the hard one (as the Go runtime does for every program)
/// and returns it. A scheduler or an API holds two descriptors per compute host, and a shell's
/// soft limit is often 1,024: about 500 hosts.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Runs a service's `main` on a multi-threaded runtime with at most `blocking_threads`
/// blocking threads (tokio's default is 512), without transparent huge pages
/// ([`disable_transparent_huge_pages`]), keeping freed memory a while
/// ([`keep_freed_memory_a_while`]) and with the open-file limit raised
/// ([`raise_open_file_limit`]; a failure shows later as the error of what could not open).
pub fn block_on_with_blocking_threads(
    blocking_threads: usize,
    main: impl std::future::Future<Output = std::process::ExitCode>,
) -> std::process::ExitCode {
    let _ = disable_transparent_huge_pages();
    keep_freed_memory_a_while();
    let _ = raise_open_file_limit();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads)
        .build()
    {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Database writes in groups (group commit): the jobs sent while one group is written make up
/// the next, in the order they were sent, so a burst of writes costs one transaction, and one
/// turn at the database's write lock, per group rather than per write. Each job carries its own
/// way to answer; `write` runs on a blocking thread and answers every job of its group.
pub struct GroupWriter<J> {
    jobs: tokio::sync::mpsc::UnboundedSender<J>,
}

impl<J: Send + 'static> GroupWriter<J> {
    /// Starts the writing task on the current runtime; it ends when the writer is dropped. A
    /// group holds `max_group` jobs at most, so no one group keeps the lock for long.
    pub fn start(max_group: usize, write: impl Fn(Vec<J>) + Send + Sync + 'static) -> Self {
        let (jobs, mut queued) = tokio::sync::mpsc::unbounded_channel::<J>();
        let write = std::sync::Arc::new(write);
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut group = vec![first];
                while group.len() < max_group.max(1) {
                    match queued.try_recv() {
                        Ok(job) => group.push(job),
                        Err(_) => break,
                    }
                }
                let write = write.clone();
                // A write that panicked dropped its group's answers, and each job's sender
                // learns it from its own.
                let _ = tokio::task::spawn_blocking(move || write(group)).await;
            }
        });
        GroupWriter { jobs }
    }

    /// Queues a job for the next group; gives it back if the writing task is gone.
    pub fn send(&self, job: J) -> Result<(), J> {
        self.jobs.send(job).map_err(|e| e.0)
    }
}

/// The body of every service binary: report a bad configuration (exit 2), start the service, run
/// it until Ctrl-C or SIGTERM, report a failure to start (exit 1).
pub async fn run_binary<C, E, F>(
    binary: &str,
    config: Result<C, E>,
    log_config: impl FnOnce(&C) -> LogConfig,
    start: impl FnOnce(C, Logger) -> F,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<ServiceHandle, E>>,
{
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let log = root_logger(&log_config(&config), binary);
    match start(config, log.clone()).await {
        Ok(handle) => {
            handle.run_until_signal().await;
            slog::info!(log, "stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            slog::crit!(log, "failed to start"; "error" => %e);
            eprintln!("{binary}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A configured number of seconds as a `Duration`: positive and finite, or a message naming it.
pub fn positive_seconds(name: &str, value: f64) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(value) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(format!(
            "{name} must be a positive number of seconds, not {value}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Sample {
        rpc: RpcConfig,
        database: DatabaseConfig,
    }

    #[tokio::test]
    async fn jobs_sent_while_a_group_is_written_make_the_next_group_in_order() {
        let groups = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = {
            let groups = groups.clone();
            GroupWriter::start(
                3,
                move |group: Vec<(u32, tokio::sync::oneshot::Sender<()>)>| {
                    let (numbers, answers): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                    groups.lock().unwrap().push(numbers);
                    for answer in answers {
                        answer.send(()).unwrap();
                    }
                },
            )
        };
        let send = |n| {
            let (answer, answered) = tokio::sync::oneshot::channel();
            assert!(writer.send((n, answer)).is_ok());
            answered
        };
        // Sent before the writing task first runs: one group, then the rest over the maximum.
        let answers: Vec<_> = (1..=4).map(send).collect();
        for answer in answers {
            answer.await.unwrap();
        }
        send(5).await.unwrap();
        assert_eq!(*groups.lock().unwrap(), [vec![1, 2, 3], vec![4], vec![5]]);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write the struct passed. One below the
        // hard limit is far above what the other tests of this process hold.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = limit.rlim_max - 1;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        let raised = raise_open_file_limit().expect("raised");
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((limit.rlim_cur, limit.rlim_max), (raised, raised));
    }

    #[test]
    fn the_allocator_keeps_freed_memory_a_minute() {
        // Option 15 must be the purge delay: mimalloc 3's default for it is a second (unless
        // the environment set it), and no other of its options defaults to 1000.
        // SAFETY: reads and sets one of mimalloc's options.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // The environment may set it (also under its former name).
        if ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
            .iter()
            .all(|name| std::env::var_os(name).is_none())
        {
            assert!([1000, ALLOCATOR_PURGE_DELAY_MS].contains(&before));
        }
        // Other tests' threads may allocate meanwhile: at worst one of them reads the old value.
        keep_freed_memory_a_while();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, ALLOCATOR_PURGE_DELAY_MS);
    }

    #[test]
    fn transparent_huge_pages_can_be_turned_off() {
        // Linux has had the call since 3.15; CI runs on a kernel that has it.
        assert!(disable_transparent_huge_pages());
        let unused: libc::c_ulong = 0;
        // SAFETY: PR_GET_THP_DISABLE takes integers and returns the flag.
        let disabled =
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, unused, unused, unused, unused) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn blocking_threads_are_twice_the_pool_and_at_least_eight() {
        assert_eq!(blocking_threads_for(8), 16);
        assert_eq!(blocking_threads_for(100), 200);
        assert_eq!(blocking_threads_for(1), 8);
        assert_eq!(blocking_threads_for(0), 8);
        assert!(blocking_threads_for(u32::MAX) >= u32::MAX as usize);
    }

    #[test]
    fn the_file_overrides_the_defaults_key_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("zova.toml");
        std::fs::write(&file, "[rpc]\nconductor = \"tcp://10.0.0.1:5560\"\n").expect("write");
        let sample: Sample = load_config(Some(&file)).expect("loads");
        assert_eq!(sample.rpc.conductor, "tcp://10.0.0.1:5560");
        assert_eq!(sample.rpc.scheduler, RpcConfig::default().scheduler);
        assert_eq!(sample.database.url, DatabaseConfig::default().url);
    }

    #[test]
    fn a_missing_or_malformed_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load_config::<Sample>(Some(&dir.path().join("absent.toml"))).is_err());
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[rpc]\ncast_timeout_ms = \"soon\"\n").expect("write");
        let err = load_config::<Sample>(Some(&file)).expect_err("wrong type");
        assert!(err.to_string().contains("cast_timeout_ms"), "{err}");
    }

    #[test]
    fn rpc_defaults_match_the_transport_and_curve_comes_from_its_own_section() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("zova.toml");
        let (public, secret) = crate::curve::generate_key_pair().expect("pair");
        std::fs::write(
            &file,
            format!(
                "[rpc]\nsndhwm = 5\n[rpc.curve]\npublic_key = \"{public}\"\n\
                 secret_key = \"{secret}\"\ntrusted_clients = [\"{public}\"]\n"
            ),
        )
        .expect("write");
        let sample: Sample = load_config(Some(&file)).expect("loads");
        let options = sample.rpc.options();
        assert_eq!(options.sndhwm, 5);
        assert_eq!(options.rcvhwm, RpcOptions::default().rcvhwm);
        let curve = options.curve.expect("curve section");
        assert_eq!(curve.secret_key, secret);
        assert_eq!(curve.trusted_clients, vec![public]);
        assert!(curve.server_public_key.is_empty());
        assert!(!format!("{sample:?}").contains(&secret));

        let plain = RpcConfig::default().options();
        let defaults = RpcOptions::default();
        assert!(plain.curve.is_none());
        assert_eq!(
            (plain.linger, plain.reconnect_ivl, plain.heartbeat_ttl),
            (
                defaults.linger,
                defaults.reconnect_ivl,
                defaults.heartbeat_ttl
            )
        );
        assert_eq!(plain.max_message_bytes, 16 * 1024 * 1024);
        let loaded: Sample = load_config(None).expect("defaults load");
        assert!(loaded.rpc.curve.is_none());
    }

    #[test]
    fn flags_override_the_log_and_metrics_sections() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Binary {
            #[command(flatten)]
            service: ServiceArgs,
        }
        let mut log = LogConfig::default();
        let mut metrics = MetricsConfig {
            listen: "127.0.0.1".into(),
        };
        Binary::parse_from(["zova-x"])
            .service
            .apply(&mut log, &mut metrics);
        assert_eq!((log.format, log.debug), (LogFormat::Terminal, false));
        assert_eq!(metrics.listen, "127.0.0.1");

        let flags = [
            "zova-x",
            "--log-format",
            "json",
            "--debug",
            "--metrics-listen",
            "",
        ];
        Binary::parse_from(flags)
            .service
            .apply(&mut log, &mut metrics);
        assert_eq!((log.format, log.debug), (LogFormat::Json, true));
        assert_eq!(metrics.listen, "", "an empty flag turns the endpoint off");
        assert!(Binary::try_parse_from(["zova-x", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert_eq!(positive_seconds("x", 0.5), Ok(Duration::from_millis(500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e30] {
            assert!(positive_seconds("x", bad).is_err(), "{bad}");
        }
    }
}
