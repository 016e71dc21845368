//! The MessagePack envelope every frame carries, and the request context inside it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::wire::{self, Reader};
use crate::ProtoError;

/// Major protocol version: peers with another major refuse the frame; minor versions only add
/// optional fields, which older peers ignore, or methods, which older peers answer with
/// `NoSuchMethod` (the caller then does without). 1.1: `start_spawning`. 1.2: batch frames
/// ([`write_batch`]), which a peer sends only to peers that answered it as 1.2 or later.
/// 1.3: `new_run_instance` to a compute carries the fixed IP of the scheduler's claim. 1.4:
/// `build_instances` carries the request specs.
pub const PROTOCOL_MAJOR: u16 = 1;
pub const PROTOCOL_MINOR: u16 = 4;
/// The first minor version that reads batch frames.
pub(crate) const BATCHES_SINCE_MINOR: u16 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
// The names are also spelled out in `Kind::name` and `Kind::from_name`, for the fast path.
pub enum Kind {
    /// One-way request: the sender waits only for the peer's `Ack`.
    Cast,
    /// Request that expects a `Reply` with the same message id.
    Call,
    Reply,
    /// The peer's I/O task has taken the message (sent for casts and calls alike).
    Ack,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cast => "cast",
            Kind::Call => "call",
            Kind::Reply => "reply",
            Kind::Ack => "ack",
        }
    }

    fn from_name(name: &[u8]) -> Option<Kind> {
        Some(match name {
            b"cast" => Kind::Cast,
            b"call" => Kind::Call,
            b"reply" => Kind::Reply,
            b"ack" => Kind::Ack,
            _ => return None,
        })
    }
}

/// Who asked, carried from the HTTP request through every service so each log line shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestContext {
    /// `req-<uuid>`, the id returned in `x-openstack-request-id`.
    pub request_id: String,
    #[serde(default)]
    pub user_id: String,
    #[serde(default)]
    pub project_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// When the sender stops waiting for this message, in milliseconds since the Unix epoch.
    /// `Rpc` sets it on every cast and call from its timeouts unless the caller set an earlier
    /// one. A service receiving a call past its deadline answers `DeadlineExceeded` instead of
    /// doing work nobody waits for; the calls a handler makes inherit the deadline. A cast's
    /// deadline ends with its ack, so the receiver sees none.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

impl RequestContext {
    /// A context for work a service starts itself (periodic tasks, start-up).
    pub fn internal(project_id: &str) -> Self {
        RequestContext {
            request_id: new_request_id(),
            user_id: String::new(),
            project_id: project_id.to_string(),
            roles: vec!["admin".to_string()],
            deadline_ms: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == "admin")
    }

    /// This context with a deadline `timeout` from now, or its own if that is earlier.
    pub fn with_deadline_in(&self, timeout: std::time::Duration) -> Self {
        let deadline = now_ms().saturating_add(timeout.as_millis().min(u64::MAX as u128) as u64);
        RequestContext {
            deadline_ms: Some(self.deadline_ms.map_or(deadline, |own| own.min(deadline))),
            ..self.clone()
        }
    }

