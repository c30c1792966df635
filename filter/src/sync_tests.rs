use consent_core::{Digest, GrantView, KeySet, SigningKey};

use super::*;
use crate::store::SharedView;
use crate::store::tests::{FakeShared, grant};

#[derive(Default)]
struct FakeStream {
    next: u32,
    opened: Vec<Vec<(String, Vec<u8>)>>,
    sent: Vec<(u32, v1::SidecarMessage)>,
    cancelled: Vec<u32>,
    fail_open: bool,
}

impl Stream for FakeStream {
    fn open(&mut self, metadata: &[(&str, &[u8])]) -> Result<u32, String> {
        if self.fail_open {
            return Err("PARSE_FAILURE".into());
        }
        self.next += 1;
        self.opened.push(
            metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        );
        Ok(self.next)
    }
    fn send(&mut self, token: u32, message: &[u8]) -> Result<(), String> {
        if self.cancelled.contains(&token) {
            return Err("NOT_FOUND".into());
        }
        self.sent
            .push((token, v1::SidecarMessage::decode(message).unwrap()));
        Ok(())
    }
    fn cancel(&mut self, token: u32) {
        self.cancelled.push(token);
    }
}

impl FakeStream {
    fn last(&self) -> &SidecarMsg {
        self.sent.last().unwrap().1.msg.as_ref().unwrap()
    }
}

fn settings() -> Settings {
    Settings {
        node_id: "n1".into(),
        datasets: vec!["records".into()],
        credential: Some("s3cret".into()),
        lease_ms: 10_000,
        heartbeat_ms: 5_000,
        backoff_initial_ms: 1_000,
        backoff_max_ms: 8_000,
    }
}

fn syncer(me: u64) -> Syncer {
    Syncer::new(me, Keys::new("c/"), settings(), Outbox::new(10, 4))
}

fn nothing() -> Option<Vec<u8>> {
    None
}

fn control(msg: ControlMsg) -> Vec<u8> {
    v1::ControlMessage { msg: Some(msg) }.encode_to_vec()
}

fn snapshot_msg(revision: u64, grants: Vec<consent_core::Grant>) -> Vec<u8> {
    let key = SigningKey::generate("k1").unwrap();
    let keys = KeySet::new([key.verifying_key(0)]);
    let digest = Digest::of(&grants);
    control(ControlMsg::Snapshot(v1::SnapshotChunk {
        revision,
        index: 0,
        total: 1,
        grants: grants.iter().map(v1::Grant::from).collect(),
        keys: Some(v1::KeySet::from(&keys)),
        digest: digest.to_bytes().to_vec(),
    }))
}

#[test]
fn one_leader_at_a_time_and_takeover_after_the_lease_expires() {
    let data = FakeShared::default();
    let keys = Keys::new("c/");
    assert!(try_lease(&data, &keys, 1, 0, 10_000));
    assert!(!try_lease(&data, &keys, 2, 1_000, 10_000));
    assert!(
        try_lease(&data, &keys, 1, 5_000, 10_000),
        "the holder renews"
    );
    assert!(!try_lease(&data, &keys, 2, 14_999, 10_000));
    assert!(
        try_lease(&data, &keys, 2, 15_000, 10_000),
        "expired: another worker takes over"
    );
    assert!(!try_lease(&data, &keys, 1, 15_001, 10_000));
}

