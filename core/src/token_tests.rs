//! Token round trips and attacks. Each attack asserts the exact error, so
//! removing the check that guards it makes its test fail.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use jwt_simple::prelude::{HS256Key, MACLike};
use serde_json::{Value, json};

use super::*;

const NOW: UnixSeconds = 1_800_000_000;
const TOL: i64 = 60;

struct Fixture {
    key: SigningKey,
    keys: KeySet,
    options: VerifyOptions,
}

fn fixture() -> Fixture {
    let key = SigningKey::generate("k1").unwrap();
    let keys = KeySet::new([key.verifying_key(0)]);
    Fixture {
        key,
        keys,
        options: VerifyOptions::new("consentd", "records-api"),
    }
}

fn claims() -> ConsentClaims {
    ConsentClaims {
        issuer: "consentd".into(),
        audience: "records-api".into(),
        subject: "patient-1".into(),
        grantee: "spiffe://mesh/ns/analytics/sa/reader".into(),
        grant_id: "g1".into(),
        purposes: ["care".to_string()].into(),
        datasets: ["records".to_string()].into(),
        actions: ["read".to_string()].into(),
        permissions: [Permission::Access].into(),
        issued_at: NOW - 10,
        not_before: NOW - 10,
        expires_at: NOW + 300,
        jti: "jti-1".into(),
    }
}

fn header() -> Value {
    json!({"alg": "EdDSA", "typ": "consent+jwt", "kid": "k1"})
}

