//! Shadow runs: a candidate version of a plugin handles the same messages
//! as the live one, and its results are compared instead of published.
//!
//! A worker calls the candidate right after the live version, for the
//! sampled share of messages, on an instance of its own with the plugin's
//! own deadline and memory cap (so the candidate costs the route at most
//! one more call per sampled message, and cannot hurt it otherwise). Its
//! outputs, its `publish` calls and its failures go nowhere: each pair of
//! results is only counted (same, different, candidate failed) and the
//! latest differences are kept for the report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::VersionInfo;
use crate::message::{Message, headers};
use crate::runtime::{CallError, Outcome, Plugin};

/// Differences kept for the report, newest last.
const KEPT_DIFFERENCES: usize = 20;

/// Bytes of a payload shown in a difference.
const PREVIEW_BYTES: usize = 200;

/// A candidate version running beside the live one.
pub struct Shadow {
    pub plugin: Arc<Plugin>,
    pub info: VersionInfo,
    /// Share of messages the candidate also handles, in 0..=1.
    pub sample: f64,
    pub counts: ShadowCounts,
    differences: Mutex<VecDeque<Difference>>,
}

/// How the candidate's results compared with the live version's.
#[derive(Debug, Default)]
pub struct ShadowCounts {
    /// Both decided the same (same outputs, or the same kind of failure).
    pub same: AtomicU64,
    /// They decided differently.
    pub different: AtomicU64,
    /// The candidate's call did not return (trap, deadline, memory or
    /// output cap) where the live version's did.
    pub candidate_failed: AtomicU64,
}

/// One message on which the two versions disagreed.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub message_id: String,
    pub attempt: u32,
    pub live: String,
    pub candidate: String,
}

/// The state of a shadow run, as the admin API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    pub candidate: VersionInfo,
    pub sample: f64,
    pub same: u64,
    pub different: u64,
    pub candidate_failed: u64,
    /// The latest differences, oldest first.
    pub differences: Vec<Difference>,
}

impl Shadow {
    pub fn new(plugin: Arc<Plugin>, info: VersionInfo, sample: f64) -> Self {
        Shadow {
            plugin,
            info,
            sample,
            counts: ShadowCounts::default(),
            differences: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether the candidate handles this message too.
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || rand::random::<f64>() < self.sample
    }

    /// Counts how the candidate's result compares with the live one's.
    pub fn compare(
        &self,
        message: &Message,
        attempt: u32,
        live: &Result<Outcome, CallError>,
        candidate: &Result<Outcome, CallError>,
    ) {
        let counter = match classify(live, candidate) {
            Comparison::Same => {
                self.counts.same.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Comparison::Different => &self.counts.different,
            Comparison::CandidateFailed => &self.counts.candidate_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut differences = self.differences.lock().unwrap();
        if differences.len() == KEPT_DIFFERENCES {
            differences.pop_front();
        }
        differences.push_back(Difference {
            message_id: message.id.clone(),
            attempt,
            live: summary(live),
            candidate: summary(candidate),
        });
    }

    pub fn report(&self) -> ShadowReport {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ShadowReport {
            candidate: self.info.clone(),
            sample: self.sample,
            same: get(&self.counts.same),
            different: get(&self.counts.different),
            candidate_failed: get(&self.counts.candidate_failed),
            differences: self.differences.lock().unwrap().iter().cloned().collect(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Comparison {
    Same,
    Different,
    CandidateFailed,
}

fn classify(
    live: &Result<Outcome, CallError>,
    candidate: &Result<Outcome, CallError>,
) -> Comparison {
    match (live, candidate) {
        (Ok(_), Err(_)) => Comparison::CandidateFailed,
        _ if summary(live) == summary(candidate) => Comparison::Same,
        _ => Comparison::Different,
    }
}

/// What a call decided, in the terms two versions are compared by: each
/// output's topic, key, headers and payload, or the kind of failure. The
/// header naming the version that made an output is left out.
fn summary(result: &Result<Outcome, CallError>) -> String {
    match result {
        Ok(Outcome::Outputs(outputs)) if outputs.is_empty() => "no outputs".into(),
        Ok(Outcome::Outputs(outputs)) => {
            outputs.iter().map(describe).collect::<Vec<_>>().join("; ")
        }
        Ok(Outcome::Retry(_)) => "retry".into(),
        Ok(Outcome::Reject(_)) => "reject".into(),
        Err(error) => format!("failed: {}", error.cause()),
    }
}

fn describe(output: &Message) -> String {
    let headers: Vec<String> = output
        .headers
        .iter()
        .filter(|(name, _)| name != headers::PLUGIN_VERSION)
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let payload = String::from_utf8_lossy(&output.payload);
    let preview: String = payload.chars().take(PREVIEW_BYTES).collect();
    let cut = if preview.len() < payload.len() {
        "…"
    } else {
        ""
    };
    format!(
        "{} key={} headers=[{}] payload={preview:?}{cut}",
        output.topic,
        output.key.as_deref().unwrap_or("-"),
        headers.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(payloads: &[&str]) -> Result<Outcome, CallError> {
        Ok(Outcome::Outputs(
            payloads.iter().map(|p| Message::new("out", *p)).collect(),
        ))
    }

    #[test]
    fn results_are_sorted_into_same_different_and_candidate_failed() {
        use Comparison::*;
        assert_eq!(classify(&outputs(&["a"]), &outputs(&["a"])), Same);
        assert_eq!(classify(&outputs(&["a"]), &outputs(&["b"])), Different);
        assert_eq!(classify(&outputs(&["a"]), &outputs(&["a", "a"])), Different);
        let mut tagged = Message::new("out", "a");
        tagged.set_header(headers::PLUGIN_VERSION, "0123456789ab");
        assert_eq!(
            classify(&Ok(Outcome::Outputs(vec![tagged])), &outputs(&["a"])),
            Same,
            "the version header is not a difference"
        );
        let retry = |why: &str| Ok(Outcome::Retry(why.into()));
        assert_eq!(
            classify(&retry("x"), &retry("y")),
            Same,
            "failures compare by kind"
        );
        assert_eq!(classify(&retry("x"), &outputs(&["a"])), Different);
        let trap = Err(CallError::Trap("x".into()));
        assert_eq!(classify(&outputs(&["a"]), &trap), CandidateFailed);
        assert_eq!(classify(&trap, &Err(CallError::Trap("y".into()))), Same);
        assert_eq!(
            classify(&trap, &Err(CallError::Timeout(std::time::Duration::ZERO))),
            Different
        );
    }
}
