//! Flow tests for the broker operations against a scripted fake hub.

use super::*;
use crate::config::Config;
use crate::platform::{Request, Response, TransportError};
use crate::sas::TokenCache;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

const KEY_B64: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";
const PRIMARY: &str = "cHJpbWFyeS1rZXktcHJpbWFyeS1rZXktcHJpbWFyeSE=";
const SECONDARY: &str = "c2Vjb25kYXJ5LWtleS1zZWNvbmRhcnkta2V5LXNlY28=";

/// A fake platform: answers requests from a script and records everything.
#[derive(Default)]
struct Fake {
    script: VecDeque<Result<Response, TransportError>>,
    requests: Vec<Request>,
    sleeps: Vec<u64>,
    clock_ms: u64,
    logs: RefCell<Vec<String>>,
}

impl Fake {
    fn with(script: Vec<Result<Response, TransportError>>) -> Fake {
        Fake {
            script: script.into(),
            ..Fake::default()
        }
    }

    fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
        req.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body(req: &Request) -> Value {
        serde_json::from_slice(req.body.as_deref().unwrap_or(b"null")).expect("JSON body")
    }
}

impl Platform for Fake {
    fn send(&mut self, request: &Request) -> Result<Response, TransportError> {
        self.requests.push(request.clone());
        self.clock_ms += 5;
        self.script.pop_front().unwrap_or_else(|| {
            panic!(
                "unexpected request {} {}",
                request.method.as_str(),
                request.path_and_query
            )
        })
    }
    fn unix_secs(&self) -> u64 {
        1_700_000_000
    }
    fn monotonic_ms(&self) -> u64 {
        self.clock_ms
    }
    fn sleep_ms(&mut self, ms: u64) {
        self.sleeps.push(ms);
        self.clock_ms += ms;
    }
    fn log(&self, _level: Level, message: &str) {
        self.logs.borrow_mut().push(message.to_string());
    }
}

fn ok(status: u16, body: Value) -> Result<Response, TransportError> {
    Ok(Response {
        status,
        headers: vec![],
        body: if body.is_null() {
            vec![]
        } else {
            body.to_string().into_bytes()
        },
    })
}

fn with_headers(
    r: Result<Response, TransportError>,
    headers: &[(&str, &str)],
) -> Result<Response, TransportError> {
    r.map(|mut resp| {
        resp.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resp
    })
}

fn azure_err(status: u16, code: &str, text: &str) -> Result<Response, TransportError> {
    with_headers(
        ok(
            status,
            json!({ "Message": format!("ErrorCode:{code};{text}"), "ExceptionMessage": "Tracking ID:abc-G:1" }),
        ),
        &[("iothub-errorcode", code)],
    )
}

fn config() -> Config {
    let map: HashMap<&str, &str> = [
        ("iot_hostname", "myhub.azure-devices.net"),
        ("iot_access_key", KEY_B64),
    ]
    .into_iter()
    .collect();
    Config::load(|k| Ok(map.get(k).map(|v| v.to_string()))).expect("config")
}

fn device_json(id: &str) -> Value {
    json!({
        "deviceId": id, "generationId": "638000000000000001", "etag": "MA==",
        "connectionState": "Disconnected", "status": "enabled",
        "lastActivityTime": "0001-01-01T00:00:00",
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": PRIMARY, "secondaryKey": SECONDARY}}
    })
}

fn thing<'a>(state: &'a str) -> ThingRef<'a> {
    ThingRef {
        id: "664870213421895680",
        appid: "myapp",
        name: "MyThing",
        device_state: state,
        metadata: "{}",
    }
}

