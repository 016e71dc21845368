//! The ZeroMQ transport: one I/O thread per `Rpc` owns every socket (the service's ROUTER and one
//! DEALER per peer), because ZeroMQ sockets must not be shared between threads. Async callers talk
//! to that thread through an inproc PUSH/PULL pair and wait on oneshot channels.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use slog::{debug, warn, Logger};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::envelope::{decode, encode, Envelope, Kind, RemoteError, ReplyBody, RequestContext};
use crate::messages::Method;
use crate::ProtoError;

/// Frames larger than this are refused by ZeroMQ before they reach the decoder.
const MAX_FRAME_BYTES: i64 = 16 * 1024 * 1024;
const CMD_ENDPOINT: &str = "inproc://zova-rpc-commands";

#[derive(Debug, Clone, Copy)]
pub struct RpcOptions {
    /// How long a cast waits for the peer's ack before it fails (the peer is down or unreachable).
    pub cast_timeout: Duration,
    /// How long a call waits for the reply.
    pub call_timeout: Duration,
}

impl Default for RpcOptions {
    fn default() -> Self {
        RpcOptions {
            cast_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(30),
        }
    }
}

enum Waiter {
    Ack(oneshot::Sender<Result<(), ProtoError>>),
    Reply(oneshot::Sender<Result<ReplyBody, ProtoError>>),
}

/// A request waiting for its ack or reply, and the peer it went to.
struct Pending {
    endpoint: String,
    waiter: Waiter,
}

type PendingMap = Arc<Mutex<HashMap<Uuid, Pending>>>;

fn lock(pending: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
    // A poisoned map only means another thread panicked mid-insert; the map itself is intact.
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes a request's entry when its caller stops waiting for any reason, a dropped future
/// included, so abandoned requests do not pile up in the map.
struct PendingGuard<'a> {
    pending: &'a PendingMap,
    msg_id: Uuid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.msg_id);
    }
}
type CommandSocket = Arc<Mutex<zmq::Socket>>;

/// A request that reached this service's ROUTER; a `call` must be answered with `reply`.
pub struct Incoming {
    pub envelope: Envelope,
    identity: Vec<u8>,
    commands: CommandSocket,
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

