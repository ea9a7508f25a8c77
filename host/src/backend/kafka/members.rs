//! One group member per group and process: subscriptions to the same group
//! in one process share a member (one librdkafka consumer on a thread of
//! its own) and take deliveries from its line as competing consumers.
//!
//! Every member that joins or leaves makes the group rebalance, which
//! pauses delivery on every partition; a process gains nothing from owning
//! partitions twice. And tansu 0.6.0's coordinator hands out assignments
//! worked out before the latest join, and never clears a leader that left
//! mid-rebalance, so members joining and leaving in quick succession left
//! partitions with no owner. Shared, a process's subscriptions split the
//! work with no rebalance; members in other processes split partitions as
//! Kafka does.
//!
//! A group's slot is locked while its member starts or leaves, so a
//! subscription made while the last one closes waits for the old member to
//! be out of the group before a new one joins.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::consumer::Command;
use super::state::{Shared, Subscriber};

/// A group member: the consumer thread and the state it shares with the
/// subscriptions.
pub struct Member {
    pub shared: Arc<Shared>,
    commands: Mutex<Option<Sender<Command>>>,
}

impl Member {
    pub fn new(shared: Arc<Shared>, commands: Sender<Command>) -> Self {
        Member {
            shared,
            commands: Mutex::new(Some(commands)),
        }
    }

    /// Adds a subscription, taken for dead if it holds messages and does
    /// not fetch for `lease`; `ordered` asks for key affinity.
    pub fn attach(&self, id: u64, lease: std::time::Duration, ordered: bool) {
        self.shared
            .lock()
            .subscribers
            .insert(id, Subscriber::new(lease, ordered));
    }

    /// Removes a subscription, putting what it holds back in line; true if
    /// it was the last.
    pub fn detach(&self, id: u64) -> bool {
        let mut state = self.shared.lock();
        if !state.detach(id) {
            return false;
        }
        let last = state.subscribers.is_empty();
        drop(state);
        self.shared.changed.notify_waiters();
        last
    }

    /// Makes the member leave its group and stop; `left`, if given, hears
    /// when it is out of the group.
    pub fn stop(&self, left: Option<tokio::sync::oneshot::Sender<()>>) {
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(commands) = commands {
            let _ = commands.send(Command::Close(left));
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop(None);
    }
}

/// A group's place in this process: its member, while one is running.
pub type Slot = Arc<tokio::sync::Mutex<Weak<Member>>>;

/// The slot of a group of a cluster.
pub fn slot(bootstrap: &str, group_id: &str) -> Slot {
    static SLOTS: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    let mut slots = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // Slots of groups with no member and nobody waiting go.
    slots.retain(|_, slot| {
        Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |m| m.strong_count() > 0)
    });
    slots
        .entry(format!("{bootstrap}\u{0}{group_id}"))
        .or_default()
        .clone()
}