    /// Whether the deadline has passed (a context without one never expires).
    pub fn expired(&self) -> bool {
        self.deadline_ms
            .is_some_and(|deadline| now_ms() >= deadline)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// The part of an envelope every version shares: enough to answer a frame this peer cannot
/// otherwise read (another major version) with an error rather than silence.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Header {
    pub version: (u16, u16),
    pub msg_id: Uuid,
    pub kind: Kind,
}

impl Header {
    pub fn peek(bytes: &[u8]) -> Option<Header> {
        decode(bytes).ok()
    }
}

/// A message id unique within this process (a random prefix drawn once, then a counter) and,
/// with 64 random bits, across processes in practice. Ids only pair answers with requests, so
/// they need no per-message randomness, which costs a system call.
fn next_msg_id() -> Uuid {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| Uuid::new_v4().as_u64_pair().0);
    Uuid::from_u64_pair(prefix, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn new_request_id() -> String {
    format!("req-{}", Uuid::new_v4())
}

/// The outcome a reply carries: the method's value, or an error the caller can show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyBody {
    Ok(#[serde(with = "serde_bytes")] Vec<u8>),
    Err(RemoteError),
}

/// An error raised by the remote handler, sent back to the caller of a `call`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    /// A short class name (`NotFound`, `InvalidArgs`, `Database`, ...).
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: (u16, u16),
    pub msg_id: Uuid,
    pub kind: Kind,
    #[serde(default)]
    pub method: String,
    pub context: RequestContext,
    /// The method's arguments (for `Cast`/`Call`) or a `ReplyBody` (for `Reply`), MessagePack with
    /// named fields, decoded only by the code that knows the method.
    #[serde(with = "serde_bytes", default)]
    pub payload: Vec<u8>,
    /// Milliseconds left until the context's deadline when the message was sent. The receiver
    /// rebuilds the deadline from its own clock, so hosts whose clocks differ agree on how
    /// long a request may take.
    #[serde(default)]
    pub budget_ms: Option<u64>,
}

impl Envelope {
    pub fn request<A: Serialize>(
        kind: Kind,
        method: &str,
        context: &RequestContext,
        args: &A,
    ) -> Result<Self, ProtoError> {
        Ok(Envelope {
            version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            msg_id: next_msg_id(),
            kind,
            method: method.to_string(),
            context: context.clone(),
            payload: encode(args)?,
            budget_ms: context
                .deadline_ms
                .map(|deadline| deadline.saturating_sub(now_ms())),
        })
    }

    /// The acknowledgement of a request: only its id matters to the sender, so it carries
    /// neither method nor context (acks are the most frequent frame).
    pub fn ack(msg_id: Uuid) -> Self {
        Envelope {
            version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            msg_id,
            kind: Kind::Ack,
            method: String::new(),
            context: RequestContext::default(),
            payload: Vec::new(),
            budget_ms: None,
        }
    }

    /// The acknowledgement of several casts from one sender: the first id in `msg_id`, the
    /// others as a list in the payload.
    pub fn acks(ids: &[Uuid]) -> Result<Self, ProtoError> {
        let Some((first, others)) = ids.split_first() else {
            return Err(ProtoError::Encode("an ack for no message".into()));
        };
        let mut ack = Envelope::ack(*first);
        if !others.is_empty() {
            ack.payload = encode(others)?;
        }
        Ok(ack)
    }

    /// A refusal of a frame this peer cannot read (another major version): a reply carrying
    /// the error, which the sender reports whether it cast or called.
    pub fn refusal(header: &Header, error: RemoteError) -> Result<Self, ProtoError> {
        Ok(Envelope {
            version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            msg_id: header.msg_id,
            kind: Kind::Reply,
            method: String::new(),
            context: RequestContext::default(),
            payload: encode(&ReplyBody::Err(error))?,
            budget_ms: None,
        })
    }

    /// The acknowledgement or reply to `self`, same id and context.
    pub fn answer(&self, kind: Kind, payload: Vec<u8>) -> Self {
        Envelope {
            version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            msg_id: self.msg_id,
            kind,
            method: self.method.clone(),
            context: self.context.clone(),
            payload,
            budget_ms: None,
        }
    }

