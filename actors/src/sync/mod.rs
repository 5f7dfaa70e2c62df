//! MetadataSync: follows the Raft watch and makes this node serve what the metadata says.
//!
//! It applies each model or task change the watch delivers to the serving table, from the
//! change's own payload (the whole state only at its start and when the watch resyncs after
//! compaction), then reconciles: a version that became active is
//! imported into the artifact store, loaded and warmed up off the actor (on a blocking
//! thread), then handed to the supervisor, which starts its batcher; only then is it ready.
//! A version that is no longer active is unloaded once its replacement serves, so requests
//! never see a gap. A failed load is recorded with its reason and retried when the version's
//! record changes again.

pub mod messages;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_consensus::metadata::{
    ChangeValue, Command, ModelVersionRecord, NodeModelState, Proposal, MAX_REASON_BYTES,
};
use troupe_consensus::{Metadata, WatchBatch};
use troupe_models::artifact::ArtifactStore;
use troupe_models::generate::SamplingParams;
use troupe_models::{LoadedModel, Precision};

pub use messages::SyncMsg;

use crate::stats::ActorStats;
use crate::supervisor::{ArtifactFetcher, ModelLoader, SupervisorHandle};
use crate::table::{LocalState, ModelKey, ServingTable};

/// Sentences run through a freshly loaded model before it takes traffic.
const WARMUP_TEXTS: [&str; 4] = [
    "warm up",
    "the quick brown fox jumps over the lazy dog",
    "a short sentence to touch every kernel before the first real request",
    "troupe",
];

#[derive(Clone)]
pub struct SyncArgs {
    pub node_id: u64,
    pub metadata: Arc<Metadata>,
    pub table: Arc<ServingTable>,
    pub supervisor: SupervisorHandle,
    pub loader: Arc<dyn ModelLoader>,
    pub fetcher: Arc<dyn ArtifactFetcher>,
    pub store: ArtifactStore,
    pub lanes: usize,
    pub max_batch_size: usize,
    pub stats: Arc<ActorStats>,
}

pub struct SyncState {
    args: SyncArgs,
    watcher: tokio::task::JoinHandle<()>,
    pending: Arc<AtomicBool>,
    /// Failed loads, by the version record's mod_revision at the time: retried only when the
    /// record changes.
    failed_at: HashMap<ModelKey, u64>,
    /// The readiness last proposed per version: one at a time, so that two reports of one
    /// version cannot reach the log out of order.
    reported: HashMap<ModelKey, Report>,
    /// When a [`SyncMsg::Recheck`] is due, if one is.
    recheck_at: Option<Instant>,
}

/// A readiness report this node proposed.
struct Report {
    state: NodeModelState,
    reason: String,
    at: Instant,
    /// Its proposal has not returned yet.
    in_flight: bool,
}

/// How long a readiness report may take to show in the metadata before it is sent again.
const REPORT_RETRY: Duration = Duration::from_secs(5);
/// How long a report whose proposal failed waits before it is tried again.
const REPORT_BACKOFF: Duration = Duration::from_secs(1);

/// Failpoint `sync.report.<state>` before a readiness report is proposed; a `sleep` waits on
/// the timer, not the thread. Tests use it to hold one report back.
async fn report_failpoint(state: NodeModelState) -> Result<(), std::io::Error> {
    let name = format!("sync.report.{}", state.as_str());
    match troupe_failpoints::fire(&name) {
        None | Some(troupe_failpoints::Kind::Off) => Ok(()),
        Some(troupe_failpoints::Kind::Sleep(pause)) => {
            tokio::time::sleep(pause).await;
            Ok(())
        }
        Some(troupe_failpoints::Kind::Error) => Err(troupe_failpoints::injected(&name)),
        Some(troupe_failpoints::Kind::Abort) => troupe_failpoints::abort(&name),
    }
}

pub struct MetadataSync;

fn notify_changed(actor: &ActorRef<SyncMsg>, stats: &ActorStats, pending: &AtomicBool) {
    if !pending.swap(true, Ordering::AcqRel) {
        let _ = crate::stats::send(actor, stats, SyncMsg::Changed);
    }
}

