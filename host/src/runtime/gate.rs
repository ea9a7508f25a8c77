//! Shares the CPU among the routes' plugin calls, so a busy plugin can take
//! only its share and never starve the routes beside it.
//!
//! Plugin code runs only while its call holds one of a fixed number of
//! slots (one per core). Each route draws slots through its own [`Share`]:
//! while more than one route runs, one route holds at most all slots but
//! one, so another route's call always finds a slot at once, and the
//! router, the fetchers and the admin API keep a core between them. A call
//! that runs for more than one epoch tick gives its slot up at the tick if
//! a route holding fewer slots is waiting, and queues again; a freed slot
//! goes to the waiting route that holds fewest. A route alone in the
//! process is not queued at all: there is no one to share with.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The slots of the process.
pub struct Gate {
    slots: usize,
    state: Mutex<State>,
    next_share: AtomicU64,
}

struct State {
    /// Slots not held; below zero while a lone route runs more calls than
    /// there are slots (see [`Share::enter`]).
    free: isize,
    /// Per registered share: its id, the slots it holds, its waiting calls.
    shares: Vec<ShareState>,
}

struct ShareState {
    id: u64,
    holding: usize,
    waiting: VecDeque<oneshot::Sender<()>>,
}

/// One route's claim on the gate, shared by its workers; the route leaves
/// the gate when the last clone is dropped.
#[derive(Clone)]
pub struct Share(Arc<Member>);

struct Member {
    id: u64,
    gate: Arc<Gate>,
}

/// A held slot; dropping it frees the slot.
pub struct Slot(Share);

impl Gate {
    /// A gate of `slots` slots (at least one).
    pub fn new(slots: usize) -> Arc<Self> {
        let slots = slots.max(1);
        Arc::new(Gate {
            slots,
            state: Mutex::new(State {
                free: slots as isize,
                shares: Vec::new(),
            }),
            next_share: AtomicU64::new(0),
        })
    }

    /// The process's gate: one slot per core.
    pub fn process() -> &'static Arc<Self> {
        static GATE: std::sync::OnceLock<Arc<Gate>> = std::sync::OnceLock::new();
        GATE.get_or_init(|| Gate::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
    }

