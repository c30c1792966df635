//! Generates the prost message types from `proto/` without a `protoc` binary.
//! Only messages are generated here; the tonic service code lives in the
//! control plane so the wasm filter never links tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/consent/v1/types.proto",
        "proto/consent/v1/sync.proto",
        "proto/consent/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
