//! Generates the tonic service code for the admin API and the sync stream from
//! consent-core's protos, without a `protoc` binary. The messages themselves
//! come from consent-core (`extern_path`), so the wire types exist once. The
//! encoded descriptor set is kept for server reflection.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../core/proto");
    let files = [
        "consent/v1/types.proto",
        "consent/v1/sync.proto",
        "consent/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("consent_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".consent.v1", "::consent_core::wire::v1")
        .compile_fds(descriptors)?;
    Ok(())
}
