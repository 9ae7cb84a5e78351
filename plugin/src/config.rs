//! The broker's configuration, read from `wasi:config/store`.
//!
//! Keys arrive with the `para.azure.` prefix stripped; every message still
//! names the full `para.azure.<key>` because that is what an operator sets.
//! Validation happens here, once, so a bad setting fails with a message that
//! says what to fix instead of as a 401 or a connection error later.

use crate::connstr;
use crate::error::Failure;
use crate::platform::Scheme;
use crate::sas;

/// The policy used when `para.azure.iot_policy_name` is not set; it is the
/// hub's default all-rights policy.
pub const DEFAULT_POLICY: &str = "iothubowner";

/// Validated settings for one hub.
#[derive(Clone)]
pub struct Config {
    /// The hub's host name: the SAS audience and the device connection
    /// string's `HostName`.
    pub hostname: String,
    /// The shared access policy name (`skn`).
    pub policy: String,
    /// The decoded policy key. Never logged.
    pub key: Vec<u8>,
    /// Where requests go (the hub itself unless overridden).
    pub endpoint: Endpoint,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("hostname", &self.hostname)
            .field("policy", &self.policy)
            .field("key", &"<redacted>")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// The base URL requests are sent to, split the way WASI HTTP wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` (emulator) or `https`.
    pub scheme: Scheme,
    /// `host[:port]`.
    pub authority: String,
    /// A path prefix without a trailing `/` (usually empty).
    pub base_path: String,
}

impl Endpoint {
    /// The endpoint as a URL, for messages.
    pub fn url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }
}

fn missing(key: &str, what: &str) -> Failure {
    Failure::Misconfigured(format!(
        "para.azure.{key} is not set; set it to {what} (Azure portal → your IoT hub)"
    ))
}

fn invalid(key: &str, why: &str, what: &str) -> Failure {
    Failure::Misconfigured(format!(
        "para.azure.{key} is invalid: {why}; set it to {what}"
    ))
}

const HOSTNAME_WHAT: &str = "the hub's host name, e.g. myhub.azure-devices.net";
const KEY_WHAT: &str =
    "the policy's primary key (base64) from the hub's \"Shared access policies\" page";
const ENDPOINT_WHAT: &str = "a base URL such as http://127.0.0.1:41234, or remove it";

impl Config {
    /// Reads and validates the configuration through `get`, which returns a
    /// key's value (prefix already stripped) or an error from the store.
    pub fn load(get: impl Fn(&str) -> Result<Option<String>, String>) -> Result<Config, Failure> {
        let read = |key: &str| -> Result<Option<String>, Failure> {
            match get(key) {
                Ok(v) => Ok(v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())),
                Err(e) => Err(Failure::Misconfigured(format!(
                    "could not read para.azure.{key} from the host's configuration: {e}"
                ))),
            }
        };

        let hostname = read("iot_hostname")?;
        let policy = read("iot_policy_name")?;
        let access_key = read("iot_access_key")?;
        let endpoint = read("iot_endpoint")?;

        // A pasted service connection string supplies the key, and may
        // supply the host name and policy; explicit settings must agree.
        let (key_text, policy, hostname) = match access_key {
            None => return Err(missing("iot_access_key", KEY_WHAT)),
            Some(v) if v.contains("SharedAccessKey=") => {
                let pairs = connstr::parse(&v).map_err(|e| {
                    invalid(
                        "iot_access_key",
                        &format!("it looks like a connection string but {e}"),
                        KEY_WHAT,
                    )
                })?;
                let key = connstr::get(&pairs, "SharedAccessKey")
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            "iot_access_key",
                            "the connection string has no SharedAccessKey",
                            KEY_WHAT,
                        )
                    })?
                    .to_string();
                let cs_policy = connstr::get(&pairs, "SharedAccessKeyName").map(str::to_string);
                let cs_host = connstr::get(&pairs, "HostName").map(str::to_string);
                let policy = match (policy, cs_policy) {
                    (Some(p), Some(c)) if p != c => {
                        return Err(Failure::Misconfigured(format!(
                            "para.azure.iot_policy_name is '{p}' but the connection string in para.azure.iot_access_key is for policy '{c}'; make them agree or remove para.azure.iot_policy_name"
                        )));
                    }
                    (p, c) => p.or(c),
                };
                let hostname = match (hostname, cs_host) {
                    (Some(h), Some(c)) if !h.eq_ignore_ascii_case(&c) => {
                        return Err(Failure::Misconfigured(format!(
                            "para.azure.iot_hostname is '{h}' but the connection string in para.azure.iot_access_key is for '{c}'; make them agree"
                        )));
                    }
                    (h, c) => h.or(c),
                };
                (key, policy, hostname)
            }
            Some(v) => (v, policy, hostname),
        };

        let hostname = hostname.ok_or_else(|| missing("iot_hostname", HOSTNAME_WHAT))?;
        validate_hostname(&hostname)?;
        let key = sas::decode_key(&key_text)
            .map_err(|why| invalid("iot_access_key", &format!("the key is {why}"), KEY_WHAT))?;
        let policy = policy.unwrap_or_else(|| DEFAULT_POLICY.to_string());
        if !policy
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '@' | '.'))
        {
            return Err(invalid(
                "iot_policy_name",
                &format!("'{policy}' contains characters a policy name cannot have"),
                "a shared access policy name such as iothubowner or service",
            ));
        }
        let endpoint = match endpoint {
            Some(url) => parse_endpoint(&url)?,
            None => Endpoint {
                scheme: Scheme::Https,
                authority: hostname.clone(),
                base_path: String::new(),
            },
        };
        Ok(Config {
            hostname,
            policy,
            key,
            endpoint,
        })
    }
}

