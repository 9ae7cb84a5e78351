//! Device-to-cloud messages from the hub's Event Hub-compatible endpoint.
//!
//! The [`Reader`] lives in the long-lived poll instance and keeps one AMQP
//! connection: CBS-authorized, with one receiver per partition that starts
//! after the partition's checkpoint (the offset in the poll cursor, via the
//! `apache.org:selector-filter:string` filter). Each poll grants credit up
//! to `iot_max_messages` per partition, collects what arrives within
//! [`COLLECT_MS`], and turns JSON-object messages into state changes.
//!
//! The cursor moves only past what a poll returned, and a cursor that does
//! not match what this instance handed out (a host restart, a failed
//! commit) re-attaches the partition from the cursor's offset, so nothing
//! is lost. Dropped connections, expired tokens and redirects reconnect
//! with backoff from the last checkpoint.

use crate::amqp::cbs;
use crate::amqp::connection::{AmqpError, Connection};
use crate::amqp::transport::Connector;
use crate::config::DEFAULT_POLICY;
use crate::connstr;
use crate::error::Failure;
use crate::platform::{Level, Platform, TransportError};
use crate::query::Change;
use crate::registry;
use fe2o3_amqp_types::messaging::annotations::OwnedKey;
use fe2o3_amqp_types::messaging::{Body, Message, Source};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use std::collections::BTreeMap;

/// The AMQPS port.
pub const DEFAULT_PORT: u16 = 5671;
/// Partitions read when `iot_partitions` is not set (as Para always did).
pub const DEFAULT_PARTITIONS: u32 = 2;
/// Link credit per partition when `iot_max_messages` is not set.
pub const DEFAULT_MAX_MESSAGES: u32 = 10;
/// How long one poll collects messages.
pub const COLLECT_MS: u64 = 200;
/// How soon to poll again after a poll that returned messages.
pub const BUSY_POLL_MS: u64 = 50;
/// The largest D2C message turned into a state change.
pub const MAX_STATE_BYTES: usize = 256 * 1024;
/// Timeout for connecting, SASL, open and CBS.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Token lifetime; renewed [`crate::sas::RENEW_BEFORE_SECS`] before expiry.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// Longest wait between reconnect attempts.
pub const MAX_BACKOFF_MS: u64 = 60_000;
/// Link handles used before the connection is renewed (handles are never
/// reused on one connection, so a late transfer cannot reach a new link).
const MAX_HANDLES: u32 = 200;
/// The selector filter's name and descriptor.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The checkpoint of a partition never read: before the first message.
pub const START_OFFSET: &str = "-1";

