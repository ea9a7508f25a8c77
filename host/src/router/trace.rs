//! W3C trace context across routes: an input's `traceparent` (and
//! `tracestate`) says which trace it belongs to, and everything its
//! delivery publishes (outputs and dead letters) carries a `traceparent` in
//! that trace whose parent is this delivery. An input without a valid one
//! starts a new trace. So a chain of routes, and whatever tracing system
//! reads the headers, can follow one message through every hop. When
//! delivery spans are exported, the delivery's id is its span's, so the
//! collector links the spans of every hop.
//!
//! See <https://www.w3.org/TR/trace-context/>: `traceparent` is
//! `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, and
//! an all-zero id is invalid.

use rand::Rng;

use crate::message::{Message, headers};
use crate::telemetry::{self, otlp};

/// The trace context of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// What this delivery's outputs carry: `00-<trace id>-<this
    /// delivery's id>-<flags>`, made once for all of them.
    traceparent: String,
    /// The input's `tracestate`, passed on unchanged.
    state: Option<String>,
}

impl Trace {
    /// The context of a delivery of `input`: in the input's trace if it
    /// carries a valid `traceparent`, else in a new one.
    pub fn of(input: &Message) -> Self {
        let mut rng = rand::rng();
        let mut traceparent = String::with_capacity(55);
        traceparent.push_str("00-");
        let (flags, state) = match input.header(headers::TRACEPARENT).and_then(parse) {
            Some((trace_id, _, flags)) => {
                traceparent.push_str(trace_id);
                (flags, input.header(headers::TRACESTATE).map(str::to_string))
            }
            None => {
                push_hex(&mut traceparent, &rng.random::<u128>().max(1).to_be_bytes());
                ("01", None)
            }
        };
        traceparent.push('-');
        push_hex(&mut traceparent, &rng.random::<u64>().max(1).to_be_bytes());
        traceparent.push('-');
        traceparent.push_str(flags);
        Trace { traceparent, state }
    }

    /// The context of a delivery of `input` whose span `span` (not yet
    /// entered) is exported: the span joins the input's trace, or starts
    /// one, and the span's own id is the parent of what it publishes.
    /// `None` when spans are not exported.
    pub fn exported(input: &Message, span: &tracing::Span) -> Option<Self> {
        if !telemetry::exporting() || span.is_disabled() {
            return None;
        }
        let parent = input.header(headers::TRACEPARENT).and_then(parse);
        let state = parent.and(input.header(headers::TRACESTATE));
        let parent = parent.map(|(trace_id, parent_id, flags)| otlp::RemoteParent {
            trace_id,
            parent_id,
            flags,
            state,
        });
        let (trace_id, span_id, flags) = otlp::adopt(span, parent)?;
        Some(Trace {
            traceparent: format!("00-{trace_id}-{span_id}-{flags:02x}"),
            state: state.map(str::to_string),
        })
    }

    /// The trace id (32 hex digits).
    #[cfg(test)]
    fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// This delivery's own id in the trace (16 hex digits): the parent of
    /// what it publishes.
    #[cfg(test)]
    fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Puts this delivery's context on a message it publishes, replacing
    /// any the plugin copied from its input.
    pub fn stamp(&self, message: &mut Message) {
        message.set_header(headers::TRACEPARENT, self.traceparent.clone());
        match &self.state {
            Some(state) => message.set_header(headers::TRACESTATE, state.clone()),
            None => message
                .headers
                .retain(|(name, _)| name != headers::TRACESTATE),
        }
    }
}

/// The trace id, parent id and flags of a valid `traceparent`.
fn parse(value: &str) -> Option<(&str, &str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four parts; a later version may add more.
    let valid = is_hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && is_hex(flags, 2);
    valid.then_some((trace_id, parent_id, flags))
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_delivery_continues_its_inputs_trace() {
        let mut input = Message::new("t", "x");
        input.set_header(headers::TRACEPARENT, PARENT);
        input.set_header(headers::TRACESTATE, "vendor=abc");
        let trace = Trace::of(&input);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(trace.span_id(), "00f067aa0ba902b7");
        let mut output = Message::new("u", "y");
        trace.stamp(&mut output);
        let stamped = output.header(headers::TRACEPARENT).unwrap();
        assert_eq!(
            parse(stamped),
            Some((trace.trace_id(), trace.span_id(), "01"))
        );
        assert!(stamped.contains(trace.span_id()));
        assert_eq!(output.header(headers::TRACESTATE), Some("vendor=abc"));
    }

    #[test]
    fn an_input_without_a_valid_traceparent_starts_a_trace() {
        for bad in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
        ] {
            let mut input = Message::new("t", "x");
            if let Some(value) = bad {
                input.set_header(headers::TRACEPARENT, value);
            }
            input.set_header(headers::TRACESTATE, "stale=1");
            let trace = Trace::of(&input);
            assert_ne!(
                trace.trace_id(),
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "{bad:?}"
            );
            let mut output = input.clone();
            trace.stamp(&mut output);
            let stamped = output.header(headers::TRACEPARENT).unwrap();
            assert!(parse(stamped).is_some(), "{stamped}");
            // A new trace does not carry the old trace's vendor state.
            assert_eq!(output.header(headers::TRACESTATE), None, "{bad:?}");
        }
        // Two new traces differ.
        let input = Message::new("t", "x");
        assert_ne!(Trace::of(&input).trace_id(), Trace::of(&input).trace_id());
    }
}
