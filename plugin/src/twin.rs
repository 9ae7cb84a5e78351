//! Making a twin's desired properties equal a thing's `deviceState`.
//!
//! The hub applies twin patches as JSON merge-patches: a key set to `null`
//! is removed, nested objects merge. [`desired_patch`] computes the smallest
//! patch that turns the current desired properties into exactly the target
//! (nested keys absent from the target are nulled too, or a merge would keep
//! them). [`check_limits`] enforces the hub's twin rules first, so an
//! unrepresentable state fails with a message naming the key and the rule
//! instead of a bare 400. A `null` in `deviceState` means "no such
//! property", the only meaning a twin has for it.

use serde_json::{Map, Value};

/// Largest desired-properties document, by the counting rule below.
pub const MAX_DESIRED_BYTES: usize = 32 * 1024;
/// Deepest nesting of objects below the desired root.
pub const MAX_DEPTH: usize = 10;
/// Longest property name, in UTF-8 bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest string value, in UTF-8 bytes.
pub const MAX_STRING_BYTES: usize = 4 * 1024;
/// Smallest integer a twin can hold.
pub const MIN_INT: i64 = -4_503_599_627_370_496;
/// Largest integer a twin can hold.
pub const MAX_INT: i64 = 4_503_599_627_370_495;

/// Checks `state` against the twin limits, returning a message that names
/// the offending key and the rule.
pub fn check_limits(state: &Map<String, Value>) -> Result<(), String> {
    let size = check_object(state, "deviceState", 0)?;
    if size > MAX_DESIRED_BYTES {
        return Err(format!(
            "deviceState is {size} bytes by Azure's twin size rule (key bytes + string bytes, 8 per number, 4 per boolean); Azure allows at most {MAX_DESIRED_BYTES} bytes of desired properties. Make the state smaller."
        ));
    }
    Ok(())
}

/// Validates an object's keys and values; returns its size by the twin
/// counting rule. `depth` is the nesting level of `obj` (the root is 0).
fn check_object(obj: &Map<String, Value>, path: &str, depth: usize) -> Result<usize, String> {
    let mut size = 0usize;
    for (key, value) in obj {
        check_key(key, path)?;
        let child = format!("{path}.{key}");
        let value_size = match value {
            Value::Null => continue,
            Value::Bool(_) => 4,
            Value::Number(n) => {
                let in_range = match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => (MIN_INT..=MAX_INT).contains(&i),
                    (None, Some(_)) => false,
                    (None, None) => true,
                };
                if !in_range {
                    return Err(format!(
                        "{child} is {n}; Azure twin integers must lie between {MIN_INT} and {MAX_INT}. Store it as a string."
                    ));
                }
                8
            }
            Value::String(s) => {
                if s.len() > MAX_STRING_BYTES {
                    return Err(format!(
                        "{child} is a {}-byte string; Azure twin strings may be at most {MAX_STRING_BYTES} bytes.",
                        s.len()
                    ));
                }
                s.len()
            }
            Value::Array(_) => {
                return Err(format!(
                    "{child} is an array; Azure twin properties cannot hold arrays. Use an object keyed by index, or a JSON string."
                ));
            }
            Value::Object(inner) => {
                if depth + 1 > MAX_DEPTH {
                    return Err(format!(
                        "{child} nests objects {} levels deep; Azure twins allow at most {MAX_DEPTH}.",
                        depth + 1
                    ));
                }
                check_object(inner, &child, depth + 1)?
            }
        };
        size = size.saturating_add(key.len()).saturating_add(value_size);
    }
    Ok(size)
}

