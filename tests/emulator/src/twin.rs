//! Twin documents: tags, desired and reported properties with `$version` and `$metadata`,
//! JSON merge-patch, and the size/shape limits of reference §4.
//!
//! Exists as its own module so the merge and limit rules are unit-testable without HTTP.
//!
//! Choices (reference §4 leaves some open):
//! - Every node of desired/reported carries `$lastUpdated` (7-digit ISO UTC); desired nodes also
//!   carry `$lastUpdatedVersion`. Every object on the path of a change, including the section
//!   root, gets the new timestamp, so `properties.reported.$metadata.$lastUpdated` is the time of
//!   the last reported change (what the broker's query relies on).
//! - Depth: a section may nest at most 10 objects below its root (the devguide's
//!   `one`…`ten` example with a leaf inside `ten` is valid; an 11th object is not).
//! - Size: UTF-8 key length plus value length, numbers 8 bytes, booleans 4, `$` elements
//!   excluded; tags ≤ 8 KB, desired and reported ≤ 32 KB each. String values ≤ 4 KB.
//! - Keys: non-empty, ≤ 1 KB UTF-8, no `.`, `$`, space, or control characters (C0, DEL, C1).
//! - Integers must lie in [-4503599627370496, 4503599627370495]; arrays are rejected (the
//!   2020 devguide; their later acceptance is UNCONFIRMED for 2021-04-12, so strict wins).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Maximum size of `tags`, in bytes.
pub const TAGS_LIMIT: usize = 8 * 1024;
/// Maximum size of `properties.desired` and of `properties.reported`, in bytes.
pub const PROPERTIES_LIMIT: usize = 32 * 1024;
/// Maximum UTF-8 length of one string value.
pub const STRING_VALUE_LIMIT: usize = 4 * 1024;
/// Maximum UTF-8 length of one key.
pub const KEY_LIMIT: usize = 1024;
/// Maximum number of nested objects below a section root.
pub const MAX_DEPTH: usize = 10;
/// Smallest integer a twin may hold.
pub const MIN_INT: i64 = -4_503_599_627_370_496;
/// Largest integer a twin may hold.
pub const MAX_INT: i64 = 4_503_599_627_370_495;

/// Per-node metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// When the node last changed.
    pub last_updated: String,
    /// The section `$version` of that change (desired only).
    pub last_updated_version: Option<u64>,
}

/// One property node: a leaf value or an object of child nodes, each with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A primitive value (string, number, boolean).
    Leaf(Value, Meta),
    /// A nested object.
    Object(BTreeMap<String, Node>, Meta),
}

/// `properties.desired` or `properties.reported`.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The user properties.
    pub root: BTreeMap<String, Node>,
    /// The root's metadata (`$metadata.$lastUpdated`).
    pub root_meta: Meta,
    /// `$version`: starts at 1, only increases.
    pub version: u64,
    /// Whether metadata carries `$lastUpdatedVersion` (desired) or not (reported).
    pub is_desired: bool,
}

impl Section {
    /// An empty section created at `ts`.
    pub fn new(ts: &str, is_desired: bool) -> Self {
        let version = 1;
        Self {
            root: BTreeMap::new(),
            root_meta: Meta {
                last_updated: ts.to_string(),
                last_updated_version: is_desired.then_some(version),
            },
            version,
            is_desired,
        }
    }

    fn meta(&self, ts: &str) -> Meta {
        Meta {
            last_updated: ts.to_string(),
            last_updated_version: self.is_desired.then_some(self.version),
        }
    }

    /// Applies a JSON merge-patch (null deletes) and bumps `$version`; an empty patch is a no-op.
    pub fn merge_patch(&mut self, patch: &Map<String, Value>, ts: &str) {
        if patch.is_empty() {
            return;
        }
        self.version += 1;
        let meta = self.meta(ts);
        merge_into(&mut self.root, patch, &meta);
        self.root_meta = meta;
    }

    /// Replaces all properties (used by `PUT /twins/{id}`) and bumps `$version`.
    pub fn replace(&mut self, props: &Map<String, Value>, ts: &str) {
        self.version += 1;
        let meta = self.meta(ts);
        self.root = build_children(props, &meta);
        self.root_meta = meta;
    }

    /// The user properties alone, as JSON.
    pub fn values(&self) -> Map<String, Value> {
        children_values(&self.root)
    }

    /// The section as IoT Hub prints it: properties plus `$metadata` and `$version`.
    pub fn to_json(&self) -> Value {
        let mut out = self.values();
        out.insert(
            "$metadata".into(),
            Value::Object(meta_json(&self.root, &self.root_meta)),
        );
        out.insert("$version".into(), Value::from(self.version));
        Value::Object(out)
    }
}

