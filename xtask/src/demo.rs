//! The demo: publishes sample orders and jobs to an SQLite file, runs
//! `examples/demo.toml` over them until idle, reads every output and
//! dead-letter topic back and explains what happened. It checks the results
//! too, so it doubles as an end-to-end smoke test of the built binary.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::process::{capture, cargo, root, run};
use crate::tasks;

const DEMO_DIR: &str = "target/demo";
/// Relative to the repository root, where every `sluice` command runs; the
/// same file `examples/demo.toml` names.
const DB_URL: &str = "sqlite://target/demo/sluice-demo.db";
const CONFIG: &str = "examples/demo.toml";
const IDLE_SECONDS: &str = "2";

const ORDERS_IN: &str = "orders.new";
const ORDERS_ROUTED: &str = "orders.region.>";
const ORDERS_OUT: &str = "orders.shouted";
const ORDERS_DEAD: &str = "route-by-region.dead-letter";
const JOBS_IN: &str = "jobs";
const JOBS_OUT: &str = "jobs.done";
const JOBS_DEAD: &str = "jobs.dead-letter";

const ORDERS: [&str; 4] = [
    r#"{"order":1,"region":"eu","item":"espresso beans","qty":2}"#,
    r#"{"order":2,"region":"us","item":"green tea","qty":1}"#,
    r#"{"order":3,"region":"apac","item":"matcha whisk","qty":3}"#,
    r#"{"order":4,"region":"eu","item":"croissant","qty":12}"#,
];
const NOT_JSON: &str = "order #5: two bagels, no JSON here";
/// Commands for the chaos plugin.
const JOBS: [&str; 4] = ["ok", "retry:1", "retry", "panic"];

const CAUSE: &str = "sluice-dead-letter-cause";
const REASON: &str = "sluice-dead-letter-reason";

pub fn demo() -> Result<()> {
    tasks::rust_plugins()?;
    println!("==> building the host…");
    run(cargo().args(["build", "-p", "sluice"]))?;
    let sluice = Sluice::built()?;
    explain();
    fresh_demo_dir()?;
    publish_samples(&sluice)?;
    let summary = sluice.run_until_idle()?;
    let results = Results::read(&sluice)?;
    results.print();
    print_summary(&summary);
    verify(&results)
}

fn explain() {
    println!();
    println!(
        "Sluice demo. Orders: routing (the router plugin picks a topic from `region`), then a transform (uppercase)."
    );
    println!(
        "Jobs (chaos plugin): retry then success (`retry:1`), retry then dead-letter (`retry`), and a trapping plugin isolated (`panic`: its instance is discarded, the host carries on)."
    );
}

fn fresh_demo_dir() -> Result<()> {
    let dir = root().join(DEMO_DIR);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot wipe {DEMO_DIR}"))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {DEMO_DIR}"))
}

fn publish_samples(sluice: &Sluice) -> Result<()> {
    println!("\n==> publishing sample messages to {DB_URL}");
    let orders = ORDERS.iter().copied().chain([NOT_JSON]);
    let samples = orders
        .map(|payload| (ORDERS_IN, payload))
        .chain(JOBS.iter().map(|&payload| (JOBS_IN, payload)));
    for (topic, payload) in samples {
        sluice.publish(topic, payload)?;
        println!("    {topic:<12} {payload}");
    }
    Ok(())
}

/// The built `sluice` binary, run from the repository root.
struct Sluice {
    binary: PathBuf,
}

impl Sluice {
    fn built() -> Result<Self> {
        let name = format!("sluice{}", std::env::consts::EXE_SUFFIX);
        let binary = root().join("target").join("debug").join(name);
        if !binary.exists() {
            bail!("{} is missing after the build", binary.display());
        }
        Ok(Sluice { binary })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.current_dir(root());
        // The demo's expectations hold for its own database only.
        command.env_remove("SLUICE_BACKEND_URL");
        command.env_remove("SLUICE_BACKEND_MAIN_URL");
        command
    }

    fn publish(&self, topic: &str, payload: &str) -> Result<()> {
        capture(
            self.command()
                .args(["publish", "--url", DB_URL, topic, payload]),
        )
        .map(drop)
    }

    fn run_until_idle(&self) -> Result<Vec<String>> {
        println!("\n==> running {CONFIG} until idle for {IDLE_SECONDS}s (host log at warn level)");
        let mut command = self.command();
        command.args(["run", CONFIG, "--exit-when-idle", IDLE_SECONDS]);
        // Captured, so colour codes would only clutter it.
        command.env("SLUICE_LOG", "warn").env("NO_COLOR", "1");
        let output = capture(&mut command)?;
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("    | {line}");
        }
        let summary = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.trim_start().starts_with("route "))
            .map(|line| line.trim().to_owned())
            .collect();
        Ok(summary)
    }

    fn tail(&self, topic: &str) -> Result<Vec<Tailed>> {
        let output = capture(
            self.command()
                .args(["tail", "--url", DB_URL, "--json", topic]),
        )?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(Tailed::parse)
            .collect::<Result<_>>()
            .with_context(|| format!("reading `sluice tail {topic}`"))
    }
}

/// One message as `sluice tail --json` prints it.
struct Tailed {
    topic: String,
    payload: String,
    headers: Vec<(String, String)>,
}

