//! Snapshot update rules, and a state-machine property test that replays a
//! random delivery of a random log against a simple model.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::grant::tests::sample;

fn grant(id: &str, revision: u64) -> Grant {
    Grant {
        id: id.into(),
        revision,
        ..sample()
    }
}

fn delta(from: u64, to: u64, upserts: Vec<Grant>, removals: &[&str]) -> Update {
    Update::Delta(Delta {
        from_revision: from,
        to_revision: to,
        upserts,
        removals: removals.iter().map(|s| s.to_string()).collect(),
        ..Delta::default()
    })
}

fn full(revision: u64, grants: Vec<Grant>) -> Update {
    let digest = Digest::of(&grants);
    Update::Snapshot(FullSnapshot {
        revision,
        grants,
        keys: KeySet::default(),
        digest,
    })
}

fn state(s: &Snapshot) -> (u64, Digest, Vec<String>) {
    let mut ids: Vec<String> = s.grants().map(|g| g.id.clone()).collect();
    ids.sort();
    (s.revision(), s.digest(), ids)
}

#[test]
fn deltas_apply_in_order_and_duplicates_are_no_ops() {
    let mut s = Snapshot::new();
    assert_eq!(s.sync_state(), None);
    assert_eq!(
        s.apply(delta(0, 2, vec![grant("a", 1), grant("b", 2)], &[]), 10),
        Ok(Applied::Advanced { from: 0, to: 2 })
    );
    assert_eq!(
        s.sync_state(),
        Some(SyncState {
            revision: 2,
            last_contact: 10
        })
    );
    let before = state(&s);
    assert_eq!(
        s.apply(delta(0, 2, vec![grant("a", 1), grant("b", 2)], &[]), 11),
        Ok(Applied::Duplicate)
    );
    assert_eq!(
        s.apply(delta(1, 2, vec![], &[]), 11),
        Ok(Applied::Duplicate)
    );
    assert_eq!(state(&s), before);
    assert_eq!(
        s.apply(delta(2, 5, vec![grant("a", 5)], &["b"]), 12),
        Ok(Applied::Advanced { from: 2, to: 5 })
    );
    assert_eq!(state(&s).2, vec!["a".to_string()]);
    assert_eq!(s.digest(), Digest::of([&grant("a", 5)]));
}

#[test]
fn a_gap_or_an_overlap_changes_nothing() {
    let mut s = Snapshot::new();
    s.apply(delta(0, 3, vec![grant("a", 3)], &[]), 10).unwrap();
    let before = state(&s);
    assert_eq!(
        s.apply(delta(4, 5, vec![grant("b", 5)], &[]), 11),
        Err(ApplyError::Gap { held: 3, from: 4 })
    );
    assert_eq!(
        s.apply(delta(2, 5, vec![grant("b", 5)], &[]), 11),
        Err(ApplyError::OutOfOrder {
            held: 3,
            from: 2,
            to: 5
        })
    );
    assert!(matches!(
        s.apply(delta(5, 5, vec![], &[]), 11),
        Err(ApplyError::Invalid(_))
    ));
    assert_eq!(state(&s), before);
    assert_eq!(
        s.sync_state().unwrap().last_contact,
        10,
        "a refused update is not contact"
    );
}

#[test]
fn an_older_snapshot_is_refused_and_a_newer_one_replaces_everything() {
    let mut s = Snapshot::new();
    s.apply(full(5, vec![grant("a", 5), grant("b", 4)]), 1)
        .unwrap();
    assert_eq!(
        s.apply(full(4, vec![grant("c", 4)]), 2),
        Err(ApplyError::OlderSnapshot {
            held: 5,
            offered: 4
        })
    );
    assert_eq!(state(&s).2, vec!["a", "b"]);
    s.apply(full(9, vec![grant("c", 9)]), 3).unwrap();
    assert_eq!(
        state(&s),
        (9, Digest::of([&grant("c", 9)]), vec!["c".to_string()])
    );
    assert!(s.grant_ids_for(&sample().grantee, &sample().subject) == vec!["c".to_string()]);
}

