//! Claims-based security (CBS): authorizing an AMQP connection by sending a
//! SAS token to the `$cbs` node.
//!
//! Event Hubs tokens differ from IoT Hub ones in one way that matters: the
//! HMAC key is the UTF-8 bytes of the key *string*, not its base64
//! decoding. The audience (and `sr`) is `sb://<host[:port]>/<entity>`,
//! encoded like Python's `quote_plus`.

use crate::sas;
use fe2o3_amqp_types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp_types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Value};

/// The CBS node.
pub const CBS_NODE: &str = "$cbs";
/// The reply-to address of CBS requests (the CBS receiver's target).
pub const CBS_REPLY_TO: &str = "cbs";
/// The token type for SAS tokens.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// The Event Hubs SAS token for `audience`, signed with the UTF-8 bytes of
/// `key`.
pub fn eventhub_token(audience: &str, policy: &str, key: &str, expiry: u64) -> String {
    let sr = sas::url_encode(audience);
    let sig = sas::signature(key.as_bytes(), &sr, expiry);
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        sas::url_encode(&sig),
        sas::url_encode(policy)
    )
}

/// Encodes a put-token request.
pub fn put_token_request(message_id: &str, audience: &str, token: &str) -> Vec<u8> {
    let mut props = OrderedMap::new();
    props.insert(
        "operation".to_string(),
        SimpleValue::String("put-token".into()),
    );
    props.insert(
        "type".to_string(),
        SimpleValue::String(SAS_TOKEN_TYPE.into()),
    );
    props.insert("name".to_string(), SimpleValue::String(audience.into()));
    let message = Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(
            Properties::builder()
                .message_id(MessageId::String(message_id.to_string()))
                .to(CBS_NODE)
                .reply_to(CBS_REPLY_TO)
                .build(),
        ),
        application_properties: Some(ApplicationProperties(props)),
        body: AmqpValue(token.to_string()),
        footer: None,
    };
    serde_amqp::to_vec(&Serializable(message)).unwrap_or_default()
}

/// Decodes a message's sections (any body).
pub fn decode_message(payload: &[u8]) -> Result<Message<Body<Value>>, String> {
    serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(payload)
        .map(|d| d.0)
        .map_err(|e| format!("the message does not decode ({e})"))
}

/// What a CBS response said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbsResponse {
    /// The request's message-id, echoed as correlation-id.
    pub correlation_id: Option<String>,
    /// `status-code`.
    pub status: Option<i64>,
    /// `status-description`.
    pub description: String,
}

impl CbsResponse {
    /// Whether the token was accepted (2xx).
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

fn simple_int(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Int(n) => Some(i64::from(*n)),
        SimpleValue::Long(n) => Some(*n),
        SimpleValue::Uint(n) => Some(i64::from(*n)),
        SimpleValue::Ulong(n) => i64::try_from(*n).ok(),
        SimpleValue::Short(n) => Some(i64::from(*n)),
        SimpleValue::Ushort(n) => Some(i64::from(*n)),
        SimpleValue::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a CBS response message.
pub fn parse_response(payload: &[u8]) -> Result<CbsResponse, String> {
    let m = decode_message(payload)?;
    let correlation_id = m
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.as_ref())
        .map(|id| match id {
            MessageId::String(s) => s.clone(),
            MessageId::Ulong(n) => n.to_string(),
            other => format!("{other:?}"),
        });
    let props = m.application_properties.as_ref();
    let get = |k: &str| props.and_then(|p| p.0.get(k));
    let status = get("status-code")
        .or_else(|| get("statusCode"))
        .and_then(simple_int);
    let description = match get("status-description").or_else(|| get("statusDescription")) {
        Some(SimpleValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    Ok(CbsResponse {
        correlation_id,
        status,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_vector_from_the_reference() {
        let audience = "sb://ns.servicebus.windows.net/myhub";
        assert_eq!(
            sas::url_encode(audience),
            "sb%3A%2F%2Fns.servicebus.windows.net%2Fmyhub"
        );
        let key = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";
        assert_eq!(
            sas::signature(
                key.as_bytes(),
                "sb%3A%2F%2Fns.servicebus.windows.net%2Fmyhub",
                1_700_000_000
            ),
            "wwM+airucGhZOV1NA2rZQM0FYOJe4AV6iUAIenXgroc="
        );
        assert_eq!(
            eventhub_token(audience, "iothubowner", key, 1_700_000_000),
            "SharedAccessSignature sr=sb%3A%2F%2Fns.servicebus.windows.net%2Fmyhub&sig=wwM%2BairucGhZOV1NA2rZQM0FYOJe4AV6iUAIenXgroc%3D&se=1700000000&skn=iothubowner"
        );
    }

    #[test]
    fn put_token_request_shape() {
        let bytes = put_token_request("cbs-1", "sb://h/e", "TOKEN");
        let m = decode_message(&bytes).expect("decodes");
        let p = m.properties.expect("properties");
        assert_eq!(p.message_id, Some(MessageId::String("cbs-1".into())));
        assert_eq!(p.reply_to.as_deref(), Some("cbs"));
        assert_eq!(p.to.as_deref(), Some("$cbs"));
        let ap = m.application_properties.expect("app props").0;
        assert_eq!(
            ap.get("operation"),
            Some(&SimpleValue::String("put-token".into()))
        );
        assert_eq!(
            ap.get("type"),
            Some(&SimpleValue::String(SAS_TOKEN_TYPE.into()))
        );
        assert_eq!(
            ap.get("name"),
            Some(&SimpleValue::String("sb://h/e".into()))
        );
        assert_eq!(
            m.body,
            Body::Value(AmqpValue(Value::String("TOKEN".into())))
        );
    }

    #[test]
    fn responses() {
        let mut props = OrderedMap::new();
        props.insert("status-code".to_string(), SimpleValue::Int(202));
        props.insert(
            "status-description".to_string(),
            SimpleValue::String("Accepted".into()),
        );
        let m = Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(
                Properties::builder()
                    .correlation_id(MessageId::String("cbs-1".into()))
                    .build(),
            ),
            application_properties: Some(ApplicationProperties(props)),
            body: AmqpValue(Value::Null),
            footer: None,
        };
        let r = parse_response(&serde_amqp::to_vec(&Serializable(m)).unwrap()).expect("parses");
        assert!(r.ok());
        assert_eq!(r.correlation_id.as_deref(), Some("cbs-1"));
        assert_eq!(r.description, "Accepted");
    }
}
