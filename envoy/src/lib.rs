//! consent-envoy-config: loads the Envoy and Istio deployment files kept in
//! `envoy/` and checks them against Envoy's own API schema, so an operator
//! never copies a bootstrap that Envoy would reject.
//!
//! Envoy's schema comes from the `envoy-types` crate, which ships the
//! `FileDescriptorSet` its prost types were generated from
//! (`src/generated/types.bin`) but exposes no constant for it; [`descriptor_pool`]
//! finds that file through `cargo metadata`. A YAML document is converted to
//! JSON and deserialized with `prost-reflect` into a `DynamicMessage` that
//! refuses unknown fields and wrong types and resolves every `Any` through the
//! same pool. The result is then decoded into `envoy-types`' prost structs,
//! and the two encodings must have the same length: the descriptor set and
//! the compiled types agree on every field that was set.
//!
//! The filter's plugin configuration inside each file is checked by the
//! filter's own parser ([`parse_plugin_config`]); Istio's resources, which
//! have no schema in `envoy-types`, are read with strict serde mirrors of the
//! fields these files use ([`istio`]).

pub mod istio;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_filter,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{PluginConfig, VmConfig, plugin_config};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

pub use consent_filter::config::{Config as PluginConfiguration, ConfigError};
pub use envoy_types::pb::envoy as pb;

/// The file name of the filter's build artefact
/// (`target/wasm32-wasip1/wasm-release/consent_filter.wasm`).
pub const WASM_FILE_NAME: &str = "consent_filter.wasm";

/// The fully-qualified name of Envoy's bootstrap message.
pub const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("envoy-types' descriptor set: {0}")]
    Descriptors(String),
    #[error("{0} is not in envoy-types' descriptor set")]
    UnknownType(String),
    /// The document is not a valid message of that type (Envoy would reject it).
    #[error("not a valid {type_name}: at {at}: {problem}")]
    Schema {
        type_name: String,
        at: String,
        problem: String,
    },
    /// The descriptor set and envoy-types' compiled structs disagree.
    #[error("{type_name}: {problem}")]
    Mismatch { type_name: String, problem: String },
    #[error("{0}")]
    Shape(String),
}

/// Envoy's descriptor pool, decoded once per process from the
/// `FileDescriptorSet` shipped inside the `envoy-types` crate in use.
pub fn descriptor_pool() -> Result<&'static DescriptorPool, Error> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let path = envoy_types_descriptor_set().map_err(|e| e.to_string())?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        DescriptorPool::decode(bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| Error::Descriptors(e.clone()))
}

/// Where the `envoy-types` package this crate is built against keeps its
/// descriptor set, asked of cargo itself so the file matches the compiled
/// types' version.
pub fn envoy_types_descriptor_set() -> Result<PathBuf, Error> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let output = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
        ])
        .arg(env!("CONSENT_ENVOY_CONFIG_TARGET"))
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .map_err(|e| Error::Descriptors(format!("cannot run cargo metadata: {e}")))?;
    if !output.status.success() {
        return Err(Error::Descriptors(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::Descriptors(format!("cargo metadata output: {e}")))?;
    let manifests: Vec<&str> = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "envoy-types")
        .filter_map(|p| p["manifest_path"].as_str())
        .collect();
    let [manifest_path] = manifests.as_slice() else {
        return Err(Error::Descriptors(format!(
            "expected exactly one envoy-types package, found {manifests:?}"
        )));
    };
    let dir = Path::new(manifest_path)
        .parent()
        .ok_or_else(|| Error::Descriptors(format!("odd manifest path {manifest_path}")))?;
    let path = dir.join("src/generated/types.bin");
    if !path.is_file() {
        return Err(Error::Descriptors(format!(
            "{} does not exist",
            path.display()
        )));
    }
    Ok(path)
}

/// Every non-empty document of a YAML file, as JSON values.
pub fn load_yaml(path: &Path) -> Result<Vec<serde_json::Value>, Error> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(document).map_err(|source| Error::Yaml {
            path: path.to_owned(),
            source,
        })?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Deserializes `json` as the protobuf message `type_name`, as Envoy does:
