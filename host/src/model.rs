//! The `Thing` object and its Para JSON shape.
//!
//! Para's JSON (`../shared/reference/para-api.md` §1) always carries the core
//! fields and flattens custom properties into the top level. Two fields are
//! special: `deviceState` is always present, and the broker's metadata is
//! never rendered. `deviceDetails` exists only in the create response and is
//! never stored, so this type has no field for it.

use serde_json::{Map, Value, json};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// A stored thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Thing {
    /// Para id (snowflake, decimal).
    pub id: String,
    /// Owning app, without the `app:` prefix.
    pub appid: String,
    /// Display name.
    pub name: String,
    /// The configured broker name, e.g. `Azure`.
    pub service_broker: String,
    /// The device state, always a JSON object.
    pub device_state: Map<String, Value>,
    /// Non-secret metadata from the broker. Never rendered.
    pub metadata: Map<String, Value>,
    /// Creation time, ms.
    pub timestamp: u64,
    /// Last write time, ms.
    pub updated: Option<u64>,
    /// Increases on every write.
    pub version: u64,
    /// When `device_state` was last written (by the API or a device), ms.
    pub state_updated: u64,
    /// Custom properties and optional Para fields (`tags`, `parentid`, ...).
    pub extra: Map<String, Value>,
}

/// Fields clients may send but never set: Para's locked and bookkeeping fields.
const IGNORED_ON_WRITE: &[&str] = &[
    "id",
    "type",
    "appid",
    "timestamp",
    "updated",
    "version",
    "stored",
    "indexed",
    "cached",
    "plural",
    "objectURI",
    "votes",
    "creatorid",
    "deviceDetails",
    "deviceMetadata",
];

/// A request body that does not describe a valid thing.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct InvalidThing(pub String);

/// The writable part of a thing, parsed and type-checked from a request body.
#[derive(Debug, Default, Clone)]
pub struct ThingInput {
    /// `name`, when given.
    pub name: Option<String>,
    /// `serviceBroker`, when given.
    pub service_broker: Option<String>,
    /// `deviceState`, when given (an explicit null counts as absent, as in Para).
    pub device_state: Option<Map<String, Value>>,
    /// Custom keys; `None` deletes the key on PATCH.
    pub extra: Map<String, Value>,
}

impl ThingInput {
    /// Type-checks a JSON body. Bookkeeping fields are accepted and ignored.
    pub fn from_json(body: Value) -> Result<Self, InvalidThing> {
        let Value::Object(obj) = body else {
            return Err(InvalidThing(format!(
                "the body must be a JSON object describing a thing, got {}",
                kind(&body)
            )));
        };
        let mut input = ThingInput::default();
        for (key, value) in obj {
            match key.as_str() {
                "name" => input.name = opt_string("name", value)?,
                "serviceBroker" => input.service_broker = opt_string("serviceBroker", value)?,
                "deviceState" => match value {
                    Value::Null => {}
                    Value::Object(m) => input.device_state = Some(m),
                    other => {
                        return Err(InvalidThing(format!(
                            "'deviceState' must be a JSON object, got {}",
                            kind(&other)
                        )));
                    }
                },
                k if IGNORED_ON_WRITE.contains(&k) => {}
                _ => {
                    input.extra.insert(key, value);
                }
            }
        }
        Ok(input)
    }
}

