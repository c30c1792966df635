//! The SQLite store: one file, WAL, migrations applied at open. One connection
//! writes (it serialises revision allocation; `BEGIN IMMEDIATE` makes the
//! revision part of the writing transaction), a small pool reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use consent_core::wire::v1;
use consent_core::{Grant, KeySet, Status};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    AuditQuery, Change, ChangeRecord, Changes, Commit, GrantFilter, Reader, Result, SidecarRecord,
    StatusFilter, Store, StoreError, StoredKey, WriteContext, key_set_of, now_ms,
};

/// Schema migrations, applied in order; `PRAGMA user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[include_str!(
    "migrations/0001_events_grants_keys_audit_sidecars.sql"
)];

const READERS: usize = 4;

pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn sql(e: rusqlite::Error) -> StoreError {
    StoreError::internal(e)
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql)?;
    // FULL: a write acknowledged to a client survives power loss, not only a crash.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(sql)?;
    Ok(conn)
}

fn encode(grant: &Grant) -> Vec<u8> {
    v1::Grant::from(grant).encode_to_vec()
}

fn decode(bytes: &[u8]) -> Result<Grant> {
    let wire = v1::Grant::decode(bytes).map_err(StoreError::internal)?;
    Grant::try_from(wire).map_err(StoreError::internal)
}

fn decode_keys(bytes: &[u8]) -> Result<KeySet> {
    let wire = v1::KeySet::decode(bytes).map_err(StoreError::internal)?;
    KeySet::try_from(wire).map_err(StoreError::internal)
}

fn joined(names: &std::collections::BTreeSet<String>) -> String {
    // Names never contain a comma, so ",a,b," lets `instr` match one exactly.
    let mut out = String::from(",");
    for n in names {
        out.push_str(n);
        out.push(',');
    }
    out
}

impl SqliteStore {
    /// Opens (creating on first start) the database at `path` and migrates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut writer = open_connection(&path)?;
        migrate(&mut writer)?;
        Ok(SqliteStore {
            path,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.readers.lock().expect("reader pool").pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().expect("reader pool");
        if pool.len() < READERS {
            pool.push(conn);
        }
        out
    }

    /// Reads inside one transaction so that several queries see one state.
    fn read_tx<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let conn = self.readers.lock().expect("reader pool").pop();
        let mut conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let out = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(sql)?;
            let out = f(&tx)?;
            tx.commit().map_err(sql)?;
            Ok(out)
        })();
        let mut pool = self.readers.lock().expect("reader pool");
        if pool.len() < READERS {
            pool.push(conn);
        }
        out
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "database schema version {version} is newer than this consentd ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        tx.execute_batch(migration).map_err(sql)?;
        tx.pragma_update(None, "user_version", i + 1).map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
    Ok(())
}

fn head_of(conn: &Connection) -> Result<u64> {
    conn.query_row(
        "SELECT COALESCE(MAX(revision), 0) FROM revisions",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v as u64)
    .map_err(sql)
}

fn grant_of(conn: &Connection, id: &str) -> Result<Option<Grant>> {
    conn.query_row("SELECT state FROM grants WHERE id = ?1", [id], |r| {
        r.get::<_, Vec<u8>>(0)
    })
    .optional()
    .map_err(sql)?
    .map(|b| decode(&b))
    .transpose()
}

fn keys_of(conn: &Connection) -> Result<Vec<StoredKey>> {
    let mut stmt = conn
        .prepare("SELECT kid, secret, public, created_ms, retire_after FROM keys ORDER BY created_ms, kid")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })
        .map_err(sql)?;
    let mut keys = Vec::new();
    for row in rows {
        let (kid, secret, public, created_ms, retire_after) = row.map_err(sql)?;
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| StoreError::Internal(format!("key {kid}: bad public key")))?;
        keys.push(StoredKey {
            kid,
            secret,
            public,
            created_ms,
            retire_after,
        });
    }
    Ok(keys)
}

/// The state of `id` at `revision`, from the log.
fn state_at(conn: &Connection, id: &str, revision: u64) -> Result<Option<Grant>> {
    conn.query_row(
        "SELECT state FROM events WHERE grant_id = ?1 AND revision <= ?2 ORDER BY revision DESC LIMIT 1",
        params![id, revision as i64],
        |r| r.get::<_, Vec<u8>>(0),
    )
    .optional()
    .map_err(sql)?
    .map(|b| decode(&b))
    .transpose()
}

struct TxReader<'a>(&'a Transaction<'a>);

