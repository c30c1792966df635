//! The grant: a time-bound, revocable permission with an owner, purposes and a
//! scope. A grant is a governed policy object; validation names the field that
//! is wrong, and a child shared onward never exceeds its parent.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Seconds since the Unix epoch. Grants and tokens are judged at this grain.
pub type UnixSeconds = i64;

/// What a grantee may do with the data; each is granted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Read or fetch the data.
    Access,
    /// Use the data in a computation (analytics, a model, a pipeline).
    Process,
    /// Pass the data, or a child grant, onward to another party.
    Share,
}

impl Permission {
    pub const ALL: [Permission; 3] = [Permission::Access, Permission::Process, Permission::Share];

    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::Access => "access",
            Permission::Process => "process",
            Permission::Share => "share",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = GrantError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "access" => Ok(Permission::Access),
            "process" => Ok(Permission::Process),
            "share" => Ok(Permission::Share),
            _ => Err(GrantError::new(
                "permissions",
                format!("{s:?} is not one of access, process, share"),
            )),
        }
    }
}

/// Who revoked a grant, when and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub revoked_by: String,
    pub revoked_at: UnixSeconds,
    pub reason: String,
    /// The ancestor whose revocation cascaded to this grant; `None` when the
    /// grant itself was revoked.
    pub cascaded_from: Option<String>,
}

/// The lifecycle state the control plane has written. Time-based expiry is
/// judged against the clock as well, so `Active` past `expires_at` is expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Active,
    Revoked(Revocation),
    Expired,
}

impl Status {
    pub const fn name(&self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Revoked(_) => "revoked",
            Status::Expired => "expired",
        }
    }
}

/// A consent grant. Sets are ordered so that equal grants encode equally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    /// Whose data.
    pub subject: String,
    /// The non-human identity allowed to call (SPIFFE id, service account, key id).
    pub grantee: String,
    /// The identity that issued the permission: the subject or an authorised agent.
    pub issued_by: String,
    /// Who is accountable for the grant's lifecycle.
    pub owner: String,
    pub purposes: BTreeSet<String>,
    pub datasets: BTreeSet<String>,
    pub actions: BTreeSet<String>,
    pub permissions: BTreeSet<Permission>,
    pub not_before: UnixSeconds,
    /// Exclusive: at `expires_at` the grant no longer allows anything.
    pub expires_at: UnixSeconds,
    pub parent: Option<String>,
    pub status: Status,
    /// The control-plane revision at which this state was written.
    pub revision: u64,
}

/// Bounds a grant must respect beyond its own consistency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest `expires_at - not_before` a grant may have.
    pub max_lifetime_secs: i64,
    /// The most entries in any one of purposes, datasets, actions.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_lifetime_secs: 366 * 24 * 3600,
            max_entries: 64,
        }
    }
}

/// A grant (or a change to one) is invalid; `field` names what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {problem}")]
pub struct GrantError {
    pub field: &'static str,
    pub problem: String,
}

impl GrantError {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        GrantError {
            field,
            problem: problem.into(),
        }
    }
}

/// Longest id accepted anywhere (grant, subject, grantee, issuer, owner).
pub const MAX_ID_LEN: usize = 256;
/// Longest purpose, dataset or action name.
pub const MAX_NAME_LEN: usize = 64;

