//! The whole loop for end-to-end tests and the demo: a real `consentd` process
//! on a SQLite file, sidecars in this host running the release filter, and the
//! admin client. Nothing here is shaped to the filter: it only starts things,
//! builds the plugin configuration an operator would write, and talks to the
//! public APIs.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_core::wire::v1;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{Sidecar, SidecarConfig, SimClock, Wasm};

/// The cluster name sidecars use for the control plane.
pub const CONTROL_PLANE_CLUSTER: &str = "consentd";
/// The audience every example route's tokens are issued for.
pub const AUDIENCE: &str = "records-api";
pub const ISSUER: &str = "consentd";
/// The actor the harness's admin calls are recorded under.
pub const ADMIN: &str = "consent-admin";

/// Walks up from this executable to the cargo target profile directory
/// (`target/debug` for tests, `target/release` for the demo).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The `consentd` binary: `$CONSENTD_BIN`, else beside this executable.
pub fn consentd_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("CONSENTD_BIN") {
        return Ok(path.into());
    }
    let path = profile_dir()?.join("consentd");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p consent-control-plane --bin consentd` \
             (the README's test command does), or set CONSENTD_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// The release filter: `$CONSENT_FILTER_WASM`, else the wasm-release artefact.
pub fn filter_wasm() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("CONSENT_FILTER_WASM") {
        return Ok(path.into());
    }
    let target = match std::env::var("CARGO_TARGET_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => profile_dir()?
            .parent()
            .context("no target directory")?
            .to_path_buf(),
    };
    let path = target.join("wasm32-wasip1/wasm-release/consent_filter.wasm");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p consent-filter --target wasm32-wasip1 \
             --profile wasm-release` (the README's test command does)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Unix seconds by the real clock (consentd's clock).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A consentd process in dev mode (loopback, no tokens) on its own SQLite file.
pub struct Consentd {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub ops: SocketAddr,
    db: PathBuf,
    heartbeat_ms: u64,
}

