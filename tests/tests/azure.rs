//! The bundled Azure broker against the strict IoT Hub emulator, over real
//! HTTP(S): the host and the emulator run as separate processes on
//! 127.0.0.1 with OS-assigned ports, and the device side is played by the
//! emulator's `device` simulator with the connection string the API handed
//! out.

use para_tests::{Emulator, Host, Response, temp_dir};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A generous bound for anything the poll loop (200 ms) must bring in.
const SYNC: Duration = Duration::from_secs(10);

/// The stats route the device simulator's reports are counted under.
const REPORTED_ROUTE: &str = "PATCH /twins/{id}/properties/reported";

fn start_host(emu: &Emulator, tag: &str, extra: &str) -> Host {
    Host::start(&temp_dir(tag), &emu.host_config(extra))
}

fn text(res: &Response) -> String {
    String::from_utf8_lossy(&res.body).into_owned()
}

fn post(host: &Host, name: &str) -> Response {
    host.call(
        "POST",
        "/v1/things",
        Some(&json!({"name": name, "serviceBroker": "Azure"})),
    )
}

fn create(host: &Host, name: &str) -> Value {
    let res = post(host, name);
    assert_eq!(res.status, 201, "create {name}: {}", text(&res));
    res.json()
}

fn id_of(thing: &Value) -> String {
    thing["id"].as_str().expect("thing id").to_string()
}

/// The device a thing owns: `{appid}:{id}`.
fn device_of(thing: &Value) -> String {
    format!(
        "{}:{}",
        thing["appid"].as_str().expect("appid"),
        id_of(thing)
    )
}

fn connection_string(created: &Value) -> String {
    created["deviceDetails"]["connectionString"]
        .as_str()
        .expect("deviceDetails.connectionString")
        .to_string()
}

fn patch_state(host: &Host, id: &str, state: Value) -> Response {
    host.call(
        "PATCH",
        &format!("/v1/things/{id}"),
        Some(&json!({ "deviceState": state })),
    )
}

fn state_of(host: &Host, id: &str) -> Value {
    let res = host.call("GET", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 200, "GET thing {id}: {}", text(&res));
    res.json()["deviceState"].clone()
}

/// Strips the hub's `$metadata` and `$version` from twin properties.
fn plain(props: &Value) -> Value {
    let mut p = props.as_object().cloned().unwrap_or_default();
    p.remove("$metadata");
    p.remove("$version");
    Value::Object(p)
}

/// The twin's desired properties, as the hub stores them.
fn desired(emu: &Emulator, device: &str) -> Value {
    let d = emu
        .device(device)
        .unwrap_or_else(|| panic!("device {device} is not in the hub"));
    plain(&d["twin"]["properties"]["desired"])
}

fn reported(emu: &Emulator, device: &str) -> Value {
    let d = emu
        .device(device)
        .unwrap_or_else(|| panic!("device {device} is not in the hub"));
    plain(&d["twin"]["properties"]["reported"])
}

/// The ids of every visible thing.
fn thing_ids(host: &Host) -> BTreeSet<String> {
    let res = host.call("GET", "/v1/things?limit=256", None);
    assert_eq!(res.status, 200, "{}", text(&res));
    let page = res.json();
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        page["totalHits"].as_u64(),
        Some(items.len() as u64),
        "{page}"
    );
    items.iter().map(id_of).collect()
}

/// The invariant: things and devices correspond one to one.
fn assert_one_to_one(host: &Host, emu: &Emulator) -> BTreeSet<String> {
    let things: BTreeSet<String> = thing_ids(host)
        .into_iter()
        .map(|id| format!("para:{id}"))
        .collect();
    let devices = emu.device_ids();
    assert_eq!(
        things,
        devices,
        "things (left) and hub devices (right) differ: things without devices {:?}, devices without things {:?}",
        things.difference(&devices).collect::<Vec<_>>(),
        devices.difference(&things).collect::<Vec<_>>()
    );
    things
}

