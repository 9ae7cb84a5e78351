//! Event Hubs rules of the built-in Event Hub-compatible endpoint (reference §8), free of any
//! AMQP plumbing: the CBS token check, receiver source addresses and the start-position
//! selector filter.
//!
//! Exists so these strict, security-relevant rules are unit-tested on their own; `amqp.rs`
//! only adapts them to AMQP 1.0.
//!
//! Rules implemented here (and why):
//! - **CBS token** (`put-token`, and the SASL PLAIN password): a *policy* token
//!   `SharedAccessSignature sr=..&sig=..&se=..&skn=..` whose HMAC-SHA256 is keyed with the
//!   **UTF-8 bytes of the key string** (not its base64 decoding: Event Hubs, unlike IoT Hub,
//!   §8.2) over `<sr as received>\n<se>`. The policy must grant ServiceConnect
//!   (`iothubowner` or `service`). Expired (`now > se`, no skew, as in `sas.rs`) is refused.
//! - **Audience** (`name` of put-token): `sb://<host:port>/<entity>` (or the `amqps://`
//!   scheme), percent-decoded, compared case-insensitively, one trailing `/` ignored. A
//!   deeper audience under the entity (e.g. a partition address) is also accepted, as Event
//!   Hubs does for per-link tokens. The token's decoded `sr` must cover the entity by whole
//!   path segments (entity-level `sb://host:port/entity` or namespace-level
//!   `sb://host:port`), with the same scheme rule.
//! - **Source address**: `<entity>/ConsumerGroups/<cg>/Partitions/<n>`, optionally prefixed by
//!   `amqps://<host>/` or `sb://<host>/` (any host: clients send the namespace name they were
//!   given). Entity, the literal segments and the consumer group compare case-insensitively;
//!   `$Default` is the only consumer group.
//! - **Selector filter**: `amqp.annotation.x-opt-offset|x-opt-sequence-number|
//!   x-opt-enqueued-time` then `>` or `>=` then a single-quoted value. `'-1'` means the start
//!   and `'@latest'` the end (offset and sequence number); enqueued time is Unix ms.

use crate::sas::{self, SasError};

/// A shared access policy as the Event Hubs endpoint sees it.
#[derive(Debug, Clone)]
pub struct EhPolicy {
    /// `skn`, e.g. `iothubowner`.
    pub name: String,
    /// The key exactly as handed out (its UTF-8 bytes are the HMAC key).
    pub key_text: String,
}

/// What a CBS token must match.
#[derive(Debug, Clone)]
pub struct EhAuth {
    /// The namespace host as clients address it, `host:port` (e.g. `127.0.0.1:5671`).
    pub namespace: String,
    /// The Event Hub name (entity path).
    pub entity: String,
    /// Policies with ServiceConnect.
    pub policies: Vec<EhPolicy>,
}