/// Validated Event Hub settings.
#[derive(Clone, PartialEq, Eq)]
pub struct EventHubConfig {
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// `host[:port]` as configured: part of the token audience.
    pub authority: String,
    /// TLS (`sb://`, `amqps://`) or plain TCP (`amqp://`, tests only).
    pub tls: bool,
    /// The Event Hub-compatible name.
    pub entity: String,
    /// The consumer group (`$Default`).
    pub consumer_group: String,
    /// Partitions read: `0..partitions`.
    pub partitions: u32,
    /// Link credit per partition.
    pub max_messages: u32,
    /// The shared access policy.
    pub policy: String,
    /// The policy key, as text (the HMAC key is its UTF-8 bytes). Never logged.
    pub key: String,
    /// Extra trusted certificates (PEM).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for EventHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHubConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("entity", &self.entity)
            .field("consumer_group", &self.consumer_group)
            .field("partitions", &self.partitions)
            .field("max_messages", &self.max_messages)
            .field("policy", &self.policy)
            .field("key", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

fn invalid(key: &str, why: &str, what: &str) -> Failure {
    Failure::Misconfigured(format!(
        "para.azure.{key} is invalid: {why}; set it to {what}"
    ))
}

const ENDPOINT_WHAT: &str = "the hub's Event Hub-compatible endpoint (sb://<namespace>.servicebus.windows.net/) or its connection string, from the portal's \"Built-in endpoints\" page";

fn parse_number(key: &str, v: Option<String>, default: u32, max: u32) -> Result<u32, Failure> {
    match v {
        None => Ok(default),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(invalid(
                key,
                &format!("'{s}' is not a number from 1 to {max}"),
                "a whole number",
            )),
        },
    }
}

impl EventHubConfig {
    /// Reads the settings; `Ok(None)` when `iot_eventhub_endpoint` is not
    /// set (D2C reading off).
    pub fn load(
        get: impl Fn(&str) -> Result<Option<String>, String>,
    ) -> Result<Option<EventHubConfig>, Failure> {
        let read = |key: &str| -> Result<Option<String>, Failure> {
            match get(key) {
                Ok(v) => Ok(v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())),
                Err(e) => Err(Failure::Misconfigured(format!(
                    "could not read para.azure.{key} from the host's configuration: {e}"
                ))),
            }
        };
        let Some(endpoint) = read("iot_eventhub_endpoint")? else {
            return Ok(None);
        };
        let (url, cs_policy, cs_key, cs_entity) = if endpoint.contains('=') {
            let pairs = connstr::parse(&endpoint).map_err(|e| {
                invalid(
                    "iot_eventhub_endpoint",
                    &format!("it looks like a connection string but {e}"),
                    ENDPOINT_WHAT,
                )
            })?;
            let url = connstr::get(&pairs, "Endpoint")
                .ok_or_else(|| {
                    invalid(
                        "iot_eventhub_endpoint",
                        "the connection string has no Endpoint",
                        ENDPOINT_WHAT,
                    )
                })?
                .to_string();
            let g = |k: &str| {
                connstr::get(&pairs, k)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            };
            (
                url,
                g("SharedAccessKeyName"),
                g("SharedAccessKey"),
                g("EntityPath"),
            )
        } else {
            (endpoint, None, None, None)
        };
        let (tls, rest) = if let Some(r) = strip_scheme(&url, "sb://") {
            (true, r)
        } else if let Some(r) = strip_scheme(&url, "amqps://") {
            (true, r)
        } else if let Some(r) = strip_scheme(&url, "amqp://") {
            (false, r)
        } else {
            return Err(invalid(
                "iot_eventhub_endpoint",
                &format!("'{url}' does not start with sb://"),
                ENDPOINT_WHAT,
            ));
        };
        let authority = rest.split('/').next().unwrap_or_default().to_string();
        let (host, port) = split_authority(&authority).ok_or_else(|| {
            invalid(
                "iot_eventhub_endpoint",
                &format!("'{authority}' is not host[:port]"),
                ENDPOINT_WHAT,
            )
        })?;

        let entity = match (read("iot_eventhub_name")?, cs_entity) {
            (Some(n), Some(c)) if n != c => {
                return Err(Failure::Misconfigured(format!(
                    "para.azure.iot_eventhub_name is '{n}' but the connection string in para.azure.iot_eventhub_endpoint names '{c}'; make them agree"
                )));
            }
            (n, c) => n.or(c).ok_or_else(|| {
                Failure::Misconfigured(
                    "para.azure.iot_eventhub_name is not set; set it to the hub's Event Hub-compatible name (portal → Built-in endpoints)".into(),
                )
            })?,
        };
        if entity.contains(['/', '\'', ' ']) {
            return Err(invalid(
                "iot_eventhub_name",
                &format!("'{entity}' contains '/', a quote or a space"),
                "the Event Hub-compatible name",
            ));
        }
        let policy = cs_policy
            .or(read("iot_policy_name")?)
            .unwrap_or_else(|| DEFAULT_POLICY.to_string());
        let key = match cs_key {
            Some(k) => k,
            None => {
                let v = read("iot_access_key")?.ok_or_else(|| {
                    Failure::Misconfigured(
                        "para.azure.iot_access_key is not set; the Event Hub-compatible endpoint needs a policy key with ServiceConnect".into(),
                    )
                })?;
                if v.contains("SharedAccessKey=") {
                    let pairs = connstr::parse(&v).map_err(|e| {
                        invalid(
                            "iot_access_key",
                            &format!("it looks like a connection string but {e}"),
                            "the policy's primary key",
                        )
                    })?;
                    connstr::get(&pairs, "SharedAccessKey")
                        .unwrap_or_default()
                        .to_string()
                } else {
                    v
                }
            }
        };
        let partitions = parse_number(
            "iot_partitions",
            read("iot_partitions")?,
            DEFAULT_PARTITIONS,
            1024,
        )?;
        let max_messages = parse_number(
            "iot_max_messages",
            read("iot_max_messages")?,
            DEFAULT_MAX_MESSAGES,
            10_000,
        )?;
        let consumer_group = read("iot_consumer_group")?.unwrap_or_else(|| "$Default".into());
        Ok(Some(EventHubConfig {
            host,
            port,
            authority,
            tls,
            entity,
            consumer_group,
            partitions,
            max_messages,
            policy,
            key,
            ca_pem: read("tls_ca_pem")?,
        }))
    }