/// A failed call must be Para's JSON error with a message that names the
/// broker; returns the message.
fn assert_clear_error(res: &Response, what: &str) -> String {
    assert!(
        (400..600).contains(&res.status),
        "{what}: {} {}",
        res.status,
        text(res)
    );
    let body = res.json();
    assert_eq!(body["code"], res.status, "{what}: {body}");
    let msg = body["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("Azure"),
        "{what}: the message names the broker: {msg}"
    );
    msg
}

/// A base64 key that decodes fine but is not the right one.
fn tamper(key: &str) -> String {
    let first = if key.starts_with('A') { "B" } else { "A" };
    format!("{first}{}", &key[1..])
}

fn device_out(out: &std::process::Output) -> String {
    format!(
        "exit {:?}; stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// No request of the broker (every route but the device's own reports) was
/// refused with 401; returns the number of refused device reports.
fn broker_401s_are_zero(emu: &Emulator) -> u64 {
    let stats = emu.stats();
    let mut device_401 = 0;
    for (route, outcomes) in stats["byRoute"].as_object().cloned().unwrap_or_default() {
        let n = outcomes["401"].as_u64().unwrap_or(0);
        if route == REPORTED_ROUTE {
            device_401 = n;
        } else {
            assert_eq!(
                n, 0,
                "the hub refused the broker's SAS token on {route}: {stats}"
            );
        }
    }
    device_401
}

#[test]
fn lifecycle_create_sync_and_delete_against_the_hub() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-life", "");

    // Create: the thing, and its device with hub-generated keys.
    let res = post(&host, "MyThing");
    assert_eq!(res.status, 201, "{}", text(&res));
    let created = res.json();
    let id = id_of(&created);
    assert_eq!(
        created["appid"], "para",
        "auth is off: things belong to the root app"
    );
    assert_eq!(created["name"], "MyThing");
    assert_eq!(created["serviceBroker"], "Azure");
    assert_eq!(created["deviceState"], json!({}));
    let device = format!("para:{id}");
    let record = emu.device(&device).unwrap_or_else(|| {
        panic!(
            "the hub has no device {device}; it has {:?}",
            emu.device_ids()
        )
    });
    assert_eq!(record["device"]["status"], "enabled");
    assert_eq!(record["device"]["authentication"]["type"], "sas");

    let details = &created["deviceDetails"];
    assert_eq!(details["thingId"], id.as_str());
    assert_eq!(details["thingName"], "MyThing");
    let primary = details["primaryKey"]
        .as_str()
        .expect("primaryKey")
        .to_string();
    let secondary = details["secondaryKey"]
        .as_str()
        .expect("secondaryKey")
        .to_string();
    assert!(primary.len() >= 16 && secondary.len() >= 16, "{details}");
    assert_ne!(primary, secondary);
    let keys = &record["device"]["authentication"]["symmetricKey"];
    assert_eq!(
        keys["primaryKey"],
        primary.as_str(),
        "the hub generated the keys"
    );
    assert_eq!(keys["secondaryKey"], secondary.as_str());
    assert_eq!(details["status"], "enabled");
    assert!(
        details
            .get("lastActivity")
            .is_some_and(|v| v.is_string() || v.is_null()),
        "{details}"
    );
    assert_eq!(details["connectionState"], "disconnected");
    let cs = connection_string(&created);
    assert_eq!(
        cs,
        format!(
            "HostName={};DeviceId={device};SharedAccessKey={primary}",
            emu.hostname
        )
    );

    // Reads never show deviceDetails or any key material again.
    for path in [format!("/v1/things/{id}"), "/v1/things".to_string()] {
        let res = host.call("GET", &path, None);
        assert_eq!(res.status, 200, "{path}: {}", text(&res));
        let body = text(&res);
        for secret in [
            primary.as_str(),
            secondary.as_str(),
            "SharedAccessKey",
            "deviceDetails",
        ] {
            assert!(!body.contains(secret), "GET {path} shows {secret}: {body}");
        }
    }
    assert_eq!(
        host.call("GET", &format!("/v1/things/{id}"), None).json()["name"],
        "MyThing"
    );

    // PATCH deviceState goes to the twin's desired properties, whole.
    let res = patch_state(&host, &id, json!({"temp": 20, "mode": "eco"}));
    assert_eq!(res.status, 200, "{}", text(&res));
    assert_eq!(
        res.json()["deviceState"],
        json!({"temp": 20, "mode": "eco"})
    );
    assert!(!text(&res).contains(&primary), "PATCH answer shows the key");
    assert_eq!(desired(&emu, &device), json!({"temp": 20, "mode": "eco"}));
    let res = patch_state(&host, &id, json!({"temp": 21}));
    assert_eq!(res.status, 200, "{}", text(&res));
    assert_eq!(
        desired(&emu, &device),
        json!({"temp": 21}),
        "a key left out of deviceState is removed from desired"
    );

    // A tampered key does not authenticate the device.
    let out = emu.device_cmd(
        &cs.replace(&primary, &tamper(&primary)),
        &["report", r#"{"temp":99}"#],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "tampered key: {}",
        device_out(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        device_out(&out)
    );
    assert_eq!(
        reported(&emu, &device),
        json!({}),
        "the refused report changed nothing"
    );

    // The connection string the API handed out does; the report comes back
    // as the thing's deviceState through the poll loop.
    let out = emu.device_cmd(&cs, &["report", r#"{"temp":22}"#]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "genuine key: {}",
        device_out(&out)
    );
    assert_eq!(reported(&emu, &device), json!({"temp": 22}));
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"temp": 22})).then_some(())
    });
    assert_eq!(
        desired(&emu, &device),
        json!({"temp": 21}),
        "a report does not touch desired"
    );

    // Every broker request carried a SAS token the hub accepted; the only
    // 401 is the tampered device report.
    assert_eq!(broker_401s_are_zero(&emu), 1);
    assert!(emu.count("PUT /devices/{id}", "200") >= 1);
    assert!(emu.count("PATCH /twins/{id}", "200") >= 2);
    assert!(emu.count("POST /devices/query", "200") >= 1);

    // DELETE removes the device; the device can no longer connect.
    let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 200, "{}", text(&res));
    assert!(
        emu.device(&device).is_none(),
        "device {device} outlived its thing"
    );
    assert_eq!(
        host.call("GET", &format!("/v1/things/{id}"), None).status,
        404
    );
    let out = emu.device_cmd(&cs, &["report", r#"{"temp":23}"#]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "deleted device: {}",
        device_out(&out)
    );
    assert!(emu.count("DELETE /devices/{id}", "204") >= 1);
    assert_eq!(broker_401s_are_zero(&emu), 2);
}