/// Strips `sb://` or `amqps://` (case-insensitively) and one trailing `/`, lower-cases.
fn normalize_uri(s: &str) -> Option<String> {
    let lower = s.trim().to_ascii_lowercase();
    let rest = lower
        .strip_prefix("sb://")
        .or_else(|| lower.strip_prefix("amqps://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    Some(rest.to_string())
}

impl EhAuth {
    /// `sb://<namespace>/<entity>`, the audience clients are expected to use.
    pub fn audience(&self) -> String {
        format!("sb://{}/{}", self.namespace, self.entity)
    }

    fn entity_resource(&self) -> String {
        format!("{}/{}", self.namespace, self.entity).to_ascii_lowercase()
    }

    /// Validates a put-token request (`name` = audience, `token` = the SAS string) at Unix
    /// time `now`; returns the token's expiry (`se`) on success, or why it was refused.
    pub fn validate(&self, audience: &str, token: &str, now: u64) -> Result<u64, String> {
        let aud = normalize_uri(&sas::decode_sr_until_stable(audience)).ok_or_else(|| {
            format!(
                "audience '{audience}' must be an sb:// (or amqps://) URI, e.g. '{}'",
                self.audience()
            )
        })?;
        let entity = self.entity_resource();
        if !sas::covers(&entity, &aud) {
            return Err(format!(
                "audience '{audience}' does not name this Event Hub; expected '{}'",
                self.audience()
            ));
        }
        let t = sas::parse_token(token).map_err(|e| e.to_string())?;
        self.check_token(&t, now)
    }

    /// Checks a parsed token: policy, UTF-8-key signature, expiry and scope.
    pub fn check_token(&self, t: &sas::ParsedToken, now: u64) -> Result<u64, String> {
        let Some(skn) = &t.skn else {
            return Err(
                "the token has no skn: the Event Hub-compatible endpoint needs a shared access policy token".into(),
            );
        };
        let policy = self
            .policies
            .iter()
            .find(|p| &p.name == skn)
            .ok_or_else(|| SasError::UnknownPolicy(skn.clone()).to_string())?;
        if !t.signature_matches(policy.key_text.as_bytes()) {
            return Err(SasError::BadSignature(format!(
                "the UTF-8 bytes of the key of policy '{skn}' (Event Hubs keys are not base64-decoded)"
            ))
            .to_string());
        }
        t.check_expiry(now).map_err(|e| e.to_string())?;
        let sr = sas::decode_sr_until_stable(&t.sr_raw);
        let entity = self.entity_resource();
        match normalize_uri(&sr) {
            Some(scope) if sas::covers(&scope, &entity) => Ok(t.expiry),
            _ => Err(SasError::WrongResource {
                sr,
                target: self.audience(),
            }
            .to_string()),
        }
    }
}

/// Where a receiver starts, from the `apache.org:selector-filter:string` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// From the first retained event (no filter, or `'-1'`).
    Start,
    /// Only events enqueued after the link attached (`'@latest'`).
    Latest,
    /// Events whose offset is greater than (or, if `inclusive`, equal to) the value.
    Offset {
        /// The offset.
        value: u64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// Events whose sequence number is greater than (or equal to) the value.
    SequenceNumber {
        /// The sequence number.
        value: u64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
    /// Events enqueued after (or at) the given Unix time in milliseconds.
    EnqueuedTime {
        /// Unix milliseconds.
        value: i64,
        /// `>=` rather than `>`.
        inclusive: bool,
    },
}

impl StartPosition {
    /// Whether an event with these coordinates is at or after the start position
    /// (`Latest` is resolved by the caller into a sequence number).
    pub fn admits(&self, sequence_number: u64, offset: u64, enqueued_ms: i64) -> bool {
        fn cmp<T: PartialOrd>(v: T, bound: T, inclusive: bool) -> bool {
            if inclusive { v >= bound } else { v > bound }
        }
        match *self {
            StartPosition::Start | StartPosition::Latest => true,
            StartPosition::Offset { value, inclusive } => cmp(offset, value, inclusive),
            StartPosition::SequenceNumber { value, inclusive } => {
                cmp(sequence_number, value, inclusive)
            }
            StartPosition::EnqueuedTime { value, inclusive } => cmp(enqueued_ms, value, inclusive),
        }
    }
}

/// The filter-set key (and descriptor name) of the start-position filter.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The numeric descriptor of the selector filter, `0x0000468C:0x00000004`.
pub const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

/// Parses a selector-filter expression such as `amqp.annotation.x-opt-offset > '42'`.
pub fn parse_selector(expr: &str) -> Result<StartPosition, String> {
    let bad = |why: &str| format!("unsupported selector filter '{expr}': {why}");
    let rest = expr.trim();
    let rest = rest
        .get(..16)
        .filter(|p| p.eq_ignore_ascii_case("amqp.annotation."))
        .map(|_| &rest[16..])
        .ok_or_else(|| bad("it must start with 'amqp.annotation.'"))?;
    let name_end = rest
        .find(|c: char| c.is_whitespace() || c == '>')
        .ok_or_else(|| bad("missing operator"))?;
    let (name, rest) = rest.split_at(name_end);
    let rest = rest.trim_start();
    let (inclusive, rest) = if let Some(r) = rest.strip_prefix(">=") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix('>') {
        (false, r)
    } else {
        return Err(bad("the operator must be '>' or '>='"));
    };
    let rest = rest.trim();
    let value = rest
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .filter(|v| !v.contains('\''))
        .ok_or_else(|| bad("the value must be a single-quoted string"))?;
    let number = |v: &str| -> Result<u64, String> {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "the value must be a non-negative integer, '-1' or '@latest'",
            ));
        }
        v.parse().map_err(|_| bad("the value is out of range"))
    };
    match name.to_ascii_lowercase().as_str() {
        "x-opt-offset" | "x-opt-sequence-number" => {
            let is_offset = name.eq_ignore_ascii_case("x-opt-offset");
            match value {
                "-1" => Ok(StartPosition::Start),
                "@latest" => Ok(StartPosition::Latest),
                v => {
                    let value = number(v)?;
                    Ok(if is_offset {
                        StartPosition::Offset { value, inclusive }
                    } else {
                        StartPosition::SequenceNumber { value, inclusive }
                    })
                }
            }
        }
        "x-opt-enqueued-time" => {
            let value = i64::try_from(number(value)?).map_err(|_| bad("out of range"))?;
            Ok(StartPosition::EnqueuedTime { value, inclusive })
        }
        _ => Err(bad(
            "the annotation must be x-opt-offset, x-opt-sequence-number or x-opt-enqueued-time",
        )),
    }
}

