//! Host configuration, using Para's key names.
//!
//! Sources, lowest precedence first: built-in defaults, a config file, then
//! `PARA_*` environment variables. The file is TOML written as flat dotted
//! keys (`para.iot_enabled = true`), which is also valid HOCON, so a Para
//! `application.conf` made of simple `key = value` lines reads unchanged.
//!
//! Environment variables follow Para: `para.azure.iot_hostname` is
//! `PARA_AZURE_IOT_HOSTNAME`. The first segment after `PARA_` names a
//! namespace (`host`, or a broker's config namespace such as `azure`) when one
//! exists, otherwise the whole rest is a top-level key (`PARA_IOT_ENABLED`).
//!
//! Values are kept as strings (lists as JSON arrays) because brokers read them
//! through `wasi:config/store`, which is string-typed. Never log values: some
//! are secrets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration could not be used. Each message names the key to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML/flat HOCON.
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A key holds a value of the wrong shape.
    #[error("config key {key} = {value:?} is invalid: {why}")]
    Invalid {
        /// The full key name.
        key: String,
        /// The offending value (never a secret key's value).
        value: String,
        /// What is expected instead.
        why: String,
    },
}

/// Everything the host needs to start, resolved from the raw key map.
///
/// `Debug` leaves out every raw value and the root secret: config holds
/// access keys, and a stray `{config:?}` must not put them in a log.
#[derive(Clone)]
pub struct Config {
    /// `para.iot_enabled`: IoT features are off unless this is true.
    pub iot_enabled: bool,
    /// `para.app_name`: the root app, owner of things when auth is off.
    pub app_name: String,
    /// `para.app_secret_key`: the root app's secret, if set in config
    /// (otherwise derived and printed once at first start).
    pub app_secret_key: Option<String>,
    /// `para.request_expires_after`: the SigV4 date window, seconds.
    pub request_expires_after: i64,
    /// `para.host.master_key_file`: the key app secrets are derived from
    /// (default `<db>.key`); `PARA_HOST_MASTER_KEY` overrides it.
    pub master_key_file: Option<PathBuf>,
    /// `para.worker_id`: the snowflake worker id (0..=31).
    pub worker_id: u64,
    /// `para.max_entity_size_bytes`: the largest request body accepted.
    pub max_entity_size: usize,
    /// `para.max_items_per_page` and `para.max_page_limit`.
    pub default_page_size: usize,
    /// The cap on `limit`.
    pub max_page_limit: usize,
    /// `para.host.listen`: where the REST API listens.
    pub listen: SocketAddr,
    /// `para.host.db`: the SQLite database file.
    pub db_path: PathBuf,
    /// `para.host.poll_interval_ms`: how often each broker is polled.
    pub poll_interval: Duration,
    /// `para.host.poll_max_backoff_ms`: the longest wait after repeated poll errors.
    pub poll_max_backoff: Duration,
    /// Per-call limits for broker components.
    pub limits: Limits,
    /// `para.host.tls_ca_file`: an extra CA brokers' HTTPS calls trust.
    pub tls_ca_file: Option<PathBuf>,
    /// `para.host.janitor_after_ms`: how long a `creating`/`deleting` row
    /// must be left alone before the janitor finishes it (default: twice
    /// the call timeout, at least 30 s; never less than the call timeout).
    pub janitor_after: Duration,
    /// Test-only fault: abort after a poll, before its commit.
    pub fault_crash_before_commit: bool,
    /// The broker table, by configured name (e.g. `Azure`).
    pub brokers: BTreeMap<String, BrokerConfig>,
    /// Every raw key, for brokers' `wasi:config/store`.
    raw: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("iot_enabled", &self.iot_enabled)
            .field("app_name", &self.app_name)
            .field("listen", &self.listen)
            .field("db_path", &self.db_path)
            .field("limits", &self.limits)
            .field("brokers", &self.brokers.keys().collect::<Vec<_>>())
            .field("keys", &self.raw.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Limits applied to every broker call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `para.host.call_timeout_ms`: wall-clock bound of one call, HTTP waits included.
    pub call_timeout: Duration,
    /// `para.host.cpu_budget_ms`: guest execution time allowed per call.
    pub cpu_budget: Duration,
    /// `para.host.memory_limit_mb`: linear-memory cap per store.
    pub memory_bytes: usize,
    /// `para.host.max_concurrent_calls`: broker stores live at once; more
    /// calls wait for a slot (within their timeout).
    pub max_concurrent: u32,
    /// `para.host.pooling`: reuse instance memory through wasmtime's
    /// pooling allocator (default true).
    pub pooling: bool,
}

/// One entry of the broker table: `para.brokers.<Name>.*`.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The name things use in `serviceBroker`, e.g. `Azure`.
    pub name: String,
    /// `component`: the `.wasm` file. Swap brokers by changing this.
    pub component: PathBuf,
    /// `config_namespace`: which `para.<ns>.*` keys the broker sees
    /// (default: the lowercased name).
    pub namespace: String,
    /// `allowed_hosts`: `scheme://host[:port]` the broker may call. Empty
    /// denies all. `{key}` is replaced by the broker's own config value.
    pub allowed_hosts: Vec<String>,
    /// `allowed_sockets`: endpoints the broker may open TCP connections to
    /// (see [`crate::runtime::sockets`]). Empty grants none.
    pub allowed_sockets: Vec<String>,
}