#[test]
fn https_works_with_the_configured_ca_and_fails_cleanly_without_it() {
    let emu = Emulator::start(&["--tls"]);
    assert!(
        emu.endpoint.starts_with("https://127.0.0.1:"),
        "{}",
        emu.endpoint
    );
    assert!(emu.ca_file.is_some(), "--tls reports caFile");

    // Without the emulator's CA the broker cannot trust the hub: a clear
    // 5xx naming TLS, and nothing is left behind.
    let no_ca: String = emu
        .host_config("")
        .lines()
        .filter(|l| !l.starts_with("para.host.tls_ca_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    {
        let host = Host::start(&temp_dir("az-tls-noca"), &no_ca);
        let res = post(&host, "Untrusted");
        assert!(
            (500..600).contains(&res.status),
            "{} {}",
            res.status,
            text(&res)
        );
        let msg = assert_clear_error(&res, "create without the CA");
        assert!(msg.contains("TLS"), "the message says TLS failed: {msg}");
        assert!(thing_ids(&host).is_empty(), "a failed create left a thing");
    }
    assert!(emu.device_ids().is_empty(), "a failed create left a device");
    assert_eq!(
        emu.stats()["total"],
        0,
        "no request got past the TLS handshake without the CA"
    );

    // With para.host.tls_ca_file the same broker works end to end.
    let host = start_host(&emu, "az-tls", "");
    let created = create(&host, "Secure");
    let id = id_of(&created);
    let device = device_of(&created);
    assert!(
        emu.device(&device).is_some(),
        "no device {device} over https"
    );
    assert_eq!(
        connection_string(&created),
        format!(
            "HostName={};DeviceId={device};SharedAccessKey={}",
            emu.hostname,
            created["deviceDetails"]["primaryKey"].as_str().unwrap()
        )
    );
    let res = patch_state(&host, &id, json!({"mode": "secure"}));
    assert_eq!(res.status, 200, "{}", text(&res));
    assert_eq!(desired(&emu, &device), json!({"mode": "secure"}));
    assert!(emu.count("GET /twins/{id}", "200") >= 1, "{}", emu.stats());
    // The device reports over https too (simulator with --ca-file).
    emu.report(&connection_string(&created), &json!({"seen": true}));
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"seen": true})).then_some(())
    });
    assert_eq!(broker_401s_are_zero(&emu), 0);
    let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
    assert_eq!(res.status, 200, "{}", text(&res));
    assert!(emu.device_ids().is_empty());
}

