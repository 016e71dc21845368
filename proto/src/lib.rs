//! Zova's messaging: point-to-point ZeroMQ (a ROUTER per service, a DEALER per peer) carrying
//! MessagePack envelopes. A `cast` returns once the peer has acknowledged the message, so a cast to
//! a dead peer fails fast; a `call` waits for the reply. No broker sits between two services.
//! With `[rpc.curve]` keys every connection is CURVE-encrypted and a service takes requests only
//! from the client keys it trusts.

pub mod curve;
pub mod envelope;
mod hash;
pub mod messages;
pub mod metrics;
pub mod peers;
pub mod service;
pub mod transport;
mod wire;

pub use curve::CurveConfig;
pub use envelope::{new_request_id, Envelope, Kind, RemoteError, RequestContext};
pub use messages::*;
pub use metrics::RpcMetrics;
pub use peers::Peers;
pub use transport::{share_one_context, Incoming, Rpc, RpcOptions};

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("cannot bind the RPC endpoint {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("ZeroMQ socket error: {0}")]
    Socket(#[from] zmq::Error),
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message of protocol major version {0} is not understood by this service")]
    Version(u16),
    /// Sent, but no ack (cast) or reply (call) came back in time: the peer is down, unreachable,
    /// does not trust this service's key, or (for a call) is slow. A timed-out cast may still have
    /// been taken if its ack was lost; a timed-out call may still run.
    #[error("{method} to {endpoint} was not answered within {waited:?}: the peer is down or unreachable")]
    Timeout {
        method: String,
        endpoint: String,
        waited: Duration,
    },
    /// Not delivered as far as this side knows, and said so at once rather than at a deadline:
    /// the in-flight limit for the peer was reached, its send queue was full, no CURVE server key
    /// is known for it, or its connection was reset (after another request to it timed out, or its
    /// key changed) while this request waited. Only in that last case can the peer have taken it.
    #[error("cannot send to {endpoint}: {reason}")]
    Refused { endpoint: String, reason: String },
    #[error("a message of {bytes} bytes is over the {limit}-byte limit (rpc.max_message_bytes)")]
    TooLarge { bytes: usize, limit: u64 },
    #[error("invalid RPC configuration: {0}")]
    Config(String),
    #[error("the remote service answered with an error: {0}")]
    Remote(RemoteError),
    #[error("the RPC transport is shut down")]
    Closed,
    #[error("cannot start the RPC I/O task: {0}")]
    Thread(String),
}

impl ProtoError {
    /// No ack or reply within the deadline; see `ProtoError::Timeout`.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtoError::Timeout { .. })
    }

    /// Refused before or without delivery; see `ProtoError::Refused`.
    pub fn is_refused(&self) -> bool {
        matches!(self, ProtoError::Refused { .. })
    }
}
