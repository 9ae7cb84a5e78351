//! Test harness: starts the real `para-host` and the Azure IoT Hub
//! emulator as separate processes on 127.0.0.1 with OS-assigned ports, and
//! talks to them over real HTTP.
//!
//! The HTTP client is a few dozen lines over `std::net::TcpStream` on
//! purpose: tests control every byte sent (bodies, lengths, headers) and
//! depend on nothing that could hide a protocol mistake.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the fixture components were built.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("FIXTURES_DIR")).join(format!("fixture_{name}.wasm"))
}

/// A workspace binary next to the test executable (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// A fresh directory under the target dir for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let exe = std::env::current_exe().expect("test exe path");
    let base = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("test-tmp");
    let dir = base.join(format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A response: status, headers (lowercased names) and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON (panics with the body text if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request and reads the whole response.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = pos + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = &data[(end + 2).min(data.len())..];
    }
    out
}

/// A running process that prints one JSON "ready" line on stdout.
pub struct Process {
    child: Child,
    /// The ready line.
    pub ready: Value,
}

impl Process {
    /// Spawns `cmd` and waits (up to 120 s) for its JSON ready line.
    pub fn spawn(cmd: Command) -> Result<Process, String> {
        Self::spawn_logged(cmd, None)
    }

    /// Like [`Process::spawn`], with stderr written to `log` if given.
    pub fn spawn_logged(mut cmd: Command, log: Option<&Path>) -> Result<Process, String> {
        cmd.stdout(Stdio::piped());
        match log {
            Some(path) => {
                let file =
                    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
                cmd.stderr(file);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn failed: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| "no ready line within 120 s".to_string())?;
        if line.trim().is_empty() {
            let status = child.wait().map_err(|e| e.to_string())?;
            return Err(format!("process exited before it was ready: {status}"));
        }
        let ready =
            serde_json::from_str(line.trim()).map_err(|e| format!("ready line {line:?}: {e}"))?;
        Ok(Process { child, ready })
    }

    /// Waits for the process to exit by itself (e.g. after a crash).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The root app's secret every test host is configured with
/// (`para.app_secret_key`).
pub const ROOT_SECRET: &str = "test-root-secret-0123456789abcdef";

/// An HS256 JWT for `appid` (e.g. `app:para`), as para-cli's `new-jwt` makes
/// them, valid for an hour.
pub fn jwt(appid: &str, secret: &str) -> String {
    jwt_with(appid, secret, 3600)
}

/// An HS256 JWT expiring `ttl_secs` from now (negative: already expired).
pub fn jwt_with(appid: &str, secret: &str, ttl_secs: i64) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::{Hmac, Mac};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = B64.encode(
        serde_json::json!({"appid": appid, "iat": now, "nbf": now - 5, "exp": now + ttl_secs})
            .to_string(),
    );
    let input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// A running host.
pub struct Host {
    /// The process.
    pub process: Process,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The host's stderr (its log), kept for assertions and failures.
    pub log: PathBuf,
}

impl Host {
    /// Starts `para-host serve` with this config file content (the listen
    /// address is always 127.0.0.1:0 and the database lives in `dir`).
    pub fn start(dir: &Path, config: &str) -> Host {
        Self::try_start(dir, config).unwrap_or_else(|e| panic!("host did not start: {e}"))
    }

    /// Like [`Host::start`], returning the failure instead.
    pub fn try_start(dir: &Path, config: &str) -> Result<Host, String> {
        let cfg = dir.join("para-host.toml");
        let config = format!("para.app_secret_key = {ROOT_SECRET:?}\n{config}");
        std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(workspace_bin("para-host"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--db")
            .arg(dir.join("para.db"))
            .env("RUST_LOG", "info,wasmtime=warn,cranelift=warn");
        for (k, _) in std::env::vars() {
            if k.starts_with("PARA_") {
                cmd.env_remove(k);
            }
        }
        let log = dir.join("host.log");
        let process = Process::spawn_logged(cmd, Some(&log)).map_err(|e| {
            format!(
                "{e}; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        let base = process.ready["listening"]
            .as_str()
            .ok_or("ready line has no 'listening'")?
            .to_string();
        Ok(Host { process, base, log })
    }

    /// Sends a request with an optional JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, bytes.as_deref())
    }

    /// Sends raw body bytes, as the root app.
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let auth = self.auth();
        request(
            &self.base,
            method,
            path,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            body,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Everything the host has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The root app's `Authorization` header value (a Bearer JWT).
    pub fn auth(&self) -> String {
        format!("Bearer {}", jwt("app:para", ROOT_SECRET))
    }

    /// Polls `check` until it returns Some, or panics after `timeout`.
    pub fn eventually<T>(&self, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A config for a host with one broker name mapped to a component.
pub fn broker_config(name: &str, component: &Path, extra: &str) -> String {
    format!(
        "para.iot_enabled = true\npara.host.poll_interval_ms = 100\npara.host.poll_max_backoff_ms = 1000\npara.brokers.{name}.component = {:?}\n{extra}\n",
        component.display().to_string()
    )
}

/// A running Azure IoT Hub emulator (`azure-iot-hub-emulator serve`), with
/// what its ready line said and access to its admin API (`/_emulator/...`).
pub struct Emulator {
    /// The process.
    pub process: Process,
    /// `http://127.0.0.1:PORT`, or `https://…` with `--tls`.
    pub endpoint: String,
    /// The hub host name (SAS `sr`, `HostName=`), `127.0.0.1:PORT`.
    pub hostname: String,
    /// The `iothubowner` policy key.
    pub owner_key: String,
    /// `ca.pem` with `--tls`.
    pub ca_file: Option<PathBuf>,
}

impl Emulator {
    /// Starts `serve --listen 127.0.0.1:0` plus `extra` (e.g. `--tls`).
    pub fn start(extra: &[&str]) -> Emulator {
        let mut cmd = Command::new(workspace_bin("azure-iot-hub-emulator"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(extra);
        let process = Process::spawn(cmd).unwrap_or_else(|e| panic!("emulator did not start: {e}"));
        let field = |k: &str| {
            process.ready[k]
                .as_str()
                .unwrap_or_else(|| panic!("emulator ready line lacks {k}: {}", process.ready))
                .to_string()
        };
        let (endpoint, hostname, owner_key) =
            (field("endpoint"), field("hostname"), field("ownerKey"));
        let ca_file = process.ready["caFile"].as_str().map(PathBuf::from);
        Emulator {
            process,
            endpoint,
            hostname,
            owner_key,
            ca_file,
        }
    }

    /// A host config wired to this emulator through the bundled Azure
    /// broker. `extra` lines are added; a key they set replaces the
    /// default line for that key.
    pub fn host_config(&self, extra: &str) -> String {
        let mut lines = vec![
            "para.iot_enabled = true".to_string(),
            "para.host.poll_interval_ms = 200".to_string(),
            "para.host.poll_max_backoff_ms = 1000".to_string(),
            format!("para.azure.iot_hostname = {:?}", self.hostname),
            format!("para.azure.iot_access_key = {:?}", self.owner_key),
            format!("para.azure.iot_endpoint = {:?}", self.endpoint),
            "para.brokers.Azure.component = \"builtin:azure\"".to_string(),
            format!("para.brokers.Azure.allowed_hosts = [{:?}]", self.endpoint),
        ];
        if let Some(ca) = &self.ca_file {
            lines.push(format!(
                "para.host.tls_ca_file = {:?}",
                ca.display().to_string()
            ));
        }
        let key_of = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        let overridden: Vec<String> = extra
            .lines()
            .filter(|l| l.contains('='))
            .map(key_of)
            .collect();
        lines.retain(|l| !overridden.contains(&key_of(l)));
        format!("{}\n{extra}\n", lines.join("\n"))
    }

    /// Calls the admin API (plain HTTP directly; HTTPS through `curl`
    /// trusting the emulator's CA, as the harness client speaks no TLS).
    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let bytes = body.map(|b| b.to_string().into_bytes());
        if !self.endpoint.starts_with("https://") {
            return request(
                &self.endpoint,
                method,
                path,
                &[("Content-Type", "application/json")],
                bytes.as_deref(),
            )
            .unwrap_or_else(|e| panic!("emulator admin {method} {path}: {e}"));
        }
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ]);
        if let Some(ca) = &self.ca_file {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some(b) = &bytes {
            cmd.arg("--data-binary")
                .arg(String::from_utf8_lossy(b).to_string());
        }
        cmd.arg(format!("{}{path}", self.endpoint));
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("curl is needed for the HTTPS emulator's admin API: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let status = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {path} failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Response {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    /// Every device: `[{"device": …, "twin": …}]`, ordered by id.
    pub fn devices(&self) -> Vec<Value> {
        let res = self.admin("GET", "/_emulator/devices", None);
        assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
        res.json().as_array().cloned().unwrap_or_default()
    }

    /// The ids of every device.
    pub fn device_ids(&self) -> std::collections::BTreeSet<String> {
        self.devices()
            .iter()
            .filter_map(|d| d["device"]["deviceId"].as_str().map(str::to_string))
            .collect()
    }

    /// One device as `{"device": …, "twin": …}`, or `None` if it does not exist.
    pub fn device(&self, id: &str) -> Option<Value> {
        let res = self.admin(
            "GET",
            &format!("/_emulator/devices/{}", percent_encode(id)),
            None,
        );
        match res.status {
            200 => Some(res.json()),
            404 => None,
            s => panic!(
                "emulator admin GET device {id}: {s} {}",
                String::from_utf8_lossy(&res.body)
            ),
        }
    }

    /// Installs fault rules (any form the admin API accepts); returns the installed rules.
    pub fn add_faults(&self, rules: &Value) -> Value {
        let res = self.admin("POST", "/_emulator/faults", Some(rules));
        assert_eq!(
            res.status,
            200,
            "fault rules refused: {}",
            String::from_utf8_lossy(&res.body)
        );
        res.json()
    }

    /// The installed rules with their counters.
    pub fn faults(&self) -> Value {
        self.admin("GET", "/_emulator/faults", None).json()
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        assert_eq!(self.admin("DELETE", "/_emulator/faults", None).status, 204);
    }

    /// `{"total","faultsInjected","byRoute":{route:{status:count}}}`.
    pub fn stats(&self) -> Value {
        self.admin("GET", "/_emulator/stats", None).json()
    }

    /// Resets the request counters.
    pub fn reset_stats(&self) {
        assert_eq!(self.admin("DELETE", "/_emulator/stats", None).status, 204);
    }

    /// How many requests on `route` (a stats label such as
    /// `"PUT /devices/{id}"`) ended with `outcome` (`"200"`, `"dropped"`…).
    pub fn count(&self, route: &str, outcome: &str) -> u64 {
        self.stats()["byRoute"][route][outcome]
            .as_u64()
            .unwrap_or(0)
    }

    /// Runs the device simulator with a connection string against this hub:
    /// `device --connection-string CS --endpoint EP [--ca-file CA] ARGS…`.
    pub fn device_cmd(&self, connection_string: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(workspace_bin("azure-iot-hub-emulator"));
        cmd.args([
            "device",
            "--connection-string",
            connection_string,
            "--endpoint",
            &self.endpoint,
        ]);
        if let Some(ca) = &self.ca_file {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.args(args).output().expect("run the device simulator")
    }

    /// The device reports a JSON object into its twin's reported properties;
    /// panics unless the simulator exits 0.
    pub fn report(&self, connection_string: &str, state: &Value) {
        let out = self.device_cmd(connection_string, &["report", &state.to_string()]);
        assert!(
            out.status.success(),
            "device report {state} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Percent-encodes a path segment (everything but unreserved characters).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
