//! Request authentication, as Para does it (reference: para-api.md §4).
//!
//! This module is pure verification logic: no framework types, no I/O, no
//! logging, no clock. The server layer reads the request, looks apps up and
//! passes the current time in.
//!
//! A request carries one of these credentials ([`credentials_from`]):
//! * AWS Signature V4 (`Authorization: AWS4-HMAC-SHA256 Credential=app:myapp/...`),
//!   verified by [`sigv4::verify`] with the app's secret;
//! * an HS256 JWT (`Authorization: Bearer <jwt>`), verified by [`jwt::verify`];
//! * guest access (`Authorization: Anonymous app:myapp`, or `?accessKey=`),
//!   which needs no secret but only passes where the app lets guests in.
//!
//! The order of checks in Para, which the caller should keep so that the
//! same request gets the same status code:
//!
//! ```text
//! SigV4:  sigv4::check_date      -> 400 "Request has expired."
//!         app = lookup(normalize_app_id(access_key))
//!                                -> 404 "App not found."
//!         !app.active            -> 403 "App not active. [app:x]"
//!         app.read_only && write -> 403 "App is in read-only mode. [app:x]"
//!         sigv4::verify(secret)  -> 403 "Invalid signature for request M URI coming from app x"
//! Bearer: jwt::peek_claims (untrusted, to find the app and the user)
//!         app lookup and checks as above; key = app secret (+ user token secret)
//!         jwt::verify(key)       -> 401
//! None:                          -> 401 AuthError::MissingCredentials
//! ```

pub mod jwt;
pub mod sigv4;

use std::fmt;

/// Para's default `para.request_expires_after`, in seconds.
pub const DEFAULT_REQUEST_EXPIRES_AFTER_SECS: i64 = 900;

/// The prefix of every app id (`app:myapp`).
pub const APP_ID_PREFIX: &str = "app:";

/// A failed authentication. `Display` gives Para's message for the
/// `{"code": .., "message": ..}` error body and [`AuthError::status`] its
/// HTTP status. No variant holds a secret, a token or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The `X-Amz-Date` header (or parameter) is missing, unparseable, or
    /// older than the allowed window. 400.
    #[error("Request has expired.")]
    RequestExpired,
    /// `X-Amz-Date` is further in the future than the allowed window. Para
    /// has no such check; we add it so a request cannot be signed to stay
    /// replayable for longer than the window. 400.
    #[error("Request date is too far in the future.")]
    RequestDateInFuture,
    /// The recomputed SigV4 signature does not match. `uri` is the raw
    /// request path (no query) and `appid` the app identifier without the
    /// `app:` prefix, as in Para. 403.
    #[error("Invalid signature for request {method} {uri} coming from app {appid}")]
    InvalidSignature {
        method: String,
        uri: String,
        appid: String,
    },
    /// No app with the given access key. 404.
    #[error("App not found.")]
    AppNotFound,
    /// The app exists but is not active; `app_id` carries the prefix. 403.
    #[error("App not active. [{app_id}]")]
    AppNotActive { app_id: String },
    /// A write request (POST, PUT, PATCH, DELETE) to a read-only app. 403.
    #[error("App is in read-only mode. [{app_id}]")]
    AppReadOnly { app_id: String },
    /// The request carries no credentials at all. 401.
    #[error(
        "Unauthenticated request. Sign it with AWS Signature V4 (service 'para', region \
         'us-east-1', access key 'app:<name>', app secret as secret key) or send \
         'Authorization: Bearer <JWT>'."
    )]
    MissingCredentials,
    /// An `Authorization` header (or the SigV4 query parameters) that
    /// cannot be parsed. 401.
    #[error("Malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    /// The JWT is well formed and correctly signed but its `exp` has
    /// passed. 401.
    #[error("Token has expired.")]
    TokenExpired,
    /// The JWT's `nbf` is still in the future. 401.
    #[error("Token is not valid yet.")]
    TokenNotYetValid,
    /// Any other JWT problem: malformed, wrong algorithm, bad signature,
    /// missing claims. 401.
    #[error("Invalid token: {0}")]
    InvalidToken(&'static str),
}

impl AuthError {
    /// The HTTP status code Para answers with.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::RequestExpired | AuthError::RequestDateInFuture => 400,
            AuthError::InvalidSignature { .. }
            | AuthError::AppNotActive { .. }
            | AuthError::AppReadOnly { .. } => 403,
            AuthError::AppNotFound => 404,
            AuthError::MissingCredentials
            | AuthError::MalformedAuthorization(_)
            | AuthError::TokenExpired
            | AuthError::TokenNotYetValid
            | AuthError::InvalidToken(_) => 401,
        }
    }
}

