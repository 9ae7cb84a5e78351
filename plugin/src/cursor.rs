//! The poll cursor: where the last poll got to, as opaque JSON text.
//!
//! Format (version 1):
//! `{"v":1,"since":"<$lastUpdated>","seen":["<deviceId>@<$version>",...]}`
//!
//! * `since` is the latest reported `$metadata.$lastUpdated` returned so
//!   far, exactly as the hub wrote it; the next query asks for
//!   `$lastUpdated >= since` (sent rounded down to the second, so that a
//!   text comparison in the hub cannot drop stamps written with fewer
//!   fractional digits; the extra results are filtered here at full
//!   precision).
//! * `seen` lists the twin versions already delivered that such a query
//!   returns again: after a complete poll, those at exactly `since` (the
//!   `>=` re-returns them); after a poll cut short by a failed page, every
//!   version delivered since `since`, because `since` could not advance.
//!
//! Format version 2 wraps version 1 when the broker also reads
//! device-to-cloud messages (`iot_eventhub_endpoint` set):
//! `{"v":2,"twin":<version-1 cursor>,"eh":{"<partition>":"<offset>",...}}`,
//! where each offset is the `x-opt-offset` of the last message returned
//! from that partition (see [`PollCursor`]). Version 1 text is still read.
//!
//! So nothing is lost (`since` only moves past instants whose twins were all
//! returned) and nothing is returned forever (what `>=` re-returns is in
//! `seen`, and `seen` is rebuilt whenever `since` advances).

use crate::timestamp::{self, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The cursor format version this broker writes.
pub const VERSION: u32 = 1;

/// Where a first poll starts: everything the hub has.
pub const EPOCH_TEXT: &str = "1970-01-01T00:00:00Z";

/// The decoded cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Format version.
    pub v: u32,
    /// The `$lastUpdated` the next query starts at (inclusive).
    pub since: String,
    /// `deviceId@$version` of twins already delivered at or after `since`.
    #[serde(default)]
    pub seen: Vec<String>,
}

impl Cursor {
    /// The cursor before the first poll.
    pub fn initial() -> Cursor {
        Cursor {
            v: VERSION,
            since: EPOCH_TEXT.to_string(),
            seen: Vec::new(),
        }
    }

    /// Decodes cursor text; empty text is the initial cursor. `Err` says
    /// why the text is unusable.
    pub fn parse(text: &str) -> Result<Cursor, String> {
        if text.trim().is_empty() {
            return Ok(Cursor::initial());
        }
        let c: Cursor = serde_json::from_str(text)
            .map_err(|e| format!("not a version-{VERSION} cursor ({e})"))?;
        if c.v != VERSION {
            return Err(format!("cursor version {} is not {VERSION}", c.v));
        }
        if timestamp::parse(&c.since).is_none() {
            return Err(format!("'{}' is not a timestamp", c.since));
        }
        Ok(c)
    }

    /// Encodes the cursor as the text the host stores.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The version of the cursor that also carries Event Hub checkpoints.
pub const EVENTS_VERSION: u32 = 2;

/// The whole poll cursor: the twin-query cursor plus, when D2C reading is
/// on, each partition's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollCursor {
    /// Where the twin query got to.
    pub twin: Cursor,
    /// Partition number (as text) → offset of the last message returned.
    pub eh: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct V2 {
    #[serde(default)]
    twin: Option<serde_json::Value>,
    #[serde(default)]
    eh: BTreeMap<String, String>,
}

impl PollCursor {
    /// The cursor before the first poll.
    pub fn initial() -> PollCursor {
        PollCursor {
            twin: Cursor::initial(),
            eh: BTreeMap::new(),
        }
    }

