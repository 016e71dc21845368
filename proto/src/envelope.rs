//! The MessagePack envelope every frame carries, and the request context inside it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::ProtoError;

/// Major protocol version: peers with another major refuse the frame; minor versions only add
/// optional fields, which older peers ignore.
pub const PROTOCOL_MAJOR: u16 = 1;
pub const PROTOCOL_MINOR: u16 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One-way request: the sender waits only for the peer's `Ack`.
    Cast,
    /// Request that expects a `Reply` with the same message id.
    Call,
    Reply,
    /// The peer's I/O thread has taken the message (sent for casts and calls alike).
    Ack,
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

    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        encode(self)
    }

    /// Parses a frame from the network; anything malformed or of another major version is an error,
    /// never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut envelope: Envelope = decode(bytes)?;
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
}