    /// The CBS audience and token resource: `sb://<host[:port]>/<entity>`.
    pub fn audience(&self) -> String {
        format!("sb://{}/{}", self.authority, self.entity)
    }

    /// A partition's source address.
    pub fn partition_address(&self, partition: u32) -> String {
        format!(
            "{}/ConsumerGroups/{}/Partitions/{partition}",
            self.entity, self.consumer_group
        )
    }

    fn endpoint_text(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    url.get(..scheme.len())
        .filter(|s| s.eq_ignore_ascii_case(scheme))
        .map(|_| &url[scheme.len()..])
}

fn split_authority(a: &str) -> Option<(String, u16)> {
    if a.is_empty() || a.contains(['@', ' ', '?', '#']) {
        return None;
    }
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match a.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (a.to_string(), DEFAULT_PORT),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

/// The source of a partition receiver: the partition address, filtered to
/// messages after `offset`.
pub fn partition_source(address: &str, offset: &str) -> Source {
    let filter = Described {
        descriptor: Descriptor::Name(Symbol::from(SELECTOR_FILTER)),
        value: Value::String(format!("amqp.annotation.x-opt-offset > '{offset}'")),
    };
    Source::builder()
        .address(address)
        .add_to_filter(Symbol::from(SELECTOR_FILTER), filter)
        .build()
}

/// Whether an offset can be put in a filter (Event Hubs offsets are
/// decimal; `-1` is the start).
pub fn valid_offset(o: &str) -> bool {
    o == START_OFFSET || (!o.is_empty() && o.len() <= 40 && o.bytes().all(|b| b.is_ascii_digit()))
}

/// One received message, turned into a change or the reason it is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The message's `x-opt-offset`, if it had one.
    pub offset: Option<String>,
    /// The change, or why there is none.
    pub change: Result<Change, String>,
}

fn annotation<'a>(m: &'a Message<Body<Value>>, name: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(name)))
}

/// Turns one received message into a state change.
pub fn decode_event(payload: &[u8], now_ms: u64) -> Decoded {
    let m = match cbs::decode_message(payload) {
        Ok(m) => m,
        Err(e) => {
            return Decoded {
                offset: None,
                change: Err(e),
            };
        }
    };
    let offset = annotation(&m, "x-opt-offset").map(crate::amqp::connection::value_text);
    Decoded {
        offset,
        change: event_change(&m, now_ms),
    }
}

fn event_change(m: &Message<Body<Value>>, now_ms: u64) -> Result<Change, String> {
    let device = match annotation(m, "iothub-connection-device-id") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err("it has no iothub-connection-device-id annotation".into()),
    };
    let (appid, thing_id) = registry::split_device_id(device).ok_or_else(|| {
        format!("device '{device}' is not a Para thing (its id is not appid:thingId)")
    })?;
    let written_at = ["x-opt-enqueued-time", "iothub-enqueuedtime"]
        .into_iter()
        .find_map(|k| match annotation(m, k) {
            Some(Value::Timestamp(t)) => u64::try_from(t.milliseconds()).ok(),
            Some(Value::Long(n)) => u64::try_from(*n).ok(),
            Some(Value::Ulong(n)) => Some(*n),
            _ => None,
        })
        .unwrap_or(now_ms);
    let body: Vec<u8> = match &m.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            _ => return Err("its body is an AMQP value that is not text".into()),
        },
        Body::Sequence(_) => return Err("its body is an AMQP sequence, not JSON".into()),
        Body::Empty => return Err("it has no body".into()),
    };
    if body.len() > MAX_STATE_BYTES {
        return Err(format!(
            "its body is {} bytes, more than {MAX_STATE_BYTES}",
            body.len()
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(o)) => Ok(Change {
            thing_id: thing_id.to_string(),
            appid: appid.to_string(),
            state: serde_json::Value::Object(o).to_string(),
            written_at,
        }),
        Ok(_) => Err("its body is JSON but not an object".into()),
        Err(_) => Err("its body is not JSON".into()),
    }
}

