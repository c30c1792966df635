//! consent-benches: consent-mesh measured side by side with the engines and
//! architectures it replaces. `consent-bench` (src/bin) runs every section and
//! writes `benches/RESULTS.md` and its plots; `cargo bench -p consent-benches`
//! runs the criterion benches of the decision alone.
//!
//! Figures are compared as ratios measured in one run on one machine; nothing
//! here is a timed test.

use std::path::PathBuf;

pub mod bootstrap;
pub mod engines;
pub mod ext_authz;
pub mod fixtures;
pub mod machine;
pub mod per_request;
pub mod plot;
pub mod propagation;
pub mod report;
pub mod stats;

/// Where benches put consentd's database: tmpfs when the machine has one, so
/// that figures do not depend on the disk's fsync (the report says so).
pub fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(&shm).is_ok() {
        shm
    } else {
        std::env::temp_dir()
    }
}
