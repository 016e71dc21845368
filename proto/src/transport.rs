//! The ZeroMQ transport: one I/O task per `Rpc` owns every socket (the service's ROUTER and one
//! DEALER per peer), because ZeroMQ sockets must not be used from two threads at once. The task
//! runs on the service's tokio runtime and waits on the sockets' descriptors (`ZMQ_FD`, through
//! `AsyncFd`), so a request, its frames and its answer move between tasks on the same workers
//! rather than across a separate thread. Callers talk to the task through a command queue and wait
//! on oneshot channels.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slog::{debug, info, warn, Logger};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot, Notify};
use uuid::Uuid;

use crate::curve::{self, CurveConfig, CurveKeys, Key};
use crate::envelope::{
    decode, decode_ack_ids, encode, encode_acks, encode_request, now_ms, split_batch, write_batch,
    write_envelope, Envelope, Fields, Header, Kind, RemoteError, ReplyBody, RequestContext,
    BATCHES_SINCE_MINOR, PROTOCOL_MAJOR,
};
use crate::hash::FastMap;
use crate::messages::Method;
use crate::metrics::{DroppedFrame, RpcMetrics};
use crate::ProtoError;

/// The answer of a service that is stopping and took nothing.
const UNAVAILABLE: &str = "Unavailable";
/// Answers that mean the peer did not take the message at all.
const REFUSALS: [&str; 2] = [UNAVAILABLE, "VersionMismatch"];

/// The most requests taken from the ROUTER before their acks go out.
const ACK_BATCH: usize = 256;
/// The most bytes of requests one batch frame carries. Larger frames save nothing more: a few
/// dozen small requests already share one frame's cost.
const BATCH_BYTES: usize = 64 * 1024;
/// Where libzmq looks for the ZAP handler of the sockets in a context (RFC 27).
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// A client with an untrusted key retries its handshake every reconnect interval; one warning
/// per this period says so without flooding the log.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// The context plain-mode services share once [`share_one_context`] was called, and how many
/// services it holds.
static SHARED_CONTEXT: Mutex<Option<(zmq::Context, usize)>> = Mutex::new(None);

/// Services per shared context: libzmq allows 1,023 sockets in a context (ZMQ_MAX_SOCKETS,
/// which the zmq crate cannot change), and a service holds its ROUTER and a DEALER per peer.
const SERVICES_PER_SHARED_CONTEXT: usize = 256;

/// Makes the plain-mode `Rpc`s started from now on in this process share ZeroMQ contexts, one
/// per 256 of them, for a process that runs many services (`zova-sim-hosts`: a thousand compute
/// services would otherwise run two thousand ZeroMQ threads, an I/O thread and a reaper each).
/// The cost: `shutdown` no longer waits until the sockets are closed, so an endpoint may not be
/// free to bind again at once. CURVE services keep a context each, since a context has one ZAP
/// handler.
pub fn share_one_context() {
    let mut shared = lock(&SHARED_CONTEXT);
    if shared.is_none() {
        *shared = Some((zmq::Context::new(), 0));
    }
}

/// A context in the shared set, if sharing is on.
fn shared_context() -> Option<zmq::Context> {
    let mut shared = lock(&SHARED_CONTEXT);
    let (context, services) = shared.as_mut()?;
    if *services == SERVICES_PER_SHARED_CONTEXT {
        *context = zmq::Context::new();
        *services = 0;
    }
    *services += 1;
    Some(context.clone())
}

/// How a service's sockets behave. `RpcConfig::options()` builds it from `[rpc]`; every socket
/// option applies to the ROUTER and to each DEALER alike.
#[derive(Debug, Clone)]
pub struct RpcOptions {
    /// How long a cast waits for the peer's ack before it fails (the peer is down or unreachable).
    pub cast_timeout: Duration,
    /// How long a call waits for the reply.
    pub call_timeout: Duration,
    /// How long a closed socket keeps trying to send what it still holds (ZMQ_LINGER). Zero:
    /// a caller that gave up on a request must not have it delivered later.
    pub linger: Duration,
    /// Messages queued per connection before a send is refused (ZMQ_SNDHWM, ZMQ_RCVHWM).
    pub sndhwm: u32,
    pub rcvhwm: u32,
    /// The first wait before reconnecting to a peer, doubled up to the maximum while it stays
    /// away (ZMQ_RECONNECT_IVL, ZMQ_RECONNECT_IVL_MAX).
    pub reconnect_ivl: Duration,
    pub reconnect_ivl_max: Duration,
    /// ZMTP heartbeats: a ping this often, the connection dropped when nothing comes back within
    /// the timeout, and the peer told to drop it after the TTL (ZMQ_HEARTBEAT_*). They find a peer
    /// whose host vanished without closing its TCP connections. Every answer to a ping cancels a
    /// timer, which libzmq finds by walking all the timers of its I/O thread: with a thousand
    /// hosts, pings every 2 s were a third of a core of the idle fabric, so the default is 10 s
    /// (dropped after 30 s, well within a service's `service_down_time` of 60 s).
    pub heartbeat_ivl: Duration,
    pub heartbeat_timeout: Duration,
    pub heartbeat_ttl: Duration,
    /// The largest frame a socket takes (ZMQ_MAXMSGSIZE); a larger one drops the connection, so
    /// this side refuses to send one.
    pub max_message_bytes: u64,
    /// Requests to one peer that may wait for their ack or reply at once; one more is refused at
    /// once, so a dead peer cannot make the waiting requests grow without bound.
    pub max_in_flight_per_peer: usize,
    /// CURVE keys: with them every socket is encrypted and authenticated. None: plain ZMTP.
    pub curve: Option<CurveConfig>,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            cast_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(30),
            linger: Duration::ZERO,
            sndhwm: 10_000,
            rcvhwm: 10_000,
            reconnect_ivl: Duration::from_millis(100),
            reconnect_ivl_max: Duration::from_secs(5),
            heartbeat_ivl: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            heartbeat_ttl: Duration::from_secs(30),
            max_message_bytes: 16 * 1024 * 1024,
            max_in_flight_per_peer: 10_000,
            curve: None,
        }
    }
}

