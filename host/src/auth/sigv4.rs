//! AWS Signature V4 as Para verifies it (service `para`, region `us-east-1`).
//!
//! Para (`SecurityUtils.isValidSignature` with `Signer`, v1.38.x and HEAD)
//! does not check the client's canonical request; it builds its own from the
//! request it received and signs it with the app's secret:
//!
//! * **Path**: the raw request URI (percent-encoding intact) is URI-encoded
//!   once more, keeping `/` (Para's "double URL-encoding"): `a%20b` becomes
//!   `a%2520b`, `:` becomes `%3A`; plain paths such as `/v1/things/123` are
//!   unchanged. No dot-segment or `//` normalisation.
//! * **Query**: every parameter is decoded form-style (`+` is a space), only
//!   the *first* value of each name is kept, and names and values are
//!   RFC 3986-encoded again and sorted by name.
//! * **Headers**: the names in the client's `SignedHeaders`, plus `host` and
//!   `x-amz-date`, which Para always signs; values are read from the request
//!   (the first one of a repeated header), trimmed, inner whitespace runs
//!   collapsed. A signed name the request does not carry is left out.
//! * **Payload**: the SHA-256 of the body as received. An
//!   `X-Amz-Content-SHA256` header does **not** replace it (Para ignores it,
//!   so `UNSIGNED-PAYLOAD` never verifies).
//! * **Scope**: always `<yyyymmdd of X-Amz-Date>/us-east-1/para/aws4_request`,
//!   whatever the client wrote in `Credential=`.
//!
//! This agrees with botocore's `SigV4Auth(creds, 'para', 'us-east-1')`,
//! which also encodes the path as sent once more (`quote(path, safe='/~')`),
//! as long as the client signs only the first value of a repeated query
//! parameter and encodes its query RFC 3986-style (`%20`, not `+`); see the
//! vectors from `testdata/gen_sigv4_vectors.py` in the tests below.
//!
//! Presigned requests (`X-Amz-Signature` in the query) are recognised but
//! never verify: Para cannot verify them either (it would have to include
//! the signature parameter in its own canonical query).
//!
//! Date window: `X-Amz-Date` (header, else query parameter) must be present
//! and parse as `yyyyMMdd'T'HHmmss'Z'`, and `now <= date + expires_after`
//! (else 400 "Request has expired."). Unlike Para we also reject a date more
//! than `expires_after` seconds in the future.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{AuthError, app_identifier, header, normalize_app_id};

/// The `Authorization` scheme.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The signing service Para uses.
pub const SERVICE: &str = "para";
/// The signing region Para uses.
pub const REGION: &str = "us-east-1";
const TERMINATOR: &str = "aws4_request";

type HmacSha256 = Hmac<Sha256>;

/// A request as received, for signature checks.
///
/// `raw_path` and `raw_query` must be exactly as they arrived (no
/// decoding, `raw_query` without the `?`). `headers` are all request
/// headers, any name case; `host` must be there for HTTP/2 too (take it
/// from the URI authority). `body` is the whole body.
#[derive(Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub raw_path: &'a str,
    pub raw_query: Option<&'a str>,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// The parts of a SigV4 `Authorization` header (or of the presigned query
/// parameters). `Debug` hides the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedAuth {
    /// The access key, e.g. `app:myapp` (everything before the first `/`).
    pub access_key: String,
    /// The scope date, `yyyymmdd`.
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lowercased names from `SignedHeaders`, in the order given.
    pub signed_headers: Vec<String>,
    /// The hex signature as sent.
    pub signature: String,
    /// True when taken from `X-Amz-*` query parameters.
    pub presigned: bool,
}

impl std::fmt::Debug for ParsedAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedAuth")
            .field("access_key", &self.access_key)
            .field("date", &self.date)
            .field("region", &self.region)
            .field("service", &self.service)
            .field("signed_headers", &self.signed_headers)
            .field("signature", &"<redacted>")
            .field("presigned", &self.presigned)
            .finish()
    }
}

/// Parses `AWS4-HMAC-SHA256 Credential=<key>/<yyyymmdd>/<region>/<service>/aws4_request,
/// SignedHeaders=<a;b>, Signature=<hex>`. The access key may contain `:`
/// (`app:myapp`), not `/`. Components may come in any order; unknown ones
/// are ignored.
pub fn parse_authorization(value: &str) -> Result<ParsedAuth, AuthError> {
    let value = value.trim();
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(|c: char| c.is_ascii_whitespace()))
        .ok_or(AuthError::MalformedAuthorization(
            "expected 'AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...'",
        ))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (name, val) = part
            .split_once('=')
            .ok_or(AuthError::MalformedAuthorization(
                "each component must be Name=Value",
            ))?;
        let slot = match name.trim() {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => continue,
        };
        if slot.replace(val.trim()).is_some() {
            return Err(AuthError::MalformedAuthorization("repeated component"));
        }
    }
    build_parsed(credential, signed_headers, signature, false)
}