/// What one poll of the Event Hub produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventBatch {
    /// State changes, in partition order, each partition in offset order.
    pub changes: Vec<Change>,
    /// Every partition's checkpoint after this batch.
    pub checkpoints: BTreeMap<String, String>,
    /// Messages read (including skipped ones).
    pub messages: usize,
}

struct PartitionLink {
    handle: u32,
    /// The offset of the last message handed out (or the start filter's).
    position: String,
}

struct Session {
    conn: Connection,
    config: EventHubConfig,
    cbs_send: u32,
    cbs_recv: u32,
    token_expiry: u64,
    links: BTreeMap<u32, PartitionLink>,
}

/// The long-lived D2C reader of one poll instance.
#[derive(Default)]
pub struct Reader {
    session: Option<Session>,
    failures: u32,
    retry_at_ms: u64,
    redirect: Option<(String, u16)>,
    counter: u64,
}

fn amqp_failure(cfg: &EventHubConfig, what: &str, e: &AmqpError) -> Failure {
    let at = cfg.endpoint_text();
    match e {
        AmqpError::Transport(TransportError::Denied) => Failure::Misconfigured(format!(
            "the host refused a socket to the Event Hub-compatible endpoint {at} while {what}; add \"{{iot_eventhub_endpoint}}\" to para.brokers.<name>.allowed_sockets"
        )),
        AmqpError::Transport(TransportError::Tls(m)) => Failure::Unavailable(format!(
            "TLS to the Event Hub-compatible endpoint {at} failed while {what}: {m}; for a private CA set para.host.tls_ca_file"
        )),
        AmqpError::Transport(TransportError::Dns(m)) => Failure::Misconfigured(format!(
            "the Event Hub-compatible endpoint {at} does not resolve ({m}); check para.azure.iot_eventhub_endpoint"
        )),
        AmqpError::Remote { condition, .. }
            if condition == "amqp:unauthorized-access" || condition == "sasl" =>
        {
            Failure::Unauthorized(format!(
                "the Event Hub-compatible endpoint {at} refused the credentials while {what} ({e}); check para.azure.iot_access_key and iot_policy_name (the policy needs ServiceConnect)"
            ))
        }
        AmqpError::Remote { condition, .. } if condition == "amqp:not-found" => {
            Failure::Misconfigured(format!(
                "the Event Hub-compatible endpoint {at} does not know '{}' while {what} ({e}); check para.azure.iot_eventhub_name, iot_partitions and iot_consumer_group",
                cfg.entity
            ))
        }
        _ => Failure::Unavailable(format!(
            "the Event Hub-compatible endpoint {at} failed while {what}: {e}; retrying with backoff"
        )),
    }
}

