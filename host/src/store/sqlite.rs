//! SQLite implementation of [`Store`]: embedded, durable, no server.
//!
//! Why rusqlite with the `bundled` feature: one well-kept crate, a known
//! SQLite version on every machine, and real transactions, which the poll
//! commit (changes + cursor together) depends on. WAL mode lets reads run
//! beside a write. One connection behind a mutex is enough for this host's
//! load; every statement is short.

use super::{
    AppRecord, CommitOutcome, Lifecycle, ListQuery, Page, SortField, StateUpdate, Store, StoreError,
};
use crate::model::{Thing, now_ms};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS things (
    appid TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    service_broker TEXT NOT NULL,
    device_state TEXT NOT NULL,
    metadata TEXT NOT NULL,
    extra TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    updated INTEGER,
    version INTEGER NOT NULL,
    state_updated INTEGER NOT NULL,
    lifecycle TEXT NOT NULL,
    lifecycle_at INTEGER NOT NULL,
    PRIMARY KEY (appid, id)
);
CREATE INDEX IF NOT EXISTS things_by_time ON things (appid, lifecycle, timestamp);
CREATE INDEX IF NOT EXISTS things_unfinished ON things (lifecycle, lifecycle_at);
CREATE TABLE IF NOT EXISTS poll_cursors (
    broker TEXT PRIMARY KEY,
    cursor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    salt TEXT NOT NULL,
    active INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS broker_kv (
    broker TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (broker, key)
);
"#;

const COLUMNS: &str = "appid, id, name, service_broker, device_state, metadata, extra, \
                       timestamp, updated, version, state_updated, lifecycle";

impl SqliteStore {
    /// Opens (or creates) the database file and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory database, for unit tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written row
        // (SQLite rolls back), so a poisoned lock is safe to reuse.
        match self.conn.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn to_text(map: &Map<String, Value>) -> String {
    Value::Object(map.clone()).to_string()
}

fn from_text(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn lifecycle_of(s: &str) -> Lifecycle {
    match s {
        "creating" => Lifecycle::Creating,
        "deleting" => Lifecycle::Deleting,
        _ => Lifecycle::Active,
    }
}

fn row_to_thing(row: &Row<'_>) -> rusqlite::Result<(Thing, Lifecycle)> {
    let thing = Thing {
        appid: row.get(0)?,
        id: row.get(1)?,
        name: row.get(2)?,
        service_broker: row.get(3)?,
        device_state: from_text(&row.get::<_, String>(4)?),
        metadata: from_text(&row.get::<_, String>(5)?),
        extra: from_text(&row.get::<_, String>(6)?),
        timestamp: row.get::<_, i64>(7)? as u64,
        updated: row.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        version: row.get::<_, i64>(9)? as u64,
        state_updated: row.get::<_, i64>(10)? as u64,
    };
    let lifecycle = lifecycle_of(&row.get::<_, String>(11)?);
    Ok((thing, lifecycle))
}

fn write_thing(conn: &Connection, t: &Thing, state: Lifecycle) -> rusqlite::Result<usize> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO things ({COLUMNS}, lifecycle_at) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
        ),
        params![
            t.appid,
            t.id,
            t.name,
            t.service_broker,
            to_text(&t.device_state),
            to_text(&t.metadata),
            to_text(&t.extra),
            t.timestamp as i64,
            t.updated.map(|v| v as i64),
            t.version as i64,
            t.state_updated as i64,
            state.as_str(),
            now_ms() as i64,
        ],
    )
}

fn read_any(
    conn: &Connection,
    appid: &str,
    id: &str,
) -> rusqlite::Result<Option<(Thing, Lifecycle)>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM things WHERE appid = ?1 AND id = ?2"),
        params![appid, id],
        row_to_thing,
    )
    .optional()
}

fn sort_column(f: SortField) -> &'static str {
    match f {
        SortField::Timestamp => "timestamp",
        SortField::Updated => "COALESCE(updated, timestamp)",
        SortField::Name => "name",
        SortField::Id => "CAST(id AS INTEGER)",
    }
}

fn row_to_app(row: &Row<'_>) -> rusqlite::Result<AppRecord> {
    Ok(AppRecord {
        id: row.get(0)?,
        salt: row.get(1)?,
        active: row.get::<_, i64>(2)? != 0,
        created: row.get::<_, i64>(3)? as u64,
    })
}

