//! The snapshot in shared data: written by the leader, read by every worker
//! through a [`GrantView`]. Shared data is one process-wide map that cannot
//! delete keys, so an empty value means absent, and every key starts with the
//! plugin prefix `P` (Istio gives all plugins of a proxy one namespace).
//!
//! Layout (`G` is the generation, bumped by every full snapshot):
//!
//! | key | value |
//! |---|---|
//! | `P meta` | [`Meta`]: generation, revision, last contact, key-set version, id chunks, digest (72 bytes) |
//! | `P lease` | the sync leader's lease (see `sync.rs`) |
//! | `P keys` | the token key set, prost `consent.v1.KeySet` |
//! | `P g{G}/{grant id}` | one grant, prost `consent.v1.Grant` |
//! | `P p{G}/{grantee}\0{subject}` | ids of that pair's grants, `\n`-separated (token-less routes) |
//! | `P i{G}/{n}` | chunk `n` of every held grant id, `\n`-separated (a new leader reloads from it) |
//!
//! A full snapshot is written into a fresh generation and becomes visible at
//! once when `meta` names it, so readers never mix two snapshots and keys of
//! grants that left the view can never be read again; the old generation is
//! then blanked. A delta rewrites keys in place, then `meta`. Ids never
//! contain NUL or `\n` (consent-core's `check_id`), so both are safe separators.

use std::borrow::Cow;

use consent_core::wire::v1;
use consent_core::{Digest, Grant, GrantView, KeySet, Snapshot, SyncState, UnixSeconds};
use prost::Message;

/// Shared data as the filter needs it; the host or an in-memory fake.
pub trait SharedData {
    /// The value and its CAS; `None` when the key is missing or empty.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Sets a value; `cas == 0` sets unconditionally.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("shared data {0}: compare-and-swap mismatch")]
    CasMismatch(String),
    #[error("shared data {key}: host status {status}")]
    Host { key: String, status: String },
}

/// Largest id-list chunk; keeps one shared-data copy small.
const ID_CHUNK_BYTES: usize = 32 * 1024;
const META_LEN: usize = 72;

/// The state that every request reads first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub generation: u32,
    pub revision: u64,
    pub last_contact: UnixSeconds,
    /// Changes whenever `P keys` is rewritten: workers re-parse the key set
    /// and drop their token caches when it moves.
    pub keys_version: u64,
    pub id_chunks: u32,
    pub digest: Digest,
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.revision.to_le_bytes());
        out.extend_from_slice(&self.last_contact.to_le_bytes());
        out.extend_from_slice(&self.keys_version.to_le_bytes());
        out.extend_from_slice(&self.id_chunks.to_le_bytes());
        out.extend_from_slice(&self.digest.to_bytes());
        out.extend_from_slice(&[0; 8]);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Meta> {
        if bytes.len() != META_LEN {
            return None;
        }
        let u32_at = |i: usize| bytes.get(i..i + 4)?.try_into().ok().map(u32::from_le_bytes);
        let u64_at = |i: usize| bytes.get(i..i + 8)?.try_into().ok().map(u64::from_le_bytes);
        Some(Meta {
            generation: u32_at(0)?,
            revision: u64_at(4)?,
            last_contact: u64_at(12)? as i64,
            keys_version: u64_at(20)?,
            id_chunks: u32_at(28)?,
            digest: Digest::from_bytes(bytes.get(32..64)?)?,
        })
    }
}

/// Builds the keys of one plugin's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }
    pub fn meta(&self) -> String {
        format!("{}meta", self.prefix)
    }
    pub fn lease(&self) -> String {
        format!("{}lease", self.prefix)
    }
    pub fn key_set(&self) -> String {
        format!("{}keys", self.prefix)
    }
    pub fn queue(&self) -> String {
        format!("{}audit", self.prefix)
    }
    pub fn grant(&self, generation: u32, id: &str) -> String {
        format!("{}g{generation}/{id}", self.prefix)
    }
    pub fn pair(&self, generation: u32, grantee: &str, subject: &str) -> String {
        format!("{}p{generation}/{grantee}\0{subject}", self.prefix)
    }
    pub fn ids(&self, generation: u32, chunk: u32) -> String {
        format!("{}i{generation}/{chunk}", self.prefix)
    }
}

pub fn read_meta(data: &impl SharedData, keys: &Keys) -> Option<(Meta, u32)> {
    let (bytes, cas) = data.get(&keys.meta())?;
    Meta::decode(&bytes).map(|m| (m, cas))
}