#[test]
fn a_digest_that_does_not_match_changes_nothing() {
    let mut s = Snapshot::new();
    s.apply(full(2, vec![grant("a", 2)]), 1).unwrap();
    let before = state(&s);
    let bad = Update::Snapshot(FullSnapshot {
        revision: 3,
        grants: vec![grant("b", 3)],
        keys: KeySet::default(),
        digest: Digest::EMPTY,
    });
    assert!(matches!(
        s.apply(bad, 2),
        Err(ApplyError::DigestMismatch { .. })
    ));
    let bad = Update::Delta(Delta {
        from_revision: 2,
        to_revision: 3,
        upserts: vec![grant("b", 3)],
        digest: Some(Digest::EMPTY),
        ..Delta::default()
    });
    assert!(matches!(
        s.apply(bad, 2),
        Err(ApplyError::DigestMismatch { .. })
    ));
    assert_eq!(state(&s), before);
    let good_digest = Digest::of([&grant("a", 2), &grant("b", 3)]);
    let good = Update::Delta(Delta {
        from_revision: 2,
        to_revision: 3,
        upserts: vec![grant("b", 3)],
        digest: Some(good_digest),
        ..Delta::default()
    });
    assert!(s.apply(good, 2).is_ok());
}

#[test]
fn a_grant_twice_in_one_update_is_invalid() {
    let mut s = Snapshot::new();
    assert!(matches!(
        s.apply(delta(0, 1, vec![grant("a", 1), grant("a", 1)], &[]), 1),
        Err(ApplyError::Invalid(_))
    ));
    assert!(matches!(
        s.apply(delta(0, 1, vec![grant("a", 1)], &["a"]), 1),
        Err(ApplyError::Invalid(_))
    ));
    let twice = Update::Snapshot(FullSnapshot {
        revision: 1,
        grants: vec![grant("a", 1), grant("a", 1)],
        keys: KeySet::default(),
        digest: Digest::EMPTY,
    });
    assert!(matches!(s.apply(twice, 1), Err(ApplyError::Invalid(_))));
    assert_eq!(s.sync_state(), None);
}

#[test]
fn the_pair_index_follows_upserts_and_removals() {
    let mut s = Snapshot::new();
    let other = Grant {
        grantee: "other".into(),
        ..grant("b", 1)
    };
    s.apply(delta(0, 1, vec![grant("a", 1), other], &[]), 1)
        .unwrap();
    let (grantee, subject) = (sample().grantee, sample().subject);
    assert_eq!(s.grant_ids_for(&grantee, &subject), vec!["a"]);
    let moved = Grant {
        subject: "patient-2".into(),
        ..grant("a", 2)
    };
    s.apply(delta(1, 2, vec![moved], &[]), 2).unwrap();
    assert!(s.grant_ids_for(&grantee, &subject).is_empty());
    assert_eq!(s.grant_ids_for(&grantee, "patient-2"), vec!["a"]);
    s.apply(delta(2, 3, vec![], &["a"]), 3).unwrap();
    assert!(s.grant_ids_for(&grantee, "patient-2").is_empty());
}

#[test]
fn heartbeats_count_as_contact_only_once_synced() {
    let mut s = Snapshot::new();
    s.touch(5);
    assert_eq!(s.sync_state(), None);
    s.apply(delta(0, 1, vec![], &[]), 6).unwrap();
    s.touch(9);
    assert_eq!(
        s.sync_state(),
        Some(SyncState {
            revision: 1,
            last_contact: 9
        })
    );
}

fn chunk(
    revision: u64,
    index: u32,
    total: u32,
    ids: &[&str],
    last: Option<Digest>,
) -> SnapshotChunk {
    SnapshotChunk {
        revision,
        index,
        total,
        grants: ids.iter().map(|id| grant(id, revision)).collect(),
        keys: last.map(|_| KeySet::default()),
        digest: last,
    }
}

#[test]
fn chunks_assemble_only_in_order() {
    let digest = Digest::of([&grant("a", 4), &grant("b", 4)]);
    let mut assembler = SnapshotAssembler::default();
    assert_eq!(assembler.push(chunk(4, 0, 2, &["a"], None)), Ok(None));
    let snapshot = assembler
        .push(chunk(4, 1, 2, &["b"], Some(digest)))
        .unwrap()
        .unwrap();
    assert_eq!(
        (snapshot.revision, snapshot.grants.len(), snapshot.digest),
        (4, 2, digest)
    );

    let mut assembler = SnapshotAssembler::default();
    assert!(
        assembler
            .push(chunk(4, 1, 2, &["b"], Some(digest)))
            .is_err(),
        "chunk 1 before chunk 0"
    );
    assembler.push(chunk(4, 0, 2, &["a"], None)).unwrap();
    assert!(
        assembler
            .push(chunk(5, 1, 2, &["b"], Some(digest)))
            .is_err(),
        "chunk from another revision"
    );
    assert!(
        assembler
            .push(chunk(4, 1, 2, &["b"], Some(digest)))
            .is_err(),
        "the partial snapshot was dropped"
    );
    assert!(assembler.push(chunk(4, 0, 0, &[], None)).is_err());
    assert!(assembler.push(chunk(4, 2, 2, &[], None)).is_err());
    assert!(
        assembler.push(chunk(4, 0, 1, &["a"], None)).is_err(),
        "last chunk without digest"
    );
}

