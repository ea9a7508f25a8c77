//! Members of one group in this process join and leave it one change at a
//! time: each waits until the group has settled after the change before
//! the next one.
//!
//! tansu 0.6.0 does not clear a group's leader when the leader leaves while
//! the group is rebalancing (its `leave` in the forming state only drops the
//! member): the group then waits for ever for the departed leader's
//! assignment, and no member that joins later gets partitions. A leader that
//! leaves a settled group is handled properly. So `close` takes the group's
//! turn, leaves, and waits (bounded) until the group's other members here
//! have been assigned again before the next member may leave.
//!
//! Joining is settled the same way: `subscribe` returns once the other
//! members here hold their new assignments too, so an application that
//! starts consuming right after its subscriptions does not meet a group
//! still handing partitions around (members with nothing for a while).
//!
//! Members in other processes are not ordered by this; on a real Kafka
//! broker it only spaces out closes. Groups are told apart by cluster and
//! group id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::state::Shared;

#[derive(Default)]
struct Local {
    turn: Arc<tokio::sync::Mutex<()>>,
    members: HashMap<u64, Weak<Shared>>,
}

fn groups() -> &'static Mutex<HashMap<String, Local>> {
    static GROUPS: OnceLock<Mutex<HashMap<String, Local>>> = OnceLock::new();
    GROUPS.get_or_init(Default::default)
}

fn with_groups<T>(f: impl FnOnce(&mut HashMap<String, Local>) -> T) -> T {
    f(&mut groups().lock().unwrap_or_else(|e| e.into_inner()))
}

/// Names a group of a cluster.
pub fn key(bootstrap: &str, group_id: &str) -> String {
    format!("{bootstrap}\u{0}{group_id}")
}

/// Notes a member of the group `key` names in this process.
pub fn enter(key: &str, id: u64, shared: &Arc<Shared>) {
    with_groups(|groups| {
        groups
            .entry(key.to_string())
            .or_default()
            .members
            .insert(id, Arc::downgrade(shared));
    });
}

/// Forgets a member that has left (or was dropped).
pub fn depart(key: &str, id: u64) {
    with_groups(|groups| {
        if let Some(local) = groups.get_mut(key) {
            local.members.remove(&id);
            if local.members.is_empty() && Arc::strong_count(&local.turn) == 1 {
                groups.remove(key);
            }
        }
    });
}

/// Waits for the group's turn to leave.
pub async fn turn(key: &str) -> OwnedMutexGuard<()> {
    let turn = with_groups(|groups| groups.entry(key.to_string()).or_default().turn.clone());
    turn.lock_owned().await
}

/// The group's other members here and how many assignments each has had,
/// taken before a member joins or leaves.
pub fn others(key: &str, id: u64) -> Vec<(Arc<Shared>, u64)> {
    with_groups(|groups| {
        groups.get(key).map_or_else(Vec::new, |local| {
            local
                .members
                .iter()
                .filter(|(other, _)| **other != id)
                .filter_map(|(_, shared)| shared.upgrade())
                .map(|shared| {
                    let seen = shared.lock().assignments;
                    (shared, seen)
                })
                .collect()
        })
    })
}

/// Waits until each of `others` has been assigned again since, at most
/// `limit`.
pub async fn settled(others: Vec<(Arc<Shared>, u64)>, limit: Duration) {
    let give_up = Instant::now() + limit;
    for (shared, seen) in others {
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = shared.lock();
                // A parked member is out of the group and assigned nothing.
                if state.assignments > seen || state.parked {
                    break;
                }
            }
            // Also woken by a poll timer: a member's thread may exit
            // without notifying.
            let wake = give_up.min(Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(wake, notified).await.is_err() && Instant::now() >= give_up {
                return;
            }
        }
    }
}