/// The version's files in the store: already there, imported from its registered source
/// directory when this machine has it, or else pulled from a peer.
async fn artifact_dir(
    store: &ArtifactStore,
    fetcher: &dyn ArtifactFetcher,
    record: &ModelVersionRecord,
) -> Result<std::path::PathBuf, String> {
    if store.get(&record.digest).is_some() {
        // Verified again before use: a copy damaged on disk is dropped and fetched again.
        let (checked, digest) = (store.clone(), record.digest.clone());
        let verified = tokio::task::spawn_blocking(move || checked.verify(&digest))
            .await
            .map_err(|e| e.to_string())?;
        match verified {
            Ok(dir) => return Ok(dir),
            Err(error) => {
                tracing::warn!(digest = %record.digest, %error, "stored copy is damaged; fetching it again")
            }
        }
    }
    let mut import_failed = None;
    if let Some(source) = record.source.clone().filter(|s| Path::new(s).is_dir()) {
        let (store, digest) = (store.clone(), record.digest.clone());
        let imported =
            tokio::task::spawn_blocking(move || store.import(Path::new(&source), &digest))
                .await
                .map_err(|e| e.to_string())?;
        match imported {
            Ok(dir) => return Ok(dir),
            Err(error) => import_failed = Some(error.to_string()),
        }
    }
    let holders = record
        .nodes
        .iter()
        .filter(|(_, report)| report.state == NodeModelState::Ready)
        .map(|(id, _)| *id)
        .collect();
    fetcher
        .fetch(record.digest.clone(), holders)
        .await
        .map_err(|pull| match import_failed {
            Some(import) => format!("{import}; and {pull}"),
            None => pull,
        })
}

/// Loads and warms up a version from its directory. Blocking.
fn load_and_warm(
    loader: &dyn ModelLoader,
    dir: &Path,
    max_batch_size: usize,
    precision: Option<&str>,
) -> Result<LoadedModel, String> {
    // Checked when the version was registered; a record from elsewhere still fails cleanly.
    let precision = precision
        .map(Precision::from_name)
        .transpose()
        .map_err(|e| e.to_string())?;
    let loaded = loader.load(dir, precision).map_err(|e| e.to_string())?;
    let model = match &loaded {
        LoadedModel::Encoder(model) => model,
        LoadedModel::Decoder(decoder) => {
            // One short generation: the weights are paged in and every kernel has run.
            let ids = decoder.tokenizer.encode(WARMUP_TEXTS[0]);
            let params = SamplingParams {
                max_tokens: 2,
                ..SamplingParams::default()
            };
            decoder
                .generate(&ids, &params, |_| {})
                .map_err(|e| format!("warm-up failed: {e}"))?;
            return Ok(loaded);
        }
    };
    let texts: Vec<String> = WARMUP_TEXTS.iter().map(|t| (*t).to_owned()).collect();
    let ids = model.tokenize(&texts).map_err(|e| e.to_string())?;
    model
        .embed_token_ids(&ids[..1], 1)
        .and_then(|_| model.embed_token_ids(&ids, max_batch_size.max(1)))
        .map_err(|e| format!("warm-up failed: {e}"))?;
    Ok(loaded)
}

/// Reconcile's rule for a version the cluster wants here: load it when this node has nothing
/// of it, or when its last load failed and the version's record changed since (an operator
/// retried it: `failed_at` is the record's revision at the failure). A load in progress or a
/// loaded version is left alone, and so is a failure nobody has retried.
fn should_load(local: Option<&LocalState>, failed_at: Option<u64>, mod_revision: u64) -> bool {
    match local {
        None => true,
        Some(LocalState::Failed(_)) => failed_at.is_none_or(|at| mod_revision > at),
        Some(_) => false,
    }
}

/// Reconcile's rule for a version this node holds: unload it once the cluster neither wants it
/// nor serves it from here, unless its load is still in progress (the load's end decides).
fn should_unload(still_wanted: bool, serving: bool, local: Option<&LocalState>) -> bool {
    !still_wanted && !serving && !matches!(local, Some(LocalState::Loading) | None)
}