    /// The frame: the same bytes rmp-serde writes for `Envelope` (a map with field names),
    /// written by hand because every message pays for it.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        Ok(write_envelope(&Fields {
            version: self.version,
            msg_id: self.msg_id,
            kind: self.kind,
            method: &self.method,
            context: &self.context,
            deadline_ms: self.context.deadline_ms,
            payload: &self.payload,
            budget_ms: self.budget_ms,
        }))
    }

    /// Parses a frame from the network; anything malformed or of another major version is an error,
    /// never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtoError> {
        // Frames of the shape this version writes are read by hand; anything else (a newer
        // peer's extra fields, other but valid encodings, garbage) by serde, which skips what
        // it does not know and says what is wrong.
        let mut envelope: Envelope = match read_envelope(bytes) {
            Some(envelope) => envelope,
            None => decode(bytes)?,
        };
        if envelope.version.0 != PROTOCOL_MAJOR {
            return Err(ProtoError::Version(envelope.version.0));
        }
        if let Some(budget) = envelope.budget_ms {
            envelope.context.deadline_ms = Some(now_ms().saturating_add(budget));
        }
        Ok(envelope)
    }

    pub fn args<A: DeserializeOwned>(&self) -> Result<A, ProtoError> {
        decode(&self.payload)
    }
}

/// What an envelope frame holds, borrowed: a request is written from its caller's context (with
/// its own deadline) and a reply from the request's, without building an `Envelope` first.
pub(crate) struct Fields<'a> {
    pub version: (u16, u16),
    pub msg_id: Uuid,
    pub kind: Kind,
    pub method: &'a str,
    pub context: &'a RequestContext,
    /// Written in place of `context.deadline_ms`.
    pub deadline_ms: Option<u64>,
    pub payload: &'a [u8],
    pub budget_ms: Option<u64>,
}

fn put_opt_uint(buf: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => wire::put_uint(buf, value),
        None => wire::put_nil(buf),
    }
}

/// Writes `fields` as rmp-serde writes `Envelope`: the same keys in the same order, the same
/// smallest forms, so the format on the wire is the documented one whichever path wrote it.
pub(crate) fn write_envelope(fields: &Fields<'_>) -> Vec<u8> {
    let context = fields.context;
    let strings = fields.method.len()
        + context.request_id.len()
        + context.user_id.len()
        + context.project_id.len()
        + context.roles.iter().map(|r| r.len() + 5).sum::<usize>();
    let mut buf = Vec::with_capacity(128 + strings + fields.payload.len());
    wire::put_map_len(&mut buf, 7);
    wire::put_str(&mut buf, "version");
    wire::put_array_len(&mut buf, 2);
    wire::put_uint(&mut buf, fields.version.0.into());
    wire::put_uint(&mut buf, fields.version.1.into());
    wire::put_str(&mut buf, "msg_id");
    wire::put_bin(&mut buf, fields.msg_id.as_bytes());
    wire::put_str(&mut buf, "kind");
    wire::put_str(&mut buf, fields.kind.name());
    wire::put_str(&mut buf, "method");
    wire::put_str(&mut buf, fields.method);
    wire::put_str(&mut buf, "context");
    wire::put_map_len(&mut buf, 5);
    wire::put_str(&mut buf, "request_id");
    wire::put_str(&mut buf, &context.request_id);
    wire::put_str(&mut buf, "user_id");
    wire::put_str(&mut buf, &context.user_id);
    wire::put_str(&mut buf, "project_id");
    wire::put_str(&mut buf, &context.project_id);
    wire::put_str(&mut buf, "roles");
    wire::put_array_len(&mut buf, context.roles.len());
    for role in &context.roles {
        wire::put_str(&mut buf, role);
    }
    wire::put_str(&mut buf, "deadline_ms");
    put_opt_uint(&mut buf, fields.deadline_ms);
    wire::put_str(&mut buf, "payload");
    wire::put_bin(&mut buf, fields.payload);
    wire::put_str(&mut buf, "budget_ms");
    put_opt_uint(&mut buf, fields.budget_ms);
    buf
}

