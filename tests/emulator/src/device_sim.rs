//! The device simulator behind `azure-iot-hub-emulator device ...`.
//!
//! Exists so tests can play the device side (report state, send telemetry) with exactly the
//! connection string the product hands out, signing a device SAS token the way the C and Java
//! device SDKs do: `sr = {HostName}/devices/{urlenc(DeviceId)}`, no `skn`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};

use crate::client;
use crate::sas;

/// The api-version the simulator sends (the current GA string, §3.1).
pub const API_VERSION: &str = "2021-04-12";

/// A parsed device connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConnectionString {
    /// `HostName`.
    pub host_name: String,
    /// `DeviceId`.
    pub device_id: String,
    /// `SharedAccessKey` (base64).
    pub shared_access_key: String,
}

/// Parses `HostName=..;DeviceId=..;SharedAccessKey=..` strictly (Python SDK rules, §2): every
/// segment needs `=` (split at the first one), no duplicates, no unknown keys, all three present.
pub fn parse_connection_string(s: &str) -> Result<DeviceConnectionString> {
    let mut map = BTreeMap::new();
    for seg in s.split(';') {
        let Some((k, v)) = seg.split_once('=') else {
            bail!("connection string segment '{seg}' has no '=' (a trailing ';' is not allowed)");
        };
        if !["HostName", "DeviceId", "SharedAccessKey"].contains(&k) {
            bail!(
                "unsupported connection string key '{k}' (expected HostName, DeviceId, SharedAccessKey)"
            );
        }
        if map.insert(k, v).is_some() {
            bail!("connection string key '{k}' appears twice");
        }
    }
    let get = |k: &str| -> Result<String> {
        match map.get(k) {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => bail!("connection string lacks {k}"),
        }
    };
    let cs = DeviceConnectionString {
        host_name: get("HostName")?,
        device_id: get("DeviceId")?,
        shared_access_key: get("SharedAccessKey")?,
    };
    sas::decode_key(&cs.shared_access_key)?;
    Ok(cs)
}

impl DeviceConnectionString {
    /// A device token valid for `ttl_secs`, with sr `{host}/devices/{urlenc(id)}`.
    pub fn token(&self, now_unix: u64, ttl_secs: u64) -> Result<String> {
        let sr = format!(
            "{}/devices/{}",
            self.host_name,
            sas::url_encode(&self.device_id)
        );
        Ok(sas::generate_token(
            &sr,
            &self.shared_access_key,
            now_unix + ttl_secs,
            None,
        )?)
    }
}

/// What the simulator does.
#[derive(Debug, Clone)]
pub enum Action {
    /// Merge-patch reported properties with this JSON object.
    Report(serde_json::Value),
    /// Send one telemetry message with this body and application properties.
    Send {
        /// Raw body.
        body: Vec<u8>,
        /// `iothub-app-*` properties.
        properties: Vec<(String, String)>,
    },
}

/// Runs one simulator action; `Ok(response)` for any HTTP answer, `Err` on transport failure.
pub async fn run(
    cs: &DeviceConnectionString,
    endpoint: Option<&str>,
    ca_file: Option<&Path>,
    action: Action,
) -> Result<client::Response> {
    let base = endpoint
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("https://{}", cs.host_name));
    let id = sas::url_encode(&cs.device_id);
    let token = cs.token(crate::timefmt::now_unix(), 3600)?;
    let mut headers = vec![("authorization".to_string(), token)];
    let (method, url, body) = match action {
        Action::Report(v) => {
            if !v.is_object() {
                bail!("reported properties must be a JSON object");
            }
            headers.push((
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            ));
            (
                "PATCH",
                format!("{base}/twins/{id}/properties/reported?api-version={API_VERSION}"),
                serde_json::to_vec(&v)?,
            )
        }
        Action::Send { body, properties } => {
            headers.push(("content-type".into(), "application/json".into()));
            headers.push(("iothub-to".into(), format!("/devices/{id}/messages/events")));
            headers.push(("iothub-contenttype".into(), "application/json".into()));
            headers.push(("iothub-contentencoding".into(), "utf-8".into()));
            for (k, v) in properties {
                headers.push((format!("iothub-app-{k}"), v));
            }
            (
                "POST",
                format!("{base}/devices/{id}/messages/events?api-version={API_VERSION}"),
                body,
            )
        }
    };
    client::request(method, &url, &headers, body, ca_file).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings() {
        let key = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";
        let cs = parse_connection_string(&format!(
            "HostName=h:1;DeviceId=my:dev;SharedAccessKey={key}"
        ))
        .unwrap();
        assert_eq!(cs.shared_access_key, key);
        let t = cs.token(1000, 10).unwrap();
        let p = sas::parse_token(&t).unwrap();
        assert_eq!(p.sr_raw, "h:1/devices/my%3Adev");
        assert_eq!(p.skn, None);
        assert!(p.signature_matches(&sas::decode_key(key).unwrap()));
        assert_eq!(p.expiry, 1010);
        for bad in [
            format!("HostName=h;DeviceId=d;SharedAccessKey={key};"),
            format!("HostName=h;DeviceId=d;DeviceId=e;SharedAccessKey={key}"),
            "HostName=h;DeviceId=d".to_string(),
            format!("HostName=h;DeviceId=d;SharedAccessKey={key};ModuleId=m"),
            "HostName=h;DeviceId=d;SharedAccessKey=!!".to_string(),
        ] {
            assert!(parse_connection_string(&bad).is_err(), "{bad}");
        }
    }
}