    /// Decodes version 1 or 2 cursor text; empty text is the initial cursor.
    pub fn parse(text: &str) -> Result<PollCursor, String> {
        if text.trim().is_empty() {
            return Ok(PollCursor::initial());
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a cursor ({e})"))?;
        match v.get("v").and_then(serde_json::Value::as_u64) {
            Some(2) => {
                let c: V2 = serde_json::from_value(v)
                    .map_err(|e| format!("not a version-2 cursor ({e})"))?;
                let twin = match c.twin {
                    None | Some(serde_json::Value::Null) => Cursor::initial(),
                    Some(t) => Cursor::parse(&t.to_string())?,
                };
                Ok(PollCursor { twin, eh: c.eh })
            }
            _ => Ok(PollCursor {
                twin: Cursor::parse(text)?,
                eh: BTreeMap::new(),
            }),
        }
    }

    /// Encodes the cursor: version 2 when D2C reading is on (`events`) or
    /// checkpoints are held, else exactly the version-1 text.
    pub fn to_text(&self, events: bool) -> String {
        if !events && self.eh.is_empty() {
            return self.twin.to_text();
        }
        #[derive(Serialize)]
        struct Out<'a> {
            v: u32,
            twin: &'a Cursor,
            eh: &'a BTreeMap<String, String>,
        }
        serde_json::to_string(&Out {
            v: EVENTS_VERSION,
            twin: &self.twin,
            eh: &self.eh,
        })
        .unwrap_or_default()
    }
}

/// One poll's walk over the query results, deciding what to deliver and
/// building the next cursor.
pub struct Scan {
    start: Cursor,
    since: Timestamp,
    seen: BTreeSet<String>,
    max: Option<(Timestamp, String)>,
    at_max: BTreeSet<String>,
    delivered: BTreeSet<String>,
}

impl Scan {
    /// Starts a scan from a (valid) cursor.
    pub fn new(start: Cursor) -> Scan {
        let since = timestamp::parse(&start.since).unwrap_or(Timestamp::EPOCH);
        let seen = start.seen.iter().cloned().collect();
        Scan {
            start,
            since,
            seen,
            max: None,
            at_max: BTreeSet::new(),
            delivered: BTreeSet::new(),
        }
    }

    /// The cursor's `since`, exactly as stored (for log lines).
    pub fn since_text(&self) -> &str {
        &self.start.since
    }

    /// The lower bound to put in the query: `since` rounded down to the
    /// second (see [`Timestamp::query_floor`]); [`Scan::observe`] drops
    /// what that returns from before `since`.
    pub fn query_bound(&self) -> String {
        self.since.query_floor()
    }

    /// Records a twin the query returned (`key` = `deviceId@$version`,
    /// `ts` its reported `$lastUpdated`, `raw` that text) and says whether
    /// to deliver it.
    pub fn observe(&mut self, key: &str, ts: Timestamp, raw: &str) -> bool {
        if ts < self.since {
            // Older than the cursor: delivered by an earlier poll.
            return false;
        }
        match &self.max {
            Some((m, _)) if ts < *m => {}
            Some((m, _)) if ts == *m => {
                self.at_max.insert(key.to_string());
            }
            _ => {
                self.max = Some((ts, raw.to_string()));
                self.at_max.clear();
                self.at_max.insert(key.to_string());
            }
        }
        if self.seen.contains(key) || self.delivered.contains(key) {
            return false;
        }
        self.delivered.insert(key.to_string());
        true
    }

    /// How many twins this scan chose to deliver.
    pub fn delivered(&self) -> usize {
        self.delivered.len()
    }

    /// The next cursor after every page was read.
    pub fn complete(self) -> Cursor {
        match self.max {
            None => self.start,
            Some((ts, _)) if ts == self.since => {
                let mut seen = self.seen;
                seen.extend(self.at_max);
                Cursor {
                    v: VERSION,
                    since: self.start.since,
                    seen: seen.into_iter().collect(),
                }
            }
            Some((_, raw)) => Cursor {
                v: VERSION,
                since: raw,
                seen: self.at_max.into_iter().collect(),
            },
        }
    }