fn merge_into(map: &mut BTreeMap<String, Node>, patch: &Map<String, Value>, meta: &Meta) {
    for (k, pv) in patch {
        match pv {
            Value::Null => {
                map.remove(k);
            }
            Value::Object(po) => match map.get_mut(k) {
                Some(Node::Object(children, m)) => {
                    merge_into(children, po, meta);
                    *m = meta.clone();
                }
                _ => {
                    map.insert(
                        k.clone(),
                        Node::Object(build_children(po, meta), meta.clone()),
                    );
                }
            },
            leaf => {
                map.insert(k.clone(), Node::Leaf(leaf.clone(), meta.clone()));
            }
        }
    }
}

fn build_children(obj: &Map<String, Value>, meta: &Meta) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    merge_into(&mut out, obj, meta);
    out
}

fn children_values(map: &BTreeMap<String, Node>) -> Map<String, Value> {
    map.iter()
        .map(|(k, n)| {
            let v = match n {
                Node::Leaf(v, _) => v.clone(),
                Node::Object(c, _) => Value::Object(children_values(c)),
            };
            (k.clone(), v)
        })
        .collect()
}

fn meta_json(children: &BTreeMap<String, Node>, own: &Meta) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("$lastUpdated".into(), Value::from(own.last_updated.clone()));
    if let Some(v) = own.last_updated_version {
        out.insert("$lastUpdatedVersion".into(), Value::from(v));
    }
    for (k, n) in children {
        let m = match n {
            Node::Leaf(_, m) => meta_json(&BTreeMap::new(), m),
            Node::Object(c, m) => meta_json(c, m),
        };
        out.insert(k.clone(), Value::Object(m));
    }
    out
}

/// Applies an RFC 7396 merge-patch to plain JSON (used for tags, which carry no metadata).
pub fn merge_plain(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, pv) in patch {
        match pv {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(po) => {
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge_plain(t, po);
                }
            }
            leaf => {
                target.insert(k.clone(), leaf.clone());
            }
        }
    }
}

/// Checks one key against the naming rules; `path` locates it in the error text.
pub fn validate_key(path: &str, key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{path}: empty property names are not allowed"));
    }
    if key.len() > KEY_LIMIT {
        return Err(format!(
            "{path}: property name is {} bytes; the limit is {KEY_LIMIT} bytes",
            key.len()
        ));
    }
    for c in key.chars() {
        let bad = match c {
            '.' | '$' | ' ' => true,
            c => c.is_control(),
        };
        if bad {
            return Err(format!(
                "{path}: property name '{}' contains '{}', which is not allowed (no '.', '$', ' ' or control characters)",
                key.escape_default(),
                c.escape_default()
            ));
        }
    }
    Ok(())
}

/// Validates a patch or document for one section: key rules, no arrays, integer range and
/// string length. Nulls are allowed only when `allow_null` (patches: null deletes).
pub fn validate_values(
    path: &str,
    obj: &Map<String, Value>,
    allow_null: bool,
) -> Result<(), String> {
    for (k, v) in obj {
        validate_key(path, k)?;
        let here = format!("{path}.{k}");
        match v {
            Value::Null if allow_null => {}
            Value::Null => return Err(format!("{here}: null values are not allowed here")),
            Value::Array(_) => {
                return Err(format!(
                    "{here}: arrays are not supported in twin properties"
                ));
            }
            Value::String(s) if s.len() > STRING_VALUE_LIMIT => {
                return Err(format!(
                    "{here}: string value is {} bytes; the limit is {STRING_VALUE_LIMIT} bytes",
                    s.len()
                ));
            }
            Value::Number(n) => {
                let out_of_range = if let Some(i) = n.as_i64() {
                    !(MIN_INT..=MAX_INT).contains(&i)
                } else {
                    n.as_u64().is_some()
                };
                if out_of_range {
                    return Err(format!(
                        "{here}: integer {n} is outside the allowed range [{MIN_INT}, {MAX_INT}]"
                    ));
                }
            }
            Value::Object(o) => validate_values(&here, o, allow_null)?,
            _ => {}
        }
    }
    Ok(())
}

/// Size of a document per the twin rules (keys + values; numbers 8, booleans 4).
pub fn doc_size(obj: &Map<String, Value>) -> usize {
    obj.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Value::String(s) => s.len(),
                    Value::Number(_) => 8,
                    Value::Bool(_) => 4,
                    Value::Null => 0,
                    Value::Array(a) => a.len() * 8,
                    Value::Object(o) => doc_size(o),
                }
        })
        .sum()
}

