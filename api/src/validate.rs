//! Validation of create-server requests: bytes in, a typed request or a message for the user out.
//! Pure: no I/O, so every rule is tested directly.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use proto::SchedulerHints;

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
}

/// Server fields Nova accepts that this version takes and ignores (networks, keys, ...), so the
/// standard clients' requests are not refused.
const ACCEPTED_UNUSED_SERVER_FIELDS: &[&str] = &[
    "networks",
    "security_groups",
    "key_name",
    "availability_zone",
    "user_data",
    "config_drive",
    "description",
    "block_device_mapping",
    "block_device_mapping_v2",
    "adminPass",
    "accessIPv4",
    "accessIPv6",
    "personality",
    "OS-DCF:diskConfig",
    "tags",
    "trusted_image_certificates",
    "host",
    "hypervisor_hostname",
    "hostname",
];

const HINT_KEYS: [&str; 2] = ["os:scheduler_hints", "OS-SCH-HNT:scheduler_hints"];

fn invalid(field: &str, why: impl std::fmt::Display) -> String {
    format!("Invalid input for field/attribute {field}. {why}")
}

/// Parses and checks the body of `POST /servers`.
pub fn parse_create_server(body: &[u8]) -> Result<CreateServer, String> {
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
    if let Some(extra) = server.keys().find(|k| {
        !matches!(
            k.as_str(),
            "name"
                | "flavorRef"
                | "imageRef"
                | "min_count"
                | "max_count"
                | "metadata"
                | "return_reservation_id"
        ) && !ACCEPTED_UNUSED_SERVER_FIELDS.contains(&k.as_str())
    }) {
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
    })
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

/// The one compute API microversion served so far.
pub const MICROVERSION: &str = "2.1";

/// Checks the microversion a client asks for (`OpenStack-API-Version: compute X` or
/// `X-OpenStack-Nova-API-Version: X`); only 2.1 (or `latest`, which is 2.1) is served.
pub fn check_microversion(openstack: Option<&str>, nova: Option<&str>) -> Result<(), String> {
    let asked = match (openstack, nova) {
        (Some(header), _) => {
            let mut words = header.split_whitespace();
            match (words.next(), words.next()) {
                (Some(service), Some(version)) if service.eq_ignore_ascii_case("compute") => {
                    Some(version)
                }
                // A header for another service says nothing about the compute API.
                (Some(_), Some(_)) => None,
                _ => return Err(format!("Invalid OpenStack-API-Version header: {header:?}")),
            }
        }
        (None, Some(version)) => Some(version.trim()),
        (None, None) => None,
    };
    match asked {
        None | Some("latest") | Some(MICROVERSION) => Ok(()),
        Some(version) => Err(format!(
            "Version {version} is not supported by the API. Minimum is {MICROVERSION} and maximum is {MICROVERSION}."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";

    fn body(server: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "server": server })).expect("json")
    }

    fn minimal() -> Value {
        serde_json::json!({"name": "vm-1", "flavorRef": "1", "imageRef": IMAGE})
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let req = parse_create_server(&body(minimal())).expect("valid");
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
        let req = parse_create_server(&body(server)).expect("valid");
        assert_eq!(req.flavor_ref, "3");
        assert_eq!(req.image_ref, IMAGE);
        let mut server = minimal();
        server["flavorRef"] = Value::String("http://zova:8774/v2.1/flavors/2".into());
        assert_eq!(
            parse_create_server(&body(server))
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
            let req = parse_create_server(&serde_json::to_vec(&top).expect("json")).expect("valid");
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
        let req =
            parse_create_server(&serde_json::to_vec(&top).expect("json")).expect("a one-item list");
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
        let req = parse_create_server(&serde_json::to_vec(&top).expect("json")).expect("valid");
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
            let err = parse_create_server(&input).expect_err(&String::from_utf8_lossy(&input));
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
            parse_create_server(&serde_json::to_vec(&top).expect("json"))
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
        assert!(parse_create_server(&serde_json::to_vec(&top).expect("json")).is_err());
    }

    #[test]
    fn counts_accept_digit_strings_and_default_max_to_min() {
        let mut server = minimal();
        server["min_count"] = Value::String("3".into());
        let req = parse_create_server(&body(server)).expect("valid");
        assert_eq!((req.min_count, req.max_count), (3, 3));
    }

    #[test]
    fn reservation_id_is_asked_for_with_a_boolean() {
        let mut server = minimal();
        server["return_reservation_id"] = Value::Bool(true);
        assert!(
            parse_create_server(&body(server.clone()))
                .expect("valid")
                .return_reservation_id
        );
        server["return_reservation_id"] = Value::String("yes".into());
        assert!(parse_create_server(&body(server)).is_err());
    }

    #[test]
    fn only_microversion_2_1_is_served() {
        assert_eq!(check_microversion(None, None), Ok(()));
        assert_eq!(check_microversion(Some("compute 2.1"), None), Ok(()));
        assert_eq!(check_microversion(Some("compute latest"), None), Ok(()));
        assert_eq!(check_microversion(Some("volume 3.60"), None), Ok(()));
        assert_eq!(check_microversion(None, Some("2.1")), Ok(()));
        assert!(check_microversion(Some("compute 2.79"), None)
            .expect_err("2.79")
            .contains("2.79"));
        assert!(check_microversion(None, Some("2.60")).is_err());
        assert!(check_microversion(Some("compute"), None).is_err());
    }

    #[test]
    fn no_input_panics() {
        // A crude fuzz: every prefix of a valid body, and byte flips of it, must give Ok or Err.
        let valid = body(
            serde_json::json!({"name": "vm", "flavorRef": "1", "imageRef": IMAGE, "metadata": {"a": "b"}}),
        );
        for end in 0..valid.len() {
            let _ = parse_create_server(&valid[..end]);
        }
        for i in 0..valid.len() {
            let mut flipped = valid.clone();
            flipped[i] ^= 0x20;
            let _ = parse_create_server(&flipped);
        }
    }
}