    /// The next cursor when a page failed: `since` stays, and everything
    /// delivered joins `seen` so the retry skips it.
    pub fn partial(self) -> Cursor {
        let mut seen = self.seen;
        seen.extend(self.delivered);
        Cursor {
            v: VERSION,
            since: self.start.since,
            seen: seen.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        timestamp::parse(s).expect("timestamp")
    }

    const T1: &str = "2024-05-01T10:00:00.1000000Z";
    const T2: &str = "2024-05-01T10:00:00.2000000Z";
    const T3: &str = "2024-05-01T10:00:00.3000000Z";

    /// Runs one scan over `(key, time)` results and returns the delivered
    /// keys and the next cursor.
    fn run(cursor: Cursor, results: &[(&str, &str)]) -> (Vec<String>, Cursor) {
        let mut scan = Scan::new(cursor);
        let mut out = Vec::new();
        for (k, t) in results {
            if scan.observe(k, ts(t), t) {
                out.push(k.to_string());
            }
        }
        (out, scan.complete())
    }

    #[test]
    fn text_round_trip_and_format() {
        let c = Cursor {
            v: 1,
            since: T1.into(),
            seen: vec!["a:1@3".into()],
        };
        assert_eq!(
            c.to_text(),
            r#"{"v":1,"since":"2024-05-01T10:00:00.1000000Z","seen":["a:1@3"]}"#
        );
        assert_eq!(Cursor::parse(&c.to_text()), Ok(c));
        assert_eq!(Cursor::parse(""), Ok(Cursor::initial()));
        assert!(Cursor::parse("garbage").is_err());
        assert!(Cursor::parse(r#"{"v":2,"since":"2024-05-01T10:00:00Z"}"#).is_err());
        assert!(Cursor::parse(r#"{"v":1,"since":"x' OR 1=1"}"#).is_err());
    }

    #[test]
    fn first_poll_delivers_all_and_remembers_ties_at_max() {
        let (out, c) = run(
            Cursor::initial(),
            &[("a@1", T1), ("b@1", T3), ("c@1", T3), ("d@1", T2)],
        );
        assert_eq!(out, ["a@1", "b@1", "c@1", "d@1"]);
        assert_eq!(c.since, T3);
        assert_eq!(c.seen, ["b@1", "c@1"]);
        // `>=` returns the ties again: nothing is re-delivered.
        let (out, c2) = run(c.clone(), &[("b@1", T3), ("c@1", T3)]);
        assert!(out.is_empty());
        assert_eq!(c2, c);
    }

    #[test]
    fn new_write_at_the_same_instant_is_delivered() {
        let c = Cursor {
            v: 1,
            since: T3.into(),
            seen: vec!["b@1".into()],
        };
        let (out, c) = run(c, &[("b@1", T3), ("e@4", T3)]);
        assert_eq!(out, ["e@4"]);
        assert_eq!(c.since, T3);
        assert_eq!(c.seen, ["b@1", "e@4"]);
    }

    #[test]
    fn advancing_drops_old_seen_and_skips_older() {
        let c = Cursor {
            v: 1,
            since: T2.into(),
            seen: vec!["b@1".into()],
        };
        let (out, c) = run(c, &[("b@2", T3), ("old@1", T1)]);
        assert_eq!(out, ["b@2"]);
        assert_eq!(
            c,
            Cursor {
                v: 1,
                since: T3.into(),
                seen: vec!["b@2".into()]
            }
        );
    }

    #[test]
    fn empty_result_keeps_cursor() {
        let c = Cursor {
            v: 1,
            since: T2.into(),
            seen: vec!["b@1".into()],
        };
        let (out, c2) = run(c.clone(), &[]);
        assert!(out.is_empty());
        assert_eq!(c2, c);
    }

    #[test]
    fn partial_scan_keeps_since_and_skips_delivered_on_retry() {
        // Page 1 (T3, T1) delivered, page 2 (T2) failed.
        let mut scan = Scan::new(Cursor::initial());
        assert!(scan.observe("x@1", ts(T3), T3));
        assert!(scan.observe("y@1", ts(T1), T1));
        let c = scan.partial();
        assert_eq!(c.since, EPOCH_TEXT);
        assert_eq!(c.seen, ["x@1", "y@1"]);
        // The retry sees all pages: only the missed twin is delivered.
        let (out, c) = run(c, &[("x@1", T3), ("y@1", T1), ("z@1", T2)]);
        assert_eq!(out, ["z@1"]);
        assert_eq!(
            c,
            Cursor {
                v: 1,
                since: T3.into(),
                seen: vec!["x@1".into()]
            }
        );
    }

    #[test]
    fn poll_cursor_versions() {
        let v1 = r#"{"v":1,"since":"2024-05-01T10:00:00.1000000Z","seen":["a:1@3"]}"#;
        let c = PollCursor::parse(v1).expect("v1");
        assert_eq!(c.twin.since, T1);
        assert!(c.eh.is_empty());
        assert_eq!(c.to_text(false), v1, "v1 stays v1 with events off");
        let mut c2 = c.clone();
        c2.eh.insert("0".into(), "4096".into());
        c2.eh.insert("1".into(), "-1".into());
        let text = c2.to_text(true);
        assert_eq!(
            text,
            r#"{"v":2,"twin":{"v":1,"since":"2024-05-01T10:00:00.1000000Z","seen":["a:1@3"]},"eh":{"0":"4096","1":"-1"}}"#
        );
        assert_eq!(PollCursor::parse(&text), Ok(c2.clone()));
        // Events switched off later: checkpoints are kept.
        assert_eq!(c2.to_text(false), text);
        assert_eq!(PollCursor::parse(""), Ok(PollCursor::initial()));
        assert_eq!(PollCursor::parse(r#"{"v":2}"#), Ok(PollCursor::initial()));
        assert!(PollCursor::parse(r#"{"v":2,"eh":{"0":5}}"#).is_err());
        assert!(PollCursor::parse(r#"{"v":3,"since":"x"}"#).is_err());
        assert!(PollCursor::parse("garbage").is_err());
    }

    #[test]
    fn duplicates_across_pages_are_delivered_once() {
        let (out, _) = run(Cursor::initial(), &[("a@1", T1), ("a@1", T1)]);
        assert_eq!(out, ["a@1"]);
    }
}