#[test]
fn faults_never_leave_a_thing_without_a_device_or_a_device_without_a_thing() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-faults", "");

    // Phase 1: flaky hub. Every second device PUT fails with 503, every
    // second twin PATCH is throttled with Retry-After, one DELETE loses its
    // connection, two twin reads are slow. Operations run concurrently.
    emu.add_faults(&json!({"rules": [
        {"method": "PUT", "pathPrefix": "/devices/", "every": 2, "kind": "status", "status": 503},
        {"method": "PATCH", "pathPrefix": "/twins/", "every": 2, "kind": "status", "status": 429, "retryAfter": 1},
        {"method": "DELETE", "pathPrefix": "/devices/", "count": 1, "kind": "drop"},
        {"method": "GET", "pathPrefix": "/twins/", "count": 2, "kind": "delayMs", "delayMs": 700},
    ]}));
    let outcomes: Vec<(String, Response)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let host = &host;
                scope.spawn(move || {
                    let mut outcomes = Vec::new();
                    for i in 0..2 {
                        let name = format!("flaky-{w}-{i}");
                        let res = post(host, &name);
                        let id = (res.status == 201).then(|| id_of(&res.json()));
                        outcomes.push((format!("create {name}"), res));
                        let Some(id) = id else { continue };
                        let res = patch_state(host, &id, json!({"n": i, "w": w}));
                        outcomes.push((format!("patch {id}"), res));
                        if i == 0 {
                            let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
                            outcomes.push((format!("delete {id}"), res));
                        }
                    }
                    outcomes
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    let mut ok = 0;
    for (what, res) in &outcomes {
        if (200..300).contains(&res.status) {
            ok += 1;
        } else {
            assert_clear_error(res, what);
        }
    }
    assert!(ok > 0, "nothing succeeded against a flaky hub");
    for rule in emu.faults()["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert!(
            rule["applied"].as_u64().unwrap_or(0) >= 1,
            "fault never fired: {rule}"
        );
    }
    let survivors = assert_one_to_one(&host, &emu);
    assert!(!survivors.is_empty());
    emu.clear_faults();

    // Phase 2: failures the broker's in-call retries cannot hide. Each
    // answers a clear error and leaves the pairing intact.
    let keep = create(&host, "keep");
    let keep_id = id_of(&keep);
    let keep_device = device_of(&keep);
    let res = patch_state(&host, &keep_id, json!({"v": 1}));
    assert_eq!(res.status, 200, "{}", text(&res));

    // A create whose device PUT keeps failing with 503.
    emu.add_faults(&json!({"method": "PUT", "pathPrefix": "/devices/", "count": 3, "kind": "status", "status": 503}));
    let res = post(&host, "outage");
    assert_eq!(res.status, 503, "{}", text(&res));
    let msg = assert_clear_error(&res, "create during an outage");
    assert!(msg.contains("ServiceUnavailable"), "{msg}");
    assert_one_to_one(&host, &emu);
    emu.clear_faults();

    // A create whose connections all drop.
    emu.add_faults(
        &json!({"method": "PUT", "pathPrefix": "/devices/", "count": 3, "kind": "drop"}),
    );
    let res = post(&host, "dropped");
    assert_clear_error(&res, "create with dropped connections");
    assert!((500..600).contains(&res.status), "{}", text(&res));
    assert_one_to_one(&host, &emu);
    emu.clear_faults();

    // A PATCH throttled for longer than the broker waits in-call: 503 with
    // Retry-After, and the stored state does not claim the unsent value.
    emu.add_faults(&json!({"method": "PATCH", "pathPrefix": "/twins/", "count": 1, "kind": "status", "status": 429, "retryAfter": 5}));
    let res = patch_state(&host, &keep_id, json!({"v": 2}));
    assert_eq!(res.status, 503, "{}", text(&res));
    let msg = assert_clear_error(&res, "throttled patch");
    assert!(msg.contains("ThrottlingException"), "{msg}");
    assert_eq!(res.header("retry-after"), Some("5"));
    assert_eq!(state_of(&host, &keep_id), json!({"v": 1}));
    assert_eq!(desired(&emu, &keep_device), json!({"v": 1}));
    emu.clear_faults();
    let res = patch_state(&host, &keep_id, json!({"v": 2}));
    assert_eq!(res.status, 200, "the retry succeeds: {}", text(&res));
    assert_eq!(desired(&emu, &keep_device), json!({"v": 2}));

    // A DELETE that keeps failing leaves both the thing and the device.
    // (Every DELETE fails, so the poll loop's janitor, which also works on
    // `deleting` rows, cannot finish it either; see
    // `a_delete_that_answers_503_is_not_finished_behind_the_callers_back`.)
    emu.add_faults(&json!({"method": "DELETE", "pathPrefix": "/devices/", "count": 1000, "kind": "status", "status": 503}));
    let res = host.call("DELETE", &format!("/v1/things/{keep_id}"), None);
    assert_eq!(res.status, 503, "{}", text(&res));
    assert_clear_error(&res, "delete during an outage");
    assert_eq!(
        host.call("GET", &format!("/v1/things/{keep_id}"), None)
            .status,
        200
    );
    assert!(emu.device(&keep_device).is_some());
    assert_one_to_one(&host, &emu);
    emu.clear_faults();
    let res = host.call("DELETE", &format!("/v1/things/{keep_id}"), None);
    assert_eq!(res.status, 200, "{}", text(&res));
    assert!(emu.device(&keep_device).is_none());
    assert_one_to_one(&host, &emu);
    assert_eq!(broker_401s_are_zero(&emu), 0);
}