fn check_key(key: &str, path: &str) -> Result<(), String> {
    let bad = |rule: &str| {
        Err(format!(
            "the key \"{}\" in {path} {rule}; rename it",
            key.escape_debug()
        ))
    };
    if key.is_empty() {
        return bad("is empty; Azure twin property names must have at least one character");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad(&format!(
            "is {} bytes; Azure twin property names may be at most {MAX_KEY_BYTES} bytes",
            key.len()
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| matches!(c, '.' | '$' | ' ') || c.is_control())
    {
        return bad(&format!(
            "contains {:?}; Azure twin property names cannot contain '.', '$', spaces or control characters",
            c
        ));
    }
    Ok(())
}

/// The merge-patch that makes `current` (the twin's desired properties)
/// equal `target`. `$`-prefixed keys of `current` (`$metadata`, `$version`)
/// are the hub's and are left alone. Empty when nothing needs to change.
pub fn desired_patch(
    current: &Map<String, Value>,
    target: &Map<String, Value>,
) -> Map<String, Value> {
    let mut patch = Map::new();
    for (key, want) in target {
        let have = current.get(key).filter(|v| !v.is_null());
        match (have, want) {
            (None, Value::Null) => {}
            (Some(_), Value::Null) => {
                patch.insert(key.clone(), Value::Null);
            }
            (Some(Value::Object(h)), Value::Object(w)) => {
                let sub = desired_patch(h, w);
                if !sub.is_empty() {
                    patch.insert(key.clone(), Value::Object(sub));
                }
            }
            (Some(h), w) if h == w => {}
            (_, w) => {
                patch.insert(key.clone(), without_nulls(w));
            }
        }
    }
    for key in current.keys() {
        if !key.starts_with('$') && !target.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    patch
}

/// A value with `null` members removed at every level, since a merge-patch
/// onto a missing or non-object property would otherwise treat them as
/// deletions of nothing.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Applies a merge-patch (RFC 7396), as the hub does. Used by tests to
/// check that patches reach the target; kept here next to its inverse.
pub fn apply_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                apply_merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    /// Applies the patch and checks the user keys equal the target (nulls
    /// in the target meaning absent).
    fn converges(current: Value, target: Value) -> Map<String, Value> {
        let patch = desired_patch(&obj(current.clone()), &obj(target.clone()));
        let mut after = current;
        apply_merge_patch(&mut after, &Value::Object(patch.clone()));
        let mut after = obj(after);
        after.retain(|k, _| !k.starts_with('$'));
        assert_eq!(Value::Object(after), without_nulls(&target));
        patch
    }

    #[test]
    fn sets_new_and_nulls_removed_keys() {
        let p = converges(
            json!({"a": 1, "b": 2, "$version": 3, "$metadata": {"$lastUpdated": "x"}}),
            json!({"a": 1, "c": "x"}),
        );
        assert_eq!(Value::Object(p), json!({"b": null, "c": "x"}));
    }

    #[test]
    fn nested_objects_become_exact() {
        let p = converges(
            json!({"cfg": {"x": 1, "y": 2}, "keep": {"z": 1}}),
            json!({"cfg": {"x": 1}, "keep": {"z": 1}}),
        );
        assert_eq!(Value::Object(p), json!({"cfg": {"y": null}}));
        converges(json!({"a": "s"}), json!({"a": {"b": {"c": null, "d": 1}}}));
        converges(json!({"a": {"b": 1}}), json!({"a": 5}));
    }

    #[test]
    fn no_change_is_empty() {
        let p = converges(
            json!({"a": {"b": true}, "$version": 9}),
            json!({"a": {"b": true}}),
        );
        assert!(p.is_empty());
        assert!(converges(json!({}), json!({"gone": null})).is_empty());
    }

    #[test]
    fn null_in_target_deletes() {
        let p = converges(json!({"a": 1}), json!({"a": null}));
        assert_eq!(Value::Object(p), json!({"a": null}));
    }

    fn limit_err(v: Value) -> String {
        check_limits(&obj(v)).expect_err("over a limit")
    }

    #[test]
    fn accepts_normal_state() {
        assert!(check_limits(&obj(json!({"temp": 21.5, "on": true, "n": 4503599627370495i64, "cfg": {"mode": "eco"}, "x": null}))).is_ok());
    }

    #[test]
    fn key_rules() {
        let e = limit_err(json!({"a.b": 1}));
        assert!(e.contains("\"a.b\"") && e.contains("'.'"), "{e}");
        assert!(limit_err(json!({"$x": 1})).contains("\"$x\""));
        assert!(limit_err(json!({"a b": 1})).contains("\"a b\""));
        assert!(limit_err(json!({"nested": {"bad\u{1}": 1}})).contains("deviceState.nested"));
        assert!(limit_err(json!({"": 1})).contains("empty"));
        let long = "k".repeat(1025);
        assert!(limit_err(json!({ long: 1 })).contains("1024"));
        assert!(check_limits(&obj(json!({ "k".repeat(1024): 1 }))).is_ok());
    }

    #[test]
    fn value_rules() {
        let e = limit_err(json!({"list": [1, 2]}));
        assert!(e.contains("deviceState.list") && e.contains("array"), "{e}");
        let e = limit_err(json!({"big": 4503599627370496i64}));
        assert!(
            e.contains("deviceState.big") && e.contains("4503599627370495"),
            "{e}"
        );
        assert!(limit_err(json!({"neg": -4503599627370497i64})).contains("deviceState.neg"));
        assert!(limit_err(json!({"u": u64::MAX})).contains("deviceState.u"));
        assert!(check_limits(&obj(json!({"neg": -4503599627370496i64}))).is_ok());
        assert!(limit_err(json!({"s": "x".repeat(4097)})).contains("4096"));
    }

    #[test]
    fn depth_rule() {
        let mut ten = json!({"leaf": 1});
        for i in (1..=10).rev() {
            ten = json!({ format!("l{i}"): ten });
        }
        // l1..l10 are objects at depths 1..10: allowed.
        assert!(check_limits(&obj(ten.clone())).is_ok());
        let eleven = json!({ "l0": ten });
        let e = limit_err(eleven);
        assert!(e.contains("l10") && e.contains("10"), "{e}");
    }

    #[test]
    fn size_rule() {
        // 32 two-byte keys with 1022-byte strings = 32 * 1024 bytes exactly.
        let mut state = Map::new();
        for i in 0..32 {
            state.insert(format!("{:02}", i), json!("x".repeat(1022)));
        }
        assert!(check_limits(&state).is_ok(), "exactly 32 KB");
        state.insert("z".into(), json!(true));
        let e = check_limits(&state).expect_err("over");
        assert!(
            e.contains("32768") && e.contains(&format!("{}", 32 * 1024 + 5)),
            "{e}"
        );
    }
}
