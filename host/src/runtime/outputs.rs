//! What a plugin may hand the host in one call. Everything the host holds
//! on a plugin's behalf counts against that plugin: the number and bytes of
//! its outputs and `publish` calls are capped per call, one message's size
//! is capped host-wide, and the `sluice-` headers are the host's alone.

use super::sluice::plugin::types;
use crate::message::Message;

/// Headers with this prefix are set by the host; whatever a plugin puts
/// there is dropped, so no output can pose as a dead letter or claim
/// another route, hop count or version.
pub const HOST_HEADER_PREFIX: &str = "sluice-";

/// Longest header name a plugin may set, in bytes.
const MAX_HEADER_NAME: usize = 256;

/// Per-call and per-message caps on what a plugin hands the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Outputs and `publish` calls of one call, together.
    pub max_outputs: usize,
    /// Bytes of those outputs together (payloads, topics, keys, headers).
    pub max_bytes: usize,
    /// Bytes of any one message (payload, key and headers), host-wide.
    pub max_message_bytes: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits {
            max_outputs: 10_000,
            max_bytes: 64 << 20,
            max_message_bytes: 1 << 20,
        }
    }
}

/// What one call has handed in so far.
#[derive(Debug, Default)]
pub struct Tally {
    outputs: usize,
    bytes: usize,
    /// Set once the call went over a cap; the call then fails as a whole.
    pub exceeded: Option<String>,
}

impl Tally {
    /// Counts one output, or refuses it (and remembers why) if it would
    /// take the call over a cap. A refused output is not kept.
    pub fn admit(&mut self, limits: &OutputLimits, output: &Message) -> Result<(), String> {
        if let Some(reason) = &self.exceeded {
            return Err(reason.clone());
        }
        let size = output.size();
        let refusal = if size > limits.max_message_bytes {
            Some(format!(
                "an output of {size} bytes exceeds max_message_bytes ({})",
                limits.max_message_bytes
            ))
        } else if self.outputs + 1 > limits.max_outputs {
            Some(format!(
                "more than {} outputs in one call (max_outputs)",
                limits.max_outputs
            ))
        } else if self.bytes + size > limits.max_bytes {
            Some(format!(
                "more than {} MiB of outputs in one call (max_output_mb)",
                limits.max_bytes >> 20
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.exceeded = Some(reason.clone());
            return Err(reason);
        }
        self.outputs += 1;
        self.bytes += size;
        Ok(())
    }
}

/// Drops the host's headers from a plugin's output and checks the rest:
/// a name is 1 to 256 visible ASCII characters other than `:`, a value has
/// no control characters but tab (so every backend can carry it, NATS and
/// HTTP-style headers included).
pub fn clean_headers(headers: &mut Vec<types::HeaderResult>) -> Result<(), String> {
    headers.retain(|h| !is_host_header(&h.name));
    for header in headers.iter() {
        let name = &header.name;
        if name.is_empty()
            || name.len() > MAX_HEADER_NAME
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        {
            return Err(format!(
                "header name {} is not 1 to {MAX_HEADER_NAME} visible ASCII characters without `:`",
                super::log::escape(name, 64)
            ));
        }
        if header.value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!(
                "header `{name}` has a control character in its value"
            ));
        }
    }
    Ok(())
}

/// Whether a header name belongs to the host (any letter case).
pub fn is_host_header(name: &str) -> bool {
    name.len() >= HOST_HEADER_PREFIX.len()
        && name.as_bytes()[..HOST_HEADER_PREFIX.len()]
            .eq_ignore_ascii_case(HOST_HEADER_PREFIX.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(payload: usize) -> Message {
        Message::new("t", vec![0; payload])
    }

    fn header(name: &str, value: &str) -> types::HeaderResult {
        types::HeaderResult {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn a_call_stops_at_its_output_count() {
        let limits = OutputLimits {
            max_outputs: 3,
            ..OutputLimits::default()
        };
        let mut tally = Tally::default();
        for _ in 0..3 {
            tally.admit(&limits, &outgoing(1)).unwrap();
        }
        let refusal = tally.admit(&limits, &outgoing(1)).unwrap_err();
        assert!(refusal.contains("max_outputs"), "{refusal}");
        assert!(tally.exceeded.is_some());
    }

    #[test]
    fn a_call_stops_at_its_bytes_and_stays_stopped() {
        let limits = OutputLimits {
            max_bytes: 2 << 20,
            max_message_bytes: 4 << 20,
            ..OutputLimits::default()
        };
        let mut tally = Tally::default();
        tally.admit(&limits, &outgoing(1 << 20)).unwrap();
        let refusal = tally.admit(&limits, &outgoing(1 << 20)).unwrap_err();
        assert!(refusal.contains("max_output_mb"), "{refusal}");
        // Once over, even a small output is refused: the call has failed.
        assert!(tally.admit(&limits, &outgoing(1)).is_err());
    }

    #[test]
    fn one_message_over_the_host_maximum_is_refused() {
        let mut tally = Tally::default();
        let refusal = tally
            .admit(&OutputLimits::default(), &outgoing((1 << 20) + 1))
            .unwrap_err();
        assert!(refusal.contains("max_message_bytes"), "{refusal}");
    }

    #[test]
    fn host_headers_are_dropped_and_bad_ones_refused() {
        let mut headers = vec![
            header("Sluice-Dead-Letter-Cause", "forged"),
            header("sluice-hops", "0"),
            header("x-ok", "fine\tvalue"),
        ];
        clean_headers(&mut headers).unwrap();
        let names: Vec<&str> = headers.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["x-ok"]);

        for bad in [
            vec![header("x-evil\nsluice-route", "v")],
            vec![header("", "v")],
            vec![header("a:b", "v")],
            vec![header("x", "line\nbreak")],
        ] {
            let mut bad = bad;
            let name = bad[0].name.clone();
            assert!(clean_headers(&mut bad).is_err(), "{name:?}");
        }
    }
}