/// Identities are URIs, emails or opaque ids: printable ASCII without spaces,
/// quotes or the NUL that the filter uses to build shared-data keys.
pub fn check_id(field: &'static str, value: &str) -> Result<(), GrantError> {
    if value.is_empty() {
        return Err(GrantError::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(GrantError::new(
            field,
            format!("longer than {MAX_ID_LEN} bytes"),
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || "._:/@+-=~".contains(c);
    if let Some(bad) = value.chars().find(|&c| !ok(c)) {
        return Err(GrantError::new(
            field,
            format!("{value:?} contains {bad:?}"),
        ));
    }
    Ok(())
}

/// Purposes, datasets and actions are lower-case names like `patient-records`.
pub fn check_name(field: &'static str, value: &str) -> Result<(), GrantError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    if value.is_empty() || value.len() > MAX_NAME_LEN || !value.chars().all(ok) {
        return Err(GrantError::new(
            field,
            format!("{value:?} must be 1 to {MAX_NAME_LEN} of a-z 0-9 . _ -"),
        ));
    }
    Ok(())
}

fn check_names(
    field: &'static str,
    values: &BTreeSet<String>,
    limits: &Limits,
) -> Result<(), GrantError> {
    if values.is_empty() {
        return Err(GrantError::new(field, "must name at least one"));
    }
    if values.len() > limits.max_entries {
        return Err(GrantError::new(
            field,
            format!("more than {} entries", limits.max_entries),
        ));
    }
    values.iter().try_for_each(|v| check_name(field, v))
}

fn check_subset<T: Ord + fmt::Display>(
    field: &'static str,
    child: &BTreeSet<T>,
    parent: &BTreeSet<T>,
    whose: &str,
) -> Result<(), GrantError> {
    match child.difference(parent).next() {
        Some(extra) => Err(GrantError::new(
            field,
            format!("{extra} is not in the {whose}"),
        )),
        None => Ok(()),
    }
}

impl Grant {
    /// Checks the grant on its own: ids, names, a bounded lifetime.
    pub fn validate(&self, limits: &Limits) -> Result<(), GrantError> {
        check_id("id", &self.id)?;
        check_id("subject", &self.subject)?;
        check_id("grantee", &self.grantee)?;
        check_id("issued_by", &self.issued_by)?;
        check_id("owner", &self.owner)?;
        check_names("purposes", &self.purposes, limits)?;
        check_names("datasets", &self.datasets, limits)?;
        check_names("actions", &self.actions, limits)?;
        if self.permissions.is_empty() {
            return Err(GrantError::new("permissions", "must name at least one"));
        }
        if self.not_before < 0 {
            return Err(GrantError::new(
                "not_before",
                "must be a Unix time in seconds",
            ));
        }
        if self.expires_at <= self.not_before {
            return Err(GrantError::new("expires_at", "must be after not_before"));
        }
        if self.expires_at - self.not_before > limits.max_lifetime_secs {
            return Err(GrantError::new(
                "expires_at",
                format!(
                    "lifetime exceeds the maximum of {} s",
                    limits.max_lifetime_secs
                ),
            ));
        }
        if let Some(parent) = &self.parent {
            check_id("parent", parent)?;
            if parent == &self.id {
                return Err(GrantError::new(
                    "parent",
                    "a grant cannot be its own parent",
                ));
            }
        }
        Ok(())
    }

    /// Checks that this grant, shared onward from `parent`, stays inside it.
    pub fn validate_child_of(&self, parent: &Grant) -> Result<(), GrantError> {
        if self.parent.as_deref() != Some(parent.id.as_str()) {
            return Err(GrantError::new(
                "parent",
                format!("does not name {}", parent.id),
            ));
        }
        if !parent.permissions.contains(&Permission::Share) {
            return Err(GrantError::new(
                "parent",
                format!("{} does not hold the share permission", parent.id),
            ));
        }
        if !matches!(parent.status, Status::Active) {
            return Err(GrantError::new(
                "parent",
                format!("{} is {}", parent.id, parent.status.name()),
            ));
        }
        if self.subject != parent.subject {
            return Err(GrantError::new(
                "subject",
                "must equal the parent's subject",
            ));
        }
        self.check_within(parent, "parent")
    }

    /// Checks that `self` is `old` narrowed: the same grant with no scope,
    /// purpose, permission or time added.
    pub fn validate_narrowing_of(&self, old: &Grant) -> Result<(), GrantError> {
        for (field, same) in [
            ("id", self.id == old.id),
            ("subject", self.subject == old.subject),
            ("grantee", self.grantee == old.grantee),
            ("issued_by", self.issued_by == old.issued_by),
            ("owner", self.owner == old.owner),
            ("parent", self.parent == old.parent),
        ] {
            if !same {
                return Err(GrantError::new(field, "cannot be changed by an amendment"));
            }
        }
        self.check_within(old, "current grant")
    }

    fn check_within(&self, outer: &Grant, whose: &str) -> Result<(), GrantError> {
        check_subset("datasets", &self.datasets, &outer.datasets, whose)?;
        check_subset("actions", &self.actions, &outer.actions, whose)?;
        check_subset("purposes", &self.purposes, &outer.purposes, whose)?;
        check_subset("permissions", &self.permissions, &outer.permissions, whose)?;
        if self.not_before < outer.not_before {
            return Err(GrantError::new(
                "not_before",
                format!("is earlier than the {whose}'s"),
            ));
        }
        if self.expires_at > outer.expires_at {
            return Err(GrantError::new(
                "expires_at",
                format!("is later than the {whose}'s"),
            ));
        }
        Ok(())
    }

    pub fn is_revoked(&self) -> bool {
        matches!(self.status, Status::Revoked(_))
    }

    /// True when this grant is in force at `now` by status and by clock.
    pub fn is_in_force(&self, now: UnixSeconds) -> bool {
        matches!(self.status, Status::Active) && self.not_before <= now && now < self.expires_at
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn set<T: Ord + Clone>(items: &[T]) -> BTreeSet<T> {
        items.iter().cloned().collect()
    }

    pub(crate) fn names(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    pub(crate) fn sample() -> Grant {
        Grant {
            id: "g1".into(),
            subject: "patient-1".into(),
            grantee: "spiffe://mesh/ns/analytics/sa/reader".into(),
            issued_by: "patient-1".into(),
            owner: "consent-team@example.org".into(),
            purposes: names(&["care", "research"]),
            datasets: names(&["records", "labs"]),
            actions: names(&["read", "write"]),
            permissions: set(&[Permission::Access, Permission::Share]),
            not_before: 1_000,
            expires_at: 100_000,
            parent: None,
            status: Status::Active,
            revision: 1,
        }
    }

    /// A field name and the edit that should make it invalid.
    type Case = (&'static str, fn(&mut Grant));

    fn field_of(result: Result<(), GrantError>) -> &'static str {
        result.expect_err("expected an invalid grant").field
    }

    #[test]
    fn a_sample_grant_is_valid() {
        sample().validate(&Limits::default()).unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let limits = Limits::default();
        let cases: Vec<Case> = vec![
            ("id", |g| g.id.clear()),
            ("id", |g| g.id = "has space".into()),
            ("id", |g| g.id = "x".repeat(MAX_ID_LEN + 1)),
            ("subject", |g| g.subject = "nul\0".into()),
            ("grantee", |g| g.grantee.clear()),
            ("issued_by", |g| g.issued_by.clear()),
            ("owner", |g| g.owner = "\"quoted\"".into()),
            ("purposes", |g| g.purposes.clear()),
            ("purposes", |g| g.purposes = names(&["Care"])),
            ("datasets", |g| g.datasets.clear()),
            ("datasets", |g| {
                g.datasets = (0..65).map(|i| format!("d{i}")).collect()
            }),
            ("actions", |g| g.actions = names(&[""])),
            ("permissions", |g| g.permissions.clear()),
            ("not_before", |g| g.not_before = -1),
            ("expires_at", |g| g.expires_at = g.not_before),
            ("expires_at", |g| {
                g.expires_at = g.not_before + 400 * 24 * 3600
            }),
            ("parent", |g| g.parent = Some("g1".into())),
            ("parent", |g| g.parent = Some("".into())),
        ];
        for (field, mutate) in cases {
            let mut grant = sample();
            mutate(&mut grant);
            assert_eq!(field_of(grant.validate(&limits)), field, "{grant:?}");
        }
    }

    fn child() -> Grant {
        Grant {
            id: "g2".into(),
            grantee: "spiffe://mesh/ns/partner/sa/lab".into(),
            parent: Some("g1".into()),
            datasets: names(&["labs"]),
            actions: names(&["read"]),
            purposes: names(&["research"]),
            permissions: set(&[Permission::Access]),
            not_before: 2_000,
            expires_at: 50_000,
            ..sample()
        }
    }

    #[test]
    fn a_child_inside_its_parent_is_valid() {
        child().validate_child_of(&sample()).unwrap();
    }

    #[test]
    fn a_child_never_exceeds_its_parent() {
        let parent = sample();
        let cases: Vec<Case> = vec![
            ("datasets", |g| {
                g.datasets.insert("billing".into());
            }),
            ("actions", |g| {
                g.actions.insert("delete".into());
            }),
            ("purposes", |g| {
                g.purposes.insert("marketing".into());
            }),
            ("permissions", |g| {
                g.permissions.insert(Permission::Process);
            }),
            ("not_before", |g| g.not_before = 999),
            ("expires_at", |g| g.expires_at = 100_001),
            ("subject", |g| g.subject = "patient-2".into()),
            ("parent", |g| g.parent = Some("g9".into())),
        ];
        for (field, mutate) in cases {
            let mut grant = child();
            mutate(&mut grant);
            assert_eq!(field_of(grant.validate_child_of(&parent)), field);
        }
    }

    #[test]
    fn a_parent_without_share_or_not_active_cannot_have_children() {
        let mut parent = sample();
        parent.permissions = set(&[Permission::Access]);
        assert_eq!(field_of(child().validate_child_of(&parent)), "parent");
        let mut parent = sample();
        parent.status = Status::Expired;
        assert_eq!(field_of(child().validate_child_of(&parent)), "parent");
    }

    #[test]
    fn amendments_only_narrow() {
        let old = sample();
        let mut narrowed = old.clone();
        narrowed.purposes = names(&["care"]);
        narrowed.expires_at -= 10;
        narrowed.validate_narrowing_of(&old).unwrap();

        let cases: Vec<Case> = vec![
            ("purposes", |g| {
                g.purposes.insert("marketing".into());
            }),
            ("expires_at", |g| g.expires_at += 1),
            ("not_before", |g| g.not_before -= 1),
            ("grantee", |g| g.grantee = "someone-else".into()),
            ("subject", |g| g.subject = "patient-2".into()),
        ];
        for (field, mutate) in cases {
            let mut grant = old.clone();
            mutate(&mut grant);
            assert_eq!(field_of(grant.validate_narrowing_of(&old)), field);
        }
    }

    #[test]
    fn permission_names_round_trip() {
        for p in Permission::ALL {
            assert_eq!(p.as_str().parse::<Permission>().unwrap(), p);
        }
        assert_eq!(
            "delete".parse::<Permission>().unwrap_err().field,
            "permissions"
        );
    }
}
