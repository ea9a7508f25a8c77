//! `sluice dev` on projects made by `sluice new`: the project's test
//! messages are handled at once with each outcome printed, and an edit to
//! its source is rebuilt and deployed while the loop runs, so the next
//! message shows the new behaviour.

use sluice_tests::common;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Long enough for a first Rust build of the SDK's dependencies.
const PATIENCE: Duration = Duration::from_secs(600);

fn sluice() -> Command {
    common::kit_command()
}

/// A running `sluice dev` and the lines it has printed.
struct Dev {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(project: &Path, extra: &[&str]) -> Dev {
        let mut child = sluice()
            .arg("dev")
            .arg(project)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sluice dev");
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Dev {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a printed line that has every one of `parts`, or finds it
    /// among those printed already: the outcomes of the first messages and
    /// the line that says the watch began come in either order.
    fn expect(&mut self, parts: &[&str]) -> String {
        let has_all = |line: &String| parts.iter().all(|p| line.contains(p));
        if let Some(line) = self.seen.iter().find(|line| has_all(line)) {
            return line.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if has_all(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "sluice dev printed no line with {parts:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A project `demo` in `lang`, made by `sluice new` in `dir`.
fn new_project(dir: &Path, lang: &str) -> PathBuf {
    let created = sluice()
        .args(["new", "demo", "--lang", lang, "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    dir.join("demo")
}

fn rebuilds_and_deploys_after_an_edit(lang: &str, source: &str, from: &str, to: &str) {
    let dir = tempfile::tempdir().unwrap();
    let project = new_project(dir.path(), lang);

    let mut dev = Dev::start(&project, &[]);
    // The scaffold's own test messages, handled as soon as it runs.
    dev.expect(&["words key=k1 hello => ok -> demo.out", "HELLO"]);
    dev.expect(&["=> reject: empty payload"]);
    dev.expect(&["watching"]);

    let file = project.join(source);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(from), "{source} no longer has `{from}`");
    std::fs::write(&file, text.replace(from, to)).unwrap();
    dev.expect(&["deployed version"]);

    let db = project.join("target/sluice-dev/dev.db");
    let published = sluice()
        .args(["publish", "--url"])
        .arg(format!("sqlite://{}", db.display()))
        .args(["words", "again"])
        .output()
        .unwrap();
    assert!(published.status.success(), "{published:?}");
    dev.expect(&["words again => ok -> demo.out", "AGAIN!"]);
}

#[test]
#[cfg_attr(
    not(feature = "languages"),
    ignore = "needs Python, Node.js and clang (feature `languages`)"
)]
fn a_python_plugin_is_rebuilt_and_deployed_after_an_edit() {
    rebuilds_and_deploys_after_an_edit(
        "python",
        "plugin.py",
        "text.upper()",
        "text.upper() + \"!\"",
    );
}

#[test]
fn a_rust_plugin_is_rebuilt_and_deployed_after_an_edit() {
    rebuilds_and_deploys_after_an_edit(
        "rust",
        "src/lib.rs",
        "text.to_uppercase()",
        "text.to_uppercase() + \"!\"",
    );
}

/// With `--admin` and `--plugin`, a build goes to a running host through
/// its admin API instead: the first one at once, and the host then runs it.
#[test]
fn a_build_is_deployed_to_a_running_host_with_admin() {
    let dir = tempfile::tempdir().unwrap();
    let project = new_project(dir.path(), "rust");
    let host_dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let url = format!("sqlite://{}", host_dir.path().join("sluice.db").display());
    let _host = common::run_admin_host(host_dir.path(), &url, port, "", "");
    let admin = format!("http://127.0.0.1:{port}");
    let plugins = format!("{admin}/api/plugins");
    let give_up = Instant::now() + Duration::from_secs(60);
    while common::http_get(&plugins, None).0 != 200 {
        assert!(
            Instant::now() < give_up,
            "the host's admin API never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut dev = Dev::start(&project, &["--admin", &admin, "--plugin", "upper"]);
    let line = dev.expect(&["deployed plugin upper version"]);
    let version = line.rsplit(' ').next().unwrap();
    let (_, body) = common::http_get(&plugins, None);
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let current = listed[0]["current"]["hash"].as_str().unwrap_or_default();
    assert!(
        current.starts_with(version),
        "the host runs {current}, not the build {version}: {body}"
    );
}