impl Reader for TxReader<'_> {
    fn grant(&self, id: &str) -> Result<Option<Grant>> {
        grant_of(self.0, id)
    }

    fn children(&self, id: &str) -> Result<Vec<Grant>> {
        let mut stmt = self
            .0
            .prepare("SELECT state FROM grants WHERE parent = ?1 ORDER BY id")
            .map_err(sql)?;
        let rows = stmt
            .query_map([id], |r| r.get::<_, Vec<u8>>(0))
            .map_err(sql)?;
        rows.map(|b| decode(&b.map_err(sql)?)).collect()
    }

    fn keys(&self) -> Result<Vec<StoredKey>> {
        keys_of(self.0)
    }
}

fn status_name(grant: &Grant) -> &'static str {
    match grant.status {
        Status::Active => "active",
        Status::Revoked(_) => "revoked",
        Status::Expired => "expired",
    }
}

fn commit_change(tx: &Transaction<'_>, ctx: WriteContext, change: &mut Change) -> Result<bool> {
    let rev = ctx.revision as i64;
    let keys_blob = match &change.keys {
        Some(keys) => Some(v1::KeySet::from(&key_set_of(keys)?).encode_to_vec()),
        None => None,
    };
    tx.execute(
        "INSERT INTO revisions (revision, committed_ms, keys) VALUES (?1, ?2, ?3)",
        params![rev, ctx.now_ms, keys_blob],
    )
    .map_err(sql)?;
    for grant in &mut change.grants {
        grant.revision = ctx.revision;
        let state = encode(grant);
        tx.execute(
            "INSERT INTO events (grant_id, revision, state) VALUES (?1, ?2, ?3)",
            params![grant.id, rev, state],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT INTO grants (id, subject, grantee, parent, datasets, status, expires_at, revision, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(id) DO UPDATE SET subject = excluded.subject, grantee = excluded.grantee,
               parent = excluded.parent, datasets = excluded.datasets, status = excluded.status,
               expires_at = excluded.expires_at, revision = excluded.revision, state = excluded.state",
            params![
                grant.id,
                grant.subject,
                grant.grantee,
                grant.parent,
                joined(&grant.datasets),
                status_name(grant),
                grant.expires_at,
                rev,
                state
            ],
        )
        .map_err(sql)?;
    }
    if let Some(keys) = &change.keys {
        tx.execute("DELETE FROM keys", []).map_err(sql)?;
        for k in keys {
            tx.execute(
                "INSERT INTO keys (kid, secret, public, created_ms, retire_after) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![k.kid, k.secret, k.public.to_vec(), k.created_ms, k.retire_after],
            )
            .map_err(sql)?;
        }
    }
    for record in &change.audit {
        insert_change(tx, record, ctx.revision, ctx.now_ms)?;
    }
    Ok(change.keys.is_some())
}

fn insert_change(
    conn: &Connection,
    record: &ChangeRecord,
    revision: u64,
    time_ms: i64,
) -> Result<()> {
    let wire = v1::AdminChange {
        kind: record.kind.to_owned(),
        actor: record.actor.clone(),
        grant_id: record.grant_id.clone(),
        revision,
        detail: record.detail.clone(),
    };
    conn.execute(
        "INSERT INTO audit (time_ms, kind, grant_id, subject, record) VALUES (?1, 'change', ?2, ?3, ?4)",
        params![time_ms, record.grant_id, record.subject, wire.encode_to_vec()],
    )
    .map_err(sql)?;
    Ok(())
}

impl Store for SqliteStore {
    fn write(
        &self,
        plan: &mut dyn FnMut(&dyn Reader, WriteContext) -> Result<Change>,
    ) -> Result<Commit> {
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| StoreError::Internal("writer poisoned".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let head = head_of(&tx)?;
        // Never before the previous commit, so commit times follow revisions;
        // the head's time is therefore the latest (read by primary key: a MAX
        // over committed_ms would scan the whole log on every write).
        let last_ms: i64 = tx
            .query_row(
                "SELECT COALESCE((SELECT committed_ms FROM revisions \
                 ORDER BY revision DESC LIMIT 1), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(sql)?;
        let ctx = WriteContext {
            revision: head + 1,
            now_ms: now_ms().max(last_ms),
        };
        let mut change = plan(&TxReader(&tx), ctx)?;
        let keys_changed = commit_change(&tx, ctx, &mut change)?;
        tx.commit().map_err(sql)?;
        Ok(Commit {
            revision: ctx.revision,
            committed_ms: ctx.now_ms,
            grants: change.grants,
            keys_changed,
        })
    }

    fn head(&self) -> Result<u64> {
        self.read(head_of)
    }

    fn floor(&self) -> Result<u64> {
        self.read(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'floor'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(sql)
        })
    }

    fn compact(&self, revision: u64) -> Result<()> {
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| StoreError::Internal("writer poisoned".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let rev = revision.min(head_of(&tx)?) as i64;
        tx.execute(
            "DELETE FROM events WHERE revision <= ?1 AND revision < (
                 SELECT MAX(e.revision) FROM events e WHERE e.grant_id = events.grant_id AND e.revision <= ?1)",
            [rev],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('floor', ?1)
             ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
            [rev],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    fn revision_time(&self, revision: u64) -> Result<Option<i64>> {
        self.read(|c| {
            c.query_row(
                "SELECT committed_ms FROM revisions WHERE revision = ?1",
                [revision as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)
        })
    }

    fn grant(&self, id: &str) -> Result<Option<Grant>> {
        self.read(|c| grant_of(c, id))
    }

    fn list(&self, filter: &GrantFilter) -> Result<Vec<Grant>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT state FROM grants
                     WHERE (?1 IS NULL OR subject = ?1)
                       AND (?2 IS NULL OR grantee = ?2)
                       AND (?3 IS NULL OR instr(datasets, ',' || ?3 || ',') > 0)
                       AND (?4 IS NULL
                            OR (?4 = 'active' AND status = 'active' AND expires_at > ?7)
                            OR (?4 = 'revoked' AND status = 'revoked')
                            OR (?4 = 'expired' AND (status = 'expired' OR (status = 'active' AND expires_at <= ?7))))
                       AND (?5 IS NULL OR id > ?5)
                     ORDER BY id LIMIT ?6",
                )
                .map_err(sql)?;
            let status = filter.status.map(|s| match s {
                StatusFilter::Active => "active",
                StatusFilter::Revoked => "revoked",
                StatusFilter::Expired => "expired",
            });
            let rows = stmt
                .query_map(
                    params![
                        filter.subject,
                        filter.grantee,
                        filter.dataset,
                        status,
                        filter.after,
                        filter.limit as i64,
                        filter.now
                    ],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .map_err(sql)?;
            rows.map(|b| decode(&b.map_err(sql)?)).collect()
        })
    }

    fn view(&self, revision: u64) -> Result<Vec<Grant>> {
        self.read_tx(|tx| {
            if revision >= head_of(tx)? {
                let mut stmt = tx.prepare("SELECT state FROM grants").map_err(sql)?;
                let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
                return rows.map(|b| decode(&b.map_err(sql)?)).collect();
            }
            let mut stmt = tx
                .prepare(
                    "SELECT state FROM events e WHERE e.revision = (
                         SELECT MAX(revision) FROM events WHERE grant_id = e.grant_id AND revision <= ?1)",
                )
                .map_err(sql)?;
            let rows = stmt.query_map([revision as i64], |r| r.get::<_, Vec<u8>>(0)).map_err(sql)?;
            rows.map(|b| decode(&b.map_err(sql)?)).collect()
        })
    }

    fn changes(&self, from: u64, to: u64) -> Result<Changes> {
        self.read_tx(|tx| {
            let mut latest: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
            {
                let mut stmt = tx
                    .prepare("SELECT grant_id, revision, state FROM events WHERE revision > ?1 AND revision <= ?2")
                    .map_err(sql)?;
                let rows = stmt
                    .query_map(params![from as i64, to as i64], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, Vec<u8>>(2)?))
                    })
                    .map_err(sql)?;
                for row in rows {
                    let (id, rev, state) = row.map_err(sql)?;
                    match latest.get(&id) {
                        Some((held, _)) if *held >= rev => {}
                        _ => {
                            latest.insert(id, (rev, state));
                        }
                    }
                }
            }
            let mut grants = Vec::with_capacity(latest.len());
            for (id, (_, state)) in latest {
                grants.push((state_at(tx, &id, from)?, decode(&state)?));
            }
            grants.sort_by(|a, b| a.1.id.cmp(&b.1.id));
            let keys_changed: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM revisions WHERE revision > ?1 AND revision <= ?2 AND keys IS NOT NULL)",
                    params![from as i64, to as i64],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            let keys = if keys_changed { Some(key_set_at(tx, to)?) } else { None };
            Ok(Changes { grants, keys })
        })
    }

    fn key_set(&self, revision: u64) -> Result<KeySet> {
        self.read(|c| key_set_at(c, revision))
    }

    fn keys(&self) -> Result<Vec<StoredKey>> {
        self.read(keys_of)
    }

    fn append_change(&self, record: &ChangeRecord, time_ms: i64) -> Result<()> {
        let conn = self
            .writer
            .lock()
            .map_err(|_| StoreError::Internal("writer poisoned".into()))?;
        insert_change(&conn, record, 0, time_ms)
    }

    fn append_decisions(&self, events: &[v1::DecisionEvent], time_ms: i64) -> Result<usize> {
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| StoreError::Internal("writer poisoned".into()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let mut added = 0;
        for event in events {
            added += tx
                .execute(
                    "INSERT INTO audit (time_ms, kind, grant_id, subject, request_id, event_id, record)
                     VALUES (?1, 'decision', ?2, ?3, ?4, ?5, ?6) ON CONFLICT(event_id) DO NOTHING",
                    params![
                        if event.time_ms > 0 { event.time_ms } else { time_ms },
                        event.grant_id,
                        event.subject,
                        event.request_id,
                        event.event_id,
                        event.encode_to_vec()
                    ],
                )
                .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(added)
    }

    fn query_audit(&self, q: &AuditQuery) -> Result<Vec<v1::AuditRecord>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT seq, time_ms, kind, record FROM audit
                     WHERE (?1 IS NULL OR grant_id = ?1) AND (?2 IS NULL OR subject = ?2)
                       AND (?3 IS NULL OR request_id = ?3)
                       AND (?4 IS NULL OR time_ms >= ?4) AND (?5 IS NULL OR time_ms <= ?5)
                     ORDER BY seq LIMIT ?6",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(
                    params![
                        q.grant_id,
                        q.subject,
                        q.request_id,
                        q.from_ms,
                        q.to_ms,
                        q.limit as i64
                    ],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                        ))
                    },
                )
                .map_err(sql)?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, time_ms, kind, record) = row.map_err(sql)?;
                let record = if kind == "decision" {
                    v1::audit_record::Record::Decision(
                        v1::DecisionEvent::decode(record.as_slice())
                            .map_err(StoreError::internal)?,
                    )
                } else {
                    v1::audit_record::Record::Change(
                        v1::AdminChange::decode(record.as_slice()).map_err(StoreError::internal)?,
                    )
                };
                out.push(v1::AuditRecord {
                    seq: seq as u64,
                    time_ms,
                    record: Some(record),
                });
            }
            Ok(out)
        })
    }

    fn save_sidecar(&self, s: &SidecarRecord) -> Result<()> {
        let conn = self
            .writer
            .lock()
            .map_err(|_| StoreError::Internal("writer poisoned".into()))?;
        conn.execute(
            "INSERT INTO sidecars (node_id, datasets, acked_revision, acked_at_ms, connected, since_ms, filter_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(node_id) DO UPDATE SET datasets = excluded.datasets,
               acked_revision = excluded.acked_revision, acked_at_ms = excluded.acked_at_ms,
               connected = excluded.connected, since_ms = excluded.since_ms,
               filter_version = excluded.filter_version",
            params![
                s.node_id,
                s.datasets.join(","),
                s.acked_revision as i64,
                s.acked_at_ms,
                s.connected,
                s.since_ms,
                s.filter_version
            ],
        )
        .map_err(sql)?;
        Ok(())
    }

    fn sidecars(&self) -> Result<Vec<SidecarRecord>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT node_id, datasets, acked_revision, acked_at_ms, connected, since_ms, filter_version
                     FROM sidecars ORDER BY node_id",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |r| {
                    let datasets: String = r.get(1)?;
                    Ok(SidecarRecord {
                        node_id: r.get(0)?,
                        datasets: datasets.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
                        acked_revision: r.get::<_, i64>(2)? as u64,
                        acked_at_ms: r.get(3)?,
                        connected: r.get(4)?,
                        since_ms: r.get(5)?,
                        filter_version: r.get(6)?,
                    })
                })
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)
        })
    }
}

fn key_set_at(conn: &Connection, revision: u64) -> Result<KeySet> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT keys FROM revisions WHERE revision <= ?1 AND keys IS NOT NULL ORDER BY revision DESC LIMIT 1",
            [revision as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql)?;
    match blob {
        Some(b) => decode_keys(&b),
        None => Ok(KeySet::default()),
    }
}
