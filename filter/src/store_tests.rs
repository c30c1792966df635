use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use consent_core::{Delta, FullSnapshot, Permission, Status, Update, VerifyingKey};

use super::*;

/// Shared data as Envoy keeps it: CAS from one counter starting at 1.
#[derive(Default)]
pub(crate) struct FakeShared {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl SharedData for FakeShared {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.map
            .borrow()
            .get(key)
            .filter(|(v, _)| !v.is_empty())
            .cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut map = self.map.borrow_mut();
        if let Some((_, held)) = map.get(key)
            && cas != 0
            && cas != *held
        {
            return Err(StoreError::CasMismatch(key.into()));
        }
        let mut next = self.next_cas.borrow_mut();
        *next += 1;
        map.insert(key.into(), (value.to_vec(), *next));
        Ok(())
    }
}

impl FakeShared {
    pub(crate) fn non_empty_keys(&self) -> BTreeSet<String> {
        self.map
            .borrow()
            .iter()
            .filter(|(_, (v, _))| !v.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub(crate) fn value_len(&self, key: &str) -> usize {
        self.map.borrow().get(key).map_or(0, |(v, _)| v.len())
    }
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn grant(id: &str, subject: &str) -> Grant {
    Grant {
        id: id.into(),
        subject: subject.into(),
        grantee: "spiffe://cluster.local/ns/analytics/sa/reader".into(),
        issued_by: subject.into(),
        owner: "consent-team@example.org".into(),
        purposes: names(&["care", "research"]),
        datasets: names(&["records"]),
        actions: names(&["read"]),
        permissions: [Permission::Access].into_iter().collect(),
        not_before: 1_000,
        expires_at: 100_000,
        parent: None,
        status: Status::Active,
        revision: 1,
    }
}

fn key_set() -> KeySet {
    KeySet::new([VerifyingKey::new("k1", &[7; 32], 0).unwrap_or_else(|_| {
        // Not every 32-byte string is a valid Ed25519 point; fall back to a known one.
        consent_core::SigningKey::generate("k1")
            .unwrap()
            .verifying_key(0)
    })])
}

fn full(revision: u64, grants: Vec<Grant>) -> Snapshot {
    let digest = Digest::of(&grants);
    let mut s = Snapshot::new();
    s.apply(
        Update::Snapshot(FullSnapshot {
            revision,
            grants,
            keys: key_set(),
            digest,
        }),
        50,
    )
    .unwrap();
    s
}

#[test]
fn meta_round_trips_and_rejects_other_lengths() {
    let meta = Meta {
        generation: 3,
        revision: 42,
        last_contact: 1_700_000_000,
        keys_version: 9,
        id_chunks: 2,
        digest: Digest::of([&grant("g1", "p1")]),
    };
    assert_eq!(Meta::decode(&meta.encode()), Some(meta));
    assert_eq!(Meta::decode(&meta.encode()[..70]), None);
}

#[test]
fn a_full_snapshot_is_readable_through_the_view() {
    let data = FakeShared::default();
    let keys = Keys::new("consent/r/");
    assert_eq!(SharedView::new(&data, &keys).sync_state(), None);
    let snap = full(
        7,
        vec![grant("g1", "p1"), grant("g2", "p1"), grant("g3", "p2")],
    );
    let meta = Writer {
        data: &data,
        keys: &keys,
    }
    .write_full(None, &Snapshot::new(), &snap, 60)
    .unwrap();
    let view = SharedView::new(&data, &keys);
    assert_eq!(
        view.sync_state(),
        Some(SyncState {
            revision: 7,
            last_contact: 60
        })
    );
    assert_eq!(view.grant("g2").unwrap().into_owned(), grant("g2", "p1"));
    assert!(view.grant("nope").is_none());
    let grantee = "spiffe://cluster.local/ns/analytics/sa/reader";
    assert_eq!(
        view.grant_ids_for(grantee, "p1"),
        vec!["g1".to_owned(), "g2".to_owned()]
    );
    assert!(view.grant_ids_for(grantee, "p9").is_empty());
    assert_eq!(&read_key_set(&data, &keys), snap.keys());
    assert_eq!(meta.digest, snap.digest());
}

#[test]
fn a_second_full_snapshot_switches_generation_and_drops_departed_grants() {
    let data = FakeShared::default();
    let keys = Keys::new("c/");
    let w = Writer {
        data: &data,
        keys: &keys,
    };
    let first = full(1, vec![grant("g1", "p1"), grant("g2", "p1")]);
    let m1 = w.write_full(None, &Snapshot::new(), &first, 10).unwrap();
    let second = full(5, vec![grant("g2", "p1")]);
    let m2 = w.write_full(Some(m1), &first, &second, 20).unwrap();
    assert_eq!(m2.generation, m1.generation + 1);
    assert_eq!(m2.keys_version, m1.keys_version + 1);
    let view = SharedView::new(&data, &keys);
    assert!(
        view.grant("g1").is_none(),
        "a grant that left the view is gone"
    );
    assert!(view.grant("g2").is_some());
    // Nothing of generation 1 is left but empty values.
    assert!(
        data.non_empty_keys()
            .iter()
            .all(|k| !k.starts_with("c/g1/") && !k.starts_with("c/i1/"))
    );
}

#[test]
fn deltas_rewrite_grants_pairs_and_ids_and_a_new_leader_reloads_them() {
    let data = FakeShared::default();
    let keys = Keys::new("c/");
    let w = Writer {
        data: &data,
        keys: &keys,
    };
    let before = full(1, vec![grant("g1", "p1"), grant("g2", "p1")]);
    let meta = w.write_full(None, &Snapshot::new(), &before, 10).unwrap();

    let mut revoked = grant("g1", "p1");
    revoked.status = Status::Revoked(consent_core::Revocation {
        revoked_by: "admin".into(),
        revoked_at: 11,
        reason: "withdrawn".into(),
        cascaded_from: None,
    });
    revoked.revision = 2;
    let mut after = before.clone();
    let delta = Delta {
        from_revision: 1,
        to_revision: 2,
        upserts: vec![revoked.clone(), grant("g3", "p2")],
        removals: vec!["g2".into()],
        keys: None,
        digest: None,
    };
    after.apply(Update::Delta(delta), 12).unwrap();
    let touched = ["g1".to_owned(), "g3".to_owned(), "g2".to_owned()];
    let meta2 = w.write_delta(meta, &before, &after, &touched, 12).unwrap();
    assert_eq!(
        (meta2.revision, meta2.generation, meta2.keys_version),
        (2, meta.generation, meta.keys_version)
    );

    let view = SharedView::new(&data, &keys);
    assert!(view.grant("g1").unwrap().is_revoked());
    assert!(view.grant("g2").is_none());
    let grantee = "spiffe://cluster.local/ns/analytics/sa/reader";
    assert_eq!(view.grant_ids_for(grantee, "p1"), vec!["g1".to_owned()]);
    assert_eq!(view.grant_ids_for(grantee, "p2"), vec!["g3".to_owned()]);

    let (loaded_meta, loaded) = load(&data, &keys).expect("a consistent state reloads");
    assert_eq!(loaded_meta, meta2);
    assert_eq!(loaded.revision(), 2);
    assert_eq!(loaded.digest(), after.digest());
    assert_eq!(loaded.len(), 2);

    let meta3 = w.touch(meta2, 99).unwrap();
    assert_eq!(
        SharedView::new(&data, &keys)
            .sync_state()
            .unwrap()
            .last_contact,
        99
    );
    assert_eq!(meta3.revision, 2);
}

#[test]
fn an_inconsistent_state_does_not_reload() {
    let data = FakeShared::default();
    let keys = Keys::new("c/");
    let snap = full(1, vec![grant("g1", "p1")]);
    let meta = Writer {
        data: &data,
        keys: &keys,
    }
    .write_full(None, &Snapshot::new(), &snap, 10)
    .unwrap();
    let mut tampered = grant("g1", "p1");
    tampered.purposes.insert("marketing".into());
    data.set(
        &keys.grant(meta.generation, "g1"),
        &encode_grant(&tampered),
        0,
    )
    .unwrap();
    assert!(load(&data, &keys).is_none(), "the digest catches it");
    assert!(load(&FakeShared::default(), &keys).is_none());
}

#[test]
fn a_typical_grant_takes_at_most_256_bytes() {
    let data = FakeShared::default();
    let keys = Keys::new("consent/consent_filter/");
    let mut g = grant("7f9c2b1e-4d3a-4e8b-9a6f-2c1d0e9b8a7f", "patient-0001234567");
    g.grantee = "spiffe://cluster.local/ns/analytics/sa/reader".into();
    let snap = full(1, vec![g.clone()]);
    let meta = Writer {
        data: &data,
        keys: &keys,
    }
    .write_full(None, &Snapshot::new(), &snap, 1)
    .unwrap();
    let grant_key = keys.grant(meta.generation, &g.id);
    let pair_key = keys.pair(meta.generation, &g.grantee, &g.subject);
    // The budget is the grant's value; its key and its share of the pair
    // index come on top (about 40 + 40 bytes for ids of this length).
    let value = data.value_len(&grant_key);
    assert!(value <= 256, "{value} bytes per grant");
    let total = value + grant_key.len() + data.value_len(&pair_key);
    assert!(
        total <= 320,
        "{total} bytes per grant with its key and index entry"
    );
}
