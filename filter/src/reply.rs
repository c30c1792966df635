//! The local reply for a denied request: status from the reason, a JSON body
//! `{error, reason, grant_id, request_id}`, and `retry-after` on 503 so
//! clients back off while the sidecar cannot know the consent state.

use consent_core::Reason;
use serde::Serialize;

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    reason: &'static str,
    grant_id: Option<&'a str>,
    request_id: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

pub fn deny(
    reason: Reason,
    grant_id: Option<&str>,
    request_id: Option<&str>,
    retry_after_secs: u32,
) -> Reply {
    let status = reason.http_status();
    let error = match status {
        401 => "unauthenticated",
        503 => "consent_unavailable",
        _ => "consent_denied",
    };
    let body = Body {
        error,
        reason: reason.as_str(),
        grant_id,
        request_id,
    };
    // Serializing this struct of strings cannot fail; an empty body would
    // still carry the status if it ever did.
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if status == 503 {
        headers.push(("retry-after", retry_after_secs.to_string()));
    }
    Reply {
        status,
        headers,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_bodies_and_retry_after() {
        let r = deny(Reason::GrantRevoked, Some("g1"), Some("req-1"), 5);
        assert_eq!(r.status, 403);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "consent_denied", "reason": "grant_revoked",
                               "grant_id": "g1", "request_id": "req-1"})
        );
        assert!(!r.headers.iter().any(|(k, _)| *k == "retry-after"));

        let r = deny(Reason::SnapshotStale, None, None, 7);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("retry-after", "7".to_owned())));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["grant_id"], serde_json::Value::Null);

        assert_eq!(deny(Reason::MissingIdentity, None, None, 5).status, 401);
    }
}
