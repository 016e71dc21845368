//! Bad input over real HTTP: thousands of random and mutated bodies against the compute API's
//! writing endpoints. None may get a 5xx or crash the API; every refusal is Nova's JSON error
//! (`{"<kind>": {"code": N, "message": "…"}}`) and changes no row.
//!
//! Deterministic: the generator is seeded (ZOVA_FUZZ_SEED overrides the seed, and a failure
//! prints the seed and the request, so it can be replayed).

use std::time::Duration;

use hyper::{Method, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use integration::{http_request, test_log, Fabric, HostSpec, IMAGE};

/// Requests per run, spread over the endpoints below.
const CASES: usize = 10_000;
/// Password checks cost an argon2 hash each (also for unknown users), so fewer of those.
const AUTH_CASES: usize = 100;

/// A random JSON value, nested at most `depth` deep: the shapes and edge values validators
/// trip on (huge and negative numbers, floats, control characters, long strings).
fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.gen_range(0..if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => json!([0i64, -1, 1, i64::MAX, i64::MIN, 2_147_483_648, 65_536][rng.gen_range(0..7)]),
        3 => json!(rng.gen::<f64>() * 1e12 - 5e11),
        4 => Value::String(random_string(rng)),
        5 => json!(["", " ", "1", "m1.tiny", IMAGE, "true", "null", "0"][rng.gen_range(0..8)]),
        6 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_value(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.gen_range(0..4))
                .map(|_| (random_string(rng), random_value(rng, depth - 1)))
                .collect(),
        ),
    }
}

fn random_string(rng: &mut StdRng) -> String {
    let len = [0, 1, 8, 64, 255, 256, 1000][rng.gen_range(0..7)];
    (0..len)
        .map(|_| match rng.gen_range(0..10) {
            0 => char::from(rng.gen_range(0u8..32)),
            1 => [
                '<', '&', '"', '\'', '/', '\\', '%', '\u{202e}', '\u{fffd}', 'é',
            ][rng.gen_range(0..10)],
            _ => char::from(rng.gen_range(b'a'..=b'z')),
        })
        .collect()
}

/// The object keys of `value` down to `depth`, as paths.
fn paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            prefix.push(key.clone());
            out.push(prefix.clone());
            paths(child, prefix, out);
            prefix.pop();
        }
    }
}

fn parent_of<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Map<String, Value>> {
    let mut node = value;
    for key in &path[..path.len().saturating_sub(1)] {
        node = node.get_mut(key)?;
    }
    node.as_object_mut()
}

/// A body made from `valid`: a field replaced, removed or added, the text cut short or with
/// bytes flipped, or something else entirely.
fn mutate(rng: &mut StdRng, valid: &Value) -> Vec<u8> {
    let mut body = valid.clone();
    let mut all = Vec::new();
    paths(&body, &mut Vec::new(), &mut all);
    match rng.gen_range(0..7) {
        0 => return random_value(rng, 3).to_string().into_bytes(),
        1 | 2 if !all.is_empty() => {
            let path = &all[rng.gen_range(0..all.len())];
            let replacement = random_value(rng, 2);
            if let (Some(parent), Some(key)) = (parent_of(&mut body, path), path.last()) {
                parent.insert(key.clone(), replacement);
            }
        }
        3 if !all.is_empty() => {
            let path = &all[rng.gen_range(0..all.len())];
            if let (Some(parent), Some(key)) = (parent_of(&mut body, path), path.last()) {
                parent.remove(key);
            }
        }
        4 => {
            let mut text = body.to_string().into_bytes();
            text.truncate(rng.gen_range(0..=text.len()));
            return text;
        }
        5 => {
            let mut text = body.to_string().into_bytes();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..text.len());
                text[at] = rng.gen();
            }
            return text;
        }
        _ => {
            if let Some(object) = body.as_object_mut().and_then(|o| o.values_mut().next()) {
                if let Some(object) = object.as_object_mut() {
                    object.insert(random_string(rng), random_value(rng, 2));
                }
            }
        }
    }
    body.to_string().into_bytes()
}

