//! The HTTP(S) front end: routing, `api-version`, SAS authorization, bodies, fault injection,
//! statistics and the `/_emulator/` admin API.
//!
//! Exists to adapt HTTP to `hub.rs` with Azure's exact status codes and error bodies. It never
//! panics or unwraps on request input.
//!
//! Choices:
//! - Service endpoints need a policy token whose `sr` is the hub hostname (no deeper scope):
//!   registry reads and writes need `iothubowner`; twins and queries accept `iothubowner` or
//!   `service`.
//! - Device endpoints accept the device's own token (no `skn`, `sr` exactly
//!   `{hostname}/devices/{id}`, signed with its primary or secondary key, device enabled) or a
//!   policy token with DeviceConnect (`iothubowner`) whose `sr` covers that path.
//! - `DELETE /devices/{id}` without `If-Match` is refused with 400 `ArgumentInvalid` (every SDK
//!   sends one; what Azure does without it is UNCONFIRMED, so the emulator refuses the
//!   ambiguous call).
//! - Unknown routes and methods answer 400 `InvalidOperation`.
//! - Batched telemetry (`application/vnd.microsoft.iothub.json`) is refused with 400
//!   `InvalidOperation` rather than stored wrongly.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::error::{ApiError, ErrorCode};
use crate::faults::FaultAction;
use crate::hub::{Hub, IfMatch, MAX_MESSAGE_BYTES, MAX_PAGE, Permission, Policy};
use crate::sas::{self, SasError};
use crate::{query, timefmt, tls};

/// The api-versions IoT Hub clients send (§3.1); anything else is `InvalidProtocolVersion`.
pub const API_VERSIONS: [&str; 6] = [
    "2021-04-12",
    "2020-09-30",
    "2020-05-31-preview",
    "2020-03-13",
    "2018-06-30",
    "2016-11-14",
];

/// Largest JSON body accepted on service endpoints.
const MAX_JSON_BODY: usize = 1024 * 1024;

/// Options of `serve`, as parsed from the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `--listen`, e.g. `127.0.0.1:0`.
    pub listen: String,
    /// `--hostname`; defaults to the bound `host:port`.
    pub hostname: Option<String>,
    /// `--owner-key` (iothubowner); defaults to 32 random bytes.
    pub owner_key: Option<String>,
    /// `--service-key` (service); defaults to 32 random bytes.
    pub service_key: Option<String>,
    /// `--tls`.
    pub tls: bool,
    /// `--cert-dir`; defaults to a fresh temporary directory.
    pub cert_dir: Option<PathBuf>,
    /// `--verbose`: log every request to stderr.
    pub verbose: bool,
    /// `--eventhub-name`; defaults to the hub name (hostname up to the first `.` or `:`).
    pub eventhub_name: Option<String>,
}

/// The one JSON line printed on stdout when the emulator is ready.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// `http://` or `https://` plus the bound address.
    pub endpoint: String,
    /// The hub hostname (SAS `sr`, `HostName=`).
    pub hostname: String,
    /// The iothubowner key.
    pub owner_key: String,
    /// The service key.
    pub service_key: String,
    /// Path of `ca.pem`: the CA of HTTPS (with `--tls`) and, always, of the AMQP endpoint.
    pub ca_file: Option<String>,
    /// `amqps://<ip>:<port>` of the Event Hub-compatible endpoint.
    pub amqp_endpoint: String,
    /// The Event Hub-compatible name (entity path).
    pub event_hub_name: String,
    /// `Endpoint=sb://<ip>:<port>/;SharedAccessKeyName=iothubowner;SharedAccessKey=..;EntityPath=..`
    pub event_hub_connection_string: String,
    /// Number of D2C partitions.
    pub partitions: usize,
}

/// A bound, not yet running emulator.
pub struct Emulator {
    listener: TcpListener,
    amqp_listener: TcpListener,
    amqp_acceptor: TlsAcceptor,
    amqp_config: Arc<crate::amqp::EndpointConfig>,
    hub: Arc<Hub>,
    acceptor: Option<TlsAcceptor>,
    verbose: bool,
    /// What to print on stdout.
    pub ready: Ready,
    /// A generated certificate directory to remove on shutdown.
    pub temp_cert_dir: Option<PathBuf>,
}

fn check_policy_key(name: &str, key: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .with_context(|| format!("the {name} key is not valid base64"))?;
    if bytes.is_empty() {
        bail!("the {name} key is empty");
    }
    Ok(bytes)
}

