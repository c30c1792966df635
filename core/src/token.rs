//! Consent tokens: short-lived EdDSA JWTs issued by the control plane. A token
//! is evidence of a grant, never proof: the decision still reads the grant.
//!
//! Verification is strict before jwt-simple sees the token: canonical
//! base64url, a header of exactly the fields we issue, an exact `kid` looked
//! up in a streamed key set (never fetched from `jku`/`x5u`/`jwk`/`x5c`), an
//! explicit clock tolerance and the caller's clock rather than the library's.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::JWTError;
use jwt_simple::prelude::{
    Audiences, Claims, Duration, Ed25519KeyPair, Ed25519PublicKey, EdDSAKeyPairLike,
    EdDSAPublicKeyLike, HeaderOptions, JWTClaims, UnixTimeStamp, VerificationOptions,
};
use serde::{Deserialize, Serialize};

use crate::grant::{Grant, Permission, UnixSeconds, check_id};
use crate::reason::Reason;

/// The `typ` header of every consent token.
pub const TOKEN_TYPE: &str = "consent+jwt";
const ALGORITHM: &str = "EdDSA";
/// Longest `kid` accepted; ours are short.
pub const MAX_KID_LEN: usize = 64;

/// What a consent token says. Issued from a grant; returned by [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsentClaims {
    pub issuer: String,
    pub audience: String,
    /// The data subject.
    pub subject: String,
    pub grantee: String,
    pub grant_id: String,
    pub purposes: BTreeSet<String>,
    pub datasets: BTreeSet<String>,
    pub actions: BTreeSet<String>,
    pub permissions: BTreeSet<Permission>,
    pub issued_at: UnixSeconds,
    pub not_before: UnixSeconds,
    pub expires_at: UnixSeconds,
    pub jti: String,
}

impl ConsentClaims {
    /// Claims carrying exactly `grant`'s scope, valid for the grant's whole
    /// window. An issuer narrows the window with struct update syntax; the
    /// scope is never wider than the grant's.
    pub fn for_grant(grant: &Grant, issuer: &str, audience: &str, jti: &str) -> ConsentClaims {
        ConsentClaims {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            subject: grant.subject.clone(),
            grantee: grant.grantee.clone(),
            grant_id: grant.id.clone(),
            purposes: grant.purposes.clone(),
            datasets: grant.datasets.clone(),
            actions: grant.actions.clone(),
            permissions: grant.permissions.clone(),
            issued_at: grant.not_before,
            not_before: grant.not_before,
            expires_at: grant.expires_at,
            jti: jti.to_owned(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomClaims {
    grantee: String,
    gid: String,
    purposes: Vec<String>,
    datasets: Vec<String>,
    actions: Vec<String>,
    permissions: Vec<String>,
}

/// Why a token was rejected. [`TokenError::reason`] maps it to the deny reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("token is not compact JWS: {0}")]
    Malformed(&'static str),
    #[error("token header {field}: {problem}")]
    Header {
        field: &'static str,
        problem: String,
    },
    #[error("no verifying key with kid {0:?}")]
    UnknownKey(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audience is not the expected one")]
    WrongAudience,
    #[error("token issuer is not the expected one")]
    WrongIssuer,
    #[error("token claim {field}: {problem}")]
    Claim {
        field: &'static str,
        problem: String,
    },
    #[error("cannot sign token: {0}")]
    Signing(String),
}

impl TokenError {
    pub fn reason(&self) -> Reason {
        match self {
            TokenError::Expired => Reason::TokenExpired,
            TokenError::NotYetValid => Reason::TokenNotYetValid,
            TokenError::WrongAudience => Reason::TokenWrongAudience,
            _ => Reason::TokenInvalid,
        }
    }

    fn header(field: &'static str, problem: impl Into<String>) -> Self {
        TokenError::Header {
            field,
            problem: problem.into(),
        }
    }

    fn claim(field: &'static str, problem: impl Into<String>) -> Self {
        TokenError::Claim {
            field,
            problem: problem.into(),
        }
    }
}

/// A public key that verifies tokens, as streamed to every sidecar.
#[derive(Clone, Debug)]
pub struct VerifyingKey {
    pub kid: String,
    pub public_key: [u8; 32],
    /// After this time no token signed by the key can be valid; 0 while current.
    pub retire_after: UnixSeconds,
    parsed: Ed25519PublicKey,
}

impl PartialEq for VerifyingKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid
            && self.public_key == other.public_key
            && self.retire_after == other.retire_after
    }
}

impl Eq for VerifyingKey {}

impl VerifyingKey {
    pub fn new(
        kid: &str,
        public_key: &[u8],
        retire_after: UnixSeconds,
    ) -> Result<Self, TokenError> {
        check_kid(kid)?;
        let raw: [u8; 32] = public_key
            .try_into()
            .map_err(|_| TokenError::header("kid", format!("key {kid:?} is not 32 bytes")))?;
        let parsed = Ed25519PublicKey::from_bytes(&raw)
            .map_err(|_| TokenError::header("kid", format!("key {kid:?} is not an Ed25519 key")))?
            .with_key_id(kid);
        Ok(VerifyingKey {
            kid: kid.to_owned(),
            public_key: raw,
            retire_after,
            parsed,
        })
    }
}

/// The keys a verifier trusts, looked up by exact `kid`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: BTreeMap<String, VerifyingKey>,
}

impl KeySet {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        KeySet {
            keys: keys.into_iter().map(|k| (k.kid.clone(), k)).collect(),
        }
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn iter(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.keys.values()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The control plane's signing key.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate(kid: &str) -> Result<Self, TokenError> {
        check_kid(kid)?;
        Ok(SigningKey {
            kid: kid.to_owned(),
            pair: Ed25519KeyPair::generate().with_key_id(kid),
        })
    }

    /// Restores a key from [`SigningKey::to_bytes`].
    pub fn from_bytes(kid: &str, bytes: &[u8]) -> Result<Self, TokenError> {
        check_kid(kid)?;
        let pair = Ed25519KeyPair::from_bytes(bytes)
            .map_err(|e| TokenError::Signing(format!("key {kid:?}: {e}")))?;
        Ok(SigningKey {
            kid: kid.to_owned(),
            pair: pair.with_key_id(kid),
        })
    }

    /// The 64-byte secret key; store it as a secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.pair.to_bytes()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn verifying_key(&self, retire_after: UnixSeconds) -> VerifyingKey {
        let public = self.pair.public_key().to_bytes();
        VerifyingKey::new(&self.kid, &public, retire_after)
            .expect("a key pair's own public key is valid")
    }
}

/// What a verifier requires beyond the signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub tolerance_secs: u64,
    pub max_token_len: usize,
}

