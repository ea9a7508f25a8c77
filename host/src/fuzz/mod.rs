//! Fuzzing of every reader of untrusted bytes, on the stable toolchain.
//!
//! Each target feeds one reader, or the readers of one format, with inputs
//! made three ways: random bytes, strings of the format's tokens, and
//! mutations of the seed corpus in `host/fuzz/corpus/<target>/` (bits
//! flipped, bytes inserted, deleted or repeated, the input cut short,
//! numbers swapped for boundary values, pieces of other seeds spliced in).
//! Before any of that, every seed and every file in
//! `host/fuzz/regressions/<target>/` is replayed as it is.
//!
//! A reader must answer an error or a clean result. A panic fails the
//! target, and so does a single allocation far larger than the input (a
//! length field believed). The failing input is shrunk, by proptest and
//! then byte by byte, saved to `host/fuzz/regressions/<target>/`, and
//! replayed by every later run, so a finding stays a test once fixed.
//!
//! `SLUICE_FUZZ_CASES` sets how many inputs each target generates (256 by
//! default, which keeps the whole set to a few seconds of `cargo test`).
//! `SLUICE_FUZZ_SECONDS` makes it a long run: the targets share that many
//! seconds of the test threads, each running batches until its share is
//! spent and reporting its progress. A target appends its count to the
//! file `SLUICE_FUZZ_REPORT` names, from which `cargo xtask fuzz` prints
//! its summary.

// A build without every backend leaves some helpers unused and some lists
// of targets without additions.
#![cfg_attr(not(feature = "full"), allow(dead_code, unused_mut))]

mod alloc;
mod config;
#[cfg(feature = "filelog")]
mod filelog;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "full")]
mod seeds;
#[cfg(feature = "sqlite")]
mod sql;
#[cfg(feature = "sqs")]
mod sqs;
mod urls;

use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use sha2::{Digest, Sha256};

/// One fuzz target: the name of its corpus and regression directories,
/// and what its generator builds inputs from.
pub struct Target {
    pub name: &'static str,
    /// Tokens of the format, strung together by the generator and inserted
    /// by mutations, so that text formats are reached past their first byte.
    pub dictionary: &'static [&'static [u8]],
    /// The longest input made from scratch.
    pub max_len: usize,
}

/// Every target this build has; long runs share their time among them.
fn targets() -> Vec<&'static Target> {
    let mut all = vec![&config::TARGET, &urls::TARGET];
    #[cfg(feature = "filelog")]
    all.extend([
        &filelog::RECORD,
        &filelog::SEGMENT,
        &filelog::JOURNAL,
        &filelog::SNAPSHOT,
    ]);
    #[cfg(feature = "redis")]
    all.extend([&redis::ENVELOPE, &redis::ENTRY]);
    #[cfg(feature = "nats")]
    all.push(&nats::TARGET);
    #[cfg(feature = "sqs")]
    all.push(&sqs::TARGET);
    #[cfg(feature = "sqlite")]
    all.push(&sql::TARGET);
    #[cfg(feature = "kafka")]
    all.extend([&kafka::TARGET, &kafka::METADATA]);
    all
}

/// Tokens every format meets: numbers at the edges of the integer types,
/// JSON and URL punctuation, escapes, line ends and multi-byte text.
const COMMON: &[&[u8]] = &[
    b"0",
    b"1",
    b"-1",
    b"255",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e309",
    b"nan",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"&",
    b"?",
    b"@",
    b"/",
    b"%",
    b"%00",
    b"%zz",
    b"%C3%28",
    b"\n",
    b"\r\n",
    b"\0",
    b" ",
    b"\xc3\xa9",
    b"\xef\xbf\xbf",
    b"\xff",
    b"null",
    b"true",
];

/// Numbers a mutation puts in place of a number of the input.
const BOUNDARY_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1.5",
    "1e309",
];

/// The largest single allocation reading an input may make: this much,
/// plus a fixed multiple of the input's size.
const ALLOCATION_ALLOWANCE: usize = 1 << 20;
const ALLOCATION_PER_INPUT_BYTE: usize = 16;

