//! The official Azure IoT Hub service SDKs against the emulator, over HTTPS.
//!
//! If these pass, the emulator speaks the wire protocol the SDKs expect:
//! their SAS tokens (Python URL-encodes `sr`, Node sends it raw with
//! lower-case `%2a`-style escapes in `sig`) are accepted, a wrong key is a
//! 401, and the registry, twin and query calls return what the SDKs parse.
//! The SDKs run as child processes (`python3 -c`, `node -e`), print one
//! `SDK_RESULT {json}` line, and the assertions are made here.
//!
//! `.ci/run` installs the SDKs (see `tests/sdk/README.md`):
//!   python3 -m pip install -r tests/sdk/requirements.txt
//!   npm install -g azure-iothub@1.16.6
//! A missing interpreter or SDK fails these tests; it never skips them.

use base64::Engine;
use para_tests::Emulator;
use serde_json::{Value, json};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PY_INSTALL: &str = "python3 -m pip install -r tests/sdk/requirements.txt";
const NODE_INSTALL: &str = "npm install -g azure-iothub@1.16.6";

/// How long one SDK script may take (it normally takes well under 2 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// PyPI `azure-iot-hub`: `IoTHubRegistryManager` from an `iothubowner`
/// connection string, through the SDK's own SAS signing and REST client.
const PY_SCRIPT: &str = r#"
import base64, json, os, sys, traceback
out = {}
def emit():
    print("SDK_RESULT " + json.dumps(out, sort_keys=True), flush=True)
try:
    import importlib.metadata as md
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import Twin, TwinProperties, QuerySpecification
    from msrest.exceptions import HttpOperationError
    out["sdk_version"] = md.version("azure-iot-hub")
except Exception as e:
    out["import_error"] = "%s: %s" % (type(e).__name__, e)
    emit()
    sys.exit(3)

host = os.environ["HUB_HOSTNAME"]
key = os.environ["HUB_OWNER_KEY"]
def cs(k):
    return "HostName=%s;SharedAccessKeyName=iothubowner;SharedAccessKey=%s" % (host, k)
def err(e):
    r = getattr(e, "response", None)
    return {"type": type(e).__name__, "status": getattr(r, "status_code", None),
            "body": getattr(r, "text", None), "message": str(e)}
def keys(d):
    k = d.authentication.symmetric_key
    return {"primary_key": k.primary_key, "secondary_key": k.secondary_key}

step = "from_connection_string"
try:
    rm = IoTHubRegistryManager.from_connection_string(cs(key))
    dev = "sdk-dev:1"

    step = "create_device_with_sas (generated keys)"
    d = rm.create_device_with_sas(dev, None, None, "enabled")
    out["create_generated"] = dict(keys(d), device_id=d.device_id, status=d.status,
        etag=d.etag, generation_id=d.generation_id, auth_type=d.authentication.type)

    step = "create_device_with_sas (given keys)"
    pk = base64.b64encode(bytes(range(32))).decode()
    sk = base64.b64encode(bytes(range(32, 64))).decode()
    d = rm.create_device_with_sas("sdk-dev-2", pk, sk, "disabled")
    out["create_given"] = dict(keys(d), device_id=d.device_id, status=d.status,
        expected_primary=pk, expected_secondary=sk)

    step = "create_device_with_sas (duplicate)"
    try:
        rm.create_device_with_sas(dev, None, None, "enabled")
        out["create_duplicate"] = {"raised": False}
    except HttpOperationError as e:
        out["create_duplicate"] = err(e)

    step = "get_device"
    d = rm.get_device(dev)
    out["get_device"] = dict(keys(d), device_id=d.device_id, status=d.status, etag=d.etag,
        connection_state=d.connection_state)

    step = "update_twin"
    patch = Twin(properties=TwinProperties(desired={"temperature": 21.5, "mode": {"fan": "auto"}}))
    t = rm.update_twin(dev, patch, "*")
    out["update_twin"] = {"device_id": t.device_id, "etag": t.etag, "version": t.version,
        "desired": t.properties.desired}

    step = "get_twin"
    t = rm.get_twin(dev)
    out["get_twin"] = {"device_id": t.device_id, "etag": t.etag, "version": t.version,
        "desired": t.properties.desired, "reported": t.properties.reported}

    step = "query_iot_hub"
    q = rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"))
    def item(i):
        if isinstance(i, dict):
            return {"deviceId": i.get("deviceId"), "desired": i.get("properties", {}).get("desired")}
        return {"deviceId": i.device_id, "desired": i.properties.desired}
    out["query"] = {"type": q.type, "continuation_token": q.continuation_token,
        "items": [item(i) for i in q.items]}

    step = "delete_device"
    rm.delete_device(dev)
    rm.delete_device("sdk-dev-2")
    out["delete_device"] = "ok"

    step = "get_device (deleted)"
    try:
        rm.get_device(dev)
        out["get_deleted"] = {"raised": False}
    except HttpOperationError as e:
        out["get_deleted"] = err(e)

    step = "wrong key"
    bad = IoTHubRegistryManager.from_connection_string(cs(base64.b64encode(b"\0" * 32).decode()))
    try:
        bad.get_device("anything")
        out["wrong_key_get"] = {"raised": False}
    except HttpOperationError as e:
        out["wrong_key_get"] = err(e)
    try:
        bad.create_device_with_sas("sdk-intruder", None, None, "enabled")
        out["wrong_key_create"] = {"raised": False}
    except HttpOperationError as e:
        out["wrong_key_create"] = err(e)