/// SigV4 credentials from presigned query parameters (`X-Amz-Credential`,
/// `X-Amz-SignedHeaders`, `X-Amz-Signature`), if `X-Amz-Credential` is there.
pub(crate) fn parse_presigned(raw_query: Option<&str>) -> Result<Option<ParsedAuth>, AuthError> {
    let Some(raw) = raw_query else {
        return Ok(None);
    };
    let pairs = first_values(query_pairs(raw));
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(credential) = get("X-Amz-Credential") else {
        return Ok(None);
    };
    build_parsed(
        Some(credential),
        get("X-Amz-SignedHeaders"),
        get("X-Amz-Signature"),
        true,
    )
    .map(Some)
}

fn build_parsed(
    credential: Option<&str>,
    signed_headers: Option<&str>,
    signature: Option<&str>,
    presigned: bool,
) -> Result<ParsedAuth, AuthError> {
    let credential = credential.ok_or(AuthError::MalformedAuthorization("missing Credential"))?;
    let signed_headers =
        signed_headers.ok_or(AuthError::MalformedAuthorization("missing SignedHeaders"))?;
    let signature = signature
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::MalformedAuthorization("missing Signature"))?;
    let parts: Vec<&str> = credential.trim().split('/').collect();
    let [access_key, date, region, service, terminator] = parts[..] else {
        return Err(AuthError::MalformedAuthorization(
            "Credential must be <access key>/<yyyymmdd>/<region>/<service>/aws4_request",
        ));
    };
    if access_key.trim().is_empty() {
        return Err(AuthError::MalformedAuthorization("empty access key"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) || terminator != TERMINATOR {
        return Err(AuthError::MalformedAuthorization(
            "Credential must be <access key>/<yyyymmdd>/<region>/<service>/aws4_request",
        ));
    }
    let signed_headers: Vec<String> = signed_headers
        .split(';')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect();
    if signed_headers.is_empty() {
        return Err(AuthError::MalformedAuthorization("empty SignedHeaders"));
    }
    Ok(ParsedAuth {
        access_key: access_key.trim().to_owned(),
        date: date.to_owned(),
        region: region.to_owned(),
        service: service.to_owned(),
        signed_headers,
        signature: signature.to_owned(),
        presigned,
    })
}

/// Checks the `X-Amz-Date` window and returns the request time (Unix
/// seconds). Para does this before it looks the app up, so call it first.
pub fn check_date(
    req: &SignedRequest<'_>,
    now_unix: i64,
    expires_after_secs: i64,
) -> Result<i64, AuthError> {
    checked_date(req, now_unix, expires_after_secs).map(|(_, t)| t)
}

fn checked_date(
    req: &SignedRequest<'_>,
    now_unix: i64,
    expires_after_secs: i64,
) -> Result<(String, i64), AuthError> {
    let date = match header(req.headers, "x-amz-date")
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        Some(d) => d.to_owned(),
        None => super::query_param(req.raw_query, "X-Amz-Date")
            .map(|d| d.trim().to_owned())
            .filter(|d| !d.is_empty())
            .ok_or(AuthError::RequestExpired)?,
    };
    let t = parse_amz_date(&date).ok_or(AuthError::RequestExpired)?;
    if now_unix > t.saturating_add(expires_after_secs) {
        return Err(AuthError::RequestExpired);
    }
    if t > now_unix.saturating_add(expires_after_secs) {
        return Err(AuthError::RequestDateInFuture);
    }
    Ok((date, t))
}

/// Verifies a SigV4-signed request with the app's `secret`, as Para does
/// (see the module docs), including the date window.
///
/// Errors: [`AuthError::MissingCredentials`] without SigV4 credentials,
/// [`AuthError::MalformedAuthorization`], [`AuthError::RequestExpired`] /
/// [`AuthError::RequestDateInFuture`], and [`AuthError::InvalidSignature`]
/// (also for an empty secret and for presigned requests). The signature is
/// compared in constant time.
pub fn verify(
    req: &SignedRequest<'_>,
    secret: &str,
    now_unix: i64,
    expires_after_secs: i64,
) -> Result<(), AuthError> {
    let auth = match header(req.headers, "authorization")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        Some(value) => parse_authorization(value)?,
        None => parse_presigned(req.raw_query)?.ok_or(AuthError::MissingCredentials)?,
    };
    let (amz_date, _) = checked_date(req, now_unix, expires_after_secs)?;
    let invalid = || AuthError::InvalidSignature {
        method: req.method.to_owned(),
        uri: req.raw_path.to_owned(),
        appid: app_identifier(&normalize_app_id(&auth.access_key)).to_owned(),
    };
    if auth.presigned || secret.is_empty() {
        return Err(invalid());
    }
    let given = decode_signature_hex(&auth.signature).ok_or_else(invalid)?;
    let signed: Vec<&str> = auth.signed_headers.iter().map(String::as_str).collect();
    let (canonical, _) = canonical_parts(req, &signed, &amz_date);
    let mut mac = signing_mac(secret, &amz_date);
    mac.update(string_to_sign(&amz_date, &canonical).as_bytes());
    mac.verify_slice(&given).map_err(|_| invalid())
}

