//! Conveniences on the generated message types.
//!
//! The types themselves come from the WIT bindings; because they are
//! generated inside this crate, plain inherent impls can extend them and no
//! extension traits are needed.

use crate::{Failure, Header, Message, Outgoing};

impl Header {
    #[must_use]
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// First header called exactly `name`. The contract says nothing about
/// case, so none is folded: what the publisher wrote is what matches.
fn find_header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name == name)
        .map(|h| h.value.as_str())
}

impl Message {
    /// A first-delivery message with no key, headers, id or timestamp.
    ///
    /// Real messages only come from the host; this exists so handler
    /// functions can be unit-tested natively. Override other fields with
    /// struct-update syntax: `Message { attempt: 3, ..Message::new(t, p) }`.
    #[must_use]
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            id: String::new(),
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
            attempt: 1,
            timestamp_ms: 0,
        }
    }

    /// Value of the first header called exactly `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The payload as text.
    ///
    /// # Errors
    ///
    /// [`Failure::Reject`] if the payload is not UTF-8: retrying would never
    /// make it valid.
    pub fn payload_str(&self) -> Result<&str, Failure> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| Failure::reject(format!("payload is not valid UTF-8: {e}")))
    }

    /// The reply to this message, if it is a request (it carries a
    /// `sluice-reply-to` header): an output to the requester's reply topic,
    /// to which the host adds the request's correlation id. Sending it
    /// needs the reply topics in the plugin's `publish_to`: `sluice-reply.>`
    /// (and `_INBOX.>` for requests from NATS clients).
    #[must_use]
    pub fn reply(&self, payload: impl Into<Vec<u8>>) -> Option<Outgoing> {
        self.header("sluice-reply-to")
            .map(|topic| Outgoing::new(topic, payload))
    }

    /// Turns this message into an output on `topic`, moving the key,
    /// headers and payload across so forwarding costs no copies.
    #[must_use]
    pub fn forward_to(self, topic: impl Into<String>) -> Outgoing {
        Outgoing {
            topic: topic.into(),
            key: self.key,
            headers: self.headers,
            payload: self.payload,
        }
    }
}

impl Outgoing {
    #[must_use]
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header; an existing header of the same name is kept, as
    /// headers are a list and may legitimately repeat.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Value of the first header called exactly `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl Failure {
    /// A transient failure: the host redelivers the message after a backoff.
    #[must_use]
    pub fn retry(reason: impl Into<String>) -> Self {
        Failure::Retry(reason.into())
    }

    /// A permanent failure: the host sends the message to the dead-letter
    /// topic.
    #[must_use]
    pub fn reject(reason: impl Into<String>) -> Self {
        Failure::Reject(reason.into())
    }

    pub fn reason(&self) -> &str {
        match self {
            Failure::Retry(r) | Failure::Reject(r) => r,
        }
    }

    pub fn is_retry(&self) -> bool {
        matches!(self, Failure::Retry(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_and_header_lookup() {
        let out = Outgoing::new("t", "p")
            .with_key("k")
            .with_header("a", "1")
            .with_header("a", "2");
        assert_eq!(out.key.as_deref(), Some("k"));
        assert_eq!(out.payload, b"p");
        assert_eq!(out.header("a"), Some("1"));
        assert_eq!(out.header("A"), None);
    }

    #[test]
    fn payload_str_rejects_bad_utf8() {
        assert_eq!(Message::new("t", "héllo").payload_str(), Ok("héllo"));
        let err = Message::new("t", vec![0xff, 0xfe])
            .payload_str()
            .unwrap_err();
        assert!(!err.is_retry());
        assert!(err.reason().contains("UTF-8"), "{err:?}");
    }

    #[test]
    fn forward_keeps_key_headers_and_payload() {
        let mut msg = Message::new("in", "body");
        msg.key = Some("k".into());
        msg.headers.push(Header::new("h", "v"));
        let out = msg.forward_to("out");
        assert_eq!(
            out,
            Outgoing::new("out", "body")
                .with_key("k")
                .with_header("h", "v")
        );
    }

    #[test]
    fn failure_helpers() {
        assert_eq!(Failure::retry("x"), Failure::Retry("x".into()));
        assert_eq!(Failure::reject("y"), Failure::Reject("y".into()));
        assert!(Failure::retry("x").is_retry());
        assert_eq!(Failure::reject("y").reason(), "y");
    }
}
