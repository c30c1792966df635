//! Extraction of the caller, subject, purpose and token from a request, over
//! an abstract source of headers and properties so it is tested natively.

use crate::config::{IdentitySource, PurposeSource, Route, SubjectSource};
use crate::route::{Params, query_param};

/// What the filter can read about the current request. In the filter this is
/// request headers (only in the request-headers callback) and properties.
pub trait RequestSource {
    /// A request header by lower-case name.
    fn header(&self, name: &str) -> Option<String>;
    /// A property (CEL attribute) by path.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// The mTLS peer's URI SAN, the SPIFFE id Envoy exposes.
pub const PEER_URI_SAN: [&str; 2] = ["connection", "uri_san_peer_certificate"];
/// Where jwt_authn writes verified claims.
pub const JWT_AUTHN_METADATA: [&str; 3] = [
    "metadata",
    "filter_metadata",
    "envoy.filters.http.jwt_authn",
];

/// Everything the decision and the audit event need from one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    pub caller: Option<String>,
    pub subject: Option<String>,
    /// The purpose as requested (for the audit), even when not allowed.
    pub requested_purpose: Option<String>,
    /// The purpose the decision sees: `None` when the header named one the
    /// route does not allow, which denies as `purpose_not_granted`.
    pub purpose: Option<String>,
    pub token: Option<String>,
    pub request_id: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn utf8(bytes: Option<Vec<u8>>) -> Option<String> {
    non_empty(bytes.and_then(|b| String::from_utf8(b).ok()))
}

pub fn caller(source: &IdentitySource, request: &impl RequestSource) -> Option<String> {
    match source {
        IdentitySource::PeerCertificate => utf8(request.property(&PEER_URI_SAN)),
        IdentitySource::Header(name) => non_empty(request.header(name)),
        IdentitySource::JwtAuthn(field) => {
            let mut path: Vec<&str> = JWT_AUTHN_METADATA.to_vec();
            path.extend(field.iter().map(String::as_str));
            utf8(request.property(&path))
        }
    }
}

/// The token from its header; a `Bearer ` prefix is accepted and dropped.
pub fn token(header: &str, request: &impl RequestSource) -> Option<String> {
    let value = non_empty(request.header(header))?;
    if value.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim().to_owned(),
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

pub fn request_id(request: &impl RequestSource) -> Option<String> {
    non_empty(request.header("x-request-id")).or_else(|| utf8(request.property(&["request", "id"])))
}

pub fn extract(
    route: &Route,
    params: &Params<'_>,
    query: &str,
    token_header: &str,
    request: &impl RequestSource,
) -> Extracted {
    let subject = match &route.subject {
        SubjectSource::PathParam(name) => params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_string()),
        SubjectSource::Header(name) => non_empty(request.header(name)),
        SubjectSource::Query(name) => query_param(query, name).map(|v| v.into_owned()),
    };
    let (requested_purpose, purpose) = match &route.purpose {
        PurposeSource::Fixed(p) => (Some(p.clone()), Some(p.clone())),
        PurposeSource::Header { name, allowed } => {
            let requested = non_empty(request.header(name));
            let purpose = requested.clone().filter(|p| allowed.contains(p));
            (requested, purpose)
        }
    };
    Extracted {
        caller: caller(&route.identity, request),
        subject: non_empty(subject),
        requested_purpose,
        purpose,
        token: token(token_header, request),
        request_id: request_id(request),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;
    use crate::route::{Lookup, split_path};

    #[derive(Default)]
    struct Fake {
        headers: HashMap<String, String>,
        properties: HashMap<Vec<String>, Vec<u8>>,
    }

    impl Fake {
        fn header(mut self, k: &str, v: &str) -> Self {
            self.headers.insert(k.into(), v.into());
            self
        }
        fn property(mut self, path: &[&str], v: &str) -> Self {
            self.properties
                .insert(path.iter().map(|s| s.to_string()).collect(), v.into());
            self
        }
    }

    impl RequestSource for Fake {
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }
        fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
            let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            self.properties.get(&key).cloned()
        }
    }