// ---- state machine ----

/// The control plane's truth: the grant set after each revision.
fn history(ops: &[(u8, bool)]) -> Vec<BTreeMap<String, Grant>> {
    let mut states = vec![BTreeMap::new()];
    for (revision, &(id, remove)) in ops.iter().enumerate() {
        let revision = revision as u64 + 1;
        let mut next = states.last().unwrap().clone();
        let id = format!("g{id}");
        if remove {
            next.remove(&id);
        } else {
            next.insert(id.clone(), grant(&id, revision));
        }
        states.push(next);
    }
    states
}

fn truth_delta(states: &[BTreeMap<String, Grant>], from: u64, to: u64) -> Delta {
    let (old, new) = (&states[from as usize], &states[to as usize]);
    let upserts = new
        .values()
        .filter(|g| old.get(&g.id) != Some(g))
        .cloned()
        .collect();
    let removals = old
        .keys()
        .filter(|id| !new.contains_key(*id))
        .cloned()
        .collect();
    Delta {
        from_revision: from,
        to_revision: to,
        upserts,
        removals,
        keys: None,
        digest: Some(Digest::of(new.values())),
    }
}

#[derive(Clone, Debug)]
enum Delivery {
    Delta { from: u64, to: u64, corrupt: bool },
    Snapshot { at: u64, corrupt: bool },
}

fn arb_delivery(head: u64) -> impl Strategy<Value = Delivery> {
    prop_oneof![
        3 => (0..head, 1..=head, proptest::bool::weighted(0.1)).prop_filter_map("from < to", |(a, b, corrupt)| (a < b).then_some(Delivery::Delta { from: a, to: b, corrupt })),
        1 => (0..=head, proptest::bool::weighted(0.1)).prop_map(|(at, corrupt)| Delivery::Snapshot { at, corrupt }),
    ]
}

proptest! {
    #[test]
    fn any_delivery_order_matches_the_model(
        ops in proptest::collection::vec((0u8..6, any::<bool>()), 2..20),
        seed_deliveries in proptest::collection::vec(arb_delivery(20), 1..30),
    ) {
        let states = history(&ops);
        let head = ops.len() as u64;
        let mut snapshot = Snapshot::new();
        let mut model_revision = 0u64;
        for delivery in seed_deliveries {
            let update = match delivery.clone() {
                Delivery::Delta { from, to, corrupt } => {
                    let (from, to) = (from.min(head - 1), to.min(head));
                    if from >= to { continue; }
                    let mut d = truth_delta(&states, from, to);
                    if corrupt { d.digest = Some(Digest::EMPTY); }
                    Update::Delta(d)
                }
                Delivery::Snapshot { at, corrupt } => {
                    let at = at.min(head);
                    let grants: Vec<Grant> = states[at as usize].values().cloned().collect();
                    let digest = if corrupt { Digest::EMPTY } else { Digest::of(&grants) };
                    Update::Snapshot(FullSnapshot { revision: at, grants, keys: KeySet::default(), digest })
                }
            };
            let before = state(&snapshot);
            let result = snapshot.apply(update.clone(), 0);
            // The model: what must have happened.
            let expected_revision = match &update {
                Update::Delta(d) if d.to_revision <= model_revision => Some(model_revision),
                Update::Delta(d) if d.from_revision == model_revision && d.digest == Some(Digest::of(states[d.to_revision as usize].values())) => Some(d.to_revision),
                Update::Snapshot(s) if s.revision >= model_revision && s.digest == Digest::of(&s.grants) => Some(s.revision),
                _ => None,
            };
            match expected_revision {
                Some(revision) => {
                    prop_assert!(result.is_ok(), "{delivery:?} refused: {result:?}");
                    model_revision = revision;
                }
                None => {
                    prop_assert!(result.is_err(), "{delivery:?} accepted at {model_revision}");
                    prop_assert_eq!(state(&snapshot), before.clone());
                }
            }
            let held = &states[model_revision as usize];
            prop_assert_eq!(snapshot.revision(), model_revision);
            prop_assert_eq!(snapshot.digest(), Digest::of(held.values()));
            prop_assert_eq!(state(&snapshot).2, held.keys().cloned().collect::<Vec<_>>());
        }
    }
}
