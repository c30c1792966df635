//! The release module must import nothing Envoy lacks: older Envoy builds
//! refuse a module with any other import. Reads the built artefact; a missing
//! one fails the test with the command that builds it (never a silent skip).

use std::path::PathBuf;

use wasmparser::{Parser, Payload, TypeRef};

const BUILD: &str = "cargo build -p consent-filter --target wasm32-wasip1 --profile wasm-release";

/// proxy-wasm ABI 0.2.1 host functions (module `env`).
const PROXY_WASM_0_2_1: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
];

/// The WASI preview1 calls Envoy provides.
const WASI_IN_ENVOY: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_seek",
    "fd_close",
    "fd_fdstat_get",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "clock_time_get",
    "random_get",
    "proc_exit",
    "path_open",
    "fd_prestat_get",
    "fd_prestat_dir_name",
];

/// `CONSENT_FILTER_WASM`, else `<target dir>/wasm32-wasip1/wasm-release/`,
/// the target dir being the one this test binary was built into (so it
/// follows `CARGO_TARGET_DIR`).
fn artefact() -> PathBuf {
    if let Some(path) = std::env::var_os("CONSENT_FILTER_WASM") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary has a path");
    // <target>/<profile>/deps/<test binary>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary sits in <target>/<profile>/deps");
    target.join("wasm32-wasip1/wasm-release/consent_filter.wasm")
}

#[test]
fn the_release_module_imports_only_what_envoy_provides() {
    let path = artefact();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}). Build the release module first, with the same \
             CARGO_TARGET_DIR as this test: `{BUILD}` (or point CONSENT_FILTER_WASM at it)",
            path.display()
        )
    });
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.expect("the module parses") {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.expect("an import entry parses");
                    imports.push((import.module.to_owned(), import.name.to_owned(), import.ty));
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    exports.push(export.expect("an export entry parses").name.to_owned());
                }
            }
            _ => {}
        }
    }
    let unexpected: Vec<String> = imports
        .iter()
        .filter(|(module, name, ty)| {
            let allowed = match module.as_str() {
                "env" => PROXY_WASM_0_2_1.contains(&name.as_str()),
                "wasi_snapshot_preview1" => WASI_IN_ENVOY.contains(&name.as_str()),
                _ => false,
            };
            !allowed || !matches!(ty, TypeRef::Func(_))
        })
        .map(|(module, name, _)| format!("{module}.{name}"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "imports Envoy does not provide: {unexpected:?}"
    );
    assert!(
        imports.iter().any(|(_, n, _)| n == "proxy_get_shared_data"),
        "{imports:?}"
    );
    for required in ["proxy_abi_version_0_2_1", "_initialize", "memory"] {
        assert!(
            exports.iter().any(|e| e == required),
            "missing export {required}: {exports:?}"
        );
    }
    assert!(
        exports
            .iter()
            .any(|e| e == "malloc" || e == "proxy_on_memory_allocate"),
        "no allocator export: {exports:?}"
    );
}
