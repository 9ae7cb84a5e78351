//! Shared Access Signature tokens, exactly as IoT Hub parses and checks them (reference §1).
//!
//! Rules implemented here (and why):
//! - The HMAC-SHA256 key is the **base64-decoded** key (§1.2).
//! - The string to sign is `<sr exactly as received>\n<se>`: `sr` is never re-encoded or
//!   decoded before the signature check, so upper- and lower-case percent escapes sign
//!   differently, as they do on Azure (§1.2, §1.5 vector 5).
//! - Only `sig`, `se` and `skn` are URL-decoded (form decoding, `+` becomes a space, as
//!   .NET's `WebUtility.UrlDecode` does; a client that leaves a `+` of its base64 signature
//!   unescaped therefore fails here as it would on Azure).
//! - An empty `skn` is treated as absent (the C SDK always appends `&skn=`, §1.1).
//! - Expiry: **no clock-skew grace**. A token is accepted while `now <= se` and rejected once
//!   `now > se`. The C# SDK adds 5 minutes of skew, but §1.1 marks the service-side skew as
//!   UNCONFIRMED, so the emulator takes the strict reading: a client that only works thanks to
//!   the skew fails here.
//! - Scope: `sr` is URL-decoded repeatedly until it stops changing (clients encode device ids
//!   once, twice or not at all, §1.2), one trailing `/` is dropped, and it is then compared
//!   case-insensitively, by whole path segments, as a prefix of the resource being accessed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Lenient base64 used only to decode *keys* (padding optional, trailing bits allowed), so the
/// Node test vector key `key` (not valid padded base64) decodes to the same two bytes as in
/// Node and Python (§1.5 vector 1).
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes a base64 SAS key into the HMAC key bytes; exists because every signature in IoT Hub
/// is keyed with the decoded bytes, never the key text.
pub fn decode_key(key: &str) -> Result<Vec<u8>, SasError> {
    LENIENT_B64
        .decode(key.trim())
        .map_err(|_| SasError::Malformed("the key is not valid base64".into()))
}

/// Computes `base64(HMAC-SHA256(key_bytes, sr + "\n" + se))`; the one signing primitive shared by
/// the validator, the token generator and the tests.
pub fn sign(key_bytes: &[u8], sr: &str, se: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key_bytes).expect("HMAC accepts keys of any length");
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(se.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Percent-encodes everything except RFC 3986 unreserved characters (upper-case hex); used for
/// `sig`, `skn` and URL path segments, because that is what the Azure SDKs send.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes only (a `+` stays a `+`); used for `sr` and URL path segments, where a
/// `+` is a legal device-id character. Returns `None` on a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    percent_decode_impl(s, false)
}

/// Form-decodes (`%XX` and `+` as space); used for `sig`, `se` and `skn` and query strings,
/// matching .NET's `WebUtility.UrlDecode` on the service.
pub fn form_decode(s: &str) -> Option<String> {
    percent_decode_impl(s, true)
}

fn percent_decode_impl(s: &str, plus_as_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes `sr` until it stops changing (at most 8 rounds); exists because SDKs encode the
/// device id zero, one or two times (§1.2). A malformed escape stops decoding at the last
/// well-formed value.
pub fn decode_sr_until_stable(sr: &str) -> String {
    let mut cur = sr.to_string();
    for _ in 0..8 {
        match percent_decode(&cur) {
            Some(next) if next != cur => cur = next,
            _ => break,
        }
    }
    cur
}

/// A token split into its fields, keeping `sr` raw; exists so validation can sign over the raw
/// `sr` while comparing the decoded one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// `sr` exactly as received (still percent-encoded).
    pub sr_raw: String,
    /// The decoded base64 signature text.
    pub sig: String,
    /// The decoded expiry, as text (it is part of the string to sign).
    pub se: String,
    /// The expiry as Unix seconds.
    pub expiry: u64,
    /// The policy name; `None` for device tokens (absent or empty `skn`).
    pub skn: Option<String>,
}

