//! consent-benches: consent-mesh measured side by side with the engines and
//! architectures it replaces. `consent-bench` (src/bin) runs every section and
//! writes `benches/RESULTS.md` and its plots; `cargo bench -p consent-benches`
//! runs the criterion benches of the decision alone.
//!
//! Figures are compared as ratios measured in one run on one machine; nothing
//! here is a timed test.

pub mod bootstrap;
pub mod propagation;
pub mod stats;
