//! Every deployment file in `envoy/` is checked: Envoy bootstraps against
//! Envoy's own API schema (envoy-types' descriptor set, strict), every
//! embedded plugin configuration by the filter's own parser, every `.wasm`
//! path against the build artefact's name, and the Istio resources against
//! strict mirrors of Istio's API. A file of a kind nobody checks fails.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use consent_core::Permission;
use consent_envoy_config::istio::{
    DestinationRuleSpec, EnvoyFilterSpec, FailStrategy, PluginPhase, Resource, ServiceEntrySpec,
    ServiceSpec, TlsMode, WasmPluginSpec, WorkloadMode,
};
use consent_envoy_config::pb::config::bootstrap::v3::Bootstrap;
use consent_envoy_config::pb::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use consent_envoy_config::pb::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options, http_protocol_options::explicit_http_config,
};
use consent_envoy_config::{
    BOOTSTRAP, Error, PluginConfiguration, WASM_FILE_NAME, fails_open, grpc_upstream,
    load_bootstrap, load_yaml, local_code_file, parse_dynamic, parse_plugin_config,
    plugin_configuration, tls_context, unpack, vm_config, vm_environment,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML file under `envoy/`, sorted.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root(), &mut files);
    files.sort();
    files
}

#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum Kind {
    Bootstrap,
    Kubernetes,
    Compose,
}

fn kind_of(path: &Path, document: &serde_json::Value) -> Kind {
    if document.get("static_resources").is_some() {
        Kind::Bootstrap
    } else if document.get("apiVersion").is_some() && document.get("kind").is_some() {
        Kind::Kubernetes
    } else if document.get("services").is_some() {
        Kind::Compose
    } else {
        panic!(
            "{}: a YAML document of a kind no test checks",
            path.display()
        )
    }
}

fn files_of(kind: Kind) -> Vec<PathBuf> {
    let files: Vec<PathBuf> = yaml_files()
        .into_iter()
        .filter(|p| load_yaml(p).unwrap().iter().any(|d| kind_of(p, d) == kind))
        .collect();
    assert!(
        !files.is_empty(),
        "no {kind:?} file found under {}",
        root().display()
    );
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_yaml_file_is_of_a_checked_kind() {
    let files = yaml_files();
    let mut kinds = HashSet::new();
    for path in &files {
        let documents = load_yaml(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!documents.is_empty(), "{}: empty", relative(path));
        for document in &documents {
            kinds.insert(kind_of(path, document));
        }
    }
    assert_eq!(
        kinds.len(),
        3,
        "expected bootstraps, Kubernetes resources and a compose file"
    );
}

/// The plugins of a bootstrap, each with its parsed configuration.
fn plugins(path: &Path, bootstrap: &Bootstrap) -> Vec<(String, PluginConfiguration)> {
    let mut found = Vec::new();
    for chain in consent_envoy_config::http_chains(bootstrap).unwrap() {
        let names = chain.filter_names();
        let at = format!("{} listener {}", relative(path), chain.listener);
        assert_eq!(
            names.last(),
            Some(&"envoy.filters.http.router"),
            "{at}: router must be last"
        );
        for (position, wasm) in chain.wasm_filters().unwrap() {
            assert_eq!(names[position], "envoy.filters.http.wasm", "{at}");
            assert!(
                position + 1 < names.len(),
                "{at}: the wasm filter must come before the router"
            );
            let plugin = wasm
                .config
                .as_ref()
                .unwrap_or_else(|| panic!("{at}: wasm without config"));
            assert!(
                !fails_open(plugin),
                "{at}: the consent filter must fail closed"
            );
            let vm = vm_config(plugin).unwrap_or_else(|| panic!("{at}: no vm_config"));
            assert_eq!(vm.runtime, "envoy.wasm.runtime.v8", "{at}");
            let file =
                local_code_file(vm).unwrap_or_else(|| panic!("{at}: code is not a local file"));
            assert_eq!(
                file.rsplit('/').next(),
                Some(WASM_FILE_NAME),
                "{at}: loads {file}"
            );
            let json = plugin_configuration(plugin).unwrap_or_else(|e| panic!("{at}: {e}"));
            let config = parse_plugin_config(&json, &plugin.root_id, &vm_environment(vm))
                .unwrap_or_else(|e| panic!("{at}: plugin {:?}: {e}", plugin.name));
            found.push((at.clone(), config));
        }
    }
    assert!(!found.is_empty(), "{}: no consent filter", relative(path));
    found
}

#[test]
fn bootstraps_are_valid_envoy_config_with_a_fail_closed_consent_filter() {
    for path in files_of(Kind::Bootstrap) {
        let bootstrap = load_bootstrap(&path).unwrap_or_else(|e| panic!("{e}"));
        let clusters = &bootstrap.static_resources.as_ref().unwrap().clusters;
        for (at, config) in plugins(&path, &bootstrap) {
            let (name, _) = grpc_upstream(&config.control_plane.upstream);
            let cluster = clusters.iter().find(|c| c.name == name).unwrap_or_else(|| {
                panic!("{at}: control plane cluster {name} not in the bootstrap")
            });
            let options = cluster
                .typed_extension_protocol_options
                .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
                .and_then(unpack::<HttpProtocolOptions>)
                .unwrap_or_else(|| {
                    panic!("{at}: cluster {} has no HttpProtocolOptions", cluster.name)
                })
                .unwrap();
            let Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
                options.upstream_protocol_options
            else {
                panic!(
                    "{at}: cluster {} must use explicit HTTP/2 for gRPC",
                    cluster.name
                )
            };
            let Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(h2)) =
                explicit.protocol_config
            else {
                panic!("{at}: cluster {} must speak HTTP/2", cluster.name)
            };
            assert!(
                h2.connection_keepalive.is_some(),
                "{at}: HTTP/2 keepalive for the sync stream"
            );
        }
    }
}