impl RpcOptions {
    fn check(&self) -> Result<(), ProtoError> {
        if self.max_in_flight_per_peer == 0 {
            return Err(ProtoError::Config(
                "rpc.max_in_flight_per_peer must be at least 1".into(),
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(ProtoError::Config(
                "rpc.max_message_bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// ZeroMQ takes milliseconds and counts as C ints; anything larger is as good as forever.
fn c_int(value: u128) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn apply_options(socket: &zmq::Socket, options: &RpcOptions) -> Result<(), zmq::Error> {
    socket.set_linger(c_int(options.linger.as_millis()))?;
    socket.set_sndhwm(c_int(options.sndhwm.into()))?;
    socket.set_rcvhwm(c_int(options.rcvhwm.into()))?;
    socket.set_reconnect_ivl(c_int(options.reconnect_ivl.as_millis()))?;
    socket.set_reconnect_ivl_max(c_int(options.reconnect_ivl_max.as_millis()))?;
    socket.set_heartbeat_ivl(c_int(options.heartbeat_ivl.as_millis()))?;
    socket.set_heartbeat_timeout(c_int(options.heartbeat_timeout.as_millis()))?;
    // The TTL travels in tenths of a second in 16 bits.
    socket.set_heartbeat_ttl(c_int(options.heartbeat_ttl.as_millis()).min(6_553_500))?;
    socket.set_maxmsgsize(i64::try_from(options.max_message_bytes).unwrap_or(i64::MAX))?;
    Ok(())
}

enum Waiter {
    Ack(oneshot::Sender<Result<(), ProtoError>>),
    Reply(oneshot::Sender<Result<ReplyBody, ProtoError>>),
}

impl Waiter {
    /// The kind of request that waits: a cast for its ack, a call for its reply.
    fn kind(&self) -> Kind {
        match self {
            Waiter::Ack(_) => Kind::Cast,
            Waiter::Reply(_) => Kind::Call,
        }
    }
}

/// A request waiting for its ack or reply, the peer it goes to, its method (for the metrics)
/// and the connection (DEALER) it went out on once the I/O task has sent it.
struct Pending {
    /// Shared with the command that sends it: one allocation per request, not two.
    endpoint: Arc<str>,
    method: &'static str,
    waiter: Waiter,
    connection: Option<u64>,
}

/// The requests waiting for an answer, and how many wait on each peer (and in all, in the
/// metrics' gauges).
struct PendingTable {
    requests: FastMap<Uuid, Pending>,
    per_peer: FastMap<Arc<str>, usize>,
    metrics: RpcMetrics,
}

impl PendingTable {
    fn new(metrics: RpcMetrics) -> Self {
        PendingTable {
            requests: FastMap::default(),
            per_peer: FastMap::default(),
            metrics,
        }
    }

    fn waiting_on(&self, endpoint: &str) -> usize {
        self.per_peer.get(endpoint).copied().unwrap_or(0)
    }

    fn insert(&mut self, msg_id: Uuid, pending: Pending) {
        match self.per_peer.get_mut(&pending.endpoint) {
            Some(count) => *count += 1,
            None => {
                self.per_peer.insert(pending.endpoint.clone(), 1);
            }
        }
        self.metrics.waiting(pending.waiter.kind()).inc();
        if let Some(replaced) = self.requests.insert(msg_id, pending) {
            self.uncount(&replaced);
        }
    }

    fn remove(&mut self, msg_id: &Uuid) -> Option<Pending> {
        let pending = self.requests.remove(msg_id)?;
        self.uncount(&pending);
        Some(pending)
    }

    /// Takes out the requests sent on one connection; those still queued for the I/O task will
    /// go out on the next one.
    fn remove_sent_on(&mut self, connection: u64) -> Vec<Pending> {
        let ids: Vec<Uuid> = self
            .requests
            .iter()
            .filter(|(_, p)| p.connection == Some(connection))
            .map(|(id, _)| *id)
            .collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    fn clear(&mut self) {
        for pending in self.requests.values() {
            self.metrics.waiting(pending.waiter.kind()).dec();
        }
        self.requests.clear();
        self.per_peer.clear();
    }

    fn uncount(&mut self, pending: &Pending) {
        self.metrics.waiting(pending.waiter.kind()).dec();
        if let Some(count) = self.per_peer.get_mut(&*pending.endpoint) {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&*pending.endpoint);
            }
        }
    }
}

type PendingMap = Arc<Mutex<PendingTable>>;
/// Server keys registered with `set_peer_key`, read by the I/O task when it opens a DEALER.
type PeerKeys = Arc<Mutex<HashMap<String, Key>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update; the maps stay consistent
    // because every update is a single insert or remove.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a request's entry when its caller stops waiting for any reason, a dropped future
/// included, so abandoned requests do not pile up in the map.
struct PendingGuard<'a> {
    pending: &'a PendingMap,
    msg_id: Uuid,
    armed: bool,
}

impl PendingGuard<'_> {
    /// The request was answered: whoever answered it took its entry out first, so dropping
    /// the guard need not take the lock the I/O task works under.
    fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.pending).remove(&self.msg_id);
        }
    }
}
/// A request on its way to a peer: its id, method (for the metrics), kind and frame.
struct Outgoing {
    msg_id: Uuid,
    method: &'static str,
    kind: Kind,
    bytes: Vec<u8>,
}

/// What callers ask of the I/O task.
enum Command {
    Send {
        endpoint: Arc<str>,
        request: Outgoing,
    },
    Reply {
        identity: Vec<u8>,
        method: &'static str,
        bytes: Vec<u8>,
    },
    Reset {
        endpoint: String,
        connection: u64,
    },
    Rekey {
        endpoint: String,
    },
    Connect {
        endpoints: Vec<String>,
    },
    Close,
}

/// The queue from callers to the I/O task. Pushing is a short lock; the task is woken only when
/// it waits, so a burst of requests costs one wake-up. The wake-up is a tokio `Notify`: a caller
/// on the same runtime hands the task to its own worker, with no thread switch.
struct CommandQueue {
    queue: Mutex<Vec<Command>>,
    /// The I/O task is (about to be) waiting for commands or frames.
    sleeping: AtomicBool,
    /// Cleared when the I/O task has stopped: nothing would take a command any more.
    open: AtomicBool,
    wake: Notify,
    /// The DEALERs whose descriptors the next wait must look at: those opened since, those
    /// whose wake-up came, and those found readable (which leaves no waker with them). The
    /// others have a waker registered with the runtime and need no look until it comes, so a
    /// wait costs O(sockets ready), not O(peers): a scheduler talks to every compute host.
    due_dealers: Mutex<Vec<Arc<str>>>,
}

type CommandSocket = Arc<CommandQueue>;

impl CommandQueue {
    fn new() -> Self {
        CommandQueue {
            queue: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
            open: AtomicBool::new(true),
            wake: Notify::new(),
            due_dealers: Mutex::new(Vec::new()),
        }
    }

    /// Has the task's next wait look at the DEALER to `endpoint` (for the task itself).
    fn look_at_dealer(&self, endpoint: Arc<str>) {
        lock(&self.due_dealers).push(endpoint);
    }

    /// Has the next wait look at the DEALER to `endpoint`, waking the task if it waits.
    fn dealer_due(&self, endpoint: Arc<str>) {
        self.look_at_dealer(endpoint);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The DEALERs to look at, each once.
    fn take_due_dealers(&self) -> Vec<Arc<str>> {
        let mut due = std::mem::take(&mut *lock(&self.due_dealers));
        due.sort_unstable();
        due.dedup();
        due
    }

    fn push(&self, command: Command) -> Result<(), ProtoError> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(ProtoError::Closed);
        }
        lock(&self.queue).push(command);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // A permit is kept if the task is not yet waiting, so this wake-up is never lost.
            self.wake.notify_one();
        }
        Ok(())
    }

    fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *lock(&self.queue))
    }

    fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }
}

/// A request that reached this service's ROUTER; a `call` must be answered with `reply`.
pub struct Incoming {
    pub envelope: Envelope,
    identity: Vec<u8>,
    commands: CommandSocket,
    metrics: RpcMetrics,
    max_message_bytes: u64,
    replied: bool,
}

impl Incoming {
    pub fn method(&self) -> &str {
        &self.envelope.method
    }

    pub fn context(&self) -> &RequestContext {
        &self.envelope.context
    }

    pub fn args<M: Method>(&self) -> Result<M, ProtoError> {
        self.envelope.args()
    }

    /// Answers a `call` (does nothing for a `cast`, whose sender already has its ack).
    pub fn reply<M: Method>(mut self, result: Result<M::Reply, RemoteError>) {
        let body = match result.and_then(|value| {
            encode(&value).map_err(|e| RemoteError {
                kind: "Encode".into(),
                message: e.to_string(),
            })
        }) {
            Ok(bytes) => ReplyBody::Ok(bytes),
            Err(err) => ReplyBody::Err(err),
        };
        self.send_reply(body);
    }

    /// Answers a request for a method `service` does not have (a newer peer, or a stray frame).
    pub fn reply_no_such_method(mut self, service: &str) {
        let message = format!("{service} has no method {}", self.envelope.method);
        self.send_reply(ReplyBody::Err(RemoteError {
            kind: "NoSuchMethod".into(),
            message,
        }));
    }

    /// Answers a request whose arguments this service cannot decode.
    pub fn reply_invalid_args(mut self, err: &ProtoError) {
        let message = format!("{}: {err}", self.envelope.method);
        self.send_reply(ReplyBody::Err(RemoteError {
            kind: "InvalidArgs".into(),
            message,
        }));
    }

    fn send_reply(&mut self, body: ReplyBody) {
        if self.replied || self.envelope.kind != Kind::Call {
            self.replied = true;
            return;
        }
        self.replied = true;
        let Ok(mut bytes) = self.reply_bytes(body) else {
            return;
        };
        if bytes.len() as u64 > self.max_message_bytes {
            // The caller's socket would drop the connection on a frame over the limit, and every
            // other request on it with the connection; tell it why instead.
            let too_large = ReplyBody::Err(RemoteError {
                kind: "TooLarge".into(),
                message: ProtoError::TooLarge {
                    bytes: bytes.len(),
                    limit: self.max_message_bytes,
                }
                .to_string(),
            });
            let Ok(short) = self.reply_bytes(too_large) else {
                return;
            };
            bytes = short;
        }
        // The I/O task is gone only at shutdown, when nobody waits for the reply any more.
        let _ = self.commands.push(Command::Reply {
            identity: std::mem::take(&mut self.identity),
            method: self.metrics.method_label(&self.envelope.method),
            bytes,
        });
    }

