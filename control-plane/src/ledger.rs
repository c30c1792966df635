//! The rules of a write, as plans the store runs inside its transaction:
//! create (a child inside its parent), amend (narrowing only), revoke
//! (cascading to every descendant in the same revision), rotate the signing key.
//! They read through [`Reader`], so the checks and the write see one state.

use std::collections::BTreeSet;

use consent_core::grant::check_id;
use consent_core::{Grant, Limits, Permission, Revocation, SigningKey, Status};

use crate::store::{Change, ChangeRecord, Reader, Result, StoreError, StoredKey, WriteContext};

/// A narrowing: each `Some` replaces the grant's field.
#[derive(Clone, Debug, Default)]
pub struct Amendment {
    pub purposes: Option<BTreeSet<String>>,
    pub datasets: Option<BTreeSet<String>>,
    pub actions: Option<BTreeSet<String>>,
    pub permissions: Option<BTreeSet<Permission>>,
    pub not_before: Option<i64>,
    pub expires_at: Option<i64>,
}

pub fn check_actor(actor: &str) -> Result<()> {
    check_id("actor", actor).map_err(StoreError::from)
}

fn describe(grant: &Grant) -> String {
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
    format!(
        "datasets={} actions={} purposes={} permissions={} not_before={} expires_at={}",
        list(&grant.datasets),
        list(&grant.actions),
        list(&grant.purposes),
        grant
            .permissions
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(","),
        grant.not_before,
        grant.expires_at
    )
}

pub fn create(
    reader: &dyn Reader,
    ctx: WriteContext,
    mut grant: Grant,
    actor: &str,
    limits: &Limits,
) -> Result<Change> {
    check_actor(actor)?;
    grant.status = Status::Active;
    grant.revision = ctx.revision;
    grant.validate(limits)?;
    if grant.expires_at <= ctx.now_secs() {
        return Err(StoreError::invalid("expires_at", "is in the past"));
    }
    if reader.grant(&grant.id)?.is_some() {
        return Err(StoreError::AlreadyExists(format!(
            "grant {:?} already exists",
            grant.id
        )));
    }
    if let Some(parent_id) = &grant.parent {
        let parent = reader.grant(parent_id)?.ok_or_else(|| {
            StoreError::invalid("parent", format!("grant {parent_id:?} does not exist"))
        })?;
        if parent.expires_at <= ctx.now_secs() {
            return Err(StoreError::invalid(
                "parent",
                format!("{parent_id} has expired"),
            ));
        }
        grant.validate_child_of(&parent)?;
    }
    let record = ChangeRecord {
        kind: "create",
        actor: actor.to_owned(),
        grant_id: grant.id.clone(),
        subject: grant.subject.clone(),
        detail: describe(&grant),
    };
    Ok(Change {
        grants: vec![grant],
        keys: None,
        audit: vec![record],
    })
}

pub fn amend(
    reader: &dyn Reader,
    ctx: WriteContext,
    id: &str,
    amendment: &Amendment,
    actor: &str,
    reason: &str,
    limits: &Limits,
) -> Result<Change> {
    check_actor(actor)?;
    let old = reader.grant(id)?.ok_or_else(|| StoreError::NotFound {
        what: "grant",
        id: id.into(),
    })?;
    if !matches!(old.status, Status::Active) {
        return Err(StoreError::FailedPrecondition(format!(
            "grant {id} is {} and cannot be amended",
            old.status.name()
        )));
    }
    let mut new = old.clone();
    if let Some(v) = &amendment.purposes {
        new.purposes = v.clone();
    }
    if let Some(v) = &amendment.datasets {
        new.datasets = v.clone();
    }
    if let Some(v) = &amendment.actions {
        new.actions = v.clone();
    }
    if let Some(v) = &amendment.permissions {
        new.permissions = v.clone();
    }
    if let Some(v) = amendment.not_before {
        new.not_before = v;
    }
    if let Some(v) = amendment.expires_at {
        new.expires_at = v;
    }
    new.validate(limits)?;
    new.validate_narrowing_of(&old)?;
    if new == old {
        return Err(StoreError::invalid("id", "the amendment changes nothing"));
    }
    // A child never exceeds its parent: refuse a narrowing that an active child would exceed.
    for child in reader.children(id)? {
        if !matches!(child.status, Status::Active) {
            continue;
        }
        if let Err(e) = child.validate_child_of(&new) {
            return Err(StoreError::invalid(
                e.field,
                format!(
                    "child grant {} would exceed the amended grant ({}); amend or revoke it first",
                    child.id, e.problem
                ),
            ));
        }
    }
    new.revision = ctx.revision;
    let record = ChangeRecord {
        kind: "amend",
        actor: actor.to_owned(),
        grant_id: id.to_owned(),
        subject: new.subject.clone(),
        detail: format!("{}; reason: {reason}", describe(&new)),
    };
    Ok(Change {
        grants: vec![new],
        keys: None,
        audit: vec![record],
    })
}

