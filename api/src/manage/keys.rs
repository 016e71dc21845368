//! `keys generate`: a CURVE key pair for a service's `[rpc.curve]`, as `zova-keygen` makes it.

use clap::Subcommand;
use serde_json::json;

use super::{json_text, Format, ManageError};

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Prints a fresh CURVE key pair: TOML for [rpc.curve], or JSON with --format json.
    Generate,
}

pub(super) fn run(command: KeysCommand, format: Format) -> Result<String, ManageError> {
    let KeysCommand::Generate = command;
    let (public_key, secret_key) = proto::curve::generate_key_pair().map_err(ManageError::Keys)?;
    Ok(key_pair_output(&public_key, &secret_key, format))
}

fn key_pair_output(public_key: &str, secret_key: &str, format: Format) -> String {
    match format {
        Format::Json => json_text(&json!({"public_key": public_key, "secret_key": secret_key})),
        // Z85 has no quote or backslash, so the keys go into TOML strings as they are.
        Format::Table => format!(
            "[rpc.curve]\n\
             # Give this to the service's peers: in their trusted_clients, and as their\n\
             # server_public_key (or in peer_keys) to reach this service.\n\
             public_key = \"{public_key}\"\n\
             # Only in this service's own configuration, readable by it alone.\n\
             secret_key = \"{secret_key}\"\n"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_pair_is_valid_toml_or_json_with_both_keys() {
        use figment::providers::{Format as _, Toml};
        let text = run(KeysCommand::Generate, Format::Table).unwrap();
        #[derive(serde::Deserialize)]
        struct File {
            rpc: Rpc,
        }
        #[derive(serde::Deserialize)]
        struct Rpc {
            curve: proto::CurveConfig,
        }
        let File { rpc: Rpc { curve } } = figment::Figment::from(Toml::string(&text))
            .extract()
            .unwrap();
        let public = proto::curve::decode_key(&curve.public_key).unwrap();
        proto::curve::decode_key(&curve.secret_key).unwrap();
        assert_eq!(proto::curve::encode_key(&public), curve.public_key);
        assert_ne!(curve.public_key, curve.secret_key);

        let value: serde_json::Value =
            serde_json::from_str(&run(KeysCommand::Generate, Format::Json).unwrap()).unwrap();
        for key in ["public_key", "secret_key"] {
            let text = value[key].as_str().unwrap();
            assert!(proto::curve::decode_key(text).is_ok(), "{key}: {text}");
        }
        assert_ne!(
            value["public_key"].as_str(),
            Some(curve.public_key.as_str()),
            "fresh each time"
        );
    }
}