impl Emulator {
    /// Validates the options, binds the socket and prepares keys and TLS.
    pub async fn bind(opts: ServeOptions) -> Result<Self> {
        let addr: SocketAddr = opts
            .listen
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve --listen '{}'", opts.listen))?
            .next()
            .with_context(|| format!("--listen '{}' resolves to no address", opts.listen))?;
        if !opts.tls && !addr.ip().is_loopback() {
            bail!(
                "refusing to serve plain HTTP on non-loopback address {addr}: SAS keys would cross the network in clear text; pass --tls or listen on 127.0.0.1"
            );
        }
        let owner_key = opts
            .owner_key
            .clone()
            .unwrap_or_else(|| crate::hub::random_key(32));
        let service_key = opts
            .service_key
            .clone()
            .unwrap_or_else(|| crate::hub::random_key(32));
        let owner_bytes = check_policy_key("--owner-key", &owner_key)?;
        let service_bytes = check_policy_key("--service-key", &service_key)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        let hostname = opts.hostname.clone().unwrap_or_else(|| bound.to_string());
        let policies = vec![
            Policy {
                name: "iothubowner".into(),
                key_b64: owner_key.clone(),
                key: owner_bytes,
                registry_read: true,
                registry_write: true,
                service_connect: true,
                device_connect: true,
            },
            Policy {
                name: "service".into(),
                key_b64: service_key.clone(),
                key: service_bytes,
                registry_read: false,
                registry_write: false,
                service_connect: true,
                device_connect: false,
            },
        ];
        // The CA is always generated: the AMQP endpoint is TLS-only, like Azure's port 5671.
        let material = tls::generate(&hostname)?;
        let (dir, temp_cert_dir) = match &opts.cert_dir {
            Some(d) => (d.clone(), None),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "azure-iot-hub-emulator-{}-{:016x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                (d.clone(), Some(d))
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &material.ca_pem)
            .with_context(|| format!("writing {}", ca.display()))?;
        let ca = std::fs::canonicalize(&ca).unwrap_or(ca);
        let acceptor = opts
            .tls
            .then(|| TlsAcceptor::from(material.server_config.clone()));
        let amqp_listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0))
            .await
            .with_context(|| format!("binding the AMQP listener on {}", addr.ip()))?;
        let amqp_bound = amqp_listener.local_addr()?;
        let hub_name = crate::eventhub::hub_name(&hostname);
        let entity = match &opts.eventhub_name {
            Some(n) if n.is_empty() || n.contains('/') => {
                bail!("--eventhub-name '{n}' must be a non-empty name without '/'")
            }
            Some(n) => n.clone(),
            // An IPv6 literal hostname has no usable hub name.
            None if hub_name.is_empty() => "iothub".to_string(),
            None => hub_name.clone(),
        };
        let amqp_config = Arc::new(crate::amqp::EndpointConfig {
            auth: crate::eventhub::EhAuth {
                namespace: amqp_bound.to_string(),
                entity: entity.clone(),
                policies: policies
                    .iter()
                    .filter(|p| p.service_connect)
                    .map(|p| crate::eventhub::EhPolicy {
                        name: p.name.clone(),
                        key_text: p.key_b64.clone(),
                    })
                    .collect(),
            },
            hub_name,
            verbose: opts.verbose,
        });
        let scheme = if opts.tls { "https" } else { "http" };
        let ready = Ready {
            endpoint: format!("{scheme}://{bound}"),
            hostname: hostname.clone(),
            event_hub_connection_string: format!(
                "Endpoint=sb://{amqp_bound}/;SharedAccessKeyName=iothubowner;SharedAccessKey={owner_key};EntityPath={entity}"
            ),
            owner_key,
            service_key,
            ca_file: Some(ca.display().to_string()),
            amqp_endpoint: format!("amqps://{amqp_bound}"),
            event_hub_name: entity,
            partitions: crate::hub::PARTITIONS,
        };
        Ok(Self {
            listener,
            amqp_listener,
            amqp_acceptor: TlsAcceptor::from(material.amqp_server_config),
            amqp_config,
            hub: Arc::new(Hub::new(hostname, policies)),
            acceptor,
            verbose: opts.verbose,
            ready,
            temp_cert_dir,
        })
    }

    /// The hub behind this server (for in-process tests).
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let amqp = tokio::spawn(crate::amqp::serve(
            self.amqp_listener,
            self.amqp_acceptor,
            self.hub.clone(),
            self.amqp_config,
        ));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        let hub = self.hub.clone();
                        let verbose = self.verbose;
                        match &self.acceptor {
                            Some(acceptor) => {
                                let acceptor = acceptor.clone();
                                tokio::spawn(async move {
                                    match acceptor.accept(stream).await {
                                        Ok(tls) => serve_connection(tls, hub, verbose).await,
                                        Err(e) => if verbose { eprintln!("TLS handshake failed: {e}") },
                                    }
                                });
                            }
                            None => {
                                tokio::spawn(serve_connection(stream, hub, verbose));
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        amqp.abort();
        if let Some(d) = &self.temp_cert_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn serve_connection<S>(io: S, hub: Arc<Hub>, verbose: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // `kill` lets a `drop` fault close this connection without writing a response.
    let kill = Arc::new(Notify::new());
    let k = kill.clone();
    let svc = service_fn(move |req| {
        let hub = hub.clone();
        let kill = k.clone();
        async move { Ok::<_, Infallible>(handle(hub, req, kill, verbose).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => if let Err(e) = r && verbose { eprintln!("connection error: {e}") },
        _ = kill.notified() => {}
    }
}

type Resp = Response<Full<Bytes>>;

fn response(status: u16, body: Option<String>, headers: &[(&str, String)]) -> Resp {
    let has_body = body.is_some();
    let mut r = Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    if has_body {
        h.insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
    }
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    r
}

fn json_response(status: u16, v: &Value, headers: &[(&str, String)]) -> Resp {
    response(status, Some(v.to_string()), headers)
}

fn error_response(e: ApiError) -> Resp {
    let mut headers: Vec<(&str, String)> = vec![("iothub-errorcode", e.name.clone())];
    for (k, v) in &e.headers {
        headers.push((k.as_str(), v.clone()));
    }
    response(e.status, Some(e.body()), &headers)
}

fn quoted(etag: &str) -> String {
    format!("\"{etag}\"")
}

/// A recognised service or device route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /devices/{id}`
    GetDevice(String),
    /// `PUT /devices/{id}`
    PutDevice(String),
    /// `DELETE /devices/{id}`
    DeleteDevice(String),
    /// `POST /devices/query`
    Query,
    /// `GET /twins/{id}`
    GetTwin(String),
    /// `PATCH /twins/{id}`
    PatchTwin(String),
    /// `PUT /twins/{id}`
    PutTwin(String),
    /// `POST /devices/{id}/messages/events`
    SendEvent(String),
    /// `PATCH /twins/{id}/properties/reported` (emulator extension)
    PatchReported(String),
}

impl Route {
    /// The label used in `GET /_emulator/stats`.
    pub fn label(&self) -> &'static str {
        match self {
            Route::GetDevice(_) => "GET /devices/{id}",
            Route::PutDevice(_) => "PUT /devices/{id}",
            Route::DeleteDevice(_) => "DELETE /devices/{id}",
            Route::Query => "POST /devices/query",
            Route::GetTwin(_) => "GET /twins/{id}",
            Route::PatchTwin(_) => "PATCH /twins/{id}",
            Route::PutTwin(_) => "PUT /twins/{id}",
            Route::SendEvent(_) => "POST /devices/{id}/messages/events",
            Route::PatchReported(_) => "PATCH /twins/{id}/properties/reported",
        }
    }
}

fn decode_segment(seg: &str) -> Result<String, ApiError> {
    sas::percent_decode(seg).ok_or_else(|| {
        ApiError::invalid(format!(
            "the path segment '{seg}' is not valid percent-encoded UTF-8"
        ))
    })
}

/// Maps a method and raw path to a route, decoding the device id exactly once.
pub fn classify(method: &str, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let unsupported = || {
        ApiError::new(
            ErrorCode::InvalidOperation,
            format!("The operation {method} {path} is not supported."),
        )
    };
    let route = match (method, segs.as_slice()) {
        ("POST", ["devices", "query"]) => Route::Query,
        (m, ["devices", id]) if !id.is_empty() => {
            let id = decode_segment(id)?;
            match m {
                "GET" => Route::GetDevice(id),
                "PUT" => Route::PutDevice(id),
                "DELETE" => Route::DeleteDevice(id),
                _ => return Err(unsupported()),
            }
        }
        ("POST", ["devices", id, "messages", "events"]) if !id.is_empty() => {
            Route::SendEvent(decode_segment(id)?)
        }
        (m, ["twins", id]) if !id.is_empty() => {
            let id = decode_segment(id)?;
            match m {
                "GET" => Route::GetTwin(id),
                "PATCH" => Route::PatchTwin(id),
                "PUT" => Route::PutTwin(id),
                _ => return Err(unsupported()),
            }
        }
        ("PATCH", ["twins", id, "properties", "reported"]) if !id.is_empty() => {
            Route::PatchReported(decode_segment(id)?)
        }
        _ => return Err(unsupported()),
    };
    Ok(route)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (sas::form_decode(k).as_deref() == Some(name))
            .then(|| sas::form_decode(v).unwrap_or_default())
    })
}

/// Checks `?api-version=` against [`API_VERSIONS`].
pub fn check_api_version(query: Option<&str>) -> Result<(), ApiError> {
    match query_param(query, "api-version") {
        None => Err(ApiError::new(
            ErrorCode::InvalidProtocolVersion,
            "The api-version query parameter is required.",
        )),
        Some(v) if API_VERSIONS.contains(&v.as_str()) => Ok(()),
        Some(v) => Err(ApiError::new(
            ErrorCode::InvalidProtocolVersion,
            format!(
                "api-version '{v}' is not supported; use one of {}",
                API_VERSIONS.join(", ")
            ),
        )),
    }
}

fn sas_err(e: SasError) -> ApiError {
    ApiError::unauthorized(e.to_string())
}

/// Authorizes a request: `device_id` is the device a device-side route acts for.
pub fn authorize(
    hub: &Hub,
    header: Option<&str>,
    perm: Permission,
    device_id: Option<&str>,
) -> Result<(), ApiError> {
    let header = header.ok_or_else(|| {
        ApiError::unauthorized(
            "missing Authorization header (expected a SharedAccessSignature token)",
        )
    })?;
    let token = sas::parse_token(header).map_err(sas_err)?;
    let now = timefmt::now_unix();
    let device_target = device_id.map(|id| format!("{}/devices/{}", hub.hostname, id));
    match &token.skn {
        Some(name) => {
            let policy = hub
                .policy(name)
                .ok_or_else(|| sas_err(SasError::UnknownPolicy(name.clone())))?;
            if !token.signature_matches(&policy.key) {
                return Err(sas_err(SasError::BadSignature(format!(
                    "the key of policy '{name}'"
                ))));
            }
            token.check_expiry(now).map_err(sas_err)?;
            let target = device_target.unwrap_or_else(|| hub.hostname.clone());
            let sr = token.decoded_sr();
            if !sas::covers(&sr, &sas::decode_sr_until_stable(&target)) {
                return Err(sas_err(SasError::WrongResource { sr, target }));
            }
            if !policy.grants(perm) {
                return Err(sas_err(SasError::MissingPermission {
                    policy: name.clone(),
                    permission: perm.name(),
                }));
            }
            Ok(())
        }
        None => {
            let (Some(id), Some(target), Permission::DeviceConnect) =
                (device_id, device_target, perm)
            else {
                return Err(sas_err(SasError::DeviceNotAllowed(
                    "a device token (no skn) cannot authorize service operations; use a shared access policy token".into(),
                )));
            };
            let found = {
                let st = hub.lock();
                st.devices.get(id).map(|d| {
                    (
                        d.primary_key.clone(),
                        d.secondary_key.clone(),
                        d.status.clone(),
                        d.auth_type.clone(),
                    )
                })
            };
            let (pk, sk, status, auth_type) = found.ok_or_else(|| {
                sas_err(SasError::DeviceNotAllowed(format!(
                    "unknown device: '{id}' is not registered"
                )))
            })?;
            if auth_type != "sas" {
                return Err(sas_err(SasError::DeviceNotAllowed(format!(
                    "device '{id}' uses '{auth_type}' authentication, not SAS"
                ))));
            }
            let ok = [pk, sk]
                .iter()
                .flatten()
                .any(|k| sas::decode_key(k).is_ok_and(|kb| token.signature_matches(&kb)));
            if !ok {
                return Err(sas_err(SasError::BadSignature(format!(
                    "the primary or secondary key of device '{id}'"
                ))));
            }
            token.check_expiry(now).map_err(sas_err)?;
            let sr = token.decoded_sr();
            let decoded_target = sas::decode_sr_until_stable(&target);
            if sr.split('/').count() != decoded_target.split('/').count()
                || !sas::covers(&sr, &decoded_target)
            {
                return Err(sas_err(SasError::WrongResource { sr, target }));
            }
            if status != "enabled" {
                return Err(sas_err(SasError::DeviceNotAllowed(format!(
                    "device '{id}' is disabled"
                ))));
            }
            Ok(())
        }
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::new(
                ErrorCode::MessageTooLarge,
                format!("The request body exceeds the maximum of {limit} bytes."),
            ))
        }
        Err(e) => Err(ApiError::invalid(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; a JSON document is required",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("header '{name}' is not visible ASCII"))),
    }
}

const SYSTEM_HEADERS: [(&str, &str); 10] = [
    ("iothub-messageid", "messageId"),
    ("iothub-correlationid", "correlationId"),
    ("iothub-userid", "userId"),
    ("iothub-to", "to"),
    ("iothub-expiry", "expiryTimeUtc"),
    ("iothub-ack", "ack"),
    ("iothub-contenttype", "contentType"),
    ("iothub-contentencoding", "contentEncoding"),
    ("iothub-creation-time-utc", "creationTimeUtc"),
    ("iothub-interface-id", "interfaceId"),
];

async fn process(hub: &Hub, route: Route, req: Request<Incoming>) -> Result<Resp, ApiError> {
    check_api_version(req.uri().query())?;
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let auth = header(h, "authorization")
        .map_err(|_| ApiError::unauthorized("the Authorization header is not visible ASCII"))?;
    let if_match = header(h, "if-match")?.map(IfMatch::parse);
    match &route {
        Route::GetDevice(_) => authorize(hub, auth, Permission::RegistryRead, None)?,
        Route::PutDevice(_) | Route::DeleteDevice(_) => {
            authorize(hub, auth, Permission::RegistryWrite, None)?
        }
        Route::Query | Route::GetTwin(_) | Route::PatchTwin(_) | Route::PutTwin(_) => {
            authorize(hub, auth, Permission::ServiceConnect, None)?
        }
        Route::SendEvent(id) | Route::PatchReported(id) => {
            authorize(hub, auth, Permission::DeviceConnect, Some(id))?
        }
    }
    let limit = if matches!(route, Route::SendEvent(_)) {
        MAX_MESSAGE_BYTES
    } else {
        MAX_JSON_BODY
    };
    let body = read_body(body, limit).await?;
    match route {
        Route::GetDevice(id) => {
            let d = hub.get_device(&id)?;
            let etag = quoted(d["etag"].as_str().unwrap_or_default());
            Ok(json_response(200, &d, &[("etag", etag)]))
        }
        Route::PutDevice(id) => {
            let d = hub.put_device(&id, &parse_json(&body)?, if_match)?;
            let etag = quoted(d["etag"].as_str().unwrap_or_default());
            Ok(json_response(200, &d, &[("etag", etag)]))
        }
        Route::DeleteDevice(id) => {
            let im = if_match.ok_or_else(|| {
                ApiError::invalid("DELETE /devices/{id} requires an If-Match header: the device etag, or '*' to delete unconditionally")
            })?;
            hub.delete_device(&id, &im)?;
            Ok(response(204, None, &[]))
        }
        Route::GetTwin(id) => {
            let t = hub.get_twin(&id)?;
            let etag = quoted(t["etag"].as_str().unwrap_or_default());
            Ok(json_response(200, &t, &[("etag", etag)]))
        }
        Route::PatchTwin(id) | Route::PutTwin(id) => {
            let replace = parts.method == hyper::Method::PUT;
            let t = hub.update_twin(&id, &parse_json(&body)?, if_match, replace)?;
            let etag = quoted(t["etag"].as_str().unwrap_or_default());
            Ok(json_response(200, &t, &[("etag", etag)]))
        }
        Route::Query => {
            let v = parse_json(&body)?;
            let text = v.get("query").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("the body must be {\"query\": \"<query text>\"}")
            })?;
            let q =
                query::parse(text).map_err(|e| ApiError::invalid(format!("Invalid query: {e}")))?;
            let page = match header(h, "x-ms-max-item-count")? {
                None => MAX_PAGE,
                Some(s) => match s.trim().parse::<usize>() {
                    Ok(n) if n >= 1 => n.min(MAX_PAGE),
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "x-ms-max-item-count must be a positive integer, got '{s}'"
                        )));
                    }
                },
            };
            let cont = header(h, "x-ms-continuation")?.filter(|c| !c.trim().is_empty());
            let (items, next) = hub.query(text, &q, page, cont)?;
            let mut headers = vec![("x-ms-item-type", "twin".to_string())];
            if let Some(n) = next {
                headers.push(("x-ms-continuation", n));
            }
            Ok(json_response(200, &Value::Array(items), &headers))
        }
        Route::PatchReported(id) => {
            hub.patch_reported(&id, &parse_json(&body)?)?;
            Ok(response(204, None, &[]))
        }
        Route::SendEvent(id) => {
            if let Some(ct) = header(h, "content-type")?
                && ct
                    .to_ascii_lowercase()
                    .starts_with("application/vnd.microsoft.iothub.json")
            {
                return Err(ApiError::new(
                    ErrorCode::InvalidOperation,
                    "Batched telemetry (application/vnd.microsoft.iothub.json) is not supported by this emulator.",
                ));
            }
            if let Some(to) = header(h, "iothub-to")? {
                let expected = format!("/devices/{id}/messages/events");
                let got = sas::decode_sr_until_stable(to);
                if !got.eq_ignore_ascii_case(&sas::decode_sr_until_stable(&expected)) {
                    return Err(ApiError::invalid(format!(
                        "iothub-to '{to}' does not match '{expected}'"
                    )));
                }
            }
            let mut props = BTreeMap::new();
            let mut sys = BTreeMap::new();
            for (name, value) in h {
                let n = name.as_str();
                if let Some(app) = n.strip_prefix("iothub-app-") {
                    let v = value.to_str().map_err(|_| {
                        ApiError::invalid(format!("header '{n}' is not visible ASCII"))
                    })?;
                    props.insert(app.to_string(), v.to_string());
                } else if let Some((_, prop)) = SYSTEM_HEADERS.iter().find(|(hn, _)| *hn == n) {
                    let v = value.to_str().map_err(|_| {
                        ApiError::invalid(format!("header '{n}' is not visible ASCII"))
                    })?;
                    sys.insert(prop.to_string(), v.to_string());
                }
            }
            sys.insert("connectionDeviceId".into(), id.clone());
            // Which credential sent it (`iothub-connection-auth-method` on the AMQP side):
            // a policy token (skn) acts at hub scope, a device token at device scope.
            let scope = match auth.and_then(|a| sas::parse_token(a).ok()) {
                Some(t) if t.skn.is_some() => "hub",
                _ => "device",
            };
            sys.insert(
                "connectionAuthMethod".into(),
                format!(
                    r#"{{"scope":"{scope}","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}}"#
                ),
            );
            hub.send_event(&id, body.to_vec(), props, sys)?;
            Ok(response(204, None, &[]))
        }
    }
}

