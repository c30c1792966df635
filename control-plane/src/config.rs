//! consentd's configuration: flags, each also read from a `CONSENTD_*`
//! environment variable, and optionally a file of `name = value` lines (flag
//! names without the dashes). Precedence: flags, then the file, then the
//! environment, then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;

use crate::hub::Settings;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "consentd",
    version,
    about = "The consent-mesh control plane: stores grants in SQLite and streams them to sidecars.",
    args_override_self = true
)]
pub struct Config {
    /// A file of `name = value` lines, one flag each (e.g. `db = /var/lib/consentd.db`).
    #[arg(long, env = "CONSENTD_CONFIG")]
    pub config: Option<PathBuf>,
    /// The SQLite database file; created with its schema on first start.
    #[arg(long, env = "CONSENTD_DB", default_value = "consentd.db")]
    pub db: PathBuf,
    /// Address of the gRPC server (admin API, sidecar sync, health, reflection).
    #[arg(long, env = "CONSENTD_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address of the HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "CONSENTD_OPS_LISTEN", default_value = "127.0.0.1:9090")]
    pub ops_listen: SocketAddr,
    /// Insecure development mode: loopback addresses only, no tokens required.
    #[arg(long, env = "CONSENTD_DEV")]
    pub dev: bool,
    /// Bearer token the admin API requires (prefer --admin-token-file).
    #[arg(long, env = "CONSENTD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File holding the admin API's bearer token.
    #[arg(long, env = "CONSENTD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer token the sidecar sync stream requires (prefer --sidecar-token-file).
    #[arg(long, env = "CONSENTD_SIDECAR_TOKEN", hide_env_values = true)]
    pub sidecar_token: Option<String>,
    /// File holding the sidecar sync stream's bearer token.
    #[arg(long, env = "CONSENTD_SIDECAR_TOKEN_FILE")]
    pub sidecar_token_file: Option<PathBuf>,
    /// Period of heartbeats on every sync stream, in milliseconds.
    #[arg(long, env = "CONSENTD_HEARTBEAT_MS", default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// A sidecar that leaves a push unacknowledged this long (ms) is disconnected.
    #[arg(long, env = "CONSENTD_ACK_TIMEOUT_MS", default_value_t = 30_000)]
    pub ack_timeout_ms: u64,
    /// A stream must send its Hello within this many milliseconds.
    #[arg(long, env = "CONSENTD_HELLO_TIMEOUT_MS", default_value_t = 10_000)]
    pub hello_timeout_ms: u64,
    /// Grants per snapshot chunk.
    #[arg(long, env = "CONSENTD_SNAPSHOT_CHUNK", default_value_t = 500)]
    pub snapshot_chunk: usize,
    /// Longest lifetime of an issued consent token, in seconds.
    #[arg(long, env = "CONSENTD_MAX_TOKEN_TTL_SECS", default_value_t = 900)]
    pub max_token_ttl_secs: i64,
    /// Clock skew tolerated by verifiers; a rotated key is kept this much longer.
    #[arg(long, env = "CONSENTD_TOKEN_TOLERANCE_SECS", default_value_t = 60)]
    pub token_tolerance_secs: i64,
    /// The `iss` of issued tokens.
    #[arg(long, env = "CONSENTD_ISSUER", default_value = "consentd")]
    pub issuer: String,
    /// Longest WaitPropagation, in milliseconds.
    #[arg(long, env = "CONSENTD_MAX_WAIT_MS", default_value_t = 60_000)]
    pub max_wait_ms: u64,
    /// PEM certificate chain of the gRPC port; with --tls-key it serves TLS only.
    #[arg(long, env = "CONSENTD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8) of --tls-cert.
    #[arg(long, env = "CONSENTD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate it signed (mTLS).
    #[arg(long, env = "CONSENTD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "CONSENTD_LOG", default_value = "info")]
    pub log: String,
}

/// The resolved bearer tokens; `None` only in dev mode.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub admin: Option<String>,
    pub sidecar: Option<String>,
}

fn read_token(
    value: &Option<String>,
    file: &Option<PathBuf>,
    what: &str,
) -> anyhow::Result<Option<String>> {
    let token = match (value, file) {
        (Some(_), Some(_)) => bail!("give the {what} token or its file, not both"),
        (Some(v), None) => v.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the {what} token file {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if token.len() < 16 {
        bail!("the {what} token must be at least 16 characters");
    }
    Ok(Some(token))
}

fn file_args(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut args = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            bail!("{}:{}: expected `name = value`", path.display(), n + 1);
        };
        let (name, value) = (name.trim(), value.trim().trim_matches('"'));
        match value {
            "true" => args.push(format!("--{name}")),
            "false" => {}
            _ => args.push(format!("--{name}={value}")),
        }
    }
    Ok(args)
}