/// Why a token was refused; each variant's text names the failed check, because the 401 body
/// must say which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The header is not a well-formed `SharedAccessSignature` token.
    #[error("malformed SharedAccessSignature: {0}")]
    Malformed(String),
    /// The HMAC does not match.
    #[error("bad signature: the HMAC-SHA256 over sr and se does not match {0}")]
    BadSignature(String),
    /// `se` is in the past.
    #[error("token expired: se={se} is before the current time {now}")]
    Expired {
        /// The token's expiry.
        se: u64,
        /// The server's current Unix time.
        now: u64,
    },
    /// `sr` does not cover the resource.
    #[error("wrong resource: sr '{sr}' does not cover '{target}'")]
    WrongResource {
        /// The decoded `sr`.
        sr: String,
        /// The resource accessed.
        target: String,
    },
    /// `skn` names no policy of this hub.
    #[error("unknown policy: '{0}' is not a shared access policy of this hub")]
    UnknownPolicy(String),
    /// The policy exists but lacks the permission this call needs.
    #[error("insufficient rights: policy '{policy}' lacks {permission}")]
    MissingPermission {
        /// The policy used.
        policy: String,
        /// The permission required.
        permission: &'static str,
    },
    /// A device token was used where only a policy token is accepted, or the device is unknown
    /// or disabled.
    #[error("{0}")]
    DeviceNotAllowed(String),
}

const PREFIX: &str = "SharedAccessSignature ";

/// Parses an `Authorization` header value into its fields; exists to reject malformed tokens
/// (missing, duplicated or unknown fields, non-numeric `se`) before any key lookup.
pub fn parse_token(header: &str) -> Result<ParsedToken, SasError> {
    let rest = header.strip_prefix(PREFIX).ok_or_else(|| {
        SasError::Malformed("the value must start with 'SharedAccessSignature '".into())
    })?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for part in rest.trim().split('&') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| SasError::Malformed(format!("field '{part}' has no '='")))?;
        let slot = match name {
            "sr" => &mut sr,
            "sig" => &mut sig,
            "se" => &mut se,
            "skn" => &mut skn,
            other => return Err(SasError::Malformed(format!("unknown field '{other}'"))),
        };
        if slot.is_some() {
            return Err(SasError::Malformed(format!("field '{name}' appears twice")));
        }
        *slot = Some(value.to_string());
    }
    let sr_raw = sr.ok_or_else(|| SasError::Malformed("missing 'sr'".into()))?;
    if sr_raw.is_empty() {
        return Err(SasError::Malformed("empty 'sr'".into()));
    }
    let sig = sig.ok_or_else(|| SasError::Malformed("missing 'sig'".into()))?;
    let sig = form_decode(&sig)
        .ok_or_else(|| SasError::Malformed("'sig' is not URL-encoded correctly".into()))?;
    let se = se.ok_or_else(|| SasError::Malformed("missing 'se'".into()))?;
    let se = form_decode(&se)
        .ok_or_else(|| SasError::Malformed("'se' is not URL-encoded correctly".into()))?;
    if se.is_empty() || !se.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SasError::Malformed(format!(
            "'se' must be decimal Unix seconds, got '{se}'"
        )));
    }
    let expiry: u64 = se
        .parse()
        .map_err(|_| SasError::Malformed(format!("'se' out of range: '{se}'")))?;
    let skn = match skn {
        None => None,
        Some(v) => {
            let v = form_decode(&v)
                .ok_or_else(|| SasError::Malformed("'skn' is not URL-encoded correctly".into()))?;
            if v.is_empty() { None } else { Some(v) }
        }
    };
    Ok(ParsedToken {
        sr_raw,
        sig,
        se,
        expiry,
        skn,
    })
}