fn payload() -> Value {
    json!({
        "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 300,
        "iss": "consentd", "aud": "records-api", "sub": "patient-1", "jti": "jti-1",
        "grantee": "spiffe://mesh/ns/analytics/sa/reader", "gid": "g1",
        "purposes": ["care"], "datasets": ["records"], "actions": ["read"], "permissions": ["access"],
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs any header and payload with the fixture's Ed25519 key, so a test can
/// reach the check it targets with an otherwise valid signature.
fn forge(f: &Fixture, header: &Value, payload: &Value) -> String {
    forge_raw(
        f,
        &b64(header.to_string().as_bytes()),
        &b64(payload.to_string().as_bytes()),
    )
}

fn forge_raw(f: &Fixture, header: &str, payload: &str) -> String {
    let pair = ed25519_compact::KeyPair::from_slice(&f.key.to_bytes()).unwrap();
    let signing_input = format!("{header}.{payload}");
    let signature = pair.sk.sign(signing_input.as_bytes(), None);
    format!("{signing_input}.{}", b64(signature.as_ref()))
}

fn verify_at(f: &Fixture, token: &str, now: UnixSeconds) -> Result<ConsentClaims, TokenError> {
    verify(token, &f.keys, &f.options, now)
}

fn header_field(result: Result<ConsentClaims, TokenError>) -> &'static str {
    match result {
        Err(TokenError::Header { field, .. }) => field,
        other => panic!("expected a header error, got {other:?}"),
    }
}

#[test]
fn issued_tokens_verify_to_their_claims() {
    let f = fixture();
    let token = issue(&f.key, &claims()).unwrap();
    assert_eq!(verify_at(&f, &token, NOW), Ok(claims()));
    // And a forged token with the same content is accepted too: forge() is sound.
    assert_eq!(
        verify_at(&f, &forge(&f, &header(), &payload()), NOW),
        Ok(claims())
    );
}

#[test]
fn alg_must_be_eddsa() {
    let f = fixture();
    for alg in [
        json!("none"),
        json!("NONE"),
        json!("HS256"),
        json!("eddsa"),
        json!(null),
    ] {
        let mut h = header();
        h["alg"] = alg.clone();
        assert_eq!(
            header_field(verify_at(&f, &forge(&f, &h, &payload()), NOW)),
            "alg",
            "{alg}"
        );
    }
    let mut h = header();
    h.as_object_mut().unwrap().remove("alg");
    assert_eq!(
        header_field(verify_at(&f, &forge(&f, &h, &payload()), NOW)),
        "alg"
    );
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let f = fixture();
    let public = f.keys.get("k1").unwrap().public_key;
    let mac = HS256Key::from_bytes(&public).with_key_id("k1");
    let mut jwt = Claims::with_custom_claims(payload(), Duration::from_secs(300));
    jwt.issuer = Some("consentd".into());
    let options = HeaderOptions {
        signature_type: Some(TOKEN_TYPE.into()),
        content_type: None,
    };
    let token = mac.authenticate_with_options(jwt, &options).unwrap();
    assert_eq!(header_field(verify_at(&f, &token, NOW)), "alg");
}

#[test]
fn kid_must_name_a_held_key_exactly() {
    let f = fixture();
    let with_kid = |kid: Value| {
        let mut h = header();
        h["kid"] = kid;
        forge(&f, &h, &payload())
    };
    assert_eq!(
        verify_at(&f, &with_kid(json!("k2")), NOW),
        Err(TokenError::UnknownKey("k2".into()))
    );
    assert_eq!(
        verify_at(&f, &with_kid(json!("K1")), NOW),
        Err(TokenError::UnknownKey("K1".into()))
    );
    assert_eq!(
        header_field(verify_at(&f, &with_kid(json!("../k1")), NOW)),
        "kid"
    );
    assert_eq!(header_field(verify_at(&f, &with_kid(json!(7)), NOW)), "kid");
    let mut h = header();
    h.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        header_field(verify_at(&f, &forge(&f, &h, &payload()), NOW)),
        "kid"
    );
    // A 10 KB kid is refused by the kid check, not only by the size limit.
    let huge = with_kid(json!("k".repeat(10 * 1024)));
    let roomy = VerifyOptions {
        max_token_len: 64 * 1024,
        ..f.options.clone()
    };
    assert_eq!(header_field(verify(&huge, &f.keys, &roomy, NOW)), "kid");
}

#[test]
fn crit_and_key_references_are_refused() {
    let f = fixture();
    for (member, value, field) in [
        ("crit", json!(["exp"]), "crit"),
        ("crit", json!([]), "crit"),
        (
            "jku",
            json!("https://attacker.example/keys"),
            "key reference",
        ),
        (
            "x5u",
            json!("https://attacker.example/cert"),
            "key reference",
        ),
        ("jwk", json!({"kty": "OKP"}), "key reference"),
        ("x5c", json!(["MIIB"]), "key reference"),
        ("cty", json!("JWT"), "unknown member"),
    ] {
        let mut h = header();
        h[member] = value;
        assert_eq!(
            header_field(verify_at(&f, &forge(&f, &h, &payload()), NOW)),
            field,
            "{member}"
        );
    }
}

#[test]
fn typ_must_be_consent_jwt() {
    let f = fixture();
    for typ in [json!("JWT"), json!("at+jwt"), json!(null)] {
        let mut h = header();
        h["typ"] = typ;
        assert_eq!(
            header_field(verify_at(&f, &forge(&f, &h, &payload()), NOW)),
            "typ"
        );
    }
}

#[test]
fn exp_and_nbf_hold_at_the_tolerance_boundary() {
    let f = fixture();
    let exp = NOW + 300;
    let token = forge(&f, &header(), &payload());
    assert!(verify_at(&f, &token, exp + TOL - 1).is_ok());
    assert_eq!(
        verify_at(&f, &token, exp + TOL + 1),
        Err(TokenError::Expired)
    );
    let nbf = NOW - 10;
    assert!(verify_at(&f, &token, nbf - TOL + 1).is_ok());
    assert_eq!(
        verify_at(&f, &token, nbf - TOL - 1),
        Err(TokenError::NotYetValid)
    );
    // The tolerance is ours (60 s), not the library's default of 15 minutes.
    assert_eq!(verify_at(&f, &token, exp + 120), Err(TokenError::Expired));
    assert_eq!(TokenError::Expired.reason(), Reason::TokenExpired);
    assert_eq!(TokenError::NotYetValid.reason(), Reason::TokenNotYetValid);
}

#[test]
fn required_claims_must_be_present() {
    let f = fixture();
    for claim in ["exp", "nbf", "iat", "sub", "jti"] {
        let mut p = payload();
        p.as_object_mut().unwrap().remove(claim);
        let result = verify_at(&f, &forge(&f, &header(), &p), NOW);
        assert!(
            matches!(&result, Err(TokenError::Claim { field, .. }) if *field == claim),
            "{claim}: {result:?}"
        );
    }
    let mut p = payload();
    p["permissions"] = json!(["delete"]);
    assert!(matches!(
        verify_at(&f, &forge(&f, &header(), &p), NOW),
        Err(TokenError::Claim {
            field: "permissions",
            ..
        })
    ));
}

#[test]
fn issuer_and_audience_are_required() {
    let f = fixture();
    let mut p = payload();
    p["iss"] = json!("someone-else");
    assert_eq!(
        verify_at(&f, &forge(&f, &header(), &p), NOW),
        Err(TokenError::WrongIssuer)
    );
    for aud in [json!("other-api"), json!(""), json!(["other-api"])] {
        let mut p = payload();
        p["aud"] = aud.clone();
        let result = verify_at(&f, &forge(&f, &header(), &p), NOW);
        assert_eq!(
            result.clone().map_err(|e| e.reason()),
            Err(Reason::TokenWrongAudience),
            "{aud}: {result:?}"
        );
    }
    let mut p = payload();
    p.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        verify_at(&f, &forge(&f, &header(), &p), NOW),
        Err(TokenError::WrongAudience)
    );
    // An audience of the wrong JSON type is malformed rather than wrong.
    let mut p = payload();
    p["aud"] = json!(null);
    assert_eq!(
        verify_at(&f, &forge(&f, &header(), &p), NOW).map_err(|e| e.reason()),
        Err(Reason::TokenInvalid)
    );
}