/// Signs a request the way Para expects and returns the `Authorization`
/// header value. The request must already carry its `X-Amz-Date` header
/// (see [`format_amz_date`]) and, normally, `Host`. `signed_headers` names
/// the headers to sign besides `host` and `x-amz-date` (which are always
/// signed); names the request lacks are skipped. The payload hash is
/// SHA-256 of `req.body`, and only the first value of a repeated query
/// parameter is signed, as Para verifies.
///
/// Fails with [`AuthError::RequestExpired`] if `X-Amz-Date` is missing or
/// malformed.
pub fn sign(
    req: &SignedRequest<'_>,
    access_key: &str,
    secret: &str,
    signed_headers: &[&str],
) -> Result<String, AuthError> {
    let amz_date = header(req.headers, "x-amz-date")
        .map(str::trim)
        .filter(|d| parse_amz_date(d).is_some())
        .ok_or(AuthError::RequestExpired)?;
    let (canonical, signed_list) = canonical_parts(req, signed_headers, amz_date);
    let mut mac = signing_mac(secret, amz_date);
    mac.update(string_to_sign(amz_date, &canonical).as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    Ok(format!(
        "{ALGORITHM} Credential={access_key}/{}/{REGION}/{SERVICE}/{TERMINATOR}, \
         SignedHeaders={signed_list}, Signature={signature}",
        &amz_date[..8]
    ))
}

/// The canonical request Para builds for `req`, given the client's signed
/// header names and the request's `X-Amz-Date` value (for debugging and
/// tests; it holds no secret).
pub fn canonical_request(
    req: &SignedRequest<'_>,
    signed_headers: &[&str],
    amz_date: &str,
) -> String {
    canonical_parts(req, signed_headers, amz_date).0
}

/// Returns (canonical request, signed header list).
fn canonical_parts(
    req: &SignedRequest<'_>,
    signed_headers: &[&str],
    amz_date: &str,
) -> (String, String) {
    let mut names: Vec<String> = signed_headers
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .chain(["host".to_owned(), "x-amz-date".to_owned()])
        .collect();
    names.sort();
    names.dedup();

    let mut canonical_headers = String::new();
    let mut signed_list: Vec<&str> = Vec::with_capacity(names.len());
    for name in &names {
        let value = if name == "x-amz-date" {
            amz_date.trim().to_owned()
        } else {
            match header(req.headers, name) {
                Some(v) => v.split_ascii_whitespace().collect::<Vec<_>>().join(" "),
                None => continue,
            }
        };
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&value);
        canonical_headers.push('\n');
        signed_list.push(name);
    }
    let signed_list = signed_list.join(";");

    let path = if req.raw_path.is_empty() {
        "/".to_owned()
    } else {
        uri_encode(req.raw_path.as_bytes(), true)
    };
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        path,
        canonical_query(req.raw_query),
        canonical_headers,
        signed_list,
        hex(&Sha256::digest(req.body)),
    );
    (canonical, signed_list)
}

fn canonical_query(raw_query: Option<&str>) -> String {
    let Some(raw) = raw_query else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = first_values(query_pairs(raw))
        .into_iter()
        .map(|(k, v)| {
            (
                uri_encode(k.as_bytes(), false),
                uri_encode(v.as_bytes(), false),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn string_to_sign(amz_date: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{}/{REGION}/{SERVICE}/{TERMINATOR}\n{}",
        &amz_date[..8],
        hex(&Sha256::digest(canonical_request.as_bytes()))
    )
}

/// An HMAC keyed with the signing key for the date of `amz_date`.
fn signing_mac(secret: &str, amz_date: &str) -> HmacSha256 {
    let mut key = hmac_bytes(
        format!("AWS4{secret}").as_bytes(),
        &amz_date.as_bytes()[..8],
    );
    for part in [REGION, SERVICE, TERMINATOR] {
        key = hmac_bytes(&key, part.as_bytes());
    }
    HmacSha256::new_from_slice(&key).expect("HMAC accepts keys of any length")
}

fn hmac_bytes(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Query parameters in order, decoded form-style (`+` is a space, bad
/// `%` escapes kept as they are), as a servlet container reads them.
/// Empty names are dropped.
pub(crate) fn query_pairs(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = form_decode(k);
            (!k.is_empty()).then(|| (k, form_decode(v)))
        })
        .collect()
}

/// Keeps the first value of each name, in order of first appearance.
fn first_values(pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    pairs
        .into_iter()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect()
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 encoding: everything but `A-Za-z0-9-_.~` (and `/` when
/// `keep_slash`) becomes `%XX` with upper-case hex.
fn uri_encode(input: &[u8], keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(input.len() * 3);
    for &b in input {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xF) as usize] as char);
        }
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a 64-character lower-case hex signature (Para compares the hex
/// strings, so upper case never matches).
fn decode_signature_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() != 64 || !s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(hex_val(pair[0])? << 4 | hex_val(pair[1])?))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xF) as usize] as char);
    }
    out
}