impl VerifyOptions {
    pub const DEFAULT_TOLERANCE_SECS: u64 = 60;
    pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;

    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        VerifyOptions {
            issuer: issuer.into(),
            audience: audience.into(),
            tolerance_secs: Self::DEFAULT_TOLERANCE_SECS,
            max_token_len: Self::DEFAULT_MAX_TOKEN_LEN,
        }
    }
}

fn check_kid(kid: &str) -> Result<(), TokenError> {
    if kid.len() > MAX_KID_LEN {
        return Err(TokenError::header(
            "kid",
            format!("longer than {MAX_KID_LEN} bytes"),
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if kid.is_empty() || !kid.chars().all(ok) {
        return Err(TokenError::header(
            "kid",
            format!("{kid:?} is not of A-Z a-z 0-9 - _"),
        ));
    }
    Ok(())
}

/// Signs a token carrying `claims` with `key`.
pub fn issue(key: &SigningKey, claims: &ConsentClaims) -> Result<String, TokenError> {
    let custom = CustomClaims {
        grantee: claims.grantee.clone(),
        gid: claims.grant_id.clone(),
        purposes: claims.purposes.iter().cloned().collect(),
        datasets: claims.datasets.iter().cloned().collect(),
        actions: claims.actions.iter().cloned().collect(),
        permissions: claims
            .permissions
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
    };
    let stamp = |t: UnixSeconds| UnixTimeStamp::from_secs(t.max(0) as u64);
    let mut jwt: JWTClaims<CustomClaims> =
        Claims::with_custom_claims(custom, Duration::from_secs(0));
    jwt.issued_at = Some(stamp(claims.issued_at));
    jwt.invalid_before = Some(stamp(claims.not_before));
    jwt.expires_at = Some(stamp(claims.expires_at));
    jwt.issuer = Some(claims.issuer.clone());
    jwt.audiences = Some(Audiences::AsString(claims.audience.clone()));
    jwt.subject = Some(claims.subject.clone());
    jwt.jwt_id = Some(claims.jti.clone());
    let header = HeaderOptions {
        signature_type: Some(TOKEN_TYPE.to_owned()),
        content_type: None,
    };
    key.pair
        .sign_with_options(jwt, &header)
        .map_err(|e| TokenError::Signing(e.to_string()))
}

/// Verifies `token` against `keys` at `now` and returns its claims.
pub fn verify(
    token: &str,
    keys: &KeySet,
    options: &VerifyOptions,
    now: UnixSeconds,
) -> Result<ConsentClaims, TokenError> {
    if token.len() > options.max_token_len {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max: options.max_token_len,
        });
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header = decode_part(header, "header")?;
    decode_part(payload, "payload")?;
    decode_part(signature, "signature")?;
    let kid = check_header(&header)?;
    let key = keys
        .get(&kid)
        .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
    if key.retire_after != 0 && now > key.retire_after {
        return Err(TokenError::UnknownKey(kid));
    }

    let verification = VerificationOptions {
        accept_future: false,
        required_key_id: Some(kid),
        required_signature_type: Some(TOKEN_TYPE.to_owned()),
        allowed_issuers: Some(HashSet::from([options.issuer.clone()])),
        allowed_audiences: Some(HashSet::from([options.audience.clone()])),
        time_tolerance: Some(Duration::from_secs(options.tolerance_secs)),
        max_token_length: Some(options.max_token_len),
        artificial_time: Some(UnixTimeStamp::from_secs(now.max(0) as u64)),
        ..VerificationOptions::default()
    };
    let jwt = key
        .parsed
        .verify_token::<CustomClaims>(token, Some(verification))
        .map_err(map_library_error)?;
    claims_from(jwt, options)
}

/// Base64url without padding, canonical: the library would accept `+`, `/`,
/// padding or stray trailing bits, which lets one token have many spellings.
fn decode_part(part: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    if part.is_empty() {
        return Err(TokenError::Malformed(match what {
            "header" => "empty header",
            "payload" => "empty payload",
            _ => "empty signature",
        }));
    }
    URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        TokenError::Malformed(match what {
            "header" => "header is not canonical base64url",
            "payload" => "payload is not canonical base64url",
            _ => "signature is not canonical base64url",
        })
    })
}