/// Nova's error body: one key, whose value has the status as `code` and a `message`.
fn is_nova_error(status: StatusCode, body: &Value) -> bool {
    let Some(object) = body.as_object() else {
        return false;
    };
    object.len() == 1
        && object.values().all(|inner| {
            inner["code"].as_u64() == Some(u64::from(status.as_u16()))
                && inner["message"].as_str().is_some_and(|m| !m.is_empty())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_bodies_get_nova_errors_and_change_nothing() {
    let seed = std::env::var("ZOVA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let fabric = Fabric::start(&[HostSpec::new("node-1", 8, 8192, 80)], test_log())
        .await
        .expect("fabric starts");
    // Accepted creates are bounded by the admin project's own quota.
    for (resource, limit) in [("instances", 20), ("cores", 40), ("ram", 40_960)] {
        fabric
            .db
            .quota_set(&fabric.admin_project, resource, Some(limit))
            .expect("quota");
    }
    let server = fabric
        .boot(
            &json!({"server": {"name": "target", "flavorRef": "1", "imageRef": IMAGE}}),
            Duration::from_secs(30),
        )
        .await
        .expect("a server to act on");
    let server_id = server["id"].as_str().expect("id").to_string();

    let endpoints: Vec<(Method, String, Value)> = vec![
        (
            Method::POST,
            "/v2.1/servers".into(),
            json!({"server": {
                "name": "fuzz", "flavorRef": "1", "imageRef": IMAGE, "min_count": 1,
                "max_count": 1, "metadata": {"k": "v"}, "description": "d",
            }, "os:scheduler_hints": {"scheduler_host_match": "^node"}}),
        ),
        (
            Method::PUT,
            format!("/v2.1/servers/{server_id}"),
            json!({"server": {"name": "renamed", "description": "x"}}),
        ),
        (
            Method::POST,
            format!("/v2.1/servers/{server_id}/action"),
            json!({"reboot": {"type": "SOFT"}}),
        ),
        (
            Method::POST,
            "/v2.1/os-keypairs".into(),
            json!({"keypair": {"name": "fuzz-key", "type": "ssh"}}),
        ),
        (
            Method::POST,
            "/v2.1/flavors".into(),
            json!({"flavor": {"name": "fuzz", "ram": 64, "vcpus": 1, "disk": 1, "id": "fuzz"}}),
        ),
    ];
    let auth = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"id": "default"}, "password": "wrong"}}}}});

    let address = fabric.api_address.clone();
    let token = fabric.admin_token.clone();
    let mut refused = 0usize;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    let cases = (0..CASES)
        .map(|i| {
            let (method, path, valid) = &endpoints[i % endpoints.len()];
            (method.clone(), path.clone(), valid.clone(), true)
        })
        .chain((0..AUTH_CASES).map(|_| {
            (
                Method::POST,
                "/v3/auth/tokens".to_string(),
                auth.clone(),
                false,
            )
        }));
    for (case, (method, path, valid, authenticated)) in cases.enumerate() {
        let body = mutate(&mut rng, &valid);
        let before = fabric.db.api_row_counts().expect("counts");
        let headers: Vec<(&str, &str)> = if authenticated {
            vec![
                ("x-auth-token", token.as_str()),
                ("content-type", "application/json"),
            ]
        } else {
            vec![("content-type", "application/json")]
        };
        let answer = http_request(&address, method.clone(), &path, body.clone(), &headers)
            .await
            .unwrap_or_else(|e| panic!("seed {seed} case {case}: no answer ({e})"));
        *by_status.entry(answer.status.as_u16()).or_default() += 1;
        let shown = String::from_utf8_lossy(&body);
        assert!(
            !answer.status.is_server_error(),
            "seed {seed} case {case}: {method} {path} {shown} -> {} {}",
            answer.status,
            answer.body
        );
        if answer.status.is_client_error() {
            refused += 1;
            assert!(
                is_nova_error(answer.status, &answer.body),
                "seed {seed} case {case}: {method} {path} {shown} -> {} is not Nova's error: {}",
                answer.status,
                answer.body
            );
            assert_eq!(
                fabric.db.api_row_counts().expect("counts"),
                before,
                "seed {seed} case {case}: {method} {path} {shown} was refused but changed rows \
                 of {:?}",
                db::API_TABLES
            );
        }
    }
    println!("api fuzz, seed {seed}: answers by status {by_status:?}");
    // Almost everything is refused; the API still serves.
    assert!(refused > CASES / 2, "only {refused} refused");
    let health = http_request(&address, Method::GET, "/healthcheck", Vec::new(), &[])
        .await
        .expect("answered");
    assert_eq!(health.status, StatusCode::OK);
    fabric.stop().await;
}
