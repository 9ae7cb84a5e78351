//! IoT Hub connection strings: `;`-separated `Key=Value` pairs.
//!
//! The broker builds the device connection string handed out once at create,
//! and accepts a pasted service connection string in `para.azure.iot_access_key`
//! (operators copy it from the portal more often than the bare key).

/// The connection string a device uses to reach the hub with its key.
pub fn device_connection_string(hostname: &str, device_id: &str, key: &str) -> String {
    format!("HostName={hostname};DeviceId={device_id};SharedAccessKey={key}")
}

/// Splits a connection string into its pairs, following the strict SDK
/// rules: every segment must contain `=` (split at the first one, so base64
/// padding survives), names must be non-empty, and a name may not repeat.
/// Names are compared case-insensitively, as C# does.
pub fn parse(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for segment in s.trim().split(';') {
        let Some((name, value)) = segment.split_once('=') else {
            return Err(format!(
                "segment '{}' has no '=' (a trailing ';' also causes this)",
                redact(segment)
            ));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err("a segment has an empty name".into());
        }
        if pairs.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Err(format!("'{name}' appears more than once"));
        }
        pairs.push((name.to_string(), value.trim().to_string()));
    }
    Ok(pairs)
}

/// Looks up a pair by name, case-insensitively.
pub fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Keeps error messages free of key material: a malformed segment is shown
/// only by its first few characters.
fn redact(segment: &str) -> String {
    let head: String = segment.chars().take(8).collect();
    if head.len() < segment.len() {
        format!("{head}…")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_string_shape() {
        assert_eq!(
            device_connection_string("hub.azure-devices.net", "app:1", "a2V5PQ=="),
            "HostName=hub.azure-devices.net;DeviceId=app:1;SharedAccessKey=a2V5PQ=="
        );
    }

    #[test]
    fn round_trip_keeps_padding() {
        let s = device_connection_string("h", "app:1", "a2V5PQ==");
        let pairs = parse(&s).expect("parses");
        assert_eq!(get(&pairs, "hostname"), Some("h"));
        assert_eq!(get(&pairs, "DeviceId"), Some("app:1"));
        assert_eq!(get(&pairs, "SharedAccessKey"), Some("a2V5PQ=="));
    }

    #[test]
    fn service_string() {
        let pairs = parse(
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=",
        )
        .expect("parses");
        assert_eq!(get(&pairs, "SharedAccessKeyName"), Some("iothubowner"));
        assert_eq!(get(&pairs, "SharedAccessKey"), Some("cGFzc3dvcmQ="));
    }

    #[test]
    fn strict_rules() {
        assert!(parse("HostName=h;").is_err(), "trailing ;");
        assert!(parse("HostName=h;junk").is_err(), "segment without =");
        assert!(parse("=x").is_err(), "empty name");
        assert!(parse("HostName=a;hostname=b").is_err(), "duplicate");
    }

    #[test]
    fn errors_do_not_echo_secrets() {
        let err = parse("HostName=h;cGFzc3dvcmQsZWNyZXRrZXk").expect_err("bad");
        assert!(!err.contains("cGFzc3dvcmQsZWNyZXRrZXk"));
    }
}
