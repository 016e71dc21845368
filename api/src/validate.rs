//! Validation of create-server requests: bytes in, a typed request or a message for the user out.
//! Pure: no I/O, so every rule is tested directly.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use proto::SchedulerHints;

use crate::microversion::Version;

pub const MAX_NAME_LEN: usize = 255;
pub const MAX_METADATA_ITEMS: usize = 128;
/// The most instances one request may create (Nova bounds it by quota; this bounds it first).
pub const MAX_COUNT: i64 = 100;

/// A create-server request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateServer {
    pub name: String,
    pub flavor_ref: String,
    pub image_ref: String,
    pub min_count: i64,
    pub max_count: i64,
    pub metadata: BTreeMap<String, String>,
    pub hints: SchedulerHints,
    /// Answer with the reservation id instead of the first server.
    pub return_reservation_id: bool,
    /// Microversion 2.19.
    pub description: Option<String>,
    pub key_name: Option<String>,
}

/// Server fields Nova accepts that this version takes and ignores (networks, keys, ...), so the
/// standard clients' requests are not refused.
const ACCEPTED_UNUSED_SERVER_FIELDS: &[&str] = &[
    "security_groups",
    "availability_zone",
    "user_data",
    "config_drive",
    "block_device_mapping",
    "block_device_mapping_v2",
    "adminPass",
    "accessIPv4",
    "accessIPv6",
    "personality",
    "OS-DCF:diskConfig",
    "tags",
];

const HINT_KEYS: [&str; 2] = ["os:scheduler_hints", "OS-SCH-HNT:scheduler_hints"];

fn invalid(field: &str, why: impl std::fmt::Display) -> String {
    format!("Invalid input for field/attribute {field}. {why}")
}

/// Parses and checks the body of `POST /servers` at microversion `version`.
pub fn parse_create_server(body: &[u8], version: Version) -> Result<CreateServer, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| "Malformed request body".to_string())?;
    let Value::Object(top) = value else {
        return Err("Malformed request body: the body must be a JSON object".into());
    };
    if let Some(extra) = top
        .keys()
        .find(|k| *k != "server" && !HINT_KEYS.contains(&k.as_str()))
    {
        return Err(format!(
            "Additional properties are not allowed ('{extra}' was unexpected)"
        ));
    }
    let server = match top.get("server") {
        Some(Value::Object(server)) => server,
        Some(_) => return Err(invalid("server", "Value must be an object.")),
        None => return Err("'server' is a required property".into()),
    };
    let known = |k: &str| {
        matches!(
            k,
            "name"
                | "flavorRef"
                | "imageRef"
                | "min_count"
                | "max_count"
                | "metadata"
                | "return_reservation_id"
                | "networks"
                | "key_name"
        ) || ACCEPTED_UNUSED_SERVER_FIELDS.contains(&k)
            || (k == "description" && version.at_least(19))
    };
    if let Some(extra) = server.keys().find(|k| !known(k)) {
        return Err(format!(
            "Additional properties are not allowed ('{extra}' was unexpected)"
        ));
    }

    let name = parse_name(server.get("name"))?;
    let flavor_ref = parse_ref("flavorRef", server.get("flavorRef"))?;
    let image_ref = parse_ref("imageRef", server.get("imageRef"))?;
    if uuid::Uuid::parse_str(&image_ref).is_err() {
        return Err(format!(
            "Invalid imageRef provided: {image_ref} is not an image id"
        ));
    }
    let min_count = parse_count("min_count", server.get("min_count"))?.unwrap_or(1);
    let max_count = parse_count("max_count", server.get("max_count"))?.unwrap_or(min_count);
    if min_count > max_count {
        return Err(format!(
            "min_count ({min_count}) must be <= max_count ({max_count})"
        ));
    }
    let metadata = parse_metadata(server.get("metadata"))?;
    check_networks(server.get("networks"), version)?;
    let description = parse_description(server.get("description"))?;
    let key_name = match server.get("key_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if !name.is_empty() && name.len() <= 255 => Some(name.clone()),
        Some(_) => {
            return Err(invalid(
                "key_name",
                "Value must be a string of 1 to 255 characters.",
            ))
        }
    };
    let return_reservation_id = match server.get("return_reservation_id") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("return_reservation_id", "Value must be a boolean.")),
    };

    let hints =
        match (top.get(HINT_KEYS[0]), top.get(HINT_KEYS[1])) {
            (Some(_), Some(_)) => return Err(
                "Give scheduler hints once, as os:scheduler_hints or OS-SCH-HNT:scheduler_hints"
                    .into(),
            ),
            (Some(h), None) | (None, Some(h)) => parse_hints(h)?,
            (None, None) => SchedulerHints::default(),
        };
    Ok(CreateServer {
        name,
        flavor_ref,
        image_ref,
        min_count,
        max_count,
        metadata,
        hints,
        return_reservation_id,
        description,
        key_name,
    })
}