#[test]
fn the_sidecar_bootstraps_use_mtls_with_spiffe_sans() {
    for name in ["inbound-sidecar.yaml", "egress-sidecar.yaml"] {
        let path = root().join("bootstrap").join(name);
        let bootstrap = load_bootstrap(&path).unwrap_or_else(|e| panic!("{e}"));
        let resources = bootstrap.static_resources.unwrap();
        for cluster in resources
            .clusters
            .iter()
            .filter(|c| c.name != "records_app")
        {
            let tls = tls_context::<UpstreamTlsContext>(cluster.transport_socket.as_ref())
                .unwrap_or_else(|| panic!("{name}: cluster {} without TLS", cluster.name))
                .unwrap();
            let common = tls.common_tls_context.unwrap();
            assert!(
                !common.tls_certificates.is_empty(),
                "{name}: {}: client cert",
                cluster.name
            );
            let debug = format!("{common:?}");
            assert!(
                debug.contains("spiffe://"),
                "{name}: {}: no SPIFFE SAN match",
                cluster.name
            );
        }
    }
    let inbound = load_bootstrap(&root().join("bootstrap/inbound-sidecar.yaml")).unwrap();
    let listener = &inbound.static_resources.unwrap().listeners[0];
    let socket = listener.filter_chains[0].transport_socket.as_ref();
    let tls = tls_context::<
        consent_envoy_config::pb::extensions::transport_sockets::tls::v3::DownstreamTlsContext,
    >(socket)
    .expect("the inbound listener terminates TLS")
    .unwrap();
    assert_eq!(
        tls.require_client_certificate.map(|b| b.value),
        Some(true),
        "inbound must require client certs"
    );
}

#[test]
fn the_example_routes_read_write_process_and_share() {
    let inbound = load_bootstrap(&root().join("bootstrap/inbound-sidecar.yaml")).unwrap();
    let path = root().join("bootstrap/inbound-sidecar.yaml");
    let (_, config) = plugins(&path, &inbound).remove(0);
    let routes = config.routes.routes();
    let actions: HashSet<&str> = routes.iter().map(|r| r.action.as_str()).collect();
    assert!(
        actions.contains("read") && actions.contains("write"),
        "{actions:?}"
    );
    assert!(routes.iter().any(|r| r.permission == Permission::Process));

    let path = root().join("bootstrap/egress-sidecar.yaml");
    let egress = load_bootstrap(&path).unwrap();
    let (_, config) = plugins(&path, &egress).remove(0);
    let routes = config.routes.routes();
    assert!(!routes.is_empty() && routes.iter().all(|r| r.permission == Permission::Share));
}