    /// The reply frame: the request's id, method and context (as `Envelope::answer`), written
    /// from the request without copying it.
    fn reply_bytes(&self, body: ReplyBody) -> Result<Vec<u8>, ProtoError> {
        let envelope = &self.envelope;
        Ok(write_envelope(&Fields {
            version: (PROTOCOL_MAJOR, crate::envelope::PROTOCOL_MINOR),
            msg_id: envelope.msg_id,
            kind: Kind::Reply,
            method: &envelope.method,
            context: &envelope.context,
            deadline_ms: envelope.context.deadline_ms,
            payload: &encode(&body)?,
            budget_ms: None,
        }))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // A call dropped without an answer would leave its caller waiting for the whole timeout.
        if !self.replied {
            self.send_reply(ReplyBody::Err(RemoteError {
                kind: "Unhandled".into(),
                message: format!("method {} was not answered", self.envelope.method),
            }));
        }
    }
}

/// One service's messaging: an optional bound ROUTER for requests to it, DEALERs to its peers.
pub struct Rpc {
    log: Logger,
    options: RpcOptions,
    commands: CommandSocket,
    pending: PendingMap,
    peer_keys: PeerKeys,
    endpoint: Option<String>,
    metrics: RpcMetrics,
    /// What the I/O task owns; `shutdown` takes it out, which closes the sockets.
    io: SharedIo,
    /// The thread that runs the I/O task when `start` was called outside a tokio runtime.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What `Rpc::start` returns: the handle, and with `bind` the receiver of requests.
type Started = (Rpc, Option<mpsc::UnboundedReceiver<Incoming>>);

impl Rpc {
    /// Starts the I/O task, on the current tokio runtime (or, outside one, on a thread of its own
    /// with a runtime of its own). With `bind`, the service also serves requests: they arrive on the
    /// returned receiver (already acknowledged to their senders). `tcp://127.0.0.1:*` binds an
    /// ephemeral port; `endpoint()` says which. Invalid options or keys are an error here.
    /// Its metrics are registered nowhere; see [`Rpc::start_with_metrics`].
    pub fn start(
        log: Logger,
        bind: Option<&str>,
        options: RpcOptions,
    ) -> Result<Started, ProtoError> {
        Rpc::start_with_metrics(log, bind, options, RpcMetrics::default())
    }

    /// As [`Rpc::start`], counting into `metrics` (created in the service's registry).
    pub fn start_with_metrics(
        log: Logger,
        bind: Option<&str>,
        options: RpcOptions,
        metrics: RpcMetrics,
    ) -> Result<Started, ProtoError> {
        options.check()?;
        let curve = options
            .curve
            .as_ref()
            .map(CurveKeys::from_config)
            .transpose()?;
        let context = match curve {
            None => shared_context().unwrap_or_default(),
            Some(_) => zmq::Context::new(),
        };
        let commands: CommandSocket = Arc::new(CommandQueue::new());
        // The runtime the I/O task runs on: the caller's, or one of its own on a thread of its
        // own. Descriptors are registered with it, so it is entered before any is watched.
        let (handle, own_runtime) = match tokio::runtime::Handle::try_current() {
            Ok(handle) => (handle, None),
            Err(_) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|e| ProtoError::Thread(e.to_string()))?;
                (runtime.handle().clone(), Some(runtime))
            }
        };
        let _entered = handle.enter();

        // Bound before the ROUTER: a CURVE server with no ZAP handler lets every client in.
        let zap = match (&curve, bind) {
            (Some(_), Some(_)) => {
                let zap = context.socket(zmq::REP)?;
                zap.set_linger(0)?;
                zap.bind(ZAP_ENDPOINT)?;
                Some(zap)
            }
            _ => None,
        };

