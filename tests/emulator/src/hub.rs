//! The hub's in-memory state and every operation on it, independent of HTTP.
//!
//! Exists so registry, twin, query and telemetry rules live in one place that the HTTP layer
//! (`server.rs`) only adapts. Each mutating operation validates everything first and changes
//! state last, so a rejected request never has a partial effect.
//!
//! Choices where the reference is silent or UNCONFIRMED:
//! - Device etags are base64 of a hub-wide decimal counter (`"MA=="` is 0), twin etags base64
//!   of a hub-wide 8-byte big-endian counter; hub-wide so a re-created device never reuses an
//!   etag.
//! - Twin `version` and `etag` bump on every twin mutation, including reported updates (§4 says
//!   this is the safe choice).
//! - `PUT /devices/{id}` requires `deviceId` in the body and equal to the path id (every SDK
//!   sends it). An update (with `If-Match`) changes only the fields it carries: `status`,
//!   `statusReason`, `authentication`, `capabilities`, `deviceScope`; absent or null keys keep
//!   the current keys. Read-only fields in the body are ignored (§3.3).
//! - A twin PATCH/PUT from the service that carries `properties.reported` has that part ignored
//!   (the service API only updates tags and desired, §4).
//! - Timestamps are strictly increasing across the hub (one tick apart at least), so
//!   `$lastUpdated >= x` paging is deterministic.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};
use crate::faults::{FaultAction, FaultRule};
use crate::ids::validate_device_id;
use crate::query::Query;
use crate::timefmt::{self, Ticks, UNSET_DEVICE_TIME, UNSET_TWIN_TIME};
use crate::twin::{self, TwinState};

/// Number of D2C partitions (devices are hashed onto them).
pub const PARTITIONS: usize = 4;
/// Largest D2C message, body plus properties (§6).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest page a query returns, whatever `x-ms-max-item-count` asks for (the service "may use
/// a different value", §5; a small cap makes clients honour continuation).
pub const MAX_PAGE: usize = 100;

/// A shared access policy and its rights.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `skn` value, e.g. `iothubowner`.
    pub name: String,
    /// Base64 key as handed out.
    pub key_b64: String,
    /// Decoded HMAC key.
    pub key: Vec<u8>,
    /// RegistryRead.
    pub registry_read: bool,
    /// RegistryWrite.
    pub registry_write: bool,
    /// ServiceConnect (twins, query).
    pub service_connect: bool,
    /// DeviceConnect (device endpoints on behalf of any device).
    pub device_connect: bool,
}

/// The permission a request needs; used by the authorizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read the identity registry.
    RegistryRead,
    /// Write the identity registry.
    RegistryWrite,
    /// Twins and queries.
    ServiceConnect,
    /// Device-side endpoints.
    DeviceConnect,
}

impl Permission {
    /// The right's name as Azure spells it, for 401 messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::RegistryRead => "RegistryRead",
            Self::RegistryWrite => "RegistryWrite",
            Self::ServiceConnect => "ServiceConnect",
            Self::DeviceConnect => "DeviceConnect",
        }
    }
}

impl Policy {
    /// Whether the policy grants `p`.
    pub fn grants(&self, p: Permission) -> bool {
        match p {
            Permission::RegistryRead => self.registry_read,
            Permission::RegistryWrite => self.registry_write,
            Permission::ServiceConnect => self.service_connect,
            Permission::DeviceConnect => self.device_connect,
        }
    }
}

/// A parsed `If-Match` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*` or `"*"`: unconditional.
    Any,
    /// A specific etag (quotes and `W/` removed).
    Etag(String),
}

impl IfMatch {
    /// Parses `*`, `"*"`, `"etag"`, `etag` or `W/"etag"` (SDKs differ, §3.2).
    pub fn parse(raw: &str) -> IfMatch {
        let t = raw.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        let t = if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
            &t[1..t.len() - 1]
        } else {
            t
        };
        if t == "*" {
            IfMatch::Any
        } else {
            IfMatch::Etag(t.to_string())
        }
    }

    fn check(&self, current: &str, what: &str) -> Result<(), ApiError> {
        match self {
            IfMatch::Any => Ok(()),
            IfMatch::Etag(e) if e == current => Ok(()),
            IfMatch::Etag(e) => Err(ApiError::new(
                ErrorCode::PreconditionFailed,
                format!(
                    "Precondition failed: {what} etag did not match. If-Match '{e}', current '{current}'."
                ),
            )),
        }
    }
}

