use serde_json::{Value, json};

use super::*;
use crate::route::Lookup;

fn base() -> Value {
    json!({
        "control_plane": {
            "cluster": "outbound|9090||consentd.consent.svc.cluster.local",
            "authority": "consentd.consent.svc.cluster.local",
            "node_id": "sidecar-1",
            "credential": "s3cret",
            "max_staleness_secs": 30,
            "heartbeat_secs": 5
        },
        "token": {"issuer": "consentd", "audience": "records-api"},
        "mode": "enforce",
        "routes": [{
            "name": "records",
            "methods": ["GET"],
            "path": "/patients/{subject}/records/{record}",
            "dataset": "records",
            "action": "read",
            "permission": "access",
            "purpose": {"header": "x-purpose", "allowed": ["care"]},
            "subject": {"path_param": "subject"},
            "on_stale": "allow"
        }],
        "default_deny_prefixes": ["/patients/"]
    })
}

fn parse(v: &Value) -> Result<Config, ConfigError> {
    let env = |name: &str| (name == "CONSENT_CREDENTIAL").then(|| "from-env".to_owned());
    Config::parse(v.to_string().as_bytes(), "consent_filter", env)
}

/// Applies `edit` to the base config and returns the field the error names.
fn field_of(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = base();
    edit(&mut v);
    match parse(&v) {
        Ok(_) => panic!("expected an error for {v}"),
        Err(e) => e.field,
    }
}

#[test]
fn a_full_config_parses_with_defaults() {
    let c = parse(&base()).unwrap();
    assert_eq!(c.key_prefix, "consent/consent_filter/");
    assert_eq!(c.token_header, "x-consent-token");
    assert_eq!(c.grant_header, "x-consent-grant");
    assert_eq!(c.verify.tolerance_secs, 60);
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.datasets, vec!["records".to_owned()]);
    assert_eq!(c.control_plane.credential.as_deref(), Some("s3cret"));
    assert_eq!(
        c.control_plane.upstream.as_bytes(),
        grpc_service_bytes(
            "outbound|9090||consentd.consent.svc.cluster.local",
            "consentd.consent.svc.cluster.local"
        )
    );
    let route = &c.routes.routes()[0];
    assert_eq!(route.on_stale, OnStale::Allow);
    assert!(route.token_required);
    assert_eq!(route.identity, IdentitySource::PeerCertificate);
    assert!(matches!(
        c.routes.lookup("GET", "/patients/p/records/r"),
        Lookup::Protected(..)
    ));
    assert_eq!(
        c.routes.lookup("POST", "/patients/p/records/r"),
        Lookup::Undeclared
    );
    assert_eq!(c.routes.lookup("GET", "/health"), Lookup::Pass);
}

#[test]
fn grpc_service_is_encoded_as_envoy_expects() {
    // GrpcService{envoy_grpc(1): EnvoyGrpc{cluster_name(1): "c", authority(2): "a"}}
    assert_eq!(
        grpc_service_bytes("c", "a"),
        vec![0x0a, 6, 0x0a, 1, b'c', 0x12, 1, b'a']
    );
    let mut v = base();
    v["control_plane"]["cluster"] = json!("consentd");
    v["control_plane"]
        .as_object_mut()
        .unwrap()
        .remove("authority");
    assert_eq!(parse(&v).unwrap().control_plane.upstream, "consentd");
}

#[test]
fn dry_run_env_credential_and_identity_sources() {
    let mut v = base();
    v["mode"] = json!("dry_run");
    v["control_plane"]
        .as_object_mut()
        .unwrap()
        .remove("credential");
    v["control_plane"]["credential_env"] = json!("CONSENT_CREDENTIAL");
    v["identity"] = json!({"jwt_authn": ["payload", "sub"]});
    v["routes"][0]["identity"] = json!({"header": "x-caller"});
    v["key_prefix"] = json!("cm/");
    let c = parse(&v).unwrap();
    assert_eq!(c.mode, Mode::DryRun);
    assert_eq!(c.control_plane.credential.as_deref(), Some("from-env"));
    assert_eq!(
        c.routes.routes()[0].identity,
        IdentitySource::Header("x-caller".into())
    );
    assert_eq!(c.key_prefix, "cm/");
    v["identity"] = json!("peer_certificate");
    assert!(parse(&v).is_ok());
}

