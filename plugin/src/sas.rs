//! Shared access signature (SAS) tokens for the IoT Hub service API.
//!
//! A token is `SharedAccessSignature sr=<enc(resource)>&sig=<enc(b64(hmac))>
//! &se=<expiry>&skn=<policy>`, where the HMAC-SHA256 is keyed with the
//! base64-decoded policy key and covers `<sr as sent>\n<se>`. The hub checks
//! the signature over the `sr` string exactly as sent, so the string that is
//! signed and the string that is sent must be the same bytes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How long a service token lives. The service SDKs use one hour.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;

/// Tokens are renewed this long before they expire, so a token never expires
/// in flight and clock skew up to this much is tolerated.
pub const RENEW_BEFORE_SECS: u64 = 300;

/// Decodes keys the way the SDKs do: padding optional and stray trailing bits
/// ignored (Node and Python both accept `key` as the two bytes `91 EC`).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Decodes a base64 access key into the HMAC key bytes.
///
/// Exists so that configuration can reject a bad key up front, with a clear
/// message, instead of every request failing with 401.
pub fn decode_key(key: &str) -> Result<Vec<u8>, String> {
    let bytes = LENIENT
        .decode(key.trim())
        .map_err(|e| format!("not valid base64 ({e})"))?;
    if bytes.is_empty() {
        return Err("empty".into());
    }
    Ok(bytes)
}

/// Percent-encodes everything except RFC 3986 unreserved characters, with
/// upper-case hex (what the C#, Java and Python service SDKs send).
///
/// Used for `sr`, `sig` and device IDs in URL paths.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
    out
}

fn hex_digit(n: u8) -> char {
    match n {
        0..=9 => (b'0' + n) as char,
        _ => (b'A' + n - 10) as char,
    }
}

/// HMAC-SHA256 of `data` keyed with `key`, base64-encoded (standard alphabet,
/// padded). The primitive every SAS signature is built from.
pub fn hmac_base64(key: &[u8], data: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable_hmac(),
    };
    mac.update(data.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

#[cold]
fn unreachable_hmac() -> ! {
    // `Hmac::new_from_slice` only fails for fixed-size-key MACs.
    panic!("HMAC-SHA256 rejected a key; HMAC accepts any key length")
}

/// The base64 signature over an already-encoded `sr` and an expiry.
pub fn signature(key: &[u8], encoded_sr: &str, expiry: u64) -> String {
    hmac_base64(key, &format!("{encoded_sr}\n{expiry}"))
}

/// A complete service token for `host`, signed with a hub policy key.
///
/// `sr` is the URL-encoded, lower-cased host name, as the docs define it.
pub fn service_token(host: &str, policy: &str, key: &[u8], expiry: u64) -> String {
    let sr = url_encode(&host.to_ascii_lowercase());
    let sig = signature(key, &sr, expiry);
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={}",
        url_encode(&sig),
        url_encode(policy)
    )
}

/// A token reused across calls in one instance until shortly before it
/// expires, so the broker does not sign every request.
#[derive(Default)]
pub struct TokenCache {
    cached: Option<Cached>,
}

struct Cached {
    host: String,
    policy: String,
    key: Vec<u8>,
    expiry: u64,
    token: String,
}

impl TokenCache {
    /// A cache with no token yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token for these credentials at `now` (Unix seconds), minting a new
    /// one if there is none, the credentials changed, or it expires within
    /// [`RENEW_BEFORE_SECS`].
    pub fn token(&mut self, host: &str, policy: &str, key: &[u8], now: u64) -> &str {
        let fresh = self.cached.as_ref().is_some_and(|c| {
            c.host == host
                && c.policy == policy
                && c.key == key
                && now.saturating_add(RENEW_BEFORE_SECS) < c.expiry
        });
        if !fresh {
            let expiry = now + TOKEN_LIFETIME_SECS;
            self.cached = Some(Cached {
                host: host.to_string(),
                policy: policy.to_string(),
                key: key.to_vec(),
                expiry,
                token: service_token(host, policy, key, expiry),
            });
        }
        match &self.cached {
            Some(c) => &c.token,
            None => "",
        }
    }

    /// Drops the cached token, e.g. after the hub answered 401 with it.
    pub fn invalidate(&mut self) {
        self.cached = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b64: &str) -> Vec<u8> {
        decode_key(b64).expect("test key decodes")
    }