/// The `component` value that names the Azure broker built into the host.
pub const BUILTIN_AZURE: &str = "builtin:azure";

const KNOWN_NAMESPACES: &[&str] = &["host", "brokers"];

impl Config {
    /// Reads the file (if any) and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut raw = BTreeMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            raw = parse_flat(&text).map_err(|message| ConfigError::Parse {
                path: path.to_owned(),
                message,
            })?;
        }
        Self::from_raw(raw, std::env::vars())
    }

    /// Builds the config from file keys and environment variables.
    pub fn from_raw(
        mut raw: BTreeMap<String, String>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut namespaces: Vec<String> = KNOWN_NAMESPACES.iter().map(|s| s.to_string()).collect();
        for key in raw.keys() {
            if let Some(rest) = key.strip_prefix("para.")
                && let Some((ns, _)) = rest.split_once('.')
            {
                namespaces.push(ns.to_lowercase());
            }
        }
        namespaces.push("azure".into());
        for (name, value) in env {
            if let Some(key) = env_key(&name, &namespaces) {
                raw.insert(key, value);
            }
        }
        let get = |k: &str| raw.get(k).map(String::as_str);
        let listen = parse_or(&raw, "para.host.listen", "127.0.0.1:8080".parse().ok())?;
        let brokers = broker_table(&raw)?;
        Ok(Config {
            iot_enabled: parse_or(&raw, "para.iot_enabled", Some(false))?,
            app_name: get("para.app_name").unwrap_or("para").to_string(),
            worker_id: parse_or(&raw, "para.worker_id", Some(1))?,
            app_secret_key: get("para.app_secret_key").map(str::to_string),
            request_expires_after: parse_or(&raw, "para.request_expires_after", Some(900))?,
            master_key_file: get("para.host.master_key_file").map(PathBuf::from),
            max_entity_size: parse_or(&raw, "para.max_entity_size_bytes", Some(1024 * 1024))?,
            default_page_size: parse_or(&raw, "para.max_items_per_page", Some(30))?,
            max_page_limit: parse_or(&raw, "para.max_page_limit", Some(256))?,
            listen,
            db_path: PathBuf::from(get("para.host.db").unwrap_or("para-host.db")),
            poll_interval: ms(parse_or(&raw, "para.host.poll_interval_ms", Some(2000))?),
            poll_max_backoff: ms(parse_or(
                &raw,
                "para.host.poll_max_backoff_ms",
                Some(60_000),
            )?),
            limits: Limits {
                call_timeout: ms(parse_or(&raw, "para.host.call_timeout_ms", Some(15_000))?),
                cpu_budget: ms(parse_or(&raw, "para.host.cpu_budget_ms", Some(2_000))?),
                memory_bytes: parse_or::<usize>(&raw, "para.host.memory_limit_mb", Some(64))?
                    * 1024
                    * 1024,
                max_concurrent: parse_or(&raw, "para.host.max_concurrent_calls", Some(128))?,
                pooling: parse_or(&raw, "para.host.pooling", Some(true))?,
            },
            tls_ca_file: get("para.host.tls_ca_file").map(PathBuf::from),
            janitor_after: ms(parse_or(&raw, "para.host.janitor_after_ms", Some(0))?),
            fault_crash_before_commit: parse_or(
                &raw,
                "para.host.fault_crash_before_commit",
                Some(false),
            )?,
            brokers,
            raw,
        })
    }

    /// The keys one broker may read: `para.<namespace>.*`, prefix stripped.
    pub fn broker_keys(&self, namespace: &str) -> BTreeMap<String, String> {
        let prefix = format!("para.{}.", namespace.to_lowercase());
        self.raw
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    /// Where the master key lives: configured, or next to the database.
    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file.clone().unwrap_or_else(|| {
            let mut p = self.db_path.clone().into_os_string();
            p.push(".key");
            PathBuf::from(p)
        })
    }

    /// `PARA_HOST_MASTER_KEY` or `para.host.master_key`, if set.
    pub fn master_key_override(&self) -> Option<&str> {
        self.raw.get("para.host.master_key").map(String::as_str)
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Maps `PARA_AZURE_IOT_HOSTNAME` to `para.azure.iot_hostname`.
fn env_key(name: &str, namespaces: &[String]) -> Option<String> {
    let rest = name.strip_prefix("PARA_")?.to_lowercase();
    if rest.is_empty() {
        return None;
    }
    if let Some((first, tail)) = rest.split_once('_')
        && namespaces.iter().any(|ns| ns == first)
        && first != "brokers"
    {
        return Some(format!("para.{first}.{tail}"));
    }
    Some(format!("para.{rest}"))
}

fn parse_or<T: std::str::FromStr>(
    raw: &BTreeMap<String, String>,
    key: &str,
    default: Option<T>,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match raw.get(key) {
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
            key: key.into(),
            value: v.clone(),
            why: e.to_string(),
        }),
        None => default.ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            value: String::new(),
            why: "required".into(),
        }),
    }
}

