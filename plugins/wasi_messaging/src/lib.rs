//! A handler written against the `wasi:messaging@0.2.0-draft` WIT alone,
//! with plain wit-bindgen and no Sluice SDK, so the host's tests can show
//! that it runs components nobody wrote in Sluice's terms.
//!
//! The payload picks what it does, so one component covers every path a
//! test needs; `plugins/python/wasi_messaging/app.py` behaves the same
//! (less `ping` and `ask:`, which need the request-reply world):
//! - `fail`: returns an error;
//! - `forbidden`: sends to `forbidden.out` and returns that send's error;
//! - `burst:N`: sends `0` … `N-1` to `<topic>.done`;
//! - `ping`: replies `pong`;
//! - `ask:<topic>`: asks `<topic>` (2 s at most) and sends the first
//!   reply's data, or `no reply`, to `<topic>.done`;
//! - `hoard:N`: makes N messages of 1 MiB and keeps them across calls,
//!   which the host holds for it and must bound;
//! - anything else: sends it upper-cased to `<topic>.done` as
//!   `text/plain`, with the input's metadata plus `handled-by` and
//!   `input-content-type`, so a test sees what crossed the boundary.
//!
//! The client is the one `MESSAGING_CLIENT` names, else `default`.

// The WIT is fetched at build time into target/wit (xtask's `plugins`
// does it), never copied into the repository.
wit_bindgen::generate!({
    path: "../../target/wit/wasi-messaging",
    world: "messaging-request-reply",
    generate_all,
});

use exports::wasi::messaging::incoming_handler::Guest;
use wasi::messaging::producer::send;
use wasi::messaging::request_reply::{self, RequestOptions};
use wasi::messaging::types::{Client, Error, Message};

struct Handler;

thread_local! {
    /// What `hoard:N` keeps: messages live in the host, so holding them
    /// here costs the component nothing of its own memory.
    static HOARD: std::cell::RefCell<Vec<Message>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Guest for Handler {
    fn handle(message: Message) -> Result<(), Error> {
        let name = std::env::var("MESSAGING_CLIENT").unwrap_or_else(|_| "default".to_owned());
        let client = Client::connect(&name)?;
        let data = message.data();
        let done = format!("{}.done", message.topic().as_deref().unwrap_or("unknown"));
        if data == b"fail" {
            return Err(Error::Other("asked to fail".to_owned()));
        }
        if data == b"forbidden" {
            return send(&client, "forbidden.out", Message::new(b"x"));
        }
        if data == b"ping" {
            return request_reply::reply(&message, Message::new(b"pong"));
        }
        if let Some(count) = data.strip_prefix(b"burst:") {
            for i in 0..decimal(count, "burst")? {
                send(&client, &done, Message::new(i.to_string().as_bytes()))?;
            }
            return Ok(());
        }
        if let Some(count) = data.strip_prefix(b"hoard:") {
            for _ in 0..decimal(count, "hoard")? {
                let kept = Message::new(&vec![0u8; 1 << 20]);
                HOARD.with(|hoard| hoard.borrow_mut().push(kept));
            }
            return Ok(());
        }
        if let Some(topic) = data.strip_prefix(b"ask:") {
            let options = RequestOptions::new();
            options.set_timeout_ms(2000);
            let topic = String::from_utf8_lossy(topic);
            let question = Message::new(b"question");
            let replies = request_reply::request(&client, &topic, &question, Some(options))?;
            let answer = replies.first().map_or(b"no reply".to_vec(), Message::data);
            return send(&client, &done, Message::new(&answer));
        }
        let out = Message::new(&data.to_ascii_uppercase());
        out.set_content_type("text/plain");
        for (key, value) in message.metadata().unwrap_or_default() {
            out.add_metadata(&key, &value);
        }
        out.add_metadata("handled-by", "rust");
        let content_type = message.content_type();
        out.add_metadata(
            "input-content-type",
            content_type.as_deref().unwrap_or("none"),
        );
        send(&client, &done, out)
    }
}

/// The count after `<what>:`, or the error a malformed one is.
fn decimal(count: &[u8], what: &str) -> Result<u64, Error> {
    std::str::from_utf8(count)
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::Other(format!("{what}: needs a decimal count")))
}

export!(Handler);
