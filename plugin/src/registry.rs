//! The device identity registry's shapes: device IDs, the create body, and
//! what the broker hands back from a device.
//!
//! A thing's device is `{appid}:{thingId}` (as Para named it). The create
//! response's `device-details` carries the keys, once; the stored
//! `metadata` never does.

use crate::connstr;
use crate::sas::url_encode;
use serde_json::{Value, json};

/// Azure's limit on device ID length.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The device ID for a thing, validated against Azure's rules so a bad
/// appid or id fails as `invalid-input` before any request is sent.
pub fn device_id(appid: &str, thing_id: &str) -> Result<String, String> {
    if appid.is_empty() || thing_id.is_empty() {
        return Err(format!(
            "the thing needs a non-empty appid and id to name its Azure device (got appid '{appid}', id '{thing_id}')"
        ));
    }
    let id = format!("{appid}:{thing_id}");
    let allowed = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '-' | ':'
                    | '.'
                    | '+'
                    | '%'
                    | '_'
                    | '#'
                    | '*'
                    | '?'
                    | '!'
                    | '('
                    | ')'
                    | ','
                    | '='
                    | '@'
                    | ';'
                    | '$'
                    | '\''
            )
    };
    if let Some(bad) = id.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "the Azure device ID '{id}' (appid:id) contains '{bad}'; Azure device IDs allow only ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
        ));
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!(
            "the Azure device ID '{id}' (appid:id) is {} characters; Azure allows at most {MAX_DEVICE_ID_LEN}",
            id.len()
        ));
    }
    Ok(id)
}

/// Splits a device ID back into `(appid, thingId)`; `None` for devices the
/// broker did not create. The thing id is after the last `:`.
pub fn split_device_id(device_id: &str) -> Option<(&str, &str)> {
    let (appid, thing) = device_id.rsplit_once(':')?;
    (!appid.is_empty() && !thing.is_empty()).then_some((appid, thing))
}

/// The URL path of a device (`/devices/{id}`), the ID percent-encoded.
pub fn device_path(device_id: &str) -> String {
    format!("/devices/{}", url_encode(device_id))
}

/// The URL path of a device's twin (`/twins/{id}`).
pub fn twin_path(device_id: &str) -> String {
    format!("/twins/{}", url_encode(device_id))
}

/// The create body: SAS authentication with both keys null, which tells the
/// hub to generate them.
pub fn create_body(device_id: &str) -> Value {
    json!({
        "deviceId": device_id,
        "status": "enabled",
        "authentication": {
            "type": "sas",
            "symmetricKey": { "primaryKey": null, "secondaryKey": null }
        }
    })
}

/// The parts of a registry Device the broker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The device ID.
    pub device_id: String,
    /// Distinguishes re-created devices with the same ID.
    pub generation_id: Option<String>,
    /// `enabled` or `disabled`.
    pub status: Option<String>,
    /// `Connected` or `Disconnected`.
    pub connection_state: Option<String>,
    /// When the device last did anything.
    pub last_activity: Option<String>,
    /// The primary key (secret).
    pub primary_key: Option<String>,
    /// The secondary key (secret).
    pub secondary_key: Option<String>,
}

/// Reads a Device from a registry response body.
pub fn parse_device(body: &[u8]) -> Result<Device, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the device body is not JSON ({e})"))?;
    let s = |ptr: &str| {
        v.pointer(ptr)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let device_id = s("/deviceId").ok_or("the device body has no deviceId")?;
    Ok(Device {
        device_id,
        generation_id: s("/generationId"),
        status: s("/status"),
        connection_state: s("/connectionState"),
        last_activity: s("/lastActivityTime"),
        primary_key: s("/authentication/symmetricKey/primaryKey"),
        secondary_key: s("/authentication/symmetricKey/secondaryKey"),
    })
}

/// The non-secret metadata the host stores for a thing.
pub fn metadata(device_id: &str, generation_id: Option<&str>, hostname: &str) -> Value {
    json!({
        "deviceId": device_id,
        "generationId": generation_id,
        "hostname": hostname,
    })
}