fn broker_table(
    raw: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, BrokerConfig>, ConfigError> {
    let mut names: Vec<String> = Vec::new();
    for key in raw.keys() {
        if let Some(rest) = key.strip_prefix("para.brokers.")
            && let Some((name, _)) = rest.split_once('.')
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_string());
        }
    }
    let mut table = BTreeMap::new();
    if names.is_empty() {
        // No broker table: serve the bundled Azure broker.
        table.insert(
            "Azure".to_string(),
            BrokerConfig {
                name: "Azure".into(),
                component: PathBuf::from(BUILTIN_AZURE),
                namespace: "azure".into(),
                allowed_hosts: vec!["https://{iot_hostname}".into()],
                allowed_sockets: vec!["{iot_eventhub_endpoint}".into()],
            },
        );
    }
    for name in names {
        let key = |field: &str| format!("para.brokers.{name}.{field}");
        let component = raw
            .get(&key("component"))
            .ok_or_else(|| ConfigError::Invalid {
                key: key("component"),
                value: String::new(),
                why: format!("broker {name} needs the path of its .wasm component"),
            })?;
        let list = |field: &str, shape: &str| -> Result<Vec<String>, ConfigError> {
            match raw.get(&key(field)) {
                None => Ok(Vec::new()),
                Some(v) => {
                    serde_json::from_str::<Vec<String>>(v).map_err(|e| ConfigError::Invalid {
                        key: key(field),
                        value: v.clone(),
                        why: format!("expected a list of \"{shape}\" strings ({e})"),
                    })
                }
            }
        };
        let allowed_hosts = list("allowed_hosts", "scheme://host[:port]")?;
        let allowed_sockets = list("allowed_sockets", "host:port")?;
        let namespace = raw
            .get(&key("config_namespace"))
            .cloned()
            .unwrap_or_else(|| name.to_lowercase());
        table.insert(
            name.clone(),
            BrokerConfig {
                name: name.clone(),
                component: PathBuf::from(component),
                namespace,
                allowed_hosts,
                allowed_sockets,
            },
        );
    }
    Ok(table)
}

/// Parses a TOML document into flat dotted keys with string values.
/// Arrays become JSON text; nested tables are flattened with dots.
pub fn parse_flat(text: &str) -> Result<BTreeMap<String, String>, String> {
    let value: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::Table(value), &mut out);
    Ok(out)
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        toml::Value::Array(items) => {
            let json: Vec<serde_json::Value> = items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => serde_json::Value::String(s.clone()),
                    other => serde_json::Value::String(other.to_string()),
                })
                .collect();
            out.insert(
                prefix.to_string(),
                serde_json::Value::Array(json).to_string(),
            );
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keys_and_env_override() {
        let raw = parse_flat(
            r#"
para.iot_enabled = false
para.azure.iot_hostname = "hub.example"
para.brokers.Azure.component = "azure.wasm"
para.brokers.Azure.allowed_hosts = ["https://{iot_hostname}"]
"#,
        )
        .unwrap();
        let env = vec![
            ("PARA_IOT_ENABLED".to_string(), "true".to_string()),
            ("PARA_AZURE_IOT_ACCESS_KEY".to_string(), "k".to_string()),
            ("PARA_HOST_POLL_INTERVAL_MS".to_string(), "50".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = Config::from_raw(raw, env).unwrap();
        assert!(c.iot_enabled);
        assert_eq!(c.poll_interval, Duration::from_millis(50));
        let keys = c.broker_keys("azure");
        assert_eq!(
            keys.get("iot_hostname").map(String::as_str),
            Some("hub.example")
        );
        assert_eq!(keys.get("iot_access_key").map(String::as_str), Some("k"));
        assert_eq!(
            c.brokers["Azure"].allowed_hosts,
            vec!["https://{iot_hostname}"]
        );
    }

    #[test]
    fn debug_output_holds_no_secret_values() {
        let mut raw = BTreeMap::new();
        raw.insert(
            "para.azure.iot_access_key".to_string(),
            "SECRET-KEY".to_string(),
        );
        raw.insert("para.app_secret_key".to_string(), "ROOT-SECRET".to_string());
        let shown = format!("{:?}", Config::from_raw(raw, Vec::new()).unwrap());
        assert!(shown.contains("para.azure.iot_access_key"));
        assert!(
            !shown.contains("SECRET-KEY") && !shown.contains("ROOT-SECRET"),
            "{shown}"
        );
    }

    #[test]
    fn bad_value_names_the_key() {
        let mut raw = BTreeMap::new();
        raw.insert("para.host.poll_interval_ms".to_string(), "soon".to_string());
        let err = Config::from_raw(raw, Vec::new()).unwrap_err().to_string();
        assert!(err.contains("para.host.poll_interval_ms"), "{err}");
    }
}