    fn config() -> Config {
        let json = r#"{
          "control_plane": {"cluster": "consentd", "node_id": "n1", "max_staleness_secs": 30, "heartbeat_secs": 5},
          "token": {"issuer": "consentd", "audience": "records-api"},
          "routes": [
            {"path": "/patients/{subject}/records/{record}", "dataset": "records", "action": "read",
             "permission": "access", "purpose": {"header": "x-purpose", "allowed": ["care", "research"]},
             "subject": {"path_param": "subject"}},
            {"path": "/labs", "dataset": "labs", "action": "read", "permission": "access",
             "purpose": {"fixed": "care"}, "subject": {"query": "patient"},
             "identity": {"header": "x-verified-caller"}},
            {"path": "/share", "dataset": "labs", "action": "share", "permission": "share",
             "purpose": {"fixed": "care"}, "subject": {"header": "x-subject"},
             "identity": {"jwt_authn": ["payload", "sub"]}}
          ]
        }"#;
        Config::parse(json.as_bytes(), "root", |_| None).unwrap()
    }

    fn run(config: &Config, path: &str, request: &Fake) -> Extracted {
        let (p, query) = split_path(path);
        let Lookup::Protected(route, params) = config.routes.lookup("GET", p) else {
            panic!("{path} is not protected");
        };
        extract(route, &params, query, &config.token_header, request)
    }

    #[test]
    fn path_subject_header_purpose_and_peer_identity() {
        let c = config();
        let req = Fake::default()
            .property(&PEER_URI_SAN, "spiffe://mesh/ns/a/sa/reader")
            .header("x-purpose", "research")
            .header("x-consent-token", "Bearer abc.def.ghi")
            .header("x-request-id", "req-1");
        let got = run(&c, "/patients/p%2D1/records/r1?x=1", &req);
        assert_eq!(
            got,
            Extracted {
                caller: Some("spiffe://mesh/ns/a/sa/reader".into()),
                subject: Some("p-1".into()),
                requested_purpose: Some("research".into()),
                purpose: Some("research".into()),
                token: Some("abc.def.ghi".into()),
                request_id: Some("req-1".into()),
            }
        );
    }

    #[test]
    fn a_purpose_outside_the_allowed_list_is_not_passed_to_the_decision() {
        let c = config();
        let req = Fake::default().header("x-purpose", "marketing");
        let got = run(&c, "/patients/p1/records/r1", &req);
        assert_eq!(got.requested_purpose.as_deref(), Some("marketing"));
        assert_eq!(got.purpose, None);
        assert_eq!(
            run(&c, "/patients/p1/records/r1", &Fake::default()).requested_purpose,
            None
        );
    }

    #[test]
    fn query_subject_fixed_purpose_and_header_identity() {
        let c = config();
        let req = Fake::default()
            .header("x-verified-caller", "svc-a")
            .property(&PEER_URI_SAN, "spiffe://ignored")
            .header("x-consent-token", "raw.token.value")
            .property(&["request", "id"], "from-property");
        let got = run(&c, "/labs?patient=p7", &req);
        assert_eq!(got.caller.as_deref(), Some("svc-a"));
        assert_eq!(got.subject.as_deref(), Some("p7"));
        assert_eq!(got.purpose.as_deref(), Some("care"));
        assert_eq!(got.token.as_deref(), Some("raw.token.value"));
        assert_eq!(got.request_id.as_deref(), Some("from-property"));
        let none = run(&c, "/labs", &Fake::default());
        assert_eq!(
            (none.caller, none.subject, none.token, none.request_id),
            (None, None, None, None)
        );
    }

    #[test]
    fn jwt_authn_identity_and_header_subject() {
        let c = config();
        let path = [
            "metadata",
            "filter_metadata",
            "envoy.filters.http.jwt_authn",
            "payload",
            "sub",
        ];
        let req = Fake::default()
            .property(&path, "svc-b")
            .header("x-subject", " p9 ");
        let got = run(&c, "/share", &req);
        assert_eq!(got.caller.as_deref(), Some("svc-b"));
        assert_eq!(got.subject.as_deref(), Some("p9"));
        // Empty values are absent, so an empty header cannot name a caller.
        let empty = Fake::default().property(&path, "").header("x-subject", "");
        let got = run(&c, "/share", &empty);
        assert_eq!((got.caller, got.subject), (None, None));
    }

    #[test]
    fn bearer_prefix_and_empty_tokens() {
        let t = |v: &str| {
            token(
                "x-consent-token",
                &Fake::default().header("x-consent-token", v),
            )
        };
        assert_eq!(t("bearer a.b.c").as_deref(), Some("a.b.c"));
        assert_eq!(t("a.b.c").as_deref(), Some("a.b.c"));
        assert_eq!(t("Bearer "), None);
        assert_eq!(t(""), None);
    }
}
