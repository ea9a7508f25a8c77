//! The plugin author's kit through the `sluice` binary: `sluice test` on
//! recorded messages (each example language, a trapping plugin), `sluice
//! build` refusing a component of the wrong world, and `sluice new` in every
//! language, outside the repository, building, passing its own test and its
//! native unit test, and naming nothing of this checkout.

use sluice_tests::common;
use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    common::kit_command()
        .args(args)
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
#[cfg_attr(
    not(feature = "languages"),
    ignore = "needs Python, Node.js and clang (feature `languages`)"
)]
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

/// `sluice new` in a fresh directory outside the repository: the project
/// builds, passes its recorded-message test and its native unit test (the
/// command, and a test name its output must show), and no file of it names
/// this checkout.
fn sluice_new_builds_anywhere(lang: &str, unit_test: Option<(&[&str], &str)>) {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::repo_root().canonicalize().unwrap();
    assert!(
        !dir.path().canonicalize().unwrap().starts_with(&repo),
        "the temp dir must be outside the repository"
    );
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

    if let Some((command, shown)) = unit_test {
        let output = Command::new(command[0])
            .args(&command[1..])
            .current_dir(&project)
            .env(
                "CARGO_TARGET_DIR",
                common::repo_root().join("plugins/target"),
            )
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let said = format!(
            "{}{}",
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{lang} unit test fails: {said}");
        assert!(said.contains(shown), "{lang} unit test did not run: {said}");
    }

    let mut files = Vec::new();
    project_files(&project, &mut files);
    assert!(files.len() > 4, "{files:?}");
    let repo = repo.to_str().unwrap().as_bytes();
    for file in files {
        let contents = std::fs::read(&file).unwrap();
        assert!(
            !contents.windows(repo.len()).any(|w| w == repo),
            "{} names the repository's path",
            file.display()
        );
    }
}

/// Every file of a project but its build outputs in `target/`.
fn project_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() == "target" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            project_files(&entry.path(), found);
        } else {
            found.push(entry.path());
        }
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

#[test]
fn sluice_new_rust_builds_anywhere_and_passes_cargo_test() {
    let cargo = cargo();
    sluice_new_builds_anywhere(
        "rust",
        Some((
            &[cargo.as_str(), "test"],
            "tests::rejects_an_empty_message ... ok",
        )),
    );
}

#[test]
#[cfg_attr(
    not(feature = "languages"),
    ignore = "needs Python, Node.js and clang (feature `languages`)"
)]
fn sluice_new_python_builds_anywhere_and_passes_unittest() {
    sluice_new_builds_anywhere(
        "python",
        Some((
            &["python3", "-m", "unittest", "-v"],
            "test_rejects_an_empty_message",
        )),
    );
}

#[test]
#[cfg_attr(
    not(feature = "languages"),
    ignore = "needs Python, Node.js and clang (feature `languages`)"
)]
fn sluice_new_js_builds_anywhere_and_passes_node_test() {
    sluice_new_builds_anywhere(
        "js",
        Some((&["node", "--test"], "rejects an empty message")),
    );
}

#[test]
#[cfg_attr(
    not(feature = "languages"),
    ignore = "needs Python, Node.js and clang (feature `languages`)"
)]
fn sluice_new_c_builds_anywhere() {
    sluice_new_builds_anywhere("c", None);
}

#[test]
fn sluice_new_refuses_an_existing_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    let output = sluice(&["new", "taken", "--lang", "c", "--dir", path(dir.path())]);
    assert!(!output.status.success(), "an existing directory is refused");
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
}
