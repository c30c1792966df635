//! Per-request cost of the decision where it runs: inside the filter (the
//! release `.wasm` hosted by consent-sim) and through a gRPC ext_authz round
//! trip on loopback, for the same requests against the same consentd.
//!
//! Four kinds of request: a token the filter has verified before (cached), a
//! token it has never seen (signature verified), a cached token whose grant
//! was revoked (denied), and a path no route declares (passed through).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_core::wire::v1;
use consent_core::{KeySet, VerifyOptions};
use consent_filter::store::{Keys, Meta};
use consent_filter::token_cache::TokenCache;
use consent_sim::mesh::{self, Consentd, grant_request, unix_now};
use consent_sim::{HttpRequest, Sidecar};
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

use crate::ext_authz::{self, AuthzServer, ConsentAuthz, Feed};
use crate::stats::{nanos, per_call_batched};

const CALLER: &str = "spiffe://mesh/ns/analytics/sa/reader";
const DATASET: &str = "records";
const PREFIX: &str = "consent/consent/";

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Grants held by the sidecar and the ext_authz server.
    pub grants: usize,
    /// Distinct grants (and cached tokens) the cached and denied requests cycle over.
    pub hot_grants: usize,
    /// Requests timed per kind (first-seen tokens: one token each).
    pub requests: usize,
    pub first_seen: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            grants: 10_000,
            hot_grants: 100,
            requests: 20_000,
            first_seen: 2_000,
        }
    }
}

/// One kind of request, measured one request at a time.
#[derive(Debug, Clone)]
pub struct Kind {
    pub name: &'static str,
    /// The status every request of this kind got.
    pub status: u16,
    /// In the filter: `proxy_on_request_headers`, where it decides.
    pub decision_ns: Vec<f64>,
    /// In the filter: every callback of the stream (context create to delete).
    pub filter_ns: Vec<f64>,
    /// The whole request through the sim, its thread hop and upstream included.
    pub sim_round_trip_ns: Vec<f64>,
    /// The same request as an ext_authz Check on loopback.
    pub ext_authz_ns: Vec<f64>,
    /// The same decision natively, in process: the Check server's handler
    /// without gRPC (the filter's check with no wasm and no host calls).
    pub native_ns: Vec<f64>,
    /// `proxy_*` host calls the filter made deciding one request.
    pub host_calls: u64,
}

/// Token verification outside the filter, for comparison with inside it.
#[derive(Debug, Clone)]
pub struct Verify {
    /// The whole token check natively: size, header, signature, claims.
    pub token_verify_ns: Vec<f64>,
    /// Only the Ed25519 signature over a message of the token's length.
    pub ed25519_ns: Vec<f64>,
    /// A token found in the filter's token cache (the lookup and a claims clone).
    pub cache_hit_ns: Vec<f64>,
    pub token_len: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub options: Options,
    pub kinds: Vec<Kind>,
    pub verify: Verify,
    pub wasm_bytes: u64,
}

type Admin = ConsentAdminClient<Channel>;

async fn issue(admin: &mut Admin, grant_id: &str) -> anyhow::Result<String> {
    Ok(mesh::token_for(admin, grant_id, CALLER).await?.token)
}

fn grant_id(i: usize) -> String {
    format!("g-{i:06}")
}

fn subject(i: usize) -> String {
    format!("p-{i:06}")
}

fn read(i: usize, token: &str) -> HttpRequest {
    HttpRequest::get(&format!("/{DATASET}/{}/items/7", subject(i)))
        .header("x-purpose", "care")
        .header("x-consent-token", token)
        .peer_identity(CALLER)
}

fn read_check(i: usize, token: &str) -> CheckRequest {
    ext_authz::check_request(
        "GET",
        &format!("/{DATASET}/{}/items/7", subject(i)),
        &[("x-purpose", "care"), ("x-consent-token", token)],
        CALLER,
    )
}

/// `n` tokens never presented before, over the first `hot` grants.
async fn fresh_tokens(
    admin: &mut Admin,
    n: usize,
    hot: usize,
) -> anyhow::Result<Vec<(usize, String)>> {
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let i = k % hot;
        out.push((i, issue(admin, &grant_id(i)).await?));
    }
    Ok(out)
}