async fn handle(hub: Arc<Hub>, req: Request<Incoming>, kill: Arc<Notify>, verbose: bool) -> Resp {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    if path == "/_emulator" || path.starts_with("/_emulator/") {
        return admin(&hub, req).await.unwrap_or_else(error_response);
    }
    let route = classify(&method, &path);
    let label = route.as_ref().map(Route::label).unwrap_or("unsupported");
    match hub.evaluate_faults(&method, &path) {
        Some(FaultAction::Drop) => {
            hub.record(label, "dropped");
            if verbose {
                eprintln!("{method} {path} -> dropped (fault)");
            }
            kill.notify_one();
            return std::future::pending().await;
        }
        Some(FaultAction::DelayMs { delay_ms }) => {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await
        }
        Some(action) => {
            if let Some(e) = action.to_error() {
                hub.record(label, &e.status.to_string());
                if verbose {
                    eprintln!("{method} {path} -> {} (fault)", e.status);
                }
                return error_response(e);
            }
        }
        None => {}
    }
    let resp = match route {
        Ok(r) => process(&hub, r, req).await.unwrap_or_else(error_response),
        Err(e) => error_response(e),
    };
    hub.record(label, resp.status().as_str());
    if verbose {
        eprintln!("{method} {path} -> {}", resp.status().as_u16());
    }
    resp
}

