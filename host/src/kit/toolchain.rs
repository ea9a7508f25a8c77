//! Where the language toolchains come from. componentize-py and
//! componentize-js are installed on first use, at the versions Sluice is
//! tested with, into a toolchain directory: `$SLUICE_TOOLCHAINS`, or
//! `~/.cache/sluice/toolchains`. C needs clang, wasm-ld and wasi-libc from
//! the system; Rust needs cargo and the `wasm32-wasip2` target.
//!
//! Installs hold a lock file, so builds running side by side install once.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The componentize-py release plugins are built and tested with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// The npm manifest and lock file pinning componentize-js.
const JS_PACKAGE: &str = include_str!("../../../sdk/js/package.json");
pub(crate) const JS_LOCK: &str = include_str!("../../../sdk/js/package-lock.json");

/// The Debian packages a C plugin build needs.
pub const C_PACKAGES: &str = "clang lld wasi-libc libclang-rt-14-dev-wasm32";

/// The toolchain directory.
pub struct Toolchains {
    dir: PathBuf,
}

impl Toolchains {
    /// `$SLUICE_TOOLCHAINS`, else the user's cache directory.
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os("SLUICE_TOOLCHAINS") {
            Some(dir) => PathBuf::from(dir),
            None => dirs::cache_dir()
                .context("no cache directory; set SLUICE_TOOLCHAINS")?
                .join("sluice")
                .join("toolchains"),
        };
        Ok(Toolchains { dir })
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Toolchains { dir: dir.into() }
    }

    /// The `componentize-py` program, installed into a venv if missing.
    pub fn componentize_py(&self) -> Result<PathBuf> {
        let venv = self.dir.join("python");
        let program = venv.join("bin").join("componentize-py");
        let stamp = venv.join(format!(".componentize-py-{COMPONENTIZE_PY}"));
        self.install_once(&stamp, || {
            let _ = std::fs::remove_dir_all(&venv);
            eprintln!(
                "installing componentize-py {COMPONENTIZE_PY} into {}",
                venv.display()
            );
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
                "cannot create a Python venv (Python 3.10 or later with venv is needed)",
            )?;
            run(Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("componentize-py=={COMPONENTIZE_PY}")))
            .context("cannot install componentize-py from PyPI")
        })?;
        Ok(program)
    }

    /// componentize-js's command-line script, run with `node`; installed
    /// with `npm ci` from Sluice's lock file if missing.
    pub fn componentize_js(&self) -> Result<PathBuf> {
        let dir = self.dir.join("js");
        let script = dir.join("node_modules/@bytecodealliance/componentize-js/src/cli.js");
        let stamp = dir.join(format!(
            ".lock-{}",
            &crate::runtime::hash(JS_LOCK.as_bytes())[..16]
        ));
        self.install_once(&stamp, || {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("package.json"), JS_PACKAGE)?;
            std::fs::write(dir.join("package-lock.json"), JS_LOCK)?;
            eprintln!("installing componentize-js into {}", dir.display());
            run(Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir))
            .context("cannot install componentize-js with npm (Node.js 18 or later is needed)")
        })?;
        Ok(script)
    }

    /// Runs `install` unless `stamp` exists, under the directory's lock;
    /// writes the stamp when it succeeds.
    fn install_once(&self, stamp: &Path, install: impl FnOnce() -> Result<()>) -> Result<()> {
        if stamp.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let lock = File::create(self.dir.join(".lock"))?;
        lock.lock()
            .with_context(|| format!("cannot lock {}", self.dir.display()))?;
        if !stamp.exists() {
            install()?;
            std::fs::write(stamp, "")?;
        }
        Ok(())
    }
}

/// Runs a program to completion; an error naming it if it fails.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command.status().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("`{program}` not found on PATH")
        } else {
            anyhow::anyhow!("cannot start `{program}`: {e}")
        }
    })?;
    if !status.success() {
        bail!("`{program}` failed ({status})");
    }
    Ok(())
}
