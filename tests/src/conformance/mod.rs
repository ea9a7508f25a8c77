//! The conformance suite: the behaviours every backend must show.
//!
//! The contract cases ([`cases`]) are ported from the behaviours
//! Watermill's universal Pub/Sub tests check, in Sluice's terms; the host
//! cases ([`host_cases`]) run the full router with a real WebAssembly
//! plugin. A caller pins the capabilities it expects of its backend
//! ([`pinned`]): the suite checks the backend declares exactly those, and a
//! case that needs one it lacks is reported as "n/a" with the reason —
//! never hidden as a pass.
//!
//! Each backend's results are printed as a table (visible with
//! `--nocapture`) and written to `target/tmp/conformance/<backend>.tsv`,
//! which `cargo xtask test` prints as one table. Set
//! `SLUICE_CONFORMANCE_STRESS=N` to run the whole suite N times in parallel
//! per backend, and `SLUICE_CONFORMANCE_CASES=a,b` to run only the cases
//! named.

pub mod cases;
pub mod harness;
pub mod host_cases;
pub mod targets;

pub use harness::{pinned, run_suite};
pub use targets::Target;
