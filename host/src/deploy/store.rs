//! Every plugin version the host ran, kept by content hash beside the
//! compiled-component cache, and which version each plugin last ran. When a
//! plugin's configured file is broken at start (a bad upload that was
//! refused, then a crash), the host starts from the last good version
//! instead of exiting and leaving the route down.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The source a slot shows when it runs the stored version because its file
/// was refused.
pub const LAST_GOOD: &str = "last-good";

#[derive(Clone)]
pub struct VersionStore {
    dir: PathBuf,
}

impl VersionStore {
    /// A store in `dir` (made on first write).
    pub fn new(dir: PathBuf) -> Self {
        VersionStore { dir }
    }

    /// Remembers that plugin `name` ran the component `wasm` (of `hash`).
    pub fn record(&self, name: &str, hash: &str, wasm: &[u8]) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let component = self.component(hash);
        if !component.exists() {
            write_atomically(&self.dir, &component, wasm)?;
        }
        write_atomically(&self.dir, &self.pointer(name), hash.as_bytes())
    }

    /// The version plugin `name` last ran, as its hash and bytes, if the
    /// store has it intact.
    pub fn last_good(&self, name: &str) -> Result<Option<(String, Vec<u8>)>> {
        let hash = match std::fs::read_to_string(self.pointer(name)) {
            Ok(hash) => hash.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let wasm = std::fs::read(self.component(&hash))
            .with_context(|| format!("the stored version {hash} is missing"))?;
        if crate::runtime::hash(&wasm) != hash {
            bail!("the stored version {hash} is damaged");
        }
        Ok(Some((hash, wasm)))
    }

    fn component(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.wasm"))
    }

    /// Plugin names are config keys, which may hold any character; hex
    /// keeps each its own file name.
    fn pointer(&self, name: &str) -> PathBuf {
        self.dir.join(format!("last-{}", hex::encode(name)))
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::now_v7()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_recorded_version_comes_back_intact_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = VersionStore::new(dir.path().join("versions"));
        assert!(store.last_good("p").unwrap().is_none());
        let (one, two) = (b"version one".as_slice(), b"version two".as_slice());
        let hash = |w: &[u8]| crate::runtime::hash(w);
        store.record("p", &hash(one), one).unwrap();
        store.record("p", &hash(two), two).unwrap();
        store.record("other/plugin", &hash(one), one).unwrap();
        assert_eq!(
            store.last_good("p").unwrap(),
            Some((hash(two), two.to_vec()))
        );
        assert_eq!(
            store.last_good("other/plugin").unwrap(),
            Some((hash(one), one.to_vec()))
        );
        std::fs::write(store.component(&hash(two)), b"tampered").unwrap();
        assert!(store.last_good("p").is_err());
    }
}