        let (router, endpoint, incoming) = match bind {
            Some(address) => {
                let router = context.socket(zmq::ROUTER)?;
                apply_options(&router, &options)?;
                router.set_router_mandatory(true)?;
                if let Some(keys) = &curve {
                    router.set_curve_server(true)?;
                    router.set_curve_publickey(&keys.public)?;
                    router.set_curve_secretkey(&keys.secret)?;
                }
                router.bind(address).map_err(|source| ProtoError::Bind {
                    endpoint: address.to_string(),
                    source,
                })?;
                let endpoint = router
                    .get_last_endpoint()?
                    .map_err(|_| ProtoError::Decode("bound endpoint is not UTF-8".into()))?;
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(router), Some(endpoint), Some((tx, rx)))
            }
            None => (None, None, None),
        };
        let (incoming_tx, incoming_rx) = match incoming {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        log_security(&log, bind, curve.as_ref());

        let pending: PendingMap = Arc::new(Mutex::new(PendingTable::new(metrics.clone())));
        let peer_keys: PeerKeys = Arc::default();
        if let Some(config) = &options.curve {
            for (endpoint, key) in &config.peer_keys {
                let key = curve::decode_key(key).map_err(|reason| {
                    ProtoError::Config(format!("rpc.curve.peer_keys[{endpoint}] {reason}"))
                })?;
                lock(&peer_keys).insert(endpoint.clone(), key);
            }
        }
        let router_fd = router.as_ref().map(watch).transpose()?;
        let zap_fd = zap.as_ref().map(watch).transpose()?;
        let io = IoTask {
            log: log.clone(),
            options: options.clone(),
            router_fd,
            zap_fd,
            router,
            zap,
            dealers: FastMap::default(),
            connections_opened: 0,
            curve,
            peer_keys: peer_keys.clone(),
            refusals: RefusalLog::default(),
            incoming: incoming_tx,
            pending: pending.clone(),
            commands: commands.clone(),
            metrics: metrics.clone(),
            context,
            more_contexts: Vec::new(),
            out_of_files: false,
            ahead: HashSet::new(),
        };
        let io: SharedIo = Arc::new(Mutex::new(Some(io)));
        let task = run_io(io.clone(), commands.clone(), pending.clone());
        let thread = match own_runtime {
            None => {
                handle.spawn(task);
                None
            }
            Some(runtime) => Some(
                std::thread::Builder::new()
                    .name("zova-rpc-io".into())
                    .spawn(move || runtime.block_on(task))
                    .map_err(|e| ProtoError::Thread(e.to_string()))?,
            ),
        };
        let rpc = Rpc {
            log,
            options,
            commands,
            pending,
            peer_keys,
            endpoint,
            metrics,
            io,
            thread: Mutex::new(thread),
        };
        Ok((rpc, incoming_rx))
    }

    /// The endpoint the ROUTER is bound to, with the real port if `*` was asked for.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Registers the CURVE server key (Z85) of the service at `endpoint`, used for it instead of
    /// `rpc.curve.server_public_key`. A changed key replaces the connection to it; requests still
    /// waiting on the old one fail as `Refused`. Plain mode keeps the key and does not use it.
    pub fn set_peer_key(&self, endpoint: &str, server_public_key: &str) -> Result<(), ProtoError> {
        let key = curve::decode_key(server_public_key).map_err(|reason| {
            ProtoError::Config(format!("the server key for {endpoint} {reason}"))
        })?;
        let previous = lock(&self.peer_keys).insert(endpoint.to_string(), key);
        if previous != Some(key) {
            self.command(Command::Rekey {
                endpoint: endpoint.to_string(),
            });
        }
        Ok(())
    }

    /// Opens the connections to `endpoints` that are not open yet, without sending anything,
    /// so that the first request to each does not wait for its TCP and ZeroMQ handshakes, and
    /// closes those to the peers the previous call named and this one does not, once no request
    /// waits on them (a host gone, or back on another port, would otherwise be retried for as
    /// long as the service runs). A connection that cannot be opened is left to the first
    /// request, which reports why.
    pub fn connect_ahead(&self, endpoints: Vec<String>) {
        self.command(Command::Connect { endpoints });
    }

    /// Sends a one-way request and returns once the peer has acknowledged it.
    pub async fn cast<M: Method>(
        &self,
        endpoint: &str,
        context: &RequestContext,
        args: &M,
    ) -> Result<(), ProtoError> {
        let result = self.cast_once(endpoint, context, args).await;
        if let Err(e) = &result {
            self.metrics.failed(M::NAME, e);
        }
        result
    }

    async fn cast_once<M: Method>(
        &self,
        endpoint: &str,
        context: &RequestContext,
        args: &M,
    ) -> Result<(), ProtoError> {
        let deadline = deadline_in(context, self.options.cast_timeout);
        let (msg_id, bytes) = encode_request(Kind::Cast, M::NAME, context, deadline, args)?;
        let (tx, mut rx) = oneshot::channel();
        let guard = self.send(
            endpoint,
            M::NAME,
            Kind::Cast,
            msg_id,
            bytes,
            Waiter::Ack(tx),
        )?;
        match tokio::time::timeout(self.options.cast_timeout, &mut rx).await {
            Ok(Ok(result)) => {
                guard.answered();
                result
            }
            Ok(Err(_)) => Err(ProtoError::Closed),
            Err(_) => {
                // Taking the entry out first means the I/O task will not send it if it has not.
                let Some(entry) = lock(&self.pending).remove(&msg_id) else {
                    // The I/O task finished it as the deadline passed: its answer is final.
                    // Its sender is about to send (or dropped, at shutdown).
                    return rx.await.unwrap_or(Err(ProtoError::Closed));
                };
                // Drop the DEALER it went out on so the unacknowledged frame is not delivered
                // later, after the caller has given up on it and maybe sent the work elsewhere.
                if let Some(connection) = entry.connection {
                    self.command(Command::Reset {
                        endpoint: endpoint.to_string(),
                        connection,
                    });
                }
                Err(ProtoError::Timeout {
                    method: M::NAME.to_string(),
                    endpoint: endpoint.to_string(),
                    waited: self.options.cast_timeout,
                })
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub async fn call<M: Method>(
        &self,
        endpoint: &str,
        context: &RequestContext,
        args: &M,
    ) -> Result<M::Reply, ProtoError> {
        let result = self.call_once(endpoint, context, args).await;
        if let Err(e) = &result {
            self.metrics.failed(M::NAME, e);
        }
        result
    }

    async fn call_once<M: Method>(
        &self,
        endpoint: &str,
        context: &RequestContext,
        args: &M,
    ) -> Result<M::Reply, ProtoError> {
        let deadline = deadline_in(context, self.options.call_timeout);
        let (msg_id, bytes) = encode_request(Kind::Call, M::NAME, context, deadline, args)?;
        let (tx, rx) = oneshot::channel();
        let sent = Instant::now();
        let guard = self.send(
            endpoint,
            M::NAME,
            Kind::Call,
            msg_id,
            bytes,
            Waiter::Reply(tx),
        )?;
        let body = match tokio::time::timeout(self.options.call_timeout, rx).await {
            Ok(Ok(result)) => {
                guard.answered();
                if result.is_ok() {
                    self.metrics.call_answered(M::NAME, sent.elapsed());
                }
                result?
            }
            Ok(Err(_)) => return Err(ProtoError::Closed),
            Err(_) => {
                return Err(ProtoError::Timeout {
                    method: M::NAME.to_string(),
                    endpoint: endpoint.to_string(),
                    waited: self.options.call_timeout,
                });
            }
        };
        match body {
            ReplyBody::Ok(bytes) => decode(&bytes),
            ReplyBody::Err(err) => Err(ProtoError::Remote(err)),
        }
    }

    fn send(
        &self,
        endpoint: &str,
        method: &'static str,
        kind: Kind,
        msg_id: Uuid,
        bytes: Vec<u8>,
        waiter: Waiter,
    ) -> Result<PendingGuard<'_>, ProtoError> {
        let limit = self.options.max_message_bytes;
        if bytes.len() as u64 > limit {
            return Err(ProtoError::TooLarge {
                bytes: bytes.len(),
                limit,
            });
        }
        let shared_endpoint: Arc<str> = Arc::from(endpoint);
        {
            let mut pending = lock(&self.pending);
            let waiting = pending.waiting_on(endpoint);
            if waiting >= self.options.max_in_flight_per_peer {
                return Err(ProtoError::Refused {
                    endpoint: endpoint.to_string(),
                    reason: format!(
                        "{waiting} requests to it are already waiting for an answer \
                         (rpc.max_in_flight_per_peer)"
                    ),
                });
            }
            let entry = Pending {
                endpoint: shared_endpoint.clone(),
                method,
                waiter,
                connection: None,
            };
            pending.insert(msg_id, entry);
        }
        let guard = PendingGuard {
            pending: &self.pending,
            msg_id,
            armed: true,
        };
        // The queue to the I/O task is unbounded (the in-flight limit bounds it per peer): it
        // refuses only once the thread is gone.
        self.commands.push(Command::Send {
            endpoint: shared_endpoint,
            request: Outgoing {
                msg_id,
                method,
                kind,
                bytes,
            },
        })?;
        Ok(guard)
    }

    fn command(&self, command: Command) {
        if let Err(e) = self.commands.push(command) {
            warn!(self.log, "rpc command not delivered to the I/O task"; "error" => %e);
        }
    }

    /// Stops taking requests: the receiver returned by `start` ends once it has delivered what was
    /// already acknowledged, and later requests go unacknowledged (to their senders this service
    /// is down). Replies to calls still go out until `shutdown`.
    pub fn stop_serving(&self) {
        self.command(Command::Close);
    }

    /// Stops the I/O task and closes every socket before it returns (so the endpoint can be
    /// bound again, unless the process shares contexts: [`share_one_context`]); pending requests
    /// fail with `Closed`. Idempotent. It never waits for the task to run, so it is safe on any
    /// thread, the runtime's own included.
    pub fn shutdown(&self) {
        self.commands.open.store(false, Ordering::SeqCst);
        let io = lock(&self.io).take();
        // Dropped outside the lock the task's wait looks at.
        drop(io);
        self.commands.wake.notify_one();
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        lock(&self.pending).clear();
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Says once, at start, how this service's traffic is protected.
fn log_security(log: &Logger, bind: Option<&str>, curve: Option<&CurveKeys>) {
    match (curve, bind) {
        (Some(keys), _) => {
            info!(log, "RPC connections are encrypted and authenticated with CURVE";
                "public_key" => curve::key_prefix(&keys.public),
                "trusted_clients" => keys.trusted.len());
            if bind.is_some() && keys.trusted.is_empty() {
                warn!(log, "rpc.curve.trusted_clients is empty: every request to this service will be refused");
            }
        }
        (None, Some(address)) if !curve::is_local_endpoint(address) => {
            warn!(log, "RPC traffic on this endpoint is UNAUTHENTICATED and UNENCRYPTED: anyone who \
                can reach it can send requests and read replies; set [rpc.curve] keys (zova-keygen)";
                "endpoint" => address);
        }
        (None, _) => {}
    }
}

/// Counts refused CURVE clients between warnings.
#[derive(Default)]
struct RefusalLog {
    last_warning: Option<Instant>,
    unreported: u64,
}

/// A DEALER to one peer, the server key it was opened with (None in plain mode), and a number no
/// other DEALER of this `Rpc` has, so a late reset cannot close its successor.
struct Dealer {
    // Before the socket: its descriptor leaves the runtime before libzmq closes it.
    fd: AsyncFd<SocketFd>,
    socket: zmq::Socket,
    server_key: Option<Key>,
    connection: u64,
    /// The peer answered on this connection with a minor version that reads batch frames.
    /// Until then each request goes in a frame of its own, which every 1.x peer reads. A peer
    /// replaced by an older one behind the same endpoint drops batches as malformed: the
    /// requests in them time out, which resets the connection, and this starts over.
    batches: bool,
    /// What the runtime wakes when the descriptor becomes readable ([`DealerWaker`]).
    waker: Waker,
}

/// Registered with one DEALER's descriptor: when it becomes readable, marks the DEALER due
/// and wakes the I/O task.
struct DealerWaker {
    endpoint: Arc<str>,
    commands: CommandSocket,
}

impl Wake for DealerWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.commands.dealer_due(self.endpoint.clone());
    }
}

/// A socket's `ZMQ_FD`, which libzmq owns: readable when the socket may have something to read
/// (its `ZMQ_EVENTS` then says), edge-triggered.
struct SocketFd(RawFd);

impl AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Registers a socket's descriptor with the current runtime.
fn watch(socket: &zmq::Socket) -> Result<AsyncFd<SocketFd>, ProtoError> {
    let fd = socket.get_fd()?;
    // SAFETY: the descriptor stays open while the socket is; every holder of the returned
    // AsyncFd declares it before the socket, so it is dropped (deregistered) first.
    unsafe { AsyncFd::register_with_interest(SocketFd(fd), Interest::READABLE) }
        .map_err(|e| ProtoError::Thread(format!("cannot watch a socket: {e}")))
}

/// True when the descriptor became readable since it was last looked at (its readiness is then
/// cleared, before the socket is read, so a frame that comes later wakes the task again).
fn take_readable(fd: &AsyncFd<SocketFd>, cx: &mut Context<'_>) -> bool {
    match fd.poll_read_ready(cx) {
        Poll::Ready(Ok(mut ready)) => {
            ready.clear_ready();
            true
        }
        Poll::Ready(Err(_)) | Poll::Pending => false,
    }
}

type SharedIo = Arc<Mutex<Option<IoTask>>>;

/// What the I/O task owns. It sits behind a mutex only so `shutdown` can close the sockets from
/// any thread without waiting for the task to be scheduled; the task holds the lock only while
/// it works, never across an await.
struct IoTask {
    log: Logger,
    options: RpcOptions,
    // Descriptors before sockets (see `Dealer`).
    router_fd: Option<AsyncFd<SocketFd>>,
    zap_fd: Option<AsyncFd<SocketFd>>,
    // Declared (so dropped) before `zap`, so no handshake is let in unchecked while closing.
    router: Option<zmq::Socket>,
    zap: Option<zmq::Socket>,
    dealers: FastMap<String, Dealer>,
    connections_opened: u64,
    curve: Option<CurveKeys>,
    peer_keys: PeerKeys,
    refusals: RefusalLog,
    incoming: Option<mpsc::UnboundedSender<Incoming>>,
    pending: PendingMap,
    commands: CommandSocket,
    metrics: RpcMetrics,
    context: zmq::Context,
    /// Contexts opened for DEALERs once `context` was full (see `dealer_socket`).
    more_contexts: Vec<zmq::Context>,
    /// The last new context could not make a socket either: the process has no descriptors left.
    out_of_files: bool,
    /// The peers the last `connect_ahead` named (and those it could not close yet).
    ahead: HashSet<String>,
}

/// A socket to read from.
#[derive(PartialEq, Eq)]
enum Source {
    Router,
    Zap,
    Dealer(String),
}

/// The I/O task: carries out commands and reads the sockets, then waits until a command or a
/// frame comes. It ends when `shutdown` has taken what it owns (or with its runtime).
async fn run_io(io: SharedIo, commands: CommandSocket, pending: PendingMap) {
    // However the task ends (shut down, a panic, its runtime gone), callers must see `Closed`
    // from then on rather than wait for answers nobody will deliver.
    struct CloseOnExit(CommandSocket);
    impl Drop for CloseOnExit {
        fn drop(&mut self) {
            self.0.open.store(false, Ordering::SeqCst);
        }
    }
    let _close_on_exit = CloseOnExit(commands.clone());
    // Frames may have come before the first wait.
    let mut ready = vec![Source::Router, Source::Zap];
    loop {
        let unfinished = {
            let mut guard = lock(&io);
            let Some(task) = guard.as_mut() else { return };
            task.work(ready)
        };
        ready = if unfinished.is_empty() {
            let ready = wait(&io, &commands).await;
            if ready.is_empty() && lock(&pending).requests.len() > 1 {
                // Woken by a caller while other requests are in flight: their callers are
                // likely runnable too (woken by the answers just delivered). A woken task runs
                // next on its worker, so without this the task would take their requests one
                // at a time; behind them it takes them all and sends them in few frames. A
                // lone request (a call waiting for its reply) goes at once.
                tokio::task::yield_now().await;
            }
            ready
        } else {
            // More frames than one batch: let other tasks run, then go on without waiting.
            tokio::task::yield_now().await;
            unfinished
        };
    }
}

/// Waits until a command is queued or a socket may have frames; returns those sockets.
async fn wait(io: &SharedIo, commands: &CommandQueue) -> Vec<Source> {
    // Say we are going to wait, then look once more: a command pushed after this look wakes
    // the task, one pushed before it is seen here.
    commands.sleeping.store(true, Ordering::SeqCst);
    if !commands.is_empty() {
        commands.sleeping.store(false, Ordering::SeqCst);
        return Vec::new();
    }
    let notified = commands.wake.notified();
    tokio::pin!(notified);
    let ready = std::future::poll_fn(|cx| {
        let woken = notified.as_mut().poll(cx).is_ready();
        let guard = lock(io);
        let Some(task) = guard.as_ref() else {
            return Poll::Ready(Vec::new());
        };
        let ready = task.readable(cx);
        if woken || !ready.is_empty() {
            Poll::Ready(ready)
        } else {
            Poll::Pending
        }
    })
    .await;
    commands.sleeping.store(false, Ordering::SeqCst);
    ready
}

impl IoTask {
    /// Carries out the queued commands, then reads `ready` and the sockets the commands wrote
    /// to; returns the sockets that still have frames after one batch.
    fn work(&mut self, ready: Vec<Source>) -> Vec<Source> {
        // Commands before frames: what a caller asked before a frame arrived applies to it (a
        // `stop_serving` followed by a request must see the request refused). A socket written
        // to must be read before the task waits: the write may have taken the wake-up of a
        // frame that came meanwhile.
        let mut to_read = ready;
        self.drain_commands(&mut to_read);
        let mut unfinished = Vec::new();
        for source in to_read {
            match source {
                Source::Router => {
                    if self.drain_router() {
                        unfinished.push(Source::Router);
                    }
                }
                Source::Zap => self.answer_zap(),
                Source::Dealer(endpoint) => self.drain_dealer(&endpoint),
            }
        }
        unfinished
    }

    /// The sockets whose descriptors became readable; registers `cx` with the ROUTER's and the
    /// ZAP socket's, and each due DEALER's own waker with its descriptor.
    fn readable(&self, cx: &mut Context<'_>) -> Vec<Source> {
        let mut ready = Vec::new();
        if self
            .router_fd
            .as_ref()
            .is_some_and(|fd| take_readable(fd, cx))
        {
            ready.push(Source::Router);
        }
        if self.zap_fd.as_ref().is_some_and(|fd| take_readable(fd, cx)) {
            ready.push(Source::Zap);
        }
        // Taken before any is polled: a poll may wake a waker at once (tokio's cooperative
        // budget), which marks its DEALER due for the next wait.
        for endpoint in self.commands.take_due_dealers() {
            // Closed since it was marked.
            let Some(dealer) = self.dealers.get(&*endpoint) else {
                continue;
            };
            if take_readable(&dealer.fd, &mut Context::from_waker(&dealer.waker)) {
                ready.push(Source::Dealer(endpoint.to_string()));
                // Found readable, the descriptor holds no waker: look again next time. (This
                // wait ends now, so no wake-up.)
                self.commands.look_at_dealer(endpoint);
            }
        }
        ready
    }

    /// Carries out every queued command, adding the sockets it wrote to to `to_read`.
    fn drain_commands(&mut self, to_read: &mut Vec<Source>) {
        // Requests by peer, in the order they were asked, sent after the other commands: those
        // to one peer leave together, in as few frames as it reads.
        let mut sends: Vec<(Arc<str>, Vec<Outgoing>)> = Vec::new();
        for command in self.commands.take() {
            if matches!(command, Command::Reset { .. } | Command::Rekey { .. }) {
                // Requests asked before a connection is replaced go out on the old one, as
                // their callers asked them.
                self.send_requests(&mut sends, to_read);
            }
            match command {
                Command::Close => {
                    // Frames that arrive from now on are neither acknowledged nor taken, so their
                    // senders see a service that is gone; answers to taken calls still go out.
                    self.incoming = None;
                }
                Command::Send { endpoint, request } => {
                    match sends.iter_mut().find(|(to, _)| **to == *endpoint) {
                        Some((_, requests)) => requests.push(request),
                        None => sends.push((endpoint, vec![request])),
                    }
                }
                Command::Reply {
                    identity,
                    method,
                    bytes,
                } => {
                    if let Some(router) = &self.router {
                        if !to_read.contains(&Source::Router) {
                            to_read.push(Source::Router);
                        }
                        match router.send_multipart([&identity, &bytes], zmq::DONTWAIT) {
                            Ok(()) => self.metrics.sent(method, Kind::Reply),
                            // The caller went away (ROUTER_MANDATORY says so); it has timed out.
                            Err(zmq::Error::EHOSTUNREACH) => {
                                debug!(self.log, "reply not delivered: the caller is gone");
                            }
                            // Its queue is full (rpc.sndhwm): the caller will time out.
                            Err(e) => warn!(self.log, "reply not delivered"; "error" => %e),
                        }
                    }
                }
                Command::Reset {
                    endpoint,
                    connection,
                } => self.reset(
                    &endpoint,
                    connection,
                    "the connection was reset after another request to it timed out",
                ),
                Command::Connect { endpoints } => self.connect_ahead(endpoints),
                Command::Rekey { endpoint } => {
                    let key = self.server_key_for(&endpoint);
                    let stale = self
                        .dealers
                        .get(&endpoint)
                        .filter(|d| d.server_key != key)
                        .map(|d| d.connection);
                    if let Some(connection) = stale {
                        self.reset(
                            &endpoint,
                            connection,
                            "its CURVE server key changed, so its connection was replaced",
                        );
                    }
                }
            }
        }
        self.send_requests(&mut sends, to_read);
    }

    /// Sends the requests gathered by peer, adding each peer's DEALER to `to_read`.
    fn send_requests(
        &mut self,
        sends: &mut Vec<(Arc<str>, Vec<Outgoing>)>,
        to_read: &mut Vec<Source>,
    ) {
        for (endpoint, requests) in sends.drain(..) {
            self.send_to_peer(&endpoint, &requests);
            if !to_read
                .iter()
                .any(|s| matches!(s, Source::Dealer(e) if **e == *endpoint))
            {
                to_read.push(Source::Dealer(endpoint.to_string()));
            }
        }
    }

    /// Sends `requests` to the peer at `endpoint`, opening its DEALER if need be: several to a
    /// frame when the peer reads batch frames, else one each.
    fn send_to_peer(&mut self, endpoint: &str, requests: &[Outgoing]) {
        if let Err(reason) = self.dealer_for(endpoint) {
            for request in requests {
                self.refuse_request(endpoint, request.msg_id, &reason);
            }
            return;
        }
        let batches = self.dealers.get(endpoint).is_some_and(|d| d.batches);
        // Room for the batch frame's own header (at most 5 bytes) under the size limit.
        let limit = usize::try_from(self.options.max_message_bytes).unwrap_or(usize::MAX);
        let budget = BATCH_BYTES.min(limit).saturating_sub(5);
        let (mut first, mut bytes) = (0, 0);
        for (i, request) in requests.iter().enumerate() {
            // Each envelope takes its length and at most 5 bytes of header in a batch.
            let size = request.bytes.len() + 5;
            if i > first && (!batches || bytes + size > budget) {
                self.send_frame(endpoint, &requests[first..i]);
                (first, bytes) = (i, 0);
            }
            bytes += size;
        }
        if first < requests.len() {
            self.send_frame(endpoint, &requests[first..]);
        }
    }

    /// Sends `requests` in one frame (a batch frame if more than one) on the peer's DEALER,
    /// leaving out those whose callers already gave up; refuses them all if the socket does not
    /// take it.
    fn send_frame(&self, endpoint: &str, requests: &[Outgoing]) {
        let Some(dealer) = self.dealers.get(endpoint) else {
            for request in requests {
                self.refuse_request(endpoint, request.msg_id, "its connection is gone");
            }
            return;
        };
        // Under the lock, so a caller that times out either finds its request sent (and on
        // which connection) or takes it out before it goes.
        let mut pending = lock(&self.pending);
        // A request whose caller gave up is not sent: that would deliver work it may have sent
        // elsewhere.
        let waiting: Vec<&Outgoing> = requests
            .iter()
            .filter(|request| pending.requests.contains_key(&request.msg_id))
            .collect();
        let sent = match waiting.as_slice() {
            [] => return,
            [one] => dealer.socket.send(&one.bytes[..], zmq::DONTWAIT),
            many => {
                let frames: Vec<&[u8]> = many.iter().map(|r| r.bytes.as_slice()).collect();
                dealer.socket.send(&write_batch(&frames)[..], zmq::DONTWAIT)
            }
        };
        let reason = match sent {
            Ok(()) => {
                for request in &waiting {
                    if let Some(entry) = pending.requests.get_mut(&request.msg_id) {
                        entry.connection = Some(dealer.connection);
                    }
                    self.metrics.sent(request.method, request.kind);
                }
                return;
            }
            Err(zmq::Error::EAGAIN) => format!(
                "its send queue is full ({} messages, rpc.sndhwm)",
                self.options.sndhwm
            ),
            Err(e) => format!("the socket did not take the message: {e}"),
        };
        drop(pending);
        for request in waiting {
            self.refuse_request(endpoint, request.msg_id, &reason);
        }
    }

    /// Ends a request the peer could not be sent as `Refused`.
    fn refuse_request(&self, endpoint: &str, msg_id: Uuid, reason: &str) {
        let err = ProtoError::Refused {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        };
        self.complete(msg_id, Err(err));
    }

    /// Closes the DEALER to `endpoint` if it is still `connection`, dropping what it holds, and
    /// fails the requests sent on it: they can no longer be answered, so their callers learn it
    /// now rather than at their own timeouts.
    fn reset(&mut self, endpoint: &str, connection: u64, reason: &str) {
        if self
            .dealers
            .get(endpoint)
            .is_some_and(|d| d.connection == connection)
        {
            self.dealers.remove(endpoint);
        }
        let failed = lock(&self.pending).remove_sent_on(connection);
        for entry in failed {
            let err = ProtoError::Refused {
                endpoint: endpoint.to_string(),
                reason: reason.to_string(),
            };
            finish(entry.waiter, Err(err));
        }
    }

    fn connect_ahead(&mut self, endpoints: Vec<String>) {
        self.out_of_files = false;
        let named: HashSet<String> = endpoints.into_iter().collect();
        let mut kept = HashSet::new();
        for endpoint in self.ahead.difference(&named) {
            if lock(&self.pending).waiting_on(endpoint) > 0 {
                kept.insert(endpoint.clone());
            } else {
                self.dealers.remove(endpoint);
            }
        }
        for endpoint in &named {
            if let Err(reason) = self.dealer_for(endpoint) {
                debug!(self.log, "not connected ahead"; "endpoint" => endpoint, "reason" => reason);
                if self.out_of_files {
                    // Every other one would fail the same way, each after a new context.
                    break;
                }
            }
        }
        kept.extend(named);
        self.ahead = kept;
    }

    /// Opens the DEALER to `endpoint` unless it is open.
    fn dealer_for(&mut self, endpoint: &str) -> Result<(), String> {
        if !self.dealers.contains_key(endpoint) {
            let dealer = self.open_dealer(endpoint)?;
            self.dealers.insert(endpoint.to_string(), dealer);
            // No waker is registered with its descriptor until it is first looked at.
            self.commands.look_at_dealer(endpoint.into());
        }
        Ok(())
    }

    fn open_dealer(&mut self, endpoint: &str) -> Result<Dealer, String> {
        let server_key = self.server_key_for(endpoint);
        if self.curve.is_some() && server_key.is_none() {
            return Err(
                "no CURVE server key is known for it: set rpc.curve.server_public_key \
                        or register one with set_peer_key"
                    .into(),
            );
        }
        let socket = self
            .dealer_socket()
            .map_err(|e| format!("cannot connect to it: {e}"))?;
        let open = || -> Result<zmq::Socket, zmq::Error> {
            apply_options(&socket, &self.options)?;
            if let (Some(keys), Some(server_key)) = (&self.curve, &server_key) {
                socket.set_curve_serverkey(server_key)?;
                socket.set_curve_publickey(&keys.public)?;
                socket.set_curve_secretkey(&keys.secret)?;
            }
            socket.connect(endpoint)?;
            Ok(socket)
        };
        let socket = open().map_err(|e| format!("cannot connect to it: {e}"))?;
        let fd = watch(&socket).map_err(|e| e.to_string())?;
        self.connections_opened += 1;
        let waker = Waker::from(Arc::new(DealerWaker {
            endpoint: endpoint.into(),
            commands: self.commands.clone(),
        }));
        Ok(Dealer {
            fd,
            socket,
            server_key,
            connection: self.connections_opened,
            batches: false,
            waker,
        })
    }

    /// A new DEALER socket. libzmq holds at most 1,023 sockets in a context (ZMQ_MAX_SOCKETS,
    /// which the zmq crate cannot raise), so a scheduler or an API with more compute hosts than
    /// that takes another context (an I/O and a reaper thread) for each further thousand.
    /// libzmq says EMFILE both for a full context and for a process out of descriptors: the
    /// second is the case when a new context cannot make a socket either.
    fn dealer_socket(&mut self) -> Result<zmq::Socket, zmq::Error> {
        for context in std::iter::once(&self.context).chain(&self.more_contexts) {
            match context.socket(zmq::DEALER) {
                Err(zmq::Error::EMFILE) => continue,
                made => return made,
            }
        }
        let context = zmq::Context::new();
        match context.socket(zmq::DEALER) {
            Ok(socket) => {
                debug!(self.log, "opened another ZeroMQ context for connections"; "contexts" => self.more_contexts.len() + 2);
                self.more_contexts.push(context);
                self.out_of_files = false;
                Ok(socket)
            }
            Err(e) => {
                if e == zmq::Error::EMFILE && !self.out_of_files {
                    warn!(self.log, "out of open files: no more connections can be opened; raise the service's open-file limit (LimitNOFILE)");
                }
                self.out_of_files = e == zmq::Error::EMFILE;
                Err(e)
            }
        }
    }

    /// The key a DEALER to `endpoint` authenticates the server with; None in plain mode.
    fn server_key_for(&self, endpoint: &str) -> Option<Key> {
        let keys = self.curve.as_ref()?;
        lock(&self.peer_keys)
            .get(endpoint)
            .copied()
            .or(keys.default_server)
    }

    /// Answers libzmq's questions about CURVE clients connecting to the ROUTER.
    fn answer_zap(&mut self) {
        let (Some(zap), Some(keys)) = (&self.zap, &self.curve) else {
            return;
        };
        while let Ok(request) = zap.recv_multipart(zmq::DONTWAIT) {
            let answer = curve::answer_zap(&request, &keys.trusted);
            if answer.accepted {
                debug!(self.log, "CURVE client accepted";
                    "client_key" => &answer.client, "address" => &answer.address);
            } else {
                self.metrics.curve_refused();
                let refusals = &mut self.refusals;
                let due = match refusals.last_warning {
                    None => true,
                    Some(at) => at.elapsed() >= REFUSAL_WARN_EVERY,
                };
                if due {
                    warn!(self.log, "CURVE client refused: its key is not in rpc.curve.trusted_clients";
                        "client_key" => &answer.client, "address" => &answer.address,
                        "refused_since_last_warning" => refusals.unreported);
                    refusals.last_warning = Some(Instant::now());
                    refusals.unreported = 0;
                } else {
                    refusals.unreported += 1;
                    debug!(self.log, "CURVE client refused";
                        "client_key" => &answer.client, "address" => &answer.address);
                }
            }
            if let Err(e) = zap.send_multipart(answer.reply, zmq::DONTWAIT) {
                warn!(self.log, "ZAP answer not delivered"; "error" => %e);
            }
        }
    }

    /// Takes up to ACK_BATCH requests from the ROUTER and acknowledges the casts among them;
    /// true when more are waiting.
    fn drain_router(&mut self) -> bool {
        let Some(router) = &self.router else {
            return false;
        };
        // Casts taken in this pass, by sender, acknowledged together at the end: under load one
        // ack frame answers many casts.
        let mut acks: Vec<(Vec<u8>, Vec<Uuid>)> = Vec::new();
        // Received into these, reused, rather than into fresh vectors per frame.
        let (mut first, mut second, mut extra) = (
            zmq::Message::new(),
            zmq::Message::new(),
            zmq::Message::new(),
        );
        let mut taken = 0;
        // Whether a receive found nothing: libzmq then took every pending command of the
        // socket, so it is known to be empty unless something was sent afterwards.
        let mut emptied = false;
        while taken < ACK_BATCH {
            if router.recv(&mut first, zmq::DONTWAIT).is_err() {
                emptied = true;
                break;
            }
            taken += 1;
            // A request is two frames: the sender's identity (the ROUTER adds it) and the
            // envelope. A message's frames arrive together, so the others are there already.
            let mut parts = 1;
            if first.get_more() && router.recv(&mut second, zmq::DONTWAIT).is_ok() {
                parts = 2;
                let mut more = second.get_more();
                while more && router.recv(&mut extra, zmq::DONTWAIT).is_ok() {
                    parts += 1;
                    more = extra.get_more();
                }
            }
            if parts != 2 {
                self.metrics.dropped(DroppedFrame::Parts);
                warn!(self.log, "frame with unexpected parts dropped"; "parts" => parts);
                continue;
            }
            let (identity, payload): (&[u8], &[u8]) = (&first, &second);
            match split_batch(payload) {
                None => self.take_request(router, identity, payload, &mut acks),
                Some(Ok(frames)) => {
                    // A batch counts as many requests as it holds, and is taken whole.
                    taken += frames.len().saturating_sub(1);
                    for frame in frames {
                        self.take_request(router, identity, frame, &mut acks);
                    }
                }
                Some(Err(e)) => {
                    self.metrics.dropped(DroppedFrame::Malformed);
                    warn!(self.log, "malformed rpc frame dropped"; "error" => %e, "bytes" => payload.len());
                }
            }
        }
        let acked = !acks.is_empty();
        for (identity, ids) in acks {
            // A batch frame may take the drain past ACK_BATCH casts; an ack frame stays within
            // it, so its size stays far under any sensible rpc.max_message_bytes.
            for ids in ids.chunks(ACK_BATCH) {
                if let Ok(ack) = encode_acks(ids) {
                    // Never block the I/O task on a peer that does not read: it will time out.
                    if let Err(e) =
                        router.send_multipart([identity.as_slice(), &ack], zmq::DONTWAIT)
                    {
                        debug!(self.log, "ack not delivered"; "error" => %e);
                    }
                }
            }
        }
        if emptied && !acked {
            return false;
        }
        // Asked after the acks went out, since sending may take the wake-up of a new frame (it
        // may process the socket's commands before the I/O driver saw their signal).
        router
            .get_events()
            .is_ok_and(|events| events.contains(zmq::POLLIN))
    }

    /// Takes one request frame from `identity`: hands it to the serving task and notes the
    /// ack it is owed in `acks`, or answers or drops it when it cannot be taken.
    fn take_request(
        &self,
        router: &zmq::Socket,
        identity: &[u8],
        payload: &[u8],
        acks: &mut Vec<(Vec<u8>, Vec<Uuid>)>,
    ) {
        let envelope = match Envelope::from_bytes(payload) {
            Ok(envelope) => envelope,
            Err(ProtoError::Version(major)) => {
                self.metrics.dropped(DroppedFrame::Version);
                // Another major version: say so, so the sender fails at once and clearly.
                if let Some(header) = Header::peek(payload) {
                    self.metrics.sent("", Kind::Reply);
                    refuse(
                        router,
                        identity,
                        &header,
                        "VersionMismatch",
                        format!("this service speaks protocol {PROTOCOL_MAJOR}.x, not {major}.x"),
                    );
                }
                warn!(self.log, "frame of another protocol major version refused"; "major" => major);
                return;
            }
            Err(e) => {
                self.metrics.dropped(DroppedFrame::Malformed);
                warn!(self.log, "malformed rpc frame dropped"; "error" => %e, "bytes" => payload.len());
                return;
            }
        };
        if !matches!(envelope.kind, Kind::Cast | Kind::Call) {
            self.metrics.dropped(DroppedFrame::Kind);
            warn!(self.log, "unexpected frame kind on the service socket dropped"; "kind" => ?envelope.kind);
            return;
        }
        self.metrics.received(&envelope.method, envelope.kind);
        let header = Header {
            version: envelope.version,
            msg_id: envelope.msg_id,
            kind: envelope.kind,
        };
        let Some(incoming) = &self.incoming else {
            // Stopping: say so, so the sender moves on to another peer at once instead of
            // waiting out its timeout.
            self.metrics.sent(&envelope.method, Kind::Reply);
            refuse(
                router,
                identity,
                &header,
                UNAVAILABLE,
                "the service is stopping".into(),
            );
            return;
        };
        if envelope.kind == Kind::Call && envelope.context.expired() {
            // The caller has given up: answer, but do not hand over work nobody waits for.
            let message = format!("{} arrived after its deadline", envelope.method);
            self.metrics.sent(&envelope.method, Kind::Reply);
            refuse(router, identity, &header, "DeadlineExceeded", message);
            return;
        }
        let mut envelope = envelope;
        if envelope.kind == Kind::Cast {
            // A cast's deadline is for its delivery, which the ack now ends: the work it
            // starts here (and the requests that work sends) has its own timeouts.
            envelope.context.deadline_ms = None;
        }
        let (msg_id, is_cast) = (envelope.msg_id, envelope.kind == Kind::Cast);
        let method = self.metrics.method_label(&envelope.method);
        let request = Incoming {
            envelope,
            identity: identity.to_vec(),
            commands: self.commands.clone(),
            metrics: self.metrics.clone(),
            max_message_bytes: self.options.max_message_bytes,
            replied: false,
        };
        match incoming.send(request) {
            // A cast is acknowledged once the service's receiver has it; a call's answer
            // is its reply.
            Ok(()) if is_cast => {
                self.metrics.sent(method, Kind::Ack);
                match acks.iter_mut().find(|(to, _)| to.as_slice() == identity) {
                    Some((_, ids)) => ids.push(msg_id),
                    None => acks.push((identity.to_vec(), vec![msg_id])),
                }
            }
            Ok(()) => {}
            Err(mpsc::error::SendError(mut request)) => {
                // The service loop has stopped; the call's Drop would answer through a
                // socket owned by this thread, so mark it answered and let the caller time
                // out.
                request.replied = true;
            }
        }
    }

    fn drain_dealer(&mut self, endpoint: &str) {
        let Some(dealer) = self.dealers.get(endpoint) else {
            return;
        };
        let mut answers = Vec::new();
        let mut refused = Vec::new();
        let mut frame = zmq::Message::new();
        while dealer.socket.recv(&mut frame, zmq::DONTWAIT).is_ok() {
            let bytes: &[u8] = &frame;
            match Envelope::from_bytes(bytes) {
                Ok(envelope) => answers.push(envelope),
                // A peer of another major version refusing what we sent: its header is the
                // one part every version shares, so the request can end now.
                Err(ProtoError::Version(major)) => match Header::peek(bytes) {
                    Some(header) if header.kind == Kind::Reply => refused.push((header, major)),
                    _ => {
                        self.metrics.dropped(DroppedFrame::Version);
                        warn!(self.log, "answer of another protocol version dropped"; "peer" => endpoint, "major" => major)
                    }
                },
                Err(e) => {
                    self.metrics.dropped(DroppedFrame::Malformed);
                    warn!(self.log, "malformed answer dropped"; "peer" => endpoint, "error" => %e)
                }
            }
        }
        if answers
            .iter()
            .any(|answer| answer.version.1 >= BATCHES_SINCE_MINOR)
        {
            if let Some(dealer) = self.dealers.get_mut(endpoint) {
                dealer.batches = true;
            }
        }
        for (header, major) in refused {
            let err = ProtoError::Refused {
                endpoint: endpoint.to_string(),
                reason: format!("it speaks protocol {major}.x, this service {PROTOCOL_MAJOR}.x"),
            };
            let answered = self.complete(header.msg_id, Err(err));
            self.count_answer(answered, Kind::Reply);
        }
        for envelope in answers {
            match envelope.kind {
                Kind::Ack => {
                    let mut ids = Vec::new();
                    if !envelope.payload.is_empty() {
                        match decode_ack_ids(&envelope.payload) {
                            Ok(more) => ids = more,
                            Err(e) => {
                                self.metrics.dropped(DroppedFrame::Malformed);
                                warn!(self.log, "malformed ack dropped"; "peer" => endpoint, "error" => %e)
                            }
                        }
                    }
                    ids.push(envelope.msg_id);
                    self.complete_acks(&ids);
                }
                Kind::Reply => {
                    let answered = match decode::<ReplyBody>(&envelope.payload) {
                        Ok(body) => self.complete(envelope.msg_id, Ok(body)),
                        Err(e) => self.complete(envelope.msg_id, Err(e)),
                    };
                    self.count_answer(answered, Kind::Reply);
                }
                kind => {
                    self.metrics.dropped(DroppedFrame::Kind);
                    warn!(self.log, "unexpected frame kind from a peer dropped"; "kind" => ?kind)
                }
            }
        }
    }

    /// Counts an ack or reply received: under its request's method, or as late when nobody
    /// waited for it any more.
    fn count_answer(&self, answered: Option<&'static str>, kind: Kind) {
        match answered {
            Some(method) => self.metrics.received(method, kind),
            None => self.metrics.late_answer(),
        }
    }

    /// Ends the casts `ids` acknowledge, under one lock for the whole ack frame (one frame
    /// answers up to ACK_BATCH casts, and their callers insert under the same lock); their
    /// callers are woken after it is released.
    fn complete_acks(&self, ids: &[Uuid]) {
        let mut acked = Vec::with_capacity(ids.len());
        {
            let mut pending = lock(&self.pending);
            for id in ids {
                // A call's ack only says the peer is there; the caller keeps waiting for the
                // reply.
                if !matches!(
                    pending.requests.get(id),
                    Some(Pending {
                        waiter: Waiter::Ack(_),
                        ..
                    })
                ) {
                    continue;
                }
                if let Some(Pending {
                    waiter: Waiter::Ack(tx),
                    method,
                    ..
                }) = pending.remove(id)
                {
                    acked.push((tx, method));
                }
            }
        }
        for _ in acked.len()..ids.len() {
            self.count_answer(None, Kind::Ack);
        }
        for (tx, method) in acked {
            let _ = tx.send(Ok(()));
            self.count_answer(Some(method), Kind::Ack);
        }
    }

    /// Ends the request `msg_id` with `result`; returns its method, or None if nobody waits
    /// for it any more.
    fn complete(
        &self,
        msg_id: Uuid,
        result: Result<ReplyBody, ProtoError>,
    ) -> Option<&'static str> {
        let entry = lock(&self.pending).remove(&msg_id);
        if let Some(entry) = entry {
            // A peer that refused the message without taking it (stopping, another protocol
            // version) is a refused delivery: the caller may try another peer.
            let result = match result {
                Ok(ReplyBody::Err(err)) if REFUSALS.contains(&err.kind.as_str()) => {
                    Err(ProtoError::Refused {
                        endpoint: entry.endpoint.to_string(),
                        reason: err.to_string(),
                    })
                }
                other => other,
            };
            let method = entry.method;
            finish(entry.waiter, result);
            return Some(method);
        }
        None
    }
}