impl SyncState {
    async fn reconcile(&mut self, myself: &ActorRef<SyncMsg>) -> Result<(), ActorProcessingErr> {
        let args = &self.args;
        let wanted = args.table.wanted();
        for (key, record) in &wanted {
            let local = args.table.local(key);
            let failed_at = self.failed_at.get(key).copied();
            if !should_load(local.as_ref(), failed_at, record.revisions.mod_revision) {
                continue;
            }
            self.failed_at.remove(key);
            tracing::info!(model = %key, digest = %record.digest, "loading model version");
            args.table.set_local(key.clone(), LocalState::Loading);
            let (store, loader, fetcher, record, key, actor, stats) = (
                args.store.clone(),
                args.loader.clone(),
                args.fetcher.clone(),
                record.clone(),
                key.clone(),
                myself.clone(),
                args.stats.clone(),
            );
            let max_batch_size = args.max_batch_size;
            tokio::spawn(async move {
                let result = match artifact_dir(&store, fetcher.as_ref(), &record).await {
                    Ok(dir) => tokio::task::spawn_blocking(move || {
                        load_and_warm(
                            loader.as_ref(),
                            &dir,
                            max_batch_size,
                            record.precision.as_deref(),
                        )
                    })
                    .await
                    .unwrap_or_else(|e| Err(format!("the load task failed: {e}"))),
                    Err(reason) => Err(reason),
                };
                let _ = crate::stats::send(&actor, &stats, SyncMsg::Loaded { key, result });
            });
        }
        for key in args.table.local_keys() {
            let still_wanted = wanted.iter().any(|(k, _)| *k == key);
            let serving = args.table.serving_version(&key.name).as_deref() == Some(&key.version);
            if should_unload(still_wanted, serving, args.table.local(&key).as_ref()) {
                tracing::info!(model = %key, "unloading model version");
                args.table.remove_local(&key);
                self.failed_at.remove(&key);
                // Draining can take a while; reconciling must not wait for it.
                let supervisor = args.supervisor.clone();
                tokio::spawn(async move { supervisor.stop_model(key).await });
            }
        }
        self.report_readiness(myself);
        Ok(())
    }
}

impl SyncState {
    /// Tells the cluster, through Raft, where this node is with each version, wherever that
    /// differs from what the metadata says: loading, ready, failed (with the reason), or
    /// unloaded for a version it reported before and no longer has.
    fn report_readiness(&mut self, myself: &ActorRef<SyncMsg>) {
        let node_id = self.args.node_id;
        for (key, record) in self.args.table.versions() {
            let current = record.nodes.get(&node_id);
            let desired = match self.args.table.local(&key) {
                Some(LocalState::Loading) => Some((NodeModelState::Loading, String::new())),
                Some(LocalState::Ready(_)) => Some((NodeModelState::Ready, String::new())),
                Some(LocalState::Failed(reason)) => {
                    let mut reason = reason;
                    if reason.len() > MAX_REASON_BYTES {
                        let mut cut = MAX_REASON_BYTES;
                        while !reason.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        reason.truncate(cut);
                    }
                    Some((NodeModelState::Failed, reason))
                }
                None => current
                    .filter(|r| r.state != NodeModelState::Unloaded)
                    .map(|_| (NodeModelState::Unloaded, String::new())),
            };
            let Some((state, reason)) = desired else {
                continue;
            };
            if current.is_some_and(|r| r.state == state && r.reason == reason) {
                self.reported.remove(&key);
                continue;
            }
            match self.reported.get(&key) {
                // The report before it is still on its way: this one follows when it returns
                // ([`SyncMsg::Reported`]). Two reports in flight at once could be applied in
                // either order and leave the older one standing (a version ready here but
                // recorded as loading, which stalls its rollout).
                Some(report) if report.in_flight => continue,
                // Proposed, but not yet seen in the metadata: look again when it is overdue.
                Some(report)
                    if report.state == state
                        && report.reason == reason
                        && report.at.elapsed() < REPORT_RETRY =>
                {
                    self.recheck_in(myself, REPORT_RETRY - report.at.elapsed());
                    continue;
                }
                _ => {}
            }
            self.reported.insert(
                key.clone(),
                Report {
                    state,
                    reason: reason.clone(),
                    at: Instant::now(),
                    in_flight: true,
                },
            );
            let (metadata, actor, stats) = (
                self.args.metadata.clone(),
                myself.clone(),
                self.args.stats.clone(),
            );
            let proposal = Proposal::new(Command::ReportModelReadiness {
                name: key.name.clone(),
                version: key.version.clone(),
                node_id,
                state,
                reason,
            });
            tokio::spawn(async move {
                let result = match report_failpoint(state).await {
                    Ok(()) => metadata.propose(proposal).await.map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                let proposed = match result {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(model = %key, %error, "cannot report readiness; retrying");
                        tokio::time::sleep(REPORT_BACKOFF).await;
                        false
                    }
                };
                let _ = crate::stats::send(&actor, &stats, SyncMsg::Reported { key, proposed });
            });
        }
    }

    /// Makes sure a [`SyncMsg::Recheck`] arrives within `delay`.
    fn recheck_in(&mut self, myself: &ActorRef<SyncMsg>, delay: Duration) {
        let due = Instant::now() + delay;
        if self.recheck_at.is_some_and(|at| at <= due) {
            return;
        }
        self.recheck_at = Some(due);
        crate::stats::send_after(myself, &self.args.stats, delay, || SyncMsg::Recheck);
    }
}

