//! Gives the kit the `wasi:http` WIT that Python plugins are built against,
//! taken from the wasmtime-wasi-http crate the host links, so a plugin's
//! imports are the very interfaces the host provides and no copy of them
//! lives in the repository.
//!
//! Cargo tells a build script nothing about where a dependency's sources
//! are (wasmtime-wasi-http declares no `links`), so `cargo metadata` is
//! asked, the same Cargo that runs the build. The crate's `wit/deps/*.wit`
//! are copied into `OUT_DIR`, and `wasi_http_wit.rs` there names them for
//! `include_str!`, with the `wasi:http` version they declare. Without the
//! `kit` feature nothing is needed and nothing is done.
//!
//! It also puts the `wasi:messaging` draft's WIT, which the runtime's
//! second world is generated from, under `target/wit/` (see the
//! sluice-witdeps crate): fetched once, from a registry package.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CRATE: &str = "wasmtime-wasi-http";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The dependency's version is pinned here; a new pin may bring new WIT.
    println!("cargo:rerun-if-changed=Cargo.toml");
    let root = Path::new(&env("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate sits in the repository")
        .to_path_buf();
    let messaging = sluice_witdeps::ensure(&root).unwrap_or_else(|e| panic!("{e:#}"));
    println!("cargo:rerun-if-changed={}", messaging.display());
    if std::env::var_os("CARGO_FEATURE_KIT").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let deps = wasi_http_crate().join("wit").join("deps");
    let copies = out_dir.join("wasi-http-wit");
    let _ = std::fs::remove_dir_all(&copies);
    std::fs::create_dir_all(&copies).expect("creating the WIT copy in OUT_DIR");

    let mut files: Vec<PathBuf> = std::fs::read_dir(&deps)
        .unwrap_or_else(|e| panic!("reading {}: {e}", deps.display()))
        .map(|entry| entry.expect("listing the WIT deps").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wit"))
        .collect();
    // The same order on every machine, so the kit's build hash is stable.
    files.sort();
    let mut entries = String::new();
    let mut version = None;
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
        let name = file
            .file_name()
            .unwrap()
            .to_str()
            .expect("a UTF-8 file name");
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        if let Some(v) = package_version(&text, "wasi:http") {
            version = Some(v.to_owned());
        }
        std::fs::write(copies.join(name), &text).expect("writing the WIT copy");
        entries.push_str(&format!(
            "    ({name:?}, include_str!(concat!(env!(\"OUT_DIR\"), \"/wasi-http-wit/{name}\"))),\n"
        ));
    }
    let version = version.unwrap_or_else(|| {
        panic!(
            "no `package wasi:http@…;` in {}: has {CRATE} moved its WIT?",
            deps.display()
        )
    });
    let generated = format!(
        "/// The WIT packages `wasi:http` needs, as {CRATE} ships them: \
         (file name, text) for a `deps/` directory.\n\
         pub const WASI_HTTP_DEPS: &[(&str, &str)] = &[\n{entries}];\n\
         /// The `wasi:http` version those files declare.\n\
         pub const WASI_HTTP_VERSION: &str = {version:?};\n"
    );
    std::fs::write(out_dir.join("wasi_http_wit.rs"), generated).expect("writing wasi_http_wit.rs");
}

/// The directory of the wasmtime-wasi-http this crate depends on.
fn wasi_http_crate() -> PathBuf {
    let manifest = Path::new(&env("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    // Offline first: the outer build has fetched what this crate needs, and
    // that is usually all. The rest of the workspace may not be, and then
    // only the registry can say.
    let output = cargo_metadata(&manifest, true)
        .filter(|output| output.status.success())
        .or_else(|| cargo_metadata(&manifest, false))
        .expect("running `cargo metadata`");
    if !output.status.success() {
        panic!(
            "`cargo metadata` failed, so {CRATE}'s WIT cannot be found: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&output.stdout).expect("`cargo metadata` printed no JSON");
    let packages = metadata["packages"].as_array().expect("metadata packages");
    let ours = packages
        .iter()
        .find(|p| {
            p["manifest_path"]
                .as_str()
                .is_some_and(|path| same_file(path, &manifest))
        })
        .and_then(|p| p["id"].as_str())
        .expect("this crate in `cargo metadata`");
    // The dependency as resolved for this crate, should the graph hold
    // several versions.
    let node = metadata["resolve"]["nodes"]
        .as_array()
        .expect("metadata resolve")
        .iter()
        .find(|n| n["id"].as_str() == Some(ours))
        .expect("this crate in the resolved graph");
    let dependency = node["deps"]
        .as_array()
        .expect("resolved deps")
        .iter()
        .find(|d| d["name"].as_str() == Some(&CRATE.replace('-', "_")))
        .and_then(|d| d["pkg"].as_str())
        .unwrap_or_else(|| panic!("{CRATE} is not among this crate's dependencies"));
    let package = packages
        .iter()
        .find(|p| p["id"].as_str() == Some(dependency))
        .expect("the dependency's package");
    Path::new(package["manifest_path"].as_str().expect("manifest path"))
        .parent()
        .expect("the manifest's directory")
        .to_path_buf()
}

fn cargo_metadata(manifest: &Path, offline: bool) -> Option<std::process::Output> {
    let mut command = Command::new(env("CARGO"));
    command
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(env("TARGET"))
        .arg("--manifest-path")
        .arg(manifest);
    if offline {
        command.arg("--offline");
    }
    command.output().ok()
}

fn same_file(a: impl AsRef<Path>, b: impl AsRef<Path>) -> bool {
    match (a.as_ref().canonicalize(), b.as_ref().canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.as_ref() == b.as_ref(),
    }
}

/// The version in `package NAME@VERSION;`, if `text` declares that package.
fn package_version<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        line.trim()
            .strip_prefix("package ")?
            .strip_prefix(name)?
            .strip_prefix('@')?
            .strip_suffix(';')
            .map(str::trim)
    })
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}
