//! Rust plugins: a `cdylib` crate built by cargo for `wasm32-wasip2`, whose
//! output already is a component.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub fn build(project: &Path, out: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(project)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo")?;
    let mut artifact: Option<PathBuf> = None;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(path) = wasm_artifact(&line) {
            artifact = Some(path);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo build failed ({status}); if the target is missing: rustup target add wasm32-wasip2"
        );
    }
    let artifact = artifact
        .context("cargo built no .wasm: the crate needs `[lib] crate-type = [\"cdylib\"]`")?;
    std::fs::copy(&artifact, out)
        .with_context(|| format!("cannot copy {} to {}", artifact.display(), out.display()))?;
    Ok(())
}

/// The `.wasm` file of a `compiler-artifact` message from cargo.
fn wasm_artifact(line: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    message["filenames"]
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}
