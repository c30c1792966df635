//! The closed set of reasons a request is denied. Their snake_case names are
//! stable: they appear in responses, metrics and the audit log.

use std::fmt;
use std::str::FromStr;

macro_rules! reasons {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        /// Why a request was denied. The first failing check names it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($variant),+
        }

        impl Reason {
            /// Every reason, in the order the decision checks them.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),+];

            /// The stable snake_case name.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name),+
                }
            }
        }

        impl FromStr for Reason {
            type Err = UnknownReason;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Reason::$variant),)+
                    _ => Err(UnknownReason(s.to_owned())),
                }
            }
        }
    };
}

reasons! {
    MissingIdentity => "missing_identity",
    SnapshotUnavailable => "snapshot_unavailable",
    SnapshotStale => "snapshot_stale",
    MissingToken => "missing_token",
    TokenInvalid => "token_invalid",
    TokenExpired => "token_expired",
    TokenNotYetValid => "token_not_yet_valid",
    TokenWrongAudience => "token_wrong_audience",
    TokenGranteeMismatch => "token_grantee_mismatch",
    GrantUnknown => "grant_unknown",
    GrantRevoked => "grant_revoked",
    ParentRevoked => "parent_revoked",
    GrantNotYetValid => "grant_not_yet_valid",
    GrantExpired => "grant_expired",
    SubjectMismatch => "subject_mismatch",
    DatasetOutOfScope => "dataset_out_of_scope",
    ActionOutOfScope => "action_out_of_scope",
    PurposeNotGranted => "purpose_not_granted",
    PermissionMissing => "permission_missing",
}

impl Reason {
    /// The HTTP status a denial with this reason answers with: 401 when the
    /// caller is unknown, 503 when the sidecar cannot know the consent state,
    /// 403 otherwise.
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::MissingIdentity => 401,
            Reason::SnapshotUnavailable | Reason::SnapshotStale => 503,
            _ => 403,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason name that is not in the closed set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown deny reason {0:?}")]
pub struct UnknownReason(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for &reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
            assert_eq!(reason.to_string(), reason.as_str());
            assert!(seen.insert(reason.as_str()), "duplicate name {reason}");
        }
        assert_eq!(Reason::ALL.len(), 19);
        assert!("grant_deleted".parse::<Reason>().is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(Reason::MissingIdentity.http_status(), 401);
        assert_eq!(Reason::SnapshotStale.http_status(), 503);
        assert_eq!(Reason::SnapshotUnavailable.http_status(), 503);
        assert_eq!(Reason::GrantRevoked.http_status(), 403);
    }
}
