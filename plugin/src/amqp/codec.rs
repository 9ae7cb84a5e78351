//! AMQP 1.0 framing: protocol headers, frame headers, and splitting a frame
//! body into its performative and payload.
//!
//! The performatives and messages themselves are `fe2o3-amqp-types` values
//! encoded with `serde_amqp`; this module only adds the framing those crates
//! leave to a connection (section 2.3 of the spec).

use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::sasl::{SaslChallenge, SaslInit, SaslMechanisms, SaslOutcome};
use serde::Serialize;

/// The header that starts an AMQP connection (protocol id 0).
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
/// The header that starts a SASL layer (protocol id 3).
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Frame type of AMQP frames.
pub const FRAME_AMQP: u8 = 0;
/// Frame type of SASL frames.
pub const FRAME_SASL: u8 = 1;
/// Every peer must accept frames of this size (spec: MIN-MAX-FRAME-SIZE).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;

/// A SASL frame body.
#[derive(Debug, Clone)]
pub enum Sasl {
    /// The server's mechanisms.
    Mechanisms(SaslMechanisms),
    /// The client's choice.
    Init(SaslInit),
    /// A server challenge (no mechanism used here sends one).
    Challenge(SaslChallenge),
    /// The result.
    Outcome(SaslOutcome),
}

/// A decoded frame. Frames are short-lived, so the large performative
/// variant is not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Frame {
    /// An empty AMQP frame: a heartbeat.
    Heartbeat,
    /// An AMQP frame: channel, performative and (for transfers) payload.
    Amqp {
        /// The session channel.
        channel: u16,
        /// The performative.
        performative: Performative,
        /// Bytes after the performative (message data of a transfer).
        payload: Vec<u8>,
    },
    /// A SASL frame.
    Sasl(Sasl),
}

/// Encodes one AMQP frame carrying `performative` and `payload`.
pub fn encode_amqp(channel: u16, performative: &Performative, payload: &[u8]) -> Vec<u8> {
    let body = to_vec(performative);
    frame_bytes(FRAME_AMQP, channel, &body, payload)
}

/// Encodes a heartbeat (an empty AMQP frame).
pub fn encode_heartbeat() -> Vec<u8> {
    frame_bytes(FRAME_AMQP, 0, &[], &[])
}

/// Encodes one SASL frame.
pub fn encode_sasl(body: &Sasl) -> Vec<u8> {
    let bytes = match body {
        Sasl::Mechanisms(m) => to_vec(m),
        Sasl::Init(i) => to_vec(i),
        Sasl::Challenge(c) => to_vec(c),
        Sasl::Outcome(o) => to_vec(o),
    };
    frame_bytes(FRAME_SASL, 0, &bytes, &[])
}

fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising the crate's own performative types into a Vec only fails
    // on a bug in the codec; an empty body then fails loudly at the peer.
    serde_amqp::to_vec(value).unwrap_or_default()
}

fn frame_bytes(ftype: u8, channel: u16, body: &[u8], payload: &[u8]) -> Vec<u8> {
    let size = 8 + body.len() + payload.len();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    out.push(2); // data offset, in 4-byte words
    out.push(ftype);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(payload);
    out
}

/// The length of the AMQP-encoded value at the start of `bytes`, or `None`
/// if `bytes` is too short or starts with an unknown format code.
pub fn value_len(bytes: &[u8]) -> Option<usize> {
    let code = *bytes.first()?;
    let sized = |width: usize| -> Option<usize> {
        let size = match width {
            1 => *bytes.get(1)? as usize,
            _ => u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?) as usize,
        };
        let total = 1 + width + size;
        (bytes.len() >= total).then_some(total)
    };
    let fixed = |n: usize| (bytes.len() > n).then_some(n + 1);
    match code {
        0x00 => {
            let d = value_len(&bytes[1..])?;
            let v = value_len(&bytes[1 + d..])?;
            Some(1 + d + v)
        }
        0x40..=0x45 => Some(1),
        0x50..=0x56 => fixed(1),
        0x60..=0x61 => fixed(2),
        0x70..=0x74 => fixed(4),
        0x80..=0x84 => fixed(8),
        0x94 | 0x98 => fixed(16),
        0xa0..=0xaf | 0xc0..=0xcf | 0xe0..=0xef => sized(1),
        0xb0..=0xbf | 0xd0..=0xdf | 0xf0..=0xff => sized(4),
        _ => None,
    }
}

