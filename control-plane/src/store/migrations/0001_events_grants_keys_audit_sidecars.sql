-- The first schema: the event log (revisions, events), the materialised
-- grants, the signing keys, the audit log and the sidecars.
CREATE TABLE revisions (
    revision INTEGER PRIMARY KEY,
    committed_ms INTEGER NOT NULL,
    keys BLOB
);
CREATE TABLE events (
    grant_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (grant_id, revision)
) WITHOUT ROWID;
CREATE INDEX events_by_revision ON events(revision);
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    grantee TEXT NOT NULL,
    parent TEXT,
    datasets TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE INDEX grants_by_parent ON grants(parent);
CREATE INDEX grants_by_subject ON grants(subject);
CREATE INDEX grants_by_grantee ON grants(grantee);
CREATE TABLE keys (
    kid TEXT PRIMARY KEY,
    secret BLOB NOT NULL,
    public BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    retire_after INTEGER NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    grant_id TEXT,
    subject TEXT,
    request_id TEXT,
    event_id TEXT UNIQUE,
    record BLOB NOT NULL
);
CREATE INDEX audit_by_grant ON audit(grant_id);
CREATE INDEX audit_by_subject ON audit(subject);
CREATE INDEX audit_by_request ON audit(request_id);
CREATE INDEX audit_by_time ON audit(time_ms);
CREATE TABLE sidecars (
    node_id TEXT PRIMARY KEY,
    datasets TEXT NOT NULL,
    acked_revision INTEGER NOT NULL,
    acked_at_ms INTEGER NOT NULL,
    connected INTEGER NOT NULL,
    since_ms INTEGER NOT NULL,
    filter_version TEXT NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