fn opt_string(field: &str, value: Value) -> Result<Option<String>, InvalidThing> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(InvalidThing(format!(
            "'{field}' must be a string, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Thing {
    /// Para's PATCH: shallow merge; `deviceState` replaced whole; locked
    /// fields (`serviceBroker` included) ignored; a null custom key deletes it.
    pub fn apply_patch(&mut self, patch: &ThingInput, now: u64) {
        if let Some(name) = patch.name.as_ref().filter(|n| !n.is_empty()) {
            self.name = name.clone();
        }
        if let Some(state) = &patch.device_state {
            self.device_state = state.clone();
            self.state_updated = now;
        }
        for (k, v) in &patch.extra {
            if v.is_null() {
                self.extra.remove(k);
            } else {
                self.extra.insert(k.clone(), v.clone());
            }
        }
    }

    /// Para's PUT: the body replaces everything writable. `serviceBroker`
    /// cannot change (the device lives in that broker's cloud).
    pub fn apply_overwrite(&mut self, input: &ThingInput, now: u64) {
        if let Some(name) = input.name.as_ref().filter(|n| !n.is_empty()) {
            self.name = name.clone();
        }
        self.device_state = input.device_state.clone().unwrap_or_default();
        self.state_updated = now;
        self.extra = input
            .extra
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }

    /// Para JSON for reads: core fields, flattened custom fields, no metadata.
    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        let core = json!({
            "id": self.id,
            "timestamp": self.timestamp,
            "type": "thing",
            "appid": self.appid,
            "name": self.name,
            "votes": 0,
            "version": self.version,
            "stored": true,
            "indexed": true,
            "cached": true,
            "plural": "things",
            "objectURI": format!("/thing/{}", self.id),
            "serviceBroker": self.service_broker,
            "deviceState": self.device_state,
        });
        if let Value::Object(core) = core {
            obj.extend(core);
        }
        if let Some(updated) = self.updated {
            obj.insert("updated".into(), json!(updated));
        }
        Value::Object(obj)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Para's id generator: a modified Twitter snowflake (para-api.md §3).
pub struct IdGenerator {
    worker: u64,
    state: Mutex<(u64, u64)>,
}

const PARA_EPOCH_MS: u64 = 1_310_084_584_692;

impl IdGenerator {
    /// `worker_id` outside 0..=31 is replaced by a random one, as in Para.
    pub fn new(worker_id: u64) -> Self {
        let worker = if worker_id <= 31 {
            worker_id
        } else {
            rand::random::<u64>() % 32
        };
        IdGenerator {
            worker,
            state: Mutex::new((0, 0)),
        }
    }

    /// The next id: `(ms - epoch) << 22 | datacenter(0) << 17 | worker << 12 | seq`.
    pub fn next(&self) -> String {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (last_ms, seq) = *guard;
        let mut now = now_ms().max(last_ms);
        let seq = if now == last_ms {
            let next = (seq + 1) & 0xfff;
            if next == 0 {
                while now <= last_ms {
                    std::thread::yield_now();
                    now = now_ms().max(last_ms);
                }
            }
            next
        } else {
            0
        };
        *guard = (now, seq);
        let id = ((now - PARA_EPOCH_MS) << 22) | (self.worker << 12) | seq;
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_increasing_and_decode_like_para() {
        let g = IdGenerator::new(1);
        let mut prev = 0u64;
        for _ in 0..10_000 {
            let id: u64 = g.next().parse().unwrap();
            assert!(id > prev);
            prev = id;
        }
        assert_eq!((prev >> 12) & 0x1f, 1);
        // The docs' example id decodes to worker 1, sequence 0.
        let doc: u64 = 664870213421895680;
        assert_eq!((doc >> 12) & 0x1f, 1);
        assert_eq!((doc >> 22) + PARA_EPOCH_MS, 1468601996263);
    }

    #[test]
    fn input_ignores_bookkeeping_and_checks_types() {
        let input = ThingInput::from_json(json!({
            "id": null, "stored": true, "indexed": true, "cached": true, "version": 0,
            "name": "A", "serviceBroker": "Azure", "color": "red"
        }))
        .unwrap();
        assert_eq!(input.name.as_deref(), Some("A"));
        assert_eq!(input.extra.len(), 1);
        let err = ThingInput::from_json(json!({"name": 5})).unwrap_err();
        assert_eq!(err.0, "'name' must be a string, got a number");
        let err = ThingInput::from_json(json!({"deviceState": [1]})).unwrap_err();
        assert!(err.0.contains("deviceState"));
        assert!(ThingInput::from_json(json!([1])).is_err());
    }
}
