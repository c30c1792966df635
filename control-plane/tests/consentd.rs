//! consentd end to end: a real server over loopback on an ephemeral port with a
//! real SQLite file in a temporary directory, test sidecars that apply what they
//! receive with consent-core's own `Snapshot` rules, and the built binaries for
//! the crash and CLI tests.

#[path = "consentd/common.rs"]
mod common;

#[path = "consentd/admin.rs"]
mod admin;
#[path = "consentd/auth.rs"]
mod auth;
#[path = "consentd/crash.rs"]
mod crash;
#[path = "consentd/sync.rs"]
mod sync;