#[test]
fn the_leader_opens_from_tick_says_hello_applies_a_snapshot_and_acks() {
    let data = FakeShared::default();
    let mut stream = FakeStream::default();
    let mut s = syncer(1);
    s.tick(&data, &mut stream, &mut nothing, 1_000, 7);
    assert!(s.is_leader());
    assert_eq!(
        stream.opened[0],
        vec![("authorization".to_owned(), b"Bearer s3cret".to_vec())]
    );
    let SidecarMsg::Hello(hello) = stream.last() else {
        panic!("{:?}", stream.sent)
    };
    assert_eq!(
        (hello.node_id.as_str(), hello.resume_from_revision),
        ("n1", 0)
    );
    assert_eq!(hello.datasets, vec!["records".to_owned()]);

    s.on_message(
        &data,
        &mut stream,
        1,
        &snapshot_msg(4, vec![grant("g1", "p1")]),
        2_000,
        7,
    );
    let SidecarMsg::Ack(ack) = stream.last() else {
        panic!("{:?}", stream.sent)
    };
    assert_eq!(ack.revision, 4);
    let keys = Keys::new("c/");
    let view = SharedView::new(&data, &keys);
    assert_eq!(
        view.sync_state().map(|s| (s.revision, s.last_contact)),
        Some((4, 2))
    );
    assert!(view.grant("g1").is_some());

    // A heartbeat moves last contact, nothing else.
    let hb = control(ControlMsg::Heartbeat(v1::Heartbeat {
        revision: 4,
        server_time_ms: 0,
    }));
    s.on_message(&data, &mut stream, 1, &hb, 9_000, 7);
    assert_eq!(
        SharedView::new(&data, &keys)
            .sync_state()
            .unwrap()
            .last_contact,
        9
    );
}

#[test]
fn a_gap_is_nacked_and_the_stream_reopened_for_a_full_snapshot() {
    let data = FakeShared::default();
    let mut stream = FakeStream::default();
    let mut s = syncer(1);
    s.tick(&data, &mut stream, &mut nothing, 1_000, 0);
    s.on_message(
        &data,
        &mut stream,
        1,
        &snapshot_msg(4, vec![grant("g1", "p1")]),
        1_500,
        0,
    );
    let gap = control(ControlMsg::Delta(v1::Delta {
        from_revision: 6,
        to_revision: 7,
        ..Default::default()
    }));
    s.on_message(&data, &mut stream, 1, &gap, 2_000, 0);
    let nack = stream.sent.iter().rev().find_map(|(_, m)| match &m.msg {
        Some(SidecarMsg::Nack(n)) => Some(n.clone()),
        _ => None,
    });
    assert_eq!(nack.map(|n| n.revision), Some(4));
    assert_eq!(stream.cancelled, vec![1]);
    assert_eq!((s.stats.nacks, s.stats.reconnects), (1, 1));
    assert_eq!(
        SharedView::new(&data, &Keys::new("c/"))
            .sync_state()
            .unwrap()
            .revision,
        4,
        "unchanged"
    );
    // Garbage is nacked too, never a trap; the next tick after the backoff reconnects.
    s.tick(&data, &mut stream, &mut nothing, 2_100, 0);
    assert_eq!(stream.opened.len(), 1, "still backing off");
    s.tick(&data, &mut stream, &mut nothing, 2_600, 0);
    assert_eq!(stream.opened.len(), 2);
    let SidecarMsg::Hello(hello) = stream.last() else {
        panic!()
    };
    assert_eq!(
        hello.resume_from_revision, 0,
        "asks for a full snapshot after a nack"
    );
    s.on_message(&data, &mut stream, 2, &[0xff, 0x01], 2_700, 0);
    assert_eq!(s.stats.nacks, 2);
}

#[test]
fn a_delta_is_applied_in_place_and_acked() {
    let data = FakeShared::default();
    let mut stream = FakeStream::default();
    let mut s = syncer(1);
    s.tick(&data, &mut stream, &mut nothing, 1_000, 0);
    s.on_message(
        &data,
        &mut stream,
        1,
        &snapshot_msg(4, vec![grant("g1", "p1")]),
        1_500,
        0,
    );
    let delta = control(ControlMsg::Delta(v1::Delta {
        from_revision: 4,
        to_revision: 5,
        upserts: vec![v1::Grant::from(&grant("g2", "p2"))],
        removals: vec!["g1".into()],
        ..Default::default()
    }));
    s.on_message(&data, &mut stream, 1, &delta, 2_000, 0);
    let SidecarMsg::Ack(ack) = stream.last() else {
        panic!()
    };
    assert_eq!(ack.revision, 5);
    let keys = Keys::new("c/");
    let view = SharedView::new(&data, &keys);
    assert!(view.grant("g1").is_none());
    assert!(view.grant("g2").is_some());
}

