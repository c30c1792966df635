//! The harness: an in-process consentd, authenticated admin clients and a test
//! sidecar that applies snapshots and deltas through consent-core.

#![allow(dead_code, reason = "each test module uses part of the harness")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use consent_control_plane::config::Tokens;
use consent_control_plane::hub::Settings;
use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_control_plane::proto::sidecar_sync_client::SidecarSyncClient;
use consent_control_plane::store::Store;
use consent_core::snapshot::SnapshotChunk;
use consent_core::wire::v1;
use consent_core::wire::v1::{control_message, sidecar_message};
use consent_core::{Snapshot, SnapshotAssembler, Update};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
pub const SIDECAR_TOKEN: &str = "sidecar-token-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn now() -> i64 {
    consent_control_plane::store::now_ms() / 1000
}

pub fn test_settings() -> Settings {
    Settings {
        heartbeat: Duration::from_millis(200),
        ack_timeout: Duration::from_secs(2),
        hello_timeout: Duration::from_secs(2),
        snapshot_chunk: 2,
        ..Settings::default()
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(test_settings()).await
    }

    pub async fn start_with(settings: Settings) -> Server {
        Server::start_tls(settings, None).await
    }

    pub async fn start_tls(
        settings: Settings,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = consent_control_plane::server::open_store(dir.path().join("consentd.db"))
            .await
            .unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, ops_addr) = (grpc.local_addr().unwrap(), ops.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let tokens = Tokens {
            admin: Some(ADMIN_TOKEN.into()),
            sidecar: Some(SIDECAR_TOKEN.into()),
        };
        let task = tokio::spawn(consent_control_plane::server::serve(
            store.clone(),
            settings,
            tokens,
            tls,
            grpc,
            ops,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            ops: ops_addr,
            store,
            dir,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn admin(&self) -> Admin {
        admin_client(&self.url(), Some(ADMIN_TOKEN)).await
    }

    pub async fn sidecar(&self, node: &str, datasets: &[&str]) -> Sidecar {
        Sidecar::connect(&self.url(), SIDECAR_TOKEN, node, datasets, 0, None)
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("consentd drains")
            .unwrap()
            .unwrap();
    }
}

#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Admin = ConsentAdminClient<InterceptedService<Channel, Bearer>>;

pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn admin_client(url: &str, token: Option<&str>) -> Admin {
    let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
    ConsentAdminClient::with_interceptor(channel(url).await, bearer)
}

/// A create request for a valid root grant of `subject` on `datasets`.
pub fn grant(id: &str, datasets: &[&str]) -> v1::CreateGrantRequest {
    v1::CreateGrantRequest {
        id: id.into(),
        subject: "patient-1".into(),
        grantee: "spiffe://mesh/ns/analytics/sa/reader".into(),
        issued_by: "patient-1".into(),
        owner: "consent-team@example.org".into(),
        purposes: vec!["care".into(), "research".into()],
        datasets: datasets.iter().map(|s| s.to_string()).collect(),
        actions: vec!["read".into()],
        permissions: vec![v1::Permission::Access as i32, v1::Permission::Share as i32],
        not_before: now() - 10,
        expires_at: now() + 3600,
        parent: String::new(),
        actor: "alice".into(),
    }
}

pub async fn create(admin: &mut Admin, req: v1::CreateGrantRequest) -> v1::Grant {
    admin
        .create_grant(req)
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
}

pub async fn revoke(admin: &mut Admin, id: &str) -> v1::RevokeGrantResponse {
    let req = v1::RevokeGrantRequest {
        id: id.into(),
        actor: "alice".into(),
        reason: "withdrawn".into(),
    };
    admin.revoke_grant(req).await.unwrap().into_inner()
}

/// What a test sidecar received, once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Snapshot {
        revision: u64,
        chunks: u32,
    },
    Delta {
        from: u64,
        to: u64,
        upserts: Vec<String>,
        removals: Vec<String>,
        keys: bool,
    },
}

/// A sidecar as the filter behaves: applies every update with consent-core.
pub struct Sidecar {
    pub node: String,
    tx: mpsc::Sender<v1::SidecarMessage>,
    rx: tonic::Streaming<v1::ControlMessage>,
    pub snapshot: Snapshot,
    assembler: SnapshotAssembler,
    pub heartbeats: usize,
    chunks: u32,
}

impl Sidecar {
    pub async fn connect(
        url: &str,
        token: &str,
        node: &str,
        datasets: &[&str],
        resume: u64,
        held: Option<Snapshot>,
    ) -> Result<Sidecar, tonic::Status> {
        let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
        let mut client = SidecarSyncClient::with_interceptor(channel(url).await, bearer);
        let (tx, rx) = mpsc::channel(16);
        let snapshot = held.unwrap_or_default();
        let digest = if resume > 0 {
            snapshot.digest().to_bytes().to_vec()
        } else {
            Vec::new()
        };
        tx.send(v1::SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(v1::Hello {
                node_id: node.into(),
                datasets: datasets.iter().map(|s| s.to_string()).collect(),
                resume_from_revision: resume,
                snapshot_digest: digest,
                filter_version: "test".into(),
            })),
        })
        .await
        .unwrap();
        let rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Sidecar {
            node: node.into(),
            tx,
            rx,
            snapshot,
            assembler: SnapshotAssembler::default(),
            heartbeats: 0,
            chunks: 0,
        })
    }

    /// The next raw message, or the stream's end as an error.
    pub async fn raw(
        &mut self,
        within: Duration,
    ) -> Result<Option<v1::ControlMessage>, tonic::Status> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => Ok(None),
            Ok(Ok(Some(m))) => Ok(Some(m)),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
            Ok(Err(s)) => Err(s),
        }
    }

    /// Applies messages until a whole update is applied; heartbeats are counted.
    pub async fn next_update(&mut self, within: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.raw(left).await.expect("stream alive")?;
            match msg.msg.expect("message body") {
                control_message::Msg::Heartbeat(h) => {
                    assert!(h.server_time_ms > 0);
                    self.snapshot.touch(now());
                    self.heartbeats += 1;
                }
                control_message::Msg::Snapshot(chunk) => {
                    self.chunks += 1;
                    let chunk = SnapshotChunk::try_from(chunk).expect("valid chunk");
                    if let Some(full) = self.assembler.push(chunk).expect("chunks in order") {
                        let revision = full.revision;
                        self.snapshot
                            .apply(Update::Snapshot(full), now())
                            .expect("snapshot applies");
                        let chunks = std::mem::take(&mut self.chunks);
                        return Some(Got::Snapshot { revision, chunks });
                    }
                }
                control_message::Msg::Delta(delta) => {
                    let got = Got::Delta {
                        from: delta.from_revision,
                        to: delta.to_revision,
                        upserts: delta.upserts.iter().map(|g| g.id.clone()).collect(),
                        removals: delta.removals.clone(),
                        keys: delta.keys.is_some(),
                    };
                    let delta = consent_core::Delta::try_from(delta).expect("valid delta");
                    self.snapshot
                        .apply(Update::Delta(delta), now())
                        .expect("delta applies with its digest");
                    return Some(got);
                }
            }
        }
    }

    pub async fn expect_update(&mut self) -> Got {
        self.next_update(WAIT).await.expect("an update in time")
    }

    pub async fn send(&self, msg: sidecar_message::Msg) {
        self.tx
            .send(v1::SidecarMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    pub async fn ack(&self) {
        let ack = v1::Ack {
            revision: self.snapshot.revision(),
            digest: self.snapshot.digest().to_bytes().to_vec(),
        };
        self.send(sidecar_message::Msg::Ack(ack)).await;
    }

    /// Applies and acknowledges until it holds `revision`.
    pub async fn sync_to(&mut self, revision: u64) {
        while self.snapshot.revision() < revision {
            self.expect_update().await;
            self.ack().await;
        }
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.snapshot.grants().map(|g| g.id.clone()).collect();
        ids.sort();
        ids
    }
}

/// Keeps a sidecar applying and acknowledging everything in the background.
pub fn auto_ack(mut sidecar: Sidecar) -> tokio::task::JoinHandle<Sidecar> {
    tokio::spawn(async move {
        loop {
            match sidecar.raw(Duration::from_secs(30)).await {
                Ok(Some(msg)) => {
                    let applied = match msg.msg {
                        Some(control_message::Msg::Delta(d)) => {
                            let d = consent_core::Delta::try_from(d).unwrap();
                            sidecar.snapshot.apply(Update::Delta(d), now()).unwrap();
                            true
                        }
                        Some(control_message::Msg::Snapshot(c)) => {
                            let c = SnapshotChunk::try_from(c).unwrap();
                            match sidecar.assembler.push(c).unwrap() {
                                Some(full) => {
                                    sidecar
                                        .snapshot
                                        .apply(Update::Snapshot(full), now())
                                        .unwrap();
                                    true
                                }
                                None => false,
                            }
                        }
                        _ => false,
                    };
                    if applied {
                        sidecar.ack().await;
                    }
                }
                Ok(None) | Err(_) => return sidecar,
            }
        }
    })
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (tonic::Code, String) {
    let s = r.expect_err("expected an error");
    (s.code(), s.message().to_owned())
}