#[test]
fn base64url_must_be_canonical() {
    let f = fixture();
    let header_b64 = b64(header().to_string().as_bytes());
    let payload_b64 = b64(payload().to_string().as_bytes());
    let good = forge_raw(&f, &header_b64, &payload_b64);
    assert!(verify_at(&f, &good, NOW).is_ok());

    let padded_header = URL_SAFE.encode(header().to_string().as_bytes());
    if padded_header.ends_with('=') {
        let token = forge_raw(&f, &padded_header, &payload_b64);
        assert!(
            matches!(verify_at(&f, &token, NOW), Err(TokenError::Malformed(_))),
            "padding"
        );
    }
    // '+' and '/' belong to standard base64, not base64url.
    let standard = STANDARD.encode([0xfb, 0xff, 0xfe]);
    assert!(standard.contains('+') || standard.contains('/'));
    let token = forge_raw(&f, &header_b64, &standard);
    assert!(
        matches!(verify_at(&f, &token, NOW), Err(TokenError::Malformed(_))),
        "standard alphabet"
    );
    // Non-zero trailing bits: the 64-byte signature leaves 4 unused bits.
    let (signing_input, signature) = good.rsplit_once('.').unwrap();
    let last = signature.chars().last().unwrap();
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let value = alphabet.find(last).unwrap();
    let bumped = alphabet.chars().nth(value | 1).unwrap();
    let token = format!(
        "{signing_input}.{}{bumped}",
        &signature[..signature.len() - 1]
    );
    assert!(
        matches!(verify_at(&f, &token, NOW), Err(TokenError::Malformed(_))),
        "trailing bits"
    );
    // Structure.
    for bad in [
        "",
        "a.b",
        "a.b.c.d",
        "..",
        &format!("{header_b64}..{}", &signature),
    ] {
        assert!(
            matches!(verify_at(&f, bad, NOW), Err(TokenError::Malformed(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn oversized_tokens_are_refused_before_parsing() {
    let f = fixture();
    let mut p = payload();
    p["purposes"] = json!(vec!["care"; 1000]);
    let token = forge(&f, &header(), &p);
    assert!(matches!(
        verify_at(&f, &token, NOW),
        Err(TokenError::TooLarge { .. })
    ));
}

#[test]
fn deeply_nested_json_is_refused_without_overflowing() {
    let f = fixture();
    let nested = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let payload = format!(r#"{{"iat":1,"purposes":{nested}}}"#);
    let roomy = VerifyOptions {
        max_token_len: 64 * 1024,
        ..f.options.clone()
    };
    let token = forge_raw(
        &f,
        &b64(header().to_string().as_bytes()),
        &b64(payload.as_bytes()),
    );
    let result = verify(&token, &f.keys, &roomy, NOW);
    assert!(
        matches!(result, Err(TokenError::Claim { .. })),
        "{result:?}"
    );
    let header = format!(r#"{{"alg":"EdDSA","x":{nested}}}"#);
    let token = forge_raw(&f, &b64(header.as_bytes()), &b64(payload.as_bytes()));
    assert_eq!(header_field(verify(&token, &f.keys, &roomy, NOW)), "json");
}

#[test]
fn keys_removed_or_replaced_no_longer_verify() {
    let f = fixture();
    let token = issue(&f.key, &claims()).unwrap();
    let empty = KeySet::default();
    assert_eq!(
        verify(&token, &empty, &f.options, NOW),
        Err(TokenError::UnknownKey("k1".into()))
    );
    // Same kid, another key: the signature fails.
    let other = SigningKey::generate("k1").unwrap();
    let replaced = KeySet::new([other.verifying_key(0)]);
    assert_eq!(
        verify(&token, &replaced, &f.options, NOW),
        Err(TokenError::BadSignature)
    );
    // A retired key verifies until its retire_after, not after.
    let retiring = KeySet::new([f.key.verifying_key(NOW + 100)]);
    assert!(verify(&token, &retiring, &f.options, NOW + 100).is_ok());
    assert_eq!(
        verify(&token, &retiring, &f.options, NOW + 101),
        Err(TokenError::UnknownKey("k1".into()))
    );
    // A tampered payload fails the signature.
    let (head, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let mut p = payload();
    p["gid"] = json!("g2");
    let tampered = format!("{head}.{}.{signature}", b64(p.to_string().as_bytes()));
    assert_eq!(verify_at(&f, &tampered, NOW), Err(TokenError::BadSignature));
}

#[test]
fn a_valid_token_presented_by_another_grantee_is_denied() {
    use crate::decision::{OnStale, Request, RoutePolicy, TokenEvidence, Verdict, decide};
    use crate::grant::tests::sample;
    use crate::snapshot::{Delta, Snapshot, Update};

    let f = fixture();
    let token = issue(&f.key, &claims()).unwrap();
    let verified = verify_at(&f, &token, NOW).unwrap();
    let mut snapshot = Snapshot::new();
    let grant = Grant {
        expires_at: NOW + 1000,
        not_before: 0,
        ..sample()
    };
    let delta = Delta {
        from_revision: 0,
        to_revision: 1,
        upserts: vec![grant],
        ..Delta::default()
    };
    snapshot.apply(Update::Delta(delta), NOW).unwrap();
    let request = |caller| Request {
        caller: Some(caller),
        subject: Some("patient-1"),
        dataset: "records",
        action: "read",
        purpose: Some("care"),
        permission: Permission::Access,
        token: TokenEvidence::Verified(&verified),
        policy: RoutePolicy {
            token_required: true,
            on_stale: OnStale::Deny,
            max_staleness_secs: 30,
        },
    };
    assert_eq!(
        decide(
            &snapshot,
            &request("spiffe://mesh/ns/analytics/sa/reader"),
            NOW
        )
        .verdict,
        Verdict::Allow
    );
    let stolen = decide(&snapshot, &request("spiffe://mesh/ns/thief/sa/x"), NOW);
    assert_eq!(stolen.verdict, Verdict::Deny(Reason::TokenGranteeMismatch));
}

use crate::grant::Grant;