/// A server description (2.19): a string of at most 255 printable characters, or null.
pub fn parse_description(value: Option<&Value>) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.chars().count() > 255 => Err(invalid(
            "description",
            "The description is longer than 255 characters.",
        )),
        Some(Value::String(text)) if text.chars().any(|c| c.is_control()) => Err(invalid(
            "description",
            "The description must not contain control characters.",
        )),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(invalid("description", "Value must be a string or null.")),
    }
}

/// `networks`: a list of requests, and from 2.37 also "auto" or "none". Nova requires it from
/// 2.37; Zova treats a missing one as "auto", because openstacksdk's `create_server` sends none
/// at any microversion and every Zova server gets the same networking anyway. The requests are
/// checked for shape only.
fn check_networks(value: Option<&Value>, version: Version) -> Result<(), String> {
    match value {
        None => Ok(()),
        Some(Value::String(word)) if version.at_least(37) && (word == "auto" || word == "none") => {
            Ok(())
        }
        Some(Value::Array(items)) => {
            for item in items {
                let Value::Object(request) = item else {
                    return Err(invalid("networks", "Each network must be an object."));
                };
                if let Some(extra) = request
                    .keys()
                    .find(|k| !matches!(k.as_str(), "uuid" | "port" | "fixed_ip" | "tag"))
                {
                    return Err(format!(
                        "Additional properties are not allowed ('{extra}' was unexpected)"
                    ));
                }
                if let Some(uuid) = request.get("uuid") {
                    match uuid.as_str().map(uuid::Uuid::parse_str) {
                        Some(Ok(_)) => {}
                        _ => return Err(invalid("networks/uuid", "Value must be a UUID.")),
                    }
                }
            }
            Ok(())
        }
        Some(_) if version.at_least(37) => Err(invalid(
            "networks",
            "Value must be 'auto', 'none' or a list of networks.",
        )),
        Some(_) => Err(invalid("networks", "Value must be a list of networks.")),
    }
}

fn parse_name(value: Option<&Value>) -> Result<String, String> {
    let name = match value {
        Some(Value::String(name)) => name,
        Some(_) => return Err(invalid("name", "Value must be a string.")),
        None => return Err("'name' is a required property".into()),
    };
    if name.trim().is_empty() {
        return Err(invalid(
            "name",
            "The name must not be empty or only white space.",
        ));
    }
    if name.trim() != name {
        return Err(invalid(
            "name",
            "The name must not start or end with white space.",
        ));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(invalid(
            "name",
            format!("The name is longer than {MAX_NAME_LEN} characters."),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            "The name must not contain control characters.",
        ));
    }
    Ok(name.clone())
}

