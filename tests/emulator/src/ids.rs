//! Device id rules (reference §3.3): case-sensitive, 1–128 ASCII characters from
//! alphanumerics and `- : . + % _ # * ? ! ( ) , = @ ; $ '`.
//!
//! Exists so a broker that builds ids the hub would refuse fails here too.

/// The punctuation IoT Hub allows in a device id.
pub const ALLOWED_PUNCTUATION: &str = "-:.+%_#*?!(),=@;$'";

/// Validates a (decoded) device id; the error text names the rule that failed.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the device id is empty".into());
    }
    if id.len() > 128 {
        return Err(format!(
            "the device id is {} characters long; the maximum is 128",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ALLOWED_PUNCTUATION.contains(*c)))
    {
        return Err(format!(
            "the device id '{id}' contains '{}', which is not allowed (allowed: ASCII letters, digits and {ALLOWED_PUNCTUATION})",
            c.escape_default()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in [
            "dev1",
            "myapp:123",
            "a-b.c+d%e_f#g*h?i!j(k)l,m=n@o;p$q'r",
            &"x".repeat(128),
        ] {
            assert!(validate_device_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "ä",
            "a\"b",
            "a&b",
            "a\\b",
            "a~b",
            &"x".repeat(129),
        ] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
        assert!(validate_device_id("a b").unwrap_err().contains("' '"));
    }
}