/// The credentials a request presents, before any verification.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// AWS Signature V4. `access_key` is as sent (`app:myapp` or `myapp`);
    /// pass it through [`normalize_app_id`] to look the app up.
    SigV4 {
        access_key: String,
        auth: sigv4::ParsedAuth,
    },
    /// `Authorization: Bearer <jwt>` (or the `Authorization` query
    /// parameter). Holds the bare token.
    Bearer(String),
    /// Guest access for the app with this access key.
    Anonymous(String),
    /// Nothing to authenticate with.
    None,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::SigV4 { access_key, auth } => f
                .debug_struct("SigV4")
                .field("access_key", access_key)
                .field("auth", auth)
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credentials::Anonymous(key) => f.debug_tuple("Anonymous").field(key).finish(),
            Credentials::None => f.write_str("None"),
        }
    }
}

/// Classifies a request by its credentials, as Para does.
///
/// `headers` are the request headers (names in any case; for a repeated
/// header the first one counts, like `HttpServletRequest.getHeader`).
/// `raw_query` is the query string as received, without `?`.
///
/// With an `Authorization` header: `Anonymous [key]` (the key may instead
/// come from `?accessKey=`), `Bearer <jwt>`, or `AWS4-HMAC-SHA256 ...`;
/// anything else, or a SigV4 header that does not parse, is
/// [`AuthError::MalformedAuthorization`]. Without it: presigned SigV4
/// parameters (`X-Amz-Credential`, ...), then `?Authorization=Bearer <jwt>`,
/// then `?accessKey=<key>` (guest), else [`Credentials::None`].
pub fn credentials_from(
    headers: &[(String, String)],
    raw_query: Option<&str>,
) -> Result<Credentials, AuthError> {
    let authorization = header(headers, "authorization")
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let Some(auth) = authorization else {
        if let Some(parsed) = sigv4::parse_presigned(raw_query)? {
            return Ok(Credentials::SigV4 {
                access_key: parsed.access_key.clone(),
                auth: parsed,
            });
        }
        if let Some(value) = query_param(raw_query, "Authorization")
            && let Some(token) = bearer_token(&value)
        {
            return Ok(Credentials::Bearer(token.to_owned()));
        }
        return Ok(match query_param(raw_query, "accessKey") {
            Some(key) if !key.trim().is_empty() => Credentials::Anonymous(key.trim().to_owned()),
            _ => Credentials::None,
        });
    };

    if let Some(rest) = auth.strip_prefix("Anonymous") {
        let key = rest.trim();
        if !key.is_empty() {
            return Ok(Credentials::Anonymous(key.to_owned()));
        }
        return Ok(match query_param(raw_query, "accessKey") {
            Some(key) if !key.trim().is_empty() => Credentials::Anonymous(key.trim().to_owned()),
            _ => Credentials::None,
        });
    }
    if starts_with_ignore_case(auth, "Bearer") {
        return match bearer_token(auth) {
            Some(token) => Ok(Credentials::Bearer(token.to_owned())),
            None => Err(AuthError::MalformedAuthorization("empty bearer token")),
        };
    }
    if starts_with_ignore_case(auth, sigv4::ALGORITHM) {
        let parsed = sigv4::parse_authorization(auth)?;
        return Ok(Credentials::SigV4 {
            access_key: parsed.access_key.clone(),
            auth: parsed,
        });
    }
    Err(AuthError::MalformedAuthorization(
        "expected 'AWS4-HMAC-SHA256 ...', 'Bearer <jwt>' or 'Anonymous <access key>'",
    ))
}

/// The app id for an access key, as Para's `App.id(key)`: `myapp` and
/// `app:myapp` both give `app:myapp`.
///
/// Like Para, it also lowercases, turns punctuation, symbols and control
/// characters into spaces, and joins words with `-` (`My_App` gives
/// `app:my-app`). Para uses Unicode categories; here ASCII follows them
/// exactly and other characters count as punctuation unless alphanumeric
/// or whitespace.
pub fn normalize_app_id(key: &str) -> String {
    let name = if key.starts_with(APP_ID_PREFIX) {
        key.replace(APP_ID_PREFIX, "")
    } else {
        key.to_owned()
    };
    // Utils.stripAndTrim(name, " "): symbols, punctuation and control
    // characters become spaces, runs of whitespace one space, then trim.
    let stripped: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    // Utils.noSpaces(.., "-"): runs of whitespace become "-", lowercase.
    let words: Vec<&str> = stripped.split_whitespace().collect();
    format!("{APP_ID_PREFIX}{}", words.join("-").to_lowercase())
}

/// The app identifier without the `app:` prefix (`app:myapp` gives `myapp`),
/// as Para's `App.getAppIdentifier()`.
pub fn app_identifier(app_id: &str) -> &str {
    app_id.strip_prefix(APP_ID_PREFIX).unwrap_or(app_id)
}

