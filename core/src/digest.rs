//! The content digest of a set of grants. The control plane and a sidecar
//! compute it the same way, so a sidecar can prove it holds exactly the state
//! of a revision. It is a sum of per-grant SHA-256 hashes over a canonical
//! encoding, so a change updates it in O(1) instead of rehashing the set.

use sha2::{Digest as _, Sha256};

use crate::grant::{Grant, Status};

/// A multiset hash: four 64-bit lanes added with wrap-around.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digest([u64; 4]);

impl Digest {
    pub const EMPTY: Digest = Digest([0; 4]);

    pub fn of<'a>(grants: impl IntoIterator<Item = &'a Grant>) -> Digest {
        let mut digest = Digest::EMPTY;
        for grant in grants {
            digest.add(grant);
        }
        digest
    }

    pub fn add(&mut self, grant: &Grant) {
        let lanes = lanes(grant);
        for (acc, lane) in self.0.iter_mut().zip(lanes) {
            *acc = acc.wrapping_add(lane);
        }
    }

    pub fn remove(&mut self, grant: &Grant) {
        let lanes = lanes(grant);
        for (acc, lane) in self.0.iter_mut().zip(lanes) {
            *acc = acc.wrapping_sub(lane);
        }
    }

    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, lane) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    /// Reads 32 bytes; anything else is not a digest.
    pub fn from_bytes(bytes: &[u8]) -> Option<Digest> {
        if bytes.len() != 32 {
            return None;
        }
        let mut lanes = [0u64; 4];
        for (lane, chunk) in lanes.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(chunk);
            *lane = u64::from_le_bytes(buf);
        }
        Some(Digest(lanes))
    }

    pub fn to_hex(self) -> String {
        self.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn lanes(grant: &Grant) -> [u64; 4] {
    let hash = Sha256::digest(canonical_bytes(grant));
    let mut lanes = [0u64; 4];
    for (lane, chunk) in lanes.iter_mut().zip(hash.chunks_exact(8)) {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(chunk);
        *lane = u64::from_le_bytes(buf);
    }
    lanes
}

/// Length-prefixed fields in a fixed order, sets in their sorted order. Written
/// by hand so that the digest does not depend on a protobuf encoder's choices.
pub fn canonical_bytes(grant: &Grant) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let str_field = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    for s in [
        &grant.id,
        &grant.subject,
        &grant.grantee,
        &grant.issued_by,
        &grant.owner,
    ] {
        str_field(&mut out, s);
    }
    for set in [&grant.purposes, &grant.datasets, &grant.actions] {
        out.extend_from_slice(&(set.len() as u32).to_le_bytes());
        for s in set {
            str_field(&mut out, s);
        }
    }
    out.extend_from_slice(&(grant.permissions.len() as u32).to_le_bytes());
    for p in &grant.permissions {
        str_field(&mut out, p.as_str());
    }
    out.extend_from_slice(&grant.not_before.to_le_bytes());
    out.extend_from_slice(&grant.expires_at.to_le_bytes());
    str_field(&mut out, grant.parent.as_deref().unwrap_or(""));
    match &grant.status {
        Status::Active => out.push(1),
        Status::Revoked(r) => {
            out.push(2);
            str_field(&mut out, &r.revoked_by);
            out.extend_from_slice(&r.revoked_at.to_le_bytes());
            str_field(&mut out, &r.reason);
            str_field(&mut out, r.cascaded_from.as_deref().unwrap_or(""));
        }
        Status::Expired => out.push(3),
    }
    out.extend_from_slice(&grant.revision.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::tests::sample;

    #[test]
    fn order_does_not_matter_and_removal_undoes_addition() {
        let a = sample();
        let b = Grant {
            id: "g2".into(),
            ..sample()
        };
        assert_eq!(Digest::of([&a, &b]), Digest::of([&b, &a]));
        let mut d = Digest::of([&a, &b]);
        d.remove(&b);
        assert_eq!(d, Digest::of([&a]));
        d.remove(&a);
        assert_eq!(d, Digest::EMPTY);
    }

    #[test]
    fn every_field_changes_the_digest() {
        let base = Digest::of([&sample()]);
        let mut changed = sample();
        changed.revision += 1;
        assert_ne!(Digest::of([&changed]), base);
        let mut changed = sample();
        changed.purposes.remove("care");
        assert_ne!(Digest::of([&changed]), base);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        let mut a = sample();
        a.subject = "ab".into();
        a.grantee = "c".into();
        let mut b = sample();
        b.subject = "a".into();
        b.grantee = "bc".into();
        assert_ne!(Digest::of([&a]), Digest::of([&b]));
    }

    #[test]
    fn bytes_round_trip() {
        let d = Digest::of([&sample()]);
        assert_eq!(Digest::from_bytes(&d.to_bytes()), Some(d));
        assert_eq!(Digest::from_bytes(&[0; 31]), None);
    }
}
