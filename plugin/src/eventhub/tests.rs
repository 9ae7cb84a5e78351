//! D2C flows against a scripted in-memory AMQP peer: SASL, open/begin,
//! CBS put-token, partition receivers with the offset filter, credit,
//! transfers, detach/redirect, and the resulting cursors.

use super::*;
use crate::amqp::codec::{self, AMQP_HEADER, Frame, FrameBuffer, SASL_HEADER, Sasl};
use crate::amqp::transport::ByteStream;
use crate::broker::{self, Events};
use crate::config::Config;
use crate::cursor::PollCursor;
use crate::hub::Hub;
use crate::platform::{Request, Response};
use crate::sas::TokenCache;
use fe2o3_amqp_types::definitions::{Error as AmqpErr, Handle, LinkError, Role};
use fe2o3_amqp_types::messaging::message::__private::Serializable;
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Data, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp_types::performatives::{Begin, Close, Detach, Flow, Performative, Transfer};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Timestamp};
use fe2o3_amqp_types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use serde_bytes::ByteBuf;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

const KEY: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

// ---------------------------------------------------------------- platform

#[derive(Clone, Default)]
struct Clock(Rc<Cell<u64>>);

struct TestPlatform {
    clock: Clock,
    logs: RefCell<Vec<String>>,
    http: VecDeque<Response>,
}

impl TestPlatform {
    fn new(clock: &Clock) -> Self {
        TestPlatform {
            clock: clock.clone(),
            logs: RefCell::new(Vec::new()),
            http: VecDeque::new(),
        }
    }
    fn logged(&self, needle: &str) -> bool {
        self.logs.borrow().iter().any(|l| l.contains(needle))
    }
}

impl Platform for TestPlatform {
    fn send(&mut self, _r: &Request) -> Result<Response, TransportError> {
        Ok(self.http.pop_front().unwrap_or(Response {
            status: 200,
            headers: vec![],
            body: b"[]".to_vec(),
        }))
    }
    fn unix_secs(&self) -> u64 {
        1_700_000_000 + self.clock.0.get() / 1000
    }
    fn monotonic_ms(&self) -> u64 {
        self.clock.0.get()
    }
    fn sleep_ms(&mut self, ms: u64) {
        self.clock.0.set(self.clock.0.get() + ms);
    }
    fn log(&self, _level: Level, message: &str) {
        assert!(!message.contains(KEY), "secret in log: {message}");
        self.logs.borrow_mut().push(message.to_string());
    }
}

// ---------------------------------------------------------------- peer

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    SaslHeader,
    Sasl,
    AmqpHeader,
    Amqp,
}

#[derive(Debug)]
struct PeerLink {
    client_handle: u32,
    address: String,
    receiver_at_client: bool,
    /// Partition links: index into the partition's messages of the next one.
    next: usize,
    credit: u32,
}

/// What the fake Event Hub knows and records.
struct PeerState {
    clock: Clock,
    stage: Stage,
    inbuf: FrameBuffer,
    out: VecDeque<u8>,
    alive: bool,
    /// Partition → messages as (offset, payload).
    partitions: BTreeMap<u32, Vec<(u64, Vec<u8>)>>,
    links: Vec<PeerLink>,
    next_delivery: u32,
    idle_ms: Option<u32>,
    cbs_status: i32,
    // Records.
    connects: usize,
    tokens: Vec<(String, String)>,
    filters: Vec<(String, String)>,
    heartbeats: usize,
    sasl_mechanism: Option<String>,
    open_hostname: Option<String>,
    fail_connect: Option<TransportError>,
}