/// Runs a target: replays its seeds and regressions, then generated and
/// mutated inputs; panics, naming the saved input, on the first failure.
pub fn fuzz(target: &Target, check: impl Fn(&[u8])) {
    install_panic_hook();
    let started = Instant::now();
    let seeds = files(&corpus_dir(target.name));
    assert!(
        !seeds.is_empty(),
        "fuzz target `{}` has no seeds in {}",
        target.name,
        corpus_dir(target.name).display()
    );
    let regressions = files(&regressions_dir(target.name));
    for (path, bytes) in seeds.iter().chain(&regressions) {
        if let Err(why) = attempt(&check, bytes) {
            panic!(
                "fuzz target `{}`: {} fails: {why}",
                target.name,
                path.display()
            );
        }
    }
    let replayed = (seeds.len() + regressions.len()) as u64;
    let seeds: Arc<Vec<Vec<u8>>> = Arc::new(seeds.into_iter().map(|(_, bytes)| bytes).collect());
    let strategy = inputs(target, seeds);
    let deadline = share_of_budget().map(|share| started + share);
    let generated = Cell::new(0u64);
    let mut last_progress = Instant::now();
    loop {
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            max_shrink_iters: 2048,
            ..Config::default()
        });
        let result = runner.run(&strategy, |input| {
            generated.set(generated.get() + 1);
            attempt(&check, &input).map_err(TestCaseError::fail)
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(_, input)) => found(target, &check, &input),
            Err(TestError::Abort(why)) => panic!("fuzz target `{}` gave up: {why}", target.name),
        }
        let Some(deadline) = deadline else { break };
        if Instant::now() >= deadline {
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            println!(
                "fuzz {}: {} inputs so far",
                target.name,
                replayed + generated.get()
            );
        }
    }
    let total = replayed + generated.get();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "fuzz {}: {total} inputs ({replayed} seeds and regressions replayed) in {seconds:.1} s",
        target.name
    );
    if let Some(report) = std::env::var_os("SLUICE_FUZZ_REPORT") {
        let line = format!("{}\t{total}\t{seconds:.1}\n", target.name);
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&report)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("fuzz {}: cannot write the report: {e}", target.name);
        }
    }
}