/// Why a source address was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// Not a partition address of this Event Hub (`amqp:not-found`).
    NotFound(String),
}

impl std::fmt::Display for AddressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressError::NotFound(s) => f.write_str(s),
        }
    }
}

/// Parses a receiver source address into its partition number.
pub fn parse_partition_address(
    address: &str,
    entity: &str,
    partitions: usize,
) -> Result<usize, AddressError> {
    let nf = |why: String| AddressError::NotFound(why);
    let lower = address.to_ascii_lowercase();
    let path = if let Some(r) = lower
        .strip_prefix("amqps://")
        .or_else(|| lower.strip_prefix("sb://"))
    {
        let skip = address.len() - r.len();
        let host_end = r.find('/').ok_or_else(|| {
            nf(format!(
                "the address '{address}' names no entity after the host"
            ))
        })?;
        &address[skip + host_end + 1..]
    } else {
        address.strip_prefix('/').unwrap_or(address)
    };
    let segs: Vec<&str> = path.split('/').collect();
    let expected = format!("{entity}/ConsumerGroups/$Default/Partitions/<0..{partitions}>");
    let [e, cgs, cg, ps, n] = segs.as_slice() else {
        return Err(nf(format!(
            "The messaging entity '{address}' could not be found; expected '{expected}'"
        )));
    };
    if !e.eq_ignore_ascii_case(entity)
        || !cgs.eq_ignore_ascii_case("ConsumerGroups")
        || !ps.eq_ignore_ascii_case("Partitions")
    {
        return Err(nf(format!(
            "The messaging entity '{address}' could not be found; expected '{expected}'"
        )));
    }
    if !cg.eq_ignore_ascii_case("$Default") {
        return Err(nf(format!(
            "The consumer group '{cg}' does not exist; only '$Default' is available"
        )));
    }
    match n.parse::<usize>() {
        Ok(p) if p < partitions && n.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(nf(format!(
            "The partition '{n}' does not exist; partitions are 0..{}",
            partitions - 1
        ))),
    }
}

