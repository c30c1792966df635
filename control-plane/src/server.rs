//! Wires consentd together: opens the store (creating a signing key on first
//! start), serves the admin API and the sync stream behind their bearer
//! tokens, the standard health service and reflection, and the ops HTTP port;
//! on shutdown it ends every stream so the servers drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::admin::AdminService;
use crate::auth::BearerAuth;
use crate::config::Tokens;
use crate::hub::{Hub, Settings, blocking};
use crate::proto::consent_admin_server::ConsentAdminServer;
use crate::proto::sidecar_sync_server::SidecarSyncServer;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

/// How long a graceful shutdown may take before consentd stops anyway.
const DRAIN: Duration = Duration::from_secs(10);

/// Opens the SQLite store at `path` and makes sure a signing key exists.
pub async fn open_store(path: std::path::PathBuf) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
        .await?
        .map(|s| Arc::new(s) as Arc<dyn Store>)
        .context("cannot open the database")?;
    let has_key = blocking(&store, |s| {
        Ok(s.keys()?.iter().any(|k| k.retire_after == 0))
    })
    .await?;
    if !has_key {
        blocking(&store, |s| {
            s.write(&mut |r, ctx| Ok(crate::ledger::rotate(r, ctx, "consentd", 0)?.0))
        })
        .await
        .context("cannot create the first signing key")?;
    }
    Ok(store)
}

/// Serves until `shutdown` completes, then drains.
pub async fn serve(
    store: Arc<dyn Store>,
    settings: Settings,
    tokens: Tokens,
    tls: Option<tonic::transport::ServerTlsConfig>,
    grpc: TcpListener,
    ops: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let hub = tokio::task::spawn_blocking(move || Hub::open(store, settings)).await??;
    let stop = hub.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: ending sync streams");
        stop.shutdown.send_replace(true);
    });
    let signal = |hub: Arc<Hub>| async move {
        let mut rx = hub.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["consent.v1.ConsentAdmin", "consent.v1.SidecarSync", ""] {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let admin = ConsentAdminServer::with_interceptor(
        AdminService::new(hub.clone()),
        BearerAuth::new("admin", tokens.admin),
    );
    let sync = SidecarSyncServer::with_interceptor(
        crate::sync::SyncService::new(hub.clone()),
        BearerAuth::new("sidecar", tokens.sidecar),
    );

    let ops_server = axum::serve(ops, crate::ops::router(hub.clone()))
        .with_graceful_shutdown(signal(hub.clone()));
    let ops_task = tokio::spawn(async move { ops_server.await });

    let health_on_stop = health.clone();
    let hub_for_grpc = hub.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration")?;
    }
    // Deltas and acknowledgements are small messages that must not wait for
    // Nagle (tonic leaves nodelay to the listener when given one).
    let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
    let grpc_server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(admin)
        .add_service(sync)
        .serve_with_incoming_shutdown(incoming, async move {
            signal(hub_for_grpc).await;
            for name in ["consent.v1.ConsentAdmin", "consent.v1.SidecarSync", ""] {
                health_on_stop
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        });
    let mut grpc_task = tokio::spawn(grpc_server);
    tokio::select! {
        result = &mut grpc_task => result?.context("gRPC server failed")?,
        () = async { signal(hub.clone()).await; tokio::time::sleep(DRAIN).await } => {
            tracing::warn!("streams did not drain within {DRAIN:?}; stopping anyway");
            grpc_task.abort();
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ops_task).await;
    Ok(())
}
