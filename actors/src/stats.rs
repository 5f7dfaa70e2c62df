//! What the actor tree looks like from outside: each actor's path, kind, mailbox depth and
//! restart count, for `Admin/ActorTree` and the shell.
//!
//! ractor does not expose a mailbox's length, so every message to an actor of the tree is sent
//! through [`send`], [`send_after`] or [`call`], which count it into the actor's
//! [`ActorStats`] once it is in the mailbox, and the actor counts the ones it handles; the
//! difference is the depth.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ractor::ActorCell;

#[derive(Debug, Default)]
pub struct ActorStats {
    mailbox: AtomicI64,
    restarts: AtomicU64,
}

impl ActorStats {
    pub fn sent(&self) {
        self.mailbox.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handled(&self) {
        self.mailbox.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn mailbox_depth(&self) -> u64 {
        let depth = self.mailbox.load(Ordering::Relaxed);
        // Every send is counted before the message can be handled, so this cannot go below
        // zero; if it ever does, a message was handled that no helper counted: say so rather
        // than hide it.
        u64::try_from(depth).unwrap_or_else(|_| {
            tracing::warn!(
                depth,
                "an actor handled a message that was never counted as sent"
            );
            0
        })
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// A restarted actor starts with an empty mailbox.
    fn reset_mailbox(&self) {
        self.mailbox.store(0, Ordering::Relaxed);
    }
}

/// Sends `message` to `actor`, counted in `stats` (the actor's) while it waits in the mailbox.
/// A message the actor can no longer take is not counted.
pub fn send<M: ractor::Message>(
    actor: &ractor::ActorRef<M>,
    stats: &ActorStats,
    message: M,
) -> Result<(), ractor::MessagingErr<M>> {
    stats.sent();
    actor.cast(message).inspect_err(|_| stats.handled())
}

/// [`send`] after `delay`, from a timer task; the message is made when it is sent.
pub fn send_after<M: ractor::Message>(
    actor: &ractor::ActorRef<M>,
    stats: &Arc<ActorStats>,
    delay: std::time::Duration,
    make: impl FnOnce() -> M + Send + 'static,
) {
    let (actor, stats) = (actor.clone(), stats.clone());
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        // An actor that stopped meanwhile has no use for it.
        let _ = send(&actor, &stats, make());
    });
}

/// `actor.call`, with the request counted in `stats` like [`send`].
pub async fn call<M: ractor::Message, R: Send + 'static>(
    actor: &ractor::ActorRef<M>,
    stats: &ActorStats,
    build: impl FnOnce(ractor::RpcReplyPort<R>) -> M,
    timeout: Option<std::time::Duration>,
) -> Result<ractor::rpc::CallResult<R>, ractor::MessagingErr<M>> {
    stats.sent();
    // An error means the request never reached the mailbox; a timeout means it did.
    actor
        .call(build, timeout)
        .await
        .inspect_err(|_| stats.handled())
}

/// One row of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// '/'-separated, from the root, e.g. `node/batcher:minilm@1/worker-0`.
    pub path: String,
    pub kind: String,
    /// running, stopped, failed...
    pub status: String,
    pub mailbox_depth: u64,
    pub restarts: u64,
    /// Kind-specific detail, e.g. a batcher's lane depths.
    pub detail: String,
}

/// What runs at a path of the tree.
enum Runner {
    Actor(ActorCell),
    /// A thread (an inference worker): its flag is set while it runs.
    Thread(Arc<std::sync::atomic::AtomicBool>),
}

struct Entry {
    kind: &'static str,
    /// What runs at the path, once started.
    runner: Option<Runner>,
    stats: Arc<ActorStats>,
    detail: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

/// Every live actor of a node by path. Entries survive restarts (so restart counts do) and
/// are removed when their actor is retired for good.
#[derive(Clone)]
pub struct ActorDirectory {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
    /// Fires when an actor is attached or a path removed.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for ActorDirectory {
    fn default() -> Self {
        Self {
            entries: Arc::default(),
            changed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl std::fmt::Debug for ActorDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorDirectory").finish_non_exhaustive()
    }
}

impl ActorDirectory {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stats of `path`, created on first use.
    pub fn stats(&self, path: &str, kind: &'static str) -> Arc<ActorStats> {
        self.lock()
            .entry(path.to_owned())
            .or_insert_with(|| Entry {
                kind,
                runner: None,
                stats: Arc::default(),
                detail: None,
            })
            .stats
            .clone()
    }

    /// The stats of `path` for an actor about to (re)start: its restart count carries over,
    /// its mailbox starts empty.
    pub fn fresh_stats(&self, path: &str, kind: &'static str) -> Arc<ActorStats> {
        let stats = self.stats(path, kind);
        stats.reset_mailbox();
        stats
    }

