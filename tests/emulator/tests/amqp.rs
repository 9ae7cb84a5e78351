//! End-to-end test of the Event Hub-compatible endpoint: start the real binary, send telemetry
//! over HTTPS from two devices, then read it back with an independent AMQP 1.0 client
//! (fe2o3-amqp's `Connection`/`Session`/`Receiver`, TLS via tokio-rustls trusting `caFile`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use azure_iot_hub_emulator::device_sim::{self, Action};
use azure_iot_hub_emulator::{client, sas, timefmt, tls};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId, Properties, Source};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use serde_json::{Value as Json, json};

const BIN: &str = env!("CARGO_BIN_EXE_azure-iot-hub-emulator");
const API: &str = "api-version=2021-04-12";

struct Emu {
    child: Child,
    ready: Json,
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emu {
    fn start() -> Emu {
        let mut child = Command::new(BIN)
            .args(["serve", "--tls", "--hostname", "myhub.azure-devices.net"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn emulator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        let ready: Json =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}"));
        Emu { child, ready }
    }

    fn s(&self, field: &str) -> String {
        self.ready[field]
            .as_str()
            .unwrap_or_else(|| panic!("ready.{field}"))
            .to_string()
    }

    fn ca(&self) -> PathBuf {
        PathBuf::from(self.s("caFile"))
    }

    fn amqp_addr(&self) -> String {
        self.s("amqpEndpoint")
            .strip_prefix("amqps://")
            .unwrap()
            .to_string()
    }

    async fn http(&self, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
        let token = sas::generate_token(
            &sas::url_encode(&self.s("hostname")),
            &self.s("ownerKey"),
            timefmt::now_unix() + 600,
            Some("iothubowner"),
        )
        .unwrap();
        let url = format!("{}{path}", self.s("endpoint"));
        let headers = vec![
            ("authorization".to_string(), token),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let r = client::request(method, &url, &headers, body, Some(&self.ca()))
            .await
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Json::Null);
        (r.status, v)
    }

    async fn create_device(&self, id: &str) -> String {
        let (st, d) = self
            .http(
                "PUT",
                &format!("/devices/{id}?{API}"),
                Some(json!({"deviceId": id})),
            )
            .await;
        assert_eq!(st, 200, "{d}");
        d["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn send(&self, id: &str, key: &str, body: &str, seq: usize) {
        let cs = device_sim::parse_connection_string(&format!(
            "HostName={};DeviceId={id};SharedAccessKey={key}",
            self.s("hostname")
        ))
        .unwrap();
        let r = device_sim::run(
            &cs,
            Some(&self.s("endpoint")),
            Some(&self.ca()),
            Action::Send {
                body: body.as_bytes().to_vec(),
                properties: vec![("seq".into(), seq.to_string())],
            },
        )
        .await
        .unwrap();
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    }

    async fn amqp_stats(&self) -> Json {
        self.http("GET", "/_emulator/amqp", None).await.1
    }

    async fn fault(&self, rule: Json) {
        let (st, v) = self.http("POST", "/_emulator/faults", Some(rule)).await;
        assert_eq!(st, 200, "{v}");
    }

    /// An Event Hubs token: HMAC keyed with the UTF-8 bytes of the key string.
    fn eh_token(&self, key: &str, se: u64) -> String {
        let sr = sas::url_encode(&self.audience());
        let sig = sas::sign(key.as_bytes(), &sr, &se.to_string());
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={se}&skn=iothubowner",
            sas::url_encode(&sig)
        )
    }

    fn audience(&self) -> String {
        format!("sb://{}/{}", self.amqp_addr(), self.s("eventHubName"))
    }

    fn partition_address(&self, p: u64) -> String {
        format!(
            "{}/ConsumerGroups/$Default/Partitions/{p}",
            self.s("eventHubName")
        )
    }
}

async fn connect(emu: &Emu, profile: SaslProfile) -> Result<ConnectionHandle<()>, String> {
    let tcp = tokio::net::TcpStream::connect(emu.amqp_addr())
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&emu.ca()).unwrap());
    let tls = connector
        .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Connection::builder()
        .container_id("amqp-e2e")
        .hostname("127.0.0.1")
        .sasl_profile(profile)
        .open_with_stream(tls)
        .await
        .map_err(|e| format!("{e:?}"))
}

