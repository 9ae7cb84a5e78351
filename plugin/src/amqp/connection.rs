//! A minimal AMQP 1.0 client connection: protocol headers, SASL (MSSBCBS or
//! ANONYMOUS), open, one session, sender and receiver links, flow control,
//! transfers, dispositions, detach/close, and heartbeats.
//!
//! Everything is synchronous and bounded: every read names how long it may
//! wait, so a caller (one broker poll) decides how long it blocks.

use super::codec::{self, AMQP_HEADER, Frame, FrameBuffer, SASL_HEADER, Sasl};
use super::transport::ByteStream;
use crate::platform::{Platform, TransportError};
use fe2o3_amqp_types::definitions::{
    ErrorCondition, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Source, Target};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit};
use serde_bytes::ByteBuf;
use std::collections::{BTreeMap, VecDeque};

/// The largest frame this side accepts.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// The idle timeout this side announces: the peer sends at least a
/// heartbeat every half of this.
pub const LOCAL_IDLE_MS: u64 = 60_000;
/// The session windows this side grants and announces.
pub const SESSION_WINDOW: u32 = 5_000;
/// The largest message this side reassembles (D2C messages are at most
/// 256 KB; the margin covers annotations).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Why the connection (or a step on it) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmqpError {
    /// The byte stream failed.
    Transport(TransportError),
    /// The peer broke the protocol, or a step timed out.
    Protocol(String),
    /// The peer closed the connection or session, or refused SASL, with an
    /// AMQP error condition (e.g. `amqp:unauthorized-access`).
    Remote {
        /// The condition symbol.
        condition: String,
        /// The peer's description.
        description: String,
    },
}

impl std::fmt::Display for AmqpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmqpError::Transport(e) => write!(f, "{e}"),
            AmqpError::Protocol(m) => f.write_str(m),
            AmqpError::Remote {
                condition,
                description,
            } => write!(f, "{condition}: {description}"),
        }
    }
}

impl From<TransportError> for AmqpError {
    fn from(e: TransportError) -> Self {
        AmqpError::Transport(e)
    }
}

/// The symbol of an error condition.
pub fn condition_name(c: &ErrorCondition) -> String {
    match c {
        ErrorCondition::AmqpError(e) => Symbol::from(e).0,
        ErrorCondition::ConnectionError(e) => Symbol::from(e).0,
        ErrorCondition::SessionError(e) => Symbol::from(e).0,
        ErrorCondition::LinkError(e) => Symbol::from(e).0,
        ErrorCondition::Custom(s) => s.0.clone(),
    }
}

/// How a link ended at the peer's initiative.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkEnd {
    /// The condition symbol, empty when the peer gave none.
    pub condition: String,
    /// The peer's description.
    pub description: String,
    /// The error's `info` map (a redirect's `hostname`, `port`, `address`).
    pub info: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Link {
    receiver: bool,
    attached: bool,
    ended: Option<LinkEnd>,
    /// Receivers: credit left; senders: credit the peer granted.
    credit: u32,
    delivery_count: u32,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    delivery_id: u32,
    settled: bool,
    bytes: Vec<u8>,
}

/// One received message: the link it came on and its encoded sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The receiving link.
    pub handle: u32,
    /// The message sections as sent.
    pub payload: Vec<u8>,
}

/// An open connection with one session.
pub struct Connection {
    stream: Box<dyn ByteStream>,
    buf: FrameBuffer,
    peer_max_frame: u32,
    peer_idle_ms: Option<u64>,
    last_sent_ms: u64,
    last_recv_ms: u64,
    next_outgoing_id: u32,
    next_incoming_id: u32,
    incoming_since_flow: u32,
    next_delivery_id: u32,
    next_handle: u32,
    links: BTreeMap<u32, Link>,
    inbox: VecDeque<Delivery>,
    closed: Option<AmqpError>,
}

fn protocol(m: impl Into<String>) -> AmqpError {
    AmqpError::Protocol(m.into())
}

