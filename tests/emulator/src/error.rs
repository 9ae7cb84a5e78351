//! IoT Hub errors in the classic wire format (reference §7.1, §7.2 format 1).
//!
//! Exists so every failure, from any layer, leaves the server as
//! `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"Tracking ID:<32hex>-G:0-TimeStamp:<MM/dd/yyyy HH:mm:ss>"}`
//! with the `iothub-errorcode: <Name>` header and Azure's status code.

use crate::timefmt;

/// The error codes the emulator emits, each with Azure's HTTP status and numeric code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400001: missing or unknown `api-version`.
    InvalidProtocolVersion,
    /// 400003: an operation the hub (or emulator) does not offer.
    InvalidOperation,
    /// 400004: a bad argument or body.
    ArgumentInvalid,
    /// 401002: authentication or authorization failed.
    IotHubUnauthorizedAccess,
    /// 404001: no such device.
    DeviceNotFound,
    /// 409001: the device id is taken.
    DeviceAlreadyExists,
    /// 412001: `If-Match` did not match.
    PreconditionFailed,
    /// 413001: a message or body too large.
    MessageTooLarge,
    /// 429001: throttled (fault injection only).
    ThrottlingException,
    /// 500001: internal error (fault injection only).
    ServerError,
    /// 503001: unavailable (fault injection only).
    ServiceUnavailable,
    /// 504101: gateway timeout (fault injection only).
    GatewayTimeout,
    /// 408000: request timeout (fault injection only).
    RequestTimeout,
}

impl ErrorCode {
    /// The name that goes into `ErrorCode:` and the `iothub-errorcode` header.
    pub fn name(self) -> &'static str {
        match self {
            Self::InvalidProtocolVersion => "InvalidProtocolVersion",
            Self::InvalidOperation => "InvalidOperation",
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::DeviceAlreadyExists => "DeviceAlreadyExists",
            Self::PreconditionFailed => "PreconditionFailed",
            Self::MessageTooLarge => "MessageTooLarge",
            Self::ThrottlingException => "ThrottlingException",
            Self::ServerError => "ServerError",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::GatewayTimeout => "GatewayTimeout",
            Self::RequestTimeout => "RequestTimeout",
        }
    }

    /// Azure's HTTP status for this code.
    pub fn status(self) -> u16 {
        (self.numeric() / 1000) as u16
    }

    /// Azure's six-digit code (status * 1000 + detail).
    pub fn numeric(self) -> u32 {
        match self {
            Self::InvalidProtocolVersion => 400001,
            Self::InvalidOperation => 400003,
            Self::ArgumentInvalid => 400004,
            Self::IotHubUnauthorizedAccess => 401002,
            Self::DeviceNotFound => 404001,
            Self::DeviceAlreadyExists => 409001,
            Self::PreconditionFailed => 412001,
            Self::MessageTooLarge => 413001,
            Self::ThrottlingException => 429001,
            Self::ServerError => 500001,
            Self::ServiceUnavailable => 503001,
            Self::GatewayTimeout => 504101,
            Self::RequestTimeout => 408000,
        }
    }
}

/// One failed request: the status, the error name, the text and optional extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The `ErrorCode:` name (a free string so fault rules can name any Azure code).
    pub name: String,
    /// Human-readable text after the `;`.
    pub message: String,
    /// Extra response headers (e.g. `Retry-After`).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    /// Builds an error with Azure's status for `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.status(),
            name: code.name().to_string(),
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Shorthand for 400 `ArgumentInvalid`, the most common validation failure.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    /// Shorthand for 401 `IotHubUnauthorizedAccess`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, message)
    }

    /// Shorthand for 404 `DeviceNotFound`.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorCode::DeviceNotFound,
            format!("Device {id} not registered"),
        )
    }

    /// The classic JSON body with a fresh tracking id and the current timestamp.
    pub fn body(&self) -> String {
        let tracking: String = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        serde_json::json!({
            "Message": format!("ErrorCode:{};{}", self.name, self.message),
            "ExceptionMessage": format!(
                "Tracking ID:{tracking}-G:0-TimeStamp:{}",
                timefmt::error_timestamp(timefmt::now_ticks())
            ),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_body_shape() {
        let e = ApiError::new(
            ErrorCode::DeviceAlreadyExists,
            "A device with ID 'x' is already registered.",
        );
        assert_eq!(e.status, 409);
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(
            v["Message"],
            "ErrorCode:DeviceAlreadyExists;A device with ID 'x' is already registered."
        );
        let em = v["ExceptionMessage"].as_str().unwrap();
        let rest = em.strip_prefix("Tracking ID:").unwrap();
        let (hex, ts) = rest.split_once("-G:0-TimeStamp:").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(ts.len(), "11/14/2023 22:13:20".len());
        assert_eq!(ErrorCode::ThrottlingException.status(), 429);
        assert_eq!(ErrorCode::RequestTimeout.status(), 408);
    }
}