/// The `device-details` shown once in the create response: what the device
/// needs to connect, keys included. `Err` if the device has no SAS keys
/// (e.g. it was made for X.509 outside Para).
pub fn device_details(
    thing_id: &str,
    thing_name: &str,
    device: &Device,
    hostname: &str,
) -> Result<Value, String> {
    let Some(primary) = device.primary_key.as_deref() else {
        return Err(format!(
            "the device '{}' has no SAS keys (it may use X.509 authentication)",
            device.device_id
        ));
    };
    let lower =
        |v: &Option<String>, default: &str| v.as_deref().unwrap_or(default).to_ascii_lowercase();
    Ok(json!({
        "thingId": thing_id,
        "thingName": thing_name,
        "deviceId": device.device_id,
        "primaryKey": primary,
        "secondaryKey": device.secondary_key,
        "status": lower(&device.status, "enabled"),
        "lastActivity": device.last_activity,
        "connectionState": lower(&device.connection_state, "disconnected"),
        "connectionString": connstr::device_connection_string(hostname, &device.device_id, primary),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = r#"{"deviceId":"myapp:42","generationId":"636595531817773533","etag":"MA==",
        "connectionState":"Disconnected","status":"enabled","statusReason":null,
        "lastActivityTime":"0001-01-01T00:00:00","cloudToDeviceMessageCount":0,
        "authentication":{"symmetricKey":{"primaryKey":"cHJpbWFyeQ==","secondaryKey":"c2Vjb25kYXJ5"},
        "x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},
        "capabilities":{"iotEdge":false}}"#;

    #[test]
    fn ids_and_paths() {
        assert_eq!(device_id("myapp", "42").as_deref(), Ok("myapp:42"));
        assert_eq!(device_path("myapp:42"), "/devices/myapp%3A42");
        assert_eq!(twin_path("myapp:42"), "/twins/myapp%3A42");
        assert_eq!(split_device_id("myapp:42"), Some(("myapp", "42")));
        assert_eq!(split_device_id("a:b:42"), Some(("a:b", "42")));
        assert_eq!(split_device_id("plain"), None);
        assert_eq!(split_device_id(":42"), None);
    }

    #[test]
    fn invalid_ids_explain() {
        let e = device_id("my app", "1").expect_err("space");
        assert!(e.contains("' '") && e.contains("my app:1"), "{e}");
        let e = device_id(&"a".repeat(130), "1").expect_err("long");
        assert!(e.contains("128"), "{e}");
        assert!(device_id("", "1").is_err());
    }

    #[test]
    fn create_body_asks_hub_for_keys() {
        let b = create_body("a:1");
        assert_eq!(b["authentication"]["type"], "sas");
        assert!(b["authentication"]["symmetricKey"]["primaryKey"].is_null());
        assert!(b["authentication"]["symmetricKey"]["secondaryKey"].is_null());
        assert_eq!(b["status"], "enabled");
    }

    #[test]
    fn details_match_product_shape() {
        let d = parse_device(DEVICE.as_bytes()).expect("parses");
        let details = device_details("42", "MyThing", &d, "hub.azure-devices.net").expect("keys");
        assert_eq!(
            details,
            json!({
                "thingId": "42",
                "thingName": "MyThing",
                "deviceId": "myapp:42",
                "primaryKey": "cHJpbWFyeQ==",
                "secondaryKey": "c2Vjb25kYXJ5",
                "status": "enabled",
                "lastActivity": "0001-01-01T00:00:00",
                "connectionState": "disconnected",
                "connectionString": "HostName=hub.azure-devices.net;DeviceId=myapp:42;SharedAccessKey=cHJpbWFyeQ=="
            })
        );
    }

    #[test]
    fn metadata_has_no_secrets() {
        let d = parse_device(DEVICE.as_bytes()).expect("parses");
        let m = metadata(&d.device_id, d.generation_id.as_deref(), "hub").to_string();
        assert!(m.contains("636595531817773533"));
        assert!(
            !m.contains("cHJpbWFyeQ")
                && !m.contains("c2Vjb25kYXJ5")
                && !m.contains("SharedAccessKey")
        );
    }

    #[test]
    fn keyless_device_is_an_error() {
        let d = parse_device(br#"{"deviceId":"a:1","authentication":{"type":"selfSigned"}}"#)
            .expect("parses");
        assert!(device_details("1", "n", &d, "h").is_err());
        assert!(parse_device(b"{}").is_err());
        assert!(parse_device(b"nope").is_err());
    }
}