/// The first value of a header, by case-insensitive name.
pub(crate) fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The first value of a query parameter, decoded form-style (`+` is a
/// space), as `HttpServletRequest.getParameter`.
pub(crate) fn query_param(raw_query: Option<&str>, name: &str) -> Option<String> {
    sigv4::query_pairs(raw_query?)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    if !starts_with_ignore_case(value, "Bearer") {
        return None;
    }
    let token = value["Bearer".len()..].trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn normalizes_app_ids_like_para() {
        assert_eq!(normalize_app_id("myapp"), "app:myapp");
        assert_eq!(normalize_app_id("app:myapp"), "app:myapp");
        assert_eq!(normalize_app_id("MyApp"), "app:myapp");
        assert_eq!(normalize_app_id("my_app"), "app:my-app");
        assert_eq!(normalize_app_id("my app "), "app:my-app");
        assert_eq!(normalize_app_id("app:my-app"), "app:my-app");
        assert_eq!(app_identifier("app:myapp"), "myapp");
        assert_eq!(app_identifier("myapp"), "myapp");
    }

    #[test]
    fn statuses_and_messages() {
        assert_eq!(AuthError::RequestExpired.status(), 400);
        assert_eq!(
            AuthError::RequestExpired.to_string(),
            "Request has expired."
        );
        let e = AuthError::InvalidSignature {
            method: "GET".into(),
            uri: "/v1/things".into(),
            appid: "myapp".into(),
        };
        assert_eq!(e.status(), 403);
        assert_eq!(
            e.to_string(),
            "Invalid signature for request GET /v1/things coming from app myapp"
        );
        assert_eq!(AuthError::AppNotFound.status(), 404);
        assert_eq!(AuthError::AppNotFound.to_string(), "App not found.");
        let e = AuthError::AppNotActive {
            app_id: "app:x".into(),
        };
        assert_eq!(
            (e.status(), e.to_string().as_str()),
            (403, "App not active. [app:x]")
        );
        assert_eq!(AuthError::MissingCredentials.status(), 401);
        assert!(AuthError::MissingCredentials.to_string().contains("Bearer"));
        assert_eq!(AuthError::TokenExpired.status(), 401);
        assert_eq!(AuthError::InvalidToken("x").status(), 401);
    }

    #[test]
    fn classifies_sigv4_header() {
        let h = hdrs(&[(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abcdef",
        )]);
        match credentials_from(&h, None).unwrap() {
            Credentials::SigV4 { access_key, auth } => {
                assert_eq!(access_key, "app:myapp");
                assert_eq!(auth.signed_headers, vec!["host", "x-amz-date"]);
                assert!(!auth.presigned);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn classifies_bearer_anonymous_and_none() {
        let h = hdrs(&[("authorization", "Bearer abc.def.ghi")]);
        assert_eq!(
            credentials_from(&h, None).unwrap(),
            Credentials::Bearer("abc.def.ghi".into())
        );
        assert_eq!(
            credentials_from(&[], Some("Authorization=Bearer%20abc.def.ghi")).unwrap(),
            Credentials::Bearer("abc.def.ghi".into())
        );
        let h = hdrs(&[("Authorization", "Anonymous app:myapp")]);
        assert_eq!(
            credentials_from(&h, None).unwrap(),
            Credentials::Anonymous("app:myapp".into())
        );
        let h = hdrs(&[("Authorization", "Anonymous")]);
        assert_eq!(
            credentials_from(&h, Some("accessKey=app%3Amyapp")).unwrap(),
            Credentials::Anonymous("app:myapp".into())
        );
        assert_eq!(
            credentials_from(&[], Some("accessKey=myapp")).unwrap(),
            Credentials::Anonymous("myapp".into())
        );
        assert_eq!(credentials_from(&[], None).unwrap(), Credentials::None);
        assert_eq!(
            credentials_from(&[], Some("limit=5")).unwrap(),
            Credentials::None
        );
        let h = hdrs(&[("Authorization", "   ")]);
        assert_eq!(credentials_from(&h, None).unwrap(), Credentials::None);
    }

    #[test]
    fn classifies_presigned_query() {
        let q = "X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=app%3Amyapp%2F20240101%2Fus-east-1%2Fpara%2Faws4_request\
                 &X-Amz-Date=20240101T120000Z&X-Amz-SignedHeaders=host&X-Amz-Signature=00";
        match credentials_from(&[], Some(q)).unwrap() {
            Credentials::SigV4 { access_key, auth } => {
                assert_eq!(access_key, "app:myapp");
                assert!(auth.presigned);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_authorization() {
        for bad in [
            "Basic dXNlcjpwYXNz",
            "Bearer ",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00",
        ] {
            let h = hdrs(&[("Authorization", bad)]);
            let err = credentials_from(&h, None).unwrap_err();
            assert!(
                matches!(err, AuthError::MalformedAuthorization(_)),
                "{bad}: {err:?}"
            );
            assert_eq!(err.status(), 401);
        }
    }

    #[test]
    fn debug_never_shows_tokens_or_signatures() {
        let c = Credentials::Bearer("secret.token.value".into());
        assert!(!format!("{c:?}").contains("secret"));
        let h = hdrs(&[(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=app:myapp/20240101/us-east-1/para/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=deadbeefcafe",
        )]);
        let c = credentials_from(&h, None).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("app:myapp"));
        assert!(!shown.contains("deadbeefcafe"));
    }
}