    /// Splits a token into its fields so tests do not depend on field order.
    fn fields(token: &str) -> Vec<(String, String)> {
        let body = token
            .strip_prefix("SharedAccessSignature ")
            .expect("token prefix");
        let mut f: Vec<(String, String)> = body
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("field has =");
                (k.to_string(), v.to_string())
            })
            .collect();
        f.sort();
        f
    }

    #[test]
    fn vector_1_node_service_token_with_lenient_key() {
        // 'key' is not padded base64; Node and Python decode it to 91 EC.
        assert_eq!(key("key"), vec![0x91, 0xEC]);
        let token = service_token("host", "policy", &key("key"), 12345);
        let expected = "SharedAccessSignature sr=host&sig=88JmrIsVYOGmRSjCO1x1LLbv0K001Gikh1rjfJqbQXA%3D&skn=policy&se=12345";
        assert_eq!(fields(&token), fields(expected));
    }

    #[test]
    fn vector_2_node_common_signature() {
        let sig = signature(&key("cGFzc3dvcmQ="), "uri", 12345);
        assert_eq!(
            url_encode(&sig),
            "kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D"
        );
    }

    #[test]
    fn vector_3_node_hmac_hash() {
        assert_eq!(
            hmac_base64(&key("cGFzc3dvcmQ="), "string-to-sign"),
            "o1n1hiIVgzVA2+krq9ty1Z4xsIJKJZP3dYT8MOi65Y4="
        );
    }

    #[test]
    fn vector_4_python_signing_mechanism() {
        let k = key("NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=");
        assert_eq!(k.len(), 32);
        assert_eq!(
            hmac_base64(&k, "sign this message"),
            "8NJRMT83CcplGrAGaUVIUM/md5914KpWVNngSVoF9/M="
        );
    }

    #[test]
    fn vector_5_service_token_exact() {
        let k = key("NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=");
        assert_eq!(
            service_token("myhub.azure-devices.net", "iothubowner", &k, 1_700_000_000),
            "SharedAccessSignature sr=myhub.azure-devices.net&sig=yolbXGrIiPqRxDLICmk8WAsg9fmQTukPby8F%2BWY0lDc%3D&se=1700000000&skn=iothubowner"
        );
    }

    #[test]
    fn vector_5_device_tokens_sign_raw_sr() {
        let k = key("NMgJDvdKTxjLi+xBxxkDDEwDJxEvOE5u8BiT0mVgPeg=");
        assert_eq!(
            signature(
                &k,
                "myhub.azure-devices.net%2Fdevices%2Fdev1",
                1_700_000_000
            ),
            "xxFazdzKNS9wvaxRGX8gNP6uSbxRC4AMrg46E1HgHsI="
        );
        assert_eq!(
            signature(
                &k,
                "myhub.azure-devices.net%2fdevices%2fdev1",
                1_700_000_000
            ),
            "WJsF6UXKPItCcverTdw7qecRA3fbtF458RNp+kN6CrE="
        );
        // Our encoder produces the upper-case form.
        assert_eq!(
            url_encode("myhub.azure-devices.net/devices/dev1"),
            "myhub.azure-devices.net%2Fdevices%2Fdev1"
        );
    }

    #[test]
    fn sr_is_lowercased_and_encoded() {
        let k = key("cGFzc3dvcmQ=");
        let token = service_token("MyHub.Azure-Devices.NET", "p", &k, 1);
        assert!(token.starts_with("SharedAccessSignature sr=myhub.azure-devices.net&"));
        let token = service_token("127.0.0.1:41234", "p", &k, 1);
        assert!(token.contains("sr=127.0.0.1%3A41234&"));
    }

    #[test]
    fn url_encode_device_ids() {
        assert_eq!(url_encode("myapp:123"), "myapp%3A123");
        assert_eq!(url_encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(url_encode("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert!(decode_key("").is_err());
        assert!(decode_key("not base64!").is_err());
        assert!(decode_key("  cGFzc3dvcmQ=  ").is_ok());
    }

    #[test]
    fn cache_reuses_until_five_minutes_before_expiry() {
        let k = key("cGFzc3dvcmQ=");
        let mut cache = TokenCache::new();
        let t0 = cache.token("h", "p", &k, 1000).to_string();
        assert!(t0.contains(&format!("se={}", 1000 + TOKEN_LIFETIME_SECS)));
        // Still fresh just before the renewal window.
        let renew_at = 1000 + TOKEN_LIFETIME_SECS - RENEW_BEFORE_SECS;
        assert_eq!(cache.token("h", "p", &k, renew_at - 1), t0);
        // Renewed inside the window.
        let t1 = cache.token("h", "p", &k, renew_at).to_string();
        assert_ne!(t1, t0);
        // Changed credentials mint a new token.
        assert_ne!(cache.token("h", "other", &k, renew_at), t1);
        assert_ne!(cache.token("h2", "other", &k, renew_at), t1);
        let t2 = cache.token("h2", "other", &k, renew_at).to_string();
        cache.invalidate();
        // Same inputs, same expiry: identical token, but it was re-minted.
        assert_eq!(cache.token("h2", "other", &k, renew_at), t2);
    }
}
