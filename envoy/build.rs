//! Passes the target triple to the library, so its `cargo metadata` call can
//! be limited to this platform and needs no other platform's packages (which
//! an offline machine does not have).

fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET for build scripts");
    println!("cargo:rustc-env=CONSENT_ENVOY_CONFIG_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