/// The numeric descriptor code of the described value at the start of
/// `bytes` (only numeric descriptors are used by performatives on the wire).
fn descriptor_code(bytes: &[u8]) -> Option<u64> {
    match bytes {
        [0x00, 0x53, c, ..] => Some(u64::from(*c)),
        [0x00, 0x80, rest @ ..] => Some(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

/// Decodes a frame from its type, channel and body (the bytes after the
/// data offset).
pub fn decode(ftype: u8, channel: u16, body: &[u8]) -> Result<Frame, String> {
    match ftype {
        FRAME_AMQP if body.is_empty() => Ok(Frame::Heartbeat),
        FRAME_AMQP => {
            let n = value_len(body).ok_or("the performative is truncated or malformed")?;
            let performative: Performative = serde_amqp::from_slice(&body[..n])
                .map_err(|e| format!("the performative does not decode ({e})"))?;
            Ok(Frame::Amqp {
                channel,
                performative,
                payload: body[n..].to_vec(),
            })
        }
        FRAME_SASL => {
            let err = |e: serde_amqp::Error| format!("a SASL frame does not decode ({e})");
            let sasl = match descriptor_code(body) {
                Some(0x40) => Sasl::Mechanisms(serde_amqp::from_slice(body).map_err(err)?),
                Some(0x41) => Sasl::Init(serde_amqp::from_slice(body).map_err(err)?),
                Some(0x42) => Sasl::Challenge(serde_amqp::from_slice(body).map_err(err)?),
                Some(0x44) => Sasl::Outcome(serde_amqp::from_slice(body).map_err(err)?),
                other => return Err(format!("unexpected SASL frame {other:?}")),
            };
            Ok(Frame::Sasl(sasl))
        }
        other => Err(format!("unknown frame type {other}")),
    }
}

/// Accumulates bytes from the transport and splits them into protocol
/// headers and frames.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the transport.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held and not yet taken.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes an 8-byte protocol header, if one has arrived.
    pub fn take_header(&mut self) -> Option<[u8; 8]> {
        let h: [u8; 8] = self.buf.get(..8)?.try_into().ok()?;
        self.buf.drain(..8);
        Some(h)
    }

    /// Takes the next complete frame, if one has arrived. `max_size` is the
    /// largest frame this side accepts.
    pub fn take_frame(&mut self, max_size: u32) -> Result<Option<Frame>, String> {
        let Some(head) = self.buf.get(..8) else {
            return Ok(None);
        };
        let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let doff = head[4] as usize * 4;
        let ftype = head[5];
        let channel = u16::from_be_bytes([head[6], head[7]]);
        if size > max_size {
            return Err(format!(
                "the peer sent a {size}-byte frame, larger than the {max_size} agreed"
            ));
        }
        if doff < 8 || (size as usize) < doff {
            return Err(format!(
                "malformed frame header (size {size}, data offset {doff})"
            ));
        }
        if self.buf.len() < size as usize {
            return Ok(None);
        }
        let frame = decode(ftype, channel, &self.buf[doff..size as usize]);
        self.buf.drain(..size as usize);
        frame.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::definitions::{Error as AmqpError, LinkError, Role};
    use fe2o3_amqp_types::performatives::{Detach, Flow, Open, Transfer};
    use fe2o3_amqp_types::primitives::Symbol;
    use fe2o3_amqp_types::sasl::SaslCode;

    fn round_trip(p: Performative, payload: &[u8]) -> Frame {
        let bytes = encode_amqp(3, &p, payload);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let mut fb = FrameBuffer::new();
        // Byte by byte: a frame is only taken once complete.
        for (i, b) in bytes.iter().enumerate() {
            fb.push(&[*b]);
            let f = fb.take_frame(1 << 20).expect("decodes");
            if i + 1 < bytes.len() {
                assert!(f.is_none());
            } else {
                return f.expect("complete");
            }
        }
        unreachable!()
    }

    #[test]
    fn open_round_trips() {
        let open = Open {
            container_id: "c1".into(),
            hostname: Some("ns.servicebus.windows.net".into()),
            max_frame_size: 65536.into(),
            channel_max: 0.into(),
            idle_time_out: Some(60_000),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        match round_trip(Performative::Open(open.clone()), &[]) {
            Frame::Amqp {
                channel: 3,
                performative: Performative::Open(got),
                payload,
            } => {
                assert_eq!(got, open);
                assert!(payload.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transfer_keeps_payload_and_detach_error_decodes() {
        let t = Transfer {
            handle: 2.into(),
            delivery_id: Some(7),
            delivery_tag: Some(serde_bytes::ByteBuf::from(vec![1, 2])),
            message_format: Some(0),
            settled: Some(true),
            more: false,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        let f = round_trip(Performative::Transfer(t.clone()), b"\x00\x53\x75\xa0\x02hi");
        match f {
            Frame::Amqp {
                performative: Performative::Transfer(got),
                payload,
                ..
            } => {
                assert_eq!(got, t);
                assert_eq!(payload, b"\x00\x53\x75\xa0\x02hi");
            }
            other => panic!("{other:?}"),
        }
        let d = Detach {
            handle: 1.into(),
            closed: true,
            error: Some(AmqpError::new(
                LinkError::Redirect,
                Some("moved".to_string()),
                None,
            )),
        };
        assert!(matches!(
            round_trip(Performative::Detach(d), &[]),
            Frame::Amqp { performative: Performative::Detach(Detach { error: Some(e), .. }), .. }
                if e.condition == LinkError::Redirect.into()
        ));
        let flow = Flow {
            next_incoming_id: Some(1),
            incoming_window: 10,
            next_outgoing_id: 2,
            outgoing_window: 10,
            handle: Some(4.into()),
            delivery_count: Some(0),
            link_credit: Some(10),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        };
        assert!(matches!(
            round_trip(Performative::Flow(flow), &[]),
            Frame::Amqp {
                performative: Performative::Flow(_),
                ..
            }
        ));
        let _ = Role::Receiver;
    }

    #[test]
    fn heartbeat_and_sasl() {
        let mut fb = FrameBuffer::new();
        fb.push(&encode_heartbeat());
        assert!(matches!(fb.take_frame(512), Ok(Some(Frame::Heartbeat))));
        let mechs = Sasl::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: vec![Symbol::from("MSSBCBS"), Symbol::from("ANONYMOUS")].into(),
        });
        fb.push(&SASL_HEADER);
        fb.push(&encode_sasl(&mechs));
        assert_eq!(fb.take_header(), Some(SASL_HEADER));
        match fb.take_frame(512) {
            Ok(Some(Frame::Sasl(Sasl::Mechanisms(m)))) => {
                let names: Vec<_> = m
                    .sasl_server_mechanisms
                    .0
                    .iter()
                    .map(|s| s.0.clone())
                    .collect();
                assert_eq!(names, ["MSSBCBS", "ANONYMOUS"]);
            }
            other => panic!("{other:?}"),
        }
        let outcome = Sasl::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        });
        fb.push(&encode_sasl(&outcome));
        assert!(matches!(
            fb.take_frame(512),
            Ok(Some(Frame::Sasl(Sasl::Outcome(SaslOutcome {
                code: SaslCode::Ok,
                ..
            }))))
        ));
        assert!(fb.is_empty());
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut fb = FrameBuffer::new();
        fb.push(&[0, 0, 4, 0, 2, 0, 0, 0]);
        assert!(fb.take_frame(512).is_err());
        let mut fb = FrameBuffer::new();
        fb.push(&[0, 0, 0, 8, 1, 0, 0, 0]);
        assert!(fb.take_frame(512).is_err());
    }

    #[test]
    fn value_lengths() {
        assert_eq!(value_len(&[0x40]), Some(1));
        assert_eq!(value_len(&[0x53, 7]), Some(2));
        assert_eq!(value_len(&[0x53]), None);
        assert_eq!(value_len(&[0xa1, 2, b'h', b'i', 0xff]), Some(4));
        assert_eq!(value_len(&[0xb0, 0, 0, 0, 1, 9]), Some(6));
        assert_eq!(value_len(&[0x00, 0x53, 0x10, 0x45]), Some(4));
        assert_eq!(value_len(&[0x33]), None);
    }
}