/// Reads the key set; an undecodable one is treated as empty (every token
/// then fails as unknown-key, which is the safe side).
pub fn read_key_set(data: &impl SharedData, keys: &Keys) -> KeySet {
    data.get(&keys.key_set())
        .and_then(|(bytes, _)| v1::KeySet::decode(bytes.as_slice()).ok())
        .and_then(|w| KeySet::try_from(w).ok())
        .unwrap_or_default()
}

pub fn encode_grant(grant: &Grant) -> Vec<u8> {
    v1::Grant::from(grant).encode_to_vec()
}

pub fn decode_grant(bytes: &[u8]) -> Option<Grant> {
    Grant::try_from(v1::Grant::decode(bytes).ok()?).ok()
}

/// A worker's view of the snapshot in shared data, pinned to one `meta` read.
pub struct SharedView<'a, S: SharedData> {
    data: &'a S,
    keys: &'a Keys,
    meta: Option<Meta>,
}

impl<'a, S: SharedData> SharedView<'a, S> {
    pub fn new(data: &'a S, keys: &'a Keys) -> Self {
        let meta = read_meta(data, keys).map(|(m, _)| m);
        SharedView { data, keys, meta }
    }

    pub fn meta(&self) -> Option<Meta> {
        self.meta
    }
}

impl<S: SharedData> GrantView for SharedView<'_, S> {
    fn grant(&self, id: &str) -> Option<Cow<'_, Grant>> {
        let meta = self.meta?;
        let (bytes, _) = self.data.get(&self.keys.grant(meta.generation, id))?;
        decode_grant(&bytes).filter(|g| g.id == id).map(Cow::Owned)
    }

    fn grant_ids_for(&self, grantee: &str, subject: &str) -> Vec<String> {
        let Some(meta) = self.meta else {
            return Vec::new();
        };
        self.data
            .get(&self.keys.pair(meta.generation, grantee, subject))
            .and_then(|(bytes, _)| String::from_utf8(bytes).ok())
            .map(|s| {
                s.split('\n')
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sync_state(&self) -> Option<SyncState> {
        self.meta.map(|m| SyncState {
            revision: m.revision,
            last_contact: m.last_contact,
        })
    }
}

fn id_chunks<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut chunks = vec![String::new()];
    for id in ids {
        let last = chunks
            .last_mut()
            .filter(|c| c.len() + id.len() < ID_CHUNK_BYTES);
        let chunk = match last {
            Some(chunk) => chunk,
            None => {
                chunks.push(String::new());
                chunks.last_mut().expect("just pushed")
            }
        };
        if !chunk.is_empty() {
            chunk.push('\n');
        }
        chunk.push_str(id);
    }
    chunks
}

fn pair_value(snapshot: &Snapshot, grantee: &str, subject: &str) -> String {
    snapshot.grant_ids_for(grantee, subject).join("\n")
}

/// The leader's writes. Each returns the `meta` it published.
pub struct Writer<'a, S: SharedData> {
    pub data: &'a S,
    pub keys: &'a Keys,
}