/// A flavor or image reference: an id, or a URL whose last path segment is the id.
fn parse_ref(field: &str, value: Option<&Value>) -> Result<String, String> {
    let raw = match value {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => {
            return Err(invalid(
                field,
                "Value must be a string or a positive integer.",
            ))
        }
        None => return Err(format!("'{field}' is a required property")),
    };
    let id = raw
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() || id.len() > 255 {
        return Err(invalid(
            field,
            "Value must be a non-empty id of at most 255 characters.",
        ));
    }
    Ok(id)
}

fn parse_count(field: &str, value: Option<&Value>) -> Result<Option<i64>, String> {
    let count = match value {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_i64(),
        // Nova also takes the count as a string of digits.
        Some(Value::String(s)) => s.parse::<i64>().ok(),
        Some(_) => None,
    };
    match count {
        Some(n) if (1..=MAX_COUNT).contains(&n) => Ok(Some(n)),
        _ => Err(invalid(
            field,
            format!("Value must be an integer from 1 to {MAX_COUNT}."),
        )),
    }
}

fn parse_metadata(value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let map = match value {
        None => return Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("metadata", "Value must be an object.")),
    };
    if map.len() > MAX_METADATA_ITEMS {
        return Err(format!(
            "Maximum number of metadata items exceeds {MAX_METADATA_ITEMS}"
        ));
    }
    let mut metadata = BTreeMap::new();
    for (key, value) in map {
        if key.is_empty() || key.chars().count() > 255 {
            return Err(invalid(
                "metadata",
                "Keys must be 1 to 255 characters long.",
            ));
        }
        let Value::String(value) = value else {
            return Err(invalid(
                "metadata",
                format!("The value of '{key}' must be a string."),
            ));
        };
        if value.chars().count() > 255 {
            return Err(invalid(
                "metadata",
                format!("The value of '{key}' is longer than 255 characters."),
            ));
        }
        metadata.insert(key.clone(), value.clone());
    }
    Ok(metadata)
}

/// A hint given as a string, or (as repeated `--hint` options send it) a list of strings.
fn hint_strings(name: &str, value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(invalid(
                    name,
                    "Value must be a string or a list of strings.",
                )),
            })
            .collect(),
        _ => Err(invalid(
            name,
            "Value must be a string or a list of strings.",
        )),
    }
}

fn single_hint(name: &str, hints: &Map<String, Value>) -> Result<Option<String>, String> {
    let Some(value) = hints.get(name) else {
        return Ok(None);
    };
    match hint_strings(name, value)?.as_slice() {
        [one] if !one.is_empty() && one.len() <= 255 => Ok(Some(one.clone())),
        _ => Err(invalid(
            name,
            "Value must be one non-empty string of at most 255 characters.",
        )),
    }
}

fn parse_hints(value: &Value) -> Result<SchedulerHints, String> {
    let Value::Object(hints) = value else {
        return Err(invalid("os:scheduler_hints", "Value must be an object."));
    };
    let scheduler_host = single_hint("scheduler_host", hints)?;
    let scheduler_host_match = single_hint("scheduler_host_match", hints)?;
    if let Some(pattern) = &scheduler_host_match {
        hostqueue::HostMatch::new(pattern).map_err(|e| invalid("scheduler_host_match", e))?;
    }
    let different_host = server_ids("different_host", hints)?;
    let same_host = server_ids("same_host", hints)?;
    let queue_name = single_hint("queue_name", hints)?;
    let boundary_host = single_hint("boundary_host", hints)?;
    let sign = match hints.get("sign") {
        None => None,
        Some(Value::Number(n)) if n.as_i64() == Some(1) => Some(1),
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => Some(-1),
        Some(Value::String(s)) if s.trim() == "1" => Some(1),
        Some(Value::String(s)) if s.trim() == "-1" => Some(-1),
        Some(_) => return Err(invalid("sign", "Value must be 1 or -1.")),
    };
    // Other hints are scheduler-specific in Nova; they are accepted and ignored here.
    Ok(SchedulerHints {
        scheduler_host,
        scheduler_host_match,
        different_host,
        same_host,
        queue_name,
        sign,
        boundary_host,
    })
}

