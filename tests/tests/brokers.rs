//! The broker runtime, through the real host: swapping components, the
//! poll timer and its crash safety, contract checks, limits and egress.

use para_tests::{Host, broker_config, fixture, temp_dir, workspace_bin};
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMITS: &str = "para.host.cpu_budget_ms = 300\npara.host.call_timeout_ms = 8000\npara.host.memory_limit_mb = 32";

fn post(host: &Host, name: &str, broker: &str) -> para_tests::Response {
    host.call(
        "POST",
        "/v1/things",
        Some(&json!({"name": name, "serviceBroker": broker})),
    )
}

#[test]
fn swapping_the_component_behind_a_broker_name_needs_no_rebuild() {
    let dir = temp_dir("swap");
    {
        let host = Host::start(&dir, &broker_config("X", &fixture("loopback"), ""));
        let res = post(&host, "a", "X");
        assert_eq!(res.status, 201);
        assert_eq!(res.json()["deviceDetails"]["broker"], "loopback");
    }
    let host = Host::start(&dir, &broker_config("X", &fixture("hostile"), ""));
    let res = post(&host, "b", "X");
    assert_eq!(res.status, 201);
    assert_eq!(res.json()["deviceDetails"]["broker"], "hostile");
}

/// Creates a thing and returns its id.
fn created_id(host: &Host, name: &str, broker: &str) -> String {
    let res = post(host, name, broker);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    res.json()["id"].as_str().unwrap_or_default().to_string()
}

fn state_of(host: &Host, id: &str) -> Value {
    host.call("GET", &format!("/v1/things/{id}"), None).json()["deviceState"].clone()
}

#[test]
fn poll_timer_brings_device_changes_into_device_state() {
    let dir = temp_dir("poll");
    let host = Host::start(&dir, &broker_config("Loop", &fixture("loopback"), ""));
    let id = created_id(&host, "p", "Loop");
    let res = host.call(
        "PATCH",
        &format!("/v1/things/{id}"),
        Some(&json!({"deviceState": {"temp": 21}})),
    );
    assert_eq!(res.status, 200);
    assert_eq!(
        res.json()["deviceState"],
        json!({"temp": 21}),
        "the PATCH answer is the API's write"
    );
    // The loopback "device" echoes the state back; the timer applies it.
    host.eventually(Duration::from_secs(10), || {
        let s = state_of(&host, &id);
        (s == json!({"temp": 21, "echo": 1})).then_some(())
    });
}

#[test]
fn a_crash_between_poll_and_commit_loses_nothing() {
    let dir = temp_dir("crash");
    // Host 1 polls rarely: it creates the thing and queues a device change.
    let slow = broker_config(
        "Loop",
        &fixture("loopback"),
        "para.host.poll_interval_ms = 600000",
    )
    .replace("para.host.poll_interval_ms = 100\n", "");
    let id = {
        let host = Host::start(&dir, &slow);
        let id = created_id(&host, "c", "Loop");
        let res = host.call(
            "PATCH",
            &format!("/v1/things/{id}"),
            Some(&json!({"deviceState": {"v": 1}})),
        );
        assert_eq!(res.status, 200);
        id
    };
    // Host 2 polls, gets the change, and crashes before committing it.
    let crashing = broker_config(
        "Loop",
        &fixture("loopback"),
        "para.host.fault_crash_before_commit = true",
    );
    let mut host = Host::start(&dir, &crashing);
    let status = host
        .process
        .wait_exit(Duration::from_secs(20))
        .expect("host 2 should crash");
    assert!(!status.success());
    drop(host);
    // Host 3 re-delivers from the committed cursor: the change arrives.
    let host = Host::start(&dir, &broker_config("Loop", &fixture("loopback"), ""));
    host.eventually(Duration::from_secs(10), || {
        (state_of(&host, &id) == json!({"v": 1, "echo": 1})).then_some(())
    });
}

#[test]
fn a_component_missing_an_export_is_refused_at_start() {
    let dir = temp_dir("incomplete");
    std::fs::write(
        dir.join("c.toml"),
        broker_config("Bad", &fixture("incomplete"), ""),
    )
    .unwrap();
    let out = Command::new(workspace_bin("para-host"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("c.toml"))
        .arg("--db")
        .arg(dir.join("db"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker Bad"), "{err}");
    assert!(err.contains("missing function(s): poll"), "{err}");

    let check = Command::new(workspace_bin("para-host"))
        .args(["broker", "check"])
        .arg(fixture("incomplete"))
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("poll"));
    let check = Command::new(workspace_bin("para-host"))
        .args(["broker", "check"])
        .arg(fixture("loopback"))
        .output()
        .unwrap();
    assert!(check.status.success());
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("para:broker/thing-broker@0.1.0"), "{text}");
    assert!(text.contains("contract version 0.1.0"), "{text}");
}

#[test]
fn broker_errors_map_to_http_statuses() {
    let dir = temp_dir("errors");
    let host = Host::start(&dir, &broker_config("H", &fixture("hostile"), LIMITS));
    for (name, status, needle) in [
        ("throttle", 503, "ThrottlingException"),
        ("conflict", 409, "DeviceAlreadyExists"),
        ("invalid", 400, "name rejected"),
        ("unauthorized", 502, "credentials"),
        ("missing", 404, "no such device"),
        ("misconfigured", 502, "para.hostile.x"),
        ("unavailable", 503, "cloud down"),
        ("panic", 502, "broker H crashed"),
    ] {
        let res = post(&host, name, "H");
        assert_eq!(
            res.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&res.body)
        );
        let msg = res.json()["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{name}: {msg}");
        assert!(
            msg.contains("H"),
            "{name}: the message names the broker: {msg}"
        );
        if name == "throttle" {
            assert_eq!(res.header("retry-after"), Some("3"));
        }
    }
    // No failed create left a thing behind.
    assert_eq!(host.call("GET", "/v1/things", None).json()["totalHits"], 0);
}

