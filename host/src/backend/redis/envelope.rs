//! A compact binary envelope for one message: what Redis pub/sub carries,
//! and what the Streams backend parks in its per-group retry structures.
//!
//! Layout (all integers big-endian): `SLv1`, attempts (u32), timestamp ms
//! (u64), id, topic (length-prefixed u32 strings), key (u8 presence flag,
//! then a string), header count (u32) and name/value strings, payload
//! (length-prefixed bytes). Binary so payloads travel without base64.

use anyhow::{Result, bail, ensure};

use crate::message::Message;

const MAGIC: &[u8; 4] = b"SLv1";

/// Encodes a message and how many attempts it has had so far.
pub fn encode(message: &Message, attempts: u32) -> Vec<u8> {
    let headers: usize = message
        .headers
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(
        40 + message.id.len()
            + message.topic.len()
            + message.key.as_ref().map_or(0, String::len)
            + headers
            + message.payload.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&attempts.to_be_bytes());
    out.extend_from_slice(&message.timestamp_ms.to_be_bytes());
    put(&mut out, message.id.as_bytes());
    put(&mut out, message.topic.as_bytes());
    match &message.key {
        Some(key) => {
            out.push(1);
            put(&mut out, key.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(message.headers.len() as u32).to_be_bytes());
    for (name, value) in &message.headers {
        put(&mut out, name.as_bytes());
        put(&mut out, value.as_bytes());
    }
    put(&mut out, &message.payload);
    out
}

/// Decodes an envelope into the message and its attempts so far.
pub fn decode(bytes: &[u8]) -> Result<(Message, u32)> {
    let mut r = Reader { bytes, at: 0 };
    ensure!(
        r.take(4)? == MAGIC,
        "not a Sluice envelope (expected it to start with SLv1)"
    );
    let attempts = u32::from_be_bytes(r.take(4)?.try_into()?);
    let timestamp_ms = u64::from_be_bytes(r.take(8)?.try_into()?);
    let id = r.string()?;
    let topic = r.string()?;
    let key = match r.take(1)?[0] {
        0 => None,
        1 => Some(r.string()?),
        other => bail!("envelope: bad key flag {other}"),
    };
    let count = r.u32()? as usize;
    // Each header takes at least 8 bytes: a hostile count cannot make us
    // allocate more than the envelope's size.
    ensure!(
        count <= bytes.len() / 8,
        "envelope: {count} headers cannot fit"
    );
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        headers.push((r.string()?, r.string()?));
    }
    let payload = r.bytes()?.to_vec();
    ensure!(
        r.at == bytes.len(),
        "envelope: {} trailing bytes",
        bytes.len() - r.at
    );
    Ok((
        Message {
            id,
            topic,
            key,
            headers,
            payload,
            timestamp_ms,
        },
        attempts,
    ))
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            bail!("envelope is truncated");
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String> {
        Ok(std::str::from_utf8(self.bytes()?)?.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let message = Message::new("orders.eu", vec![0u8, 255, 10])
            .with_key("k")
            .with_header("a", "1")
            .with_header("a", "zoë ✓");
        let (back, attempts) = decode(&encode(&message, 3)).unwrap();
        assert_eq!(back, message);
        assert_eq!(attempts, 3);
        let keyless = Message::new("t", "");
        assert_eq!(decode(&encode(&keyless, 0)).unwrap().0, keyless);
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(b"hello").is_err());
        let mut bytes = encode(&Message::new("t", "payload"), 1);
        bytes.truncate(bytes.len() - 2);
        assert!(decode(&bytes).is_err());
        let mut bytes = encode(&Message::new("t", "payload"), 1);
        bytes.push(0);
        assert!(decode(&bytes).is_err());
    }
}
