//! Zova's messaging: point-to-point ZeroMQ (a ROUTER per service, a DEALER per peer) carrying
//! MessagePack envelopes. A `cast` returns once the peer has acknowledged the message, so a cast to
//! a dead peer fails fast; a `call` waits for the reply. No broker sits between two services.

pub mod envelope;
pub mod messages;
pub mod service;
pub mod transport;

pub use envelope::{new_request_id, Envelope, Kind, RemoteError, RequestContext};
pub use messages::*;
pub use transport::{Incoming, Rpc, RpcOptions};

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
    #[error("{method} to {endpoint} was not answered within {waited:?}: the peer is down or unreachable")]
    Timeout {
        method: String,
        endpoint: String,
        waited: Duration,
    },
    #[error("cannot send to {endpoint}: {reason}")]
    SendFailed { endpoint: String, reason: String },
    #[error("the remote service answered with an error: {0}")]
    Remote(RemoteError),
    #[error("the RPC transport is shut down")]
    Closed,
    #[error("cannot start the RPC I/O thread: {0}")]
    Thread(String),
}
