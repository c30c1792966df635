//! The snapshot: the grants a sidecar holds at one revision, and the rules for
//! moving it forward. Updates apply whole or not at all: a duplicate is a
//! no-op, a gap or an out-of-order delta asks for a resync and changes nothing,
//! an older snapshot is refused.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use crate::decision::{GrantView, SyncState};
use crate::digest::Digest;
use crate::grant::{Grant, UnixSeconds};
use crate::token::KeySet;

/// A whole state, as reassembled from its chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullSnapshot {
    pub revision: u64,
    pub grants: Vec<Grant>,
    pub keys: KeySet,
    pub digest: Digest,
}

/// What changed in (from_revision, to_revision] for one sidecar's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub from_revision: u64,
    pub to_revision: u64,
    pub upserts: Vec<Grant>,
    pub removals: Vec<String>,
    /// Replaces the key set when present.
    pub keys: Option<KeySet>,
    /// When present, the digest the view must have after applying.
    pub digest: Option<Digest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    Snapshot(FullSnapshot),
    Delta(Delta),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Advanced {
        from: u64,
        to: u64,
    },
    /// Already held: nothing changed.
    Duplicate,
}

/// Every error means the same to a sidecar: ask for a snapshot, change nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("gap: holding revision {held}, delta starts at {from}")]
    Gap { held: u64, from: u64 },
    #[error("out of order: holding revision {held}, delta covers {from}..{to}")]
    OutOfOrder { held: u64, from: u64, to: u64 },
    #[error("snapshot at revision {offered} is older than the held revision {held}")]
    OlderSnapshot { held: u64, offered: u64 },
    #[error("digest mismatch at revision {revision}: expected {expected}, computed {computed}")]
    DigestMismatch {
        revision: u64,
        expected: String,
        computed: String,
    },
    #[error("invalid update: {0}")]
    Invalid(String),
}

/// A sidecar's (or a test's) in-memory view of the grants.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    revision: u64,
    last_contact: Option<UnixSeconds>,
    grants: HashMap<String, Grant>,
    /// (grantee, subject) → grant ids, for routes that take no token.
    by_pair: HashMap<(String, String), BTreeSet<String>>,
    keys: KeySet,
    digest: Digest,
}

impl Snapshot {
    pub fn new() -> Self {
        Snapshot::default()
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.grants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    pub fn is_synced(&self) -> bool {
        self.last_contact.is_some()
    }

    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// Records that the control plane was heard from (a heartbeat).
    pub fn touch(&mut self, now: UnixSeconds) {
        if self.last_contact.is_some() {
            self.last_contact = Some(now);
        }
    }

    pub fn apply(&mut self, update: Update, now: UnixSeconds) -> Result<Applied, ApplyError> {
        let applied = match update {
            Update::Snapshot(snapshot) => self.apply_snapshot(snapshot)?,
            Update::Delta(delta) => self.apply_delta(delta)?,
        };
        if matches!(applied, Applied::Advanced { .. }) || self.last_contact.is_some() {
            self.last_contact = Some(now);
        }
        Ok(applied)
    }

    fn apply_snapshot(&mut self, snapshot: FullSnapshot) -> Result<Applied, ApplyError> {
        if snapshot.revision < self.revision {
            return Err(ApplyError::OlderSnapshot {
                held: self.revision,
                offered: snapshot.revision,
            });
        }
        let mut grants = HashMap::with_capacity(snapshot.grants.len());
        for grant in snapshot.grants {
            let id = grant.id.clone();
            if grants.insert(id.clone(), grant).is_some() {
                return Err(ApplyError::Invalid(format!("grant {id} appears twice")));
            }
        }
        let computed = Digest::of(grants.values());
        if computed != snapshot.digest {
            return Err(mismatch(snapshot.revision, snapshot.digest, computed));
        }
        let from = self.revision;
        self.by_pair.clear();
        for grant in grants.values() {
            index(&mut self.by_pair, grant);
        }
        self.grants = grants;
        self.revision = snapshot.revision;
        self.keys = snapshot.keys;
        self.digest = computed;
        Ok(Applied::Advanced {
            from,
            to: snapshot.revision,
        })
    }

    fn apply_delta(&mut self, delta: Delta) -> Result<Applied, ApplyError> {
        let (held, from, to) = (self.revision, delta.from_revision, delta.to_revision);
        if to <= from {
            return Err(ApplyError::Invalid(format!(
                "delta goes from {from} to {to}"
            )));
        }
        if to <= held {
            return Ok(Applied::Duplicate);
        }
        if from > held {
            return Err(ApplyError::Gap { held, from });
        }
        if from < held {
            return Err(ApplyError::OutOfOrder { held, from, to });
        }

        // Compute the result before touching anything, so a bad delta changes nothing.
        let mut touched = BTreeSet::new();
        for id in delta.upserts.iter().map(|g| &g.id).chain(&delta.removals) {
            if !touched.insert(id.as_str()) {
                return Err(ApplyError::Invalid(format!(
                    "grant {id} appears twice in one delta"
                )));
            }
        }
        let mut digest = self.digest;
        for grant in &delta.upserts {
            if let Some(old) = self.grants.get(&grant.id) {
                digest.remove(old);
            }
            digest.add(grant);
        }
        for id in &delta.removals {
            if let Some(old) = self.grants.get(id) {
                digest.remove(old);
            }
        }
        if let Some(expected) = delta.digest
            && expected != digest
        {
            return Err(mismatch(to, expected, digest));
        }

        for id in &delta.removals {
            if let Some(old) = self.grants.remove(id) {
                unindex(&mut self.by_pair, &old);
            }
        }
        for grant in delta.upserts {
            if let Some(old) = self.grants.get(&grant.id) {
                unindex(&mut self.by_pair, old);
            }
            index(&mut self.by_pair, &grant);
            self.grants.insert(grant.id.clone(), grant);
        }
        if let Some(keys) = delta.keys {
            self.keys = keys;
        }
        self.digest = digest;
        self.revision = to;
        Ok(Applied::Advanced { from, to })
    }
}

fn mismatch(revision: u64, expected: Digest, computed: Digest) -> ApplyError {
    ApplyError::DigestMismatch {
        revision,
        expected: expected.to_hex(),
        computed: computed.to_hex(),
    }
}

fn index(by_pair: &mut HashMap<(String, String), BTreeSet<String>>, grant: &Grant) {
    by_pair
        .entry((grant.grantee.clone(), grant.subject.clone()))
        .or_default()
        .insert(grant.id.clone());
}

fn unindex(by_pair: &mut HashMap<(String, String), BTreeSet<String>>, grant: &Grant) {
    let key = (grant.grantee.clone(), grant.subject.clone());
    if let Some(ids) = by_pair.get_mut(&key) {
        ids.remove(&grant.id);
        if ids.is_empty() {
            by_pair.remove(&key);
        }
    }
}

impl GrantView for Snapshot {
    fn grant(&self, id: &str) -> Option<Cow<'_, Grant>> {
        self.grants.get(id).map(Cow::Borrowed)
    }

