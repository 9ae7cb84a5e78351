//! Para-compatible authentication and per-app isolation, over real HTTP.
//!
//! SigV4 requests are signed by botocore (PyPI), an implementation
//! independent of ours; `.ci/run` installs it.

use para_tests::{
    Host, ROOT_SECRET, broker_config, fixture, jwt, jwt_with, request, temp_dir, workspace_bin,
};
use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};

const SIGNER: &str = r#"
import datetime, json, sys
from unittest import mock
import botocore.auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
a = json.load(sys.stdin)
req = AWSRequest(method=a["method"], url=a["url"], data=a["body"].encode(), headers=a["headers"])
now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(seconds=a["age"])
with mock.patch.object(botocore.auth, "get_current_datetime", return_value=now):
    SigV4Auth(Credentials(a["key"], a["secret"]), "para", "us-east-1").add_auth(req)
print(json.dumps({k: v for k, v in req.headers.items()}))
"#;

/// Signs a request with botocore; returns the headers to send.
fn botocore_sign(
    host: &Host,
    method: &str,
    path: &str,
    body: &str,
    key: &str,
    secret: &str,
    age_secs: i64,
) -> Vec<(String, String)> {
    let mut child = Command::new("python3")
        .args(["-c", SIGNER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the botocore SigV4 tests");
    let input = json!({
        "method": method, "url": format!("{}{}", host.base, path), "body": body,
        "headers": {"Content-Type": "application/json"}, "key": key, "secret": secret, "age": age_secs,
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "botocore signer failed (pip install botocore): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers: Value = serde_json::from_slice(&out.stdout).unwrap();
    headers
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn send(
    host: &Host,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> para_tests::Response {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let body = (!body.is_empty()).then_some(body.as_bytes());
    request(&host.base, method, path, &h, body).unwrap()
}

fn create_app(dir: &std::path::Path, name: &str) -> (String, String) {
    let out = Command::new(workspace_bin("para-host"))
        .args(["app", "--config"])
        .arg(dir.join("para-host.toml"))
        .arg("--db")
        .arg(dir.join("para.db"))
        .args(["create", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["accessKey"].as_str().unwrap().to_string(),
        v["secretKey"].as_str().unwrap().to_string(),
    )
}

fn host(tag: &str) -> (Host, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let host = Host::start(&dir, &broker_config("Loop", &fixture("loopback"), ""));
    (host, dir)
}

#[test]
fn botocore_signed_requests_succeed_and_tampering_is_rejected() {
    let (host, dir) = host("sigv4");
    let (key, secret) = create_app(&dir, "shop");
    assert_eq!(key, "app:shop");
    let body = r#"{"name":"Signed","serviceBroker":"Loop"}"#;
    let h = botocore_sign(&host, "POST", "/v1/things", body, &key, &secret, 0);
    let res = send(&host, "POST", "/v1/things", &h, body);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let created = res.json();
    assert_eq!(created["appid"], "shop");
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/things/{id}");
    let h = botocore_sign(&host, "GET", &path, "", &key, &secret, 0);
    assert_eq!(send(&host, "GET", &path, &h, "").status, 200);
    let h = botocore_sign(
        &host,
        "GET",
        "/v1/things?limit=5&sort=name",
        "",
        &key,
        &secret,
        0,
    );
    assert_eq!(
        send(&host, "GET", "/v1/things?limit=5&sort=name", &h, "").status,
        200
    );

    let expect = |res: para_tests::Response, status: u16, needle: &str| {
        assert_eq!(res.status, status, "{}", String::from_utf8_lossy(&res.body));
        let msg = res.json()["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{msg}");
    };
    // A tampered body.
    let h = botocore_sign(&host, "POST", "/v1/things", body, &key, &secret, 0);
    expect(
        send(
            &host,
            "POST",
            "/v1/things",
            &h,
            &body.replace("Signed", "Evil!"),
        ),
        403,
        "Invalid signature for request POST /v1/things coming from app shop",
    );
    // A tampered signed header.
    let mut h = botocore_sign(&host, "POST", "/v1/things", body, &key, &secret, 0);
    for (k, v) in h.iter_mut() {
        if k.eq_ignore_ascii_case("content-type") {
            *v = "text/plain".into();
        }
    }
    expect(
        send(&host, "POST", "/v1/things", &h, body),
        403,
        "Invalid signature",
    );
    // An expired date (older than para.request_expires_after = 900 s).
    let h = botocore_sign(&host, "GET", &path, "", &key, &secret, 1000);
    expect(
        send(&host, "GET", &path, &h, ""),
        400,
        "Request has expired.",
    );
    // A wrong secret.
    let h = botocore_sign(&host, "GET", &path, "", &key, "not-the-secret", 0);
    expect(send(&host, "GET", &path, &h, ""), 403, "Invalid signature");
    // An unknown app.
    let h = botocore_sign(&host, "GET", &path, "", "app:nobody", &secret, 0);
    expect(send(&host, "GET", &path, &h, ""), 404, "App not found.");
    // An inactive app, then active again.
    let toggle = |cmd: &str| {
        let out = Command::new(workspace_bin("para-host"))
            .args(["app", "--db"])
            .arg(dir.join("para.db"))
            .args([cmd, "shop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    toggle("disable");
    let h = botocore_sign(&host, "GET", &path, "", &key, &secret, 0);
    expect(
        send(&host, "GET", &path, &h, ""),
        403,
        "App not active. [app:shop]",
    );
    toggle("enable");
    let h = botocore_sign(&host, "GET", &path, "", &key, &secret, 0);
    assert_eq!(send(&host, "GET", &path, &h, "").status, 200);
}

#[test]
fn missing_credentials_get_401_except_health() {
    let (host, _dir) = host("nocreds");
    let res = request(&host.base, "GET", "/v1/things", &[], None).unwrap();
    assert_eq!(res.status, 401);
    assert!(res.json()["message"].as_str().unwrap().len() > 10);
    let res = request(&host.base, "POST", "/v1/things", &[], Some(b"{}")).unwrap();
    assert_eq!(res.status, 401);
    let res = request(&host.base, "GET", "/healthz", &[], None).unwrap();
    assert_eq!(res.status, 200);
}

#[test]
fn jwt_valid_expired_and_wrong_key() {
    let (host, _dir) = host("jwt");
    let get = |token: &str| {
        let auth = format!("Bearer {token}");
        request(
            &host.base,
            "GET",
            "/v1/things",
            &[("Authorization", &auth)],
            None,
        )
        .unwrap()
    };
    assert_eq!(get(&jwt("app:para", ROOT_SECRET)).status, 200);
    let expired = get(&jwt_with("app:para", ROOT_SECRET, -10));
    assert_eq!(expired.status, 401);
    assert!(
        expired.json()["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    let wrong = get(&jwt("app:para", "some-other-secret"));
    assert_eq!(wrong.status, 401);
    let unknown = get(&jwt("app:ghost", ROOT_SECRET));
    assert_eq!(unknown.status, 404);
}

#[test]
fn apps_are_isolated_on_every_endpoint() {
    let (host, dir) = host("isolation");
    let (a_key, a_secret) = create_app(&dir, "alpha");
    let (b_key, b_secret) = create_app(&dir, "beta");
    let a = format!("Bearer {}", jwt(&a_key, &a_secret));
    let b = format!("Bearer {}", jwt(&b_key, &b_secret));
    let call = |auth: &str, method: &str, path: &str, body: Option<Value>| {
        let bytes = body.map(|v| v.to_string());
        request(
            &host.base,
            method,
            path,
            &[
                ("Authorization", auth),
                ("Content-Type", "application/json"),
            ],
            bytes.as_deref().map(str::as_bytes),
        )
        .unwrap()
    };
    let res = call(
        &a,
        "POST",
        "/v1/things",
        Some(json!({"name": "a1", "serviceBroker": "Loop"})),
    );
    assert_eq!(res.status, 201);
    let a1 = res.json()["id"].as_str().unwrap().to_string();
    let res = call(
        &a,
        "POST",
        "/v1/_batch",
        Some(json!([{"name": "a2", "serviceBroker": "Loop", "type": "thing"}])),
    );
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let a2 = res.json()[0]["id"].as_str().unwrap().to_string();
    assert!(
        res.json()[0]["deviceDetails"].is_object(),
        "batch create goes through the broker"
    );

    // B sees none of A's things, by any route.
    for path in [format!("/v1/things/{a1}"), format!("/v1/thing/{a2}")] {
        assert_eq!(call(&b, "GET", &path, None).status, 404);
        assert_eq!(
            call(&b, "PATCH", &path, Some(json!({"name": "hacked"}))).status,
            404
        );
        assert_eq!(
            call(&b, "PUT", &path, Some(json!({"name": "hacked"}))).status,
            404
        );
        assert_eq!(call(&b, "DELETE", &path, None).status, 404);
    }
    let list = call(&b, "GET", "/v1/things", None).json();
    assert_eq!(list["totalHits"], 0);
    let batch = call(&b, "GET", &format!("/v1/_batch?ids={a1}&ids={a2}"), None).json();
    assert_eq!(batch, json!([]));
    let res = call(
        &b,
        "PATCH",
        "/v1/_batch",
        Some(json!([{"id": a1, "name": "hacked"}])),
    );
    assert_eq!(res.status, 404);
    let res = call(
        &b,
        "PUT",
        "/v1/_batch",
        Some(json!([{"id": a2, "name": "hacked"}])),
    );
    assert_eq!(res.status, 404);
    assert_eq!(
        call(&b, "DELETE", &format!("/v1/_batch?ids={a1}&ids={a2}"), None).status,
        200
    );
    // B's own things are B's.
    assert_eq!(
        call(
            &b,
            "POST",
            "/v1/things",
            Some(json!({"name": "b1", "serviceBroker": "Loop"}))
        )
        .status,
        201
    );
    assert_eq!(call(&b, "GET", "/v1/things", None).json()["totalHits"], 1);

    // A's things are untouched.
    let list = call(&a, "GET", "/v1/things", None).json();
    assert_eq!(list["totalHits"], 2);
    for t in list["items"].as_array().unwrap() {
        assert!(t["name"] == "a1" || t["name"] == "a2", "{t}");
        assert_eq!(t["appid"], "alpha");
    }
    let got = call(&a, "GET", &format!("/v1/_batch?ids={a1}&ids={a2}"), None).json();
    assert_eq!(got.as_array().unwrap().len(), 2);
    let res = call(
        &a,
        "PATCH",
        "/v1/_batch",
        Some(json!([{"id": a1, "deviceState": {"x": 1}}])),
    );
    assert_eq!(res.status, 200);
    assert_eq!(res.json()[0]["deviceState"], json!({"x": 1}));
    assert_eq!(
        call(&a, "DELETE", &format!("/v1/_batch?ids={a1}&ids={a2}"), None).status,
        200
    );
    assert_eq!(call(&a, "GET", "/v1/things", None).json()["totalHits"], 0);
    // The root app saw none of it.
    assert_eq!(host.call("GET", "/v1/things", None).json()["totalHits"], 0);
}

#[test]
fn app_secrets_are_not_in_the_database() {
    let (_host, dir) = host("secrets");
    let (_, secret) = create_app(&dir, "vault");
    let db = std::fs::read(dir.join("para.db")).unwrap();
    let wal = std::fs::read(dir.join("para.db-wal")).unwrap_or_default();
    let hay = [db, wal].concat();
    assert!(
        !hay.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "secret stored in the database"
    );
    assert!(
        !hay.windows(ROOT_SECRET.len())
            .any(|w| w == ROOT_SECRET.as_bytes())
    );
    let list = Command::new(workspace_bin("para-host"))
        .args(["app", "--db"])
        .arg(dir.join("para.db"))
        .arg("list")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("app:vault\tactive"), "{text}");
    assert!(!text.contains(&secret));
}