struct Cbs {
    sender: Sender,
    receiver: Receiver,
    next_id: u64,
}

impl Cbs {
    async fn attach(session: &mut SessionHandle<()>) -> Cbs {
        let sender = Sender::attach(session, "cbs-sender", "$cbs").await.unwrap();
        let receiver = Receiver::builder()
            .name("cbs-receiver")
            .source("$cbs")
            .target("cbs")
            .attach(session)
            .await
            .unwrap();
        Cbs {
            sender,
            receiver,
            next_id: 0,
        }
    }

    async fn put_token(&mut self, audience: &str, token: &str) -> (i32, String) {
        self.next_id += 1;
        let id = format!("req-{}", self.next_id);
        let msg = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(id.clone())),
                reply_to: Some("cbs".into()),
                to: Some("$cbs".into()),
                ..Default::default()
            })
            .application_properties(
                fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                    .insert("operation", "put-token")
                    .insert("type", "servicebus.windows.net:sastoken")
                    .insert("name", audience)
                    .build(),
            )
            .value(token.to_string())
            .build();
        self.sender.send(msg).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), self.receiver.recv::<Body<Value>>())
            .await
            .expect("CBS response in time")
            .unwrap();
        self.receiver.accept(&d).await.unwrap();
        let m = d.message();
        assert_eq!(
            m.properties.as_ref().unwrap().correlation_id,
            Some(MessageId::String(id))
        );
        let ap = m.application_properties.as_ref().unwrap();
        let code = match ap.get("status-code") {
            Some(SimpleValue::Int(c)) => *c,
            other => panic!("status-code {other:?}"),
        };
        let desc = match ap.get("status-description") {
            Some(SimpleValue::String(s)) => s.clone(),
            other => panic!("status-description {other:?}"),
        };
        (code, desc)
    }
}

fn selector(expr: &str) -> Described<Value> {
    Described {
        descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
        value: Value::String(expr.to_string()),
    }
}

async fn partition_receiver(
    session: &mut SessionHandle<()>,
    name: &str,
    address: &str,
    filter: Option<Described<Value>>,
) -> Receiver {
    attach_receiver(session, name, address, filter, SenderSettleMode::Mixed).await
}

async fn attach_receiver(
    session: &mut SessionHandle<()>,
    name: &str,
    address: &str,
    filter: Option<Described<Value>>,
    mode: SenderSettleMode,
) -> Receiver {
    let mut source = Source::builder().address(address.to_string());
    if let Some(f) = filter {
        source = source.add_to_filter("apache.org:selector-filter:string", f);
    }
    Receiver::builder()
        .name(name)
        .source(source.build())
        .target("e2e")
        .sender_settle_mode(mode)
        .attach(session)
        .await
        .unwrap()
}

/// Receives one event within 5 s.
async fn recv_event(r: &mut Receiver) -> Result<Message<Body<Value>>, String> {
    let d = tokio::time::timeout(Duration::from_secs(5), r.recv::<Body<Value>>())
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    r.accept(&d).await.map_err(|e| format!("{e:?}"))?;
    Ok(d.into_message())
}

fn annotation<'a>(m: &'a Message<Body<Value>>, key: &str) -> &'a Value {
    m.message_annotations
        .as_ref()
        .unwrap()
        .get(&OwnedKey::from(Symbol::from(key)))
        .unwrap_or_else(|| panic!("annotation {key}"))
}

fn body_bytes(m: &Message<Body<Value>>) -> Vec<u8> {
    match &m.body {
        Body::Data(batch) => {
            assert_eq!(batch.len(), 1, "exactly one Data section");
            batch[0].0.to_vec()
        }
        other => panic!("body is not Data: {other:?}"),
    }
}

