//! The `sluice` binary: see [`sluice::cli`].

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: sluice::Allocator = sluice::Allocator;

fn main() -> ExitCode {
    sluice::cli::main()
}
