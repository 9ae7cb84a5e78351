//! End-to-end tests: start the real binary, read its JSON line, and drive it over real HTTP
//! with a deliberately tiny std-only HTTP/1.1 client (so the wire format itself is checked, and
//! a dropped connection is observable as such).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use azure_iot_hub_emulator::sas;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_azure-iot-hub-emulator");
const API: &str = "api-version=2021-04-12";

struct Emu {
    child: Child,
    ready: Value,
    addr: String,
}

impl Emu {
    fn start(extra: &[&str]) -> Emu {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn emulator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        let endpoint = ready["endpoint"].as_str().unwrap();
        let addr = endpoint.split("://").nth(1).unwrap().to_string();
        Emu { child, ready, addr }
    }

    fn hostname(&self) -> String {
        self.ready["hostname"].as_str().unwrap().to_string()
    }

    fn token(&self, policy: &str) -> String {
        let key = if policy == "service" {
            &self.ready["serviceKey"]
        } else {
            &self.ready["ownerKey"]
        };
        // Encode sr like the Python/Java service SDKs do (':' becomes %3A).
        sas::generate_token(
            &sas::url_encode(&self.hostname()),
            key.as_str().unwrap(),
            now() + 3600,
            Some(policy),
        )
        .unwrap()
    }

    fn owner(&self) -> Vec<(&'static str, String)> {
        vec![("Authorization", self.token("iothubowner"))]
    }