impl Tailed {
    fn parse(line: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(line).context("not JSON")?;
        let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
        let headers = value["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| Some((pair[0].as_str()?.into(), pair[1].as_str()?.into())))
            .collect();
        Ok(Tailed {
            topic: text("topic"),
            payload: text("payload"),
            headers,
        })
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Every topic the demo reads back.
struct Results {
    routed: Vec<Tailed>,
    shouted: Vec<Tailed>,
    done: Vec<Tailed>,
    orders_dead: Vec<Tailed>,
    jobs_dead: Vec<Tailed>,
}

impl Results {
    fn read(sluice: &Sluice) -> Result<Self> {
        println!("\n==> reading the results back with `sluice tail`");
        Ok(Results {
            routed: sluice.tail(ORDERS_ROUTED)?,
            shouted: sluice.tail(ORDERS_OUT)?,
            done: sluice.tail(JOBS_OUT)?,
            orders_dead: sluice.tail(ORDERS_DEAD)?,
            jobs_dead: sluice.tail(JOBS_DEAD)?,
        })
    }

    fn print(&self) {
        heading(
            ORDERS_ROUTED,
            "route-by-region: the topic comes from the `region` field",
        );
        for message in &self.routed {
            println!("    {:<18} {}", message.topic, message.payload);
        }
        heading(ORDERS_OUT, "shout: every routed order, uppercased");
        for message in &self.shouted {
            println!("    {}", message.payload);
        }
        heading(JOBS_OUT, "jobs: what succeeded, and on which attempt");
        for message in &self.done {
            println!(
                "    {:<10} attempt {}",
                message.payload,
                message.header("attempt")
            );
        }
        heading(ORDERS_DEAD, "orders the router rejected");
        print_dead_letters(&self.orders_dead);
        heading(JOBS_DEAD, "jobs that used up their attempts");
        print_dead_letters(&self.jobs_dead);
    }
}

fn heading(topic: &str, what: &str) {
    println!("\n{topic}  ({what})");
}

fn print_dead_letters(letters: &[Tailed]) {
    for letter in letters {
        println!("    {}", letter.payload);
        println!("        {CAUSE}:  {}", letter.header(CAUSE));
        println!("        {REASON}: {}", letter.header(REASON));
    }
}

fn print_summary(summary: &[String]) {
    println!("\nRun summary (printed by `sluice run`)");
    for line in summary {
        println!("    {line}");
    }
}

fn verify(results: &Results) -> Result<()> {
    let mut problems = Vec::new();
    let routed: Vec<String> = results
        .routed
        .iter()
        .map(|m| format!("{} {}", m.topic, m.payload))
        .collect();
    let expected_routes = ORDERS.iter().map(|order| {
        let region =
            serde_json::from_str::<Value>(order).expect("sample orders are JSON")["region"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        format!("orders.region.{region} {order}")
    });
    compare(&mut problems, ORDERS_ROUTED, &routed, expected_routes);
    let shouted = payloads(&results.shouted);
    compare(
        &mut problems,
        ORDERS_OUT,
        &shouted,
        ORDERS.map(str::to_uppercase),
    );
    compare(
        &mut problems,
        JOBS_OUT,
        &payloads(&results.done),
        ["ok", "retry:1"],
    );
    if let Some(retried) = results.done.iter().find(|m| m.payload == "retry:1")
        && retried.header("attempt") != "2"
    {
        problems.push(format!("{JOBS_OUT}: `retry:1` should succeed on attempt 2"));
    }
    check_dead_letters(
        &mut problems,
        ORDERS_DEAD,
        &results.orders_dead,
        &[NOT_JSON],
        "rejected",
    );
    check_dead_letters(
        &mut problems,
        JOBS_DEAD,
        &results.jobs_dead,
        &["retry", "panic"],
        "attempts-exhausted",
    );
    if let Some(trapped) = results.jobs_dead.iter().find(|m| m.payload == "panic")
        && !trapped.header(REASON).contains("trapped")
    {
        problems.push(format!(
            "{JOBS_DEAD}: `panic` should be dead-lettered as a trap"
        ));
    }
    conclude(problems)
}

fn payloads(messages: &[Tailed]) -> Vec<String> {
    messages.iter().map(|m| m.payload.clone()).collect()
}

fn check_dead_letters(
    problems: &mut Vec<String>,
    topic: &str,
    letters: &[Tailed],
    expected: &[&str],
    cause: &str,
) {
    compare(
        problems,
        topic,
        &payloads(letters),
        expected.iter().copied(),
    );
    for letter in letters.iter().filter(|l| l.header(CAUSE) != cause) {
        problems.push(format!(
            "{topic}: `{}` has cause `{}`, expected `{cause}`",
            letter.payload,
            letter.header(CAUSE)
        ));
    }
}

/// Records what is missing and what should not be there. Duplicates are not
/// problems: delivery is at-least-once.
fn compare<S: Into<String>>(
    problems: &mut Vec<String>,
    topic: &str,
    got: &[String],
    expected: impl IntoIterator<Item = S>,
) {
    let expected: Vec<String> = expected.into_iter().map(Into::into).collect();
    for missing in expected.iter().filter(|e| !got.contains(e)) {
        problems.push(format!("{topic}: missing `{missing}`"));
    }
    for extra in got.iter().filter(|g| !expected.contains(g)) {
        problems.push(format!("{topic}: unexpected `{extra}`"));
    }
}

fn conclude(problems: Vec<String>) -> Result<()> {
    println!();
    if problems.is_empty() {
        println!("Demo OK: every expected output and dead letter is there.");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("demo check failed: {problem}");
    }
    bail!(
        "the demo produced unexpected results ({} problem(s))",
        problems.len()
    )
}