    fn send_reply(&mut self, body: ReplyBody) {
        if self.replied || self.envelope.kind != Kind::Call {
            self.replied = true;
            return;
        }
        self.replied = true;
        let Ok(payload) = encode(&body) else { return };
        let Ok(bytes) = self.envelope.answer(Kind::Reply, payload).to_bytes() else {
            return;
        };
        if let Ok(socket) = self.commands.lock() {
            // The I/O thread is gone only at shutdown, when nobody waits for the reply any more;
            // DONTWAIT because a PUSH without its peer would block forever.
            let _ = socket.send_multipart([&b"reply"[..], &self.identity, &bytes], zmq::DONTWAIT);
        }
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
    endpoint: Option<String>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Rpc {
    /// Starts the I/O thread. With `bind`, the service also serves requests: they arrive on the
    /// returned receiver (already acknowledged to their senders). `tcp://127.0.0.1:*` binds an
    /// ephemeral port; `endpoint()` says which.
    pub fn start(
        log: Logger,
        bind: Option<&str>,
        options: RpcOptions,
    ) -> Result<(Rpc, Option<mpsc::UnboundedReceiver<Incoming>>), ProtoError> {
        let context = zmq::Context::new();
        let command_pull = context.socket(zmq::PULL)?;
        command_pull.bind(CMD_ENDPOINT)?;
        let command_push = context.socket(zmq::PUSH)?;
        command_push.set_linger(0)?;
        command_push.set_sndhwm(0)?;
        command_push.connect(CMD_ENDPOINT)?;
        let commands: CommandSocket = Arc::new(Mutex::new(command_push));

        let (router, endpoint, incoming) = match bind {
            Some(address) => {
                let router = context.socket(zmq::ROUTER)?;
                router.set_linger(0)?;
                router.set_maxmsgsize(MAX_FRAME_BYTES)?;
                router.set_router_mandatory(true)?;
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

        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let io = IoThread {
            log: log.clone(),
            context,
            router,
            command_pull,
            dealers: HashMap::new(),
            incoming: incoming_tx,
            pending: pending.clone(),
            commands: commands.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("zova-rpc-io".into())
            .spawn(move || io.run())
            .map_err(|e| ProtoError::Thread(e.to_string()))?;
        let rpc = Rpc {
            log,
            options,
            commands,
            pending,
            endpoint,
            thread: Mutex::new(Some(thread)),
        };
        Ok((rpc, incoming_rx))
    }

    /// The endpoint the ROUTER is bound to, with the real port if `*` was asked for.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Sends a one-way request and returns once the peer has acknowledged it.
    pub async fn cast<M: Method>(
        &self,
        endpoint: &str,
        context: &RequestContext,
        args: &M,
    ) -> Result<(), ProtoError> {
        let envelope = Envelope::request(Kind::Cast, M::NAME, context, args)?;
        let (tx, rx) = oneshot::channel();
        let _guard = self.send(endpoint, &envelope, Waiter::Ack(tx))?;
        match tokio::time::timeout(self.options.cast_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProtoError::Closed),
            Err(_) => {
                // Drop the DEALER so the unacknowledged frame is not delivered later, after the
                // caller has already given up on it and maybe sent the work elsewhere.
                self.command(&[b"reset", endpoint.as_bytes()]);
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
        let envelope = Envelope::request(Kind::Call, M::NAME, context, args)?;
        let (tx, rx) = oneshot::channel();
        let _guard = self.send(endpoint, &envelope, Waiter::Reply(tx))?;
        let body = match tokio::time::timeout(self.options.call_timeout, rx).await {
            Ok(Ok(result)) => result?,
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
        envelope: &Envelope,
        waiter: Waiter,
    ) -> Result<PendingGuard<'_>, ProtoError> {
        let bytes = envelope.to_bytes()?;
        let pending = Pending {
            endpoint: endpoint.to_string(),
            waiter,
        };
        lock(&self.pending).insert(envelope.msg_id, pending);
        let guard = PendingGuard {
            pending: &self.pending,
            msg_id: envelope.msg_id,
        };
        let socket = self.commands.lock().map_err(|_| ProtoError::Closed)?;
        socket
            .send_multipart(
                [
                    &b"send"[..],
                    endpoint.as_bytes(),
                    envelope.msg_id.as_bytes(),
                    &bytes,
                ],
                zmq::DONTWAIT,
            )
            // The queue to the I/O thread is unbounded: it refuses only once it is gone.
            .map_err(|_| ProtoError::Closed)?;
        Ok(guard)
    }

    fn command(&self, frames: &[&[u8]]) {
        if let Ok(socket) = self.commands.lock() {
            if let Err(e) = socket.send_multipart(frames, zmq::DONTWAIT) {
                warn!(self.log, "rpc command not delivered to the I/O thread"; "error" => %e);
            }
        }
    }

    /// Stops taking requests: the receiver returned by `start` ends once it has delivered what was
    /// already acknowledged, and later requests go unacknowledged (to their senders this service
    /// is down). Replies to calls still go out until `shutdown`.
    pub fn stop_serving(&self) {
        self.command(&[b"close"]);
    }

    /// Stops the I/O thread and closes every socket; pending requests fail with `Closed`.
    /// Idempotent.
    pub fn shutdown(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            self.command(&[b"stop"]);
            let _ = handle.join();
        }
        lock(&self.pending).clear();
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct IoThread {
    log: Logger,
    context: zmq::Context,
    router: Option<zmq::Socket>,
    command_pull: zmq::Socket,
    dealers: HashMap<String, zmq::Socket>,
    incoming: Option<mpsc::UnboundedSender<Incoming>>,
    pending: PendingMap,
    commands: CommandSocket,
}

enum Source {
    Commands,
    Router,
    Dealer(String),
}

impl IoThread {
    fn run(mut self) {
        loop {
            let readable = match self.poll() {
                Ok(readable) => readable,
                Err(e) => {
                    warn!(self.log, "zmq poll failed"; "error" => %e);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            for source in readable {
                let keep_going = match source {
                    Source::Commands => self.drain_commands(),
                    Source::Router => {
                        self.drain_router();
                        true
                    }
                    Source::Dealer(endpoint) => {
                        self.drain_dealer(&endpoint);
                        true
                    }
                };
                if !keep_going {
                    return;
                }
            }
        }
    }

    fn poll(&self) -> Result<Vec<Source>, zmq::Error> {
        let mut sources = vec![Source::Commands];
        let mut items = vec![self.command_pull.as_poll_item(zmq::POLLIN)];
        if let Some(router) = &self.router {
            sources.push(Source::Router);
            items.push(router.as_poll_item(zmq::POLLIN));
        }
        for (endpoint, dealer) in &self.dealers {
            sources.push(Source::Dealer(endpoint.clone()));
            items.push(dealer.as_poll_item(zmq::POLLIN));
        }
        zmq::poll(&mut items, -1)?;
        let flags: Vec<bool> = items.iter().map(|item| item.is_readable()).collect();
        Ok(sources
            .into_iter()
            .zip(flags)
            .filter(|(_, readable)| *readable)
            .map(|(s, _)| s)
            .collect())
    }

    /// Returns false when asked to stop.
    fn drain_commands(&mut self) -> bool {
        while let Ok(frames) = self.command_pull.recv_multipart(zmq::DONTWAIT) {
            match frames.first().map(Vec::as_slice) {
                Some(b"stop") => return false,
                Some(b"close") => {
                    // Frames that arrive from now on are neither acknowledged nor taken, so their
                    // senders see a service that is gone; answers to taken calls still go out.
                    self.incoming = None;
                }
                Some(b"send") if frames.len() == 4 => {
                    self.send_to_peer(&frames[1], &frames[2], &frames[3]);
                }
                Some(b"reply") if frames.len() == 3 => {
                    if let Some(router) = &self.router {
                        if let Err(e) =
                            router.send_multipart([&frames[1], &frames[2]], zmq::DONTWAIT)
                        {
                            // The caller went away (ROUTER_MANDATORY says so); it has timed out.
                            debug!(self.log, "reply not delivered"; "error" => %e);
                        }
                    }
                }
                Some(b"reset") if frames.len() == 2 => {
                    let endpoint = String::from_utf8_lossy(&frames[1]).into_owned();
                    self.dealers.remove(&endpoint);
                    // Whatever else was in flight on that DEALER can no longer be answered:
                    // tell those callers now rather than at their own timeouts.
                    self.fail_all_to(&endpoint);
                }
                _ => warn!(self.log, "malformed rpc command dropped"),
            }
        }
        true
    }

    fn send_to_peer(&mut self, endpoint: &[u8], msg_id: &[u8], bytes: &[u8]) {
        let endpoint = String::from_utf8_lossy(endpoint).into_owned();
        let msg_id = Uuid::from_slice(msg_id).unwrap_or_default();
        let result = self
            .dealer(&endpoint)
            .and_then(|d| d.send(bytes, zmq::DONTWAIT));
        if let Err(e) = result {
            let err = ProtoError::SendFailed {
                endpoint,
                reason: e.to_string(),
            };
            self.complete(msg_id, Err(err));
        }
    }

    fn dealer(&mut self, endpoint: &str) -> Result<&zmq::Socket, zmq::Error> {
        if !self.dealers.contains_key(endpoint) {
            let dealer = self.context.socket(zmq::DEALER)?;
            dealer.set_linger(0)?;
            dealer.set_maxmsgsize(MAX_FRAME_BYTES)?;
            dealer.connect(endpoint)?;
            self.dealers.insert(endpoint.to_string(), dealer);
        }
        self.dealers.get(endpoint).ok_or(zmq::Error::EINVAL)
    }

    fn drain_router(&mut self) {
        let Some(router) = &self.router else { return };
        while let Ok(frames) = router.recv_multipart(zmq::DONTWAIT) {
            let [identity, payload] = frames.as_slice() else {
                warn!(self.log, "frame with unexpected parts dropped"; "parts" => frames.len());
                continue;
            };
            let envelope = match Envelope::from_bytes(payload) {
                Ok(envelope) => envelope,
                Err(e) => {
                    warn!(self.log, "malformed rpc frame dropped"; "error" => %e, "bytes" => payload.len());
                    continue;
                }
            };
            if !matches!(envelope.kind, Kind::Cast | Kind::Call) {
                warn!(self.log, "unexpected frame kind on the service socket dropped"; "kind" => ?envelope.kind);
                continue;
            }
            let Some(incoming) = &self.incoming else {
                continue;
            };
            if let Ok(ack) = envelope.answer(Kind::Ack, Vec::new()).to_bytes() {
                // Never block the I/O thread on a peer that does not read: it will time out.
                if let Err(e) = router.send_multipart([identity.as_slice(), &ack], zmq::DONTWAIT) {
                    debug!(self.log, "ack not delivered"; "error" => %e);
                }
            }
            let request = Incoming {
                envelope,
                identity: identity.clone(),
                commands: self.commands.clone(),
                replied: false,
            };
            if let Err(mpsc::error::SendError(mut request)) = incoming.send(request) {
                // The service loop has stopped; the call's Drop would answer through a socket
                // owned by this thread, so mark it answered and let the caller time out.
                request.replied = true;
            }
        }
    }

    fn drain_dealer(&mut self, endpoint: &str) {
        let Some(dealer) = self.dealers.get(endpoint) else {
            return;
        };
        let mut answers = Vec::new();
        while let Ok(bytes) = dealer.recv_bytes(zmq::DONTWAIT) {
            match Envelope::from_bytes(&bytes) {
                Ok(envelope) => answers.push(envelope),
                Err(e) => {
                    warn!(self.log, "malformed answer dropped"; "peer" => endpoint, "error" => %e)
                }
            }
        }
        for envelope in answers {
            match envelope.kind {
                Kind::Ack => self.complete_ack(envelope.msg_id),
                Kind::Reply => match decode::<ReplyBody>(&envelope.payload) {
                    Ok(body) => self.complete(envelope.msg_id, Ok(body)),
                    Err(e) => self.complete(envelope.msg_id, Err(e)),
                },
                kind => {
                    warn!(self.log, "unexpected frame kind from a peer dropped"; "kind" => ?kind)
                }
            }
        }
    }

    fn complete_ack(&self, msg_id: Uuid) {
        let mut pending = lock(&self.pending);
        // A call's ack only says the peer is there; the caller keeps waiting for the reply.
        if matches!(
            pending.get(&msg_id),
            Some(Pending {
                waiter: Waiter::Ack(_),
                ..
            })
        ) {
            if let Some(Pending {
                waiter: Waiter::Ack(tx),
                ..
            }) = pending.remove(&msg_id)
            {
                let _ = tx.send(Ok(()));
            }
        }
    }

    fn complete(&self, msg_id: Uuid, result: Result<ReplyBody, ProtoError>) {
        let entry = lock(&self.pending).remove(&msg_id);
        if let Some(entry) = entry {
            finish(entry.waiter, result);
        }
    }

    fn fail_all_to(&self, endpoint: &str) {
        let failed: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<Uuid> = pending
                .iter()
                .filter(|(_, p)| p.endpoint == endpoint)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for entry in failed {
            let err = ProtoError::SendFailed {
                endpoint: endpoint.to_string(),
                reason: "the connection was reset after another request to it timed out".into(),
            };
            finish(entry.waiter, Err(err));
        }
    }
}

fn finish(waiter: Waiter, result: Result<ReplyBody, ProtoError>) {
    match waiter {
        Waiter::Reply(tx) => {
            let _ = tx.send(result);
        }
        Waiter::Ack(tx) => {
            let _ = tx.send(result.map(|_| ()));
        }
    }
}
