//! The on-disk cache of compiled components: compiling takes tens of
//! milliseconds, loading a cached artifact well under one.
//!
//! Artifacts are keyed by the .wasm content hash and the engine's settings
//! hash, so a stale or foreign artifact is never loaded; an unreadable one is
//! recompiled and replaced.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;

use anyhow::Result;
use wasmtime::Engine;
use wasmtime::component::Component;

pub fn load_or_compile(engine: &Engine, dir: &Path, hash: &str, wasm: &[u8]) -> Result<Component> {
    let mut engine_hash = DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let path = dir.join(format!("{hash}-{:016x}.cwasm", engine_hash.finish()));
    if path.exists() {
        // SAFETY: the file was written by `precompile_component` of an engine
        // with the same settings (the name carries their hash) into Sluice's
        // own cache directory; wasmtime still checks its header and version.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), "recompiling unusable cached component: {e:#}")
            }
        }
    }
    let compiled = engine
        .precompile_component(wasm)
        .map_err(super::not_a_component)?;
    if let Err(e) = store_atomically(dir, &path, &compiled) {
        tracing::warn!(dir = %dir.display(), "cannot cache compiled component: {e:#}");
    }
    // SAFETY: the bytes were just produced by this engine.
    Ok(unsafe { Component::deserialize(engine, &compiled) }?)
}

/// Writes via a temporary file and a rename, so a concurrent reader never
/// sees half an artifact.
fn store_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