/// Generated inputs per target, and per batch of a long run.
fn cases() -> u32 {
    std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

/// This target's share of a long run: the run's seconds times the test
/// threads, divided among the targets.
fn share_of_budget() -> Option<Duration> {
    let seconds: u64 = std::env::var("SLUICE_FUZZ_SECONDS").ok()?.parse().ok()?;
    let threads = std::env::var("RUST_TEST_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    let share = threads as f64 / targets().len() as f64;
    Some(Duration::from_secs(seconds).mul_f64(share))
}

/// Feeds one input to a target; the panic (with its place) or the
/// oversized allocation it caused, if any.
fn attempt(check: &impl Fn(&[u8]), input: &[u8]) -> Result<(), String> {
    let (outcome, largest) = alloc::largest_during(|| quietly(|| check(input)));
    outcome?;
    let allowed = ALLOCATION_ALLOWANCE + ALLOCATION_PER_INPUT_BYTE * input.len();
    if largest > allowed {
        return Err(format!(
            "allocated far more than the input holds:\none allocation of {largest} bytes for \
             an input of {} bytes",
            input.len()
        ));
    }
    Ok(())
}

thread_local! {
    /// Set while this thread runs a target's reader, whose panics are
    /// expected findings, reported by the runner instead of the hook.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Wraps the panic hook once, so a quiet thread's panics are kept (with
/// where they happened) instead of printed; other threads print as before.
fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.get() {
                LAST_PANIC.set(Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `work`, turning a panic into its message and place.
fn quietly(work: impl FnOnce()) -> Result<(), String> {
    QUIET.set(true);
    let result = panic::catch_unwind(AssertUnwindSafe(work));
    QUIET.set(false);
    result.map_err(|_| {
        LAST_PANIC
            .take()
            .unwrap_or_else(|| "panicked (no message)".into())
    })
}

/// What identifies a failure across shrinking: its first line, which says
/// where it panicked (the message may quote the input) or which limit it
/// broke (the sizes change as the input shrinks).
fn signature(failure: &str) -> &str {
    failure.lines().next().unwrap_or(failure)
}

/// Shrinks a failing input further, saves it as a regression and fails.
fn found(target: &Target, check: &impl Fn(&[u8]), input: &[u8]) -> ! {
    let failure = attempt(check, input).err().unwrap_or_default();
    let minimal = minimise(input, |candidate| {
        attempt(check, candidate)
            .err()
            .is_some_and(|again| signature(&again) == signature(&failure))
    });
    let failure = attempt(check, &minimal).err().unwrap_or(failure);
    let dir = regressions_dir(target.name);
    let path = dir.join(hex::encode(&Sha256::digest(&minimal)[..8]));
    let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &minimal));
    let place = match saved {
        Ok(()) => format!("saved as {}", path.display()),
        Err(e) => format!("not saved: {e}"),
    };
    panic!(
        "fuzz target `{}` failed: {failure}\ninput ({} bytes, {place}): {}",
        target.name,
        minimal.len(),
        minimal.escape_ascii()
    );
}

/// Removes ever smaller chunks of `input` while it still fails.
fn minimise(input: &[u8], fails: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut best = input.to_vec();
    let mut chunk = best.len().div_ceil(2).max(1);
    let mut tries = 0;
    while tries < 4096 {
        let mut at = 0;
        let mut shrunk = false;
        while at < best.len() && tries < 4096 {
            tries += 1;
            let mut candidate = best.clone();
            candidate.drain(at..(at + chunk).min(best.len()));
            if fails(&candidate) {
                best = candidate;
                shrunk = true;
            } else {
                at += chunk;
            }
        }
        if chunk == 1 && !shrunk {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    best
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

fn regressions_dir(target: &str) -> PathBuf {
    fuzz_dir().join("regressions").join(target)
}

/// The files of a directory, by name; none if it does not exist.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, Vec<u8>)> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let bytes = std::fs::read(&path).ok()?;
            Some((path, bytes))
        })
        .collect();
    found.sort();
    found
}

/// Splits a structured target's input into its fields, at NUL bytes.
pub fn fields(bytes: &[u8]) -> Vec<&[u8]> {
    bytes.split(|b| *b == 0).collect()
}

/// Joins fields the way [`fields`] splits them, for writing seeds.
pub fn join_fields<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(field);
    }
    out
}

/// A directory for a target that reads files; in memory where the
/// machine offers it, since a target makes thousands.
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("sluice-fuzz-").clone();
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder.tempdir().expect("a temporary directory")
}