pub fn revoke(
    reader: &dyn Reader,
    ctx: WriteContext,
    id: &str,
    actor: &str,
    reason: &str,
) -> Result<Change> {
    check_actor(actor)?;
    if reason.trim().is_empty() {
        return Err(StoreError::invalid("reason", "must not be empty"));
    }
    let root = reader.grant(id)?.ok_or_else(|| StoreError::NotFound {
        what: "grant",
        id: id.into(),
    })?;
    if root.is_revoked() {
        return Err(StoreError::FailedPrecondition(format!(
            "grant {id} is already revoked"
        )));
    }
    let revocation = |cascaded_from: Option<String>| {
        Status::Revoked(Revocation {
            revoked_by: actor.to_owned(),
            revoked_at: ctx.now_secs(),
            reason: reason.to_owned(),
            cascaded_from,
        })
    };
    let mut grants = vec![Grant {
        status: revocation(None),
        ..root
    }];
    let mut audit = Vec::new();
    // Breadth first, so the response lists the grant itself first, then its descendants.
    let mut i = 0;
    while i < grants.len() {
        let parent_id = grants[i].id.clone();
        for child in reader.children(&parent_id)? {
            if child.is_revoked() || grants.iter().any(|g| g.id == child.id) {
                continue;
            }
            grants.push(Grant {
                status: revocation(Some(id.to_owned())),
                ..child
            });
        }
        i += 1;
    }
    for g in &mut grants {
        g.revision = ctx.revision;
        let detail = match &g.status {
            Status::Revoked(Revocation {
                cascaded_from: Some(from),
                ..
            }) => {
                format!("reason: {reason}; cascaded from {from}")
            }
            _ => format!("reason: {reason}"),
        };
        audit.push(ChangeRecord {
            kind: "revoke",
            actor: actor.to_owned(),
            grant_id: g.id.clone(),
            subject: g.subject.clone(),
            detail,
        });
    }
    Ok(Change {
        grants,
        keys: None,
        audit,
    })
}

/// A fresh key id: short, unique, of the characters a `kid` allows.
pub fn new_kid() -> String {
    format!("k-{:016x}", rand::random::<u64>())
}

/// Makes a new signing key current. The previous keys stay in the streamed set
/// until no token they signed can still be valid; keys past that are dropped.
pub fn rotate(
    reader: &dyn Reader,
    ctx: WriteContext,
    actor: &str,
    retire_after_secs: i64,
) -> Result<(Change, String)> {
    check_actor(actor)?;
    let now = ctx.now_secs();
    let mut keys: Vec<StoredKey> = reader
        .keys()?
        .into_iter()
        .filter(|k| k.retire_after == 0 || k.retire_after >= now)
        .collect();
    for k in &mut keys {
        if k.retire_after == 0 {
            k.retire_after = now + retire_after_secs;
        }
    }
    let key = SigningKey::generate(&new_kid()).map_err(StoreError::internal)?;
    let kid = key.kid().to_owned();
    keys.push(StoredKey::from_signing(&key, ctx.now_ms));
    let record = ChangeRecord {
        kind: "rotate_key",
        actor: actor.to_owned(),
        grant_id: String::new(),
        subject: String::new(),
        detail: format!("new signing key {kid}"),
    };
    Ok((
        Change {
            grants: Vec::new(),
            keys: Some(keys),
            audit: vec![record],
        },
        kid,
    ))
}
