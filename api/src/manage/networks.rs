//! `network`: the fixed-IP networks instances draw their address from, as nova-network's
//! `nova-manage network create|list|delete` kept them. A network is an IPv4 range with a
//! gateway and, optionally, the host bridge its guests join (without one, a guest gets QEMU's
//! user-mode NIC).

use clap::Subcommand;
use serde_json::{json, Value};

use db::{Db, NetworkUsage};

use super::{json_text, table, Format, ManageError};

/// Linux caps interface names at 15 bytes (IFNAMSIZ 16 with the NUL).
const MAX_BRIDGE_LEN: usize = 15;
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Subcommand)]
pub(super) enum NetworkCommand {
    /// Creates a network and its pool: every host address of the range but the gateway.
    Create {
        name: String,
        /// The IPv4 range, e.g. 10.1.0.0/24 (prefix 16 to 30).
        #[arg(long)]
        cidr: String,
        /// The gateway guests route through (default: the first host address).
        #[arg(long)]
        gateway: Option<String>,
        /// The host bridge guests join (default: none, QEMU's user-mode NIC).
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Lists the networks with the size of their pool and the addresses in use.
    List,
    /// Deletes a network; refused while an instance holds one of its addresses.
    Delete { name: String },
}

pub(super) fn run(db: &Db, command: NetworkCommand, format: Format) -> Result<String, ManageError> {
    match command {
        NetworkCommand::Create {
            name,
            cidr,
            gateway,
            bridge,
        } => {
            check_name(&name)?;
            if let Some(bridge) = &bridge {
                check_bridge(bridge)?;
            }
            let gateway = match gateway {
                Some(gateway) => gateway,
                None => first_host(&cidr)?,
            };
            db.network_create(&name, &cidr, &gateway, bridge.as_deref())?;
            let created = db
                .network_usage()?
                .into_iter()
                .filter(|u| u.network.name == name)
                .collect::<Vec<_>>();
            Ok(match format {
                Format::Json => json_text(created.first().map(view).as_ref().unwrap_or(&json!({}))),
                Format::Table => output(&created, format),
            })
        }
        NetworkCommand::List => Ok(output(&db.network_usage()?, format)),
        NetworkCommand::Delete { name } => {
            let deleted = db.network_delete(&name)?;
            Ok(match format {
                Format::Json => json_text(&json!({
                    "name": deleted.name, "cidr": deleted.cidr, "deleted": true,
                })),
                Format::Table => format!("deleted network {} ({})\n", deleted.name, deleted.cidr),
            })
        }
    }
}

fn check_name(name: &str) -> Result<(), ManageError> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_NAME_LEN
        || name.chars().any(char::is_control)
    {
        return Err(ManageError::Invalid(format!(
            "network name {name:?} must be 1 to {MAX_NAME_LEN} characters without control characters"
        )));
    }
    Ok(())
}

/// A name Linux takes for an interface: what ends up in the domain XML as `<source bridge>`.
fn check_bridge(bridge: &str) -> Result<(), ManageError> {
    let valid = !bridge.is_empty()
        && bridge.len() <= MAX_BRIDGE_LEN
        && bridge != "."
        && bridge != ".."
        && bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(ManageError::Invalid(format!(
            "bridge {bridge:?} is not an interface name (1 to {MAX_BRIDGE_LEN} of a-z, A-Z, 0-9, '-', '_', '.')"
        )));
    }
    Ok(())
}

/// The first host address of `cidr`, the usual gateway; the database checks the range itself.
fn first_host(cidr: &str) -> Result<String, ManageError> {
    let base = cidr.split_once('/').map_or(cidr, |(base, _)| base);
    let base: std::net::Ipv4Addr = base
        .parse()
        .map_err(|_| ManageError::Invalid(format!("network {cidr}: not an IPv4 address/prefix")))?;
    Ok(std::net::Ipv4Addr::from(u32::from(base).saturating_add(1)).to_string())
}

fn view(usage: &NetworkUsage) -> Value {
    let n = &usage.network;
    json!({
        "name": n.name,
        "cidr": n.cidr,
        "gateway": n.gateway,
        "bridge": n.bridge,
        "addresses": usage.pool,
        "in_use": usage.held,
        "free": usage.pool - usage.held,
    })
}

fn output(networks: &[NetworkUsage], format: Format) -> String {
    match format {
        Format::Json => json_text(&Value::Array(networks.iter().map(view).collect())),
        Format::Table => table(
            &[
                "NAME",
                "CIDR",
                "GATEWAY",
                "BRIDGE",
                "ADDRESSES",
                "IN_USE",
                "FREE",
            ],
            networks.iter().map(|u| {
                vec![
                    u.network.name.clone(),
                    u.network.cidr.clone(),
                    u.network.gateway.clone(),
                    u.network
                        .bridge
                        .clone()
                        .unwrap_or_else(|| "(user-mode)".into()),
                    u.pool.to_string(),
                    u.held.to_string(),
                    (u.pool - u.held).to_string(),
                ]
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&db::test_database_url(dir.path()).unwrap()).unwrap();
        (dir, db)
    }

    fn create(
        db: &Db,
        name: &str,
        cidr: &str,
        bridge: Option<&str>,
    ) -> Result<String, ManageError> {
        run(
            db,
            NetworkCommand::Create {
                name: name.into(),
                cidr: cidr.into(),
                gateway: None,
                bridge: bridge.map(String::from),
            },
            Format::Json,
        )
    }

    #[test]
    fn create_list_delete() {
        let (_dir, db) = temp_db();
        let created: Value =
            serde_json::from_str(&create(&db, "lab", "192.168.9.0/28", Some("br-lab")).unwrap())
                .unwrap();
        assert_eq!(created["gateway"], "192.168.9.1");
        assert_eq!(created["bridge"], "br-lab");
        assert_eq!(
            (created["addresses"].as_i64(), created["free"].as_i64()),
            (Some(13), Some(13))
        );

        let listed = run(&db, NetworkCommand::List, Format::Table).unwrap();
        let lines: Vec<&str> = listed.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{listed}");
        assert!(
            lines[1].starts_with("private") && lines[1].contains("(user-mode)"),
            "{listed}"
        );
        assert!(
            lines[2].starts_with("lab") && lines[2].contains("br-lab"),
            "{listed}"
        );

        let deleted = run(
            &db,
            NetworkCommand::Delete { name: "lab".into() },
            Format::Table,
        )
        .unwrap();
        assert_eq!(deleted, "deleted network lab (192.168.9.0/28)\n");
        assert_eq!(db.networks().unwrap().len(), 1);
    }

    #[test]
    fn bad_input_changes_nothing() {
        let (_dir, db) = temp_db();
        for (name, cidr, bridge) in [
            ("", "10.5.0.0/24", None),
            ("x\u{7}", "10.5.0.0/24", None),
            ("ok", "10.5.0.0/24", Some("a/b")),
            ("ok", "10.5.0.0/24", Some("bridge-name-too-long")),
            ("ok", "10.5.0.0/24", Some("")),
            ("ok", "10.5.0.0/8", None),
            ("ok", "fd00::/64", None),
            ("ok", "nonsense", None),
            ("private", "10.5.0.0/24", None),
        ] {
            let err = create(&db, name, cidr, bridge).unwrap_err();
            assert!(
                matches!(err, ManageError::Invalid(_) | ManageError::Database(_)),
                "{name:?} {cidr} {bridge:?}: {err}"
            );
        }
        assert_eq!(db.networks().unwrap().len(), 1);
        let err = run(
            &db,
            NetworkCommand::Delete {
                name: "nope".into(),
            },
            Format::Json,
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
