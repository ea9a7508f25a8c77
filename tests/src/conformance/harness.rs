//! Runs the cases against one target, decides which apply, and reports.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sluice::Message;
use sluice::backend::{Backend, Capabilities, Delivery, SubscribeOptions, Subscription};

use crate::conformance::targets::Target;

/// What a case gets: the target, a handle on it, and a namespace of its own
/// so cases can share a server without seeing each other's messages.
#[derive(Clone)]
pub struct Ctx {
    pub target: Arc<dyn Target>,
    pub backend: Arc<dyn Backend>,
    prefix: String,
}

impl Ctx {
    /// A topic private to this case run.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// A group private to this case run.
    pub fn group(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `n` messages, scaled by the target's [`Target::volume_scale`].
    pub fn volume(&self, n: usize) -> usize {
        ((n as f64 * self.target.volume_scale()).round() as usize).max(1)
    }

    pub async fn subscribe(
        &self,
        topics: impl IntoIterator<Item = String>,
        group: &str,
    ) -> Result<Box<dyn Subscription>> {
        self.subscribe_with(topics, group, |_| {}).await
    }

    pub async fn subscribe_with(
        &self,
        topics: impl IntoIterator<Item = String>,
        group: &str,
        adjust: impl FnOnce(&mut SubscribeOptions),
    ) -> Result<Box<dyn Subscription>> {
        let mut options = SubscribeOptions::new(topics.into_iter().collect(), self.group(group));
        options.lease = Duration::from_secs(30);
        adjust(&mut options);
        self.backend.subscribe(options).await
    }
}

type CaseFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// One behaviour of the contract.
pub struct Case {
    pub name: &'static str,
    /// `Some(reason)` if the case does not apply to this backend.
    pub skip: fn(&Capabilities, &dyn Target) -> Option<&'static str>,
    pub run: fn(Ctx) -> CaseFuture,
}

/// Builds a [`Case`] from an async fn.
#[macro_export]
macro_rules! case {
    ($name:ident) => {
        $crate::conformance::harness::Case {
            name: stringify!($name),
            skip: |_, _| None,
            run: |ctx| Box::pin($name(ctx)),
        }
    };
    ($name:ident, $skip:expr) => {
        $crate::conformance::harness::Case {
            name: stringify!($name),
            skip: $skip,
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

const CASE_LIMIT: Duration = Duration::from_secs(90);

enum Verdict {
    Pass(Duration),
    Fail(String),
    NotApplicable(&'static str),
}

/// The cases that restart the server: they run alone, after the others, so
/// they never pull the server from under a concurrent case.
const ALONE: &[&str] = &[
    "reconnect_after_server_restart",
    "carries_on_after_the_server_restarts_empty",
];

/// Runs the cases of one round; with `restart_only`, just the cases that
/// restart the server (every other case is left out of the result).
async fn run_once(
    target: Arc<dyn Target>,
    pinned: Capabilities,
    round: usize,
    restart_only: bool,
) -> Vec<(&'static str, Verdict)> {
    let backend = target.open().await.expect("open the backend");
    // Which cases apply follows the pinned capabilities, not the ones the
    // backend declares: a changed flag fails here instead of turning a
    // failing case into "n/a".
    let caps = pinned;
    let mut results = Vec::new();
    if !restart_only {
        // What the registry says of the backend's kind (its scheme) must
        // be what the backend itself declares, and both what is pinned.
        let declared = backend.capabilities();
        let registered = sluice::backend::capabilities_of(
            &target
                .backend_url()
                .unwrap_or_else(|| backend.kind().to_string()),
        );
        results.push((
            "declares_the_pinned_capabilities",
            if declared != pinned {
                Verdict::Fail(format!(
                    "the backend declares {}, the suite pins {}",
                    describe(&declared),
                    describe(&pinned)
                ))
            } else if registered != Some(declared) {
                Verdict::Fail(format!(
                    "the registry has {} for kind `{}`, not what the backend declares",
                    registered
                        .as_ref()
                        .map_or("no such scheme".into(), describe),
                    backend.kind()
                ))
            } else {
                Verdict::Pass(Duration::ZERO)
            },
        ));
    }
    let cases = crate::conformance::cases::all()
        .into_iter()
        .chain(crate::conformance::host_cases::all());
    let chosen = std::env::var("SLUICE_CONFORMANCE_CASES").ok();
    for (index, case) in cases.enumerate() {
        if chosen
            .as_deref()
            .is_some_and(|names| !names.split(',').any(|name| name == case.name))
        {
            continue;
        }
        if restart_only != ALONE.contains(&case.name) {
            if !restart_only {
                results.push((
                    case.name,
                    Verdict::NotApplicable("run alone, after the rest"),
                ));
            }
            continue;
        }
        if let Some(reason) = (case.skip)(&caps, target.as_ref()) {
            results.push((case.name, Verdict::NotApplicable(reason)));
            continue;
        }
        let ctx = Ctx {
            target: target.clone(),
            backend: target.open().await.expect("open the backend"),
            prefix: format!("conf{round}x{index}x{}", short_id()),
        };
        let started = Instant::now();
        // On a task of its own, so that a panic fails this case alone and
        // the table still says which.
        let mut running = tokio::spawn((case.run)(ctx));
        let verdict = match tokio::time::timeout(CASE_LIMIT, &mut running).await {
            Ok(Ok(Ok(()))) => Verdict::Pass(started.elapsed()),
            Ok(Ok(Err(e))) => Verdict::Fail(format!("{e:#}")),
            Ok(Err(e)) => Verdict::Fail(match e.try_into_panic() {
                Ok(panic) => format!("panicked: {}", panic_text(&panic)),
                Err(e) => format!("{e}"),
            }),
            Err(_) => {
                running.abort();
                Verdict::Fail(format!("timed out after {CASE_LIMIT:?}"))
            }
        };
        results.push((case.name, verdict));
    }
    results
}

/// The capabilities named in `words` (the fields of [`Capabilities`],
/// space-separated), every other one off.
pub fn pinned(words: &str) -> Capabilities {
    let mut caps = Capabilities {
        persistent: false,
        history: false,
        consumer_groups: false,
        ordered_per_key: false,
        native_delay: false,
        lease: false,
        wildcards: false,
        at_least_once: false,
        lease_checked: false,
        backlog: false,
        key_affinity: false,
    };
    for word in words.split_whitespace() {
        let flag = match word {
            "persistent" => &mut caps.persistent,
            "history" => &mut caps.history,
            "consumer_groups" => &mut caps.consumer_groups,
            "ordered_per_key" => &mut caps.ordered_per_key,
            "native_delay" => &mut caps.native_delay,
            "lease" => &mut caps.lease,
            "wildcards" => &mut caps.wildcards,
            "at_least_once" => &mut caps.at_least_once,
            "lease_checked" => &mut caps.lease_checked,
            "backlog" => &mut caps.backlog,
            "key_affinity" => &mut caps.key_affinity,
            other => panic!("`{other}` is not a capability"),
        };
        *flag = true;
    }
    caps
}

/// The capabilities that are on, as [`pinned`] reads them.
fn describe(caps: &Capabilities) -> String {
    let flags = [
        ("persistent", caps.persistent),
        ("history", caps.history),
        ("consumer_groups", caps.consumer_groups),
        ("ordered_per_key", caps.ordered_per_key),
        ("native_delay", caps.native_delay),
        ("lease", caps.lease),
        ("wildcards", caps.wildcards),
        ("at_least_once", caps.at_least_once),
        ("lease_checked", caps.lease_checked),
        ("backlog", caps.backlog),
        ("key_affinity", caps.key_affinity),
    ];
    let on: Vec<&str> = flags
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
    format!("\"{}\"", on.join(" "))
}

/// Runs every case (N times in parallel in stress mode), prints the table,
/// writes it for the combined report, and fails if any case failed or the
/// backend declares other capabilities than `pinned`.
pub async fn run_suite(target: Arc<dyn Target>, pinned: Capabilities) {
    // The backends' own logs, for a failing case: `RUST_LOG=sluice=debug`.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let rounds: usize = std::env::var("SLUICE_CONFORMANCE_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut all = Vec::new();
    if target.rounds_in_parallel() {
        let runs = (0..rounds).map(|round| {
            let target = target.clone();
            tokio::spawn(async move { run_once(target, pinned, round, false).await })
        });
        for run in futures::future::join_all(runs).await {
            all.push(run.expect("suite task"));
        }
    } else {
        for round in 0..rounds {
            all.push(run_once(target.clone(), pinned, round, false).await);
        }
    }
    // Then the restart cases, once each, with nothing else running; their
    // verdicts take the first round's place in the table.
    for (case, verdict) in run_once(target.clone(), pinned, rounds, true).await {
        if let Some(slot) = all[0].iter_mut().find(|(name, _)| *name == case) {
            slot.1 = verdict;
        }
    }

    let mut table = String::new();
    let mut tsv = String::new();
    let mut failures = Vec::new();
    let scale = target.volume_scale();
    let volume = if scale == 1.0 {
        String::new()
    } else {
        format!(", volume-heavy cases at {scale}x")
    };
    writeln!(
        table,
        "conformance: {} ({} round(s){volume})",
        target.name(),
        rounds
    )
    .unwrap();
    for (i, (name, _)) in all[0].iter().enumerate() {
        let verdicts: Vec<&Verdict> = all.iter().map(|r| &r[i].1).collect();
        let failed: Vec<&String> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Fail(why) => Some(why),
                _ => None,
            })
            .collect();
        let cell = match (verdicts[0], failed.first()) {
            (_, Some(why)) => {
                failures.push(format!("{name}: {why}"));
                format!("FAIL ({} of {rounds})", failed.len())
            }
            (Verdict::NotApplicable(reason), None) => format!("n/a ({reason})"),
            (Verdict::Pass(took), None) => format!("pass ({} ms)", took.as_millis()),
            (Verdict::Fail(_), None) => unreachable!(),
        };
        writeln!(table, "  {name:<44} {cell}").unwrap();
        writeln!(tsv, "{name}\t{cell}").unwrap();
    }
    println!("{table}");
    let dir = crate::common::target_tmp().join("conformance");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{}.tsv", target.name())), tsv).unwrap();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        target.name(),
        failures.join("\n")
    );
}

/// What a panic said, if it said it in text.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}

fn short_id() -> String {
    let id = Message::new("x", "").id;
    id[id.len() - 8..].to_string()
}

// ---- helpers shared by the cases ----

pub fn numbered(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(topic, format!("{i}")))
        .collect()
}

pub fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.payload).into_owned()
}

/// Fetches and acks until `want` distinct messages arrived; fails after
/// `limit`. Returns every delivery seen, duplicates included.
pub async fn consume(sub: &dyn Subscription, want: usize, limit: Duration) -> Result<Vec<Message>> {
    let give_up = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < want {
        ensure!(
            Instant::now() < give_up,
            "got {} of {want} distinct messages within {limit:?}",
            ids.len()
        );
        for delivery in sub.fetch(100, Duration::from_millis(200)).await? {
            ids.insert(delivery.message.id.clone());
            sub.ack(&delivery).await.context("ack")?;
            seen.push(delivery.message);
        }
    }
    Ok(seen)
}

/// Asserts that nothing (more) is delivered within `quiet`.
pub async fn expect_nothing(sub: &dyn Subscription, quiet: Duration) -> Result<()> {
    let extra = sub.fetch(10, quiet).await?;
    ensure!(
        extra.is_empty(),
        "unexpected deliveries: {:?}",
        extra.iter().map(payload).collect::<Vec<_>>()
    );
    Ok(())
}

pub fn distinct_ids(messages: &[Message]) -> HashSet<String> {
    messages.iter().map(|m| m.id.clone()).collect()
}
