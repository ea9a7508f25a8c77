//! The `sluice` command, as the integration tests run it: the same code as
//! the `sluice` binary, built in this package so a test can find it.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: sluice::Allocator = sluice::Allocator;

fn main() -> ExitCode {
    sluice::cli::main()
}