impl Reader {
    /// A reader with no connection yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a connection is open.
    pub fn connected(&self) -> bool {
        self.session.is_some()
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn drop_session(&mut self, platform: &dyn Platform) {
        if let Some(mut s) = self.session.take() {
            s.conn.close(platform);
        }
    }

    fn backoff(&mut self, platform: &dyn Platform) -> u64 {
        self.failures = self.failures.saturating_add(1);
        let delay = 1000u64
            .saturating_mul(1 << (self.failures - 1).min(6))
            .min(MAX_BACKOFF_MS);
        self.retry_at_ms = platform.monotonic_ms() + delay;
        delay
    }

    /// Reads what arrived after `checkpoints` (partition → offset).
    pub fn poll<P: Platform>(
        &mut self,
        platform: &P,
        connector: &mut dyn Connector,
        cfg: &EventHubConfig,
        checkpoints: &BTreeMap<String, String>,
    ) -> Result<EventBatch, Failure> {
        let p: &dyn Platform = platform;
        if self.session.as_ref().is_some_and(|s| s.config != *cfg) {
            p.log(Level::Info, "the Event Hub settings changed; reconnecting");
            self.drop_session(p);
            self.redirect = None;
        }
        let mut out = EventBatch::default();
        for n in 0..cfg.partitions {
            let start = checkpoints
                .get(&n.to_string())
                .filter(|o| valid_offset(o))
                .cloned()
                .unwrap_or_else(|| START_OFFSET.to_string());
            out.checkpoints.insert(n.to_string(), start);
        }
        if self.session.is_none() {
            let now = p.monotonic_ms();
            if now < self.retry_at_ms {
                p.log(
                    Level::Debug,
                    &format!("Event Hub reconnect in {} ms", self.retry_at_ms - now),
                );
                return Ok(out);
            }
            match self.connect(p, connector, cfg) {
                Ok(s) => {
                    self.session = Some(s);
                    self.failures = 0;
                }
                Err(f) => {
                    let delay = self.backoff(p);
                    p.log(Level::Warn, &format!("{f}; next attempt in {delay} ms"));
                    return Err(f);
                }
            }
        }
        match self.read(p, cfg, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                // What was read is still returned; the next poll reconnects
                // from the checkpoints handed out with it.
                self.drop_session(p);
                let f = match &e {
                    ReadEnd::Redirect(host, port) => {
                        p.log(
                            Level::Info,
                            &format!("the Event Hub endpoint redirected to {host}:{port}; reconnecting there"),
                        );
                        self.redirect = Some((host.clone(), *port));
                        None
                    }
                    ReadEnd::Reauthorize(why) => {
                        p.log(
                            Level::Info,
                            &format!(
                                "the Event Hub endpoint wants a new token ({why}); reconnecting"
                            ),
                        );
                        None
                    }
                    ReadEnd::Failed(f) => {
                        let delay = self.backoff(p);
                        p.log(Level::Warn, &format!("{f}; reconnecting in {delay} ms"));
                        Some(f.clone())
                    }
                };
                match f {
                    Some(f) if out.messages == 0 => Err(f),
                    _ => Ok(out),
                }
            }
        }
    }

    fn connect(
        &mut self,
        p: &dyn Platform,
        connector: &mut dyn Connector,
        cfg: &EventHubConfig,
    ) -> Result<Session, Failure> {
        let (host, port) = self
            .redirect
            .clone()
            .unwrap_or_else(|| (cfg.host.clone(), cfg.port));
        p.log(
            Level::Info,
            &format!(
                "connecting to the Event Hub-compatible endpoint {host}:{port} ({} partitions of '{}')",
                cfg.partitions, cfg.entity
            ),
        );
        let stream = connector
            .connect(&host, port, cfg.tls, cfg.ca_pem.as_deref())
            .map_err(|e| amqp_failure(cfg, "connecting", &AmqpError::Transport(e)))?;
        let container = format!("para-azure-broker-{}", p.unix_secs());
        let mut conn = Connection::open(stream, &host, &container, p, CONNECT_TIMEOUT_MS)
            .map_err(|e| amqp_failure(cfg, "opening the AMQP connection", &e))?;
        let id = self.next_id();
        let cbs_send = conn
            .attach_sender(p, &format!("cbs-sender-{id}"), cbs::CBS_NODE)
            .map_err(|e| amqp_failure(cfg, "attaching to $cbs", &e))?;
        let cbs_recv = conn
            .attach_receiver(
                p,
                &format!("cbs-receiver-{id}"),
                Source::builder().address(cbs::CBS_NODE).build(),
                cbs::CBS_REPLY_TO,
                10,
            )
            .map_err(|e| amqp_failure(cfg, "attaching to $cbs", &e))?;
        let mut s = Session {
            conn,
            config: cfg.clone(),
            cbs_send,
            cbs_recv,
            token_expiry: 0,
            links: BTreeMap::new(),
        };
        self.put_token(p, &mut s)?;
        Ok(s)
    }