async fn admin(hub: &Hub, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let rest = path.strip_prefix("/_emulator/").unwrap_or("");
    let segs: Vec<&str> = rest.split('/').collect();
    let body = read_body(req.into_body(), MAX_JSON_BODY).await?;
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["devices"]) => {
            let st = hub.lock();
            let list: Vec<Value> = st
                .devices
                .values()
                .map(|d| json!({"device": d.to_json(), "twin": d.twin_json()}))
                .collect();
            Ok(json_response(200, &Value::Array(list), &[]))
        }
        ("GET", ["devices", id]) => {
            let id = decode_segment(id)?;
            let st = hub.lock();
            let d = st
                .devices
                .get(&id)
                .ok_or_else(|| ApiError::device_not_found(&id))?;
            Ok(json_response(
                200,
                &json!({"device": d.to_json(), "twin": d.twin_json()}),
                &[],
            ))
        }
        ("GET", ["messages"]) => {
            let filter = query_param(query.as_deref(), "deviceId");
            let st = hub.lock();
            let list: Vec<Value> = st
                .messages
                .iter()
                .filter(|m| filter.as_ref().is_none_or(|f| &m.device_id == f))
                .map(|m| m.to_json())
                .collect();
            Ok(json_response(200, &Value::Array(list), &[]))
        }
        ("DELETE", ["messages"]) => {
            hub.lock().messages.clear();
            Ok(response(204, None, &[]))
        }
        ("GET", ["faults"]) => {
            let rules = hub.lock().faults.clone();
            Ok(json_response(200, &json!({"rules": rules}), &[]))
        }
        ("POST", ["faults"]) => {
            let specs = crate::faults::parse_specs(&body).map_err(ApiError::invalid)?;
            let before = hub.lock().faults.len();
            let rules = hub.install_faults(specs)?;
            // AMQP faults without a trigger fire as soon as they are installed.
            let (mut drop_now, mut expire_now) = (false, false);
            {
                let mut st = hub.lock();
                let mut fired = 0;
                for r in st.faults.iter_mut().skip(before) {
                    match r.action {
                        FaultAction::AmqpDrop {
                            after_deliveries: None,
                        } => drop_now = true,
                        FaultAction::AmqpExpireTokens => expire_now = true,
                        _ => continue,
                    }
                    r.matched = 1;
                    r.applied = 1;
                    fired += 1;
                }
                st.faults_injected += fired;
            }
            if expire_now {
                hub.amqp.expire_all();
            }
            if drop_now {
                hub.amqp.drop_all();
            }
            let rules = if drop_now || expire_now {
                hub.lock().faults.clone()
            } else {
                rules
            };
            Ok(json_response(200, &json!({"rules": rules}), &[]))
        }
        ("DELETE", ["faults"]) => {
            hub.lock().faults.clear();
            Ok(response(204, None, &[]))
        }
        ("GET", ["stats"]) => {
            let st = hub.lock();
            let total: u64 = st.stats.values().flat_map(|m| m.values()).sum();
            Ok(json_response(
                200,
                &json!({"total": total, "faultsInjected": st.faults_injected, "byRoute": st.stats}),
                &[],
            ))
        }
        ("GET", ["amqp"]) => Ok(json_response(200, &hub.amqp.to_json(), &[])),
        ("DELETE", ["stats"]) => {
            let mut st = hub.lock();
            st.stats.clear();
            st.faults_injected = 0;
            Ok(response(204, None, &[]))
        }
        _ => Err(ApiError::new(
            ErrorCode::InvalidOperation,
            format!("Unknown admin operation {method} {path}."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(classify("POST", "/devices/query").unwrap(), Route::Query);
        assert_eq!(
            classify("GET", "/devices/query").unwrap(),
            Route::GetDevice("query".into())
        );
        assert_eq!(
            classify("PUT", "/devices/myapp%3A123").unwrap(),
            Route::PutDevice("myapp:123".into())
        );
        assert_eq!(
            classify("GET", "/devices/a+b").unwrap(),
            Route::GetDevice("a+b".into())
        );
        assert_eq!(
            classify("POST", "/devices/d%231/messages/events").unwrap(),
            Route::SendEvent("d#1".into())
        );
        assert_eq!(
            classify("PATCH", "/twins/d/properties/reported").unwrap(),
            Route::PatchReported("d".into())
        );
        for (m, p) in [
            ("POST", "/devices/x"),
            ("GET", "/devices/"),
            ("GET", "/"),
            ("GET", "/devices/%zz"),
            ("PATCH", "/devices/x"),
        ] {
            assert!(classify(m, p).is_err(), "{m} {p}");
        }
    }

    #[test]
    fn api_versions() {
        assert!(check_api_version(Some("api-version=2021-04-12")).is_ok());
        assert!(check_api_version(Some("top=1&api-version=2016-11-14")).is_ok());
        let e = check_api_version(None).unwrap_err();
        assert_eq!((e.status, e.name.as_str()), (400, "InvalidProtocolVersion"));
        assert!(check_api_version(Some("api-version=2099-01-01")).is_err());
    }

    fn hub_with_device() -> (Hub, String) {
        let key = crate::hub::random_key(32);
        let hub = Hub::new(
            "h:1".into(),
            vec![
                Policy {
                    name: "iothubowner".into(),
                    key_b64: key.clone(),
                    key: sas::decode_key(&key).unwrap(),
                    registry_read: true,
                    registry_write: true,
                    service_connect: true,
                    device_connect: true,
                },
                Policy {
                    name: "service".into(),
                    key_b64: key.clone(),
                    key: sas::decode_key(&key).unwrap(),
                    registry_read: false,
                    registry_write: false,
                    service_connect: true,
                    device_connect: false,
                },
            ],
        );
        hub.put_device("my:dev", &json!({"deviceId": "my:dev"}), None)
            .unwrap();
        (hub, key)
    }

    #[test]
    fn authorization_rules() {
        let (hub, key) = hub_with_device();
        let later = timefmt::now_unix() + 600;
        let owner = sas::generate_token("h%3A1", &key, later, Some("iothubowner")).unwrap();
        let service = sas::generate_token("h:1", &key, later, Some("service")).unwrap();
        assert!(authorize(&hub, Some(&owner), Permission::RegistryWrite, None).is_ok());
        assert!(
            authorize(
                &hub,
                Some(&owner),
                Permission::DeviceConnect,
                Some("my:dev")
            )
            .is_ok()
        );
        assert!(authorize(&hub, Some(&service), Permission::ServiceConnect, None).is_ok());
        let e = authorize(&hub, Some(&service), Permission::RegistryWrite, None).unwrap_err();
        assert!(e.message.contains("lacks RegistryWrite"), "{}", e.message);
        assert!(
            authorize(
                &hub,
                Some(&service),
                Permission::DeviceConnect,
                Some("my:dev")
            )
            .is_err()
        );
        let unknown = sas::generate_token("h:1", &key, later, Some("registryRead")).unwrap();
        assert!(
            authorize(&hub, Some(&unknown), Permission::ServiceConnect, None)
                .unwrap_err()
                .message
                .contains("unknown policy")
        );
        let expired =
            sas::generate_token("h:1", &key, timefmt::now_unix() - 1, Some("iothubowner")).unwrap();
        assert!(
            authorize(&hub, Some(&expired), Permission::ServiceConnect, None)
                .unwrap_err()
                .message
                .contains("expired")
        );
        let wrong_host = sas::generate_token("other:1", &key, later, Some("iothubowner")).unwrap();
        assert!(
            authorize(&hub, Some(&wrong_host), Permission::ServiceConnect, None)
                .unwrap_err()
                .message
                .contains("wrong resource")
        );
        let deep =
            sas::generate_token("h:1/devices/my%3Adev", &key, later, Some("iothubowner")).unwrap();
        assert!(authorize(&hub, Some(&deep), Permission::RegistryRead, None).is_err());
        let forged = sas::generate_token(
            "h:1",
            &crate::hub::random_key(32),
            later,
            Some("iothubowner"),
        )
        .unwrap();
        let e = authorize(&hub, Some(&forged), Permission::ServiceConnect, None).unwrap_err();
        assert_eq!(
            (e.status, e.name.as_str()),
            (401, "IotHubUnauthorizedAccess")
        );
        assert!(e.message.contains("bad signature"));
        assert!(authorize(&hub, None, Permission::ServiceConnect, None).is_err());

        // Device tokens.
        let dk =
            hub.get_device("my:dev").unwrap()["authentication"]["symmetricKey"]["secondaryKey"]
                .as_str()
                .unwrap()
                .to_string();
        for sr in [
            "h:1/devices/my%3Adev",
            "h%3A1%2Fdevices%2Fmy%253Adev",
            "H:1/devices/my:dev",
        ] {
            let t = sas::generate_token(sr, &dk, later, None).unwrap();
            assert!(
                authorize(&hub, Some(&t), Permission::DeviceConnect, Some("my:dev")).is_ok(),
                "{sr}"
            );
            assert!(authorize(&hub, Some(&t), Permission::ServiceConnect, None).is_err());
        }
        let t = sas::generate_token("h:1", &dk, later, None).unwrap();
        assert!(
            authorize(&hub, Some(&t), Permission::DeviceConnect, Some("my:dev"))
                .unwrap_err()
                .message
                .contains("wrong resource")
        );
        let t = sas::generate_token("h:1/devices/my%3Adev", &key, later, None).unwrap();
        assert!(
            authorize(&hub, Some(&t), Permission::DeviceConnect, Some("my:dev"))
                .unwrap_err()
                .message
                .contains("bad signature")
        );
        let t = sas::generate_token("h:1/devices/nope", &dk, later, None).unwrap();
        assert!(
            authorize(&hub, Some(&t), Permission::DeviceConnect, Some("nope"))
                .unwrap_err()
                .message
                .contains("unknown device")
        );
    }
}
