//! What Sluice's integration tests share, as a library:
//!
//! - [`conformance`]: the behaviours every backend must show, run against
//!   a [`conformance::Target`] by [`conformance::run_suite`]; an outside
//!   backend runs the same suite by implementing `Target` for itself;
//! - [`common`]: the example plugins built on demand, routes run against a
//!   backend, what they publish collected, and the `sluice` command run as
//!   a process.
//!
//! The tests themselves are in `integration/`, one binary with a module
//! per area.

pub mod common;
pub mod conformance;