    fn grant_ids_for(&self, grantee: &str, subject: &str) -> Vec<String> {
        self.by_pair
            .get(&(grantee.to_owned(), subject.to_owned()))
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn sync_state(&self) -> Option<SyncState> {
        self.last_contact.map(|last_contact| SyncState {
            revision: self.revision,
            last_contact,
        })
    }
}

/// One chunk of a snapshot, as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    pub revision: u64,
    pub index: u32,
    pub total: u32,
    pub grants: Vec<Grant>,
    /// Present on the last chunk only.
    pub keys: Option<KeySet>,
    /// Present on the last chunk only.
    pub digest: Option<Digest>,
}

/// Collects the chunks of one snapshot in order. A chunk out of order drops
/// what was collected: the sidecar then asks for the snapshot again.
#[derive(Clone, Debug, Default)]
pub struct SnapshotAssembler {
    partial: Option<(u64, u32, u32, Vec<Grant>)>,
}

impl SnapshotAssembler {
    /// Most chunks one snapshot may have; bounds what a sidecar buffers.
    pub const MAX_CHUNKS: u32 = 1 << 16;

    pub fn push(&mut self, chunk: SnapshotChunk) -> Result<Option<FullSnapshot>, ApplyError> {
        if chunk.total == 0 || chunk.total > Self::MAX_CHUNKS || chunk.index >= chunk.total {
            self.partial = None;
            return Err(ApplyError::Invalid(format!(
                "snapshot chunk {} of {}",
                chunk.index, chunk.total
            )));
        }
        let mut partial = match self.partial.take() {
            None if chunk.index == 0 => (chunk.revision, chunk.total, 0, Vec::new()),
            Some((revision, total, next, grants))
                if chunk.index == next && revision == chunk.revision && total == chunk.total =>
            {
                (revision, total, next, grants)
            }
            _ if chunk.index == 0 => (chunk.revision, chunk.total, 0, Vec::new()),
            _ => {
                return Err(ApplyError::Invalid(format!(
                    "snapshot chunk {} of {} at revision {} arrived out of order",
                    chunk.index, chunk.total, chunk.revision
                )));
            }
        };
        partial.3.extend(chunk.grants);
        partial.2 += 1;
        if partial.2 < partial.1 {
            self.partial = Some(partial);
            return Ok(None);
        }
        let (Some(keys), Some(digest)) = (chunk.keys, chunk.digest) else {
            return Err(ApplyError::Invalid(
                "the last snapshot chunk has no keys or digest".into(),
            ));
        };
        Ok(Some(FullSnapshot {
            revision: partial.0,
            grants: partial.3,
            keys,
            digest,
        }))
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