fn resources() -> Vec<(PathBuf, Resource)> {
    let mut all = Vec::new();
    for path in files_of(Kind::Kubernetes) {
        for document in load_yaml(&path).unwrap() {
            let resource: Resource = serde_json::from_value(document)
                .unwrap_or_else(|e| panic!("{}: {e}", relative(&path)));
            all.push((path.clone(), resource));
        }
    }
    all
}

#[test]
fn istio_resources_are_well_formed_and_wasm_plugins_fail_closed() {
    let mut modes = HashSet::new();
    let mut services = HashSet::new();
    let mut plugin_clusters = Vec::new();
    for (path, resource) in resources() {
        let at = format!(
            "{} {} {}",
            relative(&path),
            resource.kind,
            resource.metadata.name
        );
        match resource.kind.as_str() {
            "WasmPlugin" => {
                assert_eq!(resource.api_version, "extensions.istio.io/v1alpha1", "{at}");
                let spec: WasmPluginSpec = resource.spec().unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(spec.phase, Some(PluginPhase::Authz), "{at}");
                assert_eq!(spec.fail_strategy, Some(FailStrategy::FailClose), "{at}");
                assert!(
                    spec.selector.is_some(),
                    "{at}: a selector, never the whole namespace"
                );
                assert!(
                    spec.url.ends_with(&format!("/{WASM_FILE_NAME}")),
                    "{at}: {}",
                    spec.url
                );
                modes.extend(spec.matches.iter().filter_map(|m| m.mode));
                let env: HashSet<String> = spec
                    .vm_config
                    .iter()
                    .flat_map(|vm| &vm.env)
                    .map(|e| e.name.clone())
                    .collect();
                let json =
                    serde_json::to_string(spec.plugin_config.as_ref().expect("pluginConfig"))
                        .unwrap();
                let root_id = spec.plugin_name.as_deref().unwrap_or("");
                let config = parse_plugin_config(&json, root_id, &env)
                    .unwrap_or_else(|e| panic!("{at}: pluginConfig: {e}"));
                let (cluster, authority) = grpc_upstream(&config.control_plane.upstream);
                let host = cluster.rsplit('|').next().unwrap_or_default().to_owned();
                assert_eq!(
                    authority,
                    Some(host),
                    "{at}: authority must name the service"
                );
                plugin_clusters.push((at, cluster));
            }
            "EnvoyFilter" => {
                let spec: EnvoyFilterSpec = resource.spec().unwrap_or_else(|e| panic!("{e}"));
                for patch in &spec.config_patches {
                    assert_eq!(patch.apply_to, "HTTP_FILTER", "{at}");
                    parse_dynamic(
                        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
                        &patch.patch.value,
                    )
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                }
            }
            "DestinationRule" => {
                let spec: DestinationRuleSpec = resource.spec().unwrap_or_else(|e| panic!("{e}"));
                let tls = spec
                    .traffic_policy
                    .tls
                    .unwrap_or_else(|| panic!("{at}: no TLS"));
                assert!(
                    matches!(tls.mode, TlsMode::IstioMutual | TlsMode::Mutual),
                    "{at}"
                );
            }
            "ServiceEntry" => {
                let spec: ServiceEntrySpec = resource.spec().unwrap_or_else(|e| panic!("{e}"));
                for port in spec.ports {
                    for host in &spec.hosts {
                        services.insert(format!("outbound|{}||{host}", port.number.unwrap()));
                    }
                }
            }
            "Service" => {
                let spec: ServiceSpec = resource.spec().unwrap_or_else(|e| panic!("{e}"));
                let namespace = resource.metadata.namespace.as_deref().unwrap_or("default");
                let host = format!("{}.{namespace}.svc.cluster.local", resource.metadata.name);
                for port in spec.ports {
                    services.insert(format!("outbound|{}||{host}", port.port.unwrap()));
                }
            }
            "PeerAuthentication" => {
                assert_eq!(resource.spec["mtls"]["mode"], "STRICT", "{at}");
            }
            other => panic!("{at}: no check for kind {other}"),
        }
    }
    assert!(
        modes.contains(&WorkloadMode::Server),
        "an inbound (SERVER) plugin"
    );
    assert!(
        modes.contains(&WorkloadMode::Client),
        "an egress (CLIENT) plugin"
    );
    // Each plugin's control-plane cluster is one the manifests create.
    for (at, cluster) in plugin_clusters {
        assert!(
            services.contains(&cluster),
            "{at}: {cluster} is not in {services:?}"
        );
    }
}

