//! The Event Hub-compatible endpoint (reference §8): an AMQP 1.0 listener over TLS that serves
//! the hub's stored device-to-cloud messages per partition.
//!
//! Exists so the broker's Event Hubs consumer (hand-written over `fe2o3-amqp-types`) can be
//! tested offline against a strict, standard AMQP 1.0 peer. The Event Hubs *rules* (token,
//! addresses, filters) live in `eventhub.rs`; this module adapts them to AMQP.
//!
//! Why `fe2o3-amqp`'s acceptor rather than a hand-written one: it is a complete AMQP 1.0
//! implementation (protocol headers, SASL layer, open/begin/attach, session windows, link
//! credit, multi-frame transfers, settlement, detach/end/close, idle handling), so the
//! emulator behaves like a real broker on all the protocol details that are not Event Hubs
//! specific, and gets there far faster than re-implementing them. TLS is terminated here with
//! tokio-rustls (ring), from the first byte as on Azure's port 5671 (the library's own TLS
//! acceptor expects the AMQP TLS protocol header first), and the decrypted stream is handed to
//! the acceptor.
//!
//! Behaviour:
//! - SASL mechanisms offered: `MSSBCBS`, `PLAIN`, `ANONYMOUS`. `ANONYMOUS` and `MSSBCBS` are
//!   accepted without credentials; a receiver then needs a successful CBS `put-token` first.
//!   `PLAIN` needs username `<policy>@sas.root.<hub>` and a token (checked by the CBS rules of
//!   `eventhub.rs`, with `skn` equal to `<policy>`) as password; it authorizes the connection
//!   until the token's `se`.
//! - `$cbs`: the client attaches a sender to target `$cbs` and a receiver from source `$cbs`.
//!   Each `put-token` request is answered on the `$cbs` receiver link with `correlation-id` =
//!   the request's `message-id` and application properties `status-code` (int: 200, 400 for a
//!   malformed request, 401 for a refused token) and `status-description`. A successful token
//!   authorizes the connection until its `se` (the latest successful token wins).
//! - When the authorization runs out, every receiver of the connection is detached (closed)
//!   with `amqp:unauthorized-access`; an attach without authorization is answered and then
//!   detached with the same error.
//! - Receivers: see `eventhub.rs` for addresses and filters. Unknown addresses are detached
//!   with `amqp:not-found`, bad filters with `amqp:invalid-field`. Messages are sent in order,
//!   within the link credit, pre-settled or unsettled as the client's attach asks (the
//!   client's dispositions are accepted and not waited for).
//! - Any other link (e.g. `$management`) is detached with `amqp:not-found`.

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SaslAcceptor,
    SessionAcceptor, sasl_acceptor::SaslServerFrame,
};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{AmqpError, Error as AmqpErrorFrame};
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageAnnotations, MessageId,
    Properties, Source, TargetArchetype,
};
use fe2o3_amqp_types::performatives::Attach;
use fe2o3_amqp_types::primitives::{Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use serde_amqp::Value;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use serde_json::{Value as Json, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::eventhub::{self, EhAuth, StartPosition};
use crate::hub::{Hub, PARTITIONS, StoredMessage};
use crate::timefmt;

/// Messages fetched from the hub per round.
const BATCH: usize = 64;

/// Bookkeeping of the AMQP endpoint, shared with the admin API (`GET /_emulator/amqp`) and the
/// fault rules (`amqpDrop`, `amqpExpireTokens`).
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
    /// Bumped to drop every connection open at that moment.
    kill: watch::Sender<u64>,
    /// Set while a delivery-count drop is pending, so no more deliveries slip through.
    draining: AtomicBool,
}

#[derive(Debug, Default)]
struct RegistryInner {
    next_id: u64,
    connections: BTreeMap<u64, watch::Sender<Option<u64>>>,
    receivers: BTreeMap<u64, (usize, u64)>,
    cbs_accepted: u64,
    cbs_rejected: u64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Mutex::new(RegistryInner::default()),
            kill: watch::Sender::new(0),
            draining: AtomicBool::new(false),
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /_emulator/amqp`: open connections, attached receivers with their delivery
    /// counts, and CBS outcomes.
    pub fn to_json(&self) -> Json {
        let r = self.lock();
        let receivers: Vec<Json> = r
            .receivers
            .values()
            .map(|(p, d)| json!({"partition": p, "delivered": d}))
            .collect();
        json!({
            "connections": r.connections.len(),
            "receivers": receivers,
            "cbsAccepted": r.cbs_accepted,
            "cbsRejected": r.cbs_rejected,
        })
    }

    /// Closes every open AMQP connection abruptly (fault `amqpDrop`).
    pub fn drop_all(&self) {
        self.draining.store(false, Ordering::SeqCst);
        self.kill.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Marks every connection's authorization as expired (fault `amqpExpireTokens`).
    pub fn expire_all(&self) {
        for c in self.lock().connections.values() {
            c.send_modify(|e| {
                if e.is_some() {
                    *e = Some(0);
                }
            });
        }
    }

    fn cbs_outcome(&self, ok: bool) {
        let mut r = self.lock();
        if ok {
            r.cbs_accepted += 1;
        } else {
            r.cbs_rejected += 1;
        }
    }
}

/// Removes a connection or receiver from the registry when dropped (also on task abort).
struct Registration<'a> {
    registry: &'a Registry,
    id: u64,
    receiver: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut r = self.registry.lock();
        if self.receiver {
            r.receivers.remove(&self.id);
        } else {
            r.connections.remove(&self.id);
        }
    }
}

/// Configuration of the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Token rules (namespace `host:port`, entity, policies).
    pub auth: EhAuth,
    /// The hub name, for SASL PLAIN usernames `<policy>@sas.root.<hub>`.
    pub hub_name: String,
    /// Log connection-level events to stderr.
    pub verbose: bool,
}

/// Accepts AMQP-over-TLS connections until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    hub: Arc<Hub>,
    config: Arc<EndpointConfig>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, tls.clone(), hub.clone(), config.clone()));
            }
            Err(e) => {
                eprintln!("AMQP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Per-connection state shared by its sessions and links.
struct Conn {
    hub: Arc<Hub>,
    config: Arc<EndpointConfig>,
    /// Authorized until this Unix second (`None`: not authorized).
    auth: watch::Sender<Option<u64>>,
    /// CBS responses on their way to the `$cbs` receiver link(s).
    cbs_tx: mpsc::Sender<Message<AmqpValue<Value>>>,
    cbs_rx: tokio::sync::Mutex<mpsc::Receiver<Message<AmqpValue<Value>>>>,
}

async fn connection(
    stream: TcpStream,
    tls: TlsAcceptor,
    hub: Arc<Hub>,
    config: Arc<EndpointConfig>,
) {
    let verbose = config.verbose;
    // A duplicate of the socket lets `amqpDrop` shut the TCP connection down underneath TLS
    // and AMQP, so neither a close frame nor a close_notify can be sent.
    let (stream, killer) = match stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(k, s)| Ok((TcpStream::from_std(s)?, k)))
    {
        Ok(x) => x,
        Err(e) => {
            eprintln!("AMQP: cannot prepare the socket: {e}");
            return;
        }
    };
    let mut kill = hub.amqp.kill.subscribe();
    kill.mark_unchanged();
    let killed = async move {
        let _ = kill.changed().await;
        let _ = killer.shutdown(Shutdown::Both);
        if verbose {
            eprintln!("AMQP: connection dropped (fault)");
        }
    };
    let run = async {
        let tls_stream =
            match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    if verbose {
                        eprintln!("AMQP: TLS handshake failed: {e}");
                    }
                    return;
                }
                Err(_) => return,
            };
        let (auth, _) = watch::channel(None);
        let slot = Arc::new(Mutex::new(None));
        let sasl = EhSasl {
            config: config.clone(),
            result: slot.clone(),
        };
        let acceptor = ConnectionAcceptor::builder()
            .container_id(format!("azure-iot-hub-emulator-{}", config.auth.entity))
            .sasl_acceptor(sasl)
            .build();
        let opened =
            tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tls_stream)).await;
        let mut handle = match opened {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if verbose {
                    eprintln!("AMQP: connection refused: {e}");
                }
                return;
            }
            Err(_) => {
                if verbose {
                    eprintln!("AMQP: no SASL/open within 30 s; closing");
                }
                return;
            }
        };
        let plain_expiry = *slot.lock().unwrap_or_else(|e| e.into_inner());
        auth.send_replace(plain_expiry);
        let id = {
            let mut r = hub.amqp.lock();
            r.next_id += 1;
            let id = r.next_id;
            r.connections.insert(id, auth.clone());
            id
        };
        let _reg = Registration {
            registry: &hub.amqp,
            id,
            receiver: false,
        };
        let (cbs_tx, cbs_rx) = mpsc::channel(64);
        let conn = Arc::new(Conn {
            hub: hub.clone(),
            config: config.clone(),
            auth,
            cbs_tx,
            cbs_rx: tokio::sync::Mutex::new(cbs_rx),
        });
        let mut sessions = JoinSet::new();
        let session_acceptor = SessionAcceptor::new();
        while let Some(incoming) = handle.next_incoming_session().await {
            match session_acceptor
                .accept_incoming_session(incoming, &mut handle)
                .await
            {
                Ok(session) => {
                    sessions.spawn(run_session(session, conn.clone()));
                }
                Err(e) => {
                    if verbose {
                        eprintln!("AMQP: session refused: {e}");
                    }
                }
            }
        }
        sessions.abort_all();
        let _ = handle.close().await;
    };
    tokio::select! {
        _ = killed => {},
        _ = run => {},
    }
}

/// SASL for one connection: records a PLAIN login's token expiry in `result`.
#[derive(Clone)]
struct EhSasl {
    config: Arc<EndpointConfig>,
    result: Arc<Mutex<Option<u64>>>,
}

impl EhSasl {
    fn plain(&self, init: &SaslInit) -> Result<u64, String> {
        let resp = init
            .initial_response
            .as_ref()
            .ok_or("PLAIN needs an initial response")?;
        let mut parts = resp.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the PLAIN response must be authzid NUL authcid NUL passwd".into());
        };
        let user = std::str::from_utf8(user).map_err(|_| "the username is not UTF-8")?;
        let pass = std::str::from_utf8(pass).map_err(|_| "the password is not UTF-8")?;
        let (policy, hub) = user
            .split_once("@sas.root.")
            .ok_or("the username must be <policy>@sas.root.<hub>")?;
        if !hub.eq_ignore_ascii_case(&self.config.hub_name)
            && !hub.eq_ignore_ascii_case(&self.config.auth.entity)
        {
            return Err(format!("unknown hub '{hub}' in the username"));
        }
        let token = crate::sas::parse_token(pass).map_err(|e| e.to_string())?;
        if token.skn.as_deref() != Some(policy) {
            return Err("the token's skn must be the policy of the username".into());
        }
        self.config.auth.check_token(&token, timefmt::now_unix())
    }
}

impl SaslAcceptor for EhSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("PLAIN"),
            Symbol::from("ANONYMOUS"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            "ANONYMOUS" | "MSSBCBS" => SaslCode::Ok,
            "PLAIN" => match self.plain(&init) {
                Ok(expiry) => {
                    *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(expiry);
                    SaslCode::Ok
                }
                Err(e) => {
                    if self.config.verbose {
                        eprintln!("AMQP: SASL PLAIN refused: {e}");
                    }
                    SaslCode::Auth
                }
            },
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // None of the offered mechanisms has a challenge.
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

fn amqp_error(condition: AmqpError, description: impl Into<String>) -> AmqpErrorFrame {
    AmqpErrorFrame::new(condition, Some(description.into()), None)
}

/// What an incoming attach asks for.
enum LinkKind {
    CbsRequests,
    CbsResponses,
    Partition(usize, StartPosition),
    Refuse(AmqpError, String),
}

fn target_address(attach: &Attach) -> Option<String> {
    #[allow(irrefutable_let_patterns)]
    if let Some(TargetArchetype::Target(t)) = attach.target.as_deref() {
        return t.address.clone();
    }
    None
}

fn selector_of(source: &Source) -> Result<StartPosition, String> {
    let Some(filter) = &source.filter else {
        return Ok(StartPosition::Start);
    };
    let mut result = Ok(StartPosition::Start);
    for (key, value) in filter.iter() {
        if key.as_str() != eventhub::SELECTOR_FILTER {
            // Unknown filters are refused rather than silently ignored.
            return Err(format!("unsupported filter '{}'", key.as_str()));
        }
        let Value::Described(d) = value else {
            return Err(format!(
                "the '{}' filter must be a described string",
                eventhub::SELECTOR_FILTER
            ));
        };
        let Described { descriptor, value } = d.as_ref();
        let descriptor_ok = match descriptor {
            Descriptor::Name(s) => s.as_str() == eventhub::SELECTOR_FILTER,
            Descriptor::Code(c) => *c == eventhub::SELECTOR_FILTER_CODE,
        };
        if !descriptor_ok {
            return Err(format!(
                "the '{}' filter has the wrong descriptor",
                eventhub::SELECTOR_FILTER
            ));
        }
        let Value::String(expr) = value else {
            return Err(format!(
                "the '{}' filter must wrap a string",
                eventhub::SELECTOR_FILTER
            ));
        };
        result = eventhub::parse_selector(expr);
    }
    result
}

fn classify(attach: &Attach, config: &EndpointConfig) -> LinkKind {
    use fe2o3_amqp_types::definitions::Role;
    match attach.role {
        // The peer sends: we receive. Only `$cbs` requests are accepted.
        Role::Sender => match target_address(attach).as_deref() {
            Some("$cbs") => LinkKind::CbsRequests,
            other => LinkKind::Refuse(
                AmqpError::NotFound,
                format!(
                    "The messaging entity '{}' could not be found (this endpoint only receives on '$cbs').",
                    other.unwrap_or("")
                ),
            ),
        },
        Role::Receiver => {
            let Some(source) = attach.source.as_deref() else {
                return LinkKind::Refuse(
                    AmqpError::InvalidField,
                    "the attach has no source".into(),
                );
            };
            let address = source.address.clone().unwrap_or_default();
            if address == "$cbs" {
                return LinkKind::CbsResponses;
            }
            match eventhub::parse_partition_address(&address, &config.auth.entity, PARTITIONS) {
                Err(e) => LinkKind::Refuse(AmqpError::NotFound, e.to_string()),
                Ok(p) => match selector_of(source) {
                    Ok(start) => LinkKind::Partition(p, start),
                    Err(e) => LinkKind::Refuse(AmqpError::InvalidField, e),
                },
            }
        }
    }
}

async fn run_session(mut session: ListenerSessionHandle, conn: Arc<Conn>) {
    let acceptor = LinkAcceptor::new();
    let mut links = JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let kind = classify(&attach, &conn.config);
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                if conn.config.verbose {
                    eprintln!("AMQP: attach failed: {e}");
                }
                continue;
            }
        };
        match (kind, link) {
            (LinkKind::CbsRequests, LinkEndpoint::Receiver(r)) => {
                links.spawn(cbs_requests(r, conn.clone()));
            }
            (LinkKind::CbsResponses, LinkEndpoint::Sender(s)) => {
                links.spawn(cbs_responses(s, conn.clone()));
            }
            (LinkKind::Partition(p, start), LinkEndpoint::Sender(s)) => {
                links.spawn(partition_sender(s, conn.clone(), p, start));
            }
            (LinkKind::Refuse(cond, why), link) => {
                if conn.config.verbose {
                    eprintln!("AMQP: link refused: {why}");
                }
                let err = amqp_error(cond, why);
                links.spawn(async move {
                    let _ = match link {
                        LinkEndpoint::Sender(s) => s.close_with_error(err).await,
                        LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
                    };
                });
            }
            (_, link) => {
                let err = amqp_error(AmqpError::NotAllowed, "unexpected link role");
                links.spawn(async move {
                    let _ = match link {
                        LinkEndpoint::Sender(s) => s.close_with_error(err).await,
                        LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
                    };
                });
            }
        }
    }
    links.abort_all();
}

fn app_prop<'a>(m: &'a Message<Body<Value>>, name: &str) -> Option<&'a SimpleValue> {
    m.application_properties.as_ref()?.get(name)
}

fn app_str<'a>(m: &'a Message<Body<Value>>, name: &str) -> Option<&'a str> {
    match app_prop(m, name)? {
        SimpleValue::String(s) => Some(s),
        SimpleValue::Symbol(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Handles one put-token request; returns (status code, description).
fn put_token(m: &Message<Body<Value>>, conn: &Conn) -> (i32, String) {
    match app_str(m, "operation") {
        Some("put-token") => {}
        Some(op) => return (400, format!("unsupported CBS operation '{op}'")),
        None => {
            return (
                400,
                "the request has no 'operation' application property".into(),
            );
        }
    }
    match app_str(m, "type") {
        Some("servicebus.windows.net:sastoken") => {}
        Some(t) => {
            return (
                400,
                format!("unsupported token type '{t}' (expected servicebus.windows.net:sastoken)"),
            );
        }
        None => return (400, "the request has no 'type' application property".into()),
    }
    let Some(name) = app_str(m, "name") else {
        return (
            400,
            "the request has no 'name' (audience) application property".into(),
        );
    };
    let token = match &m.body {
        Body::Value(AmqpValue(Value::String(s))) => s.as_str(),
        _ => {
            return (
                400,
                "the request body must be the token as an AMQP string value".into(),
            );
        }
    };
    match conn.config.auth.validate(name, token, timefmt::now_unix()) {
        Ok(expiry) => {
            conn.auth.send_modify(|e| *e = Some(expiry));
            (200, "OK".into())
        }
        Err(e) => (401, e),
    }
}

async fn cbs_requests(mut receiver: Receiver, conn: Arc<Conn>) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(d) => d,
            Err(e) => {
                if conn.config.verbose {
                    eprintln!("AMQP: $cbs receive ended: {e}");
                }
                let _ = receiver.close().await;
                return;
            }
        };
        let _ = receiver.accept(&delivery).await;
        let request = delivery.message();
        let (code, description) = put_token(request, &conn);
        conn.hub.amqp.cbs_outcome(code == 200);
        if conn.config.verbose {
            eprintln!("AMQP: put-token -> {code} {description}");
        }
        let correlation_id: Option<MessageId> = request
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        let to = request.properties.as_ref().and_then(|p| p.reply_to.clone());
        let mut props = ApplicationProperties::builder()
            .insert("status-code", SimpleValue::Int(code))
            .insert("status-description", SimpleValue::String(description))
            .build();
        if let Some(op) = app_str(request, "operation") {
            props
                .0
                .insert("operation".into(), SimpleValue::String(op.into()));
        }
        let response = Message::builder()
            .properties(Properties {
                correlation_id,
                to,
                ..Default::default()
            })
            .application_properties(props)
            .body(AmqpValue(Value::Null))
            .build();
        if conn.cbs_tx.send(response).await.is_err() {
            return;
        }
    }
}

async fn cbs_responses(mut sender: Sender, conn: Arc<Conn>) {
    loop {
        let next = {
            let mut rx = conn.cbs_rx.lock().await;
            tokio::select! {
                m = rx.recv() => m,
                _ = sender.on_detach() => None,
            }
        };
        let Some(m) = next else {
            let _ = sender.close().await;
            return;
        };
        if sender.send_batchable(m).await.is_err() {
            return;
        }
    }
}

fn sym(s: &str) -> fe2o3_amqp_types::messaging::annotations::OwnedKey {
    Symbol::from(s).into()
}

/// Builds the AMQP message of a stored D2C event (reference §8.3).
pub fn event_message(m: &StoredMessage) -> Message<Data> {
    let ts = Timestamp::from_milliseconds(m.enqueued_ms);
    let auth_method = m
        .system_properties
        .get("connectionAuthMethod")
        .cloned()
        .unwrap_or_else(|| {
            r#"{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}"#
                .to_string()
        });
    let mut annotations = OrderedMap::new();
    annotations.insert(
        sym("x-opt-sequence-number"),
        Value::Long(i64::try_from(m.sequence_number).unwrap_or(i64::MAX)),
    );
    annotations.insert(sym("x-opt-offset"), Value::String(m.offset.to_string()));
    annotations.insert(sym("x-opt-enqueued-time"), Value::Timestamp(ts.clone()));
    annotations.insert(
        sym("iothub-connection-device-id"),
        Value::String(m.device_id.clone()),
    );
    annotations.insert(
        sym("iothub-connection-auth-generation-id"),
        Value::String(m.generation_id.clone()),
    );
    annotations.insert(
        sym("iothub-connection-auth-method"),
        Value::String(auth_method),
    );
    annotations.insert(sym("iothub-enqueuedtime"), Value::Timestamp(ts));
    annotations.insert(
        sym("iothub-message-source"),
        Value::String("Telemetry".into()),
    );
    let mut app = OrderedMap::new();
    for (k, v) in &m.properties {
        app.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    if let Some(v) = m.system_properties.get("creationTimeUtc") {
        app.insert(
            "iothub-creation-time-utc".into(),
            SimpleValue::String(v.clone()),
        );
    }
    let sys = |k: &str| m.system_properties.get(k).cloned();
    let properties = Properties {
        message_id: sys("messageId").map(MessageId::String),
        correlation_id: sys("correlationId").map(MessageId::String),
        user_id: sys("userId").map(|u| Binary::from(u.into_bytes())),
        content_type: sys("contentType").map(Symbol::from),
        content_encoding: sys("contentEncoding").map(Symbol::from),
        ..Default::default()
    };
    Message::builder()
        .message_annotations(MessageAnnotations(annotations))
        .properties(properties)
        .application_properties(ApplicationProperties(app))
        .data(Binary::from(m.body.clone()))
        .build()
}

/// Sleeps until the authorization expiring at Unix second `expiry` has passed.
async fn until_expired(expiry: u64) {
    let now_ms = timefmt::now_ticks() / 10_000;
    let end_ms = (u128::from(expiry) + 1) * 1000;
    if end_ms > now_ms {
        let wait = u64::try_from(end_ms - now_ms).unwrap_or(u64::MAX);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

async fn partition_sender(sender: Sender, conn: Arc<Conn>, partition: usize, start: StartPosition) {
    let registry = &conn.hub.amqp;
    let id = {
        let mut r = registry.lock();
        r.next_id += 1;
        let id = r.next_id;
        r.receivers.insert(id, (partition, 0));
        id
    };
    let _reg = Registration {
        registry,
        id,
        receiver: true,
    };
    let (cursor, start) = match start {
        StartPosition::Latest => (conn.hub.partition_end(partition), StartPosition::Start),
        s => (0, s),
    };
    let unauthorized = |why: &str| {
        amqp_error(
            AmqpError::UnauthorizedAccess,
            format!(
                "Unauthorized access: {why}. Send a valid token with a CBS put-token request first."
            ),
        )
    };
    let mut sender = sender;
    let mut cursor = cursor;
    let mut events = conn.hub.subscribe_events();
    let mut auth = conn.auth.subscribe();
    loop {
        let expiry = *auth.borrow_and_update();
        let Some(expiry) = expiry else {
            let _ = sender
                .close_with_error(unauthorized("no authorization on this connection"))
                .await;
            return;
        };
        if timefmt::now_unix() > expiry {
            let _ = sender
                .close_with_error(unauthorized("the token has expired"))
                .await;
            return;
        }
        let batch = if registry.draining.load(Ordering::SeqCst) {
            Vec::new()
        } else {
            conn.hub.partition_messages(partition, cursor, BATCH, |m| {
                start.admits(m.sequence_number, m.offset, m.enqueued_ms)
            })
        };
        if batch.is_empty() {
            tokio::select! {
                _ = sender.on_detach() => {
                    let _ = sender.close().await;
                    return;
                }
                r = events.changed() => if r.is_err() { return },
                r = auth.changed() => if r.is_err() { return },
                _ = until_expired(expiry) => {},
                _ = tokio::time::sleep(Duration::from_millis(200)), if registry.draining.load(Ordering::SeqCst) => {},
            }
            continue;
        }
        for m in batch {
            if registry.draining.load(Ordering::SeqCst) {
                break;
            }
            let msg = event_message(&m);
            let sent = tokio::select! {
                r = sender.send_batchable(msg) => Some(r),
                _ = until_expired(expiry) => None,
                r = auth.changed() => if r.is_err() { return } else { None },
            };
            match sent {
                // Expired, or the authorization changed: re-check at the top.
                None => break,
                Some(Ok(_settlement)) => {
                    cursor = m.sequence_number + 1;
                    if let Some(e) = registry.lock().receivers.get_mut(&id) {
                        e.1 += 1;
                    }
                    if conn.hub.amqp_delivery_tick() {
                        let hub = conn.hub.clone();
                        // `drop_all_soon` needs an Arc of the registry: it lives in the hub.
                        spawn_drop_soon(hub);
                    }
                }
                Some(Err(e)) => {
                    if conn.config.verbose {
                        eprintln!("AMQP: delivery on partition {partition} failed: {e}");
                    }
                    return;
                }
            }
        }
    }
}

fn spawn_drop_soon(hub: Arc<Hub>) {
    hub.amqp.draining.store(true, Ordering::SeqCst);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        hub.amqp.drop_all();
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn event_message_carries_annotations_and_properties() {
        let mut props = BTreeMap::new();
        props.insert("kind".to_string(), "t".to_string());
        let mut sys = BTreeMap::new();
        sys.insert("contentType".to_string(), "application/json".to_string());
        sys.insert("contentEncoding".to_string(), "utf-8".to_string());
        let m = StoredMessage {
            device_id: "d1".into(),
            partition: 2,
            sequence_number: 5,
            offset: 120,
            enqueued_time: "x".into(),
            enqueued_ms: 1_700_000_000_123,
            generation_id: "638000000000000000".into(),
            body: b"{\"a\":1}".to_vec(),
            properties: props,
            system_properties: sys,
        };
        let msg = event_message(&m);
        let ma = msg.message_annotations.as_ref().unwrap();
        assert_eq!(ma.get(&sym("x-opt-sequence-number")), Some(&Value::Long(5)));
        assert_eq!(
            ma.get(&sym("x-opt-offset")),
            Some(&Value::String("120".into()))
        );
        assert_eq!(
            ma.get(&sym("x-opt-enqueued-time")),
            Some(&Value::Timestamp(Timestamp::from_milliseconds(
                1_700_000_000_123
            )))
        );
        assert_eq!(
            ma.get(&sym("iothub-message-source")),
            Some(&Value::String("Telemetry".into()))
        );
        let p = msg.properties.as_ref().unwrap();
        assert_eq!(
            p.content_type.as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            msg.application_properties.as_ref().unwrap().get("kind"),
            Some(&SimpleValue::String("t".into()))
        );
        assert_eq!(msg.body.0.as_slice(), b"{\"a\":1}");
    }
}