#[test]
fn a_new_leader_resumes_from_shared_data_and_the_old_one_lets_go() {
    let data = FakeShared::default();
    let (mut s1, mut s2) = (syncer(1), syncer(2));
    let (mut st1, mut st2) = (FakeStream::default(), FakeStream::default());
    s1.tick(&data, &mut st1, &mut nothing, 1_000, 0);
    s2.tick(&data, &mut st2, &mut nothing, 1_000, 0);
    assert!(s1.is_leader() && !s2.is_leader());
    assert!(st2.opened.is_empty(), "a follower opens nothing");
    s1.on_message(
        &data,
        &mut st1,
        1,
        &snapshot_msg(4, vec![grant("g1", "p1")]),
        1_500,
        0,
    );
    // s1 stops ticking (stalled worker); s2 takes over within two lease periods.
    s2.tick(&data, &mut st2, &mut nothing, 11_001, 0);
    assert!(s2.is_leader());
    let SidecarMsg::Hello(hello) = st2.last() else {
        panic!()
    };
    assert_eq!(
        hello.resume_from_revision, 4,
        "resumes from the revision in shared data"
    );
    s1.tick(&data, &mut st1, &mut nothing, 12_000, 0);
    assert!(!s1.is_leader());
    assert_eq!(st1.cancelled, vec![1]);
}

#[test]
fn a_failed_open_or_close_backs_off_with_growth_and_a_cap() {
    let data = FakeShared::default();
    let mut stream = FakeStream {
        fail_open: true,
        ..Default::default()
    };
    let mut s = syncer(1);
    let mut now = 0;
    let mut attempts = Vec::new();
    for _ in 0..200 {
        now += 100;
        let before = s.next_attempt_ms;
        s.tick(&data, &mut stream, &mut nothing, now, 0);
        if s.next_attempt_ms != before {
            attempts.push(s.next_attempt_ms - now);
        }
    }
    assert_eq!(&attempts[..4], &[500, 1_000, 2_000, 4_000]);
    assert!(attempts.iter().all(|&d| d <= 8_000));
    stream.fail_open = false;
    s.tick(&data, &mut stream, &mut nothing, now + 9_000, 0);
    let token = s.stream_token().unwrap();
    s.on_close(token, now + 9_100, 0);
    assert_eq!((s.stream_token(), s.stats.reconnects), (None, 1));
    s.on_close(99, now + 9_200, 0);
    assert_eq!(
        s.stats.reconnects, 1,
        "a close for an unknown token is ignored"
    );
}

#[test]
fn audit_events_are_batched_onto_the_stream_and_counted_when_dropped() {
    let data = FakeShared::default();
    let mut stream = FakeStream {
        fail_open: true,
        ..Default::default()
    };
    let mut s = syncer(1);
    let event = |i: u32| {
        v1::DecisionEvent {
            event_id: format!("e{i}"),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let mut queue: Vec<Vec<u8>> = (0..12).map(event).collect();
    let mut dequeue = || {
        if queue.is_empty() {
            None
        } else {
            Some(queue.remove(0))
        }
    };
    s.tick(&data, &mut stream, &mut dequeue, 1_000, 0);
    assert_eq!(
        (s.outbox.len(), s.stats.audit_dropped),
        (10, 2),
        "bounded while the stream is down"
    );
    stream.fail_open = false;
    s.tick(&data, &mut stream, &mut nothing, 5_000, 0);
    let batches: Vec<usize> = stream
        .sent
        .iter()
        .filter_map(|(_, m)| match &m.msg {
            Some(SidecarMsg::Events(b)) => Some(b.events.len()),
            _ => None,
        })
        .collect();
    assert_eq!(batches, vec![4, 4, 2]);
    assert_eq!(s.stats.audit_sent, 10);
}
