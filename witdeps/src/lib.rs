//! Puts the `wasi:messaging@0.2.0-draft` WIT where the host's bindings and
//! the example guests are generated from, without a copy of it in the
//! repository.
//!
//! The interface is WebAssembly/wasi-messaging at commit
//! `4ee59bb881f7a8675fbb3ae7ca5d5d586ab88657` (`wit/` is unchanged up to
//! that repository's last commit): the synchronous draft that wasmCloud
//! runs. A registry package carries those files byte for byte: the
//! `wasmcloud-runtime` 0.12.0 crate on crates.io, in `wit/deps/messaging/`,
//! under wasmCloud's name for it, `wasmcloud:messaging@0.3.0`. So the crate
//! is downloaded once, checked against the SHA-256 crates.io lists for it,
//! and the five files are written out with the package line the draft
//! itself declares.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

/// The package the written files declare.
pub const PACKAGE: &str = "wasi:messaging@0.2.0-draft";
/// The upstream commit whose `wit/` the files are.
pub const SOURCE_COMMIT: &str = "4ee59bb881f7a8675fbb3ae7ca5d5d586ab88657";

const CRATE_URL: &str =
    "https://static.crates.io/crates/wasmcloud-runtime/wasmcloud-runtime-0.12.0.crate";
/// crates.io's checksum of that file.
const CRATE_SHA256: &str = "f09f94956e3725b8fbf7539cec5523f694943ea4b9e88eba6945c6ce047e83b9";
const IN_CRATE: &str = "wasmcloud-runtime-0.12.0/wit/deps/messaging/";
const FILES: [&str; 5] = [
    "guest.wit",
    "messaging.wit",
    "producer.wit",
    "request-reply.wit",
    "types.wit",
];
const RENAMED: &str = "package wasmcloud:messaging@0.3.0;";

/// The directory under the repository root that holds the files.
pub fn dir(repository_root: &Path) -> PathBuf {
    repository_root
        .join("target")
        .join("wit")
        .join("wasi-messaging")
}

/// Writes the WIT into [`dir`] unless it is there already; the path of
/// the directory.
pub fn ensure(repository_root: &Path) -> Result<PathBuf> {
    let dir = dir(repository_root);
    if FILES.iter().all(|file| dir.join(file).is_file()) {
        return Ok(dir);
    }
    let archive = download().with_context(|| {
        format!("fetching the {PACKAGE} WIT from {CRATE_URL} (crates.io must be reachable once)")
    })?;
    let files = extract(&archive)?;
    // Written beside and renamed into place, so two builds at once never
    // see half a directory.
    let parent = dir.parent().expect("a directory under target/wit");
    std::fs::create_dir_all(parent)?;
    let staging = parent.join(format!(".wasi-messaging.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for (name, text) in files {
        std::fs::write(staging.join(name), text)?;
    }
    if std::fs::rename(&staging, &dir).is_err() {
        // Another build got there first.
        let _ = std::fs::remove_dir_all(&staging);
        ensure!(
            FILES.iter().all(|file| dir.join(file).is_file()),
            "cannot write the {PACKAGE} WIT into {}",
            dir.display()
        );
    }
    Ok(dir)
}

fn download() -> Result<Vec<u8>> {
    let mut body = Vec::new();
    agent()
        .get(CRATE_URL)
        .call()?
        .into_body()
        .into_reader()
        .read_to_end(&mut body)?;
    let digest = hex::encode(Sha256::digest(&body));
    ensure!(
        digest == CRATE_SHA256,
        "{CRATE_URL} has SHA-256 {digest}, not the pinned {CRATE_SHA256}"
    );
    Ok(body)
}

/// An HTTP client that trusts the machine's certificate authorities, as
/// Cargo does when it reaches crates.io, so a network that inspects TLS
/// through its own authority works here too; Mozilla's roots where the
/// machine has none.
fn agent() -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let native = rustls_native_certs::load_native_certs();
    let roots: Vec<Certificate<'static>> = native
        .certs
        .iter()
        .map(|der| Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    let roots = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        roots.into()
    };
    ureq::Agent::config_builder()
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build()
        .new_agent()
}

/// The five WIT files from the crate archive, under the draft's own name.
fn extract(archive: &[u8]) -> Result<Vec<(&'static str, String)>> {
    let mut found = Vec::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = path.strip_prefix(IN_CRATE) else {
            continue;
        };
        let Some(name) = FILES.iter().find(|file| **file == name) else {
            continue;
        };
        let mut text = String::new();
        entry.read_to_string(&mut text)?;
        if *name == "messaging.wit" {
            if !text.contains(RENAMED) {
                bail!("{IN_CRATE}{name} no longer declares `{RENAMED}`");
            }
            text = text.replacen(RENAMED, &format!("package {PACKAGE};"), 1);
        }
        found.push((*name, text));
    }
    ensure!(
        found.len() == FILES.len(),
        "{CRATE_URL} holds {} of the {} files expected in {IN_CRATE}",
        found.len(),
        FILES.len()
    );
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files come out whole, under the draft's package name.
    #[test]
    fn writes_the_draft_under_its_own_name() {
        let root = std::env::temp_dir().join(format!("sluice-witdeps-{}", std::process::id()));
        let dir = ensure(&root).unwrap();
        let messaging = std::fs::read_to_string(dir.join("messaging.wit")).unwrap();
        assert!(messaging.starts_with("package wasi:messaging@0.2.0-draft;"));
        let guest = std::fs::read_to_string(dir.join("guest.wit")).unwrap();
        assert!(guest.contains("handle: func(message: message) -> result<_, error>;"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