/// Encodes a request to send: its message id and frame. The context is written as is but with
/// `deadline_ms` (the earlier of its own and the sender's timeout), without a copy of it.
pub(crate) fn encode_request<A: Serialize>(
    kind: Kind,
    method: &str,
    context: &RequestContext,
    deadline_ms: Option<u64>,
    args: &A,
) -> Result<(Uuid, Vec<u8>), ProtoError> {
    let payload = encode(args)?;
    let msg_id = next_msg_id();
    let bytes = write_envelope(&Fields {
        version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
        msg_id,
        kind,
        method,
        context,
        deadline_ms,
        payload: &payload,
        budget_ms: deadline_ms.map(|deadline| deadline.saturating_sub(now_ms())),
    });
    Ok((msg_id, bytes))
}

/// The frame acknowledging `ids` (as `Envelope::acks`): the first id in `msg_id`, the others
/// as a list in the payload.
pub(crate) fn encode_acks(ids: &[Uuid]) -> Result<Vec<u8>, ProtoError> {
    let Some((first, others)) = ids.split_first() else {
        return Err(ProtoError::Encode("an ack for no message".into()));
    };
    let mut payload = Vec::new();
    if !others.is_empty() {
        payload.reserve(5 + others.len() * 18);
        wire::put_array_len(&mut payload, others.len());
        for id in others {
            wire::put_bin(&mut payload, id.as_bytes());
        }
    }
    Ok(write_envelope(&Fields {
        version: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
        msg_id: *first,
        kind: Kind::Ack,
        method: "",
        context: &RequestContext::default(),
        deadline_ms: None,
        payload: &payload,
        budget_ms: None,
    }))
}

/// One frame carrying several envelopes to one peer: a MessagePack array of binaries, each an
/// envelope frame as sent alone. An envelope frame is a map, so the first byte tells them apart.
/// Requests that leave together in one frame cost the sockets and the kernel once, not each.
pub fn write_batch(frames: &[&[u8]]) -> Vec<u8> {
    let bytes: usize = frames.iter().map(|f| f.len() + 5).sum();
    let mut buf = Vec::with_capacity(5 + bytes);
    wire::put_array_len(&mut buf, frames.len());
    for frame in frames {
        wire::put_bin(&mut buf, frame);
    }
    buf
}

/// The envelope frames of a batch frame; None when `bytes` is not one (a single envelope).
/// A batch that is not well formed to its last byte is an error as a whole, so none of it is
/// taken.
pub fn split_batch(bytes: &[u8]) -> Option<Result<Vec<&[u8]>, ProtoError>> {
    if !matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd)) {
        return None;
    }
    let split = || -> Option<Vec<&[u8]>> {
        let mut reader = Reader::new(bytes);
        let len = reader.array_len()?;
        // Never trust a length from the wire for an allocation: each frame takes 2 bytes or more.
        let mut frames = Vec::with_capacity(len.min(bytes.len() / 2));
        for _ in 0..len {
            frames.push(reader.bin()?);
        }
        reader.is_empty().then_some(frames)
    };
    Some(split().ok_or_else(|| ProtoError::Decode("malformed batch frame".into())))
}

/// The ids an ack's payload lists after its first.
pub(crate) fn decode_ack_ids(payload: &[u8]) -> Result<Vec<Uuid>, ProtoError> {
    let fast = || -> Option<Vec<Uuid>> {
        let mut reader = Reader::new(payload);
        let len = reader.array_len()?;
        // Never trust a length from the wire for an allocation: each id takes 18 bytes.
        let mut ids = Vec::with_capacity(len.min(payload.len() / 18));
        for _ in 0..len {
            ids.push(Uuid::from_slice(reader.bin()?).ok()?);
        }
        Some(ids)
    };
    match fast() {
        Some(ids) => Ok(ids),
        None => decode(payload),
    }
}