/// One registered device and its twin.
#[derive(Debug, Clone)]
pub struct Device {
    /// The device id (case-sensitive).
    pub id: String,
    /// Hub-generated 18-digit id distinguishing re-created devices.
    pub generation_id: String,
    /// Device etag (unquoted).
    pub etag: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Free text up to 128 characters.
    pub status_reason: Option<String>,
    /// When `status` last changed.
    pub status_updated: Option<String>,
    /// `sas`, `selfSigned`, `certificateAuthority` or `none`.
    pub auth_type: String,
    /// SAS primary key (base64).
    pub primary_key: Option<String>,
    /// SAS secondary key (base64).
    pub secondary_key: Option<String>,
    /// X.509 primary thumbprint.
    pub primary_thumbprint: Option<String>,
    /// X.509 secondary thumbprint.
    pub secondary_thumbprint: Option<String>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// `deviceScope`, if set.
    pub device_scope: Option<String>,
    /// Last device-side request.
    pub last_activity: Option<String>,
    /// The twin.
    pub twin: TwinState,
}

impl Device {
    /// The Device JSON of §3.3.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "deviceId": self.id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": "Disconnected",
            "status": self.status,
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": UNSET_DEVICE_TIME,
            "statusUpdatedTime": self.status_updated.as_deref().unwrap_or(UNSET_DEVICE_TIME),
            "lastActivityTime": self.last_activity.as_deref().unwrap_or(UNSET_DEVICE_TIME),
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
                "x509Thumbprint": {"primaryThumbprint": self.primary_thumbprint, "secondaryThumbprint": self.secondary_thumbprint},
                "type": self.auth_type,
            },
            "capabilities": {"iotEdge": self.iot_edge},
            "parentScopes": [],
        });
        if let (Some(s), Some(o)) = (&self.device_scope, v.as_object_mut()) {
            o.insert("deviceScope".into(), Value::from(s.clone()));
        }
        v
    }

    /// The Twin JSON of §4.
    pub fn twin_json(&self) -> Value {
        let mut v = json!({
            "deviceId": self.id,
            "etag": self.twin.etag(),
            "deviceEtag": self.etag,
            "status": self.status,
            "statusUpdateTime": self.status_updated.as_deref().unwrap_or(UNSET_TWIN_TIME),
            "connectionState": "Disconnected",
            "lastActivityTime": self.last_activity.as_deref().unwrap_or(UNSET_TWIN_TIME),
            "cloudToDeviceMessageCount": 0,
            "authenticationType": self.auth_type,
            "x509Thumbprint": {"primaryThumbprint": self.primary_thumbprint, "secondaryThumbprint": self.secondary_thumbprint},
            "modelId": "",
            "version": self.twin.version,
            "properties": {
                "desired": self.twin.desired.to_json(),
                "reported": self.twin.reported.to_json(),
            },
            "capabilities": {"iotEdge": self.iot_edge},
        });
        if let Some(o) = v.as_object_mut() {
            if let Some(r) = &self.status_reason {
                o.insert("statusReason".into(), Value::from(r.clone()));
            }
            if !self.twin.tags.is_empty() {
                o.insert("tags".into(), Value::Object(self.twin.tags.clone()));
            }
            if let Some(s) = &self.device_scope {
                o.insert("deviceScope".into(), Value::from(s.clone()));
            }
        }
        v
    }
}

/// A stored device-to-cloud message (read back by tests and by the AMQP endpoint).
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// Sender.
    pub device_id: String,
    /// Partition 0..4.
    pub partition: usize,
    /// Per-partition sequence number, from 0.
    pub sequence_number: u64,
    /// Per-partition byte offset (Event Hubs style).
    pub offset: u64,
    /// When the hub accepted it.
    pub enqueued_time: String,
    /// The same instant in Unix milliseconds (`x-opt-enqueued-time`).
    pub enqueued_ms: i64,
    /// The sender's generation id (`iothub-connection-auth-generation-id`).
    pub generation_id: String,
    /// Raw body.
    pub body: Vec<u8>,
    /// Application properties (`iothub-app-` stripped).
    pub properties: BTreeMap<String, String>,
    /// System properties (`messageId`, `contentType`, ...).
    pub system_properties: BTreeMap<String, String>,
}

impl StoredMessage {
    /// The admin API's view of the message.
    pub fn to_json(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "partition": self.partition,
            "sequenceNumber": self.sequence_number,
            "offset": self.offset.to_string(),
            "enqueuedTime": self.enqueued_time,
            "body": std::str::from_utf8(&self.body).ok(),
            "bodyBase64": STANDARD.encode(&self.body),
            "properties": self.properties,
            "systemProperties": self.system_properties,
        })
    }
}

/// Everything that changes while the hub runs.
#[derive(Debug, Default)]
pub struct State {
    /// Devices by id (ordered: queries return them by id).
    pub devices: BTreeMap<String, Device>,
    /// D2C messages in arrival order.
    pub messages: Vec<StoredMessage>,
    next_seq: [u64; PARTITIONS],
    next_offset: [u64; PARTITIONS],
    device_etag_counter: u64,
    twin_etag_counter: u64,
    last_ticks: Ticks,
    /// Installed fault rules.
    pub faults: Vec<FaultRule>,
    next_fault_id: u64,
    /// Request counts: route label → status (or `dropped`) → count.
    pub stats: BTreeMap<String, BTreeMap<String, u64>>,
    /// How many requests a fault rule affected.
    pub faults_injected: u64,
}

