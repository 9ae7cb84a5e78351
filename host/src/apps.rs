//! Apps and their credentials.
//!
//! SigV4 and HS256 both need the app's secret in clear to verify a request,
//! so it cannot be stored as a one-way hash. Instead the host never stores
//! it at all: each app's secret is derived as
//! `base64url(HMAC-SHA256(master_key, "para-app-secret\0" + app_id + "\0" + salt))`,
//! and only the random salt is in the database. The 32-byte master key
//! lives in a separate file (`para.host.master_key_file`, default
//! `<db>.key`, mode 0600) or in `PARA_HOST_MASTER_KEY`; a copy of the
//! database without that key hands out no credentials. Rotating a secret is
//! a new salt.
//!
//! The root app (`para.app_name`, default `para`) is created on first
//! start. Its secret is `para.app_secret_key` when configured (never
//! stored), otherwise derived and printed once, to stderr, at creation.

use crate::store::{AppRecord, Store, StoreError};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// Why app credentials could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// The master key file could not be read or written.
    #[error("master key file {path}: {message}")]
    MasterKey {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bad app name.
    #[error("{0}")]
    Invalid(String),
}

/// Derives app secrets; holds the master key.
#[derive(Clone)]
pub struct AppKeys {
    master: [u8; 32],
    root_id: String,
    root_secret: Option<String>,
}

impl std::fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppKeys")
            .field("root_id", &self.root_id)
            .finish_non_exhaustive()
    }
}

/// New credentials, shown once.
#[derive(Debug)]
pub struct NewCredentials {
    /// `app:<name>`, the SigV4 access key.
    pub access_key: String,
    /// The secret key.
    pub secret_key: String,
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl AppKeys {
    /// Loads the master key from `env_key` (hex or base64, 32 bytes) or the
    /// file, creating the file with a random key on first use.
    pub fn load(
        key_file: &Path,
        env_key: Option<&str>,
        root_name: &str,
        root_secret: Option<String>,
    ) -> Result<Self, AppsError> {
        let err = |message: String| AppsError::MasterKey {
            path: key_file.display().to_string(),
            message,
        };
        let text = match env_key {
            Some(k) => k.trim().to_string(),
            None => match std::fs::read_to_string(key_file) {
                Ok(t) => t.trim().to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let k = random_hex(32);
                    write_private(key_file, &k).map_err(|e| err(e.to_string()))?;
                    k
                }
                Err(e) => return Err(err(e.to_string())),
            },
        };
        let bytes: Vec<u8> = (0..text.len() / 2)
            .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        let master: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("expected 64 hex characters (32 bytes)".into()))?;
        Ok(AppKeys {
            master,
            root_id: crate::auth::normalize_app_id(root_name),
            root_secret: root_secret.filter(|s| !s.is_empty()),
        })
    }

    /// The secret of an app record.
    pub fn secret(&self, app: &AppRecord) -> String {
        if app.id == self.root_id
            && let Some(s) = &self.root_secret
        {
            return s.clone();
        }
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.master) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(b"para-app-secret\0");
        mac.update(app.id.as_bytes());
        mac.update(b"\0");
        mac.update(app.salt.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Creates an app and returns its credentials (to be shown once).
    pub fn create_app(&self, store: &dyn Store, name: &str) -> Result<NewCredentials, AppsError> {
        let id = crate::auth::normalize_app_id(name);
        if id.len() <= crate::auth::APP_ID_PREFIX.len() {
            return Err(AppsError::Invalid(format!(
                "'{name}' is not a usable app name"
            )));
        }
        if store.app_get(&id)?.is_some() {
            return Err(AppsError::Invalid(format!("app {id} already exists")));
        }
        let app = AppRecord {
            id: id.clone(),
            salt: random_hex(16),
            active: true,
            created: crate::model::now_ms(),
        };
        store.app_put(&app)?;
        Ok(NewCredentials {
            secret_key: self.secret(&app),
            access_key: id,
        })
    }

    /// Makes sure the root app exists; returns its credentials if it was
    /// just created with a derived secret (the caller prints them once).
    pub fn ensure_root(&self, store: &dyn Store) -> Result<Option<NewCredentials>, AppsError> {
        if store.app_get(&self.root_id)?.is_some() {
            return Ok(None);
        }
        let name = self
            .root_id
            .trim_start_matches(crate::auth::APP_ID_PREFIX)
            .to_string();
        let creds = self.create_app(store, &name)?;
        Ok(self.root_secret.is_none().then_some(creds))
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn secrets_are_derived_not_stored() {
        let dir = std::env::temp_dir().join(format!("apps-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let key = dir.join("k");
        let _ = std::fs::remove_file(&key);
        let store = SqliteStore::in_memory().unwrap();
        let keys = AppKeys::load(&key, None, "para", None).unwrap();
        let root = keys.ensure_root(&store).unwrap().expect("printed once");
        assert!(keys.ensure_root(&store).unwrap().is_none());
        let app = keys.create_app(&store, "shop").unwrap();
        assert_eq!(app.access_key, "app:shop");
        let rec = store.app_get("app:shop").unwrap().unwrap();
        assert_eq!(keys.secret(&rec), app.secret_key);
        assert_ne!(rec.salt, app.secret_key);
        // Same master key, same secrets; another key, other secrets.
        let again = AppKeys::load(&key, None, "para", None).unwrap();
        assert_eq!(
            again.secret(&store.app_get("app:para").unwrap().unwrap()),
            root.secret_key
        );
        let other = AppKeys::load(&key, Some(&"ab".repeat(32)), "para", None).unwrap();
        assert_ne!(other.secret(&rec), app.secret_key);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