#[test]
fn a_create_that_times_out_leaves_no_thing_and_no_device() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-timeout", "para.host.call_timeout_ms = 1500");
    // The hub takes 3 s to answer the first device PUT; the host gives the
    // broker call 1.5 s.
    emu.add_faults(&json!({"method": "PUT", "pathPrefix": "/devices/", "count": 1, "kind": "delayMs", "delayMs": 3000}));
    let started = Instant::now();
    let res = post(&host, "slow");
    assert_eq!(res.status, 504, "{}", text(&res));
    let msg = res.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("create the device for thing"), "{msg}");
    assert!(thing_ids(&host).is_empty(), "a timed-out create is visible");

    // The emulator drops a delayed request whose client hung up (the host
    // closes the connection when the call times out), so here the hub never
    // applies the PUT; `a_create_whose_put_the_hub_applies_late_leaves_no_orphan`
    // covers a hub that applies it anyway. Either way, no device without a
    // thing may remain.
    let settle = Duration::from_millis(3000 + 2000);
    std::thread::sleep(settle.saturating_sub(started.elapsed()));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let devices = emu.device_ids();
        if devices.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphan device(s) {devices:?} remain {:?} after a create that answered 504; stats {}",
            started.elapsed(),
            emu.stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(thing_ids(&host).is_empty());
    // The host is healthy afterwards.
    let created = create(&host, "after");
    assert!(emu.device(&device_of(&created)).is_some());
    assert_one_to_one(&host, &emu);
}

