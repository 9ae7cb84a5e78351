//! The twin query that finds reported-state changes, and turning its pages
//! into state changes.
//!
//! Devices report state into their twin's reported properties; the hub
//! stamps `properties.reported.$metadata.$lastUpdated` on every write, so
//! "what changed since T" is a query on that stamp.

use crate::cursor::Scan;
use crate::registry::split_device_id;
use crate::timestamp::{self, Timestamp};
use serde_json::{Map, Value, json};

/// Twins asked for per page (`x-ms-max-item-count`).
pub const PAGE_SIZE: u32 = 100;

/// The query body for twins whose reported properties changed at or after
/// `since` (a bound the cursor formatted, so it needs no escaping beyond the
/// defensive quote doubling).
pub fn query_body(since: &str) -> Value {
    let since = since.replace('\'', "''");
    json!({
        "query": format!(
            "SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '{since}'"
        )
    })
}

/// Reads a query page: a bare JSON array (the wire format), or an object
/// with `items` (the SDK wrapper shape, accepted for tolerance).
pub fn parse_page(body: &[u8]) -> Result<Vec<Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(Value::Object(mut o)) => match o.remove("items") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err("the query answer is an object without an items array".into()),
        },
        Ok(_) => Err("the query answer is not a JSON array".into()),
        Err(e) => Err(format!("the query answer is not JSON ({e})")),
    }
}

/// A twin's reported state and when it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Reported {
    /// The device ID.
    pub device_id: String,
    /// `deviceId@$version`: identifies this write.
    pub key: String,
    /// `$lastUpdated` as the hub wrote it.
    pub last_updated_raw: String,
    /// `$lastUpdated` parsed.
    pub last_updated: Timestamp,
    /// The reported properties without `$metadata` and `$version`.
    pub state: Map<String, Value>,
}

/// Extracts the reported state of a twin; `None` if it has no reported
/// `$lastUpdated` (the device never reported) or is malformed.
pub fn reported(twin: &Value) -> Option<Reported> {
    let device_id = twin.get("deviceId")?.as_str()?.to_string();
    let reported = twin.pointer("/properties/reported")?.as_object()?;
    let raw = reported
        .get("$metadata")?
        .get("$lastUpdated")?
        .as_str()?
        .to_string();
    let last_updated = timestamp::parse(&raw)?;
    let version = match reported.get("$version") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        // Without a version the write is still identified by its instant.
        _ => raw.clone(),
    };
    let mut state = reported.clone();
    state.remove("$metadata");
    state.remove("$version");
    Some(Reported {
        key: format!("{device_id}@{version}"),
        device_id,
        last_updated_raw: raw,
        last_updated,
        state,
    })
}

/// One change to hand to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The Para thing id.
    pub thing_id: String,
    /// The owning app.
    pub appid: String,
    /// The reported state, a JSON object as text.
    pub state: String,
    /// When the device wrote it, ms since the Unix epoch.
    pub written_at: u64,
}

/// Runs a page through the scan, appending the changes to deliver. Twins of
/// devices the broker did not create (no `appid:id` shape) move the cursor
/// but are not delivered.
pub fn absorb_page(scan: &mut Scan, items: &[Value], out: &mut Vec<Change>) {
    for item in items {
        let Some(r) = reported(item) else { continue };
        if !scan.observe(&r.key, r.last_updated, &r.last_updated_raw) {
            continue;
        }
        if let Some((appid, thing_id)) = split_device_id(&r.device_id) {
            out.push(Change {
                thing_id: thing_id.to_string(),
                appid: appid.to_string(),
                state: Value::Object(r.state).to_string(),
                written_at: r.last_updated.unix_ms(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Cursor;

    fn twin(id: &str, version: u64, at: &str, props: Value) -> Value {
        let mut reported = props;
        reported["$version"] = json!(version);
        reported["$metadata"] = json!({"$lastUpdated": at, "temp": {"$lastUpdated": at}});
        json!({
            "deviceId": id,
            "etag": "AAAAAAAAAAE=",
            "properties": {
                "desired": {"$version": 1, "$metadata": {"$lastUpdated": at}},
                "reported": reported
            }
        })
    }

    #[test]
    fn query_text() {
        assert_eq!(
            query_body("1970-01-01T00:00:00"),
            json!({"query": "SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated >= '1970-01-01T00:00:00'"})
        );
        assert!(query_body("a'b").to_string().contains("a''b"));
    }

    #[test]
    fn pages() {
        assert_eq!(parse_page(b"[]"), Ok(vec![]));
        assert_eq!(parse_page(br#"{"items":[1]}"#), Ok(vec![json!(1)]));
        assert!(parse_page(b"{}").is_err());
        assert!(parse_page(b"<html>").is_err());
    }

    #[test]
    fn reported_strips_metadata() {
        let t = twin(
            "app:7",
            5,
            "2024-05-01T10:00:00.1234567Z",
            json!({"temp": 21}),
        );
        let r = reported(&t).expect("has reported");
        assert_eq!(r.key, "app:7@5");
        assert_eq!(Value::Object(r.state), json!({"temp": 21}));
        assert_eq!(r.last_updated.unix_ms(), 1_714_557_600_123);
        assert!(
            reported(&json!({"deviceId": "x", "properties": {"reported": {"$version": 1}}}))
                .is_none()
        );
    }

    #[test]
    fn page_to_changes() {
        let at = "2024-05-01T10:00:00.5Z";
        let items = vec![
            twin("app:7", 5, at, json!({"temp": 21, "nested": {"a": true}})),
            twin("foreign-device", 2, at, json!({"x": 1})),
            json!({"deviceId": "app:8", "properties": {"reported": {"$version": 1}}}),
        ];
        let mut scan = Scan::new(Cursor::initial());
        let mut out = Vec::new();
        absorb_page(&mut scan, &items, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].appid.as_str(), out[0].thing_id.as_str()),
            ("app", "7")
        );
        assert_eq!(out[0].written_at, 1_714_557_600_500);
        assert_eq!(
            serde_json::from_str::<Value>(&out[0].state).ok(),
            Some(json!({"temp": 21, "nested": {"a": true}}))
        );
        let c = scan.complete();
        assert_eq!(c.since, at);
        assert_eq!(c.seen, ["app:7@5", "foreign-device@2"]);
    }
}
