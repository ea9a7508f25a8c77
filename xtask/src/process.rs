//! Running the programs the tasks are made of: where the repository is,
//! which cargo to call, and how a failed step becomes the task's exit status.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

use anyhow::{Context, Result};

/// A step that ran and failed; `main` exits with its status.
#[derive(Debug)]
pub struct Failed {
    pub step: String,
    pub code: i32,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed with exit status {}", self.step, self.code)
    }
}

impl std::error::Error for Failed {}

/// The repository root: the parent of this package.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask package lives inside the repository")
        .to_path_buf()
}

/// The guest workspace.
pub fn plugins_dir() -> PathBuf {
    root().join("plugins")
}

/// A cargo command run from the repository root. Under `cargo xtask`, cargo
/// names itself in `CARGO`, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(root());
    command
}

/// Runs a command with the terminal attached; an error if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let step = describe(command);
    println!("$ {step}");
    let status = command
        .status()
        .with_context(|| format!("cannot start `{step}`"))?;
    check(step, status)
}

/// Runs a command and keeps what it prints; an error if it fails, with its
/// stderr, since the caller would otherwise swallow it.
pub fn capture(command: &mut Command) -> Result<Output> {
    let step = describe(command);
    let output = command
        .output()
        .with_context(|| format!("cannot start `{step}`"))?;
    if !output.status.success() {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
    }
    check(step, output.status)?;
    Ok(output)
}

/// Runs every command even after one fails, so one run reports every
/// problem; the first failure decides the outcome.
pub fn run_all(commands: impl IntoIterator<Item = Command>) -> Result<()> {
    let mut first_failure = None;
    let mut commands = commands.into_iter().peekable();
    while let Some(mut command) = commands.next() {
        if let Err(error) = run(&mut command) {
            if commands.peek().is_some() {
                eprintln!("==> {error:#}; carrying on with the remaining steps");
            }
            first_failure.get_or_insert(error);
        }
    }
    first_failure.map_or(Ok(()), Err)
}

fn check(step: String, status: ExitStatus) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    // Killed by a signal: no code, but still a failure.
    let code = status.code().unwrap_or(1);
    Err(Failed { step, code }.into())
}

/// The command as one would type it, relative to the repository root.
fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program())
        .file_name()
        .unwrap_or(command.get_program())
        .to_string_lossy()
        .into_owned();
    let mut words = vec![program];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    let line = words.join(" ");
    match command.get_current_dir() {
        Some(dir) if dir != root() => {
            let dir = dir.strip_prefix(root()).unwrap_or(dir);
            format!("(cd {} && {line})", dir.display())
        }
        _ => line,
    }
}