/// unknown fields and wrong types are errors, `Any` is resolved by its
/// `@type` through the pool. The error names the JSON path.
pub fn parse_dynamic(type_name: &str, json: &serde_json::Value) -> Result<DynamicMessage, Error> {
    let pool = descriptor_pool()?;
    let descriptor = pool
        .get_message_by_name(type_name)
        .ok_or_else(|| Error::UnknownType(type_name.into()))?;
    let mut track = serde_path_to_error::Track::new();
    let deserializer = serde_path_to_error::Deserializer::new(json, &mut track);
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(descriptor, deserializer, &options).map_err(|e| {
        Error::Schema {
            type_name: type_name.into(),
            at: track.path().to_string(),
            problem: e.to_string(),
        }
    })
}

/// [`parse_dynamic`], then decoded into envoy-types' struct `T`. Fails if the
/// struct drops anything the descriptor set knew about.
pub fn parse_typed<T: Message + Name + Default>(json: &serde_json::Value) -> Result<T, Error> {
    let type_name = T::full_name();
    let dynamic = parse_dynamic(&type_name, json)?;
    let bytes = dynamic.encode_to_vec();
    let typed = T::decode(bytes.as_slice()).map_err(|e| Error::Mismatch {
        type_name: type_name.clone(),
        problem: e.to_string(),
    })?;
    if typed.encoded_len() != bytes.len() {
        return Err(Error::Mismatch {
            type_name,
            problem: format!(
                "the descriptor set encodes {} bytes, the compiled struct {}",
                bytes.len(),
                typed.encoded_len()
            ),
        });
    }
    Ok(typed)
}

/// Parses a whole bootstrap file strictly.
pub fn load_bootstrap(path: &Path) -> Result<Bootstrap, Error> {
    let documents = load_yaml(path)?;
    let [document] = documents.as_slice() else {
        return Err(Error::Shape(format!(
            "{}: expected one YAML document",
            path.display()
        )));
    };
    parse_typed(document).map_err(|e| Error::Shape(format!("{}: {e}", path.display())))
}

/// `Some(message)` when `any` holds a `T`. Like Envoy, only the type name
/// after the last `/` of the type URL counts.
pub fn unpack<T: Message + Name + Default>(any: &Any) -> Option<Result<T, Error>> {
    (any.type_url.rsplit('/').next() == Some(T::full_name().as_str())).then(|| {
        T::decode(any.value.as_slice()).map_err(|e| Error::Mismatch {
            type_name: T::full_name(),
            problem: e.to_string(),
        })
    })
}

/// One HTTP connection manager of a static listener.
#[derive(Debug)]
pub struct HttpChain {
    pub listener: String,
    pub manager: HttpConnectionManager,
}

impl HttpChain {
    /// The HTTP filter names in order.
    pub fn filter_names(&self) -> Vec<&str> {
        self.manager
            .http_filters
            .iter()
            .map(|f| f.name.as_str())
            .collect()
    }

    /// The wasm filters of this chain with their position.
    pub fn wasm_filters(&self) -> Result<Vec<(usize, Wasm)>, Error> {
        let mut found = Vec::new();
        for (i, f) in self.manager.http_filters.iter().enumerate() {
            if let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type
                && let Some(wasm) = unpack::<Wasm>(any)
            {
                found.push((i, wasm?));
            }
        }
        Ok(found)
    }
}

/// Every HTTP connection manager in the bootstrap's static listeners.
pub fn http_chains(bootstrap: &Bootstrap) -> Result<Vec<HttpChain>, Error> {
    let mut chains = Vec::new();
    let listeners = bootstrap.static_resources.iter().flat_map(|r| &r.listeners);
    for listener in listeners {
        for chain in &listener.filter_chains {
            for f in &chain.filters {
                if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
                    && let Some(manager) = unpack::<HttpConnectionManager>(any)
                {
                    chains.push(HttpChain {
                        listener: listener.name.clone(),
                        manager: manager?,
                    });
                }
            }
        }
    }
    Ok(chains)
}

