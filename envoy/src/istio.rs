//! Strict serde mirrors of the Istio resources in `envoy/istio/`. Istio's
//! protos are not in `envoy-types`, so these follow istio/api
//! (`extensions/v1alpha1/wasm.proto`, `networking/v1alpha3/…`) for the fields
//! these files use, and refuse every field they do not know: a misspelled key
//! fails the test instead of being silently ignored by a lenient reader.
//! Embedded Envoy config (an `EnvoyFilter` patch) is checked against Envoy's
//! schema with [`crate::parse_dynamic`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// Any Kubernetes object: the spec is read by kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Resource {
    /// The spec as `T`, naming the resource and the JSON path on error.
    pub fn spec<T: for<'de> Deserialize<'de>>(&self) -> Result<T, crate::Error> {
        serde_path_to_error::deserialize(&self.spec).map_err(|e| {
            crate::Error::Shape(format!(
                "{} {}: spec.{}: {}",
                self.kind,
                self.metadata.name,
                e.path(),
                e.inner()
            ))
        })
    }
}

/// `extensions.istio.io/v1alpha1 WasmPlugin`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmPluginSpec {
    pub selector: Option<WorkloadSelector>,
    pub url: String,
    pub sha256: Option<String>,
    pub image_pull_policy: Option<PullPolicy>,
    pub image_pull_secret: Option<String>,
    pub plugin_config: Option<serde_json::Map<String, serde_json::Value>>,
    pub plugin_name: Option<String>,
    pub phase: Option<PluginPhase>,
    pub priority: Option<i32>,
    pub fail_strategy: Option<FailStrategy>,
    pub vm_config: Option<WasmVmConfig>,
    #[serde(default, rename = "match")]
    pub matches: Vec<TrafficSelector>,
    #[serde(rename = "type")]
    pub plugin_type: Option<PluginType>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum PullPolicy {
    #[serde(rename = "UNSPECIFIED_POLICY")]
    Unspecified,
    IfNotPresent,
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PluginPhase {
    UnspecifiedPhase,
    Authn,
    Authz,
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    FailClose,
    FailOpen,
    FailReload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PluginType {
    UnspecifiedPluginType,
    Http,
    Network,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmVmConfig {
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value_from: Option<EnvValueSource>,
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EnvValueSource {
    Inline,
    Host,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSelector {
    pub mode: Option<WorkloadMode>,
    #[serde(default)]
    pub ports: Vec<PortSelector>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    Undefined,
    Client,
    Server,
    ClientAndServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

/// `networking.istio.io EnvoyFilter`, for the HTTP_FILTER patches used here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyFilterSpec {
    pub workload_selector: Option<EnvoyFilterSelector>,
    pub config_patches: Vec<ConfigPatch>,
    pub priority: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvoyFilterSelector {
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigPatch {
    pub apply_to: String,
    #[serde(rename = "match")]
    pub matches: serde_json::Value,
    pub patch: Patch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub operation: String,
    /// Envoy configuration: for `HTTP_FILTER`, an
    /// `envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter`.
    pub value: serde_json::Value,
}

/// `networking.istio.io DestinationRule`, the traffic policy for consentd
/// or a partner.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub tls: Option<ClientTls>,
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub port_level_settings: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTls {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<TcpKeepalive>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    pub idle_timeout: Option<String>,
    pub http2_max_requests: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// `networking.istio.io ServiceEntry`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub location: Option<String>,
    pub resolution: Option<String>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// A port of a ServiceEntry (`number`) or a Kubernetes Service (`port`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub number: Option<u32>,
    pub port: Option<u32>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    pub target_port: Option<serde_json::Value>,
}

/// `v1 Service`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}
