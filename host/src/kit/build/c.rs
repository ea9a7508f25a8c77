//! C plugins: bindings generated from the `batch-handler` world
//! (wit-bindgen's C generator; the helper exports both `handle` and
//! `handle-batch`), the project's `.c` files and the `sluice.c` helper compiled
//! with clang for `wasm32-wasi` as a reactor, and the core module made into
//! a component with the WASI preview-1 reactor adapter.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};

use crate::kit::toolchain::C_PACKAGES;

pub fn build(project: &Path, stage: &Path, out: &Path) -> Result<()> {
    let generated = stage.join("c");
    std::fs::create_dir_all(&generated)?;
    generate_bindings(&generated)?;
    std::fs::write(generated.join("sluice.h"), crate::kit::C_HEADER)?;
    std::fs::write(generated.join("sluice.c"), crate::kit::C_SOURCE)?;

    let mut sources = Vec::new();
    find_c_sources(project, &mut sources)?;
    let core = stage.join("core.wasm");
    let clang = std::env::var_os("SLUICE_CLANG").unwrap_or_else(|| "clang".into());
    let output = Command::new(&clang)
        .args(["--target=wasm32-wasi", "-mexec-model=reactor", "-O2"])
        .args(["-Wall", "-Wno-unused-function"])
        .arg("-I")
        .arg(&generated)
        .arg("-I")
        .arg(project)
        .args(&sources)
        .arg(generated.join("batch_handler.c"))
        .arg(generated.join("sluice.c"))
        .arg(generated.join("batch_handler_component_type.o"))
        .arg("-o")
        .arg(&core)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run {}: {e} (C plugins need clang, wasm-ld and wasi-libc; on Debian: \
                 apt-get install {C_PACKAGES})",
                clang.to_string_lossy()
            )
        })?;
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("wasm-ld")
            || stderr.contains("stdio.h")
            || stderr.contains("libclang_rt")
        {
            format!(" (is the wasm toolchain installed? on Debian: apt-get install {C_PACKAGES})")
        } else {
            String::new()
        };
        bail!("clang failed ({}){hint}", output.status);
    }

    let module = std::fs::read(&core)?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .context("the compiled module carries no component type")?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .validate(true)
        .encode()
        .context("cannot turn the module into a component")?;
    std::fs::write(out, component)?;
    Ok(())
}

/// `batch_handler.h`, `batch_handler.c` and `batch_handler_component_type.o`
/// for the `batch-handler` world.
fn generate_bindings(dir: &Path) -> Result<()> {
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve.push_str("sluice.wit", crate::kit::WIT)?;
    let world = resolve.select_world(&[package], Some("batch-handler"))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)?;
    for (name, contents) in files.iter() {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}

/// Every `.c` file of the project, outside `target` and hidden directories.
fn find_c_sources(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || name == "target" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            find_c_sources(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "c") {
            found.push(path);
        }
    }
    found.sort();
    Ok(())
}