impl State {
    fn next_ts(&mut self) -> String {
        let (t, s) = self.candidate_ts();
        self.last_ticks = t;
        s
    }

    /// The timestamp the next mutation would get, without taking it (used to validate a
    /// change on a copy before committing it with `commit_ts`).
    fn candidate_ts(&self) -> (Ticks, String) {
        let t = timefmt::now_ticks().max(self.last_ticks + 1);
        (t, timefmt::iso7(t))
    }

    fn commit_ts(&mut self, t: Ticks) {
        self.last_ticks = t;
    }

    fn next_device_etag(&mut self) -> String {
        let e = STANDARD.encode(self.device_etag_counter.to_string());
        self.device_etag_counter += 1;
        e
    }

    fn next_twin_etag(&mut self) -> u64 {
        self.twin_etag_counter += 1;
        self.twin_etag_counter
    }
}

/// The hub: immutable configuration plus locked state.
#[derive(Debug)]
pub struct Hub {
    /// What SAS `sr` must name and what goes into `HostName=`.
    pub hostname: String,
    /// Shared access policies.
    pub policies: Vec<Policy>,
    state: Mutex<State>,
    /// Bumped after every stored D2C message, so AMQP receivers wake up.
    events: tokio::sync::watch::Sender<u64>,
    /// Open AMQP connections and receivers of the Event Hub-compatible endpoint.
    pub amqp: crate::amqp::Registry,
}

/// Generates `n` random bytes as base64 (device and policy keys).
pub fn random_key(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    STANDARD.encode(bytes)
}

/// Validates a client-supplied symmetric key: strict base64 of 16–64 bytes (§3.3).
pub fn validate_symmetric_key(name: &str, key: &str) -> Result<(), String> {
    let bytes = STANDARD
        .decode(key)
        .map_err(|_| format!("{name} is not valid base64"))?;
    if !(16..=64).contains(&bytes.len()) {
        return Err(format!(
            "{name} must decode to 16-64 bytes, got {}",
            bytes.len()
        ));
    }
    Ok(())
}

fn partition_of(device_id: &str) -> usize {
    let h = Sha256::digest(device_id.as_bytes());
    (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize) % PARTITIONS
}

fn as_object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::invalid(format!("{what} must be a JSON object")))
}

fn opt_str<'a>(
    o: &'a Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<Option<&'a str>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(format!(
            "{what}.{key} must be a string or null"
        ))),
    }
}

/// The mutable fields a device PUT carries.
#[derive(Debug, Default)]
struct DeviceSpec {
    status: Option<String>,
    status_reason: Option<Option<String>>,
    auth: Option<AuthSpec>,
    iot_edge: Option<bool>,
    device_scope: Option<String>,
}

#[derive(Debug)]
struct AuthSpec {
    auth_type: String,
    keys: Option<(String, String)>,
    thumbprints: (Option<String>, Option<String>),
}

fn parse_device_body(id: &str, body: &Value) -> Result<DeviceSpec, ApiError> {
    let o = as_object(body, "the device")?;
    match o.get("deviceId") {
        Some(Value::String(s)) if s == id => {}
        Some(Value::String(s)) => {
            return Err(ApiError::invalid(format!(
                "the deviceId '{s}' in the body does not match the device id '{id}' in the URL"
            )));
        }
        _ => {
            return Err(ApiError::invalid(
                "the body must carry deviceId, equal to the id in the URL",
            ));
        }
    }
    let mut spec = DeviceSpec::default();
    if let Some(s) = opt_str(o, "status", "device")? {
        let s = s.to_ascii_lowercase();
        if s != "enabled" && s != "disabled" {
            return Err(ApiError::invalid(format!(
                "device.status must be 'enabled' or 'disabled', got '{s}'"
            )));
        }
        spec.status = Some(s);
    }
    if o.contains_key("statusReason") {
        let r = opt_str(o, "statusReason", "device")?.map(str::to_string);
        if r.as_ref().is_some_and(|r| r.chars().count() > 128) {
            return Err(ApiError::invalid(
                "device.statusReason is limited to 128 characters",
            ));
        }
        spec.status_reason = Some(r);
    }
    match o.get("capabilities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => match c.get("iotEdge") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => spec.iot_edge = Some(*b),
            Some(_) => {
                return Err(ApiError::invalid(
                    "device.capabilities.iotEdge must be a boolean",
                ));
            }
        },
        Some(_) => return Err(ApiError::invalid("device.capabilities must be an object")),
    }
    spec.device_scope = opt_str(o, "deviceScope", "device")?
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    match o.get("authentication") {
        None | Some(Value::Null) => {}
        Some(a) => spec.auth = Some(parse_auth(as_object(a, "device.authentication")?)?),
    }
    Ok(spec)
}