/// A hint that names servers (`different_host`, `same_host`): one id or a list of ids.
fn server_ids(name: &str, hints: &Map<String, Value>) -> Result<Vec<String>, String> {
    let Some(value) = hints.get(name) else {
        return Ok(Vec::new());
    };
    let uuids = hint_strings(name, value)?;
    if let Some(bad) = uuids.iter().find(|u| uuid::Uuid::parse_str(u).is_err()) {
        return Err(invalid(name, format!("'{bad}' is not a server id.")));
    }
    Ok(uuids)
}

/// A server action Zova performs (`POST /servers/{id}/action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAction {
    Stop,
    Start,
    Reboot { hard: bool },
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("Malformed request body: the body must be a JSON object".into()),
        Err(_) => Err("Malformed request body".into()),
    }
}

/// Parses the body of `POST /servers/{id}/action`: exactly one action.
pub fn parse_server_action(body: &[u8]) -> Result<ServerAction, String> {
    let map = object(body)?;
    let mut actions = map.iter();
    let (Some((name, args)), None) = (actions.next(), actions.next()) else {
        return Err("The body must name exactly one action".into());
    };
    match name.as_str() {
        "os-stop" | "os-start" => {
            if !args.is_null() && args.as_object().is_none_or(|a| !a.is_empty()) {
                return Err(invalid(name, "Value must be null."));
            }
            Ok(if name == "os-stop" {
                ServerAction::Stop
            } else {
                ServerAction::Start
            })
        }
        "reboot" => {
            let Value::Object(reboot) = args else {
                return Err(invalid("reboot", "Value must be an object."));
            };
            if let Some(extra) = reboot.keys().find(|k| *k != "type") {
                return Err(format!(
                    "Additional properties are not allowed ('{extra}' was unexpected)"
                ));
            }
            match reboot.get("type").and_then(Value::as_str) {
                Some(t) if t.eq_ignore_ascii_case("SOFT") => {
                    Ok(ServerAction::Reboot { hard: false })
                }
                Some(t) if t.eq_ignore_ascii_case("HARD") => {
                    Ok(ServerAction::Reboot { hard: true })
                }
                Some(_) => Err(invalid("reboot/type", "Value must be SOFT or HARD.")),
                None => Err("'type' is a required property".into()),
            }
        }
        other => Err(format!("There is no such action: {other}")),
    }
}