async fn wait_for<F: Fn(&Json) -> bool>(emu: &Emu, what: &str, f: F) -> Json {
    for _ in 0..100 {
        let s = emu.amqp_stats().await;
        if f(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: {}", emu.amqp_stats().await);
}

fn assert_ca(path: &Path) {
    assert!(path.exists(), "{}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_hub_endpoint_end_to_end() {
    let emu = Emu::start();
    // Ready line.
    assert_eq!(emu.s("eventHubName"), "myhub");
    assert_eq!(emu.ready["partitions"], 4);
    assert_ca(&emu.ca());
    let addr = emu.amqp_addr();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(
        emu.s("eventHubConnectionString"),
        format!(
            "Endpoint=sb://{addr}/;SharedAccessKeyName=iothubowner;SharedAccessKey={};EntityPath=myhub",
            emu.s("ownerKey")
        )
    );

    // Telemetry from two devices over HTTPS.
    let ka = emu.create_device("dev-a").await;
    let kb = emu.create_device("dev-b").await;
    for i in 0..3 {
        emu.send("dev-a", &ka, &format!("{{\"a\":{i}}}"), i).await;
        emu.send("dev-b", &kb, &format!("{{\"b\":{i}}}"), i).await;
    }
    let (_, stored) = emu.http("GET", "/_emulator/messages", None).await;
    let stored = stored.as_array().unwrap().clone();
    let pa = stored.iter().find(|m| m["deviceId"] == "dev-a").unwrap()["partition"]
        .as_u64()
        .unwrap();
    let in_pa: Vec<&Json> = stored.iter().filter(|m| m["partition"] == pa).collect();
    let first_offset = in_pa[0]["offset"].as_str().unwrap().to_string();

    let owner_key = emu.s("ownerKey");
    let later = timefmt::now_unix() + 600;

    // ANONYMOUS connection: a receiver before CBS is detached as unauthorized.
    let mut conn = connect(&emu, SaslProfile::Anonymous).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut early =
        partition_receiver(&mut session, "early", &emu.partition_address(pa), None).await;
    let e = recv_event(&mut early).await.unwrap_err();
    assert!(e.contains("UnauthorizedAccess"), "{e}");

    // CBS: a token keyed with the base64-DECODED key (IoT Hub style) is refused; the UTF-8
    // key bytes work; a wrong audience is refused.
    let mut cbs = Cbs::attach(&mut session).await;
    let decoded = sas::decode_key(&owner_key).unwrap();
    let sr = sas::url_encode(&emu.audience());
    let bad_sig = sas::sign(&decoded, &sr, &later.to_string());
    let bad = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={later}&skn=iothubowner",
        sas::url_encode(&bad_sig)
    );
    let (code, desc) = cbs.put_token(&emu.audience(), &bad).await;
    assert_eq!(code, 401, "{desc}");
    assert!(desc.contains("bad signature"), "{desc}");
    let good = emu.eh_token(&owner_key, later);
    let (code, _) = cbs.put_token(&format!("sb://{addr}/other"), &good).await;
    assert_eq!(code, 401);
    let (code, desc) = cbs.put_token(&emu.audience(), &good).await;
    assert_eq!((code, desc.as_str()), (200, "OK"));

    // Unknown partition → not-found.
    let mut nf = partition_receiver(&mut session, "nf", &emu.partition_address(9), None).await;
    let e = recv_event(&mut nf).await.unwrap_err();
    assert!(e.contains("NotFound"), "{e}");

    // Offset filter: everything in the partition after the first message, in order.
    let mut rx = partition_receiver(
        &mut session,
        "p",
        &format!("amqps://{addr}/{}", emu.partition_address(pa)),
        Some(selector(&format!(
            "amqp.annotation.x-opt-offset > '{first_offset}'"
        ))),
    )
    .await;
    for want in &in_pa[1..] {
        let m = recv_event(&mut rx).await.unwrap();
        assert_eq!(
            annotation(&m, "x-opt-sequence-number"),
            &Value::Long(want["sequenceNumber"].as_i64().unwrap())
        );
        assert_eq!(
            annotation(&m, "x-opt-offset"),
            &Value::String(want["offset"].as_str().unwrap().into())
        );
        assert!(matches!(
            annotation(&m, "x-opt-enqueued-time"),
            Value::Timestamp(_)
        ));
        assert!(matches!(
            annotation(&m, "iothub-enqueuedtime"),
            Value::Timestamp(_)
        ));
        assert_eq!(
            annotation(&m, "iothub-connection-device-id"),
            &Value::String(want["deviceId"].as_str().unwrap().into())
        );
        assert_eq!(
            annotation(&m, "iothub-message-source"),
            &Value::String("Telemetry".into())
        );
        assert!(matches!(
            annotation(&m, "iothub-connection-auth-generation-id"),
            Value::String(s) if !s.is_empty()
        ));
        assert!(matches!(
            annotation(&m, "iothub-connection-auth-method"),
            Value::String(s) if s.contains("\"scope\":\"device\"")
        ));
        assert_eq!(body_bytes(&m), want["body"].as_str().unwrap().as_bytes());
        let p = m.properties.as_ref().unwrap();
        assert_eq!(
            p.content_type.as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.content_encoding.as_ref().unwrap().as_str(), "utf-8");
        assert_eq!(
            m.application_properties.as_ref().unwrap().get("seq"),
            Some(&SimpleValue::String(
                want["properties"]["seq"].as_str().unwrap().into()
            ))
        );
    }
    // A new message arrives live.
    emu.send("dev-a", &ka, "{\"live\":true}", 9).await;
    let m = recv_event(&mut rx).await.unwrap();
    assert_eq!(body_bytes(&m), b"{\"live\":true}");
    let stats = emu.amqp_stats().await;
    assert_eq!(stats["connections"], 1, "{stats}");
    assert_eq!(stats["cbsAccepted"], 1, "{stats}");
    assert_eq!(stats["cbsRejected"], 2, "{stats}");
    assert_eq!(
        stats["receivers"],
        json!([{"partition": pa, "delivered": in_pa.len()}]),
        "{stats}"
    );

    // amqpDrop: the connection is cut at once.
    emu.fault(json!({"kind": "amqpDrop"})).await;
    let e = recv_event(&mut rx).await.unwrap_err();
    assert!(!e.contains("timed out"), "{e}");
    wait_for(&emu, "connections after amqpDrop", |s| {
        s["connections"] == 0
    })
    .await;
    drop((rx, nf, early, cbs, session, conn));

    // PLAIN with a token as password; amqpDrop after 2 deliveries.
    let user = "iothubowner@sas.root.myhub".to_string();
    let refused = connect(
        &emu,
        SaslProfile::Plain {
            username: user.clone(),
            password: emu.eh_token("wrong-key", later),
        },
    )
    .await;
    assert!(refused.is_err());
    let mut conn = connect(
        &emu,
        SaslProfile::Plain {
            username: user,
            password: emu.eh_token(&owner_key, later),
        },
    )
    .await
    .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    emu.fault(json!({"kind": "amqpDrop", "afterDeliveries": 2}))
        .await;
    // At-most-once: the client asks for pre-settled deliveries.
    let mut rx = attach_receiver(
        &mut session,
        "p2",
        &emu.partition_address(pa),
        Some(selector("amqp.annotation.x-opt-offset > '-1'")),
        SenderSettleMode::Settled,
    )
    .await;
    for want in &in_pa[..2] {
        let m = recv_event(&mut rx).await.unwrap();
        assert_eq!(
            annotation(&m, "x-opt-sequence-number"),
            &Value::Long(want["sequenceNumber"].as_i64().unwrap())
        );
    }
    let e = recv_event(&mut rx).await.unwrap_err();
    assert!(!e.contains("timed out"), "{e}");
    wait_for(&emu, "connections after amqpDrop afterDeliveries", |s| {
        s["connections"] == 0
    })
    .await;
    drop((rx, session, conn));

    // A short-lived token: the receiver is detached with unauthorized-access once it expires.
    let mut conn = connect(&emu, SaslProfile::Anonymous).await.unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut cbs = Cbs::attach(&mut session).await;
    let short = emu.eh_token(&owner_key, timefmt::now_unix() + 1);
    assert_eq!(cbs.put_token(&emu.audience(), &short).await.0, 200);
    let mut rx = partition_receiver(
        &mut session,
        "p3",
        &emu.partition_address(pa),
        Some(selector("amqp.annotation.x-opt-offset > '@latest'")),
    )
    .await;
    let e = tokio::time::timeout(Duration::from_secs(5), rx.recv::<Body<Value>>())
        .await
        .expect("detached within 5 s")
        .unwrap_err();
    assert!(format!("{e:?}").contains("UnauthorizedAccess"), "{e:?}");
    let _ = conn.close().await;
    wait_for(&emu, "connection closed", |s| s["connections"] == 0).await;
}