except Exception as e:
    out["failed_step"] = step
    out["error"] = err(e)
    out["traceback"] = traceback.format_exc()
emit()
"#;

/// npm `azure-iothub`: `Registry` from an `iothubowner` connection string.
const NODE_SCRIPT: &str = r#"
const out = {};
const emit = () => console.log('SDK_RESULT ' + JSON.stringify(out));
// The emulator's hub host name is `127.0.0.1:PORT`. azure-iothub hands
// HostName to https.request as a bare `host` (Azure host names never carry
// a port), so split the port off here. Signing still uses the full HostName.
const https = require('https');
const origRequest = https.request;
https.request = function (options, cb) {
  if (options && typeof options === 'object' && typeof options.host === 'string' && !options.port) {
    const m = /^([^:]+):(\d+)$/.exec(options.host);
    if (m) options = Object.assign({}, options, { host: m[1], port: Number(m[2]) });
  }
  return origRequest.call(this, options, cb);
};
let iothub;
try {
  iothub = require('azure-iothub');
  out.sdk_version = require('azure-iothub/package.json').version;
} catch (e) {
  out.import_error = String((e && e.message) || e);
  emit();
  process.exit(3);
}
const host = process.env.HUB_HOSTNAME, key = process.env.HUB_OWNER_KEY;
const cs = (k) => `HostName=${host};SharedAccessKeyName=iothubowner;SharedAccessKey=${k}`;
const err = (e) => ({ name: e && e.name, status: e && e.response && e.response.statusCode,
  body: e && e.responseBody, message: String(e && e.message) });