/// Reads a frame of exactly the shape `write_envelope` writes (its keys in any order, each at
/// most once, in the forms rmp-serde writes); None for anything else, which serde then reads
/// or refuses. Never panics.
fn read_envelope(bytes: &[u8]) -> Option<Envelope> {
    let mut reader = Reader::new(bytes);
    let fields = reader.map_len()?;
    let mut seen = 0u8;
    let (mut version, mut msg_id, mut kind, mut context) = (None, None, None, None);
    let (mut method, mut payload, mut budget_ms) = (String::new(), Vec::new(), None);
    for _ in 0..fields {
        let bit = match reader.raw_str()? {
            b"version" => 1,
            b"msg_id" => 2,
            b"kind" => 4,
            b"method" => 8,
            b"context" => 16,
            b"payload" => 32,
            b"budget_ms" => 64,
            // A field of a newer minor version: serde skips it.
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match bit {
            1 => {
                if reader.array_len()? != 2 {
                    return None;
                }
                let major = u16::try_from(reader.uint()?).ok()?;
                let minor = u16::try_from(reader.uint()?).ok()?;
                version = Some((major, minor));
            }
            2 => msg_id = Some(Uuid::from_slice(reader.bin()?).ok()?),
            4 => kind = Some(Kind::from_name(reader.raw_str()?)?),
            8 => method = reader.str()?.to_owned(),
            16 => context = Some(read_context(&mut reader)?),
            32 => payload = reader.bin()?.to_vec(),
            _ => budget_ms = reader.opt_uint()?,
        }
    }
    Some(Envelope {
        version: version?,
        msg_id: msg_id?,
        kind: kind?,
        method,
        context: context?,
        payload,
        budget_ms,
    })
}

fn read_context(reader: &mut Reader<'_>) -> Option<RequestContext> {
    let fields = reader.map_len()?;
    let mut seen = 0u8;
    let mut request_id = None;
    let mut context = RequestContext::default();
    for _ in 0..fields {
        let bit = match reader.raw_str()? {
            b"request_id" => 1,
            b"user_id" => 2,
            b"project_id" => 4,
            b"roles" => 8,
            b"deadline_ms" => 16,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match bit {
            1 => request_id = Some(reader.str()?.to_owned()),
            2 => context.user_id = reader.str()?.to_owned(),
            4 => context.project_id = reader.str()?.to_owned(),
            8 => {
                let len = reader.array_len()?;
                // Each role takes at least one byte, so a lying length fails before it costs.
                let mut roles = Vec::with_capacity(len.min(16));
                for _ in 0..len {
                    roles.push(reader.str()?.to_owned());
                }
                context.roles = roles;
            }
            _ => context.deadline_ms = reader.opt_uint()?,
        }
    }
    context.request_id = request_id?;
    Some(context)
}

/// MessagePack with field names, so a newer peer's extra optional fields are ignored.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ProtoError> {
    rmp_serde::to_vec_named(value).map_err(|e| ProtoError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    rmp_serde::from_slice(bytes).map_err(|e| ProtoError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ArgsV1 {
        name: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct ArgsV2 {
        name: String,
        #[serde(default)]
        color: Option<String>,
    }

    #[test]
    fn a_batch_frame_splits_into_the_frames_it_was_written_from() {
        let envelopes: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                let args = ArgsV1 {
                    name: "x".repeat(i),
                };
                Envelope::request(Kind::Cast, "m", &ctx(), &args)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
            })
            .collect();
        let frames: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
        for count in [1, 15, 16, 300] {
            let batch = write_batch(&frames[..count]);
            let split = split_batch(&batch).expect("a batch").expect("well formed");
            assert_eq!(split, frames[..count]);
        }
        // A single envelope is not a batch, so every 1.x frame reads as it did.
        assert!(split_batch(frames[0]).is_none());
        // Cut anywhere, or with bytes after its last frame, a batch is refused whole.
        let batch = write_batch(&frames[..3]);
        for cut in 1..batch.len() {
            assert!(
                matches!(split_batch(&batch[..cut]), Some(Err(_))),
                "cut at {cut}"
            );
        }
        let mut longer = batch.clone();
        longer.push(0xc0);
        assert!(matches!(split_batch(&longer), Some(Err(_))));
    }

    #[test]
    fn one_ack_answers_many_casts() {
        let ids: Vec<Uuid> = (0..5).map(|_| next_msg_id()).collect();
        let ack = Envelope::from_bytes(&Envelope::acks(&ids).unwrap().to_bytes().unwrap()).unwrap();
        assert_eq!((ack.kind, ack.msg_id), (Kind::Ack, ids[0]));
        assert_eq!(decode::<Vec<Uuid>>(&ack.payload).unwrap(), ids[1..]);
        let single = Envelope::acks(&ids[..1]).unwrap();
        assert!(single.payload.is_empty());
        assert!(Envelope::acks(&[]).is_err());
        assert_ne!(next_msg_id(), next_msg_id());
    }

    #[test]
    fn a_deadline_travels_as_time_left_not_as_a_clock_reading() {
        let sender = ctx().with_deadline_in(std::time::Duration::from_secs(10));
        let mut env =
            Envelope::request(Kind::Call, "m", &sender, &ArgsV1 { name: "x".into() }).unwrap();
        // A sender whose clock runs an hour behind: its absolute reading means nothing here.
        env.context.deadline_ms = Some(1);
        let back = Envelope::from_bytes(&env.to_bytes().unwrap()).unwrap();
        let left = back.context.deadline_ms.unwrap().saturating_sub(now_ms());
        assert!((9_000..=10_000).contains(&left), "{left} ms left");
        assert!(!back.context.expired());
    }

    #[test]
    fn deadlines_only_move_earlier_and_expire() {
        let open = ctx();
        assert!(!open.expired());
        let soon = open.with_deadline_in(std::time::Duration::from_secs(60));
        let later = soon.with_deadline_in(std::time::Duration::from_secs(3600));
        assert_eq!(
            later.deadline_ms, soon.deadline_ms,
            "a later deadline does not extend"
        );
        assert!(!soon.expired());
        let past = RequestContext {
            deadline_ms: Some(now_ms() - 1),
            ..ctx()
        };
        assert!(past.expired());
    }

    #[test]
    fn a_newer_major_version_can_still_be_answered() {
        let mut env =
            Envelope::request(Kind::Cast, "m", &ctx(), &ArgsV1 { name: "x".into() }).unwrap();
        env.version = (PROTOCOL_MAJOR + 1, 0);
        let bytes = env.to_bytes().unwrap();
        assert!(Envelope::from_bytes(&bytes).is_err());
        let header = Header::peek(&bytes).expect("the shared header");
        assert_eq!((header.msg_id, header.kind), (env.msg_id, Kind::Cast));
        let refusal = Envelope::refusal(
            &header,
            RemoteError {
                kind: "VersionMismatch".into(),
                message: "speaks 2".into(),
            },
        )
        .unwrap();
        let back = Envelope::from_bytes(&refusal.to_bytes().unwrap()).unwrap();
        assert_eq!(back.kind, Kind::Reply);
        assert_eq!(back.msg_id, env.msg_id);
        assert!(Header::peek(b"\x93garbage").is_none());
    }

    fn ctx() -> RequestContext {
        RequestContext {
            request_id: "req-1".into(),
            user_id: "u".into(),
            project_id: "p".into(),
            roles: vec!["member".into()],
            deadline_ms: None,
        }
    }

    #[test]
    fn envelope_round_trips() {
        let env = Envelope::request(Kind::Call, "ping", &ctx(), &ArgsV1 { name: "a".into() })
            .expect("encode");
        let back = Envelope::from_bytes(&env.to_bytes().expect("bytes")).expect("decode");
        assert_eq!(back, env);
        assert_eq!(
            back.args::<ArgsV1>().expect("args"),
            ArgsV1 { name: "a".into() }
        );
    }

    #[test]
    fn newer_peer_fields_are_ignored_and_missing_optionals_default() {
        let newer = ArgsV2 {
            name: "x".into(),
            color: Some("red".into()),
        };
        let old: ArgsV1 = decode(&encode(&newer).expect("encode")).expect("old peer decodes");
        assert_eq!(old.name, "x");
        let from_old: ArgsV2 = decode(&encode(&old).expect("encode")).expect("new peer decodes");
        assert_eq!(from_old.color, None);
    }

    #[test]
    fn garbage_and_wrong_major_are_errors() {
        assert!(Envelope::from_bytes(b"\xc1\xff not msgpack").is_err());
        assert!(Envelope::from_bytes(&[]).is_err());
        let mut env = Envelope::request(Kind::Cast, "m", &ctx(), &()).expect("encode");
        env.version = (PROTOCOL_MAJOR + 1, 0);
        match Envelope::from_bytes(&env.to_bytes().expect("bytes")) {
            Err(ProtoError::Version(v)) => assert_eq!(v, PROTOCOL_MAJOR + 1),
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    /// Contexts and envelopes of every shape the fast path writes: empty and long strings,
    /// many roles, with and without deadlines, small and large payloads.
    fn samples() -> Vec<Envelope> {
        let long = "x".repeat(300);
        let mut out = Vec::new();
        for (roles, deadline) in [(0, None), (1, Some(5)), (20, Some(u64::MAX))] {
            for kind in [Kind::Cast, Kind::Call, Kind::Reply, Kind::Ack] {
                let context = RequestContext {
                    request_id: long.clone(),
                    user_id: String::new(),
                    project_id: "p".into(),
                    roles: (0..roles).map(|i| format!("role-{i}")).collect(),
                    deadline_ms: deadline,
                };
                let mut env = Envelope::request(kind, "m", &context, &vec![7u8; 70_000]).unwrap();
                env.budget_ms = deadline.map(|d| d / 2);
                out.push(env.clone());
                env.payload.clear();
                env.method = long.clone();
                out.push(env);
            }
        }
        out.push(Envelope::ack(next_msg_id()));
        out
    }

    #[test]
    fn the_fast_path_writes_what_serde_writes_and_reads_it_back() {
        for env in samples() {
            let bytes = env.to_bytes().unwrap();
            assert_eq!(bytes, encode(&env).unwrap(), "{env:?}");
            assert_eq!(read_envelope(&bytes), Some(env.clone()));
            let serde: Envelope = decode(&bytes).unwrap();
            assert_eq!(serde, env);
        }
        let ids: Vec<Uuid> = (0..20).map(|_| next_msg_id()).collect();
        let fast = encode_acks(&ids).unwrap();
        assert_eq!(fast, Envelope::acks(&ids).unwrap().to_bytes().unwrap());
        let ack = Envelope::from_bytes(&fast).unwrap();
        assert_eq!(decode_ack_ids(&ack.payload).unwrap(), ids[1..]);
        assert_eq!(decode_ack_ids(&encode(&ids).unwrap()).unwrap(), ids);
        assert!(decode_ack_ids(b"\x92\xc4\x01").is_err());
    }

    #[test]
    fn a_request_is_written_with_its_own_deadline_and_no_copy_of_the_context() {
        let context = ctx();
        let (msg_id, bytes) =
            encode_request(Kind::Cast, "m", &context, Some(now_ms() + 60_000), &()).unwrap();
        let env = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(
            (env.msg_id, env.kind, env.method.as_str()),
            (msg_id, Kind::Cast, "m")
        );
        assert_eq!(env.context.request_id, context.request_id);
        let left = env.context.deadline_ms.unwrap().saturating_sub(now_ms());
        assert!((50_000..=60_000).contains(&left), "{left} ms left");
    }

    /// A newer minor version's envelope: extra fields, at the top and in the context, in
    /// another order. The fast path leaves it to serde, which ignores what it does not know.
    #[derive(Serialize)]
    struct NewerContext {
        trace_id: String,
        request_id: String,
        roles: Vec<String>,
    }

    #[derive(Serialize)]
    struct NewerEnvelope {
        priority: u8,
        kind: Kind,
        #[serde(with = "serde_bytes")]
        msg_id: Vec<u8>,
        version: (u16, u16),
        context: NewerContext,
        method: String,
    }

    #[test]
    fn a_newer_minor_version_with_extra_fields_still_decodes() {
        let id = next_msg_id();
        let newer = NewerEnvelope {
            priority: 3,
            kind: Kind::Call,
            msg_id: id.as_bytes().to_vec(),
            version: (PROTOCOL_MAJOR, PROTOCOL_MINOR + 3),
            context: NewerContext {
                trace_id: "t".into(),
                request_id: "req-9".into(),
                roles: vec!["admin".into()],
            },
            method: "ping".into(),
        };
        let bytes = encode(&newer).unwrap();
        assert_eq!(read_envelope(&bytes), None, "left to serde");
        let env = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(
            (env.msg_id, env.kind, env.method.as_str()),
            (id, Kind::Call, "ping")
        );
        assert_eq!(env.context.request_id, "req-9");
        assert!(env.context.is_admin());
        assert!(env.payload.is_empty());
    }

    #[test]
    fn truncated_and_duplicated_frames_are_errors_on_both_paths() {
        let bytes = samples()[2].to_bytes().unwrap();
        for cut in 0..bytes.len().min(200) {
            assert!(Envelope::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // The same key twice: serde refuses it, so the fast path must not take it.
        let mut twice = bytes.clone();
        twice[0] = 0x88;
        twice.extend_from_slice(b"\xa4kind\xa4cast");
        assert_eq!(read_envelope(&twice), None);
        assert!(Envelope::from_bytes(&twice).is_err());
    }

    #[test]
    fn reply_body_round_trips() {
        let ok = ReplyBody::Ok(encode(&42u32).expect("encode"));
        let back: ReplyBody = decode(&encode(&ok).expect("encode")).expect("decode");
        assert_eq!(back, ok);
        let err = ReplyBody::Err(RemoteError {
            kind: "NotFound".into(),
            message: "gone".into(),
        });
        let back: ReplyBody = decode(&encode(&err).expect("encode")).expect("decode");
        assert_eq!(back, err);
    }

    /// The samples' frames, encoded once for all the property cases.
    static SAMPLE_FRAMES: std::sync::LazyLock<Vec<Vec<u8>>> = std::sync::LazyLock::new(|| {
        samples()
            .iter()
            .map(|env| env.to_bytes().expect("bytes"))
            .collect()
    });

    proptest::proptest! {
        /// The hand-written reader may only ever agree with serde: on any frame (valid ones
        /// with bytes flipped, cut or appended, and pure noise) it either declines, or reads
        /// exactly what serde reads. It never panics.
        #[test]
        fn the_fast_reader_agrees_with_serde_on_mutated_frames(
            sample in 0usize..25,
            flips in proptest::collection::vec((0usize..100_000, proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::option::of(0usize..100_000),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
        ) {
            let mut bytes = SAMPLE_FRAMES[sample % SAMPLE_FRAMES.len()].clone();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            bytes.extend(tail);
            if let Some(fast) = read_envelope(&bytes) {
                let serde: Result<Envelope, _> = decode(&bytes);
                proptest::prop_assert_eq!(serde.ok(), Some(fast));
            }
            let _ = Envelope::from_bytes(&bytes);
        }

        #[test]
        fn noise_is_never_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Some(fast) = read_envelope(&bytes) {
                let serde: Result<Envelope, _> = decode(&bytes);
                proptest::prop_assert_eq!(serde.ok(), Some(fast));
            }
            let _ = Envelope::from_bytes(&bytes);
        }
    }
}
