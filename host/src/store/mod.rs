//! The storage boundary: everything the host persists goes through
//! [`Store`]. The default implementation is SQLite ([`sqlite::SqliteStore`]);
//! a server database can implement the same trait later.
//!
//! Every thing operation is scoped by `appid`: there is no way to read or
//! write a thing without naming its app.

pub mod sqlite;

use crate::model::Thing;
use serde_json::{Map, Value};

/// Storage failures. Callers map them to 500 with the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(String),
    /// No such thing in this app.
    #[error("no thing with id {0}")]
    NotFound(String),
    /// A debugging fault injected by configuration (tests only).
    #[error("injected fault: {0}")]
    Injected(String),
}

/// Where a thing is in its life. Only `Active` things are visible to reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Row written, broker `create` not yet confirmed.
    Creating,
    /// Normal.
    Active,
    /// Broker `delete` in progress (or must be retried).
    Deleting,
}

impl Lifecycle {
    /// Stable text for the database column.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Creating => "creating",
            Lifecycle::Active => "active",
            Lifecycle::Deleting => "deleting",
        }
    }
}

/// How a list is ordered and paged (Para's pager).
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Page size.
    pub limit: usize,
    /// 1-based page number (0 and 1 mean the first page).
    pub page: usize,
    /// `timestamp`, `updated`, `name` or `id`.
    pub sort: SortField,
    /// Descending order.
    pub desc: bool,
    /// Search-after: the id of the last item of the previous page.
    pub last_key: Option<String>,
}

/// The fields a list may be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    /// Creation time (Para's default).
    Timestamp,
    /// Last write time.
    Updated,
    /// Name.
    Name,
    /// Id.
    Id,
}

/// One page of things.
#[derive(Debug, Clone)]
pub struct Page {
    /// The things on this page.
    pub items: Vec<Thing>,
    /// How many things the app has in all.
    pub total: u64,
}

/// A state change to commit from a poll.
#[derive(Debug, Clone)]
pub struct StateUpdate {
    /// The thing.
    pub thing_id: String,
    /// Its app.
    pub appid: String,
    /// The new `deviceState`.
    pub state: Map<String, Value>,
    /// When the device wrote it, ms.
    pub written_at: u64,
}

/// What a poll commit did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Changes written to things.
    pub applied: usize,
    /// Changes skipped: unknown thing, other broker's thing, or older than
    /// the thing's last API write.
    pub skipped: usize,
}

/// An app: the owner of things and the holder of API credentials.
///
/// The secret itself is never stored: it is derived from the host's master
/// key and `salt` (see [`crate::apps`]), so a copy of the database alone
/// does not hand out credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRecord {
    /// `app:<name>`.
    pub id: String,
    /// Random salt the secret is derived from.
    pub salt: String,
    /// Inactive apps are refused (403).
    pub active: bool,
    /// Creation time, ms.
    pub created: u64,
}

/// Everything the host persists.
pub trait Store: Send + Sync {
    /// Reads an app by id (`app:<name>`).
    fn app_get(&self, id: &str) -> Result<Option<AppRecord>, StoreError>;
    /// Creates or replaces an app.
    fn app_put(&self, app: &AppRecord) -> Result<(), StoreError>;
    /// Every app, by id.
    fn app_list(&self) -> Result<Vec<AppRecord>, StoreError>;

    /// Writes a new thing in the given lifecycle state.
    fn insert(&self, thing: &Thing, state: Lifecycle) -> Result<(), StoreError>;
    /// Reads an active thing of this app.
    fn get(&self, appid: &str, id: &str) -> Result<Option<Thing>, StoreError>;
    /// Reads a thing whatever its lifecycle state.
    fn get_any(&self, appid: &str, id: &str) -> Result<Option<(Thing, Lifecycle)>, StoreError>;
    /// Read-modify-write of an active thing in one transaction; bumps
    /// `version` and `updated`. Returns the written thing.
    fn modify(
        &self,
        appid: &str,
        id: &str,
        f: &mut dyn FnMut(&mut Thing),
    ) -> Result<Thing, StoreError>;
    /// Moves a thing to another lifecycle state.
    fn set_lifecycle(&self, appid: &str, id: &str, state: Lifecycle) -> Result<(), StoreError>;
    /// Removes a thing for good.
    fn remove(&self, appid: &str, id: &str) -> Result<(), StoreError>;
    /// Lists an app's active things.
    fn list(&self, appid: &str, query: &ListQuery) -> Result<Page, StoreError>;
    /// Things that have been `Creating` or `Deleting` for longer than
    /// `older_than_ms` (longer than any API call may take): their broker
    /// `delete` must be finished by the janitor.
    fn unfinished(&self, older_than_ms: u64) -> Result<Vec<(Thing, Lifecycle)>, StoreError>;

    /// The last committed poll cursor of a broker (empty if none).
    fn cursor(&self, broker: &str) -> Result<String, StoreError>;
    /// Applies a poll batch and its cursor in ONE transaction. Changes only
    /// touch active things of `broker` and never overwrite a newer write.
    fn commit_poll(
        &self,
        broker: &str,
        changes: &[StateUpdate],
        cursor: &str,
    ) -> Result<CommitOutcome, StoreError>;

    /// Broker-private durable storage.
    fn kv_get(&self, broker: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets a broker-private key.
    fn kv_set(&self, broker: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Deletes a broker-private key.
    fn kv_delete(&self, broker: &str, key: &str) -> Result<(), StoreError>;
    /// Broker-private keys with a prefix, ascending.
    fn kv_list(&self, broker: &str, prefix: &str) -> Result<Vec<String>, StoreError>;
}