impl ParsedToken {
    /// Checks the signature with one candidate key (constant-time compare); exists separately
    /// so device tokens can be tried against the primary and then the secondary key.
    pub fn signature_matches(&self, key_bytes: &[u8]) -> bool {
        let Ok(given) = STANDARD.decode(self.sig.as_bytes()) else {
            return false;
        };
        let mut mac =
            HmacSha256::new_from_slice(key_bytes).expect("HMAC accepts keys of any length");
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.se.as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    /// Rejects a token whose `se` has passed (no skew; see the module doc).
    pub fn check_expiry(&self, now_unix: u64) -> Result<(), SasError> {
        if now_unix > self.expiry {
            Err(SasError::Expired {
                se: self.expiry,
                now: now_unix,
            })
        } else {
            Ok(())
        }
    }

    /// The fully decoded `sr`, minus one trailing slash; what scope checks compare.
    pub fn decoded_sr(&self) -> String {
        let d = decode_sr_until_stable(&self.sr_raw);
        d.strip_suffix('/').map(str::to_string).unwrap_or(d)
    }
}

/// True when `scope` equals `target` or is a prefix of it that ends at a `/` boundary,
/// compared ASCII-case-insensitively; the docs' "prefix by whole path segment" rule.
pub fn covers(scope: &str, target: &str) -> bool {
    let s: Vec<&str> = scope.split('/').collect();
    let t: Vec<&str> = target.split('/').collect();
    s.len() <= t.len() && s.iter().zip(&t).all(|(a, b)| a.eq_ignore_ascii_case(b))
}

/// Checks that a token's `sr` covers `target`; returns the wrong-resource error otherwise.
pub fn check_scope(token: &ParsedToken, target: &str) -> Result<(), SasError> {
    let sr = token.decoded_sr();
    if covers(&sr, target) {
        Ok(())
    } else {
        Err(SasError::WrongResource {
            sr,
            target: target.to_string(),
        })
    }
}

/// Builds a token string the way the C and Java device SDKs do; exists for the device simulator
/// and for tests. `sr` is used verbatim (callers choose its encoding); `sig` and `skn` are
/// URL-encoded.
pub fn generate_token(
    sr: &str,
    key_b64: &str,
    expiry: u64,
    skn: Option<&str>,
) -> Result<String, SasError> {
    let key = decode_key(key_b64)?;
    let se = expiry.to_string();
    let sig = sign(&key, sr, &se);
    let mut t = format!("{PREFIX}sr={sr}&sig={}&se={se}", url_encode(&sig));
    if let Some(skn) = skn {
        t.push_str("&skn=");
        t.push_str(&url_encode(skn));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY4: &str = "NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=";

    #[test]
    fn vector1_node_service_token() {
        let t = generate_token("host", "key", 12345, Some("policy")).unwrap();
        let p = parse_token(&t).unwrap();
        assert_eq!(p.sig, "88JmrIsVYOGmRSjCO1x1LLbv0K001Gikh1rjfJqbQXA=");
        assert_eq!(decode_key("key").unwrap(), vec![0x91, 0xEC]);
        // The exact string from the Node test, fields in Node's order.
        let node = "SharedAccessSignature sr=host&sig=88JmrIsVYOGmRSjCO1x1LLbv0K001Gikh1rjfJqbQXA%3D&skn=policy&se=12345";
        let p = parse_token(node).unwrap();
        assert!(p.signature_matches(&[0x91, 0xEC]));
        assert_eq!(p.skn.as_deref(), Some("policy"));
    }

    #[test]
    fn vectors_2_3_4() {
        let k = decode_key("cGFzc3dvcmQ=").unwrap();
        assert_eq!(k, b"password");
        assert_eq!(
            sign(&k, "uri", "12345"),
            "kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk="
        );
        let mut mac = HmacSha256::new_from_slice(&k).unwrap();
        mac.update(b"string-to-sign");
        assert_eq!(
            STANDARD.encode(mac.finalize().into_bytes()),
            "o1n1hiIVgzVA2+krq9ty1Z4xsIJKJZP3dYT8MOi65Y4="
        );
        let k4 = decode_key(KEY4).unwrap();
        assert_eq!(k4.len(), 32);
        let mut mac = HmacSha256::new_from_slice(&k4).unwrap();
        mac.update(b"sign this message");
        assert_eq!(
            STANDARD.encode(mac.finalize().into_bytes()),
            "8NJRMT83CcplGrAGaUVIUM/md5914KpWVNngSVoF9/M="
        );
    }

    #[test]
    fn vector5_service_token_accepted_and_rejected() {
        let t = "SharedAccessSignature sr=myhub.azure-devices.net&sig=yolbXGrIiPqRxDLICmk8WAsg9fmQTukPby8F%2BWY0lDc%3D&se=1700000000&skn=iothubowner";
        let p = parse_token(t).unwrap();
        let key = decode_key(KEY4).unwrap();
        assert!(p.signature_matches(&key));
        assert!(p.check_expiry(1_699_999_999).is_ok());
        assert!(p.check_expiry(1_700_000_000).is_ok());
        assert!(matches!(
            p.check_expiry(1_700_000_001),
            Err(SasError::Expired { .. })
        ));
        assert!(check_scope(&p, "myhub.azure-devices.net").is_ok());
        assert!(check_scope(&p, "MyHub.Azure-Devices.NET").is_ok());
        assert!(check_scope(&p, "otherhub.azure-devices.net").is_err());
        // Wrong key.
        let wrong = decode_key("cGFzc3dvcmQ=").unwrap();
        assert!(!p.signature_matches(&wrong));
        // Unescaped '+' in sig is form-decoded to a space, so it fails like on Azure.
        let plus = t.replace("%2B", "+");
        assert!(!parse_token(&plus).unwrap().signature_matches(&key));
    }

    #[test]
    fn vector5_device_tokens_upper_and_lower_escapes() {
        let key = decode_key(KEY4).unwrap();
        let upper = format!(
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig={}&se=1700000000",
            url_encode("xxFazdzKNS9wvaxRGX8gNP6uSbxRC4AMrg46E1HgHsI=")
        );
        let lower = format!(
            "SharedAccessSignature sr=myhub.azure-devices.net%2fdevices%2fdev1&sig={}&se=1700000000&skn=",
            url_encode("WJsF6UXKPItCcverTdw7qecRA3fbtF458RNp+kN6CrE=")
        );
        for t in [&upper, &lower] {
            let p = parse_token(t).unwrap();
            assert_eq!(p.skn, None, "empty skn means a device token");
            assert!(p.signature_matches(&key), "{t}");
            assert!(check_scope(&p, "myhub.azure-devices.net/devices/dev1").is_ok());
            assert!(
                check_scope(&p, "myhub.azure-devices.net/devices/dev1/messages/events").is_ok()
            );
            assert!(matches!(
                check_scope(&p, "myhub.azure-devices.net/devices/dev2"),
                Err(SasError::WrongResource { .. })
            ));
            assert!(check_scope(&p, "myhub.azure-devices.net/devices/dev10").is_err());
        }
        // Swapping the signatures must fail: the raw sr is what is signed.
        let swapped = upper.replace("%2F", "%2f");
        assert!(!parse_token(&swapped).unwrap().signature_matches(&key));
    }

    #[test]
    fn double_encoded_ids_decode_until_stable() {
        let t = "SharedAccessSignature sr=h%252Fdevices%252Fmy%253Aapp&sig=x&se=1";
        assert_eq!(parse_token(t).unwrap().decoded_sr(), "h/devices/my:app");
    }

    #[test]
    fn malformed_tokens() {
        for t in [
            "Bearer x",
            "SharedAccessSignature sig=a&se=1",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=b",
            "SharedAccessSignature sr=a&sig=b&se=soon",
            "SharedAccessSignature sr=a&sig=b&se=1&se=2",
            "SharedAccessSignature sr=a&sig=b&se=1&foo=bar",
            "SharedAccessSignature sr=a&sig=b&se=1&junk",
        ] {
            assert!(matches!(parse_token(t), Err(SasError::Malformed(_))), "{t}");
        }
    }

    #[test]
    fn covers_is_segment_based() {
        assert!(covers("h", "h"));
        assert!(covers("h/devices/a", "h/devices/a/messages"));
        assert!(!covers("h/devices/a", "h/devices/ab"));
        assert!(!covers("h/devices/a/x", "h/devices/a"));
    }
}