impl Consentd {
    pub async fn start(db: &Path, heartbeat_ms: u64) -> anyhow::Result<Consentd> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let ops = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut consentd = Consentd {
            child: None,
            grpc,
            ops,
            db: db.to_owned(),
            heartbeat_ms,
        };
        consentd.spawn().await?;
        Ok(consentd)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(consentd_bin()?)
            .arg("--dev")
            .arg("--db")
            .arg(&self.db)
            .arg("--listen")
            .arg(self.grpc.to_string())
            .arg("--ops-listen")
            .arg(self.ops.to_string())
            .arg("--heartbeat-ms")
            .arg(self.heartbeat_ms.to_string())
            .arg("--log")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start consentd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.admin().await.is_err() {
            if Instant::now() > deadline {
                bail!("consentd did not listen on {} within 30 s", self.grpc);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `kill -9`: no goodbye to the sidecars.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same file and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    pub async fn admin(&self) -> anyhow::Result<ConsentAdminClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        Ok(ConsentAdminClient::new(channel))
    }

    pub fn cluster(&self) -> (String, String) {
        (
            CONTROL_PLANE_CLUSTER.to_owned(),
            format!("http://{}", self.grpc),
        )
    }
}

impl Drop for Consentd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The example service: a patient-records API. Each sidecar protects the
/// datasets it is given, with a read route per dataset on
/// `/{dataset}/{subject}/items/{item}`, a write route, and a token-less,
/// fail-open route under `/open/`.
pub fn plugin_config(
    node_id: &str,
    datasets: &[&str],
    max_staleness_secs: i64,
    dry_run: bool,
) -> String {
    let mut routes: Vec<Value> = Vec::new();
    for dataset in datasets {
        routes.push(json!({
            "name": format!("{dataset}-read"),
            "methods": ["GET"],
            "path": format!("/{dataset}/{{subject}}/items/{{item}}"),
            "dataset": dataset, "action": "read", "permission": "access",
            "purpose": {"header": "x-purpose", "allowed": ["care", "research"]},
            "subject": {"path_param": "subject"},
        }));
        routes.push(json!({
            "name": format!("{dataset}-write"),
            "methods": ["PUT", "POST"],
            "path": format!("/{dataset}/{{subject}}/items/{{item}}"),
            "dataset": dataset, "action": "write", "permission": "access",
            "purpose": {"fixed": "care"},
            "subject": {"path_param": "subject"},
        }));
        routes.push(json!({
            "name": format!("{dataset}-open"),
            "methods": ["GET"],
            "path": format!("/open/{dataset}/{{subject}}"),
            "dataset": dataset, "action": "read", "permission": "access",
            "purpose": {"fixed": "care"},
            "subject": {"path_param": "subject"},
            "token_required": false,
            "on_stale": "allow",
        }));
    }
    json!({
        "control_plane": {
            "cluster": CONTROL_PLANE_CLUSTER,
            "node_id": node_id,
            "max_staleness_secs": max_staleness_secs,
            "heartbeat_secs": 1,
            "lease_secs": 2,
            "tick_ms": 100,
            "backoff_initial_ms": 100,
            "backoff_max_ms": 1000,
        },
        "token": {"issuer": ISSUER, "audience": AUDIENCE},
        "mode": if dry_run { "dry_run" } else { "enforce" },
        "routes": routes,
    })
    .to_string()
}

/// Starts a sidecar running the release filter against `consentd`.
pub async fn start_sidecar(
    consentd: &Consentd,
    node_id: &str,
    datasets: &[&str],
    workers: usize,
    max_staleness_secs: i64,
    dry_run: bool,
) -> anyhow::Result<Sidecar> {
    let config = SidecarConfig {
        plugin_config: plugin_config(node_id, datasets, max_staleness_secs, dry_run),
        root_id: "consent".into(),
        plugin_name: "consent".into(),
        node_id: node_id.into(),
        workers,
        clusters: vec![consentd.cluster()],
        clock: SimClock::new(),
        ..SidecarConfig::new(Wasm::Path(filter_wasm()?))
    };
    Ok(Sidecar::start(config).await?)
}

/// A grant request with sensible defaults: valid from a minute ago for a day.
pub fn grant_request(
    id: &str,
    subject: &str,
    grantee: &str,
    datasets: &[&str],
) -> v1::CreateGrantRequest {
    let now = unix_now();
    v1::CreateGrantRequest {
        id: id.into(),
        subject: subject.into(),
        grantee: grantee.into(),
        issued_by: subject.into(),
        owner: "privacy-office@example.org".into(),
        purposes: vec!["care".into(), "research".into()],
        datasets: datasets.iter().map(|d| d.to_string()).collect(),
        actions: vec!["read".into(), "write".into()],
        permissions: vec![v1::Permission::Access as i32, v1::Permission::Share as i32],
        not_before: now - 60,
        expires_at: now + 24 * 3600,
        parent: String::new(),
        actor: ADMIN.into(),
    }
}

/// Issues a token for `grant_id` to `grantee`.
pub async fn token_for(
    admin: &mut ConsentAdminClient<Channel>,
    grant_id: &str,
    grantee: &str,
) -> anyhow::Result<v1::IssueTokenResponse> {
    let response = admin
        .issue_token(v1::IssueTokenRequest {
            grant_id: grant_id.into(),
            grantee: grantee.into(),
            audience: AUDIENCE.into(),
            ttl_seconds: 300,
            actor: ADMIN.into(),
        })
        .await?;
    Ok(response.into_inner())
}

/// Waits until `check` holds, polling; fails with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls consentd's audit log until it holds a record of `request_id`.
pub async fn audit_of_request(
    admin: &mut ConsentAdminClient<Channel>,
    request_id: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<v1::AuditRecord>> {
    let deadline = Instant::now() + timeout;
    loop {
        let query = v1::QueryAuditRequest {
            request_id: request_id.into(),
            ..Default::default()
        };
        let records = admin.query_audit(query).await?.into_inner().records;
        if !records.is_empty() {
            return Ok(records);
        }
        if Instant::now() > deadline {
            bail!("no audit record of request {request_id} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