/// The plugin's VM configuration (the only `vm` variant Envoy has).
pub fn vm_config(plugin: &PluginConfig) -> Option<&VmConfig> {
    match &plugin.vm {
        Some(plugin_config::Vm::VmConfig(vm)) => Some(vm),
        None => None,
    }
}

/// The `.wasm` file a VM loads from the local filesystem.
pub fn local_code_file(vm: &VmConfig) -> Option<&str> {
    use envoy_types::pb::envoy::config::core::v3::{async_data_source, data_source};
    match vm.code.as_ref()?.specifier.as_ref()? {
        async_data_source::Specifier::Local(source) => match source.specifier.as_ref()? {
            data_source::Specifier::Filename(name) => Some(name),
            _ => None,
        },
        async_data_source::Specifier::Remote(_) => None,
    }
}

/// The environment variables Envoy hands the VM (names only).
pub fn vm_environment(vm: &VmConfig) -> HashSet<String> {
    vm.environment_variables
        .iter()
        .flat_map(|env| env.host_env_keys.iter().chain(env.key_values.keys()))
        .cloned()
        .collect()
}

/// The filter's JSON configuration, which must be a `StringValue` (Envoy
/// passes its contents to `on_configure` unwrapped).
pub fn plugin_configuration(plugin: &PluginConfig) -> Result<String, Error> {
    let any = plugin
        .configuration
        .as_ref()
        .ok_or_else(|| Error::Shape(format!("plugin {:?} has no configuration", plugin.name)))?;
    unpack::<String>(any).unwrap_or_else(|| {
        Err(Error::Shape(format!(
            "plugin {:?}: configuration is a {}, expected google.protobuf.StringValue",
            plugin.name, any.type_url
        )))
    })
}

/// Whether a transport socket's typed config is a TLS context of type `T`.
pub fn tls_context<T: Message + Name + Default>(
    socket: Option<&pb::config::core::v3::TransportSocket>,
) -> Option<Result<T, Error>> {
    match socket?.config_type.as_ref()? {
        transport_socket::ConfigType::TypedConfig(any) => unpack::<T>(any),
    }
}

/// Parses a plugin configuration with the filter's own parser, as
/// `on_configure` would: `env` holds the variables the VM is given, and a
/// `credential_env` naming anything else fails.
pub fn parse_plugin_config(
    json: &str,
    root_id: &str,
    env: &HashSet<String>,
) -> Result<PluginConfiguration, ConfigError> {
    PluginConfiguration::parse(json.as_bytes(), root_id, |name| {
        env.contains(name)
            .then(|| "example-sidecar-token".to_owned())
    })
}

/// The cluster (and authority) Envoy's `proxy_grpc_stream` would use for the
/// filter's `upstream`: like Envoy, first try it as a serialized
/// `GrpcService`, else take it as a cluster name.
pub fn grpc_upstream(upstream: &str) -> (String, Option<String>) {
    use envoy_types::pb::envoy::config::core::v3::{GrpcService, grpc_service};
    match GrpcService::decode(upstream.as_bytes()) {
        Ok(GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(g)),
            ..
        }) => (g.cluster_name, Some(g.authority).filter(|a| !a.is_empty())),
        _ => (upstream.to_owned(), None),
    }
}

/// Whether Envoy would bypass this plugin when its VM fails: the
/// deprecated `fail_open: true`, or `failure_policy: FAIL_OPEN`.
pub fn fails_open(plugin: &PluginConfig) -> bool {
    use envoy_types::pb::envoy::extensions::wasm::v3::FailurePolicy;
    // Envoy deprecated fail_open for failure_policy, but still honours it and
    // older Envoys know only it: both must be checked.
    #[allow(deprecated)]
    let fail_open = plugin.fail_open;
    fail_open || plugin.failure_policy == FailurePolicy::FailOpen as i32
}