fn parse_auth(a: &Map<String, Value>) -> Result<AuthSpec, ApiError> {
    let auth_type = match opt_str(a, "type", "device.authentication")? {
        None => "sas".to_string(),
        Some(t) => {
            let known = ["sas", "selfSigned", "certificateAuthority", "none"];
            known
                .iter()
                .find(|k| k.eq_ignore_ascii_case(t))
                .map(|k| k.to_string())
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "device.authentication.type '{t}' is not one of {known:?}"
                    ))
                })?
        }
    };
    let keys = match a.get("symmetricKey") {
        None | Some(Value::Null) => None,
        Some(sk) => {
            let sk = as_object(sk, "device.authentication.symmetricKey")?;
            let p = opt_str(sk, "primaryKey", "device.authentication.symmetricKey")?
                .filter(|s| !s.is_empty());
            let s = opt_str(sk, "secondaryKey", "device.authentication.symmetricKey")?
                .filter(|s| !s.is_empty());
            match (p, s) {
                (None, None) => None,
                (Some(p), Some(s)) => {
                    validate_symmetric_key("primaryKey", p).map_err(ApiError::invalid)?;
                    validate_symmetric_key("secondaryKey", s).map_err(ApiError::invalid)?;
                    Some((p.to_string(), s.to_string()))
                }
                _ => {
                    return Err(ApiError::invalid(
                        "device.authentication.symmetricKey: give both primaryKey and secondaryKey, or neither",
                    ));
                }
            }
        }
    };
    let thumbprints = match a.get("x509Thumbprint") {
        None | Some(Value::Null) => (None, None),
        Some(t) => {
            let t = as_object(t, "device.authentication.x509Thumbprint")?;
            let w = "device.authentication.x509Thumbprint";
            (
                opt_str(t, "primaryThumbprint", w)?
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                opt_str(t, "secondaryThumbprint", w)?
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            )
        }
    };
    if auth_type != "sas" && keys.is_some() {
        return Err(ApiError::invalid(format!(
            "symmetric keys are not allowed with authentication type '{auth_type}'"
        )));
    }
    if auth_type == "selfSigned" && thumbprints.0.is_none() {
        return Err(ApiError::invalid(
            "authentication type 'selfSigned' needs x509Thumbprint.primaryThumbprint",
        ));
    }
    if auth_type != "selfSigned" && (thumbprints.0.is_some() || thumbprints.1.is_some()) {
        return Err(ApiError::invalid(format!(
            "thumbprints are not allowed with authentication type '{auth_type}'"
        )));
    }
    Ok(AuthSpec {
        auth_type,
        keys,
        thumbprints,
    })
}

/// Builds the query continuation token: opaque base64 of the last id and a hash of the query.
fn continuation_token(query_text: &str, last_id: &str) -> String {
    STANDARD.encode(json!({"after": last_id, "q": query_hash(query_text)}).to_string())
}

