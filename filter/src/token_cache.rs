//! Verified tokens, cached per VM until they expire, so the signature is
//! checked once per token while the grant is still read on every request.
//! The cache belongs to one key-set version: when the key set moves (a key
//! rotated out or retired), every cached verification is dropped.

use std::collections::HashMap;

use consent_core::{ConsentClaims, KeySet, TokenError, UnixSeconds, VerifyOptions, verify};

#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    keys_version: u64,
    keys: KeySet,
    /// token → (claims, valid until, exclusive).
    entries: HashMap<String, (ConsentClaims, UnixSeconds)>,
}

/// Whether a lookup was served from the cache (for the hit metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Verified,
}

impl TokenCache {
    pub fn new(capacity: usize) -> Self {
        TokenCache {
            capacity,
            keys_version: 0,
            keys: KeySet::default(),
            entries: HashMap::new(),
        }
    }

    pub fn keys_version(&self) -> u64 {
        self.keys_version
    }

    /// Installs the key set published at `version`, dropping verifications
    /// made with the previous one.
    pub fn set_keys(&mut self, version: u64, keys: KeySet) {
        self.keys_version = version;
        self.keys = keys;
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn verify(
        &mut self,
        token: &str,
        options: &VerifyOptions,
        now: UnixSeconds,
    ) -> Result<(ConsentClaims, Source), TokenError> {
        if let Some((claims, until)) = self.entries.get(token) {
            if now < *until {
                return Ok((claims.clone(), Source::Cache));
            }
            self.entries.remove(token);
        }
        let claims = verify(token, &self.keys, options, now)?;
        // Cached no longer than the token's own expiry or its key's retirement:
        // past either, a fresh verification decides (and may still accept
        // within the clock tolerance, uncached).
        let mut until = claims.expires_at;
        if let Some(retire) = token_kid(token)
            .and_then(|kid| self.keys.get(&kid))
            .map(|k| k.retire_after)
            && retire != 0
        {
            until = until.min(retire);
        }
        if now < until {
            if self.entries.len() >= self.capacity {
                self.entries.retain(|_, (_, u)| now < *u);
            }
            if self.entries.len() >= self.capacity {
                // Still full of live tokens: start over rather than track
                // recency; a miss costs one signature check.
                self.entries.clear();
            }
            self.entries
                .insert(token.to_owned(), (claims.clone(), until));
        }
        Ok((claims, Source::Verified))
    }
}

/// The `kid` of an already verified token's header.
fn token_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use consent_core::{Permission, SigningKey, issue};

    use super::*;

    fn claims(jti: &str, exp: UnixSeconds) -> ConsentClaims {
        ConsentClaims {
            issuer: "consentd".into(),
            audience: "records-api".into(),
            subject: "p1".into(),
            grantee: "svc".into(),
            grant_id: "g1".into(),
            purposes: ["care".to_owned()].into(),
            datasets: ["records".to_owned()].into(),
            actions: ["read".to_owned()].into(),
            permissions: [Permission::Access].into(),
            issued_at: 1_000,
            not_before: 1_000,
            expires_at: exp,
            jti: jti.into(),
        }
    }

    fn setup() -> (SigningKey, TokenCache, VerifyOptions) {
        let key = SigningKey::generate("k1").unwrap();
        let mut cache = TokenCache::new(2);
        cache.set_keys(1, KeySet::new([key.verifying_key(0)]));
        let mut options = VerifyOptions::new("consentd", "records-api");
        options.tolerance_secs = 0;
        (key, cache, options)
    }

    #[test]
    fn a_token_is_verified_once_then_served_until_it_expires() {
        let (key, mut cache, options) = setup();
        let token = issue(&key, &claims("j1", 2_000)).unwrap();
        assert_eq!(
            cache.verify(&token, &options, 1_500).unwrap().1,
            Source::Verified
        );
        let (got, source) = cache.verify(&token, &options, 1_600).unwrap();
        assert_eq!((got.jti.as_str(), source), ("j1", Source::Cache));
        assert!(
            cache.verify(&token, &options, 2_001).is_err(),
            "expired tokens re-verify and fail"
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn a_key_set_change_drops_every_verification() {
        let (key, mut cache, options) = setup();
        let token = issue(&key, &claims("j1", 2_000)).unwrap();
        cache.verify(&token, &options, 1_500).unwrap();
        let other = SigningKey::generate("k2").unwrap();
        cache.set_keys(2, KeySet::new([other.verifying_key(0)]));
        assert!(
            cache.verify(&token, &options, 1_500).is_err(),
            "k1 is no longer trusted"
        );
    }

    #[test]
    fn entries_end_at_key_retirement_and_the_cache_stays_bounded() {
        let key = SigningKey::generate("k1").unwrap();
        let mut cache = TokenCache::new(2);
        cache.set_keys(1, KeySet::new([key.verifying_key(1_700)]));
        let mut options = VerifyOptions::new("consentd", "records-api");
        options.tolerance_secs = 0;
        let token = issue(&key, &claims("j1", 2_000)).unwrap();
        cache.verify(&token, &options, 1_500).unwrap();
        assert_eq!(
            cache.verify(&token, &options, 1_600).unwrap().1,
            Source::Cache
        );
        assert!(
            cache.verify(&token, &options, 1_701).is_err(),
            "retired key"
        );
        for i in 0..5 {
            let t = issue(&key, &claims(&format!("j{i}"), 2_000)).unwrap();
            cache.verify(&t, &options, 1_500).unwrap();
            assert!(cache.len() <= 2);
        }
    }
}
