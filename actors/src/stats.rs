//! What the actor tree looks like from outside: each actor's path, kind, mailbox depth and
//! restart count, for `Admin/ActorTree` and the shell.
//!
//! ractor does not expose a mailbox's length, so each actor's typed helpers count the
//! messages they send and the actor counts the ones it handles; the difference is the depth.

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
        self.mailbox.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// A restarted actor starts with an empty mailbox.
    fn reset_mailbox(&self) {
        self.mailbox.store(0, Ordering::Relaxed);
    }
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

struct Entry {
    kind: &'static str,
    cell: Option<ActorCell>,
    stats: Arc<ActorStats>,
    detail: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

/// Every live actor of a node by path. Entries survive restarts (so restart counts do) and
/// are removed when their actor is retired for good.
#[derive(Clone, Default)]
pub struct ActorDirectory {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
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
                cell: None,
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
            entry.cell = Some(cell);
        }
    }

    /// The live actor behind `path` (if it has started) and its restart count, or `None`
    /// when nothing is recorded at `path`.
    pub fn lookup(&self, path: &str) -> Option<(Option<ActorCell>, u64)> {
        self.lock()
            .get(path)
            .map(|entry| (entry.cell.clone(), entry.stats.restarts()))
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
    }

    pub fn snapshot(&self) -> Vec<ActorInfo> {
        self.lock()
            .iter()
            .map(|(path, entry)| ActorInfo {
                path: path.clone(),
                kind: entry.kind.to_owned(),
                status: entry
                    .cell
                    .as_ref()
                    .map(|cell| format!("{:?}", cell.get_status()).to_lowercase())
                    .unwrap_or_else(|| "not started".to_owned()),
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