/// One change a mutation makes to a seed.
#[derive(Clone, Debug)]
enum Edit {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Word(Index, &'static [u8]),
    Delete(Index, u8),
    Truncate(Index),
    Repeat(Index, u8),
    Number(Index, &'static str),
    Splice(Index, Index, Index, u8),
}

impl Edit {
    fn apply(&self, bytes: &mut Vec<u8>, seeds: &[Vec<u8>]) {
        let len = bytes.len();
        match self {
            Edit::Flip(at, bit) if len > 0 => bytes[at.index(len)] ^= 1 << (bit % 8),
            Edit::Set(at, byte) if len > 0 => bytes[at.index(len)] = *byte,
            Edit::Insert(at, inserted) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
            Edit::Word(at, word) => {
                let at = at.index(len + 1);
                bytes.splice(at..at, word.iter().copied());
            }
            Edit::Delete(at, n) if len > 0 => {
                let at = at.index(len);
                bytes.drain(at..(at + *n as usize + 1).min(len));
            }
            Edit::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Edit::Repeat(at, n) if len > 0 => {
                let at = at.index(len);
                let chunk = bytes[at..(at + *n as usize + 1).min(len)].to_vec();
                bytes.splice(at..at, chunk);
            }
            Edit::Number(which, number) => {
                let runs = digit_runs(bytes);
                match runs.get(which.index(runs.len().max(1))) {
                    Some(run) => {
                        bytes.splice(run.clone(), number.bytes());
                    }
                    None => {
                        let at = which.index(len + 1);
                        bytes.splice(at..at, number.bytes());
                    }
                }
            }
            Edit::Splice(at, seed, from, n) => {
                let other = &seeds[seed.index(seeds.len())];
                let from = from.index(other.len() + 1);
                let chunk = &other[from..(from + *n as usize).min(other.len())];
                let at = at.index(len + 1);
                bytes.splice(at..at, chunk.iter().copied());
            }
            _ => {}
        }
    }
}

/// Where the decimal numbers of an input are.
fn digit_runs(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, byte) in bytes.iter().enumerate() {
        match (byte.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                runs.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..bytes.len());
    }
    runs
}

fn edits(words: Vec<&'static [u8]>) -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(at, b)| Edit::Insert(at, b)),
        (any::<Index>(), select(words)).prop_map(|(at, word)| Edit::Word(at, word)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, n)| Edit::Delete(at, n)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(at, n)| Edit::Repeat(at, n)),
        (any::<Index>(), select(BOUNDARY_NUMBERS)).prop_map(|(at, n)| Edit::Number(at, n)),
        (any::<Index>(), any::<Index>(), any::<Index>(), any::<u8>())
            .prop_map(|(at, seed, from, n)| Edit::Splice(at, seed, from, n)),
    ]
}

/// Random bytes, strings of tokens, and (most often) mutated seeds.
fn inputs(target: &Target, seeds: Arc<Vec<Vec<u8>>>) -> BoxedStrategy<Vec<u8>> {
    let words: Vec<&'static [u8]> = COMMON.iter().chain(target.dictionary).copied().collect();
    let raw = vec(any::<u8>(), 0..=target.max_len);
    let token = prop_oneof![
        4 => select(words.clone()).prop_map(|word| word.to_vec()),
        1 => vec(any::<u8>(), 1..4),
    ];
    let max_len = target.max_len;
    let written = vec(token, 0..48).prop_map(move |parts| {
        let mut text = parts.concat();
        text.truncate(max_len);
        text
    });
    let pool = seeds.clone();
    let mutated = (any::<Index>(), vec(edits(words), 1..8)).prop_map(move |(seed, edits)| {
        let mut bytes = pool[seed.index(pool.len())].clone();
        for edit in &edits {
            edit.apply(&mut bytes, &pool);
        }
        bytes
    });
    prop_oneof![1 => raw, 2 => written, 6 => mutated].boxed()
}

#[test]
fn every_target_has_seeds_and_every_corpus_a_target() {
    let names: Vec<&str> = targets().iter().map(|t| t.name).collect();
    for name in &names {
        assert!(
            !files(&corpus_dir(name)).is_empty(),
            "fuzz target `{name}` has no seeds"
        );
    }
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let known = names.contains(&name.as_str())
                // Targets of backends this build leaves out.
                || cfg!(not(feature = "full"));
            assert!(known, "{kind}/{name} belongs to no fuzz target");
        }
    }
}

#[test]
fn minimising_keeps_what_fails() {
    let input = b"aaaa{bbbb}cccc".to_vec();
    let minimal = minimise(&input, |candidate| {
        candidate.contains(&b'{') && candidate.contains(&b'}')
    });
    assert_eq!(minimal, b"{}");
}

#[test]
fn panics_and_oversized_allocations_fail_an_input() {
    install_panic_hook();
    let failure = attempt(&|_: &[u8]| panic!("boom"), b"").unwrap_err();
    assert!(
        failure.contains("fuzz/mod.rs") && failure.contains("boom"),
        "{failure}"
    );
    let greedy = |_: &[u8]| drop(std::hint::black_box(Vec::<u8>::with_capacity(64 << 20)));
    let failure = attempt(&greedy, b"tiny").unwrap_err();
    assert!(failure.contains("allocation"), "{failure}");
    assert!(attempt(&|input: &[u8]| drop(input.to_vec()), b"tiny").is_ok());
}