/// Creates `n` grants, eight requests in flight at a time.
async fn seed(consentd: &Consentd, n: usize) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for lane in 0..8 {
        let mut admin = consentd.admin().await?;
        tasks.push(tokio::spawn(async move {
            for i in (lane..n).step_by(8) {
                admin
                    .create_grant(grant_request(&grant_id(i), &subject(i), CALLER, &[DATASET]))
                    .await
                    .with_context(|| format!("creating grant {i}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn meta(sidecar: &Sidecar) -> Option<Meta> {
    let (bytes, _) = sidecar.shared_data_get(&Keys::new(PREFIX).meta())?;
    Meta::decode(&bytes)
}

async fn synced(sidecar: &Sidecar, feed: &Feed, revision: u64) -> anyhow::Result<()> {
    mesh::eventually(
        Duration::from_secs(60),
        "the sidecar and the ext_authz feed to catch up",
        || async {
            meta(sidecar).is_some_and(|m| m.revision >= revision) && feed.revision() >= revision
        },
    )
    .await
}

/// Sends `requests` through the sidecar one at a time, recording the filter's
/// own time and the round trip, and checks every answer is `expect`.
async fn through_filter(
    sidecar: &Sidecar,
    requests: impl IntoIterator<Item = HttpRequest>,
    expect: u16,
) -> anyhow::Result<FilterSamples> {
    let mut out = FilterSamples::default();
    for request in requests {
        let started = Instant::now();
        let response = sidecar.send(request).await?;
        out.round_trip.push(nanos(started.elapsed()));
        ensure!(
            response.status == expect,
            "the filter answered {} ({}), expected {expect}",
            response.status,
            response.body_text()
        );
        out.decision
            .push(nanos(response.guest_time.request_headers));
        out.stream.push(nanos(response.guest_time.total));
        out.host_calls = response.guest_time.request_headers_host_calls;
    }
    Ok(out)
}

#[derive(Default)]
struct FilterSamples {
    decision: Vec<f64>,
    stream: Vec<f64>,
    round_trip: Vec<f64>,
    host_calls: u64,
}

/// The Check handler in process, one request at a time.
fn natively(
    authz: &ConsentAuthz,
    requests: impl IntoIterator<Item = CheckRequest>,
    expect: u16,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for request in requests {
        let started = Instant::now();
        let response = authz.decide(&request);
        samples.push(nanos(started.elapsed()));
        let status = ext_authz::status_of(&response);
        ensure!(
            status == expect,
            "the native check answered {status}, expected {expect}"
        );
    }
    Ok(samples)
}

async fn through_ext_authz(
    client: &mut AuthorizationClient<Channel>,
    requests: impl IntoIterator<Item = CheckRequest>,
    expect: u16,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for request in requests {
        let started = Instant::now();
        let response = client.check(request).await?.into_inner();
        samples.push(nanos(started.elapsed()));
        let status = ext_authz::status_of(&response);
        ensure!(
            status == expect,
            "ext_authz answered {status}, expected {expect}"
        );
    }
    Ok(samples)
}

/// Runs every kind of request through both architectures.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    ensure!(
        options.hot_grants * 2 <= options.grants,
        "hot_grants ({}) must be at most half of grants ({})",
        options.hot_grants,
        options.grants
    );
    let dir = tempfile::Builder::new()
        .prefix("consent-bench-")
        .tempdir_in(crate::scratch_dir())?;
    let consentd = Consentd::start(&dir.path().join("consentd.db"), 1000).await?;
    let mut admin = consentd.admin().await?;
    seed(&consentd, options.grants).await?;

    let wasm = mesh::filter_wasm()?;
    let wasm_bytes = std::fs::metadata(&wasm)?.len();
    let sidecar = mesh::start_sidecar(&consentd, "bench-sidecar", &[DATASET], 1, 30, false).await?;
    let endpoint = format!("http://{}", consentd.grpc);
    let feed = Feed::subscribe(&endpoint, "bench-ext-authz", &[DATASET]).await?;
    let config = mesh::plugin_config("bench-ext-authz", &[DATASET], 30, false);
    let server = AuthzServer::start(ConsentAuthz::new(&config, feed.snapshot.clone())?).await?;
    let mut client = server.client().await?;
    let local = ConsentAuthz::new(&config, feed.snapshot.clone())?;
    synced(&sidecar, &feed, options.grants as u64).await?;

    // Hot grants [0, hot) stay allowed; [hot, 2*hot) get revoked after their
    // tokens are cached.
    let hot = options.hot_grants;
    let mut tokens = Vec::with_capacity(2 * hot);
    for i in 0..2 * hot {
        tokens.push(issue(&mut admin, &grant_id(i)).await?);
    }
    let cycle = |offset: usize| (0..options.requests).map(move |k| offset + k % hot);

    // Warm both caches with every hot token.
    through_filter(&sidecar, (0..2 * hot).map(|i| read(i, &tokens[i])), 200).await?;
    let warm = || (0..2 * hot).map(|i| read_check(i, &tokens[i]));
    through_ext_authz(&mut client, warm(), 200).await?;
    natively(&local, warm(), 200)?;

    let mut kinds = Vec::new();
    let hot_reads = |offset: usize| cycle(offset).map(|i| read(i, &tokens[i]));
    let hot_checks = |offset: usize| cycle(offset).map(|i| read_check(i, &tokens[i]));
    let f = through_filter(&sidecar, hot_reads(0), 200).await?;
    let e = through_ext_authz(&mut client, hot_checks(0), 200).await?;
    let n = natively(&local, hot_checks(0), 200)?;
    kinds.push(kind("cached token, allowed", 200, f, e, n));

    // First-seen tokens: one fresh token per request, for each architecture.
    let for_filter = fresh_tokens(&mut admin, options.first_seen, hot).await?;
    let for_authz = fresh_tokens(&mut admin, options.first_seen, hot).await?;
    let f = through_filter(&sidecar, for_filter.iter().map(|(i, t)| read(*i, t)), 200).await?;
    let checks = |tokens: &[(usize, String)]| -> Vec<CheckRequest> {
        tokens.iter().map(|(i, t)| read_check(*i, t)).collect()
    };
    let e = through_ext_authz(&mut client, checks(&for_authz), 200).await?;
    // The in-process handler has its own cache: the filter's tokens are new to it.
    let n = natively(&local, checks(&for_filter), 200)?;
    kinds.push(kind("first-seen token, allowed", 200, f, e, n));

    // Revoke the second hot set; their cached tokens must now be refused.
    let mut last = 0;
    for i in hot..2 * hot {
        last = admin
            .revoke_grant(v1::RevokeGrantRequest {
                id: grant_id(i),
                actor: mesh::ADMIN.into(),
                reason: "benchmark: withdrawn".into(),
            })
            .await?
            .into_inner()
            .revision;
    }
    synced(&sidecar, &feed, last).await?;
    let f = through_filter(&sidecar, hot_reads(hot), 403).await?;
    let e = through_ext_authz(&mut client, hot_checks(hot), 403).await?;
    let n = natively(&local, hot_checks(hot), 403)?;
    kinds.push(kind("cached token, grant revoked (403)", 403, f, e, n));

    let pass = || (0..options.requests).map(|_| HttpRequest::get("/healthz").peer_identity(CALLER));
    let pass_check =
        || (0..options.requests).map(|_| ext_authz::check_request("GET", "/healthz", &[], CALLER));
    let f = through_filter(&sidecar, pass(), 200).await?;
    let e = through_ext_authz(&mut client, pass_check(), 200).await?;
    let n = natively(&local, pass_check(), 200)?;
    kinds.push(kind("unprotected path, passed through", 200, f, e, n));

    let keys = feed
        .snapshot
        .read()
        .map_err(|_| anyhow::anyhow!("feed lock poisoned"))?
        .keys()
        .clone();
    let verify = verify_natively(&keys, &tokens[0])?;
    sidecar.stop();
    Ok(Report {
        options: options.clone(),
        kinds,
        verify,
        wasm_bytes,
    })
}

fn kind(
    name: &'static str,
    status: u16,
    filter: FilterSamples,
    ext_authz_ns: Vec<f64>,
    native_ns: Vec<f64>,
) -> Kind {
    Kind {
        name,
        status,
        decision_ns: filter.decision,
        filter_ns: filter.stream,
        sim_round_trip_ns: filter.round_trip,
        ext_authz_ns,
        native_ns,
        host_calls: filter.host_calls,
    }
}

/// The same token verified natively, its signature alone, and a cache hit.
fn verify_natively(keys: &KeySet, token: &str) -> anyhow::Result<Verify> {
    let options = VerifyOptions::new(mesh::ISSUER, mesh::AUDIENCE);
    let now = unix_now();
    consent_core::verify(token, keys, &options, now).context("the bench token does not verify")?;
    let token_verify_ns = per_call_batched(200, 20, |_| {
        consent_core::verify(token, keys, &options, now)
    });

    let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([7; 32]));
    let message = vec![0x5a; token.len()];
    let signature = pair.sk.sign(&message, None);
    if pair.pk.verify(&message, &signature).is_err() {
        bail!("ed25519 self-check failed");
    }
    let ed25519_ns = per_call_batched(200, 20, |_| pair.pk.verify(black_box(&message), &signature));

    let mut cache = TokenCache::new(1024);
    cache.set_keys(1, keys.clone());
    cache.verify(token, &options, now)?;
    let cache_hit_ns = per_call_batched(200, 1000, |_| {
        cache.verify(black_box(token), &options, now).is_ok()
    });
    Ok(Verify {
        token_verify_ns,
        ed25519_ns,
        cache_hit_ns,
        token_len: token.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole section at toy size: every kind answers as expected through
    /// the filter, ext_authz and the native handler, and every figure is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_kind_is_measured_three_ways() {
        let options = Options {
            grants: 20,
            hot_grants: 4,
            requests: 12,
            first_seen: 3,
        };
        let report = run(&options).await.expect("runs");
        let names: Vec<&str> = report.kinds.iter().map(|k| k.name).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for k in &report.kinds {
            let expected = if k.name.starts_with("first-seen") {
                3
            } else {
                12
            };
            for samples in [
                &k.decision_ns,
                &k.filter_ns,
                &k.sim_round_trip_ns,
                &k.ext_authz_ns,
                &k.native_ns,
            ] {
                assert_eq!(samples.len(), expected, "{}", k.name);
                assert!(samples.iter().all(|s| *s > 0.0), "{}", k.name);
            }
            assert!(k.host_calls > 0, "{}", k.name);
        }
        assert_eq!(report.kinds[2].status, 403);
        // A pass-through request makes fewer host calls than a decision.
        assert!(report.kinds[3].host_calls < report.kinds[0].host_calls);
        assert!(report.wasm_bytes > 0 && report.verify.token_len > 0);
    }
}
