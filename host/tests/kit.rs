//! The plugin author's kit through the `sluice` binary: `sluice test` on
//! recorded messages (each example language, a trapping plugin), `sluice
//! build` refusing a component of the wrong world, and `sluice new` in every
//! language building and passing its own test.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_TOOLCHAINS", common::toolchains_dir())
        .env(
            "SLUICE_CACHE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("component-cache"),
        )
        // Rust scaffolds share the plugins' target dir, so the SDK's
        // dependencies are not compiled again for each.
        .env(
            "CARGO_TARGET_DIR",
            common::repo_root().join("plugins/target"),
        )
        .output()
        .expect("run sluice")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn sluice_test_gives_the_recorded_outcomes_in_every_language() {
    let data = common::repo_root().join("plugins/testdata");
    for (lang, wasm) in [
        ("rust", common::plugin_path("enrich")),
        ("python", common::example_path("python", "enrich")),
        ("js", common::example_path("js", "enrich")),
        ("c", common::example_path("c", "enrich")),
    ] {
        let output = sluice(&[
            "test",
            path(&wasm),
            "--input",
            path(&data.join("enrich.jsonl")),
            "--set",
            "region=eu-west",
            "--expect",
            path(&data.join("enrich.expected")),
        ]);
        assert!(
            output.status.success(),
            "{lang}: {}\n{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout(&output).lines().count(), 6, "{lang}");
    }
}

#[test]
fn sluice_test_reports_a_mismatch_and_a_trap_in_its_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("messages.jsonl");
    std::fs::write(
        &input,
        "{\"payload\": \"reject\"}\n# a comment\n{\"payload\": \"panic\"}\n{\"payload\": \"retry:1\", \"key\": \"k\"}\n{\"payload\": \"retry:1\", \"attempt\": 2}\n",
    )
    .unwrap();
    let chaos = common::plugin_path("chaos");
    let output = sluice(&["test", path(&chaos), "--input", path(&input)]);
    assert_eq!(output.status.code(), Some(2), "a trap exits with 2");
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("1 reject: "), "{text}");
    assert!(lines[1].starts_with("2 trap: "), "{text}");
    // After the trap the next message runs on a fresh instance.
    assert!(lines[2].starts_with("3 retry: "), "{text}");
    assert!(
        lines[3].starts_with("4 ok -> out attempt=2 retry:1"),
        "{text}"
    );

    let expected = dir.path().join("expected.txt");
    std::fs::write(&expected, "1 reject: something else\n").unwrap();
    let output = sluice(&[
        "test",
        path(&common::plugin_path("echo")),
        "--input",
        path(&input),
        "--expect",
        path(&expected),
    ]);
    assert_eq!(output.status.code(), Some(1), "a mismatch exits with 1");
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 1: expected"));
}

#[test]
fn sluice_build_refuses_a_component_of_another_world() {
    let output = sluice(&[
        "build",
        path(&common::repo_root().join("plugins/wrong_world")),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not fit sluice:plugin/handler"),
        "{stderr}"
    );
}

#[test]
fn sluice_new_creates_projects_that_build_and_pass_their_own_test() {
    let dir = tempfile::tempdir().unwrap();
    for lang in ["rust", "python", "js", "c"] {
        let name = format!("hello-{lang}");
        let output = sluice(&["new", &name, "--lang", lang, "--dir", path(dir.path())]);
        assert!(output.status.success(), "{lang}: {output:?}");
        let project = dir.path().join(&name);

        let output = sluice(&["build", path(&project)]);
        assert!(
            output.status.success(),
            "{lang} scaffold does not build: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let wasm = project.join("target").join(format!("{name}.wasm"));
        let output = sluice(&[
            "test",
            path(&wasm),
            "--input",
            path(&project.join("test/messages.jsonl")),
            "--expect",
            path(&project.join("test/expected.txt")),
        ]);
        assert!(
            output.status.success(),
            "{lang} scaffold fails its test: {}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout(&output).contains(&format!("1 ok -> {name}.out key=k1 by={name} HELLO")));
    }
    let output = sluice(&[
        "new",
        "hello-rust",
        "--lang",
        "c",
        "--dir",
        path(dir.path()),
    ]);
    assert!(!output.status.success(), "an existing directory is refused");
}
