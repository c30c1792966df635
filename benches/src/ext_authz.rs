//! The architecture consent-mesh is measured against: an external
//! authorization server on Envoy's `envoy.service.auth.v3.Authorization/Check`
//! (what OPA-Envoy does), called once per request over gRPC on loopback.
//!
//! To compare architectures and not engines, the server decides exactly as the
//! filter does: the filter's own configuration, route table, request
//! extraction, token cache and `check`, over a consent-core [`Snapshot`] that
//! [`Feed`] keeps in step with consentd over the sidecar sync stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::bail;
use consent_core::wire::v1;
use consent_core::{Enforcement, KeySet, Snapshot, SnapshotAssembler};
use consent_filter::check::check;
use consent_filter::config::Config;
use consent_filter::request::{PEER_URI_SAN, RequestSource, extract};
use consent_filter::route::{Lookup, split_path};
use consent_filter::token_cache::TokenCache;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};

use crate::propagation::{EmulatedSidecar, apply_control};

fn unix_now() -> i64 {
    consent_sim::mesh::unix_now()
}

/// A consent-core snapshot kept in step with consentd: it says Hello for
/// `datasets`, applies snapshots and deltas, and acknowledges each revision.
pub struct Feed {
    pub snapshot: Arc<RwLock<Snapshot>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Feed {
    /// Subscribes and returns once a first snapshot is applied. The stream is
    /// the propagation bench's emulated sidecar; only the snapshot is shared.
    pub async fn subscribe(
        endpoint: &str,
        node_id: &str,
        datasets: &[&str],
    ) -> anyhow::Result<Feed> {
        let mut stream = EmulatedSidecar::connect(endpoint, 0, node_id, datasets).await?;
        let snapshot = Arc::new(RwLock::new(Snapshot::new()));
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let held = snapshot.clone();
        let task = tokio::spawn(async move {
            let mut first = Some(first_tx);
            let mut assembler = SnapshotAssembler::default();
            while let Some(msg) = stream.next().await? {
                let ack = {
                    let mut s = held.write().unwrap_or_else(PoisonError::into_inner);
                    apply_control(&mut s, &mut assembler, msg).map_err(anyhow::Error::msg)?
                };
                if let Some(ack) = ack {
                    stream.send(v1::sidecar_message::Msg::Ack(ack)).await?;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
            }
            Ok(())
        });
        match tokio::time::timeout(Duration::from_secs(60), first_rx).await {
            Ok(Ok(())) => Ok(Feed { snapshot, task }),
            _ if task.is_finished() => Err(task.await?.err().unwrap_or_else(|| {
                anyhow::anyhow!("consentd closed the stream before a snapshot")
            })),
            _ => bail!("no snapshot from consentd within 60 s"),
        }
    }

    pub fn revision(&self) -> u64 {
        self.snapshot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .revision()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Check service: the filter's decision, out of process.
pub struct ConsentAuthz {
    config: Config,
    snapshot: Arc<RwLock<Snapshot>>,
    /// Verified tokens, and the key set they were verified with.
    cache: Mutex<(TokenCache, KeySet)>,
}

impl ConsentAuthz {
    /// `plugin_config` is the filter's own configuration JSON.
    pub fn new(plugin_config: &str, snapshot: Arc<RwLock<Snapshot>>) -> anyhow::Result<Self> {
        let config = Config::parse(plugin_config.as_bytes(), "consent", |_| None)
            .map_err(|e| anyhow::anyhow!("plugin configuration: {e}"))?;
        let cache = Mutex::new((TokenCache::new(config.token_cache_size), KeySet::default()));
        Ok(ConsentAuthz {
            config,
            snapshot,
            cache,
        })
    }

    /// The decision for one Check request, in process (the server calls this).
    pub fn decide(&self, request: &CheckRequest) -> CheckResponse {
        let attributes = request.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let Some(http) = http else {
            return denied(400, "bad_request", "no HTTP request attributes");
        };
        let source = CheckSource {
            headers: &http.headers,
            principal: attributes
                .and_then(|a| a.source.as_ref())
                .map_or("", |p| p.principal.as_str()),
        };
        let (path, query) = split_path(&http.path);
        let (route, params) = match self.config.routes.lookup(&http.method, path) {
            Lookup::Pass => return allowed(),
            Lookup::Undeclared => return denied(403, "dataset_out_of_scope", ""),
            Lookup::Protected(route, params) => (route, params),
        };
        let extracted = extract(route, &params, query, &self.config.token_header, &source);
        let snapshot = self.snapshot.read().unwrap_or_else(PoisonError::into_inner);
        let mut guard = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (cache, installed) = &mut *guard;
        // Cached verifications last as long as the key set they were made with.
        if snapshot.keys() != installed {
            *installed = snapshot.keys().clone();
            cache.set_keys(cache.keys_version() + 1, installed.clone());
        }
        let checked = check(
            &self.config,
            route,
            &extracted,
            &*snapshot,
            cache,
            unix_now(),
        );
        match checked.enforcement {
            Enforcement::Continue => allowed(),
            Enforcement::Reply { status, reason } => denied(status, reason.as_str(), ""),
        }
    }
}

/// The ext_authz request as the filter's [`RequestSource`]: headers as Envoy
/// sends them, and the peer's URI SAN as `source.principal`.
struct CheckSource<'a> {
    headers: &'a HashMap<String, String>,
    principal: &'a str,
}

impl RequestSource for CheckSource<'_> {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).cloned()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        (path == PEER_URI_SAN && !self.principal.is_empty())
            .then(|| self.principal.as_bytes().to_vec())
    }
}

fn allowed() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: tonic::Code::Ok as i32,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        ..Default::default()
    }
}

fn denied(status: u16, reason: &str, detail: &str) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: tonic::Code::PermissionDenied as i32,
            message: reason.into(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            body: serde_json::json!({ "reason": reason, "detail": detail }).to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for ConsentAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.decide(request.get_ref())))
    }
}

/// A running Check server on a loopback port.
pub struct AuthzServer {
    pub endpoint: String,
    task: JoinHandle<()>,
}

impl AuthzServer {
    pub async fn start(service: ConsentAuthz) -> anyhow::Result<AuthzServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(AuthorizationServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Ok(AuthzServer { endpoint, task })
    }

    pub async fn client(&self) -> anyhow::Result<AuthorizationClient<Channel>> {
        Ok(AuthorizationClient::connect(self.endpoint.clone()).await?)
    }
}

impl Drop for AuthzServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What Envoy's ext_authz filter sends for an HTTP request: method, path,
/// headers (lower-case keys) and the mTLS peer's URI SAN as source principal.
pub fn check_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    principal: &str,
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: principal.into(),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    host: "records.example".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The HTTP status Envoy would answer with: 200 to let the request through.
pub fn status_of(response: &CheckResponse) -> u16 {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d
            .status
            .as_ref()
            .map_or(403, |s| u16::try_from(s.code).unwrap_or(403)),
        _ if response.status.as_ref().is_some_and(|s| s.code != 0) => 403,
        _ => 200,
    }
}
