//! The one conversion from errors to `tonic::Status`: bad input is
//! `InvalidArgument` naming the field, a missing thing is `NotFound`, and an
//! internal failure is `Internal` with its details only in the log.

use crate::store::StoreError;

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid { field, problem } => {
                tonic::Status::invalid_argument(format!("invalid {field}: {problem}"))
            }
            StoreError::NotFound { .. } => tonic::Status::not_found(e.to_string()),
            StoreError::AlreadyExists(m) => tonic::Status::already_exists(m),
            StoreError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                tonic::Status::internal("internal error; see the consentd log")
            }
        }
    }
}

/// Bad input named by its field.
pub fn invalid(field: &str, problem: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::invalid_argument(format!("invalid {field}: {problem}"))
}
