//! consent-core: the grant model, the decision engine, consent tokens and the
//! wire types. It has no I/O, so the same code decides inside the wasm filter,
//! in the control plane and in benches.

#![forbid(unsafe_code)]

pub mod decision;
pub mod digest;
pub mod grant;
pub mod reason;
pub mod snapshot;
pub mod token;
pub mod wire;

pub use decision::{
    Decision, Enforcement, GrantView, Mode, OnStale, Request, RoutePolicy, SyncState,
    TokenEvidence, Verdict, decide, enforce,
};
pub use digest::Digest;
pub use grant::{Grant, GrantError, Limits, Permission, Revocation, Status, UnixSeconds};
pub use reason::Reason;
pub use snapshot::{Applied, ApplyError, Delta, FullSnapshot, Snapshot, SnapshotAssembler, Update};
pub use token::{
    ConsentClaims, KeySet, SigningKey, TokenError, VerifyOptions, VerifyingKey, issue, verify,
};
