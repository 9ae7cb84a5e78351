//! Device-to-cloud messages over AMQP from the Event Hub-compatible
//! endpoint: the real host, the bundled Azure broker and the emulator's
//! AMQP 1.0 listener over TLS, as separate processes on 127.0.0.1.

use para_tests::{Emulator, Host, temp_dir};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const SYNC: Duration = Duration::from_secs(20);

fn amqp_config(emu: &Emulator) -> String {
    let ready = &emu.process.ready;
    emu.host_config(&format!(
        "para.host.poll_interval_ms = 100\npara.azure.iot_eventhub_endpoint = {:?}\npara.azure.iot_eventhub_name = {:?}\npara.azure.iot_partitions = {}\npara.brokers.Azure.allowed_sockets = [\"{{iot_eventhub_endpoint}}\"]",
        ready["eventHubConnectionString"].as_str().expect("eventHubConnectionString"),
        ready["eventHubName"].as_str().expect("eventHubName"),
        ready["partitions"].as_u64().unwrap_or(4),
    ))
}

fn start(dir: &Path, emu: &Emulator) -> Host {
    Host::start(dir, &amqp_config(emu))
}

fn create(host: &Host, name: &str) -> (String, String) {
    let res = host.call(
        "POST",
        "/v1/things",
        Some(&json!({"name": name, "serviceBroker": "Azure"})),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let v = res.json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["deviceDetails"]["connectionString"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

fn send(emu: &Emulator, cs: &str, body: &Value) {
    let out = emu.device_cmd(cs, &["send", &body.to_string()]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn thing(host: &Host, id: &str) -> Value {
    host.call("GET", &format!("/v1/things/{id}"), None).json()
}

#[test]
fn telemetry_reaches_device_state() {
    let emu = Emulator::start(&[]);
    let dir = temp_dir("amqp-telemetry");
    let host = start(&dir, &emu);
    let (id, cs) = create(&host, "sensor");
    let sent = Instant::now();
    send(&emu, &cs, &json!({"temp": 21}));
    host.eventually(SYNC, || {
        (thing(&host, &id)["deviceState"] == json!({"temp": 21})).then_some(())
    });
    // Measured, not asserted: BENCHMARKS.md records this figure.
    eprintln!("telemetry -> deviceState: {:?}", sent.elapsed());
}

#[test]
fn messages_sent_while_the_host_is_down_all_arrive_in_order() {
    let emu = Emulator::start(&[]);
    let dir = temp_dir("amqp-restart");
    let cfg = amqp_config(&emu);
    let mut devices = Vec::new();
    {
        let host = Host::start(&dir, &cfg);
        for d in 0..10 {
            let (id, cs) = create(&host, &format!("dev{d}"));
            let version = thing(&host, &id)["version"].as_u64().unwrap();
            devices.push((id, cs, version));
        }
    } // host stopped
    for n in 0..10 {
        for (_, cs, _) in &devices {
            send(&emu, cs, &json!({"n": n}));
        }
    }
    let host = Host::start(&dir, &cfg);
    for (id, _, v0) in &devices {
        let t = host.eventually(SYNC, || {
            let t = thing(&host, id);
            (t["deviceState"] == json!({"n": 9})).then_some(t)
        });
        // Each of the 10 messages changed the state exactly once, in order:
        // none lost, none applied twice, none applied after a newer one.
        assert_eq!(t["version"].as_u64().unwrap(), v0 + 10, "{t}");
    }
}

#[test]
fn a_dropped_connection_resumes_without_loss() {
    let emu = Emulator::start(&[]);
    let dir = temp_dir("amqp-drop");
    let host = start(&dir, &emu);
    let (id, cs) = create(&host, "dropper");
    let v0 = thing(&host, &id)["version"].as_u64().unwrap();
    send(&emu, &cs, &json!({"n": -1}));
    host.eventually(SYNC, || {
        (thing(&host, &id)["deviceState"] == json!({"n": -1})).then_some(())
    });
    let res = emu.admin(
        "POST",
        "/_emulator/faults",
        Some(&json!({"kind": "amqpDrop", "afterDeliveries": 3})),
    );
    assert!(res.status < 300, "{}", String::from_utf8_lossy(&res.body));
    for n in 0..12 {
        send(&emu, &cs, &json!({"n": n}));
    }
    let t = host.eventually(SYNC, || {
        let t = thing(&host, &id);
        (t["deviceState"] == json!({"n": 11})).then_some(t)
    });
    assert_eq!(
        t["version"].as_u64().unwrap(),
        v0 + 13,
        "every message applied once: {t}"
    );
    let stats = emu.admin("GET", "/_emulator/stats", None).json();
    assert!(
        stats["faultsInjected"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
}
