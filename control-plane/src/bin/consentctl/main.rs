//! consentctl: the admin CLI of consentd. Human-readable tables by default,
//! `-o json` for scripts; every error is one line and a non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_core::wire::v1;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;

mod output;

use output::{print_audit, print_grants, print_propagation, table, utc, utc_ms};

#[derive(Parser, Debug)]
#[command(
    name = "consentctl",
    version,
    about = "Administer consent grants on a consentd control plane."
)]
struct Cli {
    /// consentd's gRPC address.
    #[arg(
        long,
        env = "CONSENTCTL_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    server: String,
    /// The admin bearer token (prefer --token-file).
    #[arg(long, env = "CONSENTCTL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the admin bearer token.
    #[arg(long, env = "CONSENTCTL_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    output: Output,
    /// PEM CA certificate to verify consentd's TLS certificate (use an https:// --server).
    #[arg(long, env = "CONSENTCTL_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate and key (PKCS#8), when consentd requires mTLS.
    #[arg(
        long,
        env = "CONSENTCTL_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    #[arg(
        long,
        env = "CONSENTCTL_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Who is acting, recorded in the audit log (default: $USER).
    #[arg(long, env = "CONSENTCTL_ACTOR", global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a grant.
    Create {
        /// Grant id; the server allocates one when omitted.
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        grantee: String,
        /// Who issued the permission (default: the subject).
        #[arg(long)]
        issued_by: Option<String>,
        /// Who is accountable for the grant (default: the actor).
        #[arg(long)]
        owner: Option<String>,
        /// Purposes, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        purposes: Vec<String>,
        #[arg(long, value_delimiter = ',', required = true)]
        datasets: Vec<String>,
        #[arg(long, value_delimiter = ',', required = true)]
        actions: Vec<String>,
        /// Any of access, process, share.
        #[arg(long, value_delimiter = ',', required = true)]
        permissions: Vec<String>,
        /// Unix seconds, `now`, or relative like `+1h` (default: now).
        #[arg(long, default_value = "now")]
        not_before: String,
        /// Unix seconds or relative like `+30d`.
        #[arg(long)]
        expires_at: String,
        /// The grant this one is shared onward from.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Narrow a grant; any widening is refused.
    Amend {
        id: String,
        #[arg(long, value_delimiter = ',')]
        purposes: Option<Vec<String>>,
        #[arg(long, value_delimiter = ',')]
        datasets: Option<Vec<String>>,
        #[arg(long, value_delimiter = ',')]
        actions: Option<Vec<String>>,
        #[arg(long, value_delimiter = ',')]
        permissions: Option<Vec<String>>,
        #[arg(long)]
        not_before: Option<String>,
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke a grant and its descendants.
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
        /// Wait until every subscribed sidecar acknowledged the revocation.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 10s.
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
    /// Show a grant.
    Get { id: String },
    /// List grants.
    List {
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        grantee: Option<String>,
        #[arg(long)]
        dataset: Option<String>,
        /// active, revoked or expired.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Issue a consent token for an active grant to its grantee.
    IssueToken {
        grant_id: String,
        #[arg(long)]
        grantee: String,
        #[arg(long)]
        audience: String,
        /// Requested lifetime, e.g. 5m; capped by the server.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Which subscribed sidecars have acknowledged a revision.
    Propagation {
        revision: u64,
        #[arg(long, value_delimiter = ',')]
        datasets: Vec<String>,
    },
    /// Wait until the subscribed sidecars acknowledge a revision.
    Wait {
        revision: u64,
        #[arg(long, value_delimiter = ',')]
        datasets: Vec<String>,
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
    /// List sidecars and what they acknowledged.
    Sidecars,
    /// Query the audit log.
    Audit {
        #[arg(long)]
        grant: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        /// Unix milliseconds, or relative like `-1h`.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Make a new token-signing key current; old keys stay until their tokens expire.
    RotateKey,
}

fn main() -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => match rt.block_on(run()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("consentctl: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("consentctl: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_secs() -> i64 {
    consent_control_plane::store::now_ms() / 1000
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `30d`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a duration like 10s, 5m, 2h, 30d"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => bail!("{s:?} is not a duration like 10s, 5m, 2h, 30d"),
    };
    Ok(Duration::from_millis(ms))
}

/// Unix seconds, `now`, or `+`/`-` a duration from now.
fn parse_time(field: &str, s: &str) -> anyhow::Result<i64> {
    let now = now_secs();
    let parsed = if s == "now" {
        Ok(now)
    } else if let Some(rest) = s.strip_prefix('+') {
        parse_duration(rest).map(|d| now + d.as_secs() as i64)
    } else if let Some(rest) = s.strip_prefix('-') {
        parse_duration(rest).map(|d| now - d.as_secs() as i64)
    } else {
        s.parse::<i64>().map_err(|_| anyhow!("not a time"))
    };
    parsed.with_context(|| format!("--{field} {s:?}: expected Unix seconds, now, +30d or -1h"))
}

fn permission(s: &str) -> anyhow::Result<i32> {
    Ok(match s {
        "access" => v1::Permission::Access,
        "process" => v1::Permission::Process,
        "share" => v1::Permission::Share,
        _ => bail!("--permissions {s:?}: expected access, process or share"),
    } as i32)
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let bearer: Option<MetadataValue<_>> = token
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| anyhow!("the token contains characters a header cannot carry"))?;
    let actor = cli
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "consentctl".into());
    let mut endpoint = tonic::transport::Endpoint::from_shared(cli.server.clone())
        .with_context(|| format!("--server {:?} is not a URL", cli.server))?
        .connect_timeout(Duration::from_secs(5));
    if cli.server.starts_with("https://") || cli.ca_cert.is_some() {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_cert {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("invalid TLS configuration")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to consentd at {}", cli.server))?;
    let mut client =
        ConsentAdminClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(b) = &bearer {
                req.metadata_mut().insert("authorization", b.clone());
            }
            Ok(req)
        });
    let out = cli.output;
    match cli.command {
        Command::Create {
            id,
            subject,
            grantee,
            issued_by,
            owner,
            purposes,
            datasets,
            actions,
            permissions,
            not_before,
            expires_at,
            parent,
        } => {
            let request = v1::CreateGrantRequest {
                id: id.unwrap_or_default(),
                issued_by: issued_by.unwrap_or_else(|| subject.clone()),
                owner: owner.unwrap_or_else(|| actor.clone()),
                subject,
                grantee,
                purposes,
                datasets,
                actions,
                permissions: permissions
                    .iter()
                    .map(|p| permission(p))
                    .collect::<Result<_, _>>()?,
                not_before: parse_time("not-before", &not_before)?,
                expires_at: parse_time("expires-at", &expires_at)?,
                parent: parent.unwrap_or_default(),
                actor,
            };
            let grant = client
                .create_grant(request)
                .await
                .map_err(status_error)?
                .into_inner()
                .grant;
            print_grants(out, grant.as_slice(), None);
        }
        Command::Amend {
            id,
            purposes,
            datasets,
            actions,
            permissions,
            not_before,
            expires_at,
            reason,
        } => {
            let list = |v: Option<Vec<String>>| v.map(|values| v1::StringList { values });
            let request = v1::AmendGrantRequest {
                id,
                purposes: list(purposes),
                datasets: list(datasets),
                actions: list(actions),
                permissions: permissions
                    .map(|ps| ps.iter().map(|p| permission(p)).collect::<Result<_, _>>())
                    .transpose()?
                    .map(|values| v1::PermissionList { values }),
                not_before: not_before
                    .map(|t| parse_time("not-before", &t))
                    .transpose()?,
                expires_at: expires_at
                    .map(|t| parse_time("expires-at", &t))
                    .transpose()?,
                actor,
                reason,
            };
            let grant = client
                .amend_grant(request)
                .await
                .map_err(status_error)?
                .into_inner()
                .grant;
            print_grants(out, grant.as_slice(), None);
        }
        Command::Revoke {
            id,
            reason,
            wait,
            timeout,
        } => {
            let timeout = parse_duration(&timeout).context("--timeout")?;
            let r = client
                .revoke_grant(v1::RevokeGrantRequest { id, actor, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            if out == Output::Json && !wait {
                println!(
                    "{:#}",
                    json!({ "revision": r.revision, "revoked": r.revoked, "datasets": r.datasets })
                );
            } else if out == Output::Table {
                println!(
                    "revoked {} at revision {} (datasets {})",
                    r.revoked.join(", "),
                    r.revision,
                    r.datasets.join(",")
                );
            }
            if wait {
                let p = client
                    .wait_propagation(v1::PropagationRequest {
                        revision: r.revision,
                        datasets: r.datasets,
                        timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_propagation(out, &p)?;
            }
        }
        Command::Get { id } => {
            let grant = client
                .get_grant(v1::GetGrantRequest { id })
                .await
                .map_err(status_error)?
                .into_inner()
                .grant;
            print_grants(out, grant.as_slice(), None);
        }
        Command::List {
            subject,
            grantee,
            dataset,
            status,
            page_size,
            page_token,
        } => {
            let status = match status.as_deref() {
                None => v1::GrantStatus::Unspecified,
                Some("active") => v1::GrantStatus::Active,
                Some("revoked") => v1::GrantStatus::Revoked,
                Some("expired") => v1::GrantStatus::Expired,
                Some(other) => bail!("--status {other:?}: expected active, revoked or expired"),
            };
            let r = client
                .list_grants(v1::ListGrantsRequest {
                    subject: subject.unwrap_or_default(),
                    grantee: grantee.unwrap_or_default(),
                    dataset: dataset.unwrap_or_default(),
                    status: status as i32,
                    page_size,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_grants(out, &r.grants, Some(&r.next_page_token));
        }
        Command::IssueToken {
            grant_id,
            grantee,
            audience,
            ttl,
        } => {
            let ttl_seconds = match ttl {
                Some(t) => parse_duration(&t)
                    .context("--ttl")?
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32,
                None => 0,
            };
            let r = client
                .issue_token(v1::IssueTokenRequest {
                    grant_id,
                    grantee,
                    audience,
                    ttl_seconds,
                    actor,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{:#}",
                    json!({ "token": r.token, "jti": r.jti, "expires_at": r.expires_at, "kid": r.kid })
                );
            } else {
                println!("{}", r.token);
                eprintln!("jti {} kid {} expires {}", r.jti, r.kid, utc(r.expires_at));
            }
        }
        Command::Propagation { revision, datasets } => {
            let p = client
                .propagation_status(v1::PropagationRequest {
                    revision,
                    datasets,
                    timeout_ms: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_propagation(out, &p)?;
        }
        Command::Wait {
            revision,
            datasets,
            timeout,
        } => {
            let timeout = parse_duration(&timeout).context("--timeout")?;
            let p = client
                .wait_propagation(v1::PropagationRequest {
                    revision,
                    datasets,
                    timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_propagation(out, &p)?;
        }
        Command::Sidecars => {
            let r = client
                .list_sidecars(v1::ListSidecarsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if out == Output::Json {
                let list: Vec<Value> = r
                    .sidecars
                    .iter()
                    .map(|s| json!({
                        "node_id": s.node_id, "datasets": s.datasets, "acked_revision": s.acked_revision,
                        "acked_at_ms": s.acked_at_ms, "connected": s.connected, "since_ms": s.since_ms,
                        "filter_version": s.filter_version,
                    }))
                    .collect();
                println!("{:#}", json!(list));
            } else {
                let rows: Vec<Vec<String>> = r
                    .sidecars
                    .iter()
                    .map(|s| {
                        vec![
                            s.node_id.clone(),
                            s.datasets.join(","),
                            s.acked_revision.to_string(),
                            utc_ms(s.acked_at_ms),
                            if s.connected {
                                "connected".into()
                            } else {
                                "disconnected".into()
                            },
                            utc_ms(s.since_ms),
                            s.filter_version.clone(),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NODE",
                        "DATASETS",
                        "ACKED_REV",
                        "ACKED_AT",
                        "STATE",
                        "SINCE",
                        "VERSION",
                    ],
                    &rows,
                );
            }
        }
        Command::Audit {
            grant,
            subject,
            request_id,
            since,
            until,
            limit,
        } => {
            let time = |field: &str, s: Option<String>| -> anyhow::Result<i64> {
                match s {
                    None => Ok(0),
                    Some(s) if s.starts_with('+') || s.starts_with('-') || s == "now" => {
                        Ok(parse_time(field, &s)? * 1000)
                    }
                    Some(s) => s.parse().with_context(|| {
                        format!("--{field} {s:?}: expected Unix milliseconds or -1h")
                    }),
                }
            };
            let r = client
                .query_audit(v1::QueryAuditRequest {
                    grant_id: grant.unwrap_or_default(),
                    subject: subject.unwrap_or_default(),
                    request_id: request_id.unwrap_or_default(),
                    from_ms: time("since", since)?,
                    to_ms: time("until", until)?,
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_audit(out, &r.records);
        }
        Command::RotateKey => {
            let r = client
                .rotate_signing_key(v1::RotateSigningKeyRequest { actor })
                .await
                .map_err(status_error)?
                .into_inner();
            let keys = r.keys.unwrap_or_default().keys;
            if out == Output::Json {
                let list: Vec<Value> = keys
                    .iter()
                    .map(|k| json!({ "kid": k.kid, "retire_after": k.retire_after }))
                    .collect();
                println!("{:#}", json!({ "kid": r.kid, "keys": list }));
            } else {
                println!("signing key is now {}", r.kid);
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.kid.clone(),
                            if k.retire_after == 0 {
                                "current".into()
                            } else {
                                utc(k.retire_after)
                            },
                        ]
                    })
                    .collect();
                table(&["KID", "RETIRE_AFTER"], &rows);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_times_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_duration("5 weeks").is_err());
        assert_eq!(
            parse_time("expires-at", "1700000000").unwrap(),
            1_700_000_000
        );
        let soon = parse_time("expires-at", "+1h").unwrap() - now_secs();
        assert!((3599..=3601).contains(&soon));
        let err = parse_time("expires-at", "tomorrow").unwrap_err();
        assert!(format!("{err:#}").contains("--expires-at"));
    }
}