(async () => {
  let step = 'fromConnectionString';
  try {
    const reg = iothub.Registry.fromConnectionString(cs(key));
    const id = 'node-dev:1';
    step = 'create';
    const d = (await reg.create({ deviceId: id, status: 'enabled' })).responseBody;
    out.create = { deviceId: d.deviceId, status: d.status, etag: d.etag,
      primaryKey: d.authentication.symmetricKey.primaryKey,
      secondaryKey: d.authentication.symmetricKey.secondaryKey };
    step = 'create (duplicate)';
    try { await reg.create({ deviceId: id }); out.createDuplicate = { raised: false }; }
    catch (e) { out.createDuplicate = err(e); }
    step = 'get';
    const g = (await reg.get(id)).responseBody;
    out.get = { deviceId: g.deviceId, primaryKey: g.authentication.symmetricKey.primaryKey };
    step = 'updateTwin';
    const u = (await reg.updateTwin(id, { properties: { desired: { temperature: 19, mode: { fan: 'low' } } } }, '*')).responseBody;
    out.updateTwin = { deviceId: u.deviceId, etag: u.etag, desired: u.properties.desired };
    step = 'getTwin';
    const t = (await reg.getTwin(id)).responseBody;
    out.getTwin = { deviceId: t.deviceId, etag: t.etag, desired: t.properties.desired };
    step = 'createQuery/nextAsTwin';
    const q = reg.createQuery('SELECT * FROM devices', 100);
    const page = await q.nextAsTwin();
    out.query = { hasMoreResults: q.hasMoreResults,
      items: page.result.map((x) => ({ deviceId: x.deviceId, desired: x.properties.desired })) };
    step = 'delete';
    await reg.delete(id);
    out.delete = 'ok';
    step = 'get (deleted)';
    try { await reg.get(id); out.getDeleted = { raised: false }; } catch (e) { out.getDeleted = err(e); }
    step = 'wrong key';
    const bad = iothub.Registry.fromConnectionString(cs(Buffer.alloc(32).toString('base64')));
    try { await bad.get('anything'); out.wrongKey = { raised: false }; } catch (e) { out.wrongKey = err(e); }
  } catch (e) {
    out.failed_step = step;
    out.error = err(e);
    out.stack = String(e && e.stack);
  }
  emit();
  process.exit(0);
})();
"#;

/// Runs an SDK script and returns its `SDK_RESULT` object. Panics with the
/// install command when the interpreter or the SDK is missing, and with the
/// failing step, the SDK's error and the emulator's state when a call fails.
fn run_sdk(mut cmd: Command, what: &str, install: &str, emu: &Emulator) -> Value {
    let ca = emu.ca_file.as_ref().expect("the emulator runs with --tls");
    cmd.env("HUB_HOSTNAME", &emu.hostname)
        .env("HUB_OWNER_KEY", &emu.owner_key)
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start {:?} ({e}); install it, then: {install}",
            cmd.get_program()
        )
    });
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the SDK script") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: the SDK script did not finish within {SCRIPT_TIMEOUT:?}; stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SDK_RESULT "))
        .map(|l| serde_json::from_str::<Value>(l).expect("SDK_RESULT is JSON"))
        .unwrap_or_else(|| {
            panic!(
                "{what}: no SDK_RESULT line (exit {status}); stdout:\n{stdout}\nstderr:\n{stderr}"
            )
        });
    if let Some(e) = result.get("import_error") {
        panic!("{what} is not installed ({e}); install it with: {install}");
    }
    if let Some(step) = result.get("failed_step") {
        panic!(
            "{what}: `{step}` failed against the emulator: {}\n{}\nemulator stats: {}\nemulator devices: {}",
            serde_json::to_string_pretty(&result["error"]).unwrap_or_default(),
            result["traceback"]
                .as_str()
                .or(result["stack"].as_str())
                .unwrap_or_default(),
            emu.stats(),
            json!(emu.devices()),
        );
    }
    assert!(
        status.success(),
        "{what}: script exited {status}; stderr:\n{stderr}"
    );
    result
}

/// `key` decodes as standard padded base64 to exactly `len` bytes.
fn assert_b64_key(key: &Value, len: usize, what: &str) {
    let s = key
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no key: {key}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("{what}: key {s:?} is not base64: {e}"));
    assert_eq!(bytes.len(), len, "{what}: key {s:?}");
}

/// A failed SDK call: the HTTP status and the IoT Hub error code in the body.
fn assert_http_error(e: &Value, status: u64, code: &str, what: &str) {
    assert_eq!(e["status"].as_u64(), Some(status), "{what}: {e}");
    let body = e["body"].as_str().unwrap_or_default();
    assert!(body.contains(code), "{what}: body lacks {code}: {e}");
}