    /// Sends a fresh token to `$cbs` and waits for the answer.
    fn put_token(&mut self, p: &dyn Platform, s: &mut Session) -> Result<(), Failure> {
        let cfg = s.config.clone();
        let audience = cfg.audience();
        let expiry = p.unix_secs() + TOKEN_LIFETIME_SECS;
        let token = cbs::eventhub_token(&audience, &cfg.policy, &cfg.key, expiry);
        let id = format!("cbs-{}", self.next_id());
        let deadline = p.monotonic_ms() + CONNECT_TIMEOUT_MS;
        let fail = |e: AmqpError| amqp_failure(&cfg, "authorizing with $cbs", &e);
        let timeout = || {
            Failure::Unavailable(format!(
                "the Event Hub-compatible endpoint {} did not answer the CBS put-token in time",
                cfg.endpoint_text()
            ))
        };
        // The sender needs credit from the peer first.
        while s.conn.credit(s.cbs_send) == 0 {
            if let Some(end) = s.conn.link_end(s.cbs_send) {
                return Err(fail(AmqpError::Remote {
                    condition: end.condition.clone(),
                    description: end.description.clone(),
                }));
            }
            if p.monotonic_ms() >= deadline {
                return Err(timeout());
            }
            s.conn.pump(p, 50).map_err(fail)?;
        }
        let request = cbs::put_token_request(&id, &audience, &token);
        s.conn.send_message(p, s.cbs_send, &request).map_err(fail)?;
        loop {
            while let Some(d) = s.conn.take_delivery_on(s.cbs_recv) {
                let r =
                    cbs::parse_response(&d.payload).map_err(|e| fail(AmqpError::Protocol(e)))?;
                if r.correlation_id.as_deref() != Some(id.as_str()) {
                    continue;
                }
                if !r.ok() {
                    let condition = if matches!(r.status, Some(401) | Some(403)) {
                        "amqp:unauthorized-access"
                    } else if r.status == Some(404) {
                        "amqp:not-found"
                    } else {
                        "cbs"
                    };
                    return Err(fail(AmqpError::Remote {
                        condition: condition.into(),
                        description: format!(
                            "put-token answered {} {}",
                            r.status.map_or("no status".into(), |s| s.to_string()),
                            r.description
                        ),
                    }));
                }
                s.token_expiry = expiry;
                let _ = s.conn.grant(p, s.cbs_recv, 10);
                return Ok(());
            }
            if let Some(end) = s.conn.link_end(s.cbs_recv) {
                return Err(fail(AmqpError::Remote {
                    condition: end.condition.clone(),
                    description: end.description.clone(),
                }));
            }
            if p.monotonic_ms() >= deadline {
                return Err(timeout());
            }
            s.conn.pump(p, 50).map_err(fail)?;
        }
    }

    fn read(
        &mut self,
        p: &dyn Platform,
        cfg: &EventHubConfig,
        out: &mut EventBatch,
    ) -> Result<(), ReadEnd> {
        let Some(mut s) = self.session.take() else {
            return Ok(());
        };
        let result = self.read_session(p, cfg, &mut s, out);
        self.session = Some(s);
        result
    }

