//! HS256 JSON Web Tokens as Para accepts them (`Authorization: Bearer <jwt>`).
//!
//! Para reads the claims `appid` (e.g. `app:myapp`), `sub` (a user id;
//! absent or unknown means an app "super token"), `exp`, `nbf` and `iat`.
//! The key is the app secret, plus the user's token secret for a user
//! token: the caller looks both up (with [`peek_claims`]) and passes the
//! concatenation to [`verify`].
//!
//! Rules: only `alg: HS256` (so never `none`); `exp` is required and the
//! token is expired once `now >= exp`; `nbf` is honoured (`now < nbf` is
//! rejected); no leeway; an unknown `crit` header is rejected. The
//! signature is checked in constant time before any claim is trusted.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::AuthError;

type HmacSha256 = Hmac<Sha256>;

/// The claims Para uses. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The app id, e.g. `app:myapp` (normalise with
    /// [`super::normalize_app_id`]).
    pub appid: String,
    /// The user id; `None` for an app super token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry (required).
    pub exp: i64,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

/// Verifies an HS256 token with `secret` at time `now_unix` and returns its
/// claims. Every failure is a 401: [`AuthError::TokenExpired`],
/// [`AuthError::TokenNotYetValid`], or [`AuthError::InvalidToken`] with the
/// reason (never the token or the key).
pub fn verify(token: &str, secret: &str, now_unix: i64) -> Result<Claims, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::InvalidToken("no key to verify the token with"));
    }
    let (header_b64, payload_b64, signature_b64) = split(token)?;
    let header = decode_json(header_b64, "the header is not base64url JSON")?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => {}
        Some(_) => return Err(AuthError::InvalidToken("only HS256 tokens are accepted")),
        None => return Err(AuthError::InvalidToken("the header has no 'alg'")),
    }
    if header.contains_key("crit") {
        return Err(AuthError::InvalidToken(
            "unsupported critical header parameters",
        ));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| AuthError::InvalidToken("the signature is not base64url"))?;
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(header_b64.as_bytes());
    mac.update(b".");
    mac.update(payload_b64.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::InvalidToken("signature mismatch"))?;

    let claims = claims_from(payload_b64)?;
    if now_unix >= claims.exp {
        return Err(AuthError::TokenExpired);
    }
    if claims.nbf.is_some_and(|nbf| now_unix < nbf) {
        return Err(AuthError::TokenNotYetValid);
    }
    Ok(claims)
}

/// Reads the claims **without verifying anything**, to find the app and
/// user whose secrets verify the token. Never trust the result; call
/// [`verify`] next.
pub fn peek_claims(token: &str) -> Result<Claims, AuthError> {
    let (_, payload_b64, _) = split(token)?;
    claims_from(payload_b64)
}

/// Makes an HS256 token (`{"alg":"HS256","typ":"JWT"}`) for tests and
/// tools.
pub fn sign(claims: &Claims, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload =
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims always serialise"));
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

fn split(token: &str) -> Result<(&str, &str, &str), AuthError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() && !s.is_empty() => {
            Ok((h, p, s))
        }
        _ => Err(AuthError::InvalidToken(
            "expected three base64url parts: header.payload.signature",
        )),
    }
}

fn decode_json(
    part: &str,
    what: &'static str,
) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::InvalidToken(what))?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::InvalidToken(what))
}

fn claims_from(payload_b64: &str) -> Result<Claims, AuthError> {
    let map = decode_json(payload_b64, "the payload is not base64url JSON")?;
    let appid = match map.get("appid") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => return Err(AuthError::InvalidToken("the token has no 'appid' claim")),
    };
    let sub = match map.get("sub") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(AuthError::InvalidToken("'sub' must be a string")),
    };
    let exp = numeric_date(&map, "exp", "'exp' must be a number")?
        .ok_or(AuthError::InvalidToken("the token has no 'exp' claim"))?;
    Ok(Claims {
        appid,
        sub,
        exp,
        nbf: numeric_date(&map, "nbf", "'nbf' must be a number")?,
        iat: numeric_date(&map, "iat", "'iat' must be a number")?,
    })
}

