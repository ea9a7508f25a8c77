//! The Redis backends: Redis Streams (`redis://`), durable consumer groups
//! with at-least-once delivery, and Redis pub/sub (`redis+pubsub://`),
//! broadcast at most once. Streams need Redis 6.2 or newer (XAUTOCLAIM),
//! standalone or a replicated primary, not Cluster (one XREADGROUP and the
//! settling scripts touch several keys).
//!
//! TLS: `rediss://` and `rediss+pubsub://` take `ca` (PEM file of the CA
//! that signed the server's certificate; the system's roots without it),
//! and `cert` and `key` (PEM files of a client certificate, for a server
//! with `tls-auth-clients yes`). An ACL user logs in as
//! `rediss://USER:PASSWORD@HOST`. The host name of the URL must be one the
//! server's certificate names.
//!
//! # Redis Streams: `redis://[user:password@]host[:port][/db][?params]`
//!
//! | | |
//! |---|---|
//! | delivery | at least once; an unacknowledged entry comes back after the lease; exactly once for a route whose input and output are this backend |
//! | groups | Redis consumer groups, one per [`SubscribeOptions::group_key`] (name and topics); members compete, groups fan out, across processes too |
//! | patterns | `*` and `>`: matching streams are found by SCAN (at subscribe, every `scan_ms`, and at once for topics this process publishes to) and read in the same XREADGROUP |
//! | ordering | per stream while nothing fails; a nacked message is redelivered after later ones, unless the group is ordered |
//! | key affinity | an ordered group ([`SubscribeOptions::ordered`]) hands out a key's next message, to any member in any process, only once its previous one is acked or dead-lettered; a nack keeps the key for the retry |
//! | persistence | as the server's: with `appendonly yes` and `appendfsync always` an accepted publish survives a crash; the server's default snapshots may lose the last minutes |
//! | history | yes: a new group starting `earliest` reads what the streams still hold |
//! | start | `earliest` → `0`; `latest` → the end of each stream when the group is born, and the group's birth time for streams found later |
//! | what the host adds | delayed redelivery (a sorted set per group, moved into a per-group retry stream when due), attempt counting across redeliveries, handing unsettled entries back on close, pattern discovery |
//!
//! Parameters: `prefix` (key prefix, default `sluice:`), `block_ms` (longest
//! single XREADGROUP block, default 1000), `count` (entries per stream per
//! read, default 100), `claim_idle_ms` (how idle another consumer's entry
//! must be before it is claimed; default the subscription's lease),
//! `maxlen` (approximate `MAXLEN ~` cap on each topic stream; entries past
//! it are dropped even if a group has not read them), `scan_ms` (how often
//! patterns look for streams made by other processes, default 5000).
//!
//! Each topic is a stream `<prefix><topic>` whose entries have the fields
//! `id`, `key` (if any), `headers` (JSON list of pairs, if any), `payload`
//! (bytes) and `ts` (ms); other tools may write such entries too (missing
//! fields get defaults). The rest of the layout is described on
//! [`streams::Keys`]; nack and delay in `delayed.rs`.
//!
//! Attempts: an entry's delivery count in the group (from XREADGROUP, or
//! from XPENDING after XAUTOCLAIM), plus the attempts a retry copy carries
//! from before its nack. Reclaim: every member runs XAUTOCLAIM with the
//! claim time on each of its streams about twice per lease (at least every
//! 5 s), and at once when a member of this process hands entries back.
//! Settling: the acks, nacks and publish-and-acks of a batch go to the
//! server in one script call (`settle.rs`), which settles each entry only
//! while this consumer still holds it with the delivery count it was given;
//! otherwise that entry answers [`SettleError::LeaseLost`] and nothing of
//! it changes (`lease_checked`). The subscription is transactional: when a
//! route's input and output are the same backend, a delivery's outputs
//! (XADD) and its ack are one all-or-nothing step of that script, so
//! processing within Redis is exactly once, across crashes too.
//!
//! Key affinity: a member of an ordered group reads with XREADGROUP, then
//! a script ([`scripts::TAKE_TURNS`]) gives each keyed entry read its
//! key's turn, in stream order across the group's members. An entry whose
//! key has no message in flight takes the key (the group's busy hash
//! records the message's id) and is delivered. One whose key is
//! busy is moved, in the same step, to the end of the key's waiting list
//! and acknowledged in its stream, so no consumer holds it while it waits.
//! Settling the key's holder (ack, or publish-and-ack; a dead letter is
//! one) moves the key's next waiting message to the group's retry stream,
//! which every member reads, and hands it the key; a nack keeps the key
//! for its retry. A crashed member's entries are claimed as usual and
//! still hold their keys (or get their turn then, if it died before
//! asking). Unkeyed messages wait for nothing. Every member
//! of a group should agree on `ordered`: an unordered member hands keys on
//! when it settles their holders but ignores whose turn it is. A waiting
//! message counts in the group's backlog. An entry that `maxlen` trims
//! while it holds its key (a lost message) hands its key on when the next
//! reclaim finds it gone. Ordered groups need the server's Lua `cmsgpack` library (in every
//! Redis build, not in some forks).
//!
//! Close hands unsettled entries to a placeholder consumer
//! (`sluice-returned`), idle for years so the next XAUTOCLAIM takes them, and
//! removes the consumer; an ephemeral group is destroyed instead.
//! [`RedisStreamsBackend::pending`] counts a group's unsettled messages.
//!
//! # Redis pub/sub: `redis+pubsub://[user:password@]host[:port][?params]`
//!
//! | | |
//! |---|---|
//! | delivery | at most once: what is published while no member of a group is subscribed (not started yet, reconnecting, or its in-process queue full) is lost; what a process holds is lost if it dies |
//! | groups | in-process: one Redis subscription per group per backend instance, whose members compete; each process's group receives every message |
//! | patterns | PSUBSCRIBE with each wildcard token as `*`, then matched again with Sluice's rules (Redis' `*` also crosses dots) |
//! | ordering | per publisher connection, as Redis delivers; a nack with no delay goes first in line again |
//! | persistence | none, no history: a group receives what is published after it subscribed |
//! | what the host adds | consumer groups, nack with delay (in-process timers), attempt counting, bounded per-group queue (`capacity`), reconnect and resubscribe |
//!
//! Parameters: `prefix` (channel prefix, default `sluice:`; pub/sub ignores
//! the database number), `capacity` (messages a group holds before it drops
//! new ones, default 10000). A publish waits (at most 5 s) while one of this
//! instance's own groups that wants the message is resubscribing, so a
//! process does not lose its own messages to a reconnect.
//!
//! Conformance cases that do not apply to pub/sub, by its declared
//! capabilities: history (`new_subscriber_sees_old_messages`,
//! `latest_start_skips_old_messages`), the lease
//! (`abandoned_delivery_returns_after_lease`), and those that need what a
//! closed or crashed consumer held to survive
//! (`continue_after_subscriber_closes`, `concurrent_close`,
//! `host_outputs_published_before_ack`,
//! `host_graceful_shutdown_settles_in_flight`).
//!
//! [`SubscribeOptions::group_key`]: crate::backend::SubscribeOptions::group_key
//! [`SettleError::LeaseLost`]: crate::backend::SettleError::LeaseLost
//! [`SubscribeOptions::ordered`]: crate::backend::SubscribeOptions::ordered

pub(crate) mod config;
mod delayed;
pub(crate) mod envelope;
mod listener;
pub(crate) mod pubsub;
pub(crate) mod reader;
mod scripts;
mod settle;
pub mod streams;
mod subscription;
mod transient;

pub use pubsub::RedisPubSubBackend;
pub use streams::RedisStreamsBackend;

/// `text` with the characters Redis globs treat specially escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::streams::Keys;

    #[test]
    fn scan_globs_cover_what_a_pattern_matches() {
        let keys = Keys::new("app[1]:");
        assert_eq!(keys.scan_glob("orders.*.paid"), "app\\[1\\]:orders.*");
        assert_eq!(keys.scan_glob(">"), "app\\[1\\]:*");
        assert_eq!(keys.topic("app[1]:orders.eu"), Some("orders.eu"));
        assert_eq!(keys.topic("app[1]:.retry:g[t]"), None);
        assert_eq!(keys.topic("other:orders"), None);
    }
}