fn validate_hostname(h: &str) -> Result<(), Failure> {
    if h.contains("://") {
        return Err(invalid(
            "iot_hostname",
            &format!("'{h}' is a URL, not a host name"),
            "the bare host name, e.g. myhub.azure-devices.net (put a full URL in para.azure.iot_endpoint)",
        ));
    }
    let ok = h
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']' | '_'));
    if !ok {
        return Err(invalid(
            "iot_hostname",
            &format!("'{h}' is not a host name"),
            HOSTNAME_WHAT,
        ));
    }
    Ok(())
}

/// Parses `http(s)://authority[/base]` into an [`Endpoint`].
fn parse_endpoint(url: &str) -> Result<Endpoint, Failure> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
        _ => {
            return Err(invalid(
                "iot_endpoint",
                &format!("'{url}' does not start with http:// or https://"),
                ENDPOINT_WHAT,
            ));
        }
    };
    if rest.contains(['?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return Err(invalid(
            "iot_endpoint",
            &format!("'{url}' has a query, fragment, user info or spaces"),
            ENDPOINT_WHAT,
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(invalid(
            "iot_endpoint",
            &format!("'{url}' has no host"),
            ENDPOINT_WHAT,
        ));
    }
    Ok(Endpoint {
        scheme,
        authority: authority.to_string(),
        base_path: path.trim_end_matches('/').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const KEY: &str = "cGFzc3dvcmQ=";

    fn load(pairs: &[(&str, &str)]) -> Result<Config, Failure> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(|k| Ok(map.get(k).cloned()))
    }

    fn message(f: Failure) -> String {
        match f {
            Failure::Misconfigured(m) => m,
            other => panic!("expected misconfigured, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = load(&[
            ("iot_hostname", "myhub.azure-devices.net"),
            ("iot_access_key", KEY),
        ])
        .expect("valid");
        assert_eq!(c.policy, "iothubowner");
        assert_eq!(c.key, b"password");
        assert_eq!(c.endpoint.url(), "https://myhub.azure-devices.net");
    }

    #[test]
    fn endpoint_override() {
        let c = load(&[
            ("iot_hostname", "127.0.0.1:41234"),
            ("iot_access_key", KEY),
            ("iot_policy_name", "service"),
            ("iot_endpoint", "http://127.0.0.1:41234/"),
        ])
        .expect("valid");
        assert_eq!(c.policy, "service");
        assert_eq!(c.endpoint.scheme, Scheme::Http);
        assert_eq!(c.endpoint.authority, "127.0.0.1:41234");
        assert_eq!(c.endpoint.base_path, "");
        let c = load(&[
            ("iot_hostname", "h"),
            ("iot_access_key", KEY),
            ("iot_endpoint", "HTTPS://proxy.example/iot/"),
        ])
        .expect("valid");
        assert_eq!(c.endpoint.base_path, "/iot");
    }

    #[test]
    fn missing_keys_name_the_setting() {
        assert!(
            message(load(&[("iot_access_key", KEY)]).expect_err("no host"))
                .contains("para.azure.iot_hostname")
        );
        assert!(
            message(load(&[("iot_hostname", "h")]).expect_err("no key"))
                .contains("para.azure.iot_access_key")
        );
        assert!(
            message(load(&[("iot_hostname", "h"), ("iot_access_key", "  ")]).expect_err("blank"))
                .contains("para.azure.iot_access_key")
        );
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let m = message(
            load(&[("iot_hostname", "h"), ("iot_access_key", "%%%")]).expect_err("bad key"),
        );
        assert!(
            m.contains("para.azure.iot_access_key") && m.contains("base64"),
            "{m}"
        );
        let m = message(
            load(&[("iot_hostname", "https://h"), ("iot_access_key", KEY)]).expect_err("url host"),
        );
        assert!(m.contains("para.azure.iot_hostname"), "{m}");
        let m = message(
            load(&[
                ("iot_hostname", "h"),
                ("iot_access_key", KEY),
                ("iot_endpoint", "ftp://x"),
            ])
            .expect_err("bad endpoint"),
        );
        assert!(m.contains("para.azure.iot_endpoint"), "{m}");
        let m = message(
            load(&[
                ("iot_hostname", "h"),
                ("iot_access_key", KEY),
                ("iot_policy_name", "a b"),
            ])
            .expect_err("bad policy"),
        );
        assert!(m.contains("para.azure.iot_policy_name"), "{m}");
    }

    #[test]
    fn store_errors_are_misconfigured() {
        let e = Config::load(|_| Err("store down".into())).expect_err("fails");
        assert!(message(e).contains("store down"));
    }

    #[test]
    fn pasted_connection_string() {
        let cs = format!(
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=registryReadWrite;SharedAccessKey={KEY}"
        );
        let c = load(&[("iot_access_key", &cs)]).expect("valid");
        assert_eq!(c.hostname, "myhub.azure-devices.net");
        assert_eq!(c.policy, "registryReadWrite");
        assert_eq!(c.key, b"password");
        let m = message(
            load(&[("iot_access_key", &cs), ("iot_policy_name", "service")]).expect_err("clash"),
        );
        assert!(m.contains("para.azure.iot_policy_name"), "{m}");
        assert!(!m.contains(KEY), "no key in messages: {m}");
        let m = message(
            load(&[("iot_access_key", &cs), ("iot_hostname", "other")]).expect_err("clash"),
        );
        assert!(m.contains("para.azure.iot_hostname"), "{m}");
    }

    #[test]
    fn debug_redacts_key() {
        let c = load(&[("iot_hostname", "h"), ("iot_access_key", KEY)]).expect("valid");
        assert!(!format!("{c:?}").contains("password"));
    }
}
