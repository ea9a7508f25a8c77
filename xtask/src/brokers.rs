//! What the tests need for the backends whose servers do not run on the
//! machine already: an SQS/SNS emulator (moto), installed only when
//! missing; the tests start private servers of their own from it.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::process::run;

/// The SQS/SNS emulator the AWS tests run against.
const MOTO_REQUIREMENT: &str = "moto[server]==5.2.1";

/// Installs whatever is missing.
pub fn ensure() -> Result<()> {
    if !on_path("moto_server") {
        println!("==> installing the moto SQS/SNS emulator…");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", MOTO_REQUIREMENT]))?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .any(|dir| Path::new(&dir).join(program).is_file())
}
