//! The `file://DIR?…` URL: where the log lives and how it is tuned.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// When appended bytes are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before `publish`, `ack`, `nack` and `fetch` return.
    Always,
    /// By a background thread every `fsync_interval_ms`.
    Interval,
    /// Never by Sluice; the operating system writes back when it likes.
    Never,
}

/// Tuning of one log directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub fsync: Fsync,
    pub fsync_interval: Duration,
    /// A segment is closed and a new one started once it holds this much.
    pub segment_bytes: u64,
    /// Records older than this are dropped even if unacknowledged.
    pub retention: Option<Duration>,
    /// Old segments are dropped while a topic holds more than this.
    pub retention_bytes: Option<u64>,
}

pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Positions inside a segment are kept as `u32`.
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: Fsync::Always,
            fsync_interval: Duration::from_millis(200),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention: None,
            retention_bytes: None,
        }
    }
}

/// Splits a `file://` URL into the directory and its options.
pub fn parse_url(url: &str) -> Result<(PathBuf, Options)> {
    let rest = url
        .strip_prefix("file://")
        .context("a file log URL starts with file://")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        bail!("file log URL `{url}` names no directory (expected file://DIR)");
    }
    let mut options = Options::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("file log URL: parameter `{pair}` is not NAME=VALUE"))?;
        let number = || -> Result<u64> {
            value
                .parse()
                .with_context(|| format!("file log URL: {name} `{value}` is not a number"))
        };
        match name {
            "fsync" => {
                options.fsync = match value {
                    "always" => Fsync::Always,
                    "interval" => Fsync::Interval,
                    "never" => Fsync::Never,
                    _ => bail!(
                        "file log URL: fsync must be always, interval or never, not `{value}`"
                    ),
                }
            }
            "fsync_interval_ms" => {
                options.fsync_interval = Duration::from_millis(number()?.max(1));
            }
            "segment_bytes" => {
                let bytes = number()?;
                if !(1024..=MAX_SEGMENT_BYTES).contains(&bytes) {
                    bail!(
                        "file log URL: segment_bytes must be between 1024 and {MAX_SEGMENT_BYTES}"
                    );
                }
                options.segment_bytes = bytes;
            }
            "retention_ms" => options.retention = Some(Duration::from_millis(number()?)),
            "retention_bytes" => options.retention_bytes = Some(number()?),
            _ => bail!(
                "file log URL: unknown parameter `{name}` (known: fsync, fsync_interval_ms, \
                 segment_bytes, retention_ms, retention_bytes)"
            ),
        }
    }
    Ok((PathBuf::from(path), options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parameters() {
        let (dir, options) =
            parse_url("file:///var/lib/sluice?fsync=interval&fsync_interval_ms=50&retention_ms=10")
                .unwrap();
        assert_eq!(dir, PathBuf::from("/var/lib/sluice"));
        assert_eq!(options.fsync, Fsync::Interval);
        assert_eq!(options.fsync_interval, Duration::from_millis(50));
        assert_eq!(options.retention, Some(Duration::from_millis(10)));
        assert_eq!(parse_url("file://log").unwrap().1, Options::default());
        assert!(parse_url("file://").is_err());
        assert!(parse_url("file://x?fsync=sometimes").is_err());
        assert!(parse_url("file://x?segment_bytes=1").is_err());
        assert!(parse_url("file://x?colour=blue").is_err());
    }
}
