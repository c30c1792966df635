//! Storage behind one trait. The event log is the source of truth: every write
//! allocates the next dense revision inside its transaction and records the
//! full state of every grant it changed, the key set when it changed, and the
//! audit records of the change, atomically. SQLite is the default; a
//! PostgreSQL implementation satisfies the same trait.
//!
//! The trait is blocking (rusqlite is): async callers go through
//! `tokio::task::spawn_blocking`.

pub mod sqlite;

use consent_core::wire::v1;
use consent_core::{Grant, KeySet, SigningKey};

/// What a store can fail with. The admin API maps each variant to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bad input; `field` names the request field that is wrong.
    #[error("invalid {field}: {problem}")]
    Invalid { field: String, problem: String },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is well formed but the state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("storage failure: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        StoreError::Internal(e.to_string())
    }
}

impl From<consent_core::GrantError> for StoreError {
    fn from(e: consent_core::GrantError) -> Self {
        StoreError::invalid(e.field, e.problem)
    }
}

impl From<consent_core::wire::WireError> for StoreError {
    fn from(e: consent_core::wire::WireError) -> Self {
        StoreError::invalid(e.field, e.problem)
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A signing key as stored: the secret stays in the database.
#[derive(Clone, Debug)]
pub struct StoredKey {
    pub kid: String,
    pub secret: Vec<u8>,
    pub public: [u8; 32],
    pub created_ms: i64,
    /// 0 while it is the current signing key.
    pub retire_after: i64,
}

impl StoredKey {
    pub fn from_signing(key: &SigningKey, created_ms: i64) -> Self {
        StoredKey {
            kid: key.kid().to_owned(),
            secret: key.to_bytes(),
            public: key.verifying_key(0).public_key,
            created_ms,
            retire_after: 0,
        }
    }

    pub fn signing_key(&self) -> Result<SigningKey> {
        SigningKey::from_bytes(&self.kid, &self.secret).map_err(StoreError::internal)
    }
}

/// The public key set streamed to sidecars for a list of stored keys.
pub fn key_set_of(keys: &[StoredKey]) -> Result<KeySet> {
    let keys = keys
        .iter()
        .map(|k| consent_core::VerifyingKey::new(&k.kid, &k.public, k.retire_after))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::internal)?;
    Ok(KeySet::new(keys))
}

/// An admin change as recorded in the audit log, written with its revision.
#[derive(Clone, Debug)]
pub struct ChangeRecord {
    pub kind: &'static str,
    pub actor: String,
    pub grant_id: String,
    pub subject: String,
    pub detail: String,
}

/// What one write commits: grant states, optionally a new key table, and the
/// audit records, all at one revision.
#[derive(Clone, Debug, Default)]
pub struct Change {
    pub grants: Vec<Grant>,
    /// The complete key table after the change, when the keys change.
    pub keys: Option<Vec<StoredKey>>,
    pub audit: Vec<ChangeRecord>,
}

/// The revision a write will commit at, and the time it commits.
#[derive(Clone, Copy, Debug)]
pub struct WriteContext {
    pub revision: u64,
    pub now_ms: i64,
}

impl WriteContext {
    pub fn now_secs(&self) -> i64 {
        self.now_ms.div_euclid(1000)
    }
}

/// A committed write.
#[derive(Clone, Debug)]
pub struct Commit {
    pub revision: u64,
    pub committed_ms: i64,
    pub grants: Vec<Grant>,
    pub keys_changed: bool,
}

/// Reads the current state inside a write transaction.
pub trait Reader {
    fn grant(&self, id: &str) -> Result<Option<Grant>>;
    /// Direct children, any status.
    fn children(&self, id: &str) -> Result<Vec<Grant>>;
    fn keys(&self) -> Result<Vec<StoredKey>>;
}

/// The filters of a grant listing; `after` is the last id of the previous page.
#[derive(Clone, Debug, Default)]
pub struct GrantFilter {
    pub subject: Option<String>,
    pub grantee: Option<String>,
    pub dataset: Option<String>,
    pub status: Option<StatusFilter>,
    pub after: Option<String>,
    pub limit: usize,
    /// Unix seconds: expiry is judged against this clock.
    pub now: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    Active,
    Revoked,
    Expired,
}

/// Every grant touched in a revision range: its state at the start of the
/// range (if it existed) and at the end.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub grants: Vec<(Option<Grant>, Grant)>,
    /// The key set at the end of the range when it changed within it.
    pub keys: Option<KeySet>,
}

#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub grant_id: Option<String>,
    pub subject: Option<String>,
    pub request_id: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub limit: usize,
}

/// A sidecar as last recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarRecord {
    pub node_id: String,
    pub datasets: Vec<String>,
    pub acked_revision: u64,
    pub acked_at_ms: i64,
    pub connected: bool,
    pub since_ms: i64,
    pub filter_version: String,
}

/// The storage of the control plane.
pub trait Store: Send + Sync + 'static {
    /// Runs `plan` on the current state inside one write transaction and
    /// commits what it returns at the next revision, or nothing when it fails.
    fn write(
        &self,
        plan: &mut dyn FnMut(&dyn Reader, WriteContext) -> Result<Change>,
    ) -> Result<Commit>;

    fn head(&self) -> Result<u64>;
    /// The oldest revision deltas can still start from (the log is compacted below it).
    fn floor(&self) -> Result<u64>;
    /// Forgets superseded events at or below `revision`; deltas from below it become impossible.
    fn compact(&self, revision: u64) -> Result<()>;
    /// When `revision` committed, Unix milliseconds.
    fn revision_time(&self, revision: u64) -> Result<Option<i64>>;

    fn grant(&self, id: &str) -> Result<Option<Grant>>;
    fn list(&self, filter: &GrantFilter) -> Result<Vec<Grant>>;
    /// Every grant's state at `revision`, which must be between floor and head.
    fn view(&self, revision: u64) -> Result<Vec<Grant>>;
    fn changes(&self, from: u64, to: u64) -> Result<Changes>;
    fn key_set(&self, revision: u64) -> Result<KeySet>;
    fn keys(&self) -> Result<Vec<StoredKey>>;

    /// Records an admin action that changes no grant (token issuance).
    fn append_change(&self, record: &ChangeRecord, time_ms: i64) -> Result<()>;
    /// Appends decision events; an event id already stored is skipped. Returns how many were new.
    fn append_decisions(&self, events: &[v1::DecisionEvent], time_ms: i64) -> Result<usize>;
    fn query_audit(&self, query: &AuditQuery) -> Result<Vec<v1::AuditRecord>>;

    fn save_sidecar(&self, sidecar: &SidecarRecord) -> Result<()>;
    fn sidecars(&self) -> Result<Vec<SidecarRecord>>;
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