#[test]
fn each_bad_field_is_named() {
    type Edit = fn(&mut Value);
    let cases: Vec<(&str, Edit)> = vec![
        ("config", |v| *v = json!([])),
        ("config", |v| {
            v.as_object_mut().unwrap().remove("routes");
        }),
        ("surprise", |v| v["surprise"] = json!(1)),
        ("control_plane.surprise", |v| {
            v["control_plane"]["surprise"] = json!(1)
        }),
        ("control_plane.cluster", |v| {
            v["control_plane"]["cluster"] = json!("")
        }),
        ("control_plane.cluster", |v| {
            v["control_plane"]["cluster"] = json!(7)
        }),
        ("control_plane.authority", |v| {
            v["control_plane"]["authority"] = json!("")
        }),
        ("control_plane.authority", |v| {
            v["control_plane"]
                .as_object_mut()
                .unwrap()
                .remove("authority");
        }),
        ("control_plane.node_id", |v| {
            v["control_plane"]["node_id"] = json!("has space")
        }),
        ("control_plane.credential", |v| {
            v["control_plane"]["credential"] = json!("a b")
        }),
        ("control_plane.credential_env", |v| {
            v["control_plane"]["credential_env"] = json!("CONSENT_CREDENTIAL");
        }),
        ("control_plane.credential_env", |v| {
            v["control_plane"]
                .as_object_mut()
                .unwrap()
                .remove("credential");
            v["control_plane"]["credential_env"] = json!("UNSET_VARIABLE");
        }),
        ("control_plane.max_staleness_secs", |v| {
            v["control_plane"]["max_staleness_secs"] = json!(0);
        }),
        ("control_plane.max_staleness_secs", |v| {
            v["control_plane"]["max_staleness_secs"] = json!("30s");
        }),
        ("control_plane.heartbeat_secs", |v| {
            v["control_plane"]["heartbeat_secs"] = json!(30)
        }),
        ("control_plane.heartbeat_secs", |v| {
            v["control_plane"]["heartbeat_secs"] = json!(-1)
        }),
        ("control_plane.tick_ms", |v| {
            v["control_plane"]["tick_ms"] = json!(5)
        }),
        ("control_plane.backoff_max_ms", |v| {
            v["control_plane"]["backoff_max_ms"] = json!(1)
        }),
        // A missing field is reported at its parent; the message names it.
        ("config", |v| {
            v.as_object_mut().unwrap().remove("token");
        }),
        ("token.header", |v| v["token"]["header"] = json!("X-Token")),
        ("token.issuer", |v| v["token"]["issuer"] = json!("")),
        ("token.audience", |v| v["token"]["audience"] = json!("")),
        ("token.tolerance_secs", |v| {
            v["token"]["tolerance_secs"] = json!(301)
        }),
        ("token.cache_size", |v| v["token"]["cache_size"] = json!(0)),
        ("token.extra", |v| v["token"]["extra"] = json!(true)),
        ("identity", |v| v["identity"] = json!("mtls")),
        ("identity.header", |v| v["identity"] = json!({"header": ""})),
        ("identity.jwt_authn", |v| {
            v["identity"] = json!({"jwt_authn": []})
        }),
        ("mode", |v| v["mode"] = json!("audit")),
        ("key_prefix", |v| v["key_prefix"] = json!("")),
        ("grant_header", |v| v["grant_header"] = json!("X-Grant")),
        ("retry_after_secs", |v| v["retry_after_secs"] = json!(0)),
        ("audit.max_buffered", |v| {
            v["audit"] = json!({"max_batch": 10, "max_buffered": 5})
        }),
        ("routes", |v| v["routes"] = json!([])),
        ("routes[0].path", |v| {
            v["routes"][0]["path"] = json!("patients")
        }),
        ("routes[0].methods[0]", |v| {
            v["routes"][0]["methods"] = json!(["get"])
        }),
        ("routes[0].dataset", |v| {
            v["routes"][0]["dataset"] = json!("Records")
        }),
        ("routes[0].action", |v| v["routes"][0]["action"] = json!("")),
        ("routes[0].permission", |v| {
            v["routes"][0]["permission"] = json!("admin")
        }),
        ("routes[0].purpose", |v| {
            v["routes"][0]["purpose"] = json!({})
        }),
        ("routes[0].purpose", |v| {
            v["routes"][0]["purpose"] = json!({"fixed": "care", "header": "x-purpose"});
        }),
        ("routes[0].purpose.fixed", |v| {
            v["routes"][0]["purpose"] = json!({"fixed": "Care"})
        }),
        ("routes[0].purpose.allowed", |v| {
            v["routes"][0]["purpose"] = json!({"fixed": "care", "allowed": ["care"]});
        }),
        ("routes[0].purpose.allowed", |v| {
            v["routes"][0]["purpose"] = json!({"header": "x-purpose"});
        }),
        ("routes[0].purpose.header", |v| {
            v["routes"][0]["purpose"] = json!({"header": "X P", "allowed": ["care"]});
        }),
        ("routes[0].purpose.kind", |v| {
            v["routes"][0]["purpose"]["kind"] = json!(1)
        }),
        ("routes[0].subject", |v| {
            v["routes"][0]["subject"] = json!({})
        }),
        ("routes[0].subject.path_param", |v| {
            v["routes"][0]["subject"] = json!({"path_param": "patient"});
        }),
        ("routes[0].subject.header", |v| {
            v["routes"][0]["subject"] = json!({"header": ""})
        }),
        ("routes[0].subject.query", |v| {
            v["routes"][0]["subject"] = json!({"query": ""})
        }),
        ("routes[0].token_required", |v| {
            v["routes"][0]["token_required"] = json!("yes")
        }),
        ("routes[0].on_stale", |v| {
            v["routes"][0]["on_stale"] = json!("open")
        }),
        ("routes[0].identity.header", |v| {
            v["routes"][0]["identity"] = json!({"header": "A"})
        }),
        ("routes[0].unknown", |v| {
            v["routes"][0]["unknown"] = json!(1)
        }),
        ("default_deny_prefixes[0]", |v| {
            v["default_deny_prefixes"] = json!(["patients"])
        }),
    ];
    for (expected, edit) in cases {
        assert_eq!(field_of(edit), expected);
    }
}

#[test]
fn errors_read_as_one_log_line() {
    let mut v = base();
    v["routes"][0]["permission"] = json!("admin");
    let message = parse(&v).unwrap_err().to_string();
    assert!(message.starts_with("invalid plugin configuration: routes[0].permission: "));
    assert!(message.contains("admin"), "{message}");
    assert!(!message.contains('\n'));
}