/// The hub name: the hostname up to the first `.` or `:`.
pub fn hub_name(hostname: &str) -> String {
    let h = hostname.trim_start_matches('[');
    h.split(['.', ':', ']']).next().unwrap_or(h).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY4: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

    fn auth(ns: &str, entity: &str) -> EhAuth {
        EhAuth {
            namespace: ns.into(),
            entity: entity.into(),
            policies: vec![EhPolicy {
                name: "iothubowner".into(),
                key_text: KEY4.into(),
            }],
        }
    }

    fn token(sr: &str, key_text: &str, se: u64, skn: &str) -> String {
        let sig = sas::sign(key_text.as_bytes(), sr, &se.to_string());
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={se}&skn={skn}",
            sas::url_encode(&sig)
        )
    }

    #[test]
    fn reference_vector_uses_utf8_key_bytes() {
        let sr = "sb%3A%2F%2Fns.servicebus.windows.net%2Fmyhub";
        let sig = sas::sign(KEY4.as_bytes(), sr, "1700000000");
        assert_eq!(sig, "wwM+airucGhZOV1NA2rZQM0FYOJe4AV6iUAIenXgroc=");
        let a = auth("ns.servicebus.windows.net", "myhub");
        let t = format!(
            "SharedAccessSignature sr={sr}&sig={}&se=1700000000&skn=iothubowner",
            sas::url_encode(&sig)
        );
        assert_eq!(
            a.validate("sb://ns.servicebus.windows.net/myhub", &t, 1_699_999_999),
            Ok(1_700_000_000)
        );
        // Expired one second later.
        let e = a
            .validate("sb://ns.servicebus.windows.net/myhub", &t, 1_700_000_001)
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        // The same token signed with the base64-DECODED key (IoT Hub style) is refused.
        let decoded = sas::decode_key(KEY4).unwrap();
        let wrong = sas::sign(&decoded, sr, "1700000000");
        let t = format!(
            "SharedAccessSignature sr={sr}&sig={}&se=1700000000&skn=iothubowner",
            sas::url_encode(&wrong)
        );
        let e = a
            .validate("sb://ns.servicebus.windows.net/myhub", &t, 1_699_999_999)
            .unwrap_err();
        assert!(e.contains("bad signature"), "{e}");
    }

    #[test]
    fn audience_scope_policy_rules() {
        let a = auth("127.0.0.1:5671", "myhub");
        let later = crate::timefmt::now_unix() + 600;
        let now = crate::timefmt::now_unix();
        let good_sr = sas::url_encode("sb://127.0.0.1:5671/myhub");
        let t = token(&good_sr, KEY4, later, "iothubowner");
        for aud in [
            "sb://127.0.0.1:5671/myhub",
            "SB://127.0.0.1:5671/MyHub/",
            "amqps://127.0.0.1:5671/myhub",
            "sb%3A%2F%2F127.0.0.1%3A5671%2Fmyhub",
            "sb://127.0.0.1:5671/myhub/ConsumerGroups/$Default/Partitions/0",
        ] {
            assert_eq!(a.validate(aud, &t, now), Ok(later), "{aud}");
        }
        for aud in [
            "sb://127.0.0.1:5671/other",
            "sb://127.0.0.1:9999/myhub",
            "sb://127.0.0.1:5671/myhubx",
            "https://127.0.0.1:5671/myhub",
            "127.0.0.1:5671/myhub",
            "sb://127.0.0.1:5671",
        ] {
            assert!(a.validate(aud, &t, now).is_err(), "{aud}");
        }
        // Namespace-level sr covers the entity; a different entity does not.
        let ns = token("sb%3A%2F%2F127.0.0.1%3A5671%2F", KEY4, later, "iothubowner");
        assert!(a.validate("sb://127.0.0.1:5671/myhub", &ns, now).is_ok());
        let other = token(
            &sas::url_encode("sb://127.0.0.1:5671/other"),
            KEY4,
            later,
            "iothubowner",
        );
        assert!(
            a.validate("sb://127.0.0.1:5671/myhub", &other, now)
                .unwrap_err()
                .contains("wrong resource")
        );
        // Unknown policy, missing skn, wrong key.
        let t = token(&good_sr, KEY4, later, "registryRead");
        assert!(
            a.validate("sb://127.0.0.1:5671/myhub", &t, now)
                .unwrap_err()
                .contains("unknown policy")
        );
        let sig = sas::sign(KEY4.as_bytes(), &good_sr, &later.to_string());
        let t = format!(
            "SharedAccessSignature sr={good_sr}&sig={}&se={later}",
            sas::url_encode(&sig)
        );
        assert!(
            a.validate("sb://127.0.0.1:5671/myhub", &t, now)
                .unwrap_err()
                .contains("no skn")
        );
        let t = token(&good_sr, "not-the-key", later, "iothubowner");
        assert!(
            a.validate("sb://127.0.0.1:5671/myhub", &t, now)
                .unwrap_err()
                .contains("bad signature")
        );
        assert!(
            a.validate("sb://127.0.0.1:5671/myhub", "garbage", now)
                .is_err()
        );
    }

    #[test]
    fn selector_filters() {
        use StartPosition::*;
        let cases = [
            ("amqp.annotation.x-opt-offset > '-1'", Start),
            ("amqp.annotation.x-opt-offset > '@latest'", Latest),
            (
                "amqp.annotation.x-opt-offset > '42'",
                Offset {
                    value: 42,
                    inclusive: false,
                },
            ),
            (
                "amqp.annotation.x-opt-offset >= '0'",
                Offset {
                    value: 0,
                    inclusive: true,
                },
            ),
            (
                "  amqp.annotation.x-opt-sequence-number>='7' ",
                SequenceNumber {
                    value: 7,
                    inclusive: true,
                },
            ),
            (
                "amqp.annotation.x-opt-sequence-number > '3'",
                SequenceNumber {
                    value: 3,
                    inclusive: false,
                },
            ),
            (
                "amqp.annotation.x-opt-enqueued-time > '1700000000000'",
                EnqueuedTime {
                    value: 1_700_000_000_000,
                    inclusive: false,
                },
            ),
            (
                "amqp.annotation.x-opt-enqueued-time >= '5'",
                EnqueuedTime {
                    value: 5,
                    inclusive: true,
                },
            ),
        ];
        for (expr, want) in cases {
            assert_eq!(parse_selector(expr), Ok(want), "{expr}");
        }
        for bad in [
            "",
            "amqp.annotation.x-opt-offset = '1'",
            "amqp.annotation.x-opt-offset < '1'",
            "amqp.annotation.x-opt-offset > 1",
            "amqp.annotation.x-opt-offset > '1",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-offset > '-2'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-enqueued-time > '@latest'",
            "amqp.annotation.x-opt-offset > '99999999999999999999999'",
            "amqp.annotation.x-opt-offset > '1' OR 1=1",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
        let p = parse_selector("amqp.annotation.x-opt-offset > '10'").unwrap();
        assert!(!p.admits(0, 10, 0) && p.admits(1, 11, 0));
        let p = parse_selector("amqp.annotation.x-opt-sequence-number >= '2'").unwrap();
        assert!(!p.admits(1, 0, 0) && p.admits(2, 0, 0));
    }

    #[test]
    fn partition_addresses() {
        let ok = [
            ("myhub/ConsumerGroups/$Default/Partitions/0", 0),
            ("MyHub/consumergroups/$default/partitions/3", 3),
            (
                "amqps://127.0.0.1:5671/myhub/ConsumerGroups/$Default/Partitions/2",
                2,
            ),
            (
                "sb://ns.example/myhub/ConsumerGroups/$Default/Partitions/1",
                1,
            ),
            ("/myhub/ConsumerGroups/$Default/Partitions/1", 1),
        ];
        for (a, p) in ok {
            assert_eq!(parse_partition_address(a, "myhub", 4), Ok(p), "{a}");
        }
        for a in [
            "myhub/ConsumerGroups/$Default/Partitions/4",
            "myhub/ConsumerGroups/$Default/Partitions/-1",
            "myhub/ConsumerGroups/$Default/Partitions/+1",
            "myhub/ConsumerGroups/$Default/Partitions/",
            "myhub/ConsumerGroups/other/Partitions/0",
            "other/ConsumerGroups/$Default/Partitions/0",
            "myhub/ConsumerGroups/$Default/Partitions/0/x",
            "myhub",
            "amqps://host",
            "",
            "$cbs",
        ] {
            assert!(parse_partition_address(a, "myhub", 4).is_err(), "{a}");
        }
    }

    #[test]
    fn hub_names() {
        assert_eq!(hub_name("myhub.azure-devices.net"), "myhub");
        assert_eq!(hub_name("127.0.0.1:8080"), "127");
        assert_eq!(hub_name("localhost:1"), "localhost");
    }
}