impl<S: SharedData> Writer<'_, S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.data.set(key, value, 0)
    }

    fn write_ids(&self, generation: u32, snapshot: &Snapshot) -> Result<u32, StoreError> {
        let mut ids: Vec<&str> = snapshot.grants().map(|g| g.id.as_str()).collect();
        ids.sort_unstable();
        let chunks = id_chunks(ids.into_iter());
        for (n, chunk) in chunks.iter().enumerate() {
            self.set(&self.keys.ids(generation, n as u32), chunk.as_bytes())?;
        }
        Ok(chunks.len() as u32)
    }

    fn write_keys(&self, key_set: &KeySet) -> Result<(), StoreError> {
        self.set(
            &self.keys.key_set(),
            &v1::KeySet::from(key_set).encode_to_vec(),
        )
    }

    /// Publishes `snapshot` as a new generation, then blanks `old` (the
    /// previous generation's grants, as the leader held them).
    pub fn write_full(
        &self,
        previous: Option<Meta>,
        old: &Snapshot,
        snapshot: &Snapshot,
        now: UnixSeconds,
    ) -> Result<Meta, StoreError> {
        let generation = previous.map_or(1, |m| m.generation.wrapping_add(1).max(1));
        for grant in snapshot.grants() {
            self.set(
                &self.keys.grant(generation, &grant.id),
                &encode_grant(grant),
            )?;
            let pair = pair_value(snapshot, &grant.grantee, &grant.subject);
            self.set(
                &self.keys.pair(generation, &grant.grantee, &grant.subject),
                pair.as_bytes(),
            )?;
        }
        let id_chunks = self.write_ids(generation, snapshot)?;
        self.write_keys(snapshot.keys())?;
        let meta = Meta {
            generation,
            revision: snapshot.revision(),
            last_contact: now,
            keys_version: previous.map_or(1, |m| m.keys_version + 1),
            id_chunks,
            digest: snapshot.digest(),
        };
        self.set(&self.keys.meta(), &meta.encode())?;
        if let Some(previous) = previous {
            self.blank_generation(previous, old)?;
        }
        Ok(meta)
    }

    /// Empties what a replaced generation held, so its memory is returned to
    /// the size of empty values.
    fn blank_generation(&self, meta: Meta, old: &Snapshot) -> Result<(), StoreError> {
        if meta.generation == 0 {
            return Ok(());
        }
        for grant in old.grants() {
            self.set(&self.keys.grant(meta.generation, &grant.id), &[])?;
            self.set(
                &self
                    .keys
                    .pair(meta.generation, &grant.grantee, &grant.subject),
                &[],
            )?;
        }
        for n in 0..meta.id_chunks {
            self.set(&self.keys.ids(meta.generation, n), &[])?;
        }
        Ok(())
    }

    /// Rewrites the keys a delta touched. `before` is the leader's snapshot
    /// before the delta, `after` after it; `touched` the upserted and removed ids.
    pub fn write_delta(
        &self,
        meta: Meta,
        before: &Snapshot,
        after: &Snapshot,
        touched: &[String],
        now: UnixSeconds,
    ) -> Result<Meta, StoreError> {
        let generation = meta.generation;
        let mut pairs = Vec::new();
        for id in touched {
            let old = before.grant(id);
            let new = after.grant(id);
            match &new {
                Some(g) => self.set(&self.keys.grant(generation, id), &encode_grant(g))?,
                None => self.set(&self.keys.grant(generation, id), &[])?,
            }
            for g in old.iter().chain(new.iter()) {
                pairs.push((g.grantee.clone(), g.subject.clone()));
            }
        }
        pairs.sort();
        pairs.dedup();
        for (grantee, subject) in &pairs {
            let value = pair_value(after, grantee, subject);
            self.set(
                &self.keys.pair(generation, grantee, subject),
                value.as_bytes(),
            )?;
        }
        let ids_changed = before.len() != after.len()
            || touched
                .iter()
                .any(|id| before.grant(id).is_none() != after.grant(id).is_none());
        let mut id_chunks = meta.id_chunks;
        if ids_changed {
            id_chunks = self.write_ids(generation, after)?;
            for n in id_chunks..meta.id_chunks {
                self.set(&self.keys.ids(generation, n), &[])?;
            }
        }
        let keys_changed = before.keys() != after.keys();
        if keys_changed {
            self.write_keys(after.keys())?;
        }
        let next = Meta {
            revision: after.revision(),
            last_contact: now,
            keys_version: meta.keys_version + u64::from(keys_changed),
            id_chunks,
            digest: after.digest(),
            ..meta
        };
        self.set(&self.keys.meta(), &next.encode())?;
        Ok(next)
    }

    /// A heartbeat: only the last contact moves.
    pub fn touch(&self, meta: Meta, now: UnixSeconds) -> Result<Meta, StoreError> {
        let next = Meta {
            last_contact: now,
            ..meta
        };
        self.set(&self.keys.meta(), &next.encode())?;
        Ok(next)
    }
}

/// Rebuilds the leader's in-memory snapshot from shared data, checking it
/// against the published digest. `None` when nothing or something
/// inconsistent is held: the new leader then asks for a full snapshot.
pub fn load(data: &impl SharedData, keys: &Keys) -> Option<(Meta, Snapshot)> {
    let (meta, _) = read_meta(data, keys)?;
    let mut grants = Vec::new();
    for n in 0..meta.id_chunks {
        let Some((bytes, _)) = data.get(&keys.ids(meta.generation, n)) else {
            continue;
        };
        let text = String::from_utf8(bytes).ok()?;
        for id in text.split('\n').filter(|id| !id.is_empty()) {
            let (bytes, _) = data.get(&keys.grant(meta.generation, id))?;
            grants.push(decode_grant(&bytes)?);
        }
    }
    let full = consent_core::FullSnapshot {
        revision: meta.revision,
        grants,
        keys: read_key_set(data, keys),
        digest: meta.digest,
    };
    let mut snapshot = Snapshot::new();
    snapshot
        .apply(consent_core::Update::Snapshot(full), meta.last_contact)
        .ok()?;
    Some((meta, snapshot))
}

#[cfg(test)]
#[path = "store_tests.rs"]
pub(crate) mod tests;