#[test]
fn the_compose_example_mounts_the_built_filter_where_envoy_loads_it() {
    for path in files_of(Kind::Compose) {
        let compose = load_yaml(&path).unwrap().remove(0);
        let envoy = &compose["services"]["envoy"];
        let volumes: Vec<&str> = envoy["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let wasm = volumes
            .iter()
            .find(|v| v.contains(WASM_FILE_NAME))
            .unwrap_or_else(|| panic!("{}: no .wasm mount", relative(&path)));
        let parts: Vec<&str> = wasm.split(':').collect();
        assert!(
            parts[0].ends_with("target/wasm32-wasip1/wasm-release/consent_filter.wasm"),
            "{wasm}"
        );
        let config_mount = volumes
            .iter()
            .find(|v| v.ends_with(":/etc/envoy/envoy.yaml:ro"))
            .unwrap();
        let bootstrap_path = path
            .parent()
            .unwrap()
            .join(config_mount.split(':').next().unwrap());
        let bootstrap = load_bootstrap(&bootstrap_path).unwrap_or_else(|e| panic!("{e}"));
        let mut loaded = Vec::new();
        for chain in consent_envoy_config::http_chains(&bootstrap).unwrap() {
            for (_, wasm) in chain.wasm_filters().unwrap() {
                let vm = vm_config(wasm.config.as_ref().unwrap()).unwrap();
                loaded.push(local_code_file(vm).unwrap().to_owned());
            }
        }
        assert_eq!(loaded, vec![parts[1].to_owned()], "{}", relative(&path));
    }
}

/// Replaces `from` on the first line that holds it outside a YAML comment.
fn edit_config_line(text: &str, from: &str, to: &str) -> String {
    let mut done = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if !done && !line.trim_start().starts_with('#') && line.contains(from) {
                done = true;
                line.replacen(from, to, 1)
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(done, "{from:?} is not in the file");
    lines.join("\n")
}

/// The check above can fail: a misspelled field, a wrong type, an unknown
/// field inside an `Any` and a bad plugin configuration are all refused.
#[test]
fn mistakes_are_refused() {
    let path = root().join("bootstrap/inbound-sidecar.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let parse = |text: &str| -> Result<Bootstrap, Error> {
        let value: serde_json::Value = serde_yaml::from_str(text).unwrap();
        consent_envoy_config::parse_typed(&value)
    };
    assert!(parse(&text).is_ok());
    let cases = [
        (
            "connect_timeout: 1s",
            "conect_timeout: 1s",
            "conect_timeout",
        ),
        ("port_value: 8080", "port_value: eighty", "port_value"),
        ("fail_open: false", "fail_opne: false", "fail_opne"),
        (
            "require_client_certificate: true",
            "require_client_cert: true",
            "require_client_cert",
        ),
    ];
    for (from, to, named) in cases {
        let err = parse(&edit_config_line(&text, from, to))
            .expect_err(to)
            .to_string();
        assert!(
            err.contains(named) && err.contains(BOOTSTRAP),
            "{to}: {err}"
        );
    }
    let bad_plugin = edit_config_line(
        &text,
        "\"permission\": \"access\"",
        "\"permission\": \"admin\"",
    );
    let bootstrap = parse(&bad_plugin).unwrap();
    let chain = consent_envoy_config::http_chains(&bootstrap)
        .unwrap()
        .remove(0);
    let (_, wasm) = chain.wasm_filters().unwrap().remove(0);
    let plugin = wasm.config.unwrap();
    let json = plugin_configuration(&plugin).unwrap();
    let env = vm_environment(vm_config(&plugin).unwrap());
    let err = parse_plugin_config(&json, "consent_filter", &env).unwrap_err();
    assert_eq!(err.field, "routes[0].permission");
}