    fn req(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Resp {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        http(&self.addr, method, path, headers, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "emulator did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }
    /// Checks the classic error body and header, returns the message text.
    fn error(self, status: u16, name: &str) -> String {
        let r = self.expect(status);
        assert_eq!(r.header("iothub-errorcode"), Some(name));
        let v = r.json();
        let msg = v["Message"].as_str().unwrap().to_string();
        assert!(msg.starts_with(&format!("ErrorCode:{name};")), "{msg}");
        assert!(
            v["ExceptionMessage"]
                .as_str()
                .unwrap()
                .starts_with("Tracking ID:")
        );
        msg
    }
}

fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let err = |m: &str| std::io::Error::other(m.to_string());
    if raw.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| err("no header end"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| err("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| err("bad chunk"))?;
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .map_err(|_| err("bad chunk size"))?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn device_cli(emu: &Emu, id: &str, key: &str, args: &[&str]) -> std::process::Output {
    let cs = format!(
        "HostName={};DeviceId={id};SharedAccessKey={key}",
        emu.hostname()
    );
    Command::new(BIN)
        .args([
            "device",
            "--connection-string",
            &cs,
            "--endpoint",
            emu.ready["endpoint"].as_str().unwrap(),
        ])
        .args(args)
        .output()
        .expect("run device simulator")
}

fn create(emu: &Emu, id: &str) -> Value {
    let path = format!("/devices/{}?{API}", sas::url_encode(id));
    emu.req("PUT", &path, &emu.owner(), Some(&json!({"deviceId": id})))
        .expect(200)
        .json()
}

fn primary_key(device: &Value) -> String {
    device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn registry_twins_device_query_delete() {
    let emu = Emu::start(&[]);
    let endpoint = emu.ready["endpoint"].as_str().unwrap();
    assert!(endpoint.starts_with("http://127.0.0.1:"));
    assert_eq!(emu.hostname(), emu.addr);
    // The CA is always generated now (the AMQP endpoint is TLS-only), even with plain HTTP.
    assert!(emu.ready["caFile"].as_str().unwrap().ends_with("ca.pem"));
    let id = "myapp:123";
    let path = "/devices/myapp%3A123";

    // Create.
    let r = emu
        .req(
            "PUT",
            &format!("{path}?{API}"),
            &emu.owner(),
            Some(&json!({"deviceId": id, "status": null})),
        )
        .expect(200);
    let dev = r.json();
    assert_eq!(
        r.header("etag").unwrap(),
        format!("\"{}\"", dev["etag"].as_str().unwrap())
    );
    assert_eq!(dev["deviceId"], id);
    assert_eq!(dev["status"], "enabled");
    assert_eq!(dev["connectionState"], "Disconnected");
    assert_eq!(dev["authentication"]["type"], "sas");
    let key = primary_key(&dev);
    assert_eq!(key.len(), 44);

    // Conflict, protocol version, auth.
    let msg = emu
        .req(
            "PUT",
            &format!("{path}?{API}"),
            &emu.owner(),
            Some(&json!({"deviceId": id})),
        )
        .error(409, "DeviceAlreadyExists");
    assert!(msg.contains(id));
    emu.req("GET", path, &emu.owner(), None)
        .error(400, "InvalidProtocolVersion");
    emu.req(
        "GET",
        &format!("{path}?api-version=1999-01-01"),
        &emu.owner(),
        None,
    )
    .error(400, "InvalidProtocolVersion");
    let msg = emu
        .req(
            "GET",
            &format!("{path}?{API}"),
            &[(
                "Authorization",
                emu.token("iothubowner").replace("sig=", "sig=A"),
            )],
            None,
        )
        .error(401, "IotHubUnauthorizedAccess");
    assert!(msg.contains("bad signature"), "{msg}");
    let msg = emu
        .req(
            "PUT",
            &format!("/devices/other?{API}"),
            &[("Authorization", emu.token("service"))],
            Some(&json!({"deviceId": "other"})),
        )
        .error(401, "IotHubUnauthorizedAccess");
    assert!(msg.contains("RegistryWrite"), "{msg}");
    emu.req("GET", &format!("{path}?{API}"), &[], None)
        .error(401, "IotHubUnauthorizedAccess");
    emu.req(
        "PUT",
        &format!("/devices/bad%20id?{API}"),
        &emu.owner(),
        Some(&json!({"deviceId": "bad id"})),
    )
    .error(400, "ArgumentInvalid");

    // Get.
    let got = emu
        .req("GET", &format!("{path}?{API}"), &emu.owner(), None)
        .expect(200)
        .json();
    assert_eq!(got["etag"], dev["etag"]);
    emu.req("GET", &format!("/devices/nobody?{API}"), &emu.owner(), None)
        .error(404, "DeviceNotFound");

    // Twin patch from the service (service policy is enough).
    let svc = vec![
        ("Authorization", emu.token("service")),
        ("If-Match", "\"*\"".to_string()),
    ];
    let twin = emu
        .req(
            "PATCH",
            &format!("/twins/myapp%3A123?{API}"),
            &svc,
            Some(&json!({"tags": {"app": "myapp"}, "properties": {"desired": {"color": "red"}}})),
        )
        .expect(200)
        .json();
    assert_eq!(twin["properties"]["desired"]["color"], "red");
    assert_eq!(twin["properties"]["desired"]["$version"], 2);
    assert_eq!(twin["tags"]["app"], "myapp");
    let ts = twin["properties"]["desired"]["$metadata"]["$lastUpdated"]
        .as_str()
        .unwrap();
    assert_eq!(ts.len(), "2026-11-26T20:45:09.1234567Z".len(), "{ts}");
    let stale = vec![
        ("Authorization", emu.token("service")),
        ("If-Match", "\"AAAAAAAAAAE=\"".to_string()),
    ];
    emu.req(
        "PATCH",
        &format!("/twins/myapp%3A123?{API}"),
        &stale,
        Some(&json!({"tags": {"x": 1}})),
    )
    .error(412, "PreconditionFailed");
    let msg = emu
        .req(
            "PATCH",
            &format!("/twins/myapp%3A123?{API}"),
            &svc,
            Some(&json!({"properties": {"desired": {"list": [1, 2]}}})),
        )
        .error(400, "ArgumentInvalid");
    assert!(msg.contains("arrays"), "{msg}");

    // Device reports through the simulator (device SAS from the connection string).
    let out = device_cli(
        &emu,
        id,
        &key,
        &["report", r#"{"temp": 21, "fw": {"v": "1.0"}}"#],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let twin = emu
        .req(
            "GET",
            &format!("/twins/myapp%3A123?{API}"),
            &emu.owner(),
            None,
        )
        .expect(200)
        .json();
    assert_eq!(twin["properties"]["reported"]["temp"], 21);
    assert_eq!(twin["properties"]["reported"]["$version"], 2);
    let reported_ts = twin["properties"]["reported"]["$metadata"]["$lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reported_ts.as_str() > ts);
    let wrong_key = primary_key(&create(&emu, "other"));
    let out = device_cli(&emu, id, &wrong_key, &["report", r#"{"temp": 1}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") && err.contains("bad signature"),
        "{err}"
    );

    // Telemetry, including a chunked body and app properties.
    let out = device_cli(
        &emu,
        id,
        &key,
        &["send", r#"{"temp": 22}"#, "--property", "kind=state"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = sas::generate_token(
        &format!("{}/devices/myapp%3A123", emu.hostname()),
        &key,
        now() + 60,
        None,
    )
    .unwrap();
    let mut s = TcpStream::connect(&emu.addr).unwrap();
    write!(
        s,
        "POST /devices/myapp%3A123/messages/events?{API} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {token}\r\niothub-app-Source: chunky\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw).unwrap().expect(204);
    let big = vec![b'x'; 256 * 1024 + 1];
    let r = http(
        &emu.addr,
        "POST",
        &format!("/devices/myapp%3A123/messages/events?{API}"),
        &[("Authorization", token.clone())],
        &big,
    )
    .unwrap();
    r.error(413, "MessageTooLarge");
    let msgs = emu
        .req("GET", "/_emulator/messages", &[], None)
        .expect(200)
        .json();
    let msgs = msgs.as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["body"], r#"{"temp": 22}"#);
    assert_eq!(msgs[0]["properties"]["kind"], "state");
    assert_eq!(
        msgs[0]["systemProperties"]["contentType"],
        "application/json"
    );
    assert_eq!(msgs[1]["body"], "abcde");
    assert_eq!(msgs[1]["properties"]["source"], "chunky");
    assert_eq!(
        msgs[1]["sequenceNumber"],
        msgs[0]["sequenceNumber"].as_u64().unwrap() + 1
    );

    // Query with continuation: every twin reported (or created) since `reported_ts`.
    for d in ["q-a", "q-b", "q-c", "q-d"] {
        let k = primary_key(&create(&emu, d));
        let out = device_cli(&emu, d, &k, &["report", r#"{"on": true}"#]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let q = json!({"query": format!("SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '{reported_ts}'")});
    let mut ids = Vec::new();
    let mut cont: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut h = emu.owner();
        h.push(("x-ms-max-item-count", "2".to_string()));
        if let Some(c) = &cont {
            h.push(("x-ms-continuation", c.clone()));
        }
        let r = emu
            .req("POST", &format!("/devices/query?{API}"), &h, Some(&q))
            .expect(200);
        assert_eq!(r.header("x-ms-item-type"), Some("twin"));
        pages += 1;
        for t in r.json().as_array().unwrap() {
            ids.push(t["deviceId"].as_str().unwrap().to_string());
        }
        cont = r.header("x-ms-continuation").map(str::to_string);
        if cont.is_none() {
            break;
        }
    }
    assert_eq!(
        ids,
        ["myapp:123", "other", "q-a", "q-b", "q-c", "q-d"],
        "a new twin's reported $lastUpdated is its creation time"
    );
    assert_eq!(pages, 3);
    let msg = emu
        .req(
            "POST",
            &format!("/devices/query?{API}"),
            &emu.owner(),
            Some(&json!({"query": "SELECT deviceId FROM devices"})),
        )
        .error(400, "ArgumentInvalid");
    assert!(msg.contains("projection"), "{msg}");

    // Delete.
    emu.req("DELETE", &format!("{path}?{API}"), &emu.owner(), None)
        .error(400, "ArgumentInvalid");
    let mut h = emu.owner();
    h.push(("If-Match", "\"bm9wZQ==\"".to_string()));
    emu.req("DELETE", &format!("{path}?{API}"), &h, None)
        .error(412, "PreconditionFailed");
    let etag = emu
        .req("GET", &format!("{path}?{API}"), &emu.owner(), None)
        .expect(200)
        .json()["etag"]
        .as_str()
        .unwrap()
        .to_string();
    let mut h = emu.owner();
    h.push(("If-Match", etag));
    emu.req("DELETE", &format!("{path}?{API}"), &h, None)
        .expect(204);
    emu.req("GET", &format!("{path}?{API}"), &emu.owner(), None)
        .error(404, "DeviceNotFound");
    let mut h = emu.owner();
    h.push(("If-Match", "*".to_string()));
    emu.req("DELETE", &format!("{path}?{API}"), &h, None)
        .error(404, "DeviceNotFound");

    let status = emu.stop();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn fault_injection_is_deterministic_and_side_effect_free() {
    let emu = Emu::start(&[]);
    let rules = json!({"rules": [
        {"method": "PUT", "pathPrefix": "/devices/", "count": 1, "kind": "status", "status": 429, "retryAfter": 2},
        {"method": "GET", "pathPrefix": "/twins/", "count": 1, "kind": "drop"},
        {"pathPrefix": "/devices/query", "every": 2, "kind": "status", "status": 503},
        {"method": "GET", "pathPrefix": "/devices/", "count": 1, "kind": "delayMs", "delayMs": 300}
    ]});
    let installed = emu
        .req("POST", "/_emulator/faults", &[], Some(&rules))
        .expect(200)
        .json();
    assert_eq!(installed["rules"].as_array().unwrap().len(), 4);
    emu.req(
        "POST",
        "/_emulator/faults",
        &[],
        Some(&json!({"kind": "explode"})),
    )
    .error(400, "ArgumentInvalid");

    // 429 with Retry-After, and no side effect.
    let path = format!("/devices/f1?{API}");
    let r = emu.req("PUT", &path, &emu.owner(), Some(&json!({"deviceId": "f1"})));
    assert_eq!(r.header("retry-after"), Some("2"));
    r.error(429, "ThrottlingException");
    let t0 = Instant::now();
    emu.req("GET", &path, &emu.owner(), None)
        .error(404, "DeviceNotFound");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "delay fault not applied"
    );
    emu.req("PUT", &path, &emu.owner(), Some(&json!({"deviceId": "f1"})))
        .expect(200);

    // Drop: the connection closes without a response; the next request works.
    let e = http(
        &emu.addr,
        "GET",
        &format!("/twins/f1?{API}"),
        &emu.owner(),
        b"",
    )
    .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{e}"
    );
    emu.req("GET", &format!("/twins/f1?{API}"), &emu.owner(), None)
        .expect(200);

    // Every 2nd query fails with 503.
    let q = json!({"query": "SELECT * FROM devices"});
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            emu.req(
                "POST",
                &format!("/devices/query?{API}"),
                &emu.owner(),
                Some(&q),
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [200, 503, 200, 503]);

    let stats = emu
        .req("GET", "/_emulator/stats", &[], None)
        .expect(200)
        .json();
    assert_eq!(stats["byRoute"]["PUT /devices/{id}"]["429"], 1);
    assert_eq!(stats["byRoute"]["PUT /devices/{id}"]["200"], 1);
    assert_eq!(stats["byRoute"]["GET /twins/{id}"]["dropped"], 1);
    assert_eq!(stats["byRoute"]["POST /devices/query"]["503"], 2);
    assert_eq!(stats["faultsInjected"], 5);

    emu.req("DELETE", "/_emulator/faults", &[], None)
        .expect(204);
    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            emu.req(
                "POST",
                &format!("/devices/query?{API}"),
                &emu.owner(),
                Some(&q),
            )
            .status
        })
        .collect();
    assert_eq!(statuses, [200, 200]);

    let all = emu
        .req("GET", "/_emulator/devices", &[], None)
        .expect(200)
        .json();
    assert_eq!(all[0]["device"]["deviceId"], "f1");
    assert_eq!(all[0]["twin"]["deviceId"], "f1");
    emu.req("GET", "/_emulator/devices/f1", &[], None)
        .expect(200);
    emu.req("GET", "/_emulator/devices/none", &[], None)
        .error(404, "DeviceNotFound");
}

#[test]
fn tls_serves_https_with_generated_ca() {
    let dir = std::env::temp_dir().join(format!("emu-tls-test-{}", std::process::id()));
    let emu = Emu::start(&["--tls", "--cert-dir", dir.to_str().unwrap()]);
    assert!(
        emu.ready["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("https://127.0.0.1:")
    );
    let ca = emu.ready["caFile"].as_str().unwrap().to_string();
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!(
        "{}/devices/tls1?{API}",
        emu.ready["endpoint"].as_str().unwrap()
    );
    let headers = vec![
        ("authorization".to_string(), emu.token("iothubowner")),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    let resp = rt
        .block_on(azure_iot_hub_emulator::client::request(
            "PUT",
            &url,
            &headers,
            br#"{"deviceId":"tls1"}"#.to_vec(),
            Some(std::path::Path::new(&ca)),
        ))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let dev: Value = serde_json::from_slice(&resp.body).unwrap();

    // The simulator's default endpoint is https://{HostName}, trusting --ca-file.
    let cs = format!(
        "HostName={};DeviceId=tls1;SharedAccessKey={}",
        emu.hostname(),
        primary_key(&dev)
    );
    let out = Command::new(BIN)
        .args([
            "device",
            "--connection-string",
            &cs,
            "--ca-file",
            &ca,
            "send",
            r#"{"x":1}"#,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the CA the simulator refuses to talk https.
    let out = Command::new(BIN)
        .args(["device", "--connection-string", &cs, "send", "{}"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    drop(emu);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_plain_http_off_loopback() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to serve plain HTTP"));
}