impl Store for SqliteStore {
    fn app_get(&self, id: &str) -> Result<Option<AppRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, salt, active, created FROM apps WHERE id = ?1",
                params![id],
                row_to_app,
            )
            .optional()?)
    }

    fn app_put(&self, app: &AppRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO apps (id, salt, active, created) VALUES (?1, ?2, ?3, ?4)",
            params![app.id, app.salt, app.active as i64, app.created as i64],
        )?;
        Ok(())
    }

    fn app_list(&self) -> Result<Vec<AppRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, salt, active, created FROM apps ORDER BY id")?;
        let rows = stmt.query_map([], row_to_app)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r?);
        }
        Ok(out)
    }

    fn insert(&self, thing: &Thing, state: Lifecycle) -> Result<(), StoreError> {
        write_thing(&self.conn(), thing, state)?;
        Ok(())
    }

    fn get(&self, appid: &str, id: &str) -> Result<Option<Thing>, StoreError> {
        Ok(self
            .get_any(appid, id)?
            .filter(|(_, l)| *l == Lifecycle::Active)
            .map(|(t, _)| t))
    }

    fn get_any(&self, appid: &str, id: &str) -> Result<Option<(Thing, Lifecycle)>, StoreError> {
        Ok(read_any(&self.conn(), appid, id)?)
    }

    fn modify(
        &self,
        appid: &str,
        id: &str,
        f: &mut dyn FnMut(&mut Thing),
    ) -> Result<Thing, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some((mut thing, Lifecycle::Active)) = read_any(&tx, appid, id)? else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        f(&mut thing);
        thing.version += 1;
        thing.updated = Some(now_ms());
        write_thing(&tx, &thing, Lifecycle::Active)?;
        tx.commit()?;
        Ok(thing)
    }

    fn set_lifecycle(&self, appid: &str, id: &str, state: Lifecycle) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "UPDATE things SET lifecycle = ?3, lifecycle_at = ?4 WHERE appid = ?1 AND id = ?2",
            params![appid, id, state.as_str(), now_ms() as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(id.to_string()));
        }
        Ok(())
    }

    fn remove(&self, appid: &str, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM things WHERE appid = ?1 AND id = ?2",
            params![appid, id],
        )?;
        Ok(())
    }

    fn list(&self, appid: &str, q: &ListQuery) -> Result<Page, StoreError> {
        let conn = self.conn();
        let total: i64 = conn.query_row(
            "SELECT COUNT(*) FROM things WHERE appid = ?1 AND lifecycle = 'active'",
            params![appid],
            |r| r.get(0),
        )?;
        let col = sort_column(q.sort);
        let dir = if q.desc { "DESC" } else { "ASC" };
        let cmp = if q.desc { "<" } else { ">" };
        let limit = q.limit as i64;
        let mut items = Vec::new();
        if let Some(last) = &q.last_key {
            // Search-after: rows strictly after the last key in sort order.
            let sql = format!(
                "SELECT {COLUMNS} FROM things t WHERE appid = ?1 AND lifecycle = 'active' AND \
                 ({col}, CAST(id AS INTEGER)) {cmp} (SELECT {col}, CAST(id AS INTEGER) FROM things \
                 WHERE appid = ?1 AND id = ?2) ORDER BY {col} {dir}, CAST(id AS INTEGER) {dir} LIMIT ?3"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params![appid, last, limit], row_to_thing)?;
            for r in rows {
                items.push(r?.0);
            }
        } else {
            let offset = (q.page.max(1) - 1) as i64 * limit;
            let sql = format!(
                "SELECT {COLUMNS} FROM things WHERE appid = ?1 AND lifecycle = 'active' \
                 ORDER BY {col} {dir}, CAST(id AS INTEGER) {dir} LIMIT ?2 OFFSET ?3"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params![appid, limit, offset], row_to_thing)?;
            for r in rows {
                items.push(r?.0);
            }
        }
        Ok(Page {
            items,
            total: total as u64,
        })
    }

    fn unfinished(&self, older_than_ms: u64) -> Result<Vec<(Thing, Lifecycle)>, StoreError> {
        let conn = self.conn();
        let cutoff = now_ms().saturating_sub(older_than_ms) as i64;
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM things WHERE lifecycle IN ('creating', 'deleting') \
             AND lifecycle_at < ?1"
        ))?;
        let rows = stmt.query_map(params![cutoff], row_to_thing)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r?);
        }
        Ok(out)
    }

    fn cursor(&self, broker: &str) -> Result<String, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT cursor FROM poll_cursors WHERE broker = ?1",
                params![broker],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or_default())
    }

    fn commit_poll(
        &self,
        broker: &str,
        changes: &[StateUpdate],
        cursor: &str,
    ) -> Result<CommitOutcome, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut outcome = CommitOutcome::default();
        let now = now_ms() as i64;
        for c in changes {
            let state = to_text(&c.state);
            // The state rule: only newer writes win, only this broker's
            // things, only live things, and only real changes bump version.
            let n = tx.execute(
                "UPDATE things SET device_state = ?1, state_updated = ?2, version = version + 1, \
                 updated = ?3 WHERE appid = ?4 AND id = ?5 AND service_broker = ?6 \
                 AND lifecycle = 'active' AND state_updated <= ?2 AND device_state != ?1",
                params![state, c.written_at as i64, now, c.appid, c.thing_id, broker],
            )?;
            if n == 0 {
                outcome.skipped += 1;
            } else {
                outcome.applied += 1;
            }
        }
        tx.execute(
            "INSERT INTO poll_cursors (broker, cursor) VALUES (?1, ?2) \
             ON CONFLICT(broker) DO UPDATE SET cursor = excluded.cursor",
            params![broker, cursor],
        )?;
        tx.commit()?;
        Ok(outcome)
    }

    fn kv_get(&self, broker: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM broker_kv WHERE broker = ?1 AND key = ?2",
                params![broker, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn kv_set(&self, broker: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO broker_kv (broker, key, value) VALUES (?1, ?2, ?3) \
             ON CONFLICT(broker, key) DO UPDATE SET value = excluded.value",
            params![broker, key, value],
        )?;
        Ok(())
    }

    fn kv_delete(&self, broker: &str, key: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM broker_kv WHERE broker = ?1 AND key = ?2",
            params![broker, key],
        )?;
        Ok(())
    }

    fn kv_list(&self, broker: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT key FROM broker_kv WHERE broker = ?1 AND substr(key, 1, length(?2)) = ?2 \
             ORDER BY key",
        )?;
        let rows = stmt.query_map(params![broker, prefix], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(r?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn thing(id: &str, ts: u64) -> Thing {
        Thing {
            id: id.into(),
            appid: "app1".into(),
            name: format!("t{id}"),
            service_broker: "Loop".into(),
            device_state: Map::new(),
            metadata: Map::new(),
            timestamp: ts,
            updated: None,
            version: 0,
            state_updated: 100,
            extra: Map::new(),
        }
    }

    fn state(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn poll_commit_applies_only_newer_and_own_changes() {
        let s = SqliteStore::in_memory().unwrap();
        s.insert(&thing("1", 1), Lifecycle::Active).unwrap();
        let changes = vec![
            StateUpdate {
                thing_id: "1".into(),
                appid: "app1".into(),
                state: state(json!({"a":1})),
                written_at: 50,
            },
            StateUpdate {
                thing_id: "1".into(),
                appid: "app1".into(),
                state: state(json!({"a":2})),
                written_at: 200,
            },
            StateUpdate {
                thing_id: "1".into(),
                appid: "other".into(),
                state: state(json!({"a":3})),
                written_at: 300,
            },
        ];
        let out = s.commit_poll("Loop", &changes, "c1").unwrap();
        assert_eq!(
            out,
            CommitOutcome {
                applied: 1,
                skipped: 2
            }
        );
        assert_eq!(
            s.get("app1", "1").unwrap().unwrap().device_state,
            state(json!({"a":2}))
        );
        assert_eq!(s.cursor("Loop").unwrap(), "c1");
        // Another broker cannot touch this thing.
        let out = s.commit_poll("Other", &changes[1..2], "x").unwrap();
        assert_eq!(out.applied, 0);
    }

    #[test]
    fn list_pages_and_search_after() {
        let s = SqliteStore::in_memory().unwrap();
        for i in 1..=5u64 {
            s.insert(&thing(&i.to_string(), i * 10), Lifecycle::Active)
                .unwrap();
        }
        s.insert(&thing("9", 90), Lifecycle::Creating).unwrap();
        let q = ListQuery {
            limit: 2,
            page: 1,
            sort: SortField::Timestamp,
            desc: true,
            last_key: None,
        };
        let p = s.list("app1", &q).unwrap();
        assert_eq!(p.total, 5);
        assert_eq!(
            p.items.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["5", "4"]
        );
        let q2 = ListQuery {
            last_key: Some("4".into()),
            ..q.clone()
        };
        let p2 = s.list("app1", &q2).unwrap();
        assert_eq!(
            p2.items.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["3", "2"]
        );
        let q3 = ListQuery { page: 3, ..q };
        assert_eq!(s.list("app1", &q3).unwrap().items.len(), 1);
        assert!(s.list("other", &q2).unwrap().items.is_empty());
    }

    #[test]
    fn kv_is_per_broker() {
        let s = SqliteStore::in_memory().unwrap();
        s.kv_set("a", "queue/1", b"x").unwrap();
        s.kv_set("a", "seq", b"1").unwrap();
        s.kv_set("b", "queue/2", b"y").unwrap();
        assert_eq!(s.kv_list("a", "queue/").unwrap(), vec!["queue/1"]);
        assert_eq!(s.kv_get("b", "queue/1").unwrap(), None);
    }
}
