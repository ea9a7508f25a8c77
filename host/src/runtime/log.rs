//! A plugin's text in the host's log: its log lines and its failure reasons
//! arrive escaped (no newline or control character raw, so nothing a plugin
//! writes can pose as a host line), cut to a few KiB, and, per plugin,
//! rate-limited, with the lines dropped counted for `/metrics`.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::rate::TokenBucket;

/// Longest plugin text that reaches the log or a header, in bytes.
pub const MAX_TEXT: usize = 4096;

/// `text` with every control character written as an escape (`\n`,
/// `\u{1b}`) and cut to at most `max` bytes of its own, saying how much
/// was cut.
pub fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 2);
    let mut taken = 0;
    for c in text.chars() {
        if taken + c.len_utf8() > max {
            let _ = write!(out, "… ({} more bytes)", text.len() - taken);
            return out;
        }
        taken += c.len_utf8();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A token bucket of log lines, shared by every instance of a plugin.
#[derive(Debug)]
pub struct LogBudget {
    state: Mutex<Budget>,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Budget {
    bucket: TokenBucket,
    /// Drops not yet reported in the log.
    unreported: u64,
}

/// Whether a line may be written, and how many were dropped before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Write { dropped_before: u64 },
    Drop,
}

impl LogBudget {
    pub fn new(per_second: u32, burst: u32) -> Self {
        LogBudget {
            state: Mutex::new(Budget {
                bucket: TokenBucket::new(f64::from(per_second), f64::from(burst)),
                unreported: 0,
            }),
            dropped: AtomicU64::new(0),
        }
    }

    /// Takes one line's token, if there is one.
    pub fn admit(&self) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.bucket.try_take() {
            Admit::Write {
                dropped_before: std::mem::take(&mut state.unreported),
            }
        } else {
            state.unreported += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            Admit::Drop
        }
    }

    /// Lines dropped since the plugin was configured.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Default for LogBudget {
    /// 100 lines a second, in bursts of up to 500.
    fn default() -> Self {
        LogBudget::new(100, 500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let forged = "done\n2026-01-01 ERROR sluice::app: forged\r\u{1b}[31m";
        let escaped = escape(forged, MAX_TEXT);
        assert!(!escaped.chars().any(char::is_control), "{escaped}");
        assert!(escaped.contains("done\\n2026"), "{escaped}");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let text = "é".repeat(5000);
        let cut = escape(&text, MAX_TEXT);
        assert!(cut.len() < MAX_TEXT + 40, "{}", cut.len());
        assert!(cut.ends_with("more bytes)"), "{}", &cut[cut.len() - 30..]);
    }

    #[test]
    fn a_flood_is_dropped_and_counted() {
        let budget = LogBudget::new(1, 10);
        let written = (0..1000)
            .filter(|_| matches!(budget.admit(), Admit::Write { .. }))
            .count();
        assert!((10..=11).contains(&written), "{written}");
        assert!(budget.dropped() >= 989);
    }
}