/// Answers the request `header` names with an error reply instead of taking it. Best effort,
/// never blocking: a sender that does not read will time out instead.
fn refuse(router: &zmq::Socket, identity: &[u8], header: &Header, kind: &str, message: String) {
    let error = RemoteError {
        kind: kind.into(),
        message,
    };
    if let Ok(bytes) = Envelope::refusal(header, error).and_then(|e| e.to_bytes()) {
        let _ = router.send_multipart([identity, &bytes], zmq::DONTWAIT);
    }
}

fn finish(waiter: Waiter, result: Result<ReplyBody, ProtoError>) {
    match waiter {
        Waiter::Reply(tx) => {
            let _ = tx.send(result);
        }
        Waiter::Ack(tx) => {
            // A cast is answered by a reply only when the peer refuses it (another protocol
            // version): that is an error, not an ack.
            let _ = tx.send(match result {
                Ok(ReplyBody::Err(err)) => Err(ProtoError::Remote(err)),
                other => other.map(|_| ()),
            });
        }
    }
}

/// The deadline a request to send carries: `timeout` from now, or the context's own if earlier
/// (as `RequestContext::with_deadline_in`, without copying the context).
fn deadline_in(context: &RequestContext, timeout: Duration) -> Option<u64> {
    let deadline = now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
    Some(
        context
            .deadline_ms
            .map_or(deadline, |own| own.min(deadline)),
    )
}