impl PeerState {
    fn new(clock: &Clock) -> Self {
        PeerState {
            clock: clock.clone(),
            stage: Stage::SaslHeader,
            inbuf: FrameBuffer::new(),
            out: VecDeque::new(),
            alive: false,
            partitions: BTreeMap::new(),
            links: Vec::new(),
            next_delivery: 0,
            idle_ms: None,
            cbs_status: 200,
            connects: 0,
            tokens: Vec::new(),
            filters: Vec::new(),
            heartbeats: 0,
            sasl_mechanism: None,
            open_hostname: None,
            fail_connect: None,
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.out.extend(bytes);
    }

    fn send(&mut self, p: Performative, payload: &[u8]) {
        let b = codec::encode_amqp(0, &p, payload);
        self.emit(&b);
    }

    fn add(&mut self, partition: u32, device: &str, body: &[u8]) -> u64 {
        let msgs = self.partitions.entry(partition).or_default();
        let offset = msgs.last().map_or(4096, |(o, _)| o + 512);
        let enqueued = 1_700_000_000_000 + offset as i64;
        msgs.push((offset, event(offset, device, enqueued, body)));
        offset
    }

    fn process(&mut self) {
        loop {
            match self.stage {
                Stage::SaslHeader | Stage::AmqpHeader => {
                    let Some(h) = self.inbuf.take_header() else {
                        return;
                    };
                    if self.stage == Stage::SaslHeader {
                        assert_eq!(h, SASL_HEADER);
                        self.emit(&SASL_HEADER);
                        let m = SaslMechanisms {
                            sasl_server_mechanisms: vec![
                                Symbol::from("MSSBCBS"),
                                Symbol::from("ANONYMOUS"),
                            ]
                            .into(),
                        };
                        self.emit(&codec::encode_sasl(&Sasl::Mechanisms(m)));
                        self.stage = Stage::Sasl;
                    } else {
                        assert_eq!(h, AMQP_HEADER);
                        self.emit(&AMQP_HEADER);
                        self.stage = Stage::Amqp;
                    }
                }
                Stage::Sasl => {
                    let Some(f) = self.inbuf.take_frame(1 << 20).expect("client frame") else {
                        return;
                    };
                    match f {
                        Frame::Sasl(Sasl::Init(i)) => {
                            self.sasl_mechanism = Some(i.mechanism.0.clone());
                            let o = SaslOutcome {
                                code: SaslCode::Ok,
                                additional_data: None,
                            };
                            self.emit(&codec::encode_sasl(&Sasl::Outcome(o)));
                            self.stage = Stage::AmqpHeader;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                Stage::Amqp => {
                    let Some(f) = self.inbuf.take_frame(1 << 20).expect("client frame") else {
                        return;
                    };
                    match f {
                        Frame::Heartbeat => self.heartbeats += 1,
                        Frame::Amqp {
                            performative,
                            payload,
                            ..
                        } => self.on_frame(performative, payload),
                        Frame::Sasl(s) => panic!("SASL after open: {s:?}"),
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, p: Performative, payload: Vec<u8>) {
        match p {
            Performative::Open(o) => {
                self.open_hostname = o.hostname.clone();
                let mut answer = o;
                answer.container_id = "fake-eh".into();
                answer.idle_time_out = self.idle_ms;
                self.send(Performative::Open(answer), &[]);
            }
            Performative::Begin(b) => {
                let answer = Begin {
                    remote_channel: Some(0),
                    next_outgoing_id: 1,
                    ..b
                };
                self.send(Performative::Begin(answer), &[]);
            }
            Performative::Attach(a) => {
                let receiver_at_client = a.role == Role::Receiver;
                let address = if receiver_at_client {
                    a.source.as_ref().and_then(|s| s.address.clone())
                } else {
                    a.target.as_ref().and_then(|t| match t.as_ref() {
                        fe2o3_amqp_types::messaging::TargetArchetype::Target(t) => {
                            t.address.clone()
                        }
                    })
                }
                .unwrap_or_default();
                if let Some(filter) = a.source.as_ref().and_then(|s| s.filter.as_ref()) {
                    let v = filter
                        .get(&Symbol::from(SELECTOR_FILTER))
                        .expect("selector filter");
                    match v {
                        Value::Described(d) => {
                            assert_eq!(
                                d.descriptor,
                                Descriptor::Name(Symbol::from(SELECTOR_FILTER))
                            );
                            match &d.value {
                                Value::String(s) => self.filters.push((address.clone(), s.clone())),
                                other => panic!("filter value {other:?}"),
                            }
                        }
                        other => panic!("filter {other:?}"),
                    }
                }
                let handle = a.handle.0;
                let mut answer = a;
                answer.role = if receiver_at_client {
                    Role::Sender
                } else {
                    Role::Receiver
                };
                answer.initial_delivery_count = receiver_at_client.then_some(0);
                self.send(Performative::Attach(answer), &[]);
                // Where a partition link starts: after the filter's offset.
                let next = self.start_index(&address);
                self.links.push(PeerLink {
                    client_handle: handle,
                    address,
                    receiver_at_client,
                    next,
                    credit: 0,
                });
                if !receiver_at_client {
                    self.send(
                        Performative::Flow(Flow {
                            next_incoming_id: Some(0),
                            incoming_window: 100,
                            next_outgoing_id: 1,
                            outgoing_window: 100,
                            handle: Some(Handle(handle)),
                            delivery_count: Some(0),
                            link_credit: Some(100),
                            available: None,
                            drain: false,
                            echo: false,
                            properties: None,
                        }),
                        &[],
                    );
                }
            }
            Performative::Flow(f) => {
                if let (Some(h), Some(c)) = (f.handle, f.link_credit)
                    && let Some(l) = self.links.iter_mut().find(|l| l.client_handle == h.0)
                {
                    l.credit = c;
                }
                self.deliver();
            }
            Performative::Transfer(t) => {
                let m = cbs::decode_message(&payload).expect("CBS request decodes");
                let ap = m.application_properties.expect("app props").0;
                let s = |k: &str| match ap.get(k) {
                    Some(SimpleValue::String(s)) => s.clone(),
                    other => panic!("{k}: {other:?}"),
                };
                assert_eq!(s("operation"), "put-token");
                assert_eq!(s("type"), "servicebus.windows.net:sastoken");
                let token = match m.body {
                    Body::Value(AmqpValue(Value::String(t))) => t,
                    other => panic!("token body {other:?}"),
                };
                self.tokens.push((s("name"), token));
                let props = m.properties.expect("properties");
                assert_eq!(props.reply_to.as_deref(), Some("cbs"));
                let mut rp = OrderedMap::new();
                rp.insert("status-code".to_string(), SimpleValue::Int(self.cbs_status));
                rp.insert(
                    "status-description".to_string(),
                    SimpleValue::String("fake".into()),
                );
                let response = Message {
                    header: None,
                    delivery_annotations: None,
                    message_annotations: None,
                    properties: Some(
                        Properties::builder()
                            .correlation_id(props.message_id.expect("message id"))
                            .build(),
                    ),
                    application_properties: Some(ApplicationProperties(rp)),
                    body: AmqpValue(Value::Null),
                    footer: None,
                };
                let bytes = serde_amqp::to_vec(&Serializable(response)).expect("encodes");
                let _ = t;
                let h = self
                    .links
                    .iter()
                    .find(|l| l.receiver_at_client && l.address == "$cbs")
                    .expect("cbs receiver")
                    .client_handle;
                self.transfer(h, &bytes);
            }
            Performative::Detach(d) => {
                self.links.retain(|l| l.client_handle != d.handle.0);
                self.send(
                    Performative::Detach(Detach {
                        handle: d.handle,
                        closed: true,
                        error: None,
                    }),
                    &[],
                );
            }
            Performative::Close(_) => {
                self.send(Performative::Close(Close { error: None }), &[]);
                self.alive = false;
            }
            Performative::Disposition(_) | Performative::End(_) => {}
        }
    }

    fn partition_of(address: &str) -> Option<u32> {
        address.rsplit_once("/Partitions/")?.1.parse().ok()
    }

    fn start_index(&self, address: &str) -> usize {
        let Some(p) = Self::partition_of(address) else {
            return 0;
        };
        let filter = self
            .filters
            .iter()
            .rev()
            .find(|(a, _)| a == address)
            .map(|(_, f)| f.clone())
            .expect("partition link has a filter");
        let offset: i64 = filter
            .strip_prefix("amqp.annotation.x-opt-offset > '")
            .and_then(|r| r.strip_suffix('\''))
            .expect("offset filter")
            .parse()
            .expect("numeric offset");
        self.partitions.get(&p).map_or(0, |m| {
            m.iter().take_while(|(o, _)| (*o as i64) <= offset).count()
        })
    }

    fn transfer(&mut self, handle: u32, payload: &[u8]) {
        let id = self.next_delivery;
        self.next_delivery += 1;
        // Large messages go in two frames, to exercise reassembly.
        let split = if payload.len() > 2000 {
            payload.len() / 2
        } else {
            payload.len()
        };
        let t = Transfer {
            handle: Handle(handle),
            delivery_id: Some(id),
            delivery_tag: Some(ByteBuf::from(id.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(true),
            more: split < payload.len(),
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        self.send(Performative::Transfer(t), &payload[..split]);
        if split < payload.len() {
            let t2 = Transfer {
                handle: Handle(handle),
                delivery_id: None,
                delivery_tag: None,
                message_format: None,
                settled: None,
                more: false,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            self.send(Performative::Transfer(t2), &payload[split..]);
        }
    }

    fn deliver(&mut self) {
        let mut sends = Vec::new();
        for l in &mut self.links {
            let Some(p) = Self::partition_of(&l.address) else {
                continue;
            };
            let msgs = self.partitions.get(&p).map(Vec::as_slice).unwrap_or(&[]);
            while l.credit > 0 && l.next < msgs.len() {
                sends.push((l.client_handle, msgs[l.next].1.clone()));
                l.next += 1;
                l.credit -= 1;
            }
        }
        for (h, bytes) in sends {
            self.transfer(h, &bytes);
        }
    }
}

struct PeerStream(Rc<RefCell<PeerState>>);

impl ByteStream for PeerStream {
    fn read(&mut self, buf: &mut [u8], wait_ms: u64) -> Result<usize, TransportError> {
        let mut s = self.0.borrow_mut();
        if !s.alive {
            return Err(TransportError::Connection("closed".into()));
        }
        if s.stage == Stage::Amqp {
            s.deliver();
        }
        if s.out.is_empty() {
            let now = s.clock.0.get();
            s.clock.0.set(now + wait_ms);
            return Ok(0);
        }
        let n = buf.len().min(s.out.len());
        for (i, b) in s.out.drain(..n).enumerate() {
            buf[i] = b;
        }
        Ok(n)
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), TransportError> {
        let mut s = self.0.borrow_mut();
        if !s.alive {
            return Err(TransportError::Connection("closed".into()));
        }
        s.inbuf.push(data);
        s.process();
        Ok(())
    }
}

struct PeerConnector(Rc<RefCell<PeerState>>);

impl Connector for PeerConnector {
    fn connect(
        &mut self,
        _host: &str,
        _port: u16,
        _tls: bool,
        _ca: Option<&str>,
    ) -> Result<Box<dyn ByteStream>, TransportError> {
        let mut s = self.0.borrow_mut();
        if let Some(e) = s.fail_connect.clone() {
            return Err(e);
        }
        s.connects += 1;
        s.stage = Stage::SaslHeader;
        s.inbuf = FrameBuffer::new();
        s.out.clear();
        s.links.clear();
        s.alive = true;
        Ok(Box::new(PeerStream(self.0.clone())))
    }
}

/// An IoT Hub D2C message as the Event Hub-compatible endpoint delivers it.
fn event(offset: u64, device: &str, enqueued_ms: i64, body: &[u8]) -> Vec<u8> {
    let annotations = MessageAnnotations::builder()
        .insert("x-opt-offset", Value::String(offset.to_string()))
        .insert("x-opt-sequence-number", Value::Long(offset as i64))
        .insert(
            "x-opt-enqueued-time",
            Value::Timestamp(Timestamp::from_milliseconds(enqueued_ms)),
        )
        .insert("iothub-connection-device-id", Value::String(device.into()))
        .insert("iothub-message-source", Value::String("Telemetry".into()))
        .build();
    let m = Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(
            Properties::builder()
                .message_id(MessageId::from(offset))
                .build(),
        ),
        application_properties: None,
        body: Data(ByteBuf::from(body.to_vec())),
        footer: None,
    };
    serde_amqp::to_vec(&Serializable(m)).expect("encodes")
}

// ---------------------------------------------------------------- helpers

fn config(extra: &[(&str, &str)]) -> EventHubConfig {
    let mut map: BTreeMap<String, String> = [
        ("iot_eventhub_endpoint", "sb://ns.servicebus.windows.net/"),
        ("iot_eventhub_name", "myhub"),
        ("iot_access_key", KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        map.insert(k.to_string(), v.to_string());
    }
    EventHubConfig::load(|k| Ok(map.get(k).cloned()))
        .expect("valid")
        .expect("on")
}

struct World {
    clock: Clock,
    peer: Rc<RefCell<PeerState>>,
    platform: TestPlatform,
    reader: Reader,
    cfg: EventHubConfig,
}

impl World {
    fn new(extra: &[(&str, &str)]) -> World {
        let clock = Clock::default();
        clock.0.set(1_000_000);
        World {
            peer: Rc::new(RefCell::new(PeerState::new(&clock))),
            platform: TestPlatform::new(&clock),
            reader: Reader::new(),
            cfg: config(extra),
            clock,
        }
    }

    fn poll(&mut self, checkpoints: &BTreeMap<String, String>) -> Result<EventBatch, Failure> {
        let mut connector = PeerConnector(self.peer.clone());
        self.reader
            .poll(&self.platform, &mut connector, &self.cfg, checkpoints)
    }

    fn add(&self, partition: u32, device: &str, body: &str) -> u64 {
        self.peer
            .borrow_mut()
            .add(partition, device, body.as_bytes())
    }
}

fn cp(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------- tests

#[test]
fn config_forms() {
    assert_eq!(
        EventHubConfig::load(|_| Ok(None)).expect("ok"),
        None,
        "off without iot_eventhub_endpoint"
    );
    let c = config(&[]);
    assert_eq!(
        (c.host.as_str(), c.port, c.tls),
        ("ns.servicebus.windows.net", 5671, true)
    );
    assert_eq!(c.audience(), "sb://ns.servicebus.windows.net/myhub");
    assert_eq!((c.partitions, c.max_messages), (2, 10));
    assert_eq!(c.policy, "iothubowner");
    assert_eq!(
        c.partition_address(1),
        "myhub/ConsumerGroups/$Default/Partitions/1"
    );
    assert!(!format!("{c:?}").contains(KEY));

    let cs = format!(
        "Endpoint=sb://127.0.0.1:41235/;SharedAccessKeyName=service;SharedAccessKey={KEY};EntityPath=hub1"
    );
    let c = config(&[
        ("iot_eventhub_endpoint", &cs),
        ("iot_eventhub_name", "hub1"),
        ("iot_access_key", "other"),
        ("iot_partitions", "4"),
        ("iot_max_messages", "3"),
        ("tls_ca_pem", "-----BEGIN CERTIFICATE-----"),
    ]);
    assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 41235));
    assert_eq!(c.audience(), "sb://127.0.0.1:41235/hub1");
    assert_eq!((c.policy.as_str(), c.key.as_str()), ("service", KEY));
    assert_eq!((c.partitions, c.max_messages), (4, 3));
    assert!(c.ca_pem.is_some());

    let bad = |pairs: &[(&str, &str)]| {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match EventHubConfig::load(|k| Ok(map.get(k).cloned())) {
            Err(Failure::Misconfigured(m)) => m,
            other => panic!("expected misconfigured, got {other:?}"),
        }
    };
    assert!(
        bad(&[
            ("iot_eventhub_endpoint", "https://x/"),
            ("iot_eventhub_name", "h"),
            ("iot_access_key", KEY)
        ])
        .contains("para.azure.iot_eventhub_endpoint")
    );
    assert!(
        bad(&[
            ("iot_eventhub_endpoint", "sb://x/"),
            ("iot_access_key", KEY)
        ])
        .contains("para.azure.iot_eventhub_name")
    );
    assert!(
        bad(&[
            ("iot_eventhub_endpoint", "sb://x/"),
            ("iot_eventhub_name", "h"),
            ("iot_access_key", KEY),
            ("iot_partitions", "0")
        ])
        .contains("para.azure.iot_partitions")
    );
    assert!(
        bad(&[
            ("iot_eventhub_endpoint", "sb://x/"),
            ("iot_eventhub_name", "h")
        ])
        .contains("para.azure.iot_access_key")
    );
}

#[test]
fn filters_and_offsets() {
    let s = partition_source("h/ConsumerGroups/$Default/Partitions/0", "-1");
    let v = s
        .filter
        .expect("filter")
        .get(&Symbol::from(SELECTOR_FILTER))
        .cloned()
        .expect("selector");
    assert_eq!(
        v,
        Value::Described(Box::new(Described {
            descriptor: Descriptor::Name(Symbol::from(SELECTOR_FILTER)),
            value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()),
        }))
    );
    assert!(valid_offset("-1") && valid_offset("4096"));
    assert!(!valid_offset("1' OR '1'='1") && !valid_offset("") && !valid_offset("-2"));
}

#[test]
fn decode_skips_with_reasons() {
    let ok = decode_event(&event(7, "app:42", 1_700_000_000_123, br#"{"t":1}"#), 5);
    assert_eq!(ok.offset.as_deref(), Some("7"));
    assert_eq!(
        ok.change,
        Ok(Change {
            thing_id: "42".into(),
            appid: "app".into(),
            state: r#"{"t":1}"#.into(),
            written_at: 1_700_000_000_123
        })
    );
    let reason = |body: &[u8], device: &str| {
        decode_event(&event(8, device, 1, body), 5)
            .change
            .expect_err("skipped")
    };
    assert!(reason(b"[1,2]", "app:1").contains("not an object"));
    assert!(reason(b"hello", "app:1").contains("not JSON"));
    assert!(reason(br#"{"a":1}"#, "plain-device").contains("not a Para thing"));
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_STATE_BYTES));
    assert!(reason(big.as_bytes(), "app:1").contains("more than"));
    assert!(decode_event(b"\x00\x53", 5).change.is_err());
}

#[test]
fn first_poll_authorizes_reads_every_partition_and_checkpoints() {
    let mut w = World::new(&[]);
    let o1 = w.add(0, "app:1", r#"{"temp":20}"#);
    w.add(1, "app:2", "not json");
    let o3 = w.add(1, "app:2", r#"{"temp":30}"#);
    let o4 = w.add(0, "app:1", r#"{"temp":21}"#);
    let b = w.poll(&BTreeMap::new()).expect("poll");

    let peer = w.peer.borrow();
    assert_eq!(peer.sasl_mechanism.as_deref(), Some("MSSBCBS"));
    assert_eq!(
        peer.open_hostname.as_deref(),
        Some("ns.servicebus.windows.net")
    );
    assert_eq!(peer.tokens.len(), 1);
    let (audience, token) = &peer.tokens[0];
    assert_eq!(audience, "sb://ns.servicebus.windows.net/myhub");
    let se = 1_700_000_000 + 1_000 + TOKEN_LIFETIME_SECS;
    assert_eq!(
        *token,
        cbs::eventhub_token(audience, "iothubowner", KEY, se)
    );
    assert!(
        token.starts_with(
            "SharedAccessSignature sr=sb%3A%2F%2Fns.servicebus.windows.net%2Fmyhub&sig="
        )
    );
    assert_eq!(
        peer.filters,
        [
            (
                "myhub/ConsumerGroups/$Default/Partitions/0".to_string(),
                "amqp.annotation.x-opt-offset > '-1'".to_string()
            ),
            (
                "myhub/ConsumerGroups/$Default/Partitions/1".to_string(),
                "amqp.annotation.x-opt-offset > '-1'".to_string()
            )
        ]
    );
    drop(peer);

    let states: Vec<_> = b
        .changes
        .iter()
        .map(|c| (c.thing_id.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("1", r#"{"temp":20}"#),
            ("1", r#"{"temp":21}"#),
            ("2", r#"{"temp":30}"#)
        ],
        "in order per device; the non-JSON message is skipped"
    );
    assert_eq!(b.changes[0].written_at, 1_700_000_000_000 + o1);
    assert_eq!(b.messages, 4);
    assert_eq!(
        b.checkpoints,
        cp(&[("0", &o4.to_string()), ("1", &o3.to_string())])
    );
    assert!(
        w.platform
            .logged("skipping a device-to-cloud message because its body is not JSON")
    );

    // The next poll with that cursor returns only what is new, on the same
    // connection.
    let o5 = w.add(1, "app:2", r#"{"temp":31}"#);
    let b2 = w.poll(&b.checkpoints).expect("poll 2");
    assert_eq!(b2.changes.len(), 1);
    assert_eq!(b2.changes[0].state, r#"{"temp":31}"#);
    assert_eq!(b2.checkpoints["1"], o5.to_string());
    assert_eq!(b2.checkpoints["0"], o4.to_string());
    // Nothing new: nothing returned, cursor unchanged.
    let b3 = w.poll(&b2.checkpoints).expect("poll 3");
    assert!(b3.changes.is_empty());
    assert_eq!(b3.checkpoints, b2.checkpoints);
    assert_eq!(w.peer.borrow().connects, 1);
}

#[test]
fn restart_resumes_from_the_cursor_and_uncommitted_batches_are_reread() {
    let mut w = World::new(&[]);
    let o1 = w.add(0, "app:1", r#"{"n":1}"#);
    let o2 = w.add(0, "app:1", r#"{"n":2}"#);
    let first = w.poll(&cp(&[("0", &o1.to_string())])).expect("poll");
    assert_eq!(first.changes.len(), 1, "starts after the checkpoint");
    assert_eq!(first.changes[0].state, r#"{"n":2}"#);
    assert_eq!(
        w.peer.borrow().filters[0].1,
        format!("amqp.annotation.x-opt-offset > '{o1}'")
    );
    // The host failed to commit and polls again with the old cursor: the
    // partition is re-read from there.
    let again = w.poll(&cp(&[("0", &o1.to_string())])).expect("poll");
    assert_eq!(again.changes.len(), 1);
    assert_eq!(again.checkpoints["0"], o2.to_string());
    assert!(w.platform.logged("re-reading from"));
    // A new instance (host restart) resumes from the committed cursor.
    let mut w2 = World {
        reader: Reader::new(),
        ..w
    };
    let o3 = w2.add(0, "app:1", r#"{"n":3}"#);
    let b = w2.poll(&again.checkpoints).expect("poll");
    assert_eq!(b.changes.len(), 1);
    assert_eq!(b.checkpoints["0"], o3.to_string());
    assert_eq!(w2.peer.borrow().connects, 2);
}

#[test]
fn credit_bounds_each_poll_and_busy_streams_drain() {
    let mut w = World::new(&[("iot_max_messages", "3"), ("iot_partitions", "1")]);
    for n in 0..7 {
        w.add(0, "app:1", &format!(r#"{{"n":{n}}}"#));
    }
    let mut cursor = BTreeMap::new();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let b = w.poll(&cursor).expect("poll");
        assert!(b.changes.len() <= 3);
        seen.extend(b.changes.into_iter().map(|c| c.state));
        cursor = b.checkpoints;
    }
    let want: Vec<String> = (0..7).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    assert_eq!(seen, want);
}

#[test]
fn large_messages_are_reassembled_and_oversized_ones_skipped() {
    let mut w = World::new(&[("iot_partitions", "1")]);
    let big = format!(r#"{{"blob":"{}"}}"#, "y".repeat(10_000));
    w.add(0, "app:1", &big);
    let huge = format!(r#"{{"blob":"{}"}}"#, "z".repeat(MAX_STATE_BYTES));
    let o2 = w.add(0, "app:1", &huge);
    let b = w.poll(&BTreeMap::new()).expect("poll");
    assert_eq!(b.changes.len(), 1);
    assert_eq!(b.changes[0].state, big);
    assert_eq!(
        b.checkpoints["0"],
        o2.to_string(),
        "the skipped message still advances"
    );
}

#[test]
fn connect_failures_back_off_and_recover() {
    let mut w = World::new(&[]);
    w.peer.borrow_mut().fail_connect = Some(TransportError::Connection("refused".into()));
    let e = w.poll(&BTreeMap::new()).expect_err("fails");
    assert!(
        matches!(e, Failure::Unavailable(ref m) if m.contains("ns.servicebus.windows.net:5671")),
        "{e:?}"
    );
    // Within the backoff: no attempt, nothing returned, cursor kept.
    let b = w.poll(&cp(&[("0", "4096")])).expect("skipped");
    assert!(b.changes.is_empty());
    assert_eq!(b.checkpoints, cp(&[("0", "4096"), ("1", "-1")]));
    w.peer.borrow_mut().fail_connect = None;
    w.clock.0.set(w.clock.0.get() + 1_001);
    w.add(0, "app:1", r#"{"ok":true}"#);
    let b = w.poll(&BTreeMap::new()).expect("recovers");
    assert_eq!(b.changes.len(), 1);
    // Denied sockets say what to configure.
    let mut w = World::new(&[]);
    w.peer.borrow_mut().fail_connect = Some(TransportError::Denied);
    assert!(
        matches!(w.poll(&BTreeMap::new()), Err(Failure::Misconfigured(m)) if m.contains("allowed_sockets"))
    );
}

#[test]
fn refused_token_is_unauthorized() {
    let mut w = World::new(&[]);
    w.peer.borrow_mut().cbs_status = 401;
    match w.poll(&BTreeMap::new()) {
        Err(Failure::Unauthorized(m)) => {
            assert!(m.contains("para.azure.iot_access_key"), "{m}");
            assert!(!m.contains(KEY));
        }
        other => panic!("{other:?}"),
    }
}

fn peer_detach(
    w: &World,
    partition: u32,
    condition: ErrorCondition,
    info: Option<Vec<(&str, &str)>>,
) {
    let mut peer = w.peer.borrow_mut();
    let addr = w.cfg.partition_address(partition);
    let i = peer
        .links
        .iter()
        .position(|l| l.address == addr)
        .expect("link");
    let h = peer.links.remove(i).client_handle;
    let info = info.map(|pairs| {
        let mut m = OrderedMap::new();
        for (k, v) in pairs {
            m.insert(Symbol::from(k), Value::String(v.to_string()));
        }
        m
    });
    peer.send(
        Performative::Detach(Detach {
            handle: Handle(h),
            closed: true,
            error: Some(AmqpErr::new(condition, Some("test".to_string()), info)),
        }),
        &[],
    );
}

use fe2o3_amqp_types::definitions::{AmqpError as AmqpCond, ErrorCondition};

#[test]
fn token_expiry_detach_and_redirect_reconnect_from_the_checkpoint() {
    let mut w = World::new(&[("iot_partitions", "1")]);
    let o1 = w.add(0, "app:1", r#"{"n":1}"#);
    let b = w.poll(&BTreeMap::new()).expect("poll");
    assert_eq!(b.checkpoints["0"], o1.to_string());
    // The service detaches with unauthorized-access (token expired).
    peer_detach(&w, 0, AmqpCond::UnauthorizedAccess.into(), None);
    let b2 = w.poll(&b.checkpoints).expect("poll");
    assert!(b2.changes.is_empty());
    assert!(!w.reader.connected());
    let o2 = w.add(0, "app:1", r#"{"n":2}"#);
    let b3 = w.poll(&b2.checkpoints).expect("reconnects at once");
    assert_eq!(b3.changes.len(), 1);
    assert_eq!(b3.checkpoints["0"], o2.to_string());
    assert_eq!(w.peer.borrow().connects, 2);
    assert_eq!(w.peer.borrow().tokens.len(), 2);
    assert_eq!(
        w.peer.borrow().filters.last().map(|f| f.1.clone()),
        Some(format!("amqp.annotation.x-opt-offset > '{o1}'"))
    );
    // A redirect reconnects to the named host.
    peer_detach(
        &w,
        0,
        LinkError::Redirect.into(),
        Some(vec![
            ("hostname", "other.servicebus.windows.net"),
            ("port", "5671"),
        ]),
    );
    w.poll(&b3.checkpoints).expect("poll");
    assert!(
        w.platform
            .logged("redirected to other.servicebus.windows.net:5671")
    );
    w.poll(&b3.checkpoints).expect("poll");
    assert_eq!(w.peer.borrow().connects, 3);
    // Any other detach re-attaches the partition on the same connection.
    peer_detach(&w, 0, AmqpCond::InternalError.into(), None);
    let o3 = w.add(0, "app:1", r#"{"n":3}"#);
    let b4 = w.poll(&b3.checkpoints).expect("poll");
    assert_eq!(
        b4.changes.len(),
        0,
        "the detach is seen after this poll's read"
    );
    let b5 = w.poll(&b4.checkpoints).expect("poll");
    assert_eq!(b5.checkpoints["0"], o3.to_string());
    assert_eq!(w.peer.borrow().connects, 3);
}

#[test]
fn token_is_renewed_before_expiry_and_heartbeats_are_sent() {
    let mut w = World::new(&[("iot_partitions", "1")]);
    w.peer.borrow_mut().idle_ms = Some(1_000);
    w.poll(&BTreeMap::new()).expect("poll");
    let beats = w.peer.borrow().heartbeats;
    w.clock.0.set(w.clock.0.get() + 600);
    w.poll(&cp(&[("0", "-1")])).expect("poll");
    assert!(
        w.peer.borrow().heartbeats > beats,
        "a heartbeat after half the peer's idle timeout"
    );
    w.clock
        .0
        .set(w.clock.0.get() + (TOKEN_LIFETIME_SECS - 200) * 1000);
    w.poll(&cp(&[("0", "-1")])).expect("poll");
    assert_eq!(
        w.peer.borrow().tokens.len(),
        2,
        "renewed on the same connection"
    );
    assert_eq!(w.peer.borrow().connects, 1);
}

#[test]
fn broker_poll_combines_twins_and_events_with_a_v2_cursor() {
    let mut w = World::new(&[]);
    w.add(0, "app:9", r#"{"d2c":true}"#);
    let hub_cfg = Config::load(|k| {
        Ok(match k {
            "iot_hostname" => Some("myhub.azure-devices.net".to_string()),
            "iot_access_key" => Some(KEY.to_string()),
            _ => None,
        })
    })
    .expect("config");
    let v1 = r#"{"v":1,"since":"2024-05-01T10:00:00Z","seen":[]}"#;
    let mut tokens = TokenCache::new();
    let mut platform = TestPlatform::new(&w.clock);
    let mut connector = PeerConnector(w.peer.clone());
    let out = {
        let mut hub = Hub::new(&hub_cfg, &mut platform, &mut tokens);
        broker::poll_with_events(
            &mut hub,
            v1,
            Some(Events {
                reader: &mut w.reader,
                connector: &mut connector,
                config: &w.cfg,
            }),
        )
        .expect("poll")
    };
    assert_eq!(out.changes.len(), 1);
    assert_eq!(out.changes[0].appid, "app");
    assert_eq!(out.next_poll_ms, Some(BUSY_POLL_MS));
    let c = PollCursor::parse(&out.cursor).expect("v2");
    assert!(
        out.cursor
            .starts_with(r#"{"v":2,"twin":{"v":1,"since":"2024-05-01T10:00:00Z""#),
        "{}",
        out.cursor
    );
    assert_eq!(c.eh["1"], "-1");
    assert_eq!(c.eh["0"], "4096");
    // Events off again: twin-only polls keep the checkpoints.
    let mut hub = Hub::new(&hub_cfg, &mut platform, &mut tokens);
    let out2 = broker::poll(&mut hub, &out.cursor).expect("poll");
    assert_eq!(PollCursor::parse(&out2.cursor).expect("v2").eh, c.eh);
    assert_eq!(out2.next_poll_ms, None);
}

/// Reads from a live endpoint (the emulator's AMQP listener) over real TLS:
/// `PARA_EH_CS=<connection string> PARA_EH_CA=<ca.pem> cargo test -p
/// azure-broker live_endpoint -- --ignored --nocapture`. Prints what it
/// reads in three polls, resuming each from the previous checkpoints.
#[test]
#[ignore = "needs a live Event Hub-compatible endpoint"]
fn live_endpoint() {
    use crate::amqp::transport::StdConnector;
    let cs = std::env::var("PARA_EH_CS").expect("PARA_EH_CS");
    let ca = std::env::var("PARA_EH_CA")
        .ok()
        .map(|p| std::fs::read_to_string(p).expect("CA file"));
    let cfg = EventHubConfig::load(|k| {
        Ok(match k {
            "iot_eventhub_endpoint" => Some(cs.clone()),
            "tls_ca_pem" => ca.clone(),
            "iot_partitions" => std::env::var("PARA_EH_PARTITIONS").ok(),
            _ => None,
        })
    })
    .expect("config")
    .expect("on");
    struct Real(std::time::Instant);
    impl Platform for Real {
        fn send(&mut self, _r: &Request) -> Result<Response, TransportError> {
            unreachable!()
        }
        fn unix_secs(&self) -> u64 {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }
        fn monotonic_ms(&self) -> u64 {
            self.0.elapsed().as_millis() as u64
        }
        fn sleep_ms(&mut self, ms: u64) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        fn log(&self, level: Level, message: &str) {
            println!("[{level:?}] {message}");
        }
    }
    let platform = Real(std::time::Instant::now());
    let mut reader = Reader::new();
    let mut cursor: BTreeMap<String, String> = std::env::var("PARA_EH_CURSOR")
        .ok()
        .map(|c| serde_json::from_str(&c).expect("cursor JSON"))
        .unwrap_or_default();
    for i in 0..3 {
        let t = std::time::Instant::now();
        let b = reader
            .poll(&platform, &mut StdConnector, &cfg, &cursor)
            .expect("poll");
        println!(
            "poll {i}: {} ms, {} messages, changes {:?}, checkpoints {}",
            t.elapsed().as_millis(),
            b.messages,
            b.changes,
            serde_json::to_string(&b.checkpoints).unwrap_or_default()
        );
        cursor = b.checkpoints;
    }
}
