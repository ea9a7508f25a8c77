//! The `file://DIR?…` URL: where the log lives and how it is tuned.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::backend::url::BackendUrl;

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
    let mut url = BackendUrl::split(url, "file")?;
    url.require_address("directory (expected file://DIR)")?;
    let default = Options::default();
    let fsync = [
        ("always", Fsync::Always),
        ("interval", Fsync::Interval),
        ("never", Fsync::Never),
    ];
    let options = Options {
        fsync: url.take_choice("fsync", &fsync)?.unwrap_or(default.fsync),
        fsync_interval: url
            .take_ms("fsync_interval_ms")?
            .map_or(default.fsync_interval, |d| d.max(Duration::from_millis(1))),
        segment_bytes: url
            .take_in("segment_bytes", 1024..=MAX_SEGMENT_BYTES)?
            .unwrap_or(default.segment_bytes),
        retention: url.take_ms("retention_ms")?,
        retention_bytes: url.take("retention_bytes", "a number of bytes")?,
    };
    url.finish(&[
        "fsync",
        "fsync_interval_ms",
        "segment_bytes",
        "retention_ms",
        "retention_bytes",
    ])?;
    Ok((PathBuf::from(url.address), options))
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
