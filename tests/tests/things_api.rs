//! The `/v1/things` API over real HTTP, with the loopback broker: CRUD,
//! Para compatibility, listing, and bad input.

use para_tests::{Host, broker_config, fixture, temp_dir};
use serde_json::{Value, json};

fn loopback_host(tag: &str) -> Host {
    let dir = temp_dir(tag);
    Host::start(&dir, &broker_config("Loop", &fixture("loopback"), ""))
}

fn create(host: &Host, name: &str) -> Value {
    let res = host.call(
        "POST",
        "/v1/things",
        Some(&json!({"name": name, "serviceBroker": "Loop"})),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

#[test]
fn crud_lifecycle_with_loopback_broker() {
    let host = loopback_host("crud");
    // POST with Para's bookkeeping fields, as Para's clients send them.
    let res = host.call(
        "POST",
        "/v1/things",
        Some(&json!({
            "id": null, "type": "thing", "stored": true, "indexed": true, "cached": true,
            "version": 0, "name": "MyThing", "serviceBroker": "loop", "color": "red",
            "deviceState": {"on": false}
        })),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    assert!(
        res.header("location")
            .is_some_and(|l| l.starts_with("/v1/things/"))
    );
    let created = res.json();
    let id = created["id"].as_str().expect("id").to_string();
    assert!(id.parse::<u64>().is_ok(), "snowflake id: {id}");
    assert_eq!(created["type"], "thing");
    assert_eq!(created["appid"], "para");
    assert_eq!(created["name"], "MyThing");
    assert_eq!(
        created["serviceBroker"], "Loop",
        "normalised to the configured name"
    );
    assert_eq!(created["color"], "red", "custom fields are flattened");
    assert_eq!(created["deviceState"], json!({"on": false}));
    assert_eq!(created["objectURI"], format!("/thing/{id}"));
    assert!(created["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(created["deviceDetails"]["broker"], "loopback");
    assert_eq!(created["deviceDetails"]["thingId"], id.as_str());
    assert!(created.get("deviceMetadata").is_none());

    // GET, plural and singular: no deviceDetails, no metadata.
    for path in [format!("/v1/things/{id}"), format!("/v1/thing/{id}")] {
        let got = host.call("GET", &path, None);
        assert_eq!(got.status, 200);
        let got = got.json();
        assert_eq!(got["id"], id.as_str());
        assert!(
            got.get("deviceDetails").is_none(),
            "deviceDetails shown again: {got}"
        );
        assert!(got.get("deviceMetadata").is_none());
        assert!(got.get("metadata").is_none());
        assert!(!got.to_string().contains("deviceToken"));
    }

    // PATCH: shallow merge, deviceState replaced whole, locked fields ignored.
    let res = host.call(
        "PATCH",
        &format!("/v1/thing/{id}"),
        Some(&json!({"deviceState": {"temp": 20}, "serviceBroker": "Other", "size": 3, "color": null})),
    );
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let patched = res.json();
    assert_eq!(patched["deviceState"], json!({"temp": 20}));
    assert_eq!(patched["serviceBroker"], "Loop");
    assert_eq!(patched["size"], 3);
    assert!(
        patched.get("color").is_none(),
        "null deletes a custom field"
    );
    assert_eq!(patched["name"], "MyThing");
    assert!(patched["version"].as_u64().unwrap() > created["version"].as_u64().unwrap());

    // PUT: overwrite, through the broker.
    let res = host.call(
        "PUT",
        &format!("/v1/things/{id}"),
        Some(&json!({"name": "Renamed", "deviceState": {"mode": "eco"}})),
    );
    assert_eq!(res.status, 200);
    let put = res.json();
    assert_eq!(put["name"], "Renamed");
    assert_eq!(put["deviceState"], json!({"mode": "eco"}));
    assert!(put.get("size").is_none(), "PUT replaces custom fields");

    // DELETE, then it is gone.
    let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 200);
    let res = host.call("GET", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 404);
    assert_eq!(res.json()["code"], 404);
    let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 404);
}

#[test]
fn list_pages_sorts_and_searches_after() {
    let host = loopback_host("list");
    let ids: Vec<String> = (0..5)
        .map(|i| {
            create(&host, &format!("t{i}"))["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let res = host.call("GET", "/v1/things?limit=2", None).json();
    assert_eq!(res["totalHits"], 5);
    assert_eq!(res["page"], 1);
    let first: Vec<&str> = res["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        first,
        vec![ids[4].as_str(), ids[3].as_str()],
        "newest first by default"
    );
    assert!(res["items"][0].get("deviceDetails").is_none());
    let last_key = res["lastKey"].as_str().unwrap().to_string();
    let next = host
        .call(
            "GET",
            &format!("/v1/thing?limit=2&lastKey={last_key}"),
            None,
        )
        .json();
    let second: Vec<&str> = next["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(second, vec![ids[2].as_str(), ids[1].as_str()]);
    let page3 = host.call("GET", "/v1/things?limit=2&page=3", None).json();
    assert_eq!(page3["items"].as_array().unwrap().len(), 1);
    let asc = host
        .call("GET", "/v1/things?sort=name&desc=false&limit=1", None)
        .json();
    assert_eq!(asc["items"][0]["name"], "t0");
    let bad = host.call("GET", "/v1/things?limit=many", None);
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().contains("limit"));
}

#[test]
fn bad_input_gets_clear_400s() {
    let host = loopback_host("badinput");
    let check = |res: para_tests::Response, status: u16, needle: &str| {
        assert_eq!(res.status, status, "{}", String::from_utf8_lossy(&res.body));
        let body = res.json();
        assert_eq!(body["code"], status);
        let msg = body["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    };
    check(
        host.raw("POST", "/v1/things", Some(b"{\"name\": ")),
        400,
        "Malformed JSON",
    );
    check(
        host.call(
            "POST",
            "/v1/things",
            Some(&json!({"serviceBroker": "Loop"})),
        ),
        400,
        "'name'",
    );
    check(
        host.call("POST", "/v1/things", Some(&json!({"name": "x"}))),
        400,
        "'serviceBroker'",
    );
    check(
        host.call(
            "POST",
            "/v1/things",
            Some(&json!({"name": 12, "serviceBroker": "Loop"})),
        ),
        400,
        "'name' must be a string",
    );
    check(
        host.call(
            "POST",
            "/v1/things",
            Some(&json!({"name": "x", "serviceBroker": "Loop", "deviceState": "on"})),
        ),
        400,
        "'deviceState' must be a JSON object",
    );
    check(
        host.call("POST", "/v1/things", Some(&json!(["x"]))),
        400,
        "JSON object",
    );
    check(
        host.call(
            "POST",
            "/v1/things",
            Some(&json!({"name": "x", "serviceBroker": "AWS"})),
        ),
        400,
        "Configured brokers: Loop",
    );
    let big = format!(
        "{{\"name\":\"x\",\"serviceBroker\":\"Loop\",\"pad\":\"{}\"}}",
        "a".repeat(1024 * 1024 + 10)
    );
    check(
        host.raw("POST", "/v1/things", Some(big.as_bytes())),
        400,
        "too large",
    );
    check(host.call("GET", "/v1/things/123", None), 404, "not found");
    check(host.call("GET", "/v1/users/123", None), 404, "Unknown type");
    // Nothing half-made was left behind by any of these.
    assert_eq!(host.call("GET", "/v1/things", None).json()["totalHits"], 0);
}

#[test]
fn iot_disabled_says_how_to_enable() {
    let dir = temp_dir("disabled");
    let cfg = broker_config("Loop", &fixture("loopback"), "")
        .replace("para.iot_enabled = true", "para.iot_enabled = false");
    let host = Host::start(&dir, &cfg);
    let res = host.call(
        "POST",
        "/v1/things",
        Some(&json!({"name": "x", "serviceBroker": "Loop"})),
    );
    assert_eq!(res.status, 400);
    assert!(
        res.json()["message"]
            .as_str()
            .unwrap()
            .contains("para.iot_enabled = true")
    );
}

#[test]
fn things_survive_a_restart() {
    let dir = temp_dir("durable");
    let cfg = broker_config("Loop", &fixture("loopback"), "");
    let id = {
        let host = Host::start(&dir, &cfg);
        create(&host, "durable")["id"].as_str().unwrap().to_string()
    };
    let host = Host::start(&dir, &cfg);
    let res = host.call("GET", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 200);
    assert_eq!(res.json()["name"], "durable");
}