/// Parses `yyyyMMdd'T'HHmmss'Z'` (UTC) into Unix seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = &b[range];
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            part.iter()
                .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')),
        )
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Formats Unix seconds as `yyyyMMdd'T'HHmmss'Z'`.
pub fn format_amz_date(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) struct BotocoreVector {
        pub name: &'static str,
        pub method: &'static str,
        pub raw_path: &'static str,
        /// The query string as the server receives it.
        pub wire_query: Option<&'static str>,
        /// The request headers after botocore signed it (plus `Host`).
        pub headers: &'static [(&'static str, &'static str)],
        pub body: &'static str,
        /// The canonical request botocore built.
        pub canonical_request: &'static str,
        pub authorization: &'static str,
        pub para_accepts: bool,
    }

    mod vectors {
        use super::BotocoreVector;
        // BEGIN GENERATED BOTOCORE VECTORS (testdata/gen_sigv4_vectors.py)
        // botocore 1.44.8, SigV4Auth(Credentials('app:myapp', <secret>), 'para', 'us-east-1')
        pub(super) const BOTOCORE_VERSION: &str = "1.44.8";
        pub(super) const VEC_ACCESS_KEY: &str = "app:myapp";
        pub(super) const VEC_SECRET: &str = "pArA-s3cret-KEY+/0123456789abcdefghijklmnop";
        pub(super) const VEC_AMZ_DATE: &str = "20240101T120000Z";
        pub(super) const VECTORS: &[BotocoreVector] = &[
            BotocoreVector {
                name: "get_plain_id",
                method: "GET",
                raw_path: "/v1/things/123",
                wire_query: None,
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=fa95aa86db744b95193f983bc9d4ca8e9a1c51a256746bdf718897d4792e41ef",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/things/123\n\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=fa95aa86db744b95193f983bc9d4ca8e9a1c51a256746bdf718897d4792e41ef",
                para_accepts: true,
            },
            BotocoreVector {
                name: "get_list_with_query",
                method: "GET",
                raw_path: "/v1/things",
                wire_query: Some("limit=5&sort=name&desc=false&q=hello%20world&select=id%2Cname"),
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=8c0e15b37507306afe1c12f39bc67b0ea331d6c2f6cbfd6288cdc9508f00f150",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/things\ndesc=false&limit=5&q=hello%20world&select=id%2Cname&sort=name\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=8c0e15b37507306afe1c12f39bc67b0ea331d6c2f6cbfd6288cdc9508f00f150",
                para_accepts: true,
            },
            BotocoreVector {
                name: "repeated_params_first_value_signed",
                method: "GET",
                raw_path: "/v1/_batch",
                wire_query: Some("ids=a1&ids=b2&limit=5"),
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=37c6398d876bc85c68a5ea2796690a3e0f1b6fbfddba39d975b12fe45f0647c4",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/_batch\nids=a1&limit=5\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=37c6398d876bc85c68a5ea2796690a3e0f1b6fbfddba39d975b12fe45f0647c4",
                para_accepts: true,
            },
            BotocoreVector {
                name: "repeated_params_all_values_signed",
                method: "GET",
                raw_path: "/v1/_batch",
                wire_query: Some("ids=a1&ids=b2&limit=5"),
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=6803517dc2f37ae717747c215d8eb254fe226a90fe1d62c21873a5b5c0382cdf",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/_batch\nids=a1&ids=b2&limit=5\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=6803517dc2f37ae717747c215d8eb254fe226a90fe1d62c21873a5b5c0382cdf",
                para_accepts: false,
            },
            BotocoreVector {
                name: "post_json_body",
                method: "POST",
                raw_path: "/v1/things",
                wire_query: None,
                headers: &[
                    ("Host", "localhost:8080"),
                    ("Content-Type", "application/json; charset=UTF-8"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=d0f7969aceecff7d9ac534b02fa04f27b2cb481500c8059d43a3d65a47817b87",
                    ),
                ],
                body: "{\"name\":\"Thermostat é\",\"deviceState\":{\"temp\":21.5},\"serviceBroker\":\"aws\"}",
                canonical_request: "POST\n/v1/things\n\ncontent-type:application/json; charset=UTF-8\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\ncontent-type;host;x-amz-date\n4dca8d9821ee30fd29ac572f12f8b6634847a25be6e54676efe498511f9f4411",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=d0f7969aceecff7d9ac534b02fa04f27b2cb481500c8059d43a3d65a47817b87",
                para_accepts: true,
            },
            BotocoreVector {
                name: "patch_json_body_with_query",
                method: "PATCH",
                raw_path: "/v1/things/664870213421895680",
                wire_query: Some("x=1"),
                headers: &[
                    ("Host", "localhost:8080"),
                    ("Content-Type", "application/json; charset=UTF-8"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=4d24bf8bb7296f8ee1bcc9cb89eb6732a05764d6b89a3d0f6cebf1d0268565a9",
                    ),
                ],
                body: "{\"deviceState\":{\"on\":true}}",
                canonical_request: "PATCH\n/v1/things/664870213421895680\nx=1\ncontent-type:application/json; charset=UTF-8\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\ncontent-type;host;x-amz-date\n973a73e04561df4e0cbbb0e47dff5854cc606880720ba272eb1f5199889de9d5",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=4d24bf8bb7296f8ee1bcc9cb89eb6732a05764d6b89a3d0f6cebf1d0268565a9",
                para_accepts: true,
            },
            BotocoreVector {
                name: "path_needing_encoding",
                method: "GET",
                raw_path: "/v1/things/x:y%20z~*(1)",
                wire_query: None,
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=c4f6a976c834d9b40a6672975a91a69625bc8cdbb8dd6594410483427c7643d4",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/things/x%3Ay%2520z~%2A%281%29\n\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=c4f6a976c834d9b40a6672975a91a69625bc8cdbb8dd6594410483427c7643d4",
                para_accepts: true,
            },
            BotocoreVector {
                name: "path_percent_encoded_slash",
                method: "DELETE",
                raw_path: "/v1/things/a%2Fb",
                wire_query: None,
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=118fa2a865c7d8de960911177f7a6fad8352e9d0c8beadf2eff7b20a2224c314",
                    ),
                ],
                body: "",
                canonical_request: "DELETE\n/v1/things/a%252Fb\n\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=118fa2a865c7d8de960911177f7a6fad8352e9d0c8beadf2eff7b20a2224c314",
                para_accepts: true,
            },
            BotocoreVector {
                name: "plus_in_query_is_space_for_para",
                method: "GET",
                raw_path: "/v1/things",
                wire_query: Some("q=a+b"),
                headers: &[
                    ("Host", "localhost:8080"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=5deed88bb5f54b9ebfb0fc39bfef365034667fb0f0cf3b1398e12be7f57cc74e",
                    ),
                ],
                body: "",
                canonical_request: "GET\n/v1/things\nq=a+b\nhost:localhost:8080\nx-amz-date:20240101T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=host;x-amz-date, Signature=5deed88bb5f54b9ebfb0fc39bfef365034667fb0f0cf3b1398e12be7f57cc74e",
                para_accepts: false,
            },
            BotocoreVector {
                name: "unsigned_payload_header",
                method: "POST",
                raw_path: "/v1/things",
                wire_query: None,
                headers: &[
                    ("Host", "localhost:8080"),
                    ("Content-Type", "application/json"),
                    ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
                    ("X-Amz-Date", "20240101T120000Z"),
                    (
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, Signature=a560cfd8de19c6fe544e1233785c29b4778dacfef259835f02ffe9358a7ae749",
                    ),
                ],
                body: "{\"name\":\"x\"}",
                canonical_request: "POST\n/v1/things\n\ncontent-type:application/json\nhost:localhost:8080\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:20240101T120000Z\n\ncontent-type;host;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD",
                authorization: "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date, Signature=a560cfd8de19c6fe544e1233785c29b4778dacfef259835f02ffe9358a7ae749",
                para_accepts: false,
            },
        ];
        // END GENERATED BOTOCORE VECTORS
    }
    use vectors::*;

    fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn vec_time() -> i64 {
        parse_amz_date(VEC_AMZ_DATE).unwrap()
    }

    fn request<'a>(v: &BotocoreVector, headers: &'a [(String, String)]) -> SignedRequest<'a> {
        SignedRequest {
            method: v.method,
            raw_path: v.raw_path,
            raw_query: v.wire_query,
            headers,
            body: v.body.as_bytes(),
        }
    }

    // ---- Fixed own request used by the rejection tests ----

    const SECRET: &str = "0123456789abcdefghijABCDEFGHIJ0123456789";
    const NOW: i64 = 1_704_110_400; // 2024-01-01T12:00:00Z
    const BODY: &str = r#"{"name":"dev1","deviceState":{"t":1}}"#;

    fn signed_post(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut headers = owned(&[
            ("Host", "api.example.com"),
            ("X-Amz-Date", "20240101T120000Z"),
            ("Content-Type", "application/json; charset=UTF-8"),
        ]);
        headers.extend(owned(extra));
        let req = SignedRequest {
            method: "POST",
            raw_path: "/v1/things",
            raw_query: Some("limit=5"),
            headers: &headers,
            body: BODY.as_bytes(),
        };
        let auth = sign(&req, "app:myapp", SECRET, &["content-type"]).unwrap();
        headers.push(("Authorization".into(), auth));
        headers
    }

    fn post<'a>(headers: &'a [(String, String)], body: &'a str) -> SignedRequest<'a> {
        SignedRequest {
            method: "POST",
            raw_path: "/v1/things",
            raw_query: Some("limit=5"),
            headers,
            body: body.as_bytes(),
        }
    }

    fn set_header(headers: &mut [(String, String)], name: &str, value: &str) {
        let h = headers
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .unwrap();
        h.1 = value.to_owned();
    }

    fn is_invalid_signature(r: Result<(), AuthError>) -> bool {
        matches!(r, Err(AuthError::InvalidSignature { .. }))
    }

    #[test]
    fn botocore_vectors_are_present() {
        assert!(VECTORS.len() >= 8, "run testdata/gen_sigv4_vectors.py");
        assert!(!BOTOCORE_VERSION.is_empty());
        assert!(
            VECTORS
                .iter()
                .all(|v| v.authorization.contains("Credential=app:myapp/"))
        );
    }

    #[test]
    fn accepts_what_para_accepts_from_botocore() {
        for v in VECTORS.iter().filter(|v| v.para_accepts) {
            let headers = owned(v.headers);
            let req = request(v, &headers);
            assert_eq!(
                verify(&req, VEC_SECRET, vec_time() + 10, 900),
                Ok(()),
                "vector {}",
                v.name
            );
        }
    }

    #[test]
    fn canonical_request_matches_botocore() {
        for v in VECTORS.iter().filter(|v| v.para_accepts) {
            let headers = owned(v.headers);
            let auth = parse_authorization(v.authorization).unwrap();
            let names: Vec<&str> = auth.signed_headers.iter().map(String::as_str).collect();
            assert_eq!(
                canonical_request(&request(v, &headers), &names, VEC_AMZ_DATE),
                v.canonical_request,
                "vector {}",
                v.name
            );
        }
    }

    #[test]
    fn sign_reproduces_botocore_authorization() {
        for v in VECTORS.iter().filter(|v| v.para_accepts) {
            let headers: Vec<(String, String)> = owned(v.headers)
                .into_iter()
                .filter(|(k, _)| !k.eq_ignore_ascii_case("authorization"))
                .collect();
            let auth = parse_authorization(v.authorization).unwrap();
            let names: Vec<&str> = auth.signed_headers.iter().map(String::as_str).collect();
            assert_eq!(
                sign(&request(v, &headers), VEC_ACCESS_KEY, VEC_SECRET, &names).unwrap(),
                v.authorization,
                "vector {}",
                v.name
            );
        }
    }

    #[test]
    fn rejects_what_para_rejects_from_botocore() {
        for v in VECTORS.iter().filter(|v| !v.para_accepts) {
            let headers = owned(v.headers);
            let err = verify(&request(v, &headers), VEC_SECRET, vec_time(), 900).unwrap_err();
            assert_eq!(
                err,
                AuthError::InvalidSignature {
                    method: v.method.into(),
                    uri: v.raw_path.into(),
                    appid: "myapp".into(),
                },
                "vector {}",
                v.name
            );
            assert_eq!(err.status(), 403);
        }
    }

    #[test]
    fn path_is_encoded_once_more_like_para() {
        assert_eq!(uri_encode(b"/v1/things/123", true), "/v1/things/123");
        assert_eq!(uri_encode(b"/v1/things/a%20b", true), "/v1/things/a%2520b");
        assert_eq!(
            uri_encode(b"/v1/things/x:y~*", true),
            "/v1/things/x%3Ay~%2A"
        );
        let v = VECTORS
            .iter()
            .find(|v| v.name == "path_needing_encoding")
            .unwrap();
        assert!(
            v.canonical_request
                .contains("\n/v1/things/x%3Ay%2520z~%2A%281%29\n")
        );
    }

    #[test]
    fn query_is_canonicalised_like_para() {
        assert_eq!(
            canonical_query(Some("b=2&a=1&a=3&c&d=x+y%2Bz&&=e&%7e=%41")),
            "a=1&b=2&c=&d=x%20y%2Bz&~=A"
        );
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
    }

    #[test]
    fn accepts_own_signature_and_ignores_unsigned_changes() {
        let headers = signed_post(&[]);
        assert_eq!(verify(&post(&headers, BODY), SECRET, NOW, 900), Ok(()));
        // An unsigned header added by a proxy or client library.
        let mut more = headers.clone();
        more.push(("User-Agent".into(), "curl/8".into()));
        assert_eq!(verify(&post(&more, BODY), SECRET, NOW, 900), Ok(()));
        // Para only signs the first value of a repeated parameter.
        let req = SignedRequest {
            raw_query: Some("limit=5&limit=500"),
            ..post(&headers, BODY)
        };
        assert_eq!(verify(&req, SECRET, NOW, 900), Ok(()));
        // Header names are case-insensitive, values are trimmed.
        let mut cased = headers.clone();
        set_header(
            &mut cased,
            "content-type",
            "  application/json;   charset=UTF-8 ",
        );
        assert_eq!(verify(&post(&cased, BODY), SECRET, NOW, 900), Ok(()));
    }

    #[test]
    fn rejects_tampered_body() {
        let headers = signed_post(&[]);
        let tampered = BODY.replace("dev1", "dev2");
        assert!(is_invalid_signature(verify(
            &post(&headers, &tampered),
            SECRET,
            NOW,
            900
        )));
        assert!(is_invalid_signature(verify(
            &post(&headers, ""),
            SECRET,
            NOW,
            900
        )));
    }

    #[test]
    fn rejects_tampered_signed_header() {
        let mut headers = signed_post(&[]);
        set_header(&mut headers, "content-type", "text/plain");
        assert!(is_invalid_signature(verify(
            &post(&headers, BODY),
            SECRET,
            NOW,
            900
        )));
        let mut headers = signed_post(&[]);
        set_header(&mut headers, "host", "evil.example.com");
        assert!(is_invalid_signature(verify(
            &post(&headers, BODY),
            SECRET,
            NOW,
            900
        )));
        // Changing X-Amz-Date inside the window also breaks the signature.
        let mut headers = signed_post(&[]);
        set_header(&mut headers, "x-amz-date", "20240101T120001Z");
        assert!(is_invalid_signature(verify(
            &post(&headers, BODY),
            SECRET,
            NOW,
            900
        )));
    }

    #[test]
    fn rejects_tampered_query_path_and_method() {
        let headers = signed_post(&[]);
        let req = SignedRequest {
            raw_query: Some("limit=500"),
            ..post(&headers, BODY)
        };
        assert!(is_invalid_signature(verify(&req, SECRET, NOW, 900)));
        let req = SignedRequest {
            raw_path: "/v1/things/1",
            ..post(&headers, BODY)
        };
        assert!(is_invalid_signature(verify(&req, SECRET, NOW, 900)));
        let req = SignedRequest {
            method: "PUT",
            ..post(&headers, BODY)
        };
        assert!(is_invalid_signature(verify(&req, SECRET, NOW, 900)));
    }

    #[test]
    fn rejects_wrong_secret_with_paras_message() {
        let headers = signed_post(&[]);
        let err = verify(&post(&headers, BODY), "not-the-secret", NOW, 900).unwrap_err();
        assert_eq!(err.status(), 403);
        assert_eq!(
            err.to_string(),
            "Invalid signature for request POST /v1/things coming from app myapp"
        );
        assert!(is_invalid_signature(verify(
            &post(&headers, BODY),
            "",
            NOW,
            900
        )));
    }

    #[test]
    fn rejects_expired_and_future_dates() {
        let headers = signed_post(&[]);
        let req = post(&headers, BODY);
        assert_eq!(verify(&req, SECRET, NOW + 900, 900), Ok(()));
        assert_eq!(
            verify(&req, SECRET, NOW + 901, 900),
            Err(AuthError::RequestExpired)
        );
        assert_eq!(
            check_date(&req, NOW + 901, 900),
            Err(AuthError::RequestExpired)
        );
        assert_eq!(verify(&req, SECRET, NOW - 900, 900), Ok(()));
        assert_eq!(
            verify(&req, SECRET, NOW - 901, 900),
            Err(AuthError::RequestDateInFuture)
        );
        assert_eq!(check_date(&req, NOW, 900), Ok(NOW));
        // The date check comes first, even with the wrong secret.
        assert_eq!(
            verify(&req, "wrong", NOW + 10_000, 900),
            Err(AuthError::RequestExpired)
        );
        assert_eq!(AuthError::RequestExpired.status(), 400);
    }

    #[test]
    fn rejects_missing_or_malformed_date() {
        let headers: Vec<(String, String)> = signed_post(&[])
            .into_iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("x-amz-date"))
            .collect();
        assert_eq!(
            verify(&post(&headers, BODY), SECRET, NOW, 900),
            Err(AuthError::RequestExpired)
        );
        for bad in [
            "",
            "  ",
            "2024-01-01T12:00:00Z",
            "20240101T120000",
            "Mon, 01 Jan 2024",
        ] {
            let mut headers = signed_post(&[]);
            set_header(&mut headers, "x-amz-date", bad);
            assert_eq!(
                verify(&post(&headers, BODY), SECRET, NOW, 900),
                Err(AuthError::RequestExpired),
                "{bad:?}"
            );
        }
        // Without the header the X-Amz-Date query parameter counts for the window.
        let req = SignedRequest {
            raw_query: Some("X-Amz-Date=20240101T120000Z"),
            ..post(&headers, BODY)
        };
        assert_eq!(check_date(&req, NOW, 900), Ok(NOW));
    }

    #[test]
    fn rejects_malformed_authorization_header() {
        for bad in [
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256Credential=app:myapp/20240101/us-east-1/para/aws4_request",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, \
             SignedHeaders=host;x-amz-date",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para, \
             SignedHeaders=host;x-amz-date, Signature=00",
            "AWS4-HMAC-SHA256 Credential=/20240101/us-east-1/para/aws4_request, \
             SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=app:myapp/2024011/us-east-1/para/aws4_request, \
             SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, \
             SignedHeaders=, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/20240101/us-east-1/para/aws4_request, \
             Credential=b/20240101/us-east-1/para/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 garbage",
        ] {
            assert!(
                matches!(
                    parse_authorization(bad),
                    Err(AuthError::MalformedAuthorization(_))
                ),
                "{bad}"
            );
            let mut headers = signed_post(&[]);
            set_header(&mut headers, "authorization", bad);
            let err = verify(&post(&headers, BODY), SECRET, NOW, 900).unwrap_err();
            assert!(
                matches!(err, AuthError::MalformedAuthorization(_)),
                "{bad}: {err:?}"
            );
        }
        // A signature that is not 64 lower-case hex digits never matches.
        let mut headers = signed_post(&[]);
        let upper = header(&headers, "authorization").unwrap().to_owned();
        let (head, sig) = upper.split_once("Signature=").unwrap();
        set_header(
            &mut headers,
            "authorization",
            &format!("{head}Signature={}", sig.to_uppercase()),
        );
        assert!(is_invalid_signature(verify(
            &post(&headers, BODY),
            SECRET,
            NOW,
            900
        )));
        // No credentials at all.
        let headers = owned(&[("Host", "h"), ("X-Amz-Date", "20240101T120000Z")]);
        assert_eq!(
            verify(&post(&headers, BODY), SECRET, NOW, 900),
            Err(AuthError::MissingCredentials)
        );
    }

    #[test]
    fn parses_authorization_components() {
        let a = parse_authorization(
            "AWS4-HMAC-SHA256 Signature=abc,SignedHeaders=Host;X-Amz-Date;content-type, \
             Credential=app:myapp/20240101/eu-west-1/s3/aws4_request",
        )
        .unwrap();
        assert_eq!(a.access_key, "app:myapp");
        assert_eq!(a.date, "20240101");
        assert_eq!((a.region.as_str(), a.service.as_str()), ("eu-west-1", "s3"));
        assert_eq!(a.signed_headers, vec!["host", "x-amz-date", "content-type"]);
        assert_eq!(a.signature, "abc");
        assert!(!format!("{a:?}").contains("abc\""));
    }

    #[test]
    fn client_scope_is_ignored_like_para() {
        // Para always signs with <date>/us-east-1/para, whatever the client
        // wrote in Credential=; only the access key is taken from it.
        let headers = signed_post(&[]);
        let auth = header(&headers, "authorization").unwrap();
        let mut other = headers.clone();
        set_header(
            &mut other,
            "authorization",
            &auth.replace("us-east-1", "eu-west-1"),
        );
        assert_eq!(verify(&post(&other, BODY), SECRET, NOW, 900), Ok(()));
        let q = owned(&[("Host", "h"), ("X-Amz-Date", "20240101T120000Z")]);
        let mut hs = q.clone();
        let req = SignedRequest {
            method: "GET",
            raw_path: "/v1/things",
            raw_query: None,
            headers: &q,
            body: b"",
        };
        let good = sign(&req, "myapp", SECRET, &[]).unwrap();
        hs.push(("Authorization".into(), good));
        let req = SignedRequest {
            headers: &hs,
            ..req
        };
        assert_eq!(verify(&req, SECRET, NOW, 900), Ok(()));
    }

    #[test]
    fn presigned_requests_never_verify() {
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=app%3Amyapp%2F20240101%2Fus-east-1%2Fpara%2Faws4_request\
                 &X-Amz-Date=20240101T120000Z&X-Amz-SignedHeaders=host\
                 &X-Amz-Signature=0000000000000000000000000000000000000000000000000000000000000000";
        let headers = owned(&[("Host", "h")]);
        let req = SignedRequest {
            method: "GET",
            raw_path: "/v1/things",
            raw_query: Some(q),
            headers: &headers,
            body: b"",
        };
        assert!(is_invalid_signature(verify(&req, SECRET, NOW, 900)));
    }

    #[test]
    fn amz_dates_round_trip() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20240101T120000Z"), Some(1_704_110_400));
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        assert_eq!(parse_amz_date("20000301T000000Z"), Some(951_868_800));
        assert_eq!(parse_amz_date("19691231T235959Z"), Some(-1));
        for bad in [
            "20230229T000000Z",
            "20241301T000000Z",
            "20240100T000000Z",
            "20240101T240000Z",
            "20240101T126000Z",
            "20240101T120060Z",
            "20240101t120000Z",
            "20240101T120000z",
            "2024011T120000Z",
            "+2024101T120000Z",
            "",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        for t in [
            0,
            1,
            -1,
            951_868_800,
            1_704_110_400,
            1_709_251_199,
            4_102_444_800,
            253_402_300_799,
        ] {
            assert_eq!(parse_amz_date(&format_amz_date(t)), Some(t), "{t}");
        }
        assert_eq!(format_amz_date(1_704_110_400), "20240101T120000Z");
    }
}