/// Runs `f` with a hub over `fake`, then checks no secret reached the log.
fn run<T>(fake: &mut Fake, f: impl FnOnce(&mut Hub<'_, Fake>) -> T) -> T {
    let cfg = config();
    let mut tokens = TokenCache::new();
    let out = {
        let mut hub = Hub::new(&cfg, fake, &mut tokens);
        f(&mut hub)
    };
    for line in fake.logs.borrow().iter() {
        for secret in [KEY_B64, PRIMARY, SECONDARY, "SharedAccessSignature", "sig="] {
            assert!(!line.contains(secret), "secret in log: {line}");
        }
    }
    out
}

const DEVICE_PATH: &str = "/devices/myapp%3A664870213421895680?api-version=2021-04-12";
const TWIN_PATH: &str = "/twins/myapp%3A664870213421895680?api-version=2021-04-12";

#[test]
fn create_provisions_with_generated_keys() {
    let mut fake = Fake::with(vec![ok(200, device_json("myapp:664870213421895680"))]);
    let out = run(&mut fake, |hub| create(hub, &thing("{}"))).expect("created");

    let req = &fake.requests[0];
    assert_eq!(req.method, Method::Put);
    assert_eq!(req.authority, "myhub.azure-devices.net");
    assert_eq!(req.path_and_query, DEVICE_PATH);
    assert!(Fake::header(req, "if-match").is_none());
    let auth = Fake::header(req, "authorization").expect("auth");
    assert!(
        auth.starts_with("SharedAccessSignature sr=myhub.azure-devices.net&sig="),
        "{auth}"
    );
    assert!(
        auth.contains(&format!("&se={}&skn=iothubowner", 1_700_000_000 + 3600)),
        "{auth}"
    );
    let body = Fake::body(req);
    assert_eq!(body["deviceId"], "myapp:664870213421895680");
    assert!(body["authentication"]["symmetricKey"]["primaryKey"].is_null());
    assert_eq!(
        Fake::header(req, "content-length"),
        Some(
            req.body
                .as_ref()
                .map(|b| b.len().to_string())
                .unwrap_or_default()
                .as_str()
        )
    );

    let details: Value = serde_json::from_str(&out.device_details).expect("json");
    assert_eq!(details["thingId"], "664870213421895680");
    assert_eq!(details["thingName"], "MyThing");
    assert_eq!(details["primaryKey"], PRIMARY);
    assert_eq!(details["secondaryKey"], SECONDARY);
    assert_eq!(
        details["connectionString"],
        format!(
            "HostName=myhub.azure-devices.net;DeviceId=myapp:664870213421895680;SharedAccessKey={PRIMARY}"
        )
    );
    let meta: Value = serde_json::from_str(&out.metadata).expect("json");
    assert_eq!(
        meta,
        json!({"deviceId": "myapp:664870213421895680", "generationId": "638000000000000001", "hostname": "myhub.azure-devices.net"})
    );
    assert!(!out.metadata.contains(PRIMARY) && !out.metadata.contains(SECONDARY));
}

#[test]
fn create_is_idempotent_on_409() {
    let mut fake = Fake::with(vec![
        azure_err(
            409,
            "DeviceAlreadyExists",
            "A device with ID 'myapp:664870213421895680' is already registered.",
        ),
        ok(200, device_json("myapp:664870213421895680")),
    ]);
    let out = run(&mut fake, |hub| create(hub, &thing("{}"))).expect("created");
    assert_eq!(fake.requests[1].method, Method::Get);
    assert_eq!(fake.requests[1].path_and_query, DEVICE_PATH);
    assert!(out.device_details.contains(PRIMARY));
}

#[test]
fn create_retries_transient_failures() {
    let mut fake = Fake::with(vec![
        azure_err(503, "ServiceUnavailable", "busy"),
        Err(TransportError::Timeout("first byte".into())),
        ok(200, device_json("myapp:664870213421895680")),
    ]);
    run(&mut fake, |hub| create(hub, &thing("{}"))).expect("created");
    assert_eq!(fake.sleeps, [200, 600]);
}

#[test]
fn create_gives_up_after_three_attempts() {
    let mut fake = Fake::with(vec![
        azure_err(500, "ServerError", "oops"),
        azure_err(500, "ServerError", "oops"),
        azure_err(500, "ServerError", "oops again"),
    ]);
    let err = run(&mut fake, |hub| create(hub, &thing("{}"))).expect_err("fails");
    assert_eq!(err.kind(), "unavailable");
    assert!(
        err.message().contains("ServerError (500001)") && err.message().contains("oops again"),
        "{err}"
    );
    assert_eq!(fake.requests.len(), 3);
}

#[test]
fn long_retry_after_is_not_waited_out() {
    let mut fake = Fake::with(vec![with_headers(
        azure_err(429, "ThrottlingException", "slow down"),
        &[
            ("Retry-After", "30"),
            ("iothub-errorcode", "ThrottlingException"),
        ],
    )]);
    let err = run(&mut fake, |hub| create(hub, &thing("{}"))).expect_err("throttled");
    assert!(
        matches!(
            err,
            Failure::Throttled {
                retry_after_ms: 30_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(fake.sleeps.is_empty());
}

#[test]
fn short_retry_after_is_honoured() {
    let mut fake = Fake::with(vec![
        with_headers(
            azure_err(429, "ThrottlingException", "x"),
            &[("Retry-After", "1")],
        ),
        ok(200, device_json("myapp:664870213421895680")),
    ]);
    run(&mut fake, |hub| create(hub, &thing("{}"))).expect("created");
    assert_eq!(fake.sleeps, [1000]);
}

#[test]
fn denied_egress_is_misconfigured() {
    let mut fake = Fake::with(vec![Err(TransportError::Denied)]);
    let err = run(&mut fake, |hub| create(hub, &thing("{}"))).expect_err("denied");
    assert_eq!(err.kind(), "misconfigured");
    assert!(
        err.message().contains("myhub.azure-devices.net")
            && err.message().contains("para.brokers.Azure.allowed_hosts")
    );
    assert_eq!(fake.requests.len(), 1, "a denial is not retried");
}

#[test]
fn unauthorized_names_the_settings() {
    let mut fake = Fake::with(vec![azure_err(
        401,
        "IotHubUnauthorizedAccess",
        "Unauthorized",
    )]);
    let err = run(&mut fake, |hub| create(hub, &thing("{}"))).expect_err("401");
    assert_eq!(err.kind(), "unauthorized");
    assert!(err.message().contains("para.azure.iot_access_key"));
}

#[test]
fn invalid_thing_ids_fail_before_any_request() {
    let mut fake = Fake::default();
    let mut t = thing("{}");
    t.appid = "my app";
    let err = run(&mut fake, |hub| create(hub, &t)).expect_err("bad id");
    assert_eq!(err.kind(), "invalid-input");
    assert!(fake.requests.is_empty());
}

fn twin_json(etag: &str, desired: Value) -> Value {
    let mut desired = desired;
    desired["$version"] = json!(4);
    desired["$metadata"] = json!({"$lastUpdated": "2024-01-01T00:00:00Z"});
    json!({"deviceId": "myapp:664870213421895680", "etag": etag, "version": 7,
           "properties": {"desired": desired, "reported": {"$version": 1, "$metadata": {}}}})
}

#[test]
fn update_patches_desired_to_equal_state() {
    let mut fake = Fake::with(vec![
        ok(
            200,
            twin_json(
                "AAAAAAAAAAc=",
                json!({"a": 1, "old": 2, "cfg": {"x": 1, "y": 2}}),
            ),
        ),
        ok(200, json!({})),
    ]);
    let meta = run(&mut fake, |hub| {
        update(hub, &thing(r#"{"a": 1, "b": true, "cfg": {"x": 1}}"#))
    })
    .expect("updated");
    assert_eq!(fake.requests[0].method, Method::Get);
    assert_eq!(fake.requests[0].path_and_query, TWIN_PATH);
    let patch = &fake.requests[1];
    assert_eq!(patch.method, Method::Patch);
    assert_eq!(patch.path_and_query, TWIN_PATH);
    assert_eq!(Fake::header(patch, "if-match"), Some("\"AAAAAAAAAAc=\""));
    assert_eq!(
        Fake::body(patch),
        json!({"properties": {"desired": {"old": null, "b": true, "cfg": {"y": null}}}})
    );
    let meta: Value = serde_json::from_str(&meta).expect("json");
    assert_eq!(meta["deviceId"], "myapp:664870213421895680");
}

#[test]
fn update_rereads_on_etag_mismatch() {
    let mut fake = Fake::with(vec![
        ok(200, twin_json("e1", json!({}))),
        azure_err(412, "PreconditionFailed", "etag mismatch"),
        ok(200, twin_json("e2", json!({"z": 0}))),
        ok(200, json!({})),
    ]);
    run(&mut fake, |hub| update(hub, &thing(r#"{"a": 1}"#))).expect("updated");
    assert_eq!(Fake::header(&fake.requests[3], "if-match"), Some("\"e2\""));
    assert_eq!(
        Fake::body(&fake.requests[3]),
        json!({"properties": {"desired": {"a": 1, "z": null}}})
    );
}

#[test]
fn update_gives_up_when_twin_keeps_changing() {
    let mut script = Vec::new();
    for _ in 0..MAX_TWIN_ROUNDS {
        script.push(ok(200, twin_json("e", json!({}))));
        script.push(azure_err(412, "PreconditionFailed", "etag mismatch"));
    }
    let mut fake = Fake::with(script);
    let err = run(&mut fake, |hub| update(hub, &thing(r#"{"a": 1}"#))).expect_err("conflict");
    assert_eq!(err.kind(), "conflict");
}

#[test]
fn update_skips_patch_when_in_sync() {
    let mut fake = Fake::with(vec![ok(200, twin_json("e", json!({"a": 1})))]);
    run(&mut fake, |hub| update(hub, &thing(r#"{"a": 1}"#))).expect("in sync");
    assert_eq!(fake.requests.len(), 1);
}

#[test]
fn update_checks_limits_before_sending() {
    let mut fake = Fake::default();
    let err = run(&mut fake, |hub| update(hub, &thing(r#"{"list": [1, 2]}"#))).expect_err("array");
    assert_eq!(err.kind(), "invalid-input");
    assert!(err.message().contains("deviceState.list"));
    let err = run(&mut fake, |hub| update(hub, &thing("[1]"))).expect_err("not object");
    assert_eq!(err.kind(), "invalid-input");
    assert!(fake.requests.is_empty());
}

#[test]
fn update_of_missing_device_is_not_found() {
    let mut fake = Fake::with(vec![azure_err(404, "DeviceNotFound", "Device not found")]);
    let err = run(&mut fake, |hub| update(hub, &thing("{}"))).expect_err("404");
    assert_eq!(err.kind(), "not-found");
    assert!(err.message().contains("DeviceNotFound (404001)"));
}

#[test]
fn delete_is_unconditional_and_tolerates_404() {
    let mut fake = Fake::with(vec![
        ok(204, Value::Null),
        azure_err(404, "DeviceNotFound", "gone"),
    ]);
    run(&mut fake, |hub| delete(hub, &thing("{}"))).expect("deleted");
    run(&mut fake, |hub| delete(hub, &thing("{}"))).expect("already gone");
    let req = &fake.requests[0];
    assert_eq!(req.method, Method::Delete);
    assert_eq!(req.path_and_query, DEVICE_PATH);
    assert_eq!(Fake::header(req, "if-match"), Some("\"*\""));
}

fn reported_twin(id: &str, version: u64, at: &str, state: Value) -> Value {
    let mut reported = state;
    reported["$version"] = json!(version);
    reported["$metadata"] = json!({ "$lastUpdated": at });
    json!({"deviceId": id, "properties": {"desired": {}, "reported": reported}})
}

const T1: &str = "2024-05-01T10:00:00.1000000Z";
const T2: &str = "2024-05-01T10:00:00.2000000Z";

#[test]
fn poll_pages_and_builds_cursor() {
    let mut fake = Fake::with(vec![
        with_headers(
            ok(
                200,
                json!([
                    reported_twin("myapp:1", 3, T1, json!({"t": 1})),
                    reported_twin("other", 1, T1, json!({}))
                ]),
            ),
            &[
                ("x-ms-continuation", "page-2-token"),
                ("x-ms-item-type", "twin"),
            ],
        ),
        ok(
            200,
            json!([reported_twin("myapp:2", 9, T2, json!({"on": true}))]),
        ),
    ]);
    let out = run(&mut fake, |hub| poll(hub, "")).expect("polled");
    let q1 = &fake.requests[0];
    assert_eq!(q1.method, Method::Post);
    assert_eq!(q1.path_and_query, "/devices/query?api-version=2021-04-12");
    assert_eq!(Fake::header(q1, "x-ms-max-item-count"), Some("100"));
    assert!(Fake::header(q1, "x-ms-continuation").is_none());
    assert_eq!(
        Fake::body(q1),
        json!({"query": "SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '1970-01-01T00:00:00'"})
    );
    assert_eq!(
        Fake::header(&fake.requests[1], "x-ms-continuation"),
        Some("page-2-token")
    );

    assert_eq!(out.changes.len(), 2);
    assert_eq!(
        (
            out.changes[0].appid.as_str(),
            out.changes[0].thing_id.as_str()
        ),
        ("myapp", "1")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&out.changes[1].state).ok(),
        Some(json!({"on": true}))
    );
    assert_eq!(out.changes[1].written_at, 1_714_557_600_200);
    assert_eq!(out.next_poll_ms, None);
    assert_eq!(
        out.cursor,
        format!(r#"{{"v":1,"since":"{T2}","seen":["myapp:2@9"]}}"#)
    );

    // The next poll asks from T2 and does not re-deliver myapp:2@9.
    fake.script = vec![ok(
        200,
        json!([reported_twin("myapp:2", 9, T2, json!({"on": true}))]),
    )]
    .into();
    let again = run(&mut fake, |hub| poll(hub, &out.cursor)).expect("polled");
    assert!(
        Fake::body(&fake.requests[2])["query"]
            .as_str()
            .is_some_and(|q| q.ends_with(">= '2024-05-01T10:00:00'"))
    );
    assert!(again.changes.is_empty());
    assert_eq!(again.cursor, out.cursor);
}

#[test]
fn poll_returns_partial_batch_when_a_later_page_fails() {
    let mut fake = Fake::with(vec![
        with_headers(
            ok(
                200,
                json!([reported_twin("myapp:1", 3, T2, json!({"t": 1}))]),
            ),
            &[("x-ms-continuation", "tok")],
        ),
        with_headers(
            azure_err(429, "ThrottlingException", "slow"),
            &[("Retry-After", "7")],
        ),
    ]);
    let out = run(&mut fake, |hub| poll(hub, "")).expect("partial");
    assert_eq!(out.changes.len(), 1);
    assert_eq!(out.next_poll_ms, Some(7_000));
    assert_eq!(
        out.cursor,
        r#"{"v":1,"since":"1970-01-01T00:00:00Z","seen":["myapp:1@3"]}"#
    );
    assert_eq!(fake.sleeps.len(), 0, "polls are not retried in-call");
}

#[test]
fn poll_throttled_on_first_page_is_an_error() {
    let mut fake = Fake::with(vec![azure_err(429, "ThrottlingException", "slow")]);
    let err = run(&mut fake, |hub| poll(hub, "")).expect_err("throttled");
    assert!(
        matches!(
            err,
            Failure::Throttled {
                retry_after_ms: 10_000,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn poll_with_corrupt_cursor_restarts() {
    let mut fake = Fake::with(vec![ok(200, json!([]))]);
    let out = run(&mut fake, |hub| poll(hub, "{not json")).expect("polled");
    assert!(
        Fake::body(&fake.requests[0])["query"]
            .as_str()
            .is_some_and(|q| q.contains("1970-01-01"))
    );
    assert_eq!(Cursor::parse(&out.cursor), Ok(Cursor::initial()));
}

#[test]
fn endpoint_override_changes_where_requests_go_not_the_audience() {
    let map: HashMap<&str, &str> = [
        ("iot_hostname", "127.0.0.1:41234"),
        ("iot_access_key", KEY_B64),
        ("iot_endpoint", "http://127.0.0.1:41234"),
    ]
    .into_iter()
    .collect();
    let cfg = Config::load(|k| Ok(map.get(k).map(|v| v.to_string()))).expect("config");
    let mut fake = Fake::with(vec![ok(204, Value::Null)]);
    let mut tokens = TokenCache::new();
    let mut hub = Hub::new(&cfg, &mut fake, &mut tokens);
    delete(&mut hub, &thing("{}")).expect("deleted");
    let req = &fake.requests[0];
    assert_eq!(req.scheme, crate::platform::Scheme::Http);
    assert_eq!(req.authority, "127.0.0.1:41234");
    assert!(
        Fake::header(req, "authorization").is_some_and(|a| a.contains("sr=127.0.0.1%3A41234&"))
    );
}
