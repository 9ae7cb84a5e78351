//! Time formatting in the exact shapes IoT Hub emits, without a date library.
//!
//! Exists because twin metadata needs ISO 8601 UTC with 7 fractional digits
//! (`2026-11-26T20:45:09.1234567Z`), error bodies need `MM/dd/yyyy HH:mm:ss`, and the query
//! compares `$lastUpdated` values as strings, so the format must sort chronologically.

use std::time::{SystemTime, UNIX_EPOCH};

/// 100-nanosecond ticks since the Unix epoch (the .NET tick resolution IoT Hub prints).
pub type Ticks = u128;

/// The unset-time value IoT Hub prints in Device JSON (no `Z`, §3.3).
pub const UNSET_DEVICE_TIME: &str = "0001-01-01T00:00:00";
/// The unset-time value in Twin JSON.
pub const UNSET_TWIN_TIME: &str = "0001-01-01T00:00:00Z";

/// Current wall-clock time in ticks.
pub fn now_ticks() -> Ticks {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() / 100)
        .unwrap_or(0)
}

/// Current Unix time in whole seconds (for SAS expiry checks).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Converts days since 1970-01-01 to (year, month, day); Howard Hinnant's civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn split(ticks: Ticks) -> (i64, u32, u32, u64, u64, u64, u64) {
    let secs = (ticks / 10_000_000) as i64;
    let frac = (ticks % 10_000_000) as u64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u64;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, sod / 3600, (sod / 60) % 60, sod % 60, frac)
}

/// `yyyy-MM-ddTHH:mm:ss.fffffffZ`, the twin-metadata format.
pub fn iso7(ticks: Ticks) -> String {
    let (y, mo, d, h, mi, s, f) = split(ticks);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{f:07}Z")
}

/// `MM/dd/yyyy HH:mm:ss`, the format of the `TimeStamp:` in classic error bodies.
pub fn error_timestamp(ticks: Ticks) -> String {
    let (y, mo, d, h, mi, s, _) = split(ticks);
    format!("{mo:02}/{d:02}/{y:04} {h:02}:{mi:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(iso7(0), "1970-01-01T00:00:00.0000000Z");
        // 2023-11-14T22:13:20Z = 1700000000 s
        let t = 1_700_000_000u128 * 10_000_000 + 1_234_567;
        assert_eq!(iso7(t), "2023-11-14T22:13:20.1234567Z");
        assert_eq!(error_timestamp(t), "11/14/2023 22:13:20");
        // Leap day.
        let t = 951_782_400u128 * 10_000_000; // 2000-02-29
        assert_eq!(iso7(t), "2000-02-29T00:00:00.0000000Z");
        assert!(iso7(t) < iso7(t + 1));
    }
}