    fn read_session(
        &mut self,
        p: &dyn Platform,
        cfg: &EventHubConfig,
        s: &mut Session,
        out: &mut EventBatch,
    ) -> Result<(), ReadEnd> {
        let fail = |what: &str, e: AmqpError| ReadEnd::Failed(amqp_failure(cfg, what, &e));
        if p.unix_secs() + crate::sas::RENEW_BEFORE_SECS >= s.token_expiry {
            p.log(Level::Info, "renewing the Event Hub token");
            self.put_token(p, s).map_err(ReadEnd::Failed)?;
        }
        self.handle_link_ends(p, cfg, s, out)?;
        // Links whose position is not the cursor's are read again from it.
        for n in 0..cfg.partitions {
            let want = &out.checkpoints[&n.to_string()];
            if let Some(link) = s.links.get(&n)
                && link.position != *want
            {
                p.log(
                    Level::Info,
                    &format!(
                        "partition {n}: the cursor's offset {want} is not this instance's {}; re-reading from {want}",
                        link.position
                    ),
                );
                let h = link.handle;
                s.conn.detach(p, h).map_err(|e| fail("detaching", e))?;
                s.links.remove(&n);
            }
        }
        if s.conn_handles() > MAX_HANDLES {
            return Err(ReadEnd::Reauthorize("link handles used up".into()));
        }
        for n in 0..cfg.partitions {
            if s.links.contains_key(&n) {
                continue;
            }
            let offset = out.checkpoints[&n.to_string()].clone();
            let name = format!("para-{}-p{n}-{}", cfg.consumer_group, self.next_id());
            let source = partition_source(&cfg.partition_address(n), &offset);
            let handle = s
                .conn
                .attach_receiver(p, &name, source, &name, cfg.max_messages)
                .map_err(|e| fail("attaching a partition receiver", e))?;
            s.links.insert(
                n,
                PartitionLink {
                    handle,
                    position: offset,
                },
            );
        }
        // Top up credit.
        for link in s.links.values() {
            if s.conn.credit(link.handle) < cfg.max_messages {
                s.conn
                    .grant(p, link.handle, cfg.max_messages)
                    .map_err(|e| fail("granting credit", e))?;
            }
        }
        // Collect.
        let by_handle: BTreeMap<u32, u32> = s.links.iter().map(|(n, l)| (l.handle, *n)).collect();
        let mut received: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
        let deadline = p.monotonic_ms() + COLLECT_MS;
        let mut result = Ok(());
        loop {
            let now = p.monotonic_ms();
            if now >= deadline {
                break;
            }
            if let Err(e) = s.conn.pump(p, (deadline - now).min(50)) {
                result = Err(fail("reading", e));
                break;
            }
            while let Some(d) = s.conn.take_delivery() {
                if let Some(n) = by_handle.get(&d.handle) {
                    received.entry(*n).or_default().push(d.payload);
                }
            }
            let all_used = s.links.values().all(|l| s.conn.credit(l.handle) == 0);
            let ended = s
                .links
                .values()
                .any(|l| s.conn.link_end(l.handle).is_some());
            if all_used || ended {
                break;
            }
        }
        let now_ms = p.unix_secs() * 1000;
        for (n, payloads) in received {
            let key = n.to_string();
            for payload in payloads {
                out.messages += 1;
                let d = decode_event(&payload, now_ms);
                match &d.offset {
                    Some(o) if valid_offset(o) => {
                        out.checkpoints.insert(key.clone(), o.clone());
                        if let Some(link) = s.links.get_mut(&n) {
                            link.position = o.clone();
                        }
                    }
                    other => p.log(
                        Level::Warn,
                        &format!("partition {n}: a message has no usable x-opt-offset ({other:?})"),
                    ),
                }
                match d.change {
                    Ok(c) => out.changes.push(c),
                    Err(why) => p.log(
                        Level::Warn,
                        &format!(
                            "partition {n} offset {}: skipping a device-to-cloud message because {why}",
                            d.offset.as_deref().unwrap_or("?")
                        ),
                    ),
                }
            }
        }
        if out.messages > 0 {
            p.log(
                Level::Info,
                &format!(
                    "read {} device-to-cloud messages ({} state changes)",
                    out.messages,
                    out.changes.len()
                ),
            );
        }
        result?;
        self.handle_link_ends(p, cfg, s, out)
    }

    /// Acts on links the peer detached: a redirect or an authorization
    /// failure ends the connection; anything else drops the link, which
    /// the next poll attaches again from the checkpoint.
    fn handle_link_ends(
        &mut self,
        p: &dyn Platform,
        cfg: &EventHubConfig,
        s: &mut Session,
        out: &EventBatch,
    ) -> Result<(), ReadEnd> {
        for n in 0..cfg.partitions {
            let Some(link) = s.links.get(&n) else {
                continue;
            };
            let Some(end) = s.conn.link_end(link.handle).cloned() else {
                continue;
            };
            match end.condition.as_str() {
                "amqp:link:redirect" => {
                    let host = end.info.get("hostname").or(end.info.get("network-host"));
                    let port = end
                        .info
                        .get("port")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(DEFAULT_PORT);
                    return Err(match host {
                        Some(h) => ReadEnd::Redirect(h.clone(), port),
                        None => ReadEnd::Failed(amqp_failure(
                            cfg,
                            "reading",
                            &AmqpError::Protocol("a redirect without a hostname".into()),
                        )),
                    });
                }
                "amqp:unauthorized-access" => {
                    return Err(ReadEnd::Reauthorize(end.description));
                }
                _ => {
                    p.log(
                        Level::Warn,
                        &format!(
                            "the Event Hub endpoint detached partition {n} ({} {}); attaching it again from offset {}",
                            end.condition,
                            end.description,
                            out.checkpoints[&n.to_string()]
                        ),
                    );
                    let h = link.handle;
                    s.links.remove(&n);
                    // The peer's detach was answered when it arrived.
                    let _ = s.conn.forget(h);
                }
            }
        }
        Ok(())
    }
}

impl Session {
    fn conn_handles(&self) -> u32 {
        self.conn.handles_used()
    }
}

enum ReadEnd {
    Redirect(String, u16),
    Reauthorize(String),
    Failed(Failure),
}

#[cfg(test)]
mod tests;
