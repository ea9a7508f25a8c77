//! The plugin author's path from the README: a fifteen-line Rust plugin in
//! its own crate, built with one command, run by the host; and the SDK as a
//! crate to publish: its own copy of the WIT, the same as the repository's,
//! a version that follows the WIT package's, and a package holding what it
//! builds from.

use std::process::Command;
use std::time::Duration;

use common::{Collector, Running, quick_retry, route, runtime, settings};
use sluice::Message;
use sluice_tests::common;

const CARGO_TOML: &str = r#"[package]
name = "shout"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
sluice-sdk = { path = "SDK" }

[profile.release]
panic = "abort"
"#;

const LIB_RS: &str = r#"use sluice_sdk::prelude::*;

fn shout(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let text = msg.payload_str()?.to_uppercase();
    Ok(vec![Outgoing::new("shouted", text).with_header("by", "shout")])
}

handler!(shout);
"#;

#[tokio::test]
async fn a_plugin_written_against_the_sdk_builds_and_runs() {
    let project = tempfile::tempdir().unwrap();
    let sdk = common::repo_root().join("sdk");
    std::fs::write(
        project.path().join("Cargo.toml"),
        CARGO_TOML.replace("SDK", sdk.to_str().unwrap()),
    )
    .unwrap();
    std::fs::create_dir(project.path().join("src")).unwrap();
    std::fs::write(project.path().join("src/lib.rs"), LIB_RS).unwrap();

    // The one build command; the shared target dir only saves rebuilding
    // the SDK's dependencies.
    let target_dir = common::repo_root().join("plugins/target");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--target", "wasm32-wasip2", "--release"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(project.path())
        .status()
        .unwrap();
    assert!(status.success(), "the plugin did not build");
    let wasm = target_dir.join("wasm32-wasip2/release/shout.wasm");

    let runtime = runtime();
    let plugin = std::sync::Arc::new(runtime.load_file(&wasm, settings("shout", &[])).unwrap());
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let outputs = Collector::start(&backend, &["shouted"]).await;
    let running = Running::start(route("shout", &backend, "words", plugin, quick_retry(2))).await;
    backend
        .publish(vec![Message::new("words", "hello")])
        .await
        .unwrap();
    let got = outputs.wait_for(1, Duration::from_secs(20)).await.unwrap();
    running.stop().await;
    assert_eq!(got[0].payload, b"HELLO");
    assert_eq!(got[0].header("by"), Some("shout"));
}

#[test]
fn the_sdk_carries_the_repository_wit() {
    let root = common::repo_root();
    let ours = std::fs::read_to_string(root.join("wit/sluice.wit")).unwrap();
    let sdks = std::fs::read_to_string(root.join("sdk/wit/sluice.wit")).unwrap();
    assert!(
        ours == sdks,
        "sdk/wit/sluice.wit differs from wit/sluice.wit: cp wit/sluice.wit sdk/wit/"
    );
}

#[test]
fn the_sdk_version_follows_the_wit_package() {
    let root = common::repo_root();
    let wit = std::fs::read_to_string(root.join("wit/sluice.wit")).unwrap();
    let package = wit
        .lines()
        .find_map(|line| line.trim().strip_prefix("package sluice:plugin@"))
        .expect("the WIT names its package");
    let wit_version = package.trim_end_matches(';');
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("sdk/Cargo.toml")).unwrap()).unwrap();
    let sdk_version = manifest["package"]["version"].as_str().unwrap();
    let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    assert_eq!(
        major_minor(sdk_version),
        major_minor(wit_version),
        "sluice-sdk {sdk_version} must share major.minor with sluice:plugin@{wit_version}"
    );
}

#[test]
fn the_sdk_packages_what_it_builds_from() {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "package",
            "-p",
            "sluice-sdk",
            "--no-verify",
            "--list",
            "--allow-dirty",
        ])
        .current_dir(common::repo_root().join("plugins"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{listed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<&str> = listed.lines().collect();
    for needed in [
        "Cargo.toml",
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "src/lib.rs",
        "wit/sluice.wit",
    ] {
        assert!(
            files.contains(&needed),
            "{needed} is not packaged: {files:?}"
        );
    }
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("python/") || f.starts_with("js/") || f.starts_with("c/")),
        "the other languages' helpers are packaged: {files:?}"
    );
}