/// Parses the body of `PUT /servers/{id}`: a new name, and from 2.19 a description.
pub fn parse_update_server(body: &[u8], version: Version) -> Result<db::InstanceChanges, String> {
    let top = object(body)?;
    if let Some(extra) = top.keys().find(|k| *k != "server") {
        return Err(format!(
            "Additional properties are not allowed ('{extra}' was unexpected)"
        ));
    }
    let Some(Value::Object(server)) = top.get("server") else {
        return Err("'server' is a required property and must be an object".into());
    };
    let mut changes = db::InstanceChanges::default();
    for (key, value) in server {
        match key.as_str() {
            "name" => changes.display_name = Some(parse_name(Some(value))?),
            "description" if version.at_least(19) => {
                changes.description = Some(parse_description(Some(value))?)
            }
            // Accepted as Nova does; Zova has no access IPs or disk config to change.
            "accessIPv4" | "accessIPv6" | "OS-DCF:diskConfig" => {}
            other => {
                return Err(format!(
                    "Additional properties are not allowed ('{other}' was unexpected)"
                ))
            }
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";

    fn parse_create_server_21(body: &[u8]) -> Result<CreateServer, String> {
        parse_create_server(body, crate::microversion::MIN)
    }

    #[test]
    fn newer_microversions_take_description_and_auto_networks() {
        let v219 = Version::new(2, 19);
        let v237 = Version::new(2, 37);
        let mut server = minimal();
        server["description"] = Value::String("web tier".into());
        assert!(parse_create_server_21(&body(server.clone())).is_err());
        assert_eq!(
            parse_create_server(&body(server.clone()), v219)
                .unwrap()
                .description
                .as_deref(),
            Some("web tier")
        );
        assert!(parse_create_server(&body(server.clone()), v237).is_ok());
        server["networks"] = Value::String("auto".into());
        assert!(parse_create_server(&body(server.clone()), v237).is_ok());
        assert!(parse_create_server(&body(server.clone()), v219).is_err());
        server["networks"] = serde_json::json!([{"uuid": "not-a-uuid"}]);
        assert!(parse_create_server(&body(server.clone()), v237).is_err());
        server["networks"] = serde_json::json!([{"uuid": IMAGE, "tag": "x"}]);
        assert!(parse_create_server(&body(server.clone()), v237).is_ok());
        server["description"] = Value::String("a\u{7}b".into());
        assert!(parse_create_server(&body(server), v237).is_err());
    }

    fn body(server: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "server": server })).expect("json")
    }

    fn minimal() -> Value {
        serde_json::json!({"name": "vm-1", "flavorRef": "1", "imageRef": IMAGE})
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let req = parse_create_server_21(&body(minimal())).expect("valid");
        assert_eq!(req.name, "vm-1");
        assert_eq!(req.flavor_ref, "1");
        assert_eq!(req.image_ref, IMAGE);
        assert_eq!((req.min_count, req.max_count), (1, 1));
        assert_eq!(req.hints, SchedulerHints::default());
    }

    #[test]
    fn references_may_be_urls_or_integers() {
        let mut server = minimal();
        server["flavorRef"] = serde_json::json!(3);
        server["imageRef"] = Value::String(format!("http://glance:9292/v2/images/{IMAGE}"));
        let req = parse_create_server_21(&body(server)).expect("valid");
        assert_eq!(req.flavor_ref, "3");
        assert_eq!(req.image_ref, IMAGE);
        let mut server = minimal();
        server["flavorRef"] = Value::String("http://zova:8774/v2.1/flavors/2".into());
        assert_eq!(
            parse_create_server_21(&body(server))
                .expect("valid")
                .flavor_ref,
            "2"
        );
    }

    #[test]
    fn both_hint_spellings_are_accepted() {
        for key in HINT_KEYS {
            let mut top = serde_json::json!({ "server": minimal() });
            top[key] = serde_json::json!({"scheduler_host": "node-2", "scheduler_host_match": "^node-[12]$", "different_host": [IMAGE], "unknown_hint": 1});
            let req =
                parse_create_server_21(&serde_json::to_vec(&top).expect("json")).expect("valid");
            assert_eq!(req.hints.scheduler_host.as_deref(), Some("node-2"));
            assert_eq!(
                req.hints.scheduler_host_match.as_deref(),
                Some("^node-[12]$")
            );
            assert_eq!(req.hints.different_host, vec![IMAGE.to_string()]);
            assert_eq!(req.hints.queue_name, None);
        }
        let mut top = serde_json::json!({ "server": minimal() });
        top["os:scheduler_hints"] = serde_json::json!({"scheduler_host": ["node-1"]});
        let req = parse_create_server_21(&serde_json::to_vec(&top).expect("json"))
            .expect("a one-item list");
        assert_eq!(req.hints.scheduler_host.as_deref(), Some("node-1"));
    }

    #[test]
    fn placement_hints_as_the_openstack_client_sends_them() {
        let mut top = serde_json::json!({"server": minimal()});
        top["os:scheduler_hints"] = serde_json::json!({
            "same_host": [IMAGE, IMAGE],
            "queue_name": "gpu",
            "sign": "-1",
            "boundary_host": "node-3",
        });
        let req = parse_create_server_21(&serde_json::to_vec(&top).expect("json")).expect("valid");
        assert_eq!(
            req.hints.same_host,
            vec![IMAGE.to_string(), IMAGE.to_string()]
        );
        assert_eq!(req.hints.queue_name.as_deref(), Some("gpu"));
        assert_eq!(req.hints.sign, Some(-1));
        assert_eq!(req.hints.boundary_host.as_deref(), Some("node-3"));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "Malformed request body"),
            (b"[]".to_vec(), "must be a JSON object"),
            (b"{}".to_vec(), "'server' is a required property"),
            (br#"{"server": 1}"#.to_vec(), "server"),
            (
                br#"{"server": {}, "extra": 1}"#.to_vec(),
                "'extra' was unexpected",
            ),
            (
                body(serde_json::json!({"flavorRef": "1", "imageRef": IMAGE})),
                "'name' is a required property",
            ),
            (
                body(serde_json::json!({"name": "", "flavorRef": "1", "imageRef": IMAGE})),
                "name",
            ),
            (
                body(serde_json::json!({"name": "   ", "flavorRef": "1", "imageRef": IMAGE})),
                "white space",
            ),
            (
                body(serde_json::json!({"name": " a", "flavorRef": "1", "imageRef": IMAGE})),
                "white space",
            ),
            (
                body(serde_json::json!({"name": "a\u{7}", "flavorRef": "1", "imageRef": IMAGE})),
                "control",
            ),
            (
                body(
                    serde_json::json!({"name": "x".repeat(256), "flavorRef": "1", "imageRef": IMAGE}),
                ),
                "255",
            ),
            (
                body(serde_json::json!({"name": 5, "flavorRef": "1", "imageRef": IMAGE})),
                "string",
            ),
            (
                body(serde_json::json!({"name": "a", "imageRef": IMAGE})),
                "'flavorRef' is a required property",
            ),
            (
                body(serde_json::json!({"name": "a", "flavorRef": "", "imageRef": IMAGE})),
                "flavorRef",
            ),
            (
                body(serde_json::json!({"name": "a", "flavorRef": {}, "imageRef": IMAGE})),
                "flavorRef",
            ),
            (
                body(serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": "cirros"})),
                "Invalid imageRef",
            ),
            (
                body(
                    serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": IMAGE, "min_count": 0}),
                ),
                "min_count",
            ),
            (
                body(
                    serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": IMAGE, "max_count": 101}),
                ),
                "max_count",
            ),
            (
                body(
                    serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": IMAGE, "min_count": 3, "max_count": 2}),
                ),
                "min_count (3) must be <= max_count (2)",
            ),
            (
                body(
                    serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": IMAGE, "metadata": {"k": 1}}),
                ),
                "must be a string",
            ),
            (
                body(
                    serde_json::json!({"name": "a", "flavorRef": "1", "imageRef": IMAGE, "bogus": 1}),
                ),
                "'bogus' was unexpected",
            ),
        ];
        for (input, expected) in cases {
            let err = parse_create_server_21(&input).expect_err(&String::from_utf8_lossy(&input));
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn bad_hints_are_refused() {
        let with_hints = |hints: Value| {
            let top = serde_json::json!({"server": minimal(), "os:scheduler_hints": hints});
            parse_create_server_21(&serde_json::to_vec(&top).expect("json"))
        };
        assert!(with_hints(serde_json::json!({"scheduler_host_match": "["})).is_err());
        assert!(with_hints(serde_json::json!({"scheduler_host": ""})).is_err());
        assert!(with_hints(serde_json::json!({"scheduler_host": ["a", "b"]})).is_err());
        assert!(with_hints(serde_json::json!({"different_host": "not-a-uuid"})).is_err());
        assert!(with_hints(serde_json::json!({"same_host": ["not-a-uuid"]})).is_err());
        assert!(with_hints(serde_json::json!({"sign": "2"})).is_err());
        assert!(with_hints(serde_json::json!({"sign": 0})).is_err());
        assert!(with_hints(serde_json::json!({"queue_name": ""})).is_err());
        assert!(with_hints(serde_json::json!({"boundary_host": 7})).is_err());
        assert!(with_hints(serde_json::json!("scheduler_host")).is_err());
        let top = serde_json::json!({"server": minimal(), "os:scheduler_hints": {}, "OS-SCH-HNT:scheduler_hints": {}});
        assert!(parse_create_server_21(&serde_json::to_vec(&top).expect("json")).is_err());
    }

    #[test]
    fn counts_accept_digit_strings_and_default_max_to_min() {
        let mut server = minimal();
        server["min_count"] = Value::String("3".into());
        let req = parse_create_server_21(&body(server)).expect("valid");
        assert_eq!((req.min_count, req.max_count), (3, 3));
    }

    #[test]
    fn reservation_id_is_asked_for_with_a_boolean() {
        let mut server = minimal();
        server["return_reservation_id"] = Value::Bool(true);
        assert!(
            parse_create_server_21(&body(server.clone()))
                .expect("valid")
                .return_reservation_id
        );
        server["return_reservation_id"] = Value::String("yes".into());
        assert!(parse_create_server_21(&body(server)).is_err());
    }

    #[test]
    fn actions_are_one_of_stop_start_reboot() {
        let parse = |v: Value| parse_server_action(v.to_string().as_bytes());
        assert_eq!(
            parse(serde_json::json!({"os-stop": null})),
            Ok(ServerAction::Stop)
        );
        assert_eq!(
            parse(serde_json::json!({"os-start": null})),
            Ok(ServerAction::Start)
        );
        assert_eq!(
            parse(serde_json::json!({"reboot": {"type": "HARD"}})),
            Ok(ServerAction::Reboot { hard: true })
        );
        assert_eq!(
            parse(serde_json::json!({"reboot": {"type": "soft"}})),
            Ok(ServerAction::Reboot { hard: false })
        );
        assert!(parse(serde_json::json!({"reboot": {}})).is_err());
        assert!(parse(serde_json::json!({"reboot": {"type": "WARM"}})).is_err());
        assert_eq!(
            parse(serde_json::json!({"pause": null})).unwrap_err(),
            "There is no such action: pause"
        );
        assert!(parse(serde_json::json!({"os-stop": null, "os-start": null})).is_err());
        assert!(parse(serde_json::json!({"os-stop": 1})).is_err());
        assert!(parse_server_action(b"{").is_err());
    }

    #[test]
    fn updates_take_a_name_and_from_2_19_a_description() {
        let v219 = Version::new(2, 19);
        let changes = parse_update_server(
            br#"{"server": {"name": "web-2"}}"#,
            crate::microversion::MIN,
        )
        .unwrap();
        assert_eq!(changes.display_name.as_deref(), Some("web-2"));
        assert!(parse_update_server(
            br#"{"server": {"description": "x"}}"#,
            crate::microversion::MIN
        )
        .is_err());
        let changes = parse_update_server(br#"{"server": {"description": null}}"#, v219).unwrap();
        assert_eq!(changes.description, Some(None));
        assert!(parse_update_server(br#"{"server": {"name": ""}}"#, v219).is_err());
        assert!(parse_update_server(br#"{"server": {"host": "x"}}"#, v219).is_err());
        assert!(parse_update_server(br#"{"server": 1}"#, v219).is_err());
        assert!(parse_update_server(br#"[]"#, v219).is_err());
    }

    #[test]
    fn no_input_panics() {
        // A crude fuzz: every prefix of a valid body, and byte flips of it, must give Ok or Err.
        let valid = body(
            serde_json::json!({"name": "vm", "flavorRef": "1", "imageRef": IMAGE, "metadata": {"a": "b"}}),
        );
        for end in 0..valid.len() {
            let _ = parse_create_server_21(&valid[..end]);
        }
        for i in 0..valid.len() {
            let mut flipped = valid.clone();
            flipped[i] ^= 0x20;
            let _ = parse_create_server_21(&flipped);
        }
    }
}