    /// Registers a route.
    pub fn share(self: &Arc<Self>) -> Share {
        let id = self.next_share.fetch_add(1, Ordering::Relaxed);
        self.lock().shares.push(ShareState {
            id,
            holding: 0,
            waiting: VecDeque::new(),
        });
        Share(Arc::new(Member {
            id,
            gate: self.clone(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Most slots one share may hold: all but one while others exist.
    fn cap(&self, state: &State) -> usize {
        if state.shares.len() > 1 {
            (self.slots - 1).max(1)
        } else {
            self.slots
        }
    }

    /// Gives a freed slot to the waiting share that holds fewest (under
    /// its cap), or back to the pool.
    fn hand_over(&self, state: &mut State) {
        if state.free < 0 {
            // Still over from a time the route ran alone.
            state.free += 1;
            return;
        }
        let cap = self.cap(state);
        loop {
            let next = state
                .shares
                .iter_mut()
                .filter(|s| !s.waiting.is_empty() && s.holding < cap)
                .min_by_key(|s| s.holding);
            let Some(share) = next else {
                state.free += 1;
                return;
            };
            let waiter = share.waiting.pop_front().expect("filtered on waiting");
            // A waiter whose call was cut at its deadline is gone; the slot
            // goes to the next.
            if waiter.send(()).is_ok() {
                share.holding += 1;
                return;
            }
        }
    }
}

impl State {
    fn share(&mut self, id: u64) -> &mut ShareState {
        self.shares
            .iter_mut()
            .find(|s| s.id == id)
            .expect("a share is registered while it lives")
    }
}

impl Share {
    /// Waits for a slot for this route.
    pub async fn enter(&self) -> Slot {
        let gate = &self.0.gate;
        let rx = {
            let mut state = gate.lock();
            let cap = gate.cap(&state);
            // A lone route has no one to share with: its calls run as its
            // workers make them, without queueing here.
            let alone = state.shares.len() == 1;
            let free = state.free;
            let share = state.share(self.0.id);
            if alone || (free > 0 && share.holding < cap) {
                share.holding += 1;
                state.free -= 1;
                return Slot(self.clone());
            }
            let (tx, rx) = oneshot::channel();
            share.waiting.push_back(tx);
            rx
        };
        let mut waiting = Waiting {
            rx,
            share: self.clone(),
            granted: false,
        };
        // The sender stays in the gate until it is used.
        let _ = (&mut waiting.rx).await;
        waiting.granted = true;
        Slot(self.clone())
    }

    /// Whether a call of this route should give its slot up now: another
    /// route that holds fewer slots is waiting for one.
    pub fn should_yield(&self) -> bool {
        let mut state = self.0.gate.lock();
        let mine = state.share(self.0.id).holding;
        state
            .shares
            .iter()
            .any(|s| s.id != self.0.id && !s.waiting.is_empty() && s.holding < mine)
    }
}

/// A call waiting for a slot; if it is dropped (cut at its deadline) just
/// as a slot was handed to it, the slot goes back.
struct Waiting {
    rx: oneshot::Receiver<()>,
    share: Share,
    granted: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.granted {
            self.rx.close();
            if self.rx.try_recv().is_ok() {
                drop(Slot(self.share.clone()));
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let member = &self.0.0;
        let mut state = member.gate.lock();
        state.share(member.id).holding -= 1;
        member.gate.hand_over(&mut state);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.shares.retain(|s| s.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_route_beside_another_always_finds_a_slot() {
        let gate = Gate::new(2);
        let (busy, quiet) = (gate.share(), gate.share());
        let held = busy.enter().await;
        // The busy route may not take the last slot while another exists.
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), busy.enter()).await;
        assert!(second.is_err(), "one route took every slot");
        let mine = tokio::time::timeout(std::time::Duration::from_millis(50), quiet.enter()).await;
        assert!(mine.is_ok(), "the other route found no slot");
        drop(held);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_route_holding_fewest() {
        let gate = Gate::new(4);
        let (a, b) = (gate.share(), gate.share());
        let a1 = a.enter().await;
        let a2 = a.enter().await;
        let a3 = a.enter().await;
        let b1 = b.enter().await;
        // Full: a waits for a fourth, b for a second.
        let a4 = tokio::spawn({
            let a = a.clone();
            async move { a.enter().await }
        });
        let b2 = tokio::spawn({
            let b = b.clone();
            async move { b.enter().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(a.should_yield(), "a holds more while b waits");
        assert!(!b.should_yield());
        drop(a1);
        let b2 = tokio::time::timeout(std::time::Duration::from_secs(1), b2)
            .await
            .expect("b got the freed slot")
            .unwrap();
        assert!(!a4.is_finished());
        drop((a2, a3, b1, b2));
        a4.await.unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_keep_a_slot() {
        let gate = Gate::new(1);
        let (busy, _other) = (gate.share(), gate.share());
        let held = busy.enter().await;
        let cut = tokio::time::timeout(std::time::Duration::from_millis(20), busy.enter()).await;
        assert!(cut.is_err());
        drop(held);
        tokio::time::timeout(std::time::Duration::from_millis(100), busy.enter())
            .await
            .expect("the slot came back");
    }

    #[tokio::test]
    async fn a_lone_route_is_not_queued_and_pays_back_when_joined() {
        let gate = Gate::new(1);
        let lone = gate.share();
        let (first, second) = (lone.enter().await, lone.enter().await);
        // Another route arrives: it waits until the lone route is back
        // within the slots.
        let late = gate.share();
        let waiting = tokio::spawn(async move { late.enter().await });
        drop(first);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "the slot paid back the overdraft first"
        );
        drop(second);
        tokio::time::timeout(std::time::Duration::from_millis(100), waiting)
            .await
            .expect("the late route got the slot")
            .unwrap();
    }
}