impl Config {
    /// Parses the command line, folding in the config file when one is named.
    pub fn load() -> anyhow::Result<Config> {
        let argv: Vec<String> = std::env::args().collect();
        let first = Config::parse_from(&argv);
        let Some(path) = &first.config else {
            return Ok(first);
        };
        let mut merged = vec![argv[0].clone()];
        merged.extend(file_args(path)?);
        merged.extend(argv.into_iter().skip(1));
        Ok(Config::try_parse_from(merged)?)
    }

    /// Checks the security posture and resolves the tokens.
    pub fn tokens(&self) -> anyhow::Result<Tokens> {
        let admin = read_token(&self.admin_token, &self.admin_token_file, "admin")?;
        let sidecar = read_token(&self.sidecar_token, &self.sidecar_token_file, "sidecar")?;
        if self.dev {
            for (what, addr) in [("--listen", self.listen), ("--ops-listen", self.ops_listen)] {
                if !addr.ip().is_loopback() {
                    bail!("--dev binds loopback only, but {what} is {addr}");
                }
            }
        } else if admin.is_none() || sidecar.is_none() {
            bail!(
                "consentd needs an admin token and a sidecar token (--admin-token-file and \
                 --sidecar-token-file, or CONSENTD_ADMIN_TOKEN and CONSENTD_SIDECAR_TOKEN); \
                 use --dev for an insecure loopback-only server"
            );
        }
        Ok(Tokens { admin, sidecar })
    }

    /// The TLS configuration of the gRPC port, when certificates are configured.
    pub fn tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read the TLS {what} {}", p.display()))
        };
        let identity =
            tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
                ca,
                "client CA",
            )?));
        }
        Ok(Some(tls))
    }

    pub fn settings(&self) -> Settings {
        Settings {
            heartbeat: Duration::from_millis(self.heartbeat_ms.max(1)),
            ack_timeout: Duration::from_millis(self.ack_timeout_ms.max(1)),
            hello_timeout: Duration::from_millis(self.hello_timeout_ms.max(1)),
            snapshot_chunk: self.snapshot_chunk.max(1),
            max_token_ttl_secs: self.max_token_ttl_secs.max(1),
            token_tolerance_secs: self.token_tolerance_secs.max(0),
            issuer: self.issuer.clone(),
            max_wait: Duration::from_millis(self.max_wait_ms),
            limits: consent_core::Limits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("consentd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn a_config_file_becomes_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consentd.conf");
        std::fs::write(
            &path,
            "# comment\ndb = \"/data/c.db\"\ndev = true\nheartbeat-ms = 100\n",
        )
        .unwrap();
        let args = file_args(&path).unwrap();
        assert_eq!(args, ["--db=/data/c.db", "--dev", "--heartbeat-ms=100"]);
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--heartbeat-ms", "7"]);
        let config = parse(&all);
        assert_eq!(
            (config.db.to_str(), config.dev, config.heartbeat_ms),
            (Some("/data/c.db"), true, 7)
        );
        std::fs::write(&path, "no equals sign\n").unwrap();
        assert!(file_args(&path).unwrap_err().to_string().contains(":1:"));
    }

    #[test]
    fn only_dev_mode_runs_without_tokens_and_only_on_loopback() {
        assert!(parse(&["--dev"]).tokens().unwrap().admin.is_none());
        let err = parse(&["--dev", "--listen", "0.0.0.0:7070"])
            .tokens()
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = parse(&[]).tokens().unwrap_err();
        assert!(err.to_string().contains("--dev"), "{err}");
        let err = parse(&[
            "--admin-token",
            "short",
            "--sidecar-token",
            "x".repeat(16).as_str(),
        ])
        .tokens()
        .unwrap_err();
        assert!(err.to_string().contains("16"), "{err}");
        let t = "t".repeat(20);
        let tokens = parse(&["--admin-token", &t, "--sidecar-token", &t])
            .tokens()
            .unwrap();
        assert_eq!(tokens.admin.as_deref(), Some(t.as_str()));
    }
}