/// Desired properties without `$version`/`$metadata`.
fn user_props(props: &Value) -> Value {
    let mut m = props.as_object().cloned().unwrap_or_default();
    m.retain(|k, _| !k.starts_with('$'));
    Value::Object(m)
}

fn count(stats: &Value, route: &str, outcome: &str) -> u64 {
    stats["byRoute"][route][outcome].as_u64().unwrap_or(0)
}

#[test]
fn python_azure_iot_hub_sdk_works_against_the_emulator() {
    let emu = Emulator::start(&["--tls"]);
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_SCRIPT]);
    let r = run_sdk(cmd, "PyPI azure-iot-hub", PY_INSTALL, &emu);

    // Create with keys the hub generates, and with keys the caller gives.
    let gen_ = &r["create_generated"];
    assert_eq!(gen_["device_id"], "sdk-dev:1", "{r}");
    assert_eq!(gen_["status"], "enabled", "{r}");
    assert_eq!(gen_["auth_type"], "sas", "{r}");
    assert!(gen_["etag"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    assert!(
        gen_["generation_id"]
            .as_str()
            .is_some_and(|g| !g.is_empty()),
        "{r}"
    );
    assert_b64_key(&gen_["primary_key"], 32, "generated primary key");
    assert_b64_key(&gen_["secondary_key"], 32, "generated secondary key");
    assert_ne!(gen_["primary_key"], gen_["secondary_key"], "{r}");
    let given = &r["create_given"];
    assert_eq!(given["device_id"], "sdk-dev-2", "{r}");
    assert_eq!(given["status"], "disabled", "{r}");
    assert_eq!(given["primary_key"], given["expected_primary"], "{r}");
    assert_eq!(given["secondary_key"], given["expected_secondary"], "{r}");
    assert_http_error(
        &r["create_duplicate"],
        409,
        "DeviceAlreadyExists",
        "duplicate create",
    );

    // Read back.
    let got = &r["get_device"];
    assert_eq!(got["device_id"], "sdk-dev:1", "{r}");
    assert_eq!(got["primary_key"], gen_["primary_key"], "{r}");
    assert_eq!(got["secondary_key"], gen_["secondary_key"], "{r}");
    assert_eq!(got["connection_state"], "Disconnected", "{r}");

    // Twin: the PATCH answer and a fresh GET agree on the merged desired props.
    let want = json!({"temperature": 21.5, "mode": {"fan": "auto"}});
    let upd = &r["update_twin"];
    assert_eq!(upd["device_id"], "sdk-dev:1", "{r}");
    assert_eq!(user_props(&upd["desired"]), want, "{r}");
    assert!(
        upd["desired"]["$version"].as_i64().is_some_and(|v| v >= 2),
        "{r}"
    );
    assert!(
        upd["desired"]["$metadata"]["temperature"]["$lastUpdated"].is_string(),
        "{r}"
    );
    let twin = &r["get_twin"];
    assert_eq!(twin["device_id"], "sdk-dev:1", "{r}");
    assert_eq!(user_props(&twin["desired"]), want, "{r}");
    assert_eq!(twin["etag"], upd["etag"], "{r}");
    assert_eq!(twin["version"], upd["version"], "{r}");

    // Query: both twins, one page, typed `twin`.
    let q = &r["query"];
    assert_eq!(q["type"], "twin", "{r}");
    assert!(q["continuation_token"].is_null(), "{r}");
    let items = q["items"].as_array().expect("query items");
    let ids: Vec<&str> = items
        .iter()
        .filter_map(|i| i["deviceId"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{r}");
    assert!(
        ids.contains(&"sdk-dev:1") && ids.contains(&"sdk-dev-2"),
        "{r}"
    );
    let mine = items.iter().find(|i| i["deviceId"] == "sdk-dev:1").unwrap();
    assert_eq!(user_props(&mine["desired"]), want, "{r}");

    // Delete; then the device is gone.
    assert_eq!(r["delete_device"], "ok", "{r}");
    assert_http_error(&r["get_deleted"], 404, "DeviceNotFound", "get after delete");

    // A wrong key is refused, with no side effect.
    assert_http_error(
        &r["wrong_key_get"],
        401,
        "IotHubUnauthorizedAccess",
        "wrong key get",
    );
    assert_http_error(
        &r["wrong_key_create"],
        401,
        "IotHubUnauthorizedAccess",
        "wrong key create",
    );
    assert!(
        emu.device_ids().is_empty(),
        "devices left: {:?}",
        emu.device_ids()
    );

    // The emulator saw exactly the calls the script made.
    let stats = emu.stats();
    for (route, outcome, n) in [
        ("PUT /devices/{id}", "200", 2),
        ("PUT /devices/{id}", "409", 1),
        ("PUT /devices/{id}", "401", 1),
        ("GET /devices/{id}", "200", 1),
        ("GET /devices/{id}", "404", 1),
        ("GET /devices/{id}", "401", 1),
        ("PATCH /twins/{id}", "200", 1),
        ("GET /twins/{id}", "200", 1),
        ("POST /devices/query", "200", 1),
        ("DELETE /devices/{id}", "204", 2),
    ] {
        assert_eq!(
            count(&stats, route, outcome),
            n,
            "{route} {outcome}: {stats}"
        );
    }
    assert_eq!(stats["total"], 12, "{stats}");
}

/// Where `npm install -g` puts packages, so `require('azure-iothub')` finds them.
fn npm_global_root() -> Option<String> {
    let out = Command::new("npm").args(["root", "-g"]).output().ok()?;
    let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && Path::new(&root).is_dir()).then_some(root)
}

#[test]
fn node_azure_iothub_sdk_works_against_the_emulator() {
    let emu = Emulator::start(&["--tls"]);
    let mut cmd = Command::new("node");
    cmd.args(["-e", NODE_SCRIPT]);
    if let Some(root) = npm_global_root() {
        let path = match std::env::var("NODE_PATH") {
            Ok(p) if !p.is_empty() => format!("{root}:{p}"),
            _ => root,
        };
        cmd.env("NODE_PATH", path);
    }
    let r = run_sdk(cmd, "npm azure-iothub", NODE_INSTALL, &emu);

    let created = &r["create"];
    assert_eq!(created["deviceId"], "node-dev:1", "{r}");
    assert_eq!(created["status"], "enabled", "{r}");
    assert_b64_key(&created["primaryKey"], 32, "generated primary key");
    assert_b64_key(&created["secondaryKey"], 32, "generated secondary key");
    assert_http_error(
        &r["createDuplicate"],
        409,
        "DeviceAlreadyExists",
        "duplicate create",
    );
    assert_eq!(r["get"]["deviceId"], "node-dev:1", "{r}");
    assert_eq!(r["get"]["primaryKey"], created["primaryKey"], "{r}");

    let want = json!({"temperature": 19, "mode": {"fan": "low"}});
    assert_eq!(r["updateTwin"]["deviceId"], "node-dev:1", "{r}");
    assert_eq!(user_props(&r["updateTwin"]["desired"]), want, "{r}");
    assert_eq!(user_props(&r["getTwin"]["desired"]), want, "{r}");
    assert_eq!(r["getTwin"]["etag"], r["updateTwin"]["etag"], "{r}");

    assert_eq!(r["query"]["hasMoreResults"], false, "{r}");
    let items = r["query"]["items"].as_array().expect("query items");
    assert_eq!(items.len(), 1, "{r}");
    assert_eq!(items[0]["deviceId"], "node-dev:1", "{r}");
    assert_eq!(user_props(&items[0]["desired"]), want, "{r}");

    assert_eq!(r["delete"], "ok", "{r}");
    assert_http_error(&r["getDeleted"], 404, "DeviceNotFound", "get after delete");
    assert_http_error(&r["wrongKey"], 401, "IotHubUnauthorizedAccess", "wrong key");
    assert!(
        emu.device_ids().is_empty(),
        "devices left: {:?}",
        emu.device_ids()
    );
}