#[test]
fn a_wrong_access_key_is_a_clear_502_and_leaves_nothing() {
    let emu = Emulator::start(&[]);
    let host = start_host(
        &emu,
        "az-badkey",
        &format!("para.azure.iot_access_key = {:?}", tamper(&emu.owner_key)),
    );
    let res = post(&host, "refused");
    assert_eq!(res.status, 502, "{}", text(&res));
    let msg = assert_clear_error(&res, "create with a wrong key");
    assert!(
        msg.contains("Unauthorized"),
        "the message says authorization failed: {msg}"
    );
    assert!(
        msg.contains("para.azure.iot_access_key"),
        "the message names the key to fix: {msg}"
    );
    assert!(
        !msg.contains(&emu.owner_key),
        "the message leaks the key: {msg}"
    );
    assert!(thing_ids(&host).is_empty(), "a refused create left a thing");
    assert!(
        emu.device_ids().is_empty(),
        "a refused create left a device"
    );
    assert!(
        emu.count("PUT /devices/{id}", "401") >= 1,
        "{}",
        emu.stats()
    );
    assert_eq!(emu.count("PUT /devices/{id}", "200"), 0);
}

#[test]
fn a_patch_is_not_overwritten_by_an_older_report() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-staterule", "");
    let created = create(&host, "rule");
    let id = id_of(&created);
    let cs = connection_string(&created);
    let steady = |expected: Value, why: &str| {
        // Several poll rounds (200 ms each) must leave the value alone.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            assert_eq!(state_of(&host, &id), expected, "{why}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // An applied report, then an API write: re-reading the hub must not
    // bring the older report back.
    emu.report(&cs, &json!({"a": 1}));
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"a": 1})).then_some(())
    });
    let res = patch_state(&host, &id, json!({"a": 2}));
    assert_eq!(res.status, 200, "{}", text(&res));
    steady(
        json!({"a": 2}),
        "an already-applied report came back over a newer PATCH",
    );

    // A report that is still pending when the API writes: hold the poll
    // loop off with a failing query, report, then PATCH, then let polls
    // through. The older report is delivered and must lose.
    emu.add_faults(&json!({"method": "POST", "pathPrefix": "/devices/query", "count": 100000, "kind": "status", "status": 503}));
    host.eventually(SYNC, || {
        (emu.faults()["rules"][0]["applied"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    emu.report(&cs, &json!({"a": 3}));
    std::thread::sleep(Duration::from_millis(50));
    let res = patch_state(&host, &id, json!({"a": 4}));
    assert_eq!(res.status, 200, "{}", text(&res));
    emu.clear_faults();
    emu.reset_stats();
    host.eventually(SYNC, || {
        (emu.count("POST /devices/query", "200") >= 2).then_some(())
    });
    steady(
        json!({"a": 4}),
        "a report older than the PATCH overwrote it",
    );

    // A newer report wins again.
    emu.report(&cs, &json!({"a": 5}));
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"a": 5})).then_some(())
    });
}