#[test]
fn hostile_components_are_stopped_and_the_host_keeps_serving() {
    let dir = temp_dir("hostile");
    let host = Host::start(&dir, &broker_config("H", &fixture("hostile"), LIMITS));
    let base = host.base.clone();
    let auth = host.auth();
    // A looping guest runs in the background while other requests go on.
    let spinner = std::thread::spawn(move || {
        let t = Instant::now();
        let res = para_tests::request(
            &base,
            "POST",
            "/v1/things",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            Some(br#"{"name":"spin","serviceBroker":"H"}"#),
        )
        .unwrap();
        (res, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    for i in 0..5 {
        let res = post(&host, &format!("ok{i}"), "H");
        assert_eq!(res.status, 201);
    }
    let others = t.elapsed();
    let (spin, spin_time) = spinner.join().unwrap();
    assert_eq!(spin.status, 504, "{}", String::from_utf8_lossy(&spin.body));
    assert!(
        spin.json()["message"]
            .as_str()
            .unwrap()
            .contains("CPU budget")
    );
    assert!(
        others < spin_time,
        "other requests waited for the looping guest"
    );

    let hog = post(&host, "hog", "H");
    assert_eq!(hog.status, 502, "{}", String::from_utf8_lossy(&hog.body));
    assert!(
        hog.json()["message"]
            .as_str()
            .unwrap()
            .contains("ran out of memory")
    );

    let egress = post(&host, "egress", "H");
    assert_eq!(egress.status, 502);
    let msg = egress.json()["message"].as_str().unwrap().to_string();
    assert_eq!(msg.matches("HttpRequestDenied").count(), 2, "{msg}");

    // Still serving, and nothing half-made from the failures.
    assert_eq!(host.call("GET", "/v1/things", None).json()["totalHits"], 5);
}

/// Starts a host whose broker `H` is the hostile fixture, with extra config
/// lines, and returns the error message of creating a thing named `name`.
fn hostile_failure(tag: &str, extra: &str, name: &str) -> String {
    let dir = temp_dir(tag);
    let host = Host::start(
        &dir,
        &broker_config("H", &fixture("hostile"), &format!("{LIMITS}\n{extra}")),
    );
    let res = post(&host, name, "H");
    assert_eq!(res.status, 502, "{}", String::from_utf8_lossy(&res.body));
    res.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn egress_reaches_only_allowed_hosts() {
    // With 127.0.0.1:9 allowed, that call gets past the allowlist (and then
    // fails to connect), while example.com is still denied.
    let msg = hostile_failure(
        "egress-allow",
        "para.brokers.H.allowed_hosts = [\"http://127.0.0.1:9\"]",
        "egress",
    );
    assert_eq!(msg.matches("HttpRequestDenied").count(), 1, "{msg}");
    assert!(
        msg.contains("127.0.0.1:9: refused: ErrorCode::ConnectionRefused"),
        "{msg}"
    );
    // Plain http to a non-loopback host is refused at start.
    let dir = temp_dir("egress-bad");
    let cfg = broker_config(
        "H",
        &fixture("hostile"),
        "para.brokers.H.allowed_hosts = [\"http://example.com\"]",
    );
    let err = Host::try_start(&dir, &cfg).err().expect("must not start");
    assert!(err.contains("exited"), "{err}");
}

#[test]
fn raw_sockets_reach_only_the_endpoints_config_names() {
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, d) = (allowed.local_addr().unwrap(), denied.local_addr().unwrap());
    let keys = format!("para.h.socket_allowed = \"{a}\"\npara.h.socket_denied = \"{d}\"");
    let granted = format!("{keys}\npara.brokers.H.allowed_sockets = [\"{{socket_allowed}}\"]");
    let msg = hostile_failure("sockets", &granted, "socket");
    assert!(msg.contains("socket_allowed: connected"), "{msg}");
    assert!(
        msg.contains("socket_denied: refused (PermissionDenied)"),
        "{msg}"
    );
    // Without a grant, no socket at all.
    let msg = hostile_failure("sockets-none", &keys, "socket");
    assert!(msg.contains("socket_allowed: refused"), "{msg}");
}
