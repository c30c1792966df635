//! Errors of the sidecar simulator.

/// Why a sidecar could not start or a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot read wasm module {path}: {source}")]
    ReadModule {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid wasm module: {0}")]
    Compile(String),
    #[error("module does not export proxy_abi_version_0_2_1 (only ABI 0.2.1 is supported)")]
    MissingAbiVersion,
    #[error("module imports {module}.{name}, which Envoy does not provide")]
    UnsupportedImport { module: String, name: String },
    #[error("module exports neither malloc nor proxy_on_memory_allocate")]
    MissingAllocator,
    #[error("cannot instantiate module: {0}")]
    Instantiate(String),
    #[error("module start-up failed on the {vm} VM: {message}")]
    StartFailed { vm: String, message: String },
    #[error("plugin configuration rejected on the {vm} VM: {callback} returned false")]
    ConfigurationRejected { vm: String, callback: &'static str },
    #[error("{vm} VM trapped in {callback}: {message}")]
    Trap {
        vm: String,
        callback: String,
        message: String,
    },
    #[error("no worker {0}")]
    NoSuchWorker(usize),
    #[error("the sidecar has stopped")]
    Stopped,
    #[error("no response within {0:?} (is the stream still paused?)")]
    Timeout(std::time::Duration),
    #[error("invalid configuration: {0}")]
    Config(String),
}
