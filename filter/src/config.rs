//! The plugin configuration: strict JSON (unknown fields are refused) parsed
//! and validated whole in `on_configure`, so a bad config never half-starts.
//! Every error names the field by its JSON path.

use std::collections::BTreeSet;

use consent_core::grant::{check_id, check_name};
use consent_core::{Mode, OnStale, Permission, VerifyOptions};
use serde::Deserialize;

use crate::route::{RouteTable, Template};

/// A configuration that cannot start the filter; `field` is the JSON path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid plugin configuration: {field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    control_plane: RawControlPlane,
    token: RawToken,
    #[serde(default)]
    identity: IdentitySource,
    #[serde(default)]
    mode: RawMode,
    key_prefix: Option<String>,
    #[serde(default = "default_grant_header")]
    grant_header: String,
    #[serde(default = "default_retry_after")]
    retry_after_secs: u32,
    #[serde(default)]
    audit: RawAudit,
    routes: Vec<RawRoute>,
    #[serde(default)]
    default_deny_prefixes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlPlane {
    cluster: String,
    authority: Option<String>,
    node_id: String,
    credential: Option<String>,
    credential_env: Option<String>,
    max_staleness_secs: i64,
    heartbeat_secs: u32,
    #[serde(default = "default_lease")]
    lease_secs: u32,
    #[serde(default = "default_tick")]
    tick_ms: u32,
    #[serde(default = "default_backoff_initial")]
    backoff_initial_ms: u32,
    #[serde(default = "default_backoff_max")]
    backoff_max_ms: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    #[serde(default = "default_token_header")]
    header: String,
    issuer: String,
    audience: String,
    #[serde(default = "default_tolerance")]
    tolerance_secs: u64,
    #[serde(default = "default_cache_size")]
    cache_size: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "default_batch")]
    max_batch: usize,
    #[serde(default = "default_buffered")]
    max_buffered: usize,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            max_batch: default_batch(),
            max_buffered: default_buffered(),
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawMode {
    #[default]
    Enforce,
    DryRun,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawOnStale {
    #[default]
    Deny,
    Allow,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum RawPermission {
    Access,
    Process,
    Share,
}

/// Where the authenticated caller comes from. Only sources that Envoy has
/// already verified: consent is never authentication.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentitySource {
    /// The mTLS peer's URI SAN (SPIFFE id): `connection.uri_san_peer_certificate`.
    #[default]
    PeerCertificate,
    /// A request header set by an earlier filter that verified the caller.
    Header(String),
    /// A claim jwt_authn wrote into dynamic metadata, as path segments below
    /// `metadata.filter_metadata.envoy.filters.http.jwt_authn`.
    JwtAuthn(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    path: String,
    dataset: String,
    action: String,
    permission: RawPermission,
    purpose: RawPurpose,
    subject: RawSubject,
    #[serde(default = "default_true")]
    token_required: bool,
    #[serde(default)]
    on_stale: RawOnStale,
    identity: Option<IdentitySource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    fixed: Option<String>,
    header: Option<String>,
    #[serde(default)]
    allowed: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubject {
    path_param: Option<String>,
    header: Option<String>,
    query: Option<String>,
}

fn default_grant_header() -> String {
    "x-consent-grant".into()
}
fn default_token_header() -> String {
    "x-consent-token".into()
}
fn default_retry_after() -> u32 {
    5
}
fn default_lease() -> u32 {
    10
}
fn default_tick() -> u32 {
    1000
}
fn default_backoff_initial() -> u32 {
    500
}
fn default_backoff_max() -> u32 {
    30_000
}
fn default_tolerance() -> u64 {
    VerifyOptions::DEFAULT_TOLERANCE_SECS
}
fn default_cache_size() -> usize {
    1024
}
fn default_batch() -> usize {
    100
}
fn default_buffered() -> usize {
    10_000
}
fn default_true() -> bool {
    true
}

/// How the leader reaches consentd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlane {
    /// What `proxy_grpc_stream` gets as upstream: a cluster name, or a
    /// serialized `GrpcService` when an authority is configured. The SDK
    /// passes it as `&str`, so the encoding must be UTF-8 (checked here).
    pub upstream: String,
    pub node_id: String,
    pub credential: Option<String>,
    pub max_staleness_secs: i64,
    pub heartbeat_secs: u32,
    pub lease_secs: u32,
    pub tick_ms: u32,
    pub backoff_initial_ms: u32,
    pub backoff_max_ms: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurposeSource {
    Fixed(String),
    /// The header names the purpose; only one of `allowed` is accepted.
    Header {
        name: String,
        allowed: BTreeSet<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectSource {
    PathParam(String),
    Header(String),
    Query(String),
}

/// One protected route, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    /// Empty means every method.
    pub methods: Vec<String>,
    pub template: Template,
    pub dataset: String,
    pub action: String,
    pub permission: Permission,
    pub purpose: PurposeSource,
    pub subject: SubjectSource,
    pub token_required: bool,
    pub on_stale: OnStale,
    pub identity: IdentitySource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub control_plane: ControlPlane,
    pub token_header: String,
    pub verify: VerifyOptions,
    pub token_cache_size: usize,
    pub mode: Mode,
    /// Every shared-data key and queue name starts with it (Istio shares one
    /// namespace between all plugins of a proxy).
    pub key_prefix: String,
    pub grant_header: String,
    pub retry_after_secs: u32,
    pub audit_max_batch: usize,
    pub audit_max_buffered: usize,
    pub routes: RouteTable,
    /// The datasets the routes protect: the Hello subscribes to them.
    pub datasets: Vec<String>,
}

impl Config {
    /// Parses and validates the plugin configuration. `root_id` is the
    /// plugin's root id (default key prefix); `env` looks up `credential_env`.
    pub fn parse(
        json: &[u8],
        root_id: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(json);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::new(
                if path == "." { "config".into() } else { path },
                e.inner().to_string(),
            )
        })?;
        raw.validate(root_id, env)
    }
}

fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if name.is_empty() || !name.chars().all(ok) {
        return Err(ConfigError::new(
            field,
            format!("{name:?} must be a lower-case header name (Envoy lower-cases keys)"),
        ));
    }
    Ok(())
}

fn check_identity(field: &str, source: &IdentitySource) -> Result<(), ConfigError> {
    match source {
        IdentitySource::PeerCertificate => Ok(()),
        IdentitySource::Header(name) => check_header_name(&format!("{field}.header"), name),
        IdentitySource::JwtAuthn(path) if path.is_empty() || path.iter().any(String::is_empty) => {
            Err(ConfigError::new(
                format!("{field}.jwt_authn"),
                "must name non-empty path segments",
            ))
        }
        IdentitySource::JwtAuthn(_) => Ok(()),
    }
}

/// `envoy.config.core.v3.GrpcService { envoy_grpc: { cluster_name, authority } }`,
/// encoded by hand so the filter does not carry Envoy's protos.
pub fn grpc_service_bytes(cluster: &str, authority: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::new();
    prost::encoding::string::encode(1, &cluster.to_owned(), &mut envoy_grpc);
    prost::encoding::string::encode(2, &authority.to_owned(), &mut envoy_grpc);
    let mut out = Vec::new();
    prost::encoding::bytes::encode(1, &envoy_grpc, &mut out);
    out
}

impl RawConfig {
    fn validate(
        self,
        root_id: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let cp = self.control_plane;
        if cp.cluster.is_empty() {
            return Err(ConfigError::new(
                "control_plane.cluster",
                "must not be empty",
            ));
        }
        let upstream = match &cp.authority {
            Some(a) if a.is_empty() => {
                return Err(ConfigError::new(
                    "control_plane.authority",
                    "must not be empty",
                ));
            }
            Some(a) => String::from_utf8(grpc_service_bytes(&cp.cluster, a)).map_err(|_| {
                ConfigError::new(
                    "control_plane.authority",
                    "cluster and authority are too long to pass as a GrpcService (over 127 bytes)",
                )
            })?,
            // A bare name with `|` is an Istio cluster: Envoy would first try to
            // parse it as a GrpcService, so give it an explicit authority.
            None if cp.cluster.contains('|') => {
                return Err(ConfigError::new(
                    "control_plane.authority",
                    "required when the cluster name contains '|' (Istio outbound clusters)",
                ));
            }
            None => cp.cluster.clone(),
        };
        check_id("node_id", &cp.node_id)
            .map_err(|e| ConfigError::new("control_plane.node_id", e.problem))?;
        let credential = match (cp.credential, cp.credential_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "control_plane.credential_env",
                    "give either credential or credential_env, not both",
                ));
            }
            (Some(c), None) => Some(c),
            (None, Some(var)) => Some(env(&var).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new("control_plane.credential_env", format!("{var} is not set"))
            })?),
            (None, None) => None,
        };
        if let Some(c) = &credential
            && (c.is_empty() || c.chars().any(|ch| ch.is_ascii_control() || ch == ' '))
        {
            return Err(ConfigError::new(
                "control_plane.credential",
                "must be a non-empty token without spaces or control characters",
            ));
        }
        if cp.max_staleness_secs <= 0 {
            return Err(ConfigError::new(
                "control_plane.max_staleness_secs",
                "must be positive",
            ));
        }
        if cp.heartbeat_secs == 0 || i64::from(cp.heartbeat_secs) >= cp.max_staleness_secs {
            return Err(ConfigError::new(
                "control_plane.heartbeat_secs",
                "must be positive and shorter than max_staleness_secs",
            ));
        }
        if cp.tick_ms < 10 || u64::from(cp.tick_ms) >= u64::from(cp.lease_secs) * 1000 {
            return Err(ConfigError::new(
                "control_plane.tick_ms",
                "must be at least 10 and shorter than lease_secs",
            ));
        }
        if cp.backoff_initial_ms == 0 || cp.backoff_max_ms < cp.backoff_initial_ms {
            return Err(ConfigError::new(
                "control_plane.backoff_max_ms",
                "backoff_initial_ms must be positive and not above backoff_max_ms",
            ));
        }

        let token = self.token;
        check_header_name("token.header", &token.header)?;
        if token.issuer.is_empty() {
            return Err(ConfigError::new("token.issuer", "must not be empty"));
        }
        if token.audience.is_empty() {
            return Err(ConfigError::new("token.audience", "must not be empty"));
        }
        if token.tolerance_secs > 300 {
            return Err(ConfigError::new(
                "token.tolerance_secs",
                "must be at most 300",
            ));
        }
        if token.cache_size == 0 || token.cache_size > 100_000 {
            return Err(ConfigError::new("token.cache_size", "must be 1 to 100000"));
        }
        check_identity("identity", &self.identity)?;
        check_header_name("grant_header", &self.grant_header)?;
        let key_prefix = match self.key_prefix {
            Some(p)
                if p.is_empty() || p.len() > 128 || !p.chars().all(|c| c.is_ascii_graphic()) =>
            {
                return Err(ConfigError::new(
                    "key_prefix",
                    "must be 1 to 128 printable ASCII",
                ));
            }
            Some(p) => p,
            None => format!("consent/{root_id}/"),
        };
        if self.retry_after_secs == 0 {
            return Err(ConfigError::new("retry_after_secs", "must be positive"));
        }
        if self.audit.max_batch == 0 || self.audit.max_buffered < self.audit.max_batch {
            return Err(ConfigError::new(
                "audit.max_buffered",
                "max_batch must be positive and not above max_buffered",
            ));
        }

        if self.routes.is_empty() {
            return Err(ConfigError::new(
                "routes",
                "must declare at least one protected route",
            ));
        }
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, raw) in self.routes.into_iter().enumerate() {
            routes.push(raw.validate(&format!("routes[{i}]"), &self.identity)?);
        }
        for (i, prefix) in self.default_deny_prefixes.iter().enumerate() {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new(
                    format!("default_deny_prefixes[{i}]"),
                    "must start with '/'",
                ));
            }
        }
        let datasets: BTreeSet<String> = routes.iter().map(|r| r.dataset.clone()).collect();

        let mut verify = VerifyOptions::new(token.issuer, token.audience);
        verify.tolerance_secs = token.tolerance_secs;
        Ok(Config {
            control_plane: ControlPlane {
                upstream,
                node_id: cp.node_id,
                credential,
                max_staleness_secs: cp.max_staleness_secs,
                heartbeat_secs: cp.heartbeat_secs,
                lease_secs: cp.lease_secs,
                tick_ms: cp.tick_ms,
                backoff_initial_ms: cp.backoff_initial_ms,
                backoff_max_ms: cp.backoff_max_ms,
            },
            token_header: token.header,
            verify,
            token_cache_size: token.cache_size,
            mode: match self.mode {
                RawMode::Enforce => Mode::Enforce,
                RawMode::DryRun => Mode::DryRun,
            },
            key_prefix,
            grant_header: self.grant_header,
            retry_after_secs: self.retry_after_secs,
            audit_max_batch: self.audit.max_batch,
            audit_max_buffered: self.audit.max_buffered,
            routes: RouteTable::new(routes, self.default_deny_prefixes),
            datasets: datasets.into_iter().collect(),
        })
    }
}

