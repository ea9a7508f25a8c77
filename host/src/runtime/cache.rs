//! The on-disk cache of compiled components: compiling takes tens of
//! milliseconds, loading a cached artifact well under one.
//!
//! Artifacts are keyed by the .wasm content hash and the engine's settings
//! hash, so a stale or foreign artifact is never loaded; an unreadable one is
//! recompiled and replaced.
//!
//! Loading an artifact runs native code it contains, so the cache is
//! trusted only as far as it is verified: the directory is private (0700),
//! and each artifact has a keyed digest (HMAC-SHA-256 under a key of the
//! cache's own, 0600, over the plugin's hash and the artifact) beside it.
//! An artifact whose digest does not match, such as one copied over from
//! another plugin, is recompiled with a warning, never loaded.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The key file, beside the artifacts.
const KEY_FILE: &str = "cache.key";

pub fn load_or_compile(engine: &Engine, dir: &Path, hash: &str, wasm: &[u8]) -> Result<Component> {
    let mut engine_hash = DefaultHasher::new();
    engine
        .precompile_compatibility_hash()
        .hash(&mut engine_hash);
    let path = dir.join(format!("{hash}-{:016x}.cwasm", engine_hash.finish()));
    let key = match private_dir(dir).and_then(|()| cache_key(dir)) {
        Ok(key) => key,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "not using the component cache: {e:#}");
            return compile(engine, wasm);
        }
    };
    if path.exists() {
        match verified(&key, hash, &path) {
            // SAFETY: the bytes are what this cache stored for this plugin
            // (their keyed digest matches), written by `precompile_component`
            // of an engine with the same settings (the name carries their
            // hash); wasmtime still checks its header and version.
            Ok(bytes) => match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "recompiling unusable cached component: {e:#}")
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), "recompiling a cached component that failed verification: {e:#}")
            }
        }
    }
    let compiled = engine
        .precompile_component(wasm)
        .map_err(super::not_a_component)?;
    if let Err(e) = store(dir, &path, &compiled, &digest(&key, hash, &compiled)) {
        tracing::warn!(dir = %dir.display(), "cannot cache compiled component: {e:#}");
    }
    // SAFETY: the bytes were just produced by this engine.
    Ok(unsafe { Component::deserialize(engine, &compiled) }?)
}

fn compile(engine: &Engine, wasm: &[u8]) -> Result<Component> {
    Component::new(engine, wasm).map_err(super::not_a_component)
}

/// The artifact at `path`, if its digest file matches it.
fn verified(key: &[u8], hash: &str, path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    let stored = std::fs::read_to_string(digest_path(path)).context("no digest beside it")?;
    let stored = hex::decode(stored.trim()).context("its digest is not hex")?;
    let mut mac = keyed(key, hash);
    mac.update(&bytes);
    if mac.verify_slice(&stored).is_err() {
        bail!("its digest does not match (altered, or another plugin's)");
    }
    Ok(bytes)
}

fn keyed(key: &[u8], hash: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    // The plugin's hash is part of what is signed: an artifact is valid
    // only under the name of the .wasm it was compiled from.
    mac.update(hash.as_bytes());
    mac.update(b"\0");
    mac
}

fn digest(key: &[u8], hash: &str, artifact: &[u8]) -> String {
    let mut mac = keyed(key, hash);
    mac.update(artifact);
    hex::encode(mac.finalize().into_bytes())
}

fn digest_path(artifact: &Path) -> PathBuf {
    artifact.with_extension("cwasm.mac")
}

/// Creates the directory private to this user, or makes it so.
fn private_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// The cache's key, made (0600) the first time.
fn cache_key(dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(KEY_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            let key: [u8; 32] = rand::random();
            file.write_all(hex::encode(key).as_bytes())?;
            file.sync_all()?;
            Ok(key.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path)?;
            let key = hex::decode(text.trim()).ok().filter(|k| k.len() == 32);
            key.with_context(|| format!("{} is not a key", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Writes the artifact and then its digest, each via a temporary file and a
/// rename, so a concurrent reader never sees half of either (at worst a
/// digest that does not match yet, which only recompiles).
fn store(dir: &Path, path: &Path, artifact: &[u8], digest: &str) -> Result<()> {
    write_atomically(dir, path, artifact)?;
    write_atomically(dir, &digest_path(path), digest.as_bytes())
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_holds_only_for_its_plugin_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let key = cache_key(dir.path()).unwrap();
        assert_eq!(key, cache_key(dir.path()).unwrap(), "the key is kept");
        let path = dir.path().join("a.cwasm");
        store(
            dir.path(),
            &path,
            b"artifact",
            &digest(&key, "aaa", b"artifact"),
        )
        .unwrap();
        assert_eq!(verified(&key, "aaa", &path).unwrap(), b"artifact");
        // Another plugin's name, or altered bytes, do not verify.
        assert!(verified(&key, "bbb", &path).is_err());
        std::fs::write(&path, b"artifacT").unwrap();
        assert!(verified(&key, "aaa", &path).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn the_cache_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("components");
        private_dir(&cache).unwrap();
        cache_key(&cache).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&cache.join(KEY_FILE)), 0o600);
    }
}
