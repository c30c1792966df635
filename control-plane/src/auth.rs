//! Bearer-token authentication for the admin API and the sidecar stream. Each
//! has its own token; a call without the right one gets `Unauthenticated` and
//! reaches no handler, so it changes nothing.

use std::sync::Arc;

use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>`; `None` accepts every call (dev mode only).
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
    realm: &'static str,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

impl BearerAuth {
    pub fn new(realm: &'static str, token: Option<String>) -> Self {
        BearerAuth {
            expected: token.map(|t| Arc::from(t.into_bytes())),
            realm,
        }
    }

    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(format!("{} call without a bearer token", self.realm))
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization is not a bearer token"))?;
        if constant_time_eq(presented.trim().as_bytes(), expected) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "wrong {} token",
                self.realm
            )))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn requests_need_the_right_bearer() {
        let auth = BearerAuth::new("admin", Some("s3cret".into()));
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(&ok).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            auth.check(&wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            auth.check(&Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(
            BearerAuth::new("admin", None)
                .check(&Request::new(()))
                .is_ok()
        );
    }
}