/// Number of nested objects below the given root.
pub fn doc_depth(obj: &Map<String, Value>) -> usize {
    obj.values()
        .map(|v| match v {
            Value::Object(o) => 1 + doc_depth(o),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Checks a whole (post-merge) section against its size and depth limits.
pub fn check_limits(path: &str, obj: &Map<String, Value>, size_limit: usize) -> Result<(), String> {
    let depth = doc_depth(obj);
    if depth > MAX_DEPTH {
        return Err(format!(
            "{path}: nesting depth {depth} exceeds the maximum depth of {MAX_DEPTH}"
        ));
    }
    let size = doc_size(obj);
    if size > size_limit {
        return Err(format!(
            "{path}: size {size} bytes exceeds the {size_limit}-byte limit"
        ));
    }
    Ok(())
}

/// The mutable part of a device twin.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinState {
    /// `tags` (plain JSON, no metadata).
    pub tags: Map<String, Value>,
    /// `properties.desired`.
    pub desired: Section,
    /// `properties.reported`.
    pub reported: Section,
    /// Twin `version`, bumped on every mutation (tags, desired or reported).
    pub version: u64,
    /// Hub-wide counter value behind the twin etag (base64 of 8 bytes big-endian).
    pub etag_counter: u64,
}

impl TwinState {
    /// A new twin created at `ts` with etag counter `etag_counter`.
    pub fn new(ts: &str, etag_counter: u64) -> Self {
        Self {
            tags: Map::new(),
            desired: Section::new(ts, true),
            reported: Section::new(ts, false),
            version: 1,
            etag_counter,
        }
    }

    /// The twin etag: base64 of the 8-byte big-endian counter, e.g. `AAAAAAAAAAc=`.
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.etag_counter.to_be_bytes())
    }
}

/// Validates and applies a tags patch on a copy, so nothing changes when it fails.
pub fn patched_tags(
    current: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    validate_values("tags", patch, true)?;
    let mut t = current.clone();
    merge_plain(&mut t, patch);
    check_limits("tags", &t, TAGS_LIMIT)?;
    Ok(t)
}

/// Validates and applies a properties patch on a copy, so nothing changes when it fails.
pub fn patched_section(
    path: &str,
    current: &Section,
    patch: &Map<String, Value>,
    ts: &str,
) -> Result<Section, String> {
    validate_values(path, patch, true)?;
    let mut s = current.clone();
    s.merge_patch(patch, ts);
    check_limits(path, &s.values(), PROPERTIES_LIMIT)?;
    Ok(s)
}