    /// Records the live actor behind `path` (after a start or restart).
    pub fn attach(&self, path: &str, cell: ActorCell) {
        if let Some(entry) = self.lock().get_mut(path) {
            entry.runner = Some(Runner::Actor(cell));
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Records the thread behind `path` (after a start or restart): `alive` is set while it
    /// runs.
    pub fn attach_thread(&self, path: &str, alive: Arc<std::sync::atomic::AtomicBool>) {
        if let Some(entry) = self.lock().get_mut(path) {
            entry.runner = Some(Runner::Thread(alive));
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether `path` is a thread of the tree, not an actor.
    pub fn is_thread(&self, path: &str) -> bool {
        self.lock()
            .get(path)
            .is_some_and(|entry| matches!(entry.runner, Some(Runner::Thread(_))))
    }

    /// Fires whenever an actor is attached or a path removed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The live actor behind `path` (if it has started) and its restart count, or `None`
    /// when nothing is recorded at `path`.
    pub fn lookup(&self, path: &str) -> Option<(Option<ActorCell>, u64)> {
        self.lock().get(path).map(|entry| {
            let cell = match &entry.runner {
                Some(Runner::Actor(cell)) => Some(cell.clone()),
                _ => None,
            };
            (cell, entry.stats.restarts())
        })
    }

    pub fn set_detail(&self, path: &str, detail: Arc<dyn Fn() -> String + Send + Sync>) {
        if let Some(entry) = self.lock().get_mut(path) {
            entry.detail = Some(detail);
        }
    }

    /// Forgets `path` and everything under it.
    pub fn remove_tree(&self, path: &str) {
        let prefix = format!("{path}/");
        self.lock()
            .retain(|key, _| key != path && !key.starts_with(&prefix));
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn snapshot(&self) -> Vec<ActorInfo> {
        self.lock()
            .iter()
            .map(|(path, entry)| ActorInfo {
                path: path.clone(),
                kind: entry.kind.to_owned(),
                status: match &entry.runner {
                    Some(Runner::Actor(cell)) => format!("{:?}", cell.get_status()).to_lowercase(),
                    Some(Runner::Thread(alive)) if alive.load(Ordering::Relaxed) => {
                        "running".to_owned()
                    }
                    Some(Runner::Thread(_)) => "stopped".to_owned(),
                    None => "not started".to_owned(),
                },
                mailbox_depth: entry.stats.mailbox_depth(),
                restarts: entry.stats.restarts(),
                detail: entry.detail.as_ref().map(|d| d()).unwrap_or_default(),
            })
            .collect()
    }
}

/// The stop reason of an actor an operator asked to restart (`troupe shell`: `actor restart`).
/// Its supervisor treats it as a failure and restarts the actor, which counts against the
/// restart intensity like any other restart.
pub const OPERATOR_RESTART: &str = "restart requested by an operator";

/// Spawns `actor` linked to `supervisor` and records it under `path`, as every supervisor in
/// the tree does for its children.
pub async fn spawn_child<A: ractor::Actor>(
    directory: &ActorDirectory,
    path: &str,
    actor: A,
    args: A::Arguments,
    supervisor: ActorCell,
) -> Result<ractor::ActorRef<A::Msg>, ractor::SpawnErr> {
    let (actor, _) = ractor::Actor::spawn_linked(None, actor, args, supervisor).await?;
    directory.attach(path, actor.get_cell());
    Ok(actor)
}

/// Calls `check` every `interval`, and as soon as either watched value changes, until one of
/// them closes (its owner is gone). Health and the rollout controller re-evaluate this way:
/// promptly on a change, and on the timer for what no change announces (timeouts).
pub fn spawn_rechecks(
    interval: std::time::Duration,
    mut first: tokio::sync::watch::Receiver<u64>,
    mut second: tokio::sync::watch::Receiver<u64>,
    check: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A source whose sender is gone (the Raft core stopped, say) is no longer watched,
        // but the ticks go on: that is exactly when a recheck must still happen.
        let (mut first_open, mut second_open) = (true, true);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = first.changed(), if first_open => first_open = changed.is_ok(),
                changed = second.changed(), if second_open => second_open = changed.is_ok(),
            }
            check();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use std::time::Duration;

    /// Handles a message only when its gate opens, counting it as the tree's actors do.
    struct Gated;

    struct GatedArgs {
        stats: Arc<ActorStats>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Actor for Gated {
        type Msg = u32;
        type State = GatedArgs;
        type Arguments = GatedArgs;

        async fn pre_start(
            &self,
            _myself: ActorRef<u32>,
            args: GatedArgs,
        ) -> Result<GatedArgs, ActorProcessingErr> {
            Ok(args)
        }

        async fn handle(
            &self,
            _myself: ActorRef<u32>,
            _message: u32,
            state: &mut GatedArgs,
        ) -> Result<(), ActorProcessingErr> {
            state.gate.acquire().await?.forget();
            state.stats.handled();
            Ok(())
        }
    }

    async fn depth_reaches(stats: &ActorStats, depth: u64) {
        troupe_wait::expect(
            &format!("mailbox depth {depth}"),
            Duration::from_secs(10),
            || std::future::ready((stats.mailbox_depth() == depth).then_some(())),
        )
        .await;
    }

    #[tokio::test]
    async fn every_helper_counts_what_waits_and_nothing_an_actor_cannot_take() {
        let stats = Arc::new(ActorStats::default());
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let args = GatedArgs {
            stats: stats.clone(),
            gate: gate.clone(),
        };
        let (actor, handle) = Actor::spawn(None, Gated, args).await.unwrap();
        for message in 0..3 {
            send(&actor, &stats, message).unwrap();
        }
        send_after(&actor, &stats, Duration::from_millis(1), || 3);
        // One is being handled (held at the gate), three wait: all four count until handled.
        depth_reaches(&stats, 4).await;
        gate.add_permits(4);
        depth_reaches(&stats, 0).await;
        actor.stop(None);
        handle.await.unwrap();
        // A stopped actor takes nothing, and nothing is counted for it.
        assert!(send(&actor, &stats, 9).is_err());
        assert_eq!(stats.mailbox_depth(), 0);
    }
}