/// Accepts only the header we issue: `alg` EdDSA, `typ` consent+jwt, a `kid`.
/// Any other member (`crit`, `jku`, `x5u`, `jwk`, `x5c`, ...) is refused.
fn check_header(raw: &[u8]) -> Result<String, TokenError> {
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(raw).map_err(|e| TokenError::header("json", e.to_string()))?;
    for (name, _) in header.iter() {
        if !matches!(name.as_str(), "alg" | "typ" | "kid") {
            let field = match name.as_str() {
                "crit" => "crit",
                "jku" | "x5u" | "jwk" | "x5c" => "key reference",
                _ => "unknown member",
            };
            return Err(TokenError::header(
                field,
                format!("{name:?} is not accepted"),
            ));
        }
    }
    match header.get("alg").and_then(|v| v.as_str()) {
        Some(ALGORITHM) => {}
        Some(other) => return Err(TokenError::header("alg", format!("{other:?} is not EdDSA"))),
        None => return Err(TokenError::header("alg", "missing")),
    }
    match header.get("typ").and_then(|v| v.as_str()) {
        Some(TOKEN_TYPE) => {}
        other => {
            return Err(TokenError::header(
                "typ",
                format!("{other:?} is not {TOKEN_TYPE:?}"),
            ));
        }
    }
    let kid = header
        .get("kid")
        .and_then(|v| v.as_str())
        .ok_or_else(|| TokenError::header("kid", "missing"))?;
    check_kid(kid)?;
    Ok(kid.to_owned())
}

fn map_library_error(error: jwt_simple::Error) -> TokenError {
    match error.downcast_ref::<JWTError>() {
        Some(JWTError::TokenHasExpired) => TokenError::Expired,
        Some(JWTError::TokenNotValidYet | JWTError::ClockDrift) => TokenError::NotYetValid,
        Some(JWTError::RequiredAudienceMismatch | JWTError::RequiredAudienceMissing) => {
            TokenError::WrongAudience
        }
        Some(JWTError::RequiredIssuerMismatch | JWTError::RequiredIssuerMissing) => {
            TokenError::WrongIssuer
        }
        Some(JWTError::InvalidSignature) => TokenError::BadSignature,
        Some(JWTError::TokenTooLong) => TokenError::Malformed("token too long"),
        Some(other) => TokenError::claim("token", other.to_string()),
        // serde_json and base64 failures inside the library.
        None => TokenError::claim("payload", error.to_string()),
    }
}

fn claims_from(
    jwt: JWTClaims<CustomClaims>,
    options: &VerifyOptions,
) -> Result<ConsentClaims, TokenError> {
    let secs = |t: Option<UnixTimeStamp>, field: &'static str| {
        t.map(|t| t.as_secs() as UnixSeconds)
            .ok_or_else(|| TokenError::claim(field, "missing"))
    };
    let expires_at = secs(jwt.expires_at, "exp")?;
    let issued_at = secs(jwt.issued_at, "iat")?;
    let not_before = secs(jwt.invalid_before, "nbf")?;
    let text = |v: Option<String>, field: &'static str| match v {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(TokenError::claim(field, "missing")),
    };
    let subject = text(jwt.subject, "sub")?;
    let jti = text(jwt.jwt_id, "jti")?;
    let custom = jwt.custom;
    for (field, id) in [
        ("sub", &subject),
        ("grantee", &custom.grantee),
        ("gid", &custom.gid),
    ] {
        check_id(field, id).map_err(|e| TokenError::claim(field, e.problem))?;
    }
    let permissions = custom
        .permissions
        .iter()
        .map(|p| p.parse::<Permission>())
        .collect::<Result<_, _>>()
        .map_err(|e| TokenError::claim("permissions", e.problem))?;
    Ok(ConsentClaims {
        issuer: options.issuer.clone(),
        audience: options.audience.clone(),
        subject,
        grantee: custom.grantee,
        grant_id: custom.gid,
        purposes: custom.purposes.into_iter().collect(),
        datasets: custom.datasets.into_iter().collect(),
        actions: custom.actions.into_iter().collect(),
        permissions,
        issued_at,
        not_before,
        expires_at,
        jti,
    })
}

#[cfg(test)]
#[path = "token_tests.rs"]
mod tests;