/// Validates and builds a replacement section on a copy (`PUT /twins/{id}`).
pub fn replaced_section(
    path: &str,
    current: &Section,
    props: &Map<String, Value>,
    ts: &str,
) -> Result<Section, String> {
    validate_values(path, props, true)?;
    let mut s = current.clone();
    s.replace(props, ts);
    check_limits(path, &s.values(), PROPERTIES_LIMIT)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn merge_patch_and_metadata() {
        let mut s = Section::new("T0", true);
        s.merge_patch(&obj(json!({"a": 1, "b": {"c": "x", "d": true}})), "T1");
        assert_eq!(s.version, 2);
        s.merge_patch(
            &obj(json!({"b": {"c": null, "e": 2.5}, "a": null, "n": null})),
            "T2",
        );
        assert_eq!(s.version, 3);
        let j = s.to_json();
        assert_eq!(j["b"], json!({"d": true, "e": 2.5}));
        assert!(j.get("a").is_none());
        assert_eq!(j["$version"], 3);
        assert_eq!(j["$metadata"]["$lastUpdated"], "T2");
        assert_eq!(j["$metadata"]["$lastUpdatedVersion"], 3);
        assert_eq!(j["$metadata"]["b"]["$lastUpdated"], "T2");
        assert_eq!(j["$metadata"]["b"]["d"]["$lastUpdated"], "T1");
        assert_eq!(j["$metadata"]["b"]["d"]["$lastUpdatedVersion"], 2);
        assert_eq!(j["$metadata"]["b"]["e"]["$lastUpdatedVersion"], 3);
        // Replacing an object with a leaf and back.
        s.merge_patch(&obj(json!({"b": 7})), "T3");
        s.merge_patch(&obj(json!({"b": {"z": {"y": null, "w": 1}}})), "T4");
        assert_eq!(s.to_json()["b"], json!({"z": {"w": 1}}));
        // Empty patch: no version bump.
        s.merge_patch(&Map::new(), "T5");
        assert_eq!(s.version, 5);
        // Reported sections have no $lastUpdatedVersion.
        let mut r = Section::new("T0", false);
        r.merge_patch(&obj(json!({"t": 1})), "T1");
        let rj = r.to_json();
        assert!(rj["$metadata"].get("$lastUpdatedVersion").is_none());
        assert!(rj["$metadata"]["t"].get("$lastUpdatedVersion").is_none());
    }

    #[test]
    fn replace_section() {
        let mut s = Section::new("T0", true);
        s.merge_patch(&obj(json!({"a": 1})), "T1");
        s.replace(&obj(json!({"b": 2})), "T2");
        assert_eq!(Value::Object(s.values()), json!({"b": 2}));
        assert_eq!(s.version, 3);
    }

    #[test]
    fn plain_merge_for_tags() {
        let mut t = obj(json!({"a": {"b": 1}, "c": 2}));
        merge_plain(&mut t, &obj(json!({"a": {"x": 3}, "c": null})));
        assert_eq!(Value::Object(t), json!({"a": {"b": 1, "x": 3}}));
    }

    #[test]
    fn key_rules() {
        for bad in ["a.b", "$a", "a b", "", "a\u{7}", "a\u{85}"] {
            let e =
                validate_values("properties.desired", &obj(json!({ bad: 1 })), true).unwrap_err();
            assert!(e.contains("property name"), "{e}");
        }
        let long = "k".repeat(KEY_LIMIT + 1);
        assert!(
            validate_values("tags", &obj(json!({ long: 1 })), true)
                .unwrap_err()
                .contains("1024")
        );
        assert!(validate_values("tags", &obj(json!({"ünï": 1, "a-b_c": 2})), true).is_ok());
    }

    #[test]
    fn value_rules() {
        let e = validate_values("properties.reported", &obj(json!({"a": [1]})), true).unwrap_err();
        assert!(e.contains("arrays"), "{e}");
        assert!(validate_values("p", &obj(json!({"a": MAX_INT})), true).is_ok());
        assert!(validate_values("p", &obj(json!({"a": MIN_INT})), true).is_ok());
        assert!(
            validate_values("p", &obj(json!({"a": MAX_INT + 1})), true)
                .unwrap_err()
                .contains("range")
        );
        assert!(validate_values("p", &obj(json!({"a": MIN_INT - 1})), true).is_err());
        assert!(validate_values("p", &obj(json!({"a": u64::MAX})), true).is_err());
        assert!(validate_values("p", &obj(json!({"a": 1.5e300})), true).is_ok());
        let s = "x".repeat(STRING_VALUE_LIMIT + 1);
        assert!(
            validate_values("p", &obj(json!({ "a": s })), true)
                .unwrap_err()
                .contains("4096")
        );
        assert!(validate_values("p", &obj(json!({"a": null})), false).is_err());
    }

    fn nested(depth: usize) -> Map<String, Value> {
        let mut v = json!({"property": "value"});
        for i in (0..depth).rev() {
            v = json!({ format!("l{i}"): v });
        }
        obj(v)
    }

    #[test]
    fn depth_limit() {
        assert_eq!(doc_depth(&nested(10)), 10);
        assert!(check_limits("properties.desired", &nested(10), PROPERTIES_LIMIT).is_ok());
        let e = check_limits("properties.desired", &nested(11), PROPERTIES_LIMIT).unwrap_err();
        assert!(e.contains("maximum depth of 10"), "{e}");
    }

    #[test]
    fn size_limits_apply_after_merge_and_leave_state_untouched() {
        let cur = Section::new("T0", false);
        let big = "v".repeat(4000);
        let mut patch = Map::new();
        for i in 0..8 {
            patch.insert(format!("k{i}"), Value::from(big.clone()));
        }
        // 8 * (2 + 4000) = 32016 bytes: fits.
        let s = patched_section("properties.reported", &cur, &patch, "T1").unwrap();
        assert_eq!(doc_size(&s.values()), 32016);
        let e =
            patched_section("properties.reported", &s, &obj(json!({"k8": big})), "T2").unwrap_err();
        assert!(e.contains("32768-byte limit"), "{e}");
        assert_eq!(s.version, 2);
        // Tags: 8 KB.
        let t = obj(json!({"a": "x".repeat(4000), "b": "x".repeat(4000)}));
        let tags = patched_tags(&Map::new(), &t).unwrap();
        let e = patched_tags(&tags, &obj(json!({"c": "x".repeat(200)}))).unwrap_err();
        assert!(e.contains("8192-byte limit"), "{e}");
        assert_eq!(doc_size(&obj(json!({"n": 1, "b": true}))), 1 + 8 + 1 + 4);
    }

    #[test]
    fn etag_format() {
        let t = TwinState::new("T", 7);
        assert_eq!(t.etag(), "AAAAAAAAAAc=");
    }
}
