//! `sluice build`: a plugin project, in any of the four languages, to a
//! component at `<project>/target/<name>.wasm`, checked against the world
//! by the host's own loader.
//!
//! Non-Rust builds work in `<project>/target/sluice/`: the WIT and the
//! language helper are written there, with a copy of the project's sources
//! (so helper files never land among the author's own). They are skipped
//! when nothing changed: `target/<name>.wasm.inputs` holds a hash of the
//! sources, the helper, the WIT (with Python's `wasi:http` WIT) and the
//! toolchain versions they were built from. Rust builds always run cargo,
//! which has its own notion of fresh.

mod c;
mod js;
mod python;
mod rust;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::Lang;
use super::toolchain::Toolchains;
use crate::runtime::{PluginSettings, Runtime, WORLD};

/// What to build and where.
pub struct BuildOptions {
    /// The project directory.
    pub project: PathBuf,
    /// Where the component goes; `<project>/target/<name>.wasm` by default.
    pub out: Option<PathBuf>,
    /// Where componentize-py and componentize-js are installed.
    pub toolchains: Toolchains,
    /// Build even if the inputs did not change since the last build.
    pub force: bool,
    /// Where the check caches the compiled component (none: not cached).
    pub cache_dir: Option<PathBuf>,
}

/// A component that was built and fits the world.
#[derive(Debug)]
pub struct Built {
    pub lang: Lang,
    pub wasm: PathBuf,
    /// The world it implements: `batch-handler` for every component the
    /// language helpers build.
    pub world: &'static str,
    pub size: u64,
    /// Wall time of the language build, without the world check.
    pub elapsed: Duration,
    /// Nothing changed since the last build, so it was not rebuilt.
    pub up_to_date: bool,
}

/// Builds the project and checks the result against the world.
pub fn build(options: &BuildOptions) -> Result<Built> {
    let project = options
        .project
        .canonicalize()
        .with_context(|| format!("no project at {}", options.project.display()))?;
    let lang = Lang::detect(&project)?;
    let name = project_name(&project)?;
    let out = match &options.out {
        Some(out) => out.clone(),
        None => project.join("target").join(format!("{name}.wasm")),
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let stamp = out.with_extension("wasm.inputs");
    let fingerprint = match lang {
        Lang::Rust => None,
        _ => Some(fingerprint(&project, lang)?),
    };
    if !options.force
        && out.is_file()
        && fingerprint.is_some()
        && std::fs::read_to_string(&stamp).ok() == fingerprint
    {
        // It passed the check when it was built from these very inputs.
        return Ok(Built {
            lang,
            world: crate::runtime::BATCH_WORLD,
            size: std::fs::metadata(&out)?.len(),
            wasm: out,
            elapsed: Duration::ZERO,
            up_to_date: true,
        });
    }
    let _ = std::fs::remove_file(&stamp);
    let started = Instant::now();
    match lang {
        Lang::Rust => rust::build(&project, &out),
        Lang::Python => python::build(&project, &stage(&project)?, &out, &options.toolchains),
        Lang::Js => js::build(&project, &stage(&project)?, &out, &options.toolchains),
        Lang::C => c::build(&project, &stage(&project)?, &out),
    }
    .with_context(|| format!("building the {lang} plugin in {}", project.display()))?;
    let elapsed = started.elapsed();
    let world = check(&out, &name, options.cache_dir.clone())?;
    if let Some(fingerprint) = fingerprint {
        std::fs::write(&stamp, fingerprint)?;
    }
    let size = std::fs::metadata(&out)?.len();
    Ok(Built {
        lang,
        wasm: out,
        world,
        size,
        elapsed,
        up_to_date: false,
    })
}

/// Loads the component the way the host does: compiled, linked against the
/// host's imports and checked to export the world's `handle` (and
/// `handle-batch`, if it has one, of the right type); answers the world it
/// implements.
pub fn check(wasm: &Path, name: &str, cache_dir: Option<PathBuf>) -> Result<&'static str> {
    let plugin = Runtime::new(cache_dir)?
        .load_file(wasm, PluginSettings::new(name))
        .with_context(|| format!("{} does not fit {WORLD}", wasm.display()))?;
    Ok(plugin.world())
}

/// The plugin's name: the project directory's, as a file name.
fn project_name(project: &Path) -> Result<String> {
    let name = project
        .file_name()
        .and_then(|n| n.to_str())
        .context("the project directory has no usable name")?;
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '/') {
        bail!("`{name}` cannot name a plugin");
    }
    Ok(name.to_string())
}

/// A hash of everything a non-Rust build reads: the project's files (but
/// `target/`), the helper and the WIT compiled into this binary (Python's
/// world and the `wasi:http` WIT with it), and the pinned toolchain
/// versions.
fn fingerprint(project: &Path, lang: Lang) -> Result<String> {
    let mut files = Vec::new();
    list_files(project, project, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    let python_world = python::world_wit();
    let wasi_http = super::WASI_HTTP_DEPS.iter().map(|(_, text)| *text);
    for part in [
        super::WIT,
        python_world.as_str(),
        super::PYTHON_HELPER,
        super::JS_HELPER,
        super::C_HEADER,
        super::C_SOURCE,
        super::toolchain::COMPONENTIZE_PY,
        super::toolchain::JS_LOCK,
    ]
    .into_iter()
    .chain(wasi_http)
    {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(lang.to_string());
    for relative in files {
        let contents = std::fs::read(project.join(&relative))?;
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn list_files(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if skipped(&name) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            list_files(root, &path, found)?;
        } else {
            found.push(path.strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

/// A fresh `target/sluice` with the world's WIT in `wit/`.
fn stage(project: &Path) -> Result<PathBuf> {
    let stage = project.join("target").join("sluice");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("wit"))
        .with_context(|| format!("cannot create {}", stage.display()))?;
    std::fs::write(stage.join("wit").join("sluice.wit"), super::WIT)?;
    Ok(stage)
}

/// Copies the project's files with one of `extensions` into `dest`, keeping
/// subdirectories, skipping `target`, `node_modules` and hidden ones.
fn copy_sources(project: &Path, dest: &Path, extensions: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(project)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if skipped(&name) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_sources(&path, &dest.join(&*name), extensions)?;
        } else if extensions
            .iter()
            .any(|ext| path.extension().is_some_and(|e| e == *ext))
        {
            std::fs::copy(&path, dest.join(&*name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}

/// Directories and files a build never reads: hidden ones, build outputs,
/// installed packages, Python caches, and unit tests (`test_*.py`,
/// `*.test.js`), which run natively and have no place in the component.
fn skipped(name: &str) -> bool {
    name.starts_with('.')
        || matches!(name, "target" | "node_modules" | "__pycache__")
        || (name.starts_with("test_") && name.ends_with(".py"))
        || name.ends_with(".test.js")
        || name.ends_with(".test.mjs")
}
