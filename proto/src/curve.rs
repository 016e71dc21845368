//! CURVE keys and the ZAP decision: which configured keys are valid, and which clients a service
//! lets in. Pure functions over bytes; the transport does the socket work.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// `[rpc.curve]`: with keys set, every socket is encrypted and a service takes requests only
/// from the clients it trusts. Keys are Z85 text of 40 characters, as `zova-keygen` prints them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CurveConfig {
    /// This service's public key: its peers use it as their `server_public_key` (or register it
    /// with `Rpc::set_peer_key`) and list it in their `trusted_clients`.
    pub public_key: String,
    /// This service's secret key. Never logged; `Debug` shows only whether it is set.
    pub secret_key: String,
    /// The server key of peers that have none registered with `Rpc::set_peer_key`. Empty: every
    /// peer needs a registered key.
    pub server_public_key: String,
    /// The public keys of the clients this service takes requests from; anyone else is refused.
    pub trusted_clients: Vec<String>,
    /// Server keys of particular peers (endpoint → key), for conductors or schedulers that do not
    /// share `server_public_key`. Compute hosts register theirs in the `services` table instead.
    pub peer_keys: std::collections::BTreeMap<String, String>,
}

impl fmt::Debug for CurveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = if self.secret_key.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        };
        f.debug_struct("CurveConfig")
            .field("public_key", &self.public_key)
            .field("secret_key", &secret)
            .field("server_public_key", &self.server_public_key)
            .field("trusted_clients", &self.trusted_clients)
            .field("peer_keys", &self.peer_keys)
            .finish()
    }
}

/// A CURVE key in binary form, as ZeroMQ's socket options and ZAP requests carry it.
pub type Key = [u8; 32];

/// `CurveConfig` checked and decoded: what the transport puts on its sockets.
#[derive(Clone)]
pub(crate) struct CurveKeys {
    pub public: Key,
    pub secret: Key,
    pub default_server: Option<Key>,
    pub trusted: Vec<Key>,
}

impl CurveKeys {
    /// Checks every key, naming the bad one (never echoing it: it may be a secret).
    pub fn from_config(config: &CurveConfig) -> Result<Self, ProtoError> {
        let field = |name: &str, text: &str| {
            decode_key(text)
                .map_err(|reason| ProtoError::Config(format!("rpc.curve.{name} {reason}")))
        };
        let default_server = match config.server_public_key.as_str() {
            "" => None,
            text => Some(field("server_public_key", text)?),
        };
        let trusted = config
            .trusted_clients
            .iter()
            .enumerate()
            .map(|(i, text)| field(&format!("trusted_clients[{i}]"), text))
            .collect::<Result<_, _>>()?;
        Ok(CurveKeys {
            public: field("public_key", &config.public_key)?,
            secret: field("secret_key", &config.secret_key)?,
            default_server,
            trusted,
        })
    }
}

/// A fresh key pair as Z85 text: (public, secret).
pub fn generate_key_pair() -> Result<(String, String), ProtoError> {
    let pair = zmq::CurveKeyPair::new()?;
    Ok((encode_key(&pair.public_key), encode_key(&pair.secret_key)))
}

const Z85: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Decodes a 40-character Z85 key. ZeroMQ's own decoder takes any character, so a typo would
/// become a different key and fail only at the handshake; this one says what is wrong.
pub fn decode_key(text: &str) -> Result<Key, String> {
    let len = text.chars().count();
    if len != 40 {
        return Err(format!(
            "must be a 40-character Z85 key (as zova-keygen prints), not {len} characters"
        ));
    }
    let mut key = [0u8; 32];
    for (chunk, out) in text.as_bytes().chunks(5).zip(key.chunks_mut(4)) {
        let mut value: u64 = 0;
        for &c in chunk {
            let Some(digit) = Z85.iter().position(|&z| z == c) else {
                return Err("contains a character that is not Z85".into());
            };
            value = value * 85 + digit as u64;
        }
        let value = u32::try_from(value).map_err(|_| "is not valid Z85".to_string())?;
        out.copy_from_slice(&value.to_be_bytes());
    }
    Ok(key)
}

pub fn encode_key(key: &Key) -> String {
    let mut text = String::with_capacity(40);
    for chunk in key.chunks(4) {
        let mut value = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = Z85[(value % 85) as usize];
            value /= 85;
        }
        text.extend(digits.iter().map(|&d| d as char));
    }
    text
}

/// Enough of a public key to tell clients apart in a log line, too little to be the key.
pub fn key_prefix(key: &Key) -> String {
    encode_key(key)[..8].to_string()
}

/// A ZAP request (RFC 27) answered: the reply frames, and who was let in or refused.
pub(crate) struct ZapAnswer {
    pub reply: Vec<Vec<u8>>,
    pub accepted: bool,
    /// The first characters of the client's public key, for the log; empty if it had none.
    pub client: String,
    /// The client's IP address as the ZAP request gives it.
    pub address: String,
}