/// A NumericDate claim: integer or fractional seconds (floored).
fn numeric_date(
    map: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    err: &'static str,
) -> Result<Option<i64>, AuthError> {
    match map.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.floor() as i64)),
                    _ => Err(AuthError::InvalidToken(err)),
                }
            }
        }
        Some(_) => Err(AuthError::InvalidToken(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "app-secret-0123456789abcdefghijklmnopqrstuvwxyz";
    const NOW: i64 = 1_704_110_400;

    fn claims() -> Claims {
        Claims {
            appid: "app:myapp".into(),
            sub: Some("664870213421895680".into()),
            exp: NOW + 3_600,
            nbf: Some(NOW - 5),
            iat: Some(NOW - 5),
        }
    }

    /// A token with any header and payload JSON, signed with `key`.
    fn raw_token(header: &str, payload: &str, key: &str) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let p = URL_SAFE_NO_PAD.encode(payload);
        let mut mac = HmacSha256::new_from_slice(key.as_bytes()).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        format!(
            "{h}.{p}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn accepts_valid_token() {
        let token = sign(&claims(), KEY);
        assert_eq!(verify(&token, KEY, NOW), Ok(claims()));
        assert_eq!(peek_claims(&token), Ok(claims()));
        // A super token (no sub), as para-cli's new-jwt makes.
        let c = Claims {
            sub: None,
            ..claims()
        };
        assert_eq!(verify(&sign(&c, KEY), KEY, NOW), Ok(c));
    }

    #[test]
    fn matches_an_independent_hs256_token() {
        // Made with Python's hmac/base64 (header {"alg":"HS256","typ":"JWT"},
        // payload {"appid":"app:myapp","exp":1704114000}, key "secret-key").
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                     eyJhcHBpZCI6ImFwcDpteWFwcCIsImV4cCI6MTcwNDExNDAwMH0.\
                     8aNctPGY6qJuPheOqx4AsQL1aqLLrC947Vg8XzbFhU4";
        let c = verify(token, "secret-key", NOW).unwrap();
        assert_eq!(
            (c.appid.as_str(), c.exp, c.sub),
            ("app:myapp", 1_704_114_000, None)
        );
    }

    #[test]
    fn rejects_expired_token() {
        let c = Claims {
            exp: NOW,
            ..claims()
        };
        let err = verify(&sign(&c, KEY), KEY, NOW).unwrap_err();
        assert_eq!(err, AuthError::TokenExpired);
        assert_eq!(err.status(), 401);
        assert_eq!(verify(&sign(&c, KEY), KEY, NOW - 1).map(|c| c.exp), Ok(NOW));
    }

    #[test]
    fn rejects_wrong_key() {
        let token = sign(&claims(), KEY);
        assert_eq!(
            verify(&token, "another-key", NOW),
            Err(AuthError::InvalidToken("signature mismatch"))
        );
        assert!(verify(&token, "", NOW).is_err());
        // A tampered payload with the original signature.
        let (h, _) = token.split_once('.').unwrap();
        let sig = token.rsplit_once('.').unwrap().1;
        let forged = URL_SAFE_NO_PAD.encode(br#"{"appid":"app:other","exp":9999999999}"#);
        assert_eq!(
            verify(&format!("{h}.{forged}.{sig}"), KEY, NOW),
            Err(AuthError::InvalidToken("signature mismatch"))
        );
    }

    #[test]
    fn rejects_alg_none_and_other_algorithms() {
        let payload = format!(r#"{{"appid":"app:myapp","exp":{}}}"#, NOW + 60);
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let p = URL_SAFE_NO_PAD.encode(&payload);
        for token in [format!("{h}.{p}."), format!("{h}.{p}.AAAA")] {
            assert!(verify(&token, KEY, NOW).is_err(), "{token}");
        }
        assert_eq!(
            verify(&format!("{h}.{p}.AAAA"), KEY, NOW),
            Err(AuthError::InvalidToken("only HS256 tokens are accepted"))
        );
        for alg in ["HS384", "HS512", "RS256", "hs256", "None"] {
            let token = raw_token(&format!(r#"{{"alg":"{alg}"}}"#), &payload, KEY);
            assert_eq!(
                verify(&token, KEY, NOW),
                Err(AuthError::InvalidToken("only HS256 tokens are accepted")),
                "{alg}"
            );
        }
        let token = raw_token(r#"{"typ":"JWT"}"#, &payload, KEY);
        assert!(verify(&token, KEY, NOW).is_err());
        let token = raw_token(r#"{"alg":"HS256","crit":["exp"]}"#, &payload, KEY);
        assert!(verify(&token, KEY, NOW).is_err());
    }

    #[test]
    fn rejects_nbf_in_the_future() {
        let c = Claims {
            nbf: Some(NOW + 10),
            ..claims()
        };
        assert_eq!(
            verify(&sign(&c, KEY), KEY, NOW),
            Err(AuthError::TokenNotYetValid)
        );
        assert_eq!(
            verify(&sign(&c, KEY), KEY, NOW + 10).map(|c| c.nbf),
            Ok(Some(NOW + 10))
        );
    }

    #[test]
    fn rejects_missing_exp_and_appid() {
        let token = raw_token(r#"{"alg":"HS256"}"#, r#"{"appid":"app:myapp"}"#, KEY);
        assert_eq!(
            verify(&token, KEY, NOW),
            Err(AuthError::InvalidToken("the token has no 'exp' claim"))
        );
        let token = raw_token(
            r#"{"alg":"HS256"}"#,
            r#"{"appid":"app:myapp","exp":"soon"}"#,
            KEY,
        );
        assert!(verify(&token, KEY, NOW).is_err());
        let token = raw_token(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"exp":{}}}"#, NOW + 60),
            KEY,
        );
        assert_eq!(
            verify(&token, KEY, NOW),
            Err(AuthError::InvalidToken("the token has no 'appid' claim"))
        );
        // Fractional NumericDates are floored; extra claims are ignored.
        let token = raw_token(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &format!(
                r#"{{"appid":"app:myapp","exp":{}.75,"refresh":1,"idp":"x"}}"#,
                NOW + 60
            ),
            KEY,
        );
        assert_eq!(verify(&token, KEY, NOW).map(|c| c.exp), Ok(NOW + 60));
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = sign(&claims(), KEY);
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "..",
            "!!!.e30.AAAA",
            &format!("{good}."),
            &good.replace('.', ".."),
        ] {
            assert!(verify(bad, KEY, NOW).is_err(), "{bad}");
        }
        // Padding is not base64url (no padding) and is rejected.
        let (rest, sig) = good.rsplit_once('.').unwrap();
        assert!(verify(&format!("{rest}.{sig}="), KEY, NOW).is_err());
    }
}