impl RawRoute {
    fn validate(self, at: &str, identity: &IdentitySource) -> Result<Route, ConfigError> {
        let field = |name: &str| format!("{at}.{name}");
        let template = Template::parse(&self.path)
            .map_err(|problem| ConfigError::new(field("path"), problem))?;
        let methods = self.methods;
        for (i, m) in methods.iter().enumerate() {
            if m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(ConfigError::new(
                    format!("{at}.methods[{i}]"),
                    format!("{m:?} must be an upper-case HTTP method"),
                ));
            }
        }
        check_name("dataset", &self.dataset)
            .map_err(|e| ConfigError::new(field("dataset"), e.problem))?;
        check_name("action", &self.action)
            .map_err(|e| ConfigError::new(field("action"), e.problem))?;
        let purpose = match (self.purpose.fixed, self.purpose.header) {
            (Some(p), None) if self.purpose.allowed.is_empty() => {
                check_name("purpose", &p)
                    .map_err(|e| ConfigError::new(field("purpose.fixed"), e.problem))?;
                PurposeSource::Fixed(p)
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    field("purpose.allowed"),
                    "only applies to a purpose taken from a header",
                ));
            }
            (None, Some(name)) => {
                check_header_name(&field("purpose.header"), &name)?;
                if self.purpose.allowed.is_empty() {
                    return Err(ConfigError::new(
                        field("purpose.allowed"),
                        "must list the purposes the header may name",
                    ));
                }
                for p in &self.purpose.allowed {
                    check_name("purpose", p)
                        .map_err(|e| ConfigError::new(field("purpose.allowed"), e.problem))?;
                }
                PurposeSource::Header {
                    name,
                    allowed: self.purpose.allowed.into_iter().collect(),
                }
            }
            _ => {
                return Err(ConfigError::new(
                    field("purpose"),
                    "give exactly one of fixed, header",
                ));
            }
        };
        let subject = match (
            self.subject.path_param,
            self.subject.header,
            self.subject.query,
        ) {
            (Some(p), None, None) => {
                if !template.params().any(|name| name == p) {
                    return Err(ConfigError::new(
                        field("subject.path_param"),
                        format!("{p:?} is not a parameter of {:?}", self.path),
                    ));
                }
                SubjectSource::PathParam(p)
            }
            (None, Some(h), None) => {
                check_header_name(&field("subject.header"), &h)?;
                SubjectSource::Header(h)
            }
            (None, None, Some(q)) if !q.is_empty() => SubjectSource::Query(q),
            (None, None, Some(_)) => {
                return Err(ConfigError::new(
                    field("subject.query"),
                    "must not be empty",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    field("subject"),
                    "give exactly one of path_param, header, query",
                ));
            }
        };
        let identity = self.identity.unwrap_or_else(|| identity.clone());
        check_identity(&field("identity"), &identity)?;
        Ok(Route {
            name: self.name.unwrap_or_else(|| self.path.clone()),
            methods,
            template,
            dataset: self.dataset,
            action: self.action,
            permission: match self.permission {
                RawPermission::Access => Permission::Access,
                RawPermission::Process => Permission::Process,
                RawPermission::Share => Permission::Share,
            },
            purpose,
            subject,
            token_required: self.token_required,
            on_stale: match self.on_stale {
                RawOnStale::Deny => OnStale::Deny,
                RawOnStale::Allow => OnStale::Allow,
            },
            identity,
        })
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