#[test]
fn a_delete_that_answers_503_is_not_finished_behind_the_callers_back() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-delrace", "");
    let created = create(&host, "contested");
    let id = id_of(&created);
    let device = device_of(&created);
    // The first five device DELETEs fail: more than the API's three in-call
    // attempts.
    emu.add_faults(&json!({"method": "DELETE", "pathPrefix": "/devices/", "count": 5, "kind": "status", "status": 503}));
    let res = host.call("DELETE", &format!("/v1/things/{id}"), None);
    let answered = res.status;
    // Give the poll loop (and its janitor) a few rounds.
    std::thread::sleep(Duration::from_millis(2500));
    let thing_now = host.call("GET", &format!("/v1/things/{id}"), None).status;
    let device_now = emu.device(&device).is_some();
    let deletes =
        emu.count("DELETE /devices/{id}", "503") + emu.count("DELETE /devices/{id}", "204");
    match answered {
        200 => assert!(
            thing_now == 404 && !device_now,
            "DELETE answered 200 but thing {thing_now} / device present {device_now}"
        ),
        _ => {
            assert_clear_error(&res, "delete");
            assert!(
                thing_now == 200 && device_now,
                "DELETE answered {answered} ({}) yet afterwards the thing answers {thing_now} and the device exists: {device_now}; the hub saw {deletes} device DELETEs (the API makes at most 3)",
                text(&res)
            );
        }
    }
}

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_example_configs_work_as_documented() {
    // examples/emulator.toml, filled in as examples/emulator-demo.sh does
    // (the harness sets the root secret itself).
    let emu = Emulator::start(&[]);
    let config: String = example("emulator.toml")
        .lines()
        .filter(|l| !l.starts_with("para.app_secret_key"))
        .map(|l| {
            let ready = &emu.process.ready;
            let text = |k: &str| ready[k].as_str().unwrap_or_default().to_string();
            l.replace("@HOSTNAME@", &emu.hostname)
                .replace("@OWNER_KEY@", &emu.owner_key)
                .replace("@ENDPOINT@", &emu.endpoint)
                .replace("@EH_CONNECTION_STRING@", &text("eventHubConnectionString"))
                .replace("@EH_NAME@", &text("eventHubName"))
                .replace("@CA_FILE@", &text("caFile"))
                + "\n"
        })
        .collect();
    assert!(
        !config
            .lines()
            .any(|l| !l.starts_with('#') && l.contains('@')),
        "unfilled placeholder: {config}"
    );
    let host = Host::start(&temp_dir("az-example-emu"), &config);
    let created = create(&host, "FromTemplate");
    assert!(emu.device(&device_of(&created)).is_some());
    // Telemetry reaches deviceState through the template's Event Hub lines.
    let cs = created["deviceDetails"]["connectionString"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let out = emu.device_cmd(&cs, &["send", r#"{"temp":5}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = id_of(&created);
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"temp": 5})).then_some(())
    });
    drop(host);

    // examples/azure.toml starts a host as it is; with its placeholder key a
    // create fails before any request leaves, naming the key to fill in.
    let host = Host::start(&temp_dir("az-example-azure"), &example("azure.toml"));
    let res = post(&host, "NoHubYet");
    assert_eq!(res.status, 502, "{}", text(&res));
    let msg = assert_clear_error(&res, "create with the template's key");
    assert!(msg.contains("para.azure.iot_access_key"), "{msg}");
    assert!(thing_ids(&host).is_empty());
}

/// A loopback HTTP/1.1 relay in front of the emulator. It holds the first
/// request whose request line starts with `hold` for `delay`, then forwards
/// it even though the client has given up by then: what happens when a
/// request already inside the hub's front end is applied after the caller
/// timed out. (The emulator's own `delayMs` fault cannot show this: it
/// abandons a request whose client hung up.)
struct LateRelay {
    endpoint: String,
}

impl LateRelay {
    fn start(upstream: &str, hold: &'static str, delay: Duration) -> LateRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let endpoint = format!("http://{}", listener.local_addr().expect("relay addr"));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let held = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let upstream = upstream.clone();
                let held = held.clone();
                std::thread::spawn(move || relay(client, &upstream, hold, delay, &held));
            }
        });
        LateRelay { endpoint }
    }
}