/// Lets in a CURVE client whose public key is in `trusted`; anything else gets 400.
pub(crate) fn answer_zap(request: &[Vec<u8>], trusted: &[Key]) -> ZapAnswer {
    let frame = |i: usize| request.get(i).map(Vec::as_slice).unwrap_or_default();
    let request_id = frame(1).to_vec();
    let address = String::from_utf8_lossy(frame(3)).into_owned();
    let client_key: Option<Key> = if frame(0) == b"1.0" && frame(5) == b"CURVE" {
        frame(6).try_into().ok()
    } else {
        None
    };
    let accepted = client_key.is_some_and(|key| trusted.contains(&key));
    let (status, text): (&[u8], &[u8]) = if accepted {
        (b"200", b"OK")
    } else {
        (b"400", b"client key not trusted")
    };
    ZapAnswer {
        reply: vec![
            b"1.0".to_vec(),
            request_id,
            status.to_vec(),
            text.to_vec(),
            Vec::new(),
            Vec::new(),
        ],
        accepted,
        client: client_key.as_ref().map(key_prefix).unwrap_or_default(),
        address,
    }
}

/// Whether a bind address is reachable only from this machine, where plain traffic is tolerable.
pub fn is_local_endpoint(endpoint: &str) -> bool {
    if endpoint.starts_with("inproc://") || endpoint.starts_with("ipc://") {
        return true;
    }
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return false;
    };
    let host = rest.rsplit_once(':').map_or(rest, |(host, _port)| host);
    host == "[::1]"
        || host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_zeromq_z85() {
        let pair = zmq::CurveKeyPair::new().expect("key pair");
        let text = zmq::z85_encode(&pair.public_key).expect("encode");
        assert_eq!(encode_key(&pair.public_key), text);
        assert_eq!(decode_key(&text), Ok(pair.public_key));
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let (_, secret) = generate_key_pair().expect("pair");
        let mut typo = secret.clone();
        typo.replace_range(3..4, "~");
        let short = &secret[..39];
        for bad in [
            typo.as_str(),
            short,
            "",
            "%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%",
        ] {
            let config = CurveConfig {
                public_key: generate_key_pair().expect("pair").0,
                secret_key: bad.to_string(),
                ..CurveConfig::default()
            };
            let err = CurveKeys::from_config(&config).err().expect("refused");
            let message = err.to_string();
            assert!(message.contains("rpc.curve.secret_key"), "{message}");
            if !bad.is_empty() {
                assert!(!message.contains(bad), "{message}");
            }
        }
    }

    #[test]
    fn a_bad_trusted_key_is_named_by_its_position() {
        let (public, secret) = generate_key_pair().expect("pair");
        let config = CurveConfig {
            public_key: public.clone(),
            secret_key: secret,
            server_public_key: String::new(),
            trusted_clients: vec![public, "nope".into()],
            ..Default::default()
        };
        let err = CurveKeys::from_config(&config).err().expect("refused");
        assert!(err.to_string().contains("trusted_clients[1]"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let (public, secret) = generate_key_pair().expect("pair");
        let config = CurveConfig {
            public_key: public.clone(),
            secret_key: secret.clone(),
            server_public_key: public.clone(),
            trusted_clients: vec![public.clone()],
            ..Default::default()
        };
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains(&secret), "{shown}");
        assert!(
            shown.contains(&public) && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    fn zap_request(mechanism: &[u8], credentials: &[u8]) -> Vec<Vec<u8>> {
        vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            Vec::new(),
            b"10.0.0.9".to_vec(),
            Vec::new(),
            mechanism.to_vec(),
            credentials.to_vec(),
        ]
    }

    #[test]
    fn zap_lets_in_only_trusted_curve_clients() {
        let trusted = [[1u8; 32], [2u8; 32]];
        let cases: [(&[u8], &[u8], bool); 5] = [
            (b"CURVE", &[2u8; 32], true),
            (b"CURVE", &[3u8; 32], false),
            (b"CURVE", &[2u8; 31], false),
            (b"PLAIN", &[2u8; 32], false),
            (b"NULL", b"", false),
        ];
        for (mechanism, credentials, accepted) in cases {
            let answer = answer_zap(&zap_request(mechanism, credentials), &trusted);
            assert_eq!(answer.accepted, accepted, "{mechanism:?}");
            assert_eq!(answer.reply.len(), 6);
            assert_eq!(answer.reply[1], b"7", "the request id is echoed");
            let status: &[u8] = if accepted { b"200" } else { b"400" };
            assert_eq!(answer.reply[2], status);
            assert_eq!(answer.address, "10.0.0.9");
        }
        assert!(!answer_zap(&[], &trusted).accepted, "a malformed request");
    }

    #[test]
    fn only_loopback_and_local_transports_count_as_local() {
        for local in [
            "tcp://127.0.0.1:5560",
            "tcp://127.0.0.1:*",
            "tcp://[::1]:5560",
            "tcp://localhost:5560",
            "inproc://x",
            "ipc:///run/zova.sock",
        ] {
            assert!(is_local_endpoint(local), "{local}");
        }
        for remote in [
            "tcp://0.0.0.0:5560",
            "tcp://*:5560",
            "tcp://10.0.0.1:5560",
            "tcp://[::]:5560",
            "tcp://eth0:5560",
            "tcp://127.example.com:1",
        ] {
            assert!(!is_local_endpoint(remote), "{remote}");
        }
    }
}
