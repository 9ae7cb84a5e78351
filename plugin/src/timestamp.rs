//! ISO 8601 timestamps as IoT Hub writes them in twin `$metadata`.
//!
//! The hub writes `$lastUpdated` with up to 7 fractional digits
//! (`2024-05-01T10:00:00.1234567Z`), sometimes fewer. The poll cursor
//! compares instants at full precision, and `written-at` needs Unix ms, so
//! the broker parses them itself rather than pulling in a date crate.

/// An instant with nanosecond precision. Ordered chronologically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    secs: i64,
    nanos: u32,
}

impl Timestamp {
    /// The Unix epoch: where a first poll starts.
    pub const EPOCH: Timestamp = Timestamp { secs: 0, nanos: 0 };

    /// The instant rounded down to the whole second, in UTC, as
    /// `YYYY-MM-DDTHH:MM:SS` (no fraction, no zone).
    ///
    /// This is the form to compare `$lastUpdated` against in a query: the
    /// hub may compare the values as strings, and a stamp with a different
    /// number of fractional digits would then sort wrongly against an exact
    /// bound (`…00.12Z` < `…00.1234567Z` is false as text). Every stamp at or
    /// after this second starts with an equal or greater prefix, so the
    /// bound is safe whichever way the hub compares; the cursor filters the
    /// extra results of that second exactly.
    pub fn query_floor(self) -> String {
        let days = self.secs.div_euclid(86_400);
        let rem = self.secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }

    /// Milliseconds since the Unix epoch, clamped to 0 for earlier instants.
    pub fn unix_ms(self) -> u64 {
        if self.secs < 0 {
            return 0;
        }
        (self.secs as u64)
            .saturating_mul(1000)
            .saturating_add(u64::from(self.nanos / 1_000_000))
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction][Z|±HH:MM]`. A missing zone means
/// UTC (the hub writes unset times as `0001-01-01T00:00:00`).
pub fn parse(s: &str) -> Option<Timestamp> {
    let b = s.trim().as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos: u32 = 0;
    if let Some((b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for (i, c) in frac[..n].iter().enumerate() {
            if i < 9 {
                nanos = nanos * 10 + u32::from(c - b'0');
            }
        }
        for _ in n..9 {
            nanos *= 10;
        }
        rest = &frac[n..];
    }
    let offset_secs: i64 = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(&[*h1, *h2])?;
            let m = digits(&[*m1, *m2])?;
            if h > 23 || m > 59 {
                return None;
            }
            let o = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -o } else { o }
        }
        _ => return None,
    };
    // A leap second is folded into the last ordinary second.
    let second = second.min(59);
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_secs;
    Some(Timestamp { secs, nanos })
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the
/// inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        parse(s).expect("parses").unix_ms()
    }

    #[test]
    fn epoch_and_known_instants() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(Timestamp::EPOCH));
        assert_eq!(ms("2016-03-30T16:24:48.789Z"), 1_459_355_088_789);
        assert_eq!(ms("2023-11-14T22:13:20Z"), 1_700_000_000_000);
        assert_eq!(ms("2000-02-29T00:00:00Z"), 951_782_400_000);
    }

    #[test]
    fn seven_fractional_digits() {
        let a = parse("2024-05-01T10:00:00.1234567Z").expect("parses");
        let b = parse("2024-05-01T10:00:00.1234568Z").expect("parses");
        assert!(a < b, "100 ns apart still orders");
        assert_eq!(a.unix_ms(), b.unix_ms());
        assert_eq!(a.unix_ms() % 1000, 123);
        assert_eq!(
            parse("2024-05-01T10:00:00.1230000Z"),
            parse("2024-05-01T10:00:00.123Z")
        );
    }

    #[test]
    fn offsets_and_missing_zone() {
        assert_eq!(
            parse("2024-05-01T12:00:00+02:00"),
            parse("2024-05-01T10:00:00Z")
        );
        assert_eq!(parse("2024-05-01T10:00:00"), parse("2024-05-01T10:00:00Z"));
        assert_eq!(ms("0001-01-01T00:00:00"), 0, "pre-epoch clamps");
        assert!(parse("0001-01-01T00:00:00").expect("parses") < Timestamp::EPOCH);
    }

    #[test]
    fn query_floor_is_a_safe_text_bound() {
        let t = parse("2024-05-01T10:00:00.1234567Z").expect("parses");
        assert_eq!(t.query_floor(), "2024-05-01T10:00:00");
        assert_eq!(Timestamp::EPOCH.query_floor(), "1970-01-01T00:00:00");
        assert_eq!(
            parse("2000-02-29T23:59:59.999Z")
                .expect("parses")
                .query_floor(),
            "2000-02-29T23:59:59"
        );
        assert_eq!(
            parse("2024-05-01T12:30:00+02:00")
                .expect("parses")
                .query_floor(),
            "2024-05-01T10:30:00"
        );
        // Every stamp in or after that second sorts >= the bound as text,
        // whatever its number of fractional digits.
        for later in [
            "2024-05-01T10:00:00Z",
            "2024-05-01T10:00:00.12Z",
            "2024-05-01T10:00:00.1234567Z",
            "2024-05-01T10:00:01.5Z",
        ] {
            assert!(later >= t.query_floor().as_str(), "{later}");
        }
        assert!("2024-05-01T09:59:59.9999999Z" < t.query_floor().as_str());
        // Round trip over a range of days, leap years included.
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            let (y, m, d) = (
                y,
                u32::try_from(m).unwrap_or(0),
                u32::try_from(d).unwrap_or(0),
            );
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01T10:00:00Zjunk",
            "2024-05-01T10:00:00' OR 1=1",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }
}