impl Actor for MetadataSync {
    type Msg = SyncMsg;
    type State = SyncState;
    type Arguments = SyncArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SyncArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let pending = Arc::new(AtomicBool::new(false));
        let (metadata, stats, flag) = (args.metadata.clone(), args.stats.clone(), pending.clone());
        let (table, lanes) = (args.table.clone(), args.lanes);
        // The table starts from the applied state; then each change's payload is applied to
        // it as the watch delivers it (the whole state again only when the watch resyncs).
        let (state, revision) = metadata.snapshot_state().await;
        table.set_metadata(revision, state.models, state.tasks, lanes);
        let actor = myself.clone();
        let watcher = tokio::spawn(async move {
            let mut watch = metadata.watch_resyncing(revision + 1);
            loop {
                match watch.next_revision().await {
                    Ok(WatchBatch::Resync { state, revision }) => {
                        let state = *state;
                        table.set_metadata(revision, state.models, state.tasks, lanes);
                        notify_changed(&actor, &stats, &flag);
                    }
                    // One command's changes are applied together: activating a version retires
                    // the one before at the same revision, and the table never shows the model
                    // with neither active.
                    Ok(WatchBatch::Changes(changes)) => {
                        let settings_only = changes
                            .iter()
                            .all(|c| matches!(c.value, ChangeValue::Setting { .. }));
                        table.apply(changes, lanes);
                        if !settings_only {
                            notify_changed(&actor, &stats, &flag);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "metadata watch ended");
                        return;
                    }
                }
            }
        });
        notify_changed(&myself, &args.stats, &pending);
        Ok(SyncState {
            args,
            watcher,
            pending,
            failed_at: HashMap::new(),
            reported: HashMap::new(),
            recheck_at: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.stats.handled();
        match message {
            SyncMsg::Changed => {
                state.pending.store(false, Ordering::Release);
                state.reconcile(&myself).await?;
            }
            SyncMsg::Loaded { key, result } => {
                let wanted = state.args.table.wanted();
                let record = wanted.iter().find(|(k, _)| *k == key).map(|(_, r)| r);
                match (result, record) {
                    (Ok(model), Some(_)) => {
                        match state.args.supervisor.start_model(key.clone(), model).await {
                            Ok(batcher) => {
                                tracing::info!(model = %key, "model version ready");
                                state.args.table.set_local(key, LocalState::Ready(batcher));
                            }
                            Err(reason) => {
                                state.args.table.set_local(key, LocalState::Failed(reason));
                            }
                        }
                    }
                    (Err(reason), record) => {
                        tracing::error!(model = %key, %reason, "model version failed to load");
                        if let Some(record) = record {
                            state
                                .failed_at
                                .insert(key.clone(), record.revisions.mod_revision);
                        }
                        state.args.table.set_local(key, LocalState::Failed(reason));
                    }
                    (Ok(_), None) => {
                        // Retired while it loaded: drop it.
                        state.args.table.remove_local(&key);
                    }
                }
                state.reconcile(&myself).await?;
            }
            SyncMsg::Reported { key, proposed } => {
                if let Some(report) = state.reported.get_mut(&key) {
                    report.in_flight = false;
                    if !proposed {
                        // Failed: not pending any more, so the next look proposes it again.
                        state.reported.remove(&key);
                    }
                }
                state.reconcile(&myself).await?;
            }
            SyncMsg::Recheck => {
                if state.recheck_at.is_some_and(|at| at <= Instant::now()) {
                    state.recheck_at = None;
                }
                state.reconcile(&myself).await?;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.watcher.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> LocalState {
        LocalState::Failed("out of memory".into())
    }

    #[test]
    fn a_wanted_version_loads_when_absent_and_not_twice() {
        assert!(should_load(None, None, 7));
        assert!(!should_load(Some(&LocalState::Loading), None, 7));
    }

    #[test]
    fn a_failed_load_is_retried_only_after_its_record_changes() {
        // Failed at revision 7: the same record is not retried (no crash loop)...
        assert!(!should_load(Some(&failed()), Some(7), 7));
        // ...an operator's new request (the record moved on) is.
        assert!(should_load(Some(&failed()), Some(7), 9));
        // A failure with no revision on record (say, from before a restart) is retried.
        assert!(should_load(Some(&failed()), None, 7));
    }

    #[test]
    fn a_version_unloads_once_neither_wanted_nor_served_and_not_mid_load() {
        assert!(should_unload(false, false, Some(&failed())));
        assert!(!should_unload(true, false, Some(&failed())));
        assert!(!should_unload(false, true, Some(&failed())));
        assert!(!should_unload(false, false, Some(&LocalState::Loading)));
        assert!(!should_unload(false, false, None));
    }
}
