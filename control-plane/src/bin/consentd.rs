//! consentd: the consent-mesh control plane.

use std::process::ExitCode;

use anyhow::Context as _;
use consent_control_plane::config::Config;
use consent_control_plane::server;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let config = Config::load()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log).context("invalid --log")?,
        )
        .with_writer(std::io::stderr)
        .init();
    let tokens = config.tokens()?;
    let tls = config.tls()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if config.dev {
            let open = if tokens.admin.is_none() || tokens.sidecar.is_none() {
                "calls without a token are accepted"
            } else {
                "tokens are still checked"
            };
            eprintln!("consentd: DEV MODE IS INSECURE: loopback only, {open}");
        }
        let store = server::open_store(config.db.clone()).await?;
        let grpc = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let ops = tokio::net::TcpListener::bind(config.ops_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.ops_listen))?;
        // One line on stdout that scripts and tests read to find the bound ports.
        println!(
            "consentd listening grpc={} ops={} db={}",
            grpc.local_addr()?,
            ops.local_addr()?,
            config.db.display()
        );
        server::serve(
            store,
            config.settings(),
            tokens,
            tls,
            grpc,
            ops,
            shutdown_signal(),
        )
        .await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