fn relay(mut client: TcpStream, upstream: &str, hold: &str, delay: Duration, held: &AtomicBool) {
    let Some(request) = read_request(&mut client) else {
        return;
    };
    if request.starts_with(hold.as_bytes()) && !held.swap(true, Ordering::SeqCst) {
        std::thread::sleep(delay);
    }
    // One request per upstream connection, so the answer ends at EOF.
    let Some(line_end) = request.windows(2).position(|w| w == b"\r\n") else {
        return;
    };
    let mut forwarded = request[..line_end + 2].to_vec();
    forwarded.extend_from_slice(b"Connection: close\r\n");
    forwarded.extend_from_slice(&request[line_end + 2..]);
    let Ok(mut up) = TcpStream::connect(upstream) else {
        return;
    };
    if up.write_all(&forwarded).is_err() {
        return;
    }
    let mut response = Vec::new();
    let _ = up.read_to_end(&mut response);
    let _ = client.write_all(&response);
}

/// Reads one request (head and Content-Length body).
fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(buf);
            }
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn a_create_whose_put_the_hub_applies_late_leaves_no_orphan() {
    let emu = Emulator::start(&[]);
    let relay = LateRelay::start(&emu.endpoint, "PUT /devices/", Duration::from_millis(3000));
    let host = start_host(
        &emu,
        "az-late",
        &format!(
            "para.host.call_timeout_ms = 1500\npara.host.janitor_after_ms = 5000\npara.azure.iot_endpoint = {:?}\npara.brokers.Azure.allowed_hosts = [{:?}]",
            relay.endpoint, relay.endpoint
        ),
    );
    let started = Instant::now();
    let res = post(&host, "late");
    assert_eq!(res.status, 504, "{}", text(&res));
    assert!(thing_ids(&host).is_empty(), "a timed-out create is visible");
    // At ~3 s the hub applies the PUT. The janitor undoes `creating` rows
    // older than max(2 x call timeout, 30 s); give it that and a margin (so
    // once the host keeps such rows, this test takes about 35 s).
    let deadline = started + Duration::from_secs(40);
    let mut seen = false;
    loop {
        let devices = emu.device_ids();
        seen |= !devices.is_empty();
        if devices.is_empty() && started.elapsed() > Duration::from_millis(3500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphan device(s) {devices:?} remain {:?} after a create that answered 504 (no thing exists: {:?})",
            started.elapsed(),
            thing_ids(&host)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(thing_ids(&host).is_empty());
    eprintln!("late PUT created a device that was later removed: {seen}");
}

#[test]
fn no_secret_reaches_the_host_log() {
    let emu = Emulator::start(&[]);
    let host = start_host(&emu, "az-logs", "");
    let created = create(&host, "Quiet");
    let id = id_of(&created);
    let details = &created["deviceDetails"];
    let cs = details["connectionString"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    emu.report(&cs, &json!({"temp": 1}));
    host.eventually(SYNC, || {
        (state_of(&host, &id) == json!({"temp": 1})).then_some(())
    });
    let res = host.call(
        "PATCH",
        &format!("/v1/things/{id}"),
        Some(&json!({"deviceState": {"temp": 2}})),
    );
    assert_eq!(res.status, 200);
    assert_eq!(
        host.call("DELETE", &format!("/v1/things/{id}"), None)
            .status,
        200
    );
    let log = host.log_text();
    assert!(log.contains("thing created"), "the log is captured: {log}");
    for secret in [
        details["primaryKey"].as_str().unwrap_or("missing"),
        details["secondaryKey"].as_str().unwrap_or("missing"),
        emu.owner_key.as_str(),
        para_tests::ROOT_SECRET,
        "SharedAccessKey=",
        "SharedAccessSignature",
    ] {
        assert!(!log.contains(secret), "{secret} appears in the host log");
    }
}