impl Connection {
    /// Runs the protocol header, SASL and open/begin exchanges over
    /// `stream`. `hostname` is the AMQP virtual host (the namespace host).
    pub fn open(
        stream: Box<dyn ByteStream>,
        hostname: &str,
        container_id: &str,
        platform: &dyn Platform,
        timeout_ms: u64,
    ) -> Result<Connection, AmqpError> {
        let now = platform.monotonic_ms();
        let mut c = Connection {
            stream,
            buf: FrameBuffer::new(),
            peer_max_frame: codec::MIN_MAX_FRAME_SIZE,
            peer_idle_ms: None,
            last_sent_ms: now,
            last_recv_ms: now,
            next_outgoing_id: 0,
            next_incoming_id: 0,
            incoming_since_flow: 0,
            next_delivery_id: 0,
            next_handle: 0,
            links: BTreeMap::new(),
            inbox: VecDeque::new(),
            closed: None,
        };
        let deadline = now + timeout_ms;

        // SASL layer.
        c.write(platform, &SASL_HEADER)?;
        let header = c.read_header(platform, deadline)?;
        if header != SASL_HEADER {
            return Err(protocol(format!(
                "the peer answered the SASL header with {header:?}"
            )));
        }
        let mechanisms = match c.read_frame(platform, deadline)? {
            Frame::Sasl(Sasl::Mechanisms(m)) => m.sasl_server_mechanisms.0,
            other => return Err(protocol(format!("expected sasl-mechanisms, got {other:?}"))),
        };
        let mechanism = ["MSSBCBS", "ANONYMOUS"]
            .into_iter()
            .find(|m| mechanisms.iter().any(|s| s.0 == *m))
            .ok_or_else(|| {
                protocol(format!(
                    "the peer offers no SASL mechanism this broker speaks (offered: {:?}; need MSSBCBS or ANONYMOUS)",
                    mechanisms.iter().map(|s| s.0.as_str()).collect::<Vec<_>>()
                ))
            })?;
        let init = SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: None,
            hostname: Some(hostname.to_string()),
        };
        c.write(platform, &codec::encode_sasl(&Sasl::Init(init)))?;
        match c.read_frame(platform, deadline)? {
            Frame::Sasl(Sasl::Outcome(o)) if o.code == SaslCode::Ok => {}
            Frame::Sasl(Sasl::Outcome(o)) => {
                return Err(AmqpError::Remote {
                    condition: "sasl".into(),
                    description: format!("SASL {mechanism} was refused ({:?})", o.code),
                });
            }
            other => return Err(protocol(format!("expected sasl-outcome, got {other:?}"))),
        }

        // AMQP layer: header, open, begin (pipelined).
        c.write(platform, &AMQP_HEADER)?;
        let open = Open {
            container_id: container_id.to_string(),
            hostname: Some(hostname.to_string()),
            max_frame_size: MAX_FRAME_SIZE.into(),
            channel_max: 0.into(),
            idle_time_out: Some(LOCAL_IDLE_MS as u32),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let begin = Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: SESSION_WINDOW,
            outgoing_window: SESSION_WINDOW,
            handle_max: Handle(1023),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        c.send(platform, Performative::Open(open), &[])?;
        c.send(platform, Performative::Begin(begin), &[])?;
        let header = c.read_header(platform, deadline)?;
        if header != AMQP_HEADER {
            return Err(protocol(format!(
                "the peer answered the AMQP header with {header:?}"
            )));
        }
        loop {
            match c.read_frame(platform, deadline)? {
                Frame::Amqp {
                    performative: Performative::Open(o),
                    ..
                } => {
                    c.peer_max_frame = o.max_frame_size.0.max(codec::MIN_MAX_FRAME_SIZE);
                    c.peer_idle_ms = o.idle_time_out.filter(|t| *t > 0).map(u64::from);
                }
                Frame::Amqp {
                    performative: Performative::Begin(b),
                    ..
                } => {
                    c.next_incoming_id = b.next_outgoing_id;
                    return Ok(c);
                }
                Frame::Amqp {
                    performative: Performative::Close(cl),
                    ..
                } => return Err(remote_close("the connection", cl.error)),
                Frame::Heartbeat => {}
                other => return Err(protocol(format!("expected open/begin, got {other:?}"))),
            }
        }
    }

    fn write(&mut self, platform: &dyn Platform, bytes: &[u8]) -> Result<(), AmqpError> {
        self.stream.write_all(bytes)?;
        self.last_sent_ms = platform.monotonic_ms();
        Ok(())
    }