fn query_hash(query_text: &str) -> String {
    Sha256::digest(query_text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_continuation(query_text: &str, token: &str) -> Result<String, ApiError> {
    let bad = || ApiError::invalid("the x-ms-continuation token is invalid");
    let raw = STANDARD.decode(token.trim()).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    if v.get("q").and_then(Value::as_str) != Some(query_hash(query_text).as_str()) {
        return Err(ApiError::invalid(
            "the x-ms-continuation token belongs to a different query",
        ));
    }
    v.get("after")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(bad)
}

/// An optional JSON object borrowed from a request body.
type OptObject<'a> = Option<&'a Map<String, Value>>;

/// What the service patch/replace body for a twin contains: (tags, desired).
fn twin_parts(body: &Value) -> Result<(OptObject<'_>, OptObject<'_>), ApiError> {
    let o = as_object(body, "the twin")?;
    let tags = match o.get("tags") {
        None | Some(Value::Null) => None,
        Some(t) => Some(as_object(t, "tags")?),
    };
    let desired = match o.get("properties") {
        None | Some(Value::Null) => None,
        Some(p) => match as_object(p, "properties")?.get("desired") {
            None | Some(Value::Null) => None,
            Some(d) => Some(as_object(d, "properties.desired")?),
        },
    };
    Ok((tags, desired))
}

/// Rejects read-only `$` keys at the root of a section patch (e.g. `$version`, `$metadata`).
fn strip_check(path: &str, m: &Map<String, Value>) -> Result<(), ApiError> {
    twin::validate_values(path, m, true).map_err(ApiError::invalid)
}

impl Hub {
    /// A hub for `hostname` with the given policies and no devices.
    pub fn new(hostname: String, policies: Vec<Policy>) -> Self {
        Self {
            hostname,
            policies,
            state: Mutex::new(State::default()),
            events: tokio::sync::watch::Sender::new(0),
            amqp: crate::amqp::Registry::default(),
        }
    }

    /// Locks the state; a poisoned lock (a panic elsewhere) is recovered, not propagated.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds a policy by name.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// `PUT /devices/{id}`: create (no If-Match) or update (If-Match).
    pub fn put_device(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<IfMatch>,
    ) -> Result<Value, ApiError> {
        validate_device_id(id).map_err(ApiError::invalid)?;
        let spec = parse_device_body(id, body)?;
        let mut st = self.lock();
        match if_match {
            None => {
                if st.devices.contains_key(id) {
                    return Err(ApiError::new(
                        ErrorCode::DeviceAlreadyExists,
                        format!("A device with ID '{id}' is already registered."),
                    ));
                }
                let ts = st.next_ts();
                let auth = spec.auth.unwrap_or(AuthSpec {
                    auth_type: "sas".into(),
                    keys: None,
                    thumbprints: (None, None),
                });
                let (pk, sk) = if auth.auth_type == "sas" {
                    let (p, s) = auth
                        .keys
                        .unwrap_or_else(|| (random_key(32), random_key(32)));
                    (Some(p), Some(s))
                } else {
                    (None, None)
                };
                let etag = st.next_device_etag();
                let twin_etag = st.next_twin_etag();
                let generation_id =
                    rand::random_range(100_000_000_000_000_000u64..1_000_000_000_000_000_000u64)
                        .to_string();
                let dev = Device {
                    id: id.to_string(),
                    generation_id,
                    etag,
                    status: spec.status.unwrap_or_else(|| "enabled".into()),
                    status_reason: spec.status_reason.flatten(),
                    status_updated: None,
                    auth_type: auth.auth_type,
                    primary_key: pk,
                    secondary_key: sk,
                    primary_thumbprint: auth.thumbprints.0,
                    secondary_thumbprint: auth.thumbprints.1,
                    iot_edge: spec.iot_edge.unwrap_or(false),
                    device_scope: spec.device_scope,
                    last_activity: None,
                    twin: TwinState::new(&ts, twin_etag),
                };
                let json = dev.to_json();
                st.devices.insert(id.to_string(), dev);
                Ok(json)
            }
            Some(im) => {
                let current = st
                    .devices
                    .get(id)
                    .ok_or_else(|| ApiError::device_not_found(id))?;
                im.check(&current.etag, "device")?;
                let mut dev = current.clone();
                if let Some(s) = spec.status
                    && s != dev.status
                {
                    dev.status = s;
                    dev.status_updated = Some(st.next_ts());
                }
                if let Some(r) = spec.status_reason {
                    dev.status_reason = r;
                }
                if let Some(e) = spec.iot_edge {
                    dev.iot_edge = e;
                }
                if spec.device_scope.is_some() {
                    dev.device_scope = spec.device_scope;
                }
                if let Some(auth) = spec.auth {
                    if auth.auth_type == "sas" {
                        let (p, s) =
                            match (auth.keys, dev.primary_key.take(), dev.secondary_key.take()) {
                                (Some(k), _, _) => k,
                                (None, Some(p), Some(s)) => (p, s),
                                _ => (random_key(32), random_key(32)),
                            };
                        dev.primary_key = Some(p);
                        dev.secondary_key = Some(s);
                    } else {
                        dev.primary_key = None;
                        dev.secondary_key = None;
                    }
                    dev.auth_type = auth.auth_type;
                    dev.primary_thumbprint = auth.thumbprints.0;
                    dev.secondary_thumbprint = auth.thumbprints.1;
                }
                dev.etag = st.next_device_etag();
                let json = dev.to_json();
                st.devices.insert(id.to_string(), dev);
                Ok(json)
            }
        }
    }

    /// `GET /devices/{id}`.
    pub fn get_device(&self, id: &str) -> Result<Value, ApiError> {
        let st = self.lock();
        st.devices
            .get(id)
            .map(Device::to_json)
            .ok_or_else(|| ApiError::device_not_found(id))
    }

    /// `DELETE /devices/{id}`; `If-Match` is mandatory (checked by the caller).
    pub fn delete_device(&self, id: &str, if_match: &IfMatch) -> Result<(), ApiError> {
        let mut st = self.lock();
        let current = st
            .devices
            .get(id)
            .ok_or_else(|| ApiError::device_not_found(id))?;
        if_match.check(&current.etag, "device")?;
        st.devices.remove(id);
        Ok(())
    }

    /// `GET /twins/{id}`.
    pub fn get_twin(&self, id: &str) -> Result<Value, ApiError> {
        let st = self.lock();
        st.devices
            .get(id)
            .map(Device::twin_json)
            .ok_or_else(|| ApiError::device_not_found(id))
    }

    /// `PATCH /twins/{id}` (merge) or `PUT /twins/{id}` (replace) from the service.
    pub fn update_twin(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<IfMatch>,
        replace: bool,
    ) -> Result<Value, ApiError> {
        let (tags, desired) = twin_parts(body)?;
        if let Some(t) = tags {
            strip_check("tags", t)?;
        }
        if let Some(d) = desired {
            strip_check("properties.desired", d)?;
        }
        let mut st = self.lock();
        let dev = st
            .devices
            .get(id)
            .ok_or_else(|| ApiError::device_not_found(id))?;
        if let Some(im) = &if_match {
            im.check(&dev.twin.etag(), "twin")?;
        }
        let mut twin = dev.twin.clone();
        let empty = Map::new();
        let (ticks, ts) = st.candidate_ts();
        if replace {
            twin.tags = twin::patched_tags(&Map::new(), tags.unwrap_or(&empty))
                .map_err(ApiError::invalid)?;
            twin.desired = twin::replaced_section(
                "properties.desired",
                &twin.desired,
                desired.unwrap_or(&empty),
                &ts,
            )
            .map_err(ApiError::invalid)?;
        } else {
            if let Some(t) = tags {
                twin.tags = twin::patched_tags(&twin.tags, t).map_err(ApiError::invalid)?;
            }
            if let Some(d) = desired {
                twin.desired = twin::patched_section("properties.desired", &twin.desired, d, &ts)
                    .map_err(ApiError::invalid)?;
            }
        }
        // Validation passed: commit the timestamp and the new twin.
        st.commit_ts(ticks);
        twin.version += 1;
        twin.etag_counter = st.next_twin_etag();
        let dev = st
            .devices
            .get_mut(id)
            .ok_or_else(|| ApiError::device_not_found(id))?;
        dev.twin = twin;
        Ok(dev.twin_json())
    }

    /// Device-side reported-properties patch (emulator extension of the MQTT operation).
    pub fn patch_reported(&self, id: &str, body: &Value) -> Result<(), ApiError> {
        let patch = as_object(body, "the reported properties patch")?;
        strip_check("properties.reported", patch)?;
        let mut st = self.lock();
        let dev = st
            .devices
            .get(id)
            .ok_or_else(|| ApiError::device_not_found(id))?;
        let (ticks, ts) = st.candidate_ts();
        let reported = twin::patched_section("properties.reported", &dev.twin.reported, patch, &ts)
            .map_err(ApiError::invalid)?;
        st.commit_ts(ticks);
        let etag_counter = st.next_twin_etag();
        let dev = st
            .devices
            .get_mut(id)
            .ok_or_else(|| ApiError::device_not_found(id))?;
        dev.twin.reported = reported;
        dev.twin.version += 1;
        dev.twin.etag_counter = etag_counter;
        dev.last_activity = Some(ts);
        Ok(())
    }

    /// `POST /devices/query`: returns one page and the continuation token, if more remain.
    pub fn query(
        &self,
        query_text: &str,
        q: &Query,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>), ApiError> {
        let after = continuation
            .map(|c| parse_continuation(query_text, c))
            .transpose()?;
        let st = self.lock();
        let lower = match &after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut page = Vec::new();
        let mut last_id = None;
        let mut more = false;
        for (id, dev) in st.devices.range((lower, Bound::Unbounded)) {
            let twin = dev.twin_json();
            if !q.matches(&twin) {
                continue;
            }
            if page.len() == page_size {
                more = true;
                break;
            }
            page.push(twin);
            last_id = Some(id.clone());
        }
        let token = match (more, last_id) {
            (true, Some(id)) => Some(continuation_token(query_text, &id)),
            _ => None,
        };
        Ok((page, token))
    }

    /// `POST /devices/{id}/messages/events`: stores the message on the device's partition.
    pub fn send_event(
        &self,
        id: &str,
        body: Vec<u8>,
        properties: BTreeMap<String, String>,
        system_properties: BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let size = body.len()
            + properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + system_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > MAX_MESSAGE_BYTES {
            return Err(ApiError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "Message size {size} bytes exceeds the maximum of {MAX_MESSAGE_BYTES} bytes (body plus properties)."
                ),
            ));
        }
        let mut st = self.lock();
        if !st.devices.contains_key(id) {
            return Err(ApiError::device_not_found(id));
        }
        let (ticks, ts) = st.candidate_ts();
        st.commit_ts(ticks);
        let generation_id = st
            .devices
            .get(id)
            .map(|d| d.generation_id.clone())
            .unwrap_or_default();
        let partition = partition_of(id);
        let sequence_number = st.next_seq[partition];
        st.next_seq[partition] += 1;
        let offset = st.next_offset[partition];
        st.next_offset[partition] += body.len() as u64;
        if let Some(d) = st.devices.get_mut(id) {
            d.last_activity = Some(ts.clone());
        }
        st.messages.push(StoredMessage {
            device_id: id.to_string(),
            partition,
            sequence_number,
            offset,
            enqueued_time: ts,
            enqueued_ms: i64::try_from(ticks / 10_000).unwrap_or(i64::MAX),
            generation_id,
            body,
            properties,
            system_properties,
        });
        drop(st);
        self.events.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// A receiver that changes whenever a D2C message is stored.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// The sequence number the next message on `partition` will get.
    pub fn partition_end(&self, partition: usize) -> u64 {
        self.lock().next_seq.get(partition).copied().unwrap_or(0)
    }

    /// Up to `limit` stored messages of `partition` with a sequence number of at least
    /// `from_seq` that `admit` accepts, in order.
    pub fn partition_messages(
        &self,
        partition: usize,
        from_seq: u64,
        limit: usize,
        admit: impl Fn(&StoredMessage) -> bool,
    ) -> Vec<StoredMessage> {
        self.lock()
            .messages
            .iter()
            .filter(|m| m.partition == partition && m.sequence_number >= from_seq && admit(m))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Counts one AMQP delivery against the installed `amqpDrop` rules with
    /// `afterDeliveries`; true when one of them fires now (the caller drops the connections).
    pub fn amqp_delivery_tick(&self) -> bool {
        let mut st = self.lock();
        let mut fired = false;
        for r in st.faults.iter_mut() {
            if let FaultAction::AmqpDrop {
                after_deliveries: Some(n),
            } = r.action
                && r.applied == 0
            {
                r.matched += 1;
                if r.matched >= n {
                    r.applied = 1;
                    fired = true;
                }
            }
        }
        if fired {
            st.faults_injected += 1;
        }
        fired
    }

    /// Counts a request against the fault rules; returns the action to take, if any.
    pub fn evaluate_faults(&self, method: &str, path: &str) -> Option<FaultAction> {
        let mut st = self.lock();
        let a = crate::faults::evaluate(&mut st.faults, method, path);
        if a.is_some() {
            st.faults_injected += 1;
        }
        a
    }

    /// Installs fault rules (appended after existing ones); returns all installed rules.
    pub fn install_faults(
        &self,
        specs: Vec<crate::faults::FaultRuleSpec>,
    ) -> Result<Vec<FaultRule>, ApiError> {
        let mut st = self.lock();
        let mut new = Vec::new();
        for s in specs {
            st.next_fault_id += 1;
            new.push(s.into_rule(st.next_fault_id).map_err(ApiError::invalid)?);
        }
        st.faults.extend(new);
        Ok(st.faults.clone())
    }

    /// Records one finished request for `GET /_emulator/stats`.
    pub fn record(&self, route: &str, outcome: &str) {
        let mut st = self.lock();
        *st.stats
            .entry(route.to_string())
            .or_default()
            .entry(outcome.to_string())
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new("h".into(), vec![])
    }

    #[test]
    fn create_conflict_update_delete() {
        let h = hub();
        let d = h
            .put_device("d1", &json!({"deviceId": "d1"}), None)
            .unwrap();
        assert_eq!(d["etag"], "MA==");
        assert_eq!(d["status"], "enabled");
        assert_eq!(d["generationId"].as_str().unwrap().len(), 18);
        let pk = d["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        assert_eq!(STANDARD.decode(pk).unwrap().len(), 32);
        let e = h
            .put_device("d1", &json!({"deviceId": "d1"}), None)
            .unwrap_err();
        assert_eq!((e.status, e.name.as_str()), (409, "DeviceAlreadyExists"));
        let e = h
            .put_device(
                "d1",
                &json!({"deviceId": "d1"}),
                Some(IfMatch::parse("\"nope\"")),
            )
            .unwrap_err();
        assert_eq!(e.status, 412);
        let u = h
            .put_device(
                "d1",
                &json!({"deviceId": "d1", "status": "disabled"}),
                Some(IfMatch::parse("MA==")),
            )
            .unwrap();
        assert_eq!(u["status"], "disabled");
        assert_eq!(u["authentication"]["symmetricKey"]["primaryKey"], pk);
        assert_ne!(u["etag"], "MA==");
        assert_eq!(
            h.delete_device("d1", &IfMatch::parse("\"MA==\""))
                .unwrap_err()
                .status,
            412
        );
        h.delete_device("d1", &IfMatch::parse("\"*\"")).unwrap();
        assert_eq!(h.get_device("d1").unwrap_err().status, 404);
    }

    #[test]
    fn device_body_rules() {
        let h = hub();
        let cases = [
            json!({"deviceId": "other"}),
            json!({}),
            json!({"deviceId": "d", "status": "paused"}),
            json!({"deviceId": "d", "authentication": {"symmetricKey": {"primaryKey": "c2hvcnQ=", "secondaryKey": "c2hvcnQ="}}}),
            json!({"deviceId": "d", "authentication": {"symmetricKey": {"primaryKey": random_key(32)}}}),
            json!({"deviceId": "d", "authentication": {"symmetricKey": {"primaryKey": "not base64!", "secondaryKey": random_key(32)}}}),
            json!({"deviceId": "d", "authentication": {"type": "magic"}}),
            json!([1]),
        ];
        for c in cases {
            let e = h.put_device("d", &c, None).unwrap_err();
            assert_eq!(e.status, 400, "{c}");
        }
        // Keys given: kept; empty strings: generated.
        let (p, s) = (random_key(16), random_key(64));
        let d = h
            .put_device("d", &json!({"deviceId": "d", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": p, "secondaryKey": s}}}), None)
            .unwrap();
        assert_eq!(d["authentication"]["symmetricKey"]["primaryKey"], p);
        let d = h
            .put_device("e", &json!({"deviceId": "e", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}}), None)
            .unwrap();
        assert_eq!(
            d["authentication"]["symmetricKey"]["secondaryKey"]
                .as_str()
                .unwrap()
                .len(),
            44
        );
        assert_eq!(
            h.put_device("a b", &json!({"deviceId": "a b"}), None)
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn twin_updates_bump_versions_and_validate_atomically() {
        let h = hub();
        h.put_device("d", &json!({"deviceId": "d"}), None).unwrap();
        let t0 = h.get_twin("d").unwrap();
        let t1 = h
            .update_twin(
                "d",
                &json!({"tags": {"a": 1}, "properties": {"desired": {"x": {"y": 1}}}}),
                Some(IfMatch::parse("*")),
                false,
            )
            .unwrap();
        assert_eq!(
            t1["version"].as_u64().unwrap(),
            t0["version"].as_u64().unwrap() + 1
        );
        assert_ne!(t1["etag"], t0["etag"]);
        assert_eq!(t1["properties"]["desired"]["$version"], 2);
        assert_eq!(t1["tags"]["a"], 1);
        let etag = t1["etag"].as_str().unwrap().to_string();
        let bad = h
            .update_twin(
                "d",
                &json!({"properties": {"desired": {"arr": [1]}}}),
                None,
                false,
            )
            .unwrap_err();
        assert_eq!(bad.status, 400);
        assert_eq!(h.get_twin("d").unwrap()["etag"], etag.as_str());
        assert_eq!(
            h.update_twin(
                "d",
                &json!({"tags": {}}),
                Some(IfMatch::Etag("x".into())),
                false
            )
            .unwrap_err()
            .status,
            412
        );
        h.patch_reported("d", &json!({"temp": 21})).unwrap();
        let t2 = h.get_twin("d").unwrap();
        assert_eq!(t2["properties"]["reported"]["temp"], 21);
        assert_eq!(t2["properties"]["reported"]["$version"], 2);
        assert!(
            t2["properties"]["reported"]["$metadata"]["$lastUpdated"]
                .as_str()
                .unwrap()
                > t1["properties"]["desired"]["$metadata"]["$lastUpdated"]
                    .as_str()
                    .unwrap()
        );
        let t3 = h
            .update_twin(
                "d",
                &json!({"properties": {"desired": {"z": 1}}}),
                None,
                true,
            )
            .unwrap();
        assert!(t3.get("tags").is_none());
        assert!(t3["properties"]["desired"].get("x").is_none());
        assert_eq!(t3["properties"]["desired"]["z"], 1);
        assert_eq!(t3["properties"]["reported"]["temp"], 21);
    }

    #[test]
    fn query_pages() {
        let h = hub();
        for i in 0..5 {
            let id = format!("d{i}");
            h.put_device(&id, &json!({"deviceId": id}), None).unwrap();
        }
        let text = "SELECT * FROM devices";
        let q = crate::query::parse(text).unwrap();
        let (p1, c1) = h.query(text, &q, 2, None).unwrap();
        assert_eq!(
            p1.iter()
                .map(|t| t["deviceId"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["d0", "d1"]
        );
        let (p2, c2) = h.query(text, &q, 2, c1.as_deref()).unwrap();
        assert_eq!(p2[0]["deviceId"], "d2");
        let (p3, c3) = h.query(text, &q, 2, c2.as_deref()).unwrap();
        assert_eq!(p3.len(), 1);
        assert!(c3.is_none());
        let (_, c) = h.query(text, &q, 5, None).unwrap();
        assert!(c.is_none(), "exactly one full page: no continuation");
        assert!(
            h.query(
                "SELECT * FROM devices WHERE deviceId = 'x'",
                &q,
                2,
                c2.as_deref()
            )
            .is_err()
        );
        assert!(h.query(text, &q, 2, Some("garbage")).is_err());
    }

    #[test]
    fn messages_partitioned() {
        let h = hub();
        h.put_device("d", &json!({"deviceId": "d"}), None).unwrap();
        h.send_event("d", b"a".to_vec(), BTreeMap::new(), BTreeMap::new())
            .unwrap();
        h.send_event("d", b"bb".to_vec(), BTreeMap::new(), BTreeMap::new())
            .unwrap();
        let st = h.lock();
        assert_eq!(st.messages[1].sequence_number, 1);
        assert_eq!(st.messages[1].offset, 1);
        assert_eq!(st.messages[0].partition, partition_of("d"));
        drop(st);
        let e = h
            .send_event(
                "d",
                vec![0; MAX_MESSAGE_BYTES + 1],
                BTreeMap::new(),
                BTreeMap::new(),
            )
            .unwrap_err();
        assert_eq!(e.status, 413);
    }

    #[test]
    fn if_match_forms() {
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"*\""), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"MA==\""), IfMatch::Etag("MA==".into()));
        assert_eq!(IfMatch::parse("MA=="), IfMatch::Etag("MA==".into()));
        assert_eq!(IfMatch::parse("W/\"MA==\""), IfMatch::Etag("MA==".into()));
    }
}