    /// Reads more bytes, waiting at most `wait_ms`; returns how many.
    fn fill(&mut self, platform: &dyn Platform, wait_ms: u64) -> Result<usize, AmqpError> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk, wait_ms)?;
        if n > 0 {
            self.buf.push(&chunk[..n]);
            self.last_recv_ms = platform.monotonic_ms();
        }
        Ok(n)
    }

    fn remaining(platform: &dyn Platform, deadline: u64) -> Result<u64, AmqpError> {
        let now = platform.monotonic_ms();
        if now >= deadline {
            return Err(AmqpError::Transport(TransportError::Timeout(
                "the AMQP peer did not answer in time".into(),
            )));
        }
        Ok(deadline - now)
    }

    fn read_header(
        &mut self,
        platform: &dyn Platform,
        deadline: u64,
    ) -> Result<[u8; 8], AmqpError> {
        loop {
            if let Some(h) = self.buf.take_header() {
                return Ok(h);
            }
            let wait = Self::remaining(platform, deadline)?;
            self.fill(platform, wait)?;
        }
    }

    fn read_frame(&mut self, platform: &dyn Platform, deadline: u64) -> Result<Frame, AmqpError> {
        loop {
            if let Some(f) = self.buf.take_frame(MAX_FRAME_SIZE).map_err(protocol)? {
                return Ok(f);
            }
            let wait = Self::remaining(platform, deadline)?;
            self.fill(platform, wait)?;
        }
    }

    fn send(
        &mut self,
        platform: &dyn Platform,
        p: Performative,
        payload: &[u8],
    ) -> Result<(), AmqpError> {
        let bytes = codec::encode_amqp(0, &p, payload);
        if bytes.len() > self.peer_max_frame as usize {
            return Err(protocol(format!(
                "a {}-byte frame exceeds the peer's {}-byte limit",
                bytes.len(),
                self.peer_max_frame
            )));
        }
        self.write(platform, &bytes)
    }

    /// The error that ended the connection, if it has ended.
    pub fn failed(&self) -> Option<&AmqpError> {
        self.closed.as_ref()
    }

    /// Attaches a sender link to `target`; returns its handle.
    pub fn attach_sender(
        &mut self,
        platform: &dyn Platform,
        name: &str,
        target: &str,
    ) -> Result<u32, AmqpError> {
        let handle = self.new_link(false, 0);
        let attach = Attach {
            name: name.to_string(),
            handle: Handle(handle),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Settled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address(name).build())),
            target: Some(Box::new(Target::builder().address(target).build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(platform, Performative::Attach(attach), &[])?;
        Ok(handle)
    }

    /// Attaches a receiver link from `source` and grants it `credit`;
    /// returns its handle.
    pub fn attach_receiver(
        &mut self,
        platform: &dyn Platform,
        name: &str,
        source: Source,
        target: &str,
        credit: u32,
    ) -> Result<u32, AmqpError> {
        let handle = self.new_link(true, 0);
        let attach = Attach {
            name: name.to_string(),
            handle: Handle(handle),
            role: Role::Receiver,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(source)),
            target: Some(Box::new(Target::builder().address(target).build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(platform, Performative::Attach(attach), &[])?;
        self.grant(platform, handle, credit)?;
        Ok(handle)
    }

    fn new_link(&mut self, receiver: bool, credit: u32) -> u32 {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.links.insert(
            handle,
            Link {
                receiver,
                attached: false,
                ended: None,
                credit,
                delivery_count: 0,
                partial: None,
            },
        );
        handle
    }

    fn session_flow(&self, handle: Option<u32>) -> Flow {
        let link = handle.and_then(|h| self.links.get(&h));
        Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: SESSION_WINDOW,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: SESSION_WINDOW,
            handle: handle.map(Handle),
            delivery_count: link.map(|l| l.delivery_count),
            link_credit: link.map(|l| l.credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }
    }

    /// Sets a receiver's credit to `credit`.
    pub fn grant(
        &mut self,
        platform: &dyn Platform,
        handle: u32,
        credit: u32,
    ) -> Result<(), AmqpError> {
        let Some(link) = self.links.get_mut(&handle) else {
            return Err(protocol(format!("no link {handle}")));
        };
        link.credit = credit;
        let flow = self.session_flow(Some(handle));
        self.incoming_since_flow = 0;
        self.send(platform, Performative::Flow(flow), &[])
    }

    /// How many link handles this connection has used.
    pub fn handles_used(&self) -> u32 {
        self.next_handle
    }

    /// Credit left on a link.
    pub fn credit(&self, handle: u32) -> u32 {
        self.links.get(&handle).map_or(0, |l| l.credit)
    }

    /// Whether the peer has answered the link's attach.
    pub fn is_attached(&self, handle: u32) -> bool {
        self.links.get(&handle).is_some_and(|l| l.attached)
    }

    /// How the peer ended the link, if it did.
    pub fn link_end(&self, handle: u32) -> Option<&LinkEnd> {
        self.links.get(&handle).and_then(|l| l.ended.as_ref())
    }

    /// Detaches (closes) a link and forgets it. Deliveries already received
    /// on it are dropped.
    pub fn detach(&mut self, platform: &dyn Platform, handle: u32) -> Result<(), AmqpError> {
        if self.links.remove(&handle).is_none() {
            return Ok(());
        }
        self.inbox.retain(|d| d.handle != handle);
        let detach = Detach {
            handle: Handle(handle),
            closed: true,
            error: None,
        };
        self.send(platform, Performative::Detach(detach), &[])
    }

    /// Forgets a link the peer already detached (its detach was answered).
    pub fn forget(&mut self, handle: u32) -> bool {
        self.inbox.retain(|d| d.handle != handle);
        self.links.remove(&handle).is_some()
    }

    /// Sends one pre-settled message on a sender link that has credit.
    pub fn send_message(
        &mut self,
        platform: &dyn Platform,
        handle: u32,
        payload: &[u8],
    ) -> Result<(), AmqpError> {
        let Some(link) = self.links.get_mut(&handle) else {
            return Err(protocol(format!("no link {handle}")));
        };
        if link.credit == 0 {
            return Err(protocol("the peer gave the sender link no credit"));
        }
        link.credit -= 1;
        link.delivery_count = link.delivery_count.wrapping_add(1);
        let delivery_id = self.next_delivery_id;
        self.next_delivery_id = self.next_delivery_id.wrapping_add(1);
        let transfer = Transfer {
            handle: Handle(handle),
            delivery_id: Some(delivery_id),
            delivery_tag: Some(ByteBuf::from(delivery_id.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(true),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        // Requests here (CBS) are small; one frame always suffices.
        self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
        self.send(platform, Performative::Transfer(transfer), payload)
    }

    /// Takes the next received message, if any.
    pub fn take_delivery(&mut self) -> Option<Delivery> {
        self.inbox.pop_front()
    }

    /// Takes the next received message on `handle`, if any.
    pub fn take_delivery_on(&mut self, handle: u32) -> Option<Delivery> {
        let i = self.inbox.iter().position(|d| d.handle == handle)?;
        self.inbox.remove(i)
    }

    /// Reads and handles frames, waiting at most `wait_ms` for data; then
    /// sends a heartbeat if one is due. Returns how many frames arrived.
    pub fn pump(&mut self, platform: &dyn Platform, wait_ms: u64) -> Result<usize, AmqpError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        let result = self.pump_inner(platform, wait_ms);
        if let Err(e) = &result {
            self.closed = Some(e.clone());
        }
        result
    }

    fn pump_inner(&mut self, platform: &dyn Platform, wait_ms: u64) -> Result<usize, AmqpError> {
        let mut frames = self.drain_frames(platform)?;
        if frames == 0 {
            self.fill(platform, wait_ms)?;
        }
        // Take everything already buffered without waiting again.
        while self.fill(platform, 0)? > 0 {}
        frames += self.drain_frames(platform)?;
        let now = platform.monotonic_ms();
        if now.saturating_sub(self.last_recv_ms) > 2 * LOCAL_IDLE_MS {
            return Err(AmqpError::Transport(TransportError::Timeout(format!(
                "the AMQP peer sent nothing for {} s",
                (now - self.last_recv_ms) / 1000
            ))));
        }
        if let Some(idle) = self.peer_idle_ms
            && now.saturating_sub(self.last_sent_ms) >= idle / 2
        {
            self.write(platform, &codec::encode_heartbeat())?;
        }
        if self.incoming_since_flow >= SESSION_WINDOW / 2 {
            let flow = self.session_flow(None);
            self.incoming_since_flow = 0;
            self.send(platform, Performative::Flow(flow), &[])?;
        }
        Ok(frames)
    }

    fn drain_frames(&mut self, platform: &dyn Platform) -> Result<usize, AmqpError> {
        let mut n = 0;
        while let Some(frame) = self.buf.take_frame(MAX_FRAME_SIZE).map_err(protocol)? {
            n += 1;
            if let Frame::Amqp {
                performative,
                payload,
                ..
            } = frame
            {
                self.handle(platform, performative, payload)?;
            }
        }
        Ok(n)
    }

    fn handle(
        &mut self,
        platform: &dyn Platform,
        p: Performative,
        payload: Vec<u8>,
    ) -> Result<(), AmqpError> {
        match p {
            Performative::Attach(a) => {
                if let Some(link) = self.links.get_mut(&a.handle.0) {
                    link.attached = true;
                    // A refusal is an attach without a terminus, followed by
                    // a detach carrying the error.
                }
            }
            Performative::Flow(f) => {
                if let (Some(h), Some(credit)) = (f.handle, f.link_credit)
                    && let Some(link) = self.links.get_mut(&h.0)
                    && !link.receiver
                {
                    let peer_count = f.delivery_count.unwrap_or(link.delivery_count);
                    link.credit = peer_count
                        .wrapping_add(credit)
                        .wrapping_sub(link.delivery_count);
                }
            }
            Performative::Transfer(t) => {
                self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
                self.incoming_since_flow += 1;
                self.on_transfer(platform, t, payload)?;
            }
            Performative::Disposition(_) => {}
            Performative::Detach(d) => {
                if let Some(link) = self.links.get_mut(&d.handle.0) {
                    link.ended = Some(match d.error {
                        Some(e) => LinkEnd {
                            condition: condition_name(&e.condition),
                            description: e.description.unwrap_or_default(),
                            info: e
                                .info
                                .map(|m| {
                                    m.into_iter().map(|(k, v)| (k.0, value_text(&v))).collect()
                                })
                                .unwrap_or_default(),
                        },
                        None => LinkEnd {
                            condition: String::new(),
                            description: "the peer detached the link".into(),
                            info: BTreeMap::new(),
                        },
                    });
                    // Answer the detach so the peer can reuse the name.
                    let answer = Detach {
                        handle: d.handle,
                        closed: true,
                        error: None,
                    };
                    self.send(platform, Performative::Detach(answer), &[])?;
                }
            }
            Performative::End(e) => {
                let _ = self.send(platform, Performative::End(End { error: None }), &[]);
                return Err(remote_close("the session", e.error));
            }
            Performative::Close(c) => {
                let _ = self.send(platform, Performative::Close(Close { error: None }), &[]);
                return Err(remote_close("the connection", c.error));
            }
            Performative::Open(_) | Performative::Begin(_) => {
                return Err(protocol("the peer sent a second open or begin"));
            }
        }
        Ok(())
    }

    fn on_transfer(
        &mut self,
        platform: &dyn Platform,
        t: Transfer,
        payload: Vec<u8>,
    ) -> Result<(), AmqpError> {
        let handle = t.handle.0;
        let Some(link) = self.links.get_mut(&handle) else {
            // A transfer for a link detached meanwhile: drop it.
            return Ok(());
        };
        let partial = match (link.partial.take(), t.delivery_id) {
            (Some(p), _) => p,
            (None, Some(id)) => {
                link.delivery_count = link.delivery_count.wrapping_add(1);
                link.credit = link.credit.saturating_sub(1);
                Partial {
                    delivery_id: id,
                    settled: false,
                    bytes: Vec::new(),
                }
            }
            (None, None) => return Err(protocol("a transfer started without a delivery-id")),
        };
        let mut partial = partial;
        partial.settled |= t.settled == Some(true);
        if t.aborted {
            return Ok(());
        }
        if partial.bytes.len() + payload.len() > MAX_MESSAGE_BYTES {
            return Err(protocol(format!(
                "a message on link {handle} exceeds {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        partial.bytes.extend_from_slice(&payload);
        if t.more {
            link.partial = Some(partial);
            return Ok(());
        }
        if !partial.settled {
            let d = Disposition {
                role: Role::Receiver,
                first: partial.delivery_id,
                last: None,
                settled: true,
                state: Some(DeliveryState::Accepted(Accepted {})),
                batchable: false,
            };
            self.send(platform, Performative::Disposition(d), &[])?;
        }
        self.inbox.push_back(Delivery {
            handle,
            payload: partial.bytes,
        });
        Ok(())
    }

    /// Closes the connection politely (best effort).
    pub fn close(&mut self, platform: &dyn Platform) {
        if self.closed.is_none() {
            let _ = self.send(platform, Performative::Close(Close { error: None }), &[]);
            self.closed = Some(protocol("closed by this side"));
        }
    }
}

fn remote_close(what: &str, e: Option<fe2o3_amqp_types::definitions::Error>) -> AmqpError {
    match e {
        Some(e) => AmqpError::Remote {
            condition: condition_name(&e.condition),
            description: e.description.unwrap_or_default(),
        },
        None => AmqpError::Remote {
            condition: String::new(),
            description: format!("the peer closed {what}"),
        },
    }
}

/// A value as text, for error info and annotations.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.0.clone(),
        Value::Long(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Short(n) => n.to_string(),
        Value::Byte(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Ushort(n) => n.to_string(),
        Value::Ubyte(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Timestamp(t) => t.milliseconds().to_string(),
        other => format!("{other:?}"),
    }
}
