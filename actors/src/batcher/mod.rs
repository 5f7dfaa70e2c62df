//! Batcher: one per loaded model version. It queues requests in bounded priority lanes and
//! hands batches to its inference worker threads, which it owns and restarts.
//!
//! A batch goes to a free worker when the queue holds `max_batch_size` texts, when as many
//! requests wait as the load has lately kept outstanding (queued plus computing: closed-loop
//! clients come back together, so their requests leave together), or when the oldest request
//! has waited `max_queue_delay` with a worker free. While every worker is busy, requests
//! accumulate, which is where large batches come from; with one client nothing ever waits.
//! A full lane refuses at once with `RESOURCE_EXHAUSTED`; a request whose deadline passed is
//! answered `DEADLINE_EXCEEDED` and never reaches the model.

pub mod messages;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_models::{LoadedModel, SentenceEmbedder};

pub use messages::{Batch, BatcherCounters, BatcherMsg, EmbedJob, GenEvent, GenJob, JobResult};

use crate::config::ServingConfig;
use crate::error::ServeError;
use crate::lanes::Lanes;
use crate::restart::RestartBudget;
use crate::stats::{call, send, send_after, spawn_child, ActorDirectory, ActorStats};
use crate::table::ModelKey;
use crate::worker::WorkerArgs;

/// Restart latencies kept for inspection (newest last).
const RESTART_HISTORY: usize = 1024;

/// Upper bounds of the batch-size histogram's buckets, in rows.
pub const BATCH_SIZE_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Shared counters of one batcher; readable by the node without a message round trip.
#[derive(Debug, Default)]
pub struct BatcherShared {
    /// Batches by size: one count per bucket of [`BATCH_SIZE_BUCKETS`] (not cumulative).
    batch_sizes: [AtomicU64; BATCH_SIZE_BUCKETS.len()],
    batches: AtomicU64,
    rows: AtomicU64,
    pub(crate) jobs: AtomicU64,
    pub(crate) rejected_full: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) worker_restarts: AtomicU64,
    pub(crate) lane_depths: Mutex<Vec<usize>>,
    restart_latencies: Mutex<Vec<Duration>>,
    /// A decoder's figures (zero for an encoder).
    pub generation: crate::scheduler::GenStats,
}

impl BatcherShared {
    pub fn counters(&self) -> BatcherCounters {
        BatcherCounters {
            batches: self.batches.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            jobs: self.jobs.load(Ordering::Relaxed),
            rejected_full: self.rejected_full.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            worker_restarts: self.worker_restarts.load(Ordering::Relaxed),
        }
    }

    /// Time from a worker's crash to its replacement being ready, newest last.
    pub fn restart_latencies(&self) -> Vec<Duration> {
        lock(&self.restart_latencies).clone()
    }

    pub fn lane_depths(&self) -> Vec<usize> {
        lock(&self.lane_depths).clone()
    }

    /// Batches by size, per bucket of [`BATCH_SIZE_BUCKETS`] (not cumulative); the sum of
    /// rows and the count of batches are in [`BatcherShared::counters`].
    pub fn batch_sizes(&self) -> Vec<u64> {
        self.batch_sizes
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    pub(crate) fn computed(&self, jobs: u64, rows: u64) {
        let bucket = BATCH_SIZE_BUCKETS
            .iter()
            .position(|&bound| rows <= bound)
            .unwrap_or(BATCH_SIZE_BUCKETS.len() - 1);
        self.batch_sizes[bucket].fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.jobs.fetch_add(jobs, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
    }

    pub(crate) fn failed_batch(&self, jobs: u64) {
        self.failed.fetch_add(jobs, Ordering::Relaxed);
    }

    pub(crate) fn expired_at_worker(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the rest of the node talks to a batcher (an encoder's) or a scheduler (a decoder's).
#[derive(Debug, Clone)]
pub struct BatcherHandle {
    pub key: ModelKey,
    actor: ActorRef<BatcherMsg>,
    stats: Arc<ActorStats>,
    shared: Arc<BatcherShared>,
    /// The model, for request handlers that prepare inputs (a decoder's tokenizer and chat
    /// template).
    model: LoadedModel,
}

impl BatcherHandle {
    pub(crate) fn new(
        key: ModelKey,
        actor: ActorRef<BatcherMsg>,
        stats: Arc<ActorStats>,
        shared: Arc<BatcherShared>,
        model: LoadedModel,
    ) -> Self {
        Self {
            key,
            actor,
            stats,
            shared,
            model,
        }
    }

    /// Queues a job; the answer comes on the job's reply channel. A batcher that is gone
    /// answers `UNAVAILABLE` through the dropped channel.
    pub fn submit(&self, job: EmbedJob) {
        if let Err(ractor::MessagingErr::SendErr(BatcherMsg::Submit(job))) =
            send(&self.actor, &self.stats, BatcherMsg::Submit(job))
        {
            let _ = job.reply.send(Err(ServeError::Unavailable {
                model: self.key.name.clone(),
                version: self.key.version.clone(),
                reason: "its batcher has stopped".into(),
            }));
        }
    }

    /// Queues a generation; its stream comes on the job's event channel. A scheduler that is
    /// gone answers `UNAVAILABLE` on it.
    pub fn generate(&self, job: GenJob) {
        if let Err(ractor::MessagingErr::SendErr(BatcherMsg::Generate(job))) =
            send(&self.actor, &self.stats, BatcherMsg::Generate(job))
        {
            let _ = job.events.send(GenEvent::Failed(ServeError::Unavailable {
                model: self.key.name.clone(),
                version: self.key.version.clone(),
                reason: "its scheduler has stopped".into(),
            }));
        }
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Waits until every queued request has been answered (or `timeout` passes).
    pub async fn drain(&self, timeout: Duration) -> bool {
        matches!(
            call(&self.actor, &self.stats, BatcherMsg::Drain, Some(timeout)).await,
            Ok(ractor::rpc::CallResult::Success(()))
        )
    }

    pub fn shared(&self) -> &Arc<BatcherShared> {
        &self.shared
    }

    pub fn actor(&self) -> &ActorRef<BatcherMsg> {
        &self.actor
    }
}

pub struct BatcherArgs {
    pub node_id: u64,
    pub key: ModelKey,
    pub path: String,
    pub model: LoadedModel,
    pub config: ServingConfig,
    pub budget: Arc<RestartBudget>,
    pub directory: ActorDirectory,
    pub shared: Arc<BatcherShared>,
    pub stats: Arc<ActorStats>,
}

struct WorkerSlot {
    /// The worker's thread, while it runs.
    joined: Option<std::thread::JoinHandle<()>>,
    /// Straight to the worker's thread.
    thread: Option<std::sync::mpsc::Sender<Batch>>,
    busy: bool,
    /// Requests in the batch this worker computes.
    jobs: usize,
    /// When it last became free: requests wait for a fuller batch only while a worker is
    /// free, so time spent queued behind a computing batch does not count.
    free_since: Instant,
}

impl WorkerSlot {
    fn empty() -> Self {
        Self {
            joined: None,
            thread: None,
            busy: false,
            jobs: 0,
            free_since: Instant::now(),
        }
    }
}

/// Dispatches whose peak load is remembered for the flush rule.
const PEAK_HISTORY: usize = 8;

pub struct BatcherState {
    args: BatcherArgs,
    lanes: Lanes<EmbedJob>,
    workers: Vec<WorkerSlot>,
    /// Requests queued or computing now.
    in_flight_jobs: usize,
    /// Most requests queued or computing at once since the last dispatch, and over the
    /// dispatches before it: how many requests the load keeps outstanding.
    peak_outstanding: usize,
    recent_peaks: std::collections::VecDeque<usize>,
    flush_at: Option<Instant>,
    next_batch_id: u64,
    drain_waiters: Vec<ractor::RpcReplyPort<()>>,
    /// Set when restarts are exhausted: every request is refused with this reason.
    broken: Option<String>,
}

pub struct Batcher;

impl Batcher {
    /// Starts a batcher linked to `supervisor`, returning the handle the node uses.
    pub async fn start(
        args: BatcherArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<BatcherHandle, ractor::SpawnErr> {
        start_as(Batcher, args, supervisor).await
    }
}

/// Starts `actor` (a batcher, or a decoder's scheduler: both speak the batcher protocol)
/// linked to `supervisor`, returning the handle the node uses.
pub(crate) async fn start_as<A>(
    actor: A,
    args: BatcherArgs,
    supervisor: ractor::ActorCell,
) -> Result<BatcherHandle, ractor::SpawnErr>
where
    A: Actor<Msg = BatcherMsg, Arguments = BatcherArgs>,
{
    let (key, stats, shared, model) = (
        args.key.clone(),
        args.stats.clone(),
        args.shared.clone(),
        args.model.clone(),
    );
    let (path, directory) = (args.path.clone(), args.directory.clone());
    let actor = spawn_child(&directory, &path, actor, args, supervisor).await?;
    Ok(BatcherHandle::new(key, actor, stats, shared, model))
}

fn worker_path(batcher: &str, index: usize) -> String {
    format!("{batcher}/worker-{index}")
}

impl BatcherState {
    fn unavailable(&self, reason: &str) -> ServeError {
        ServeError::Unavailable {
            model: self.args.key.name.clone(),
            version: self.args.key.version.clone(),
            reason: reason.to_owned(),
        }
    }

    fn encoder(&self) -> Result<Arc<dyn SentenceEmbedder>, ActorProcessingErr> {
        match &self.args.model {
            LoadedModel::Encoder(model) => Ok(model.clone()),
            other => Err(format!("a batcher serves encoders, not {other:?}").into()),
        }
    }

    fn publish_depths(&self) {
        let shared = &self.args.shared;
        shared
            .queued
            .store(self.lanes.len() as u64, Ordering::Relaxed);
        *lock(&shared.lane_depths) = self.lanes.depths();
    }

    fn submit(&mut self, job: EmbedJob) {
        if let Some(reason) = &self.broken {
            let _ = job.reply.send(Err(self.unavailable(reason)));
            return;
        }
        if !self.drain_waiters.is_empty() {
            let _ = job.reply.send(Err(ServeError::ShuttingDown));
            return;
        }
        let now = Instant::now();
        let (lane, deadline) = (job.lane, job.deadline);
        let pushed = self.lanes.push(lane, job, now, deadline);
        self.peak_outstanding = self
            .peak_outstanding
            .max(self.lanes.len() + self.in_flight_jobs);
        if let Err((full, job)) = pushed {
            self.args
                .shared
                .rejected_full
                .fetch_add(1, Ordering::Relaxed);
            let _ = job.reply.send(Err(ServeError::QueueFull {
                model: self.args.key.name.clone(),
                version: self.args.key.version.clone(),
                lane: full.lane,
                capacity: full.capacity,
            }));
        }
    }

    /// Answers requests whose deadline passed and forgets those whose caller is gone
    /// (cancelled, or timed out on its side): neither reaches the model.
    fn drop_expired(&mut self, now: Instant) {
        let dropped = self.lanes.take_where(|job, deadline| {
            deadline.is_some_and(|d| d <= now) || job.reply.is_closed()
        });
        for job in dropped {
            if job.reply.is_closed() {
                self.args.shared.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(request_id = %job.request_id, "caller gone before compute");
                continue;
            }
            self.args.shared.expired.fetch_add(1, Ordering::Relaxed);
            let waited_ms = now.duration_since(job.received).as_millis() as u64;
            tracing::debug!(request_id = %job.request_id, waited_ms, "deadline passed in the queue");
            let _ = job
                .reply
                .send(Err(ServeError::DeadlineExceeded { waited_ms }));
        }
    }

    /// Hands batches to free workers while the flush rule allows; arms the flush timer when
    /// requests wait for a batch to fill.
    fn dispatch(&mut self, myself: &ActorRef<BatcherMsg>) {
        let now = Instant::now();
        self.drop_expired(now);
        let config = &self.args.config;
        while !self.lanes.is_empty() {
            let Some(worker) = self
                .workers
                .iter()
                .position(|slot| !slot.busy && slot.thread.is_some())
            else {
                break;
            };
            let free_since = self.workers[worker].free_since;
            let waited = self
                .lanes
                .oldest_enqueued()
                .map_or(Duration::ZERO, |oldest| {
                    now.duration_since(oldest.max(free_since))
                });
            let flush = flush_now(
                Waiting {
                    weight: self.lanes.total_weight(),
                    jobs: self.lanes.len(),
                    waited,
                },
                self.target_jobs(),
                !self.drain_waiters.is_empty(),
                config,
            );
            if !flush {
                let due = now + (config.max_queue_delay - waited);
                if self.flush_at.is_none_or(|at| at > due || at < now) {
                    self.flush_at = Some(due);
                    // The timer task runs on its own; its handle is not needed.
                    send_after(
                        myself,
                        &self.args.stats,
                        config.max_queue_delay - waited,
                        || BatcherMsg::Flush,
                    );
                }
                break;
            }
            let jobs = self.lanes.take_batch_weighted(config.max_batch_size);
            self.recent_peaks.push_back(self.peak_outstanding);
            if self.recent_peaks.len() > PEAK_HISTORY {
                self.recent_peaks.pop_front();
            }
            let id = self.next_batch_id;
            self.next_batch_id += 1;
            let count = jobs.len();
            let slot = &mut self.workers[worker];
            let sent = match &slot.thread {
                Some(thread) => thread.send(Batch { id, jobs }),
                None => Err(std::sync::mpsc::SendError(Batch { id, jobs })),
            };
            match sent {
                Ok(()) => {
                    slot.busy = true;
                    slot.jobs = count;
                    self.in_flight_jobs += count;
                    self.args.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                }
                Err(std::sync::mpsc::SendError(batch)) => {
                    // The thread is gone; its death report is on its way, and a new thread
                    // will take its place.
                    slot.thread = None;
                    for job in batch.jobs {
                        let _ = job
                            .reply
                            .send(Err(self.unavailable("its worker has stopped")));
                    }
                }
            }
            self.peak_outstanding = self.lanes.len() + self.in_flight_jobs;
        }
        self.publish_depths();
        self.answer_drain_waiters();
    }

    /// Requests a batch waits for while a worker is free: as many as the load has kept
    /// outstanding lately (closed-loop clients come back together), capped by the batch size.
    fn target_jobs(&self) -> usize {
        let peak = self
            .recent_peaks
            .iter()
            .copied()
            .chain([self.peak_outstanding])
            .max()
            .unwrap_or(1);
        peak.clamp(1, self.args.config.max_batch_size.max(1))
    }

    /// A worker finished (or lost) its batch.
    fn worker_done(&mut self, worker: usize) {
        if let Some(slot) = self.workers.get_mut(worker) {
            if slot.busy {
                slot.busy = false;
                slot.free_since = Instant::now();
                self.in_flight_jobs = self.in_flight_jobs.saturating_sub(slot.jobs);
                slot.jobs = 0;
                self.args.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn answer_drain_waiters(&mut self) {
        let idle = self.workers.iter().all(|slot| !slot.busy);
        if !self.drain_waiters.is_empty() && self.lanes.is_empty() && idle {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// Starts worker `index`'s thread, in place of any before it.
    fn spawn_worker(
        &mut self,
        index: usize,
        myself: &ActorRef<BatcherMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let path = worker_path(&self.args.path, index);
        self.args.directory.fresh_stats(&path, "inference_worker");
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (thread, batches) = std::sync::mpsc::channel();
        let joined = crate::worker::start(WorkerArgs {
            index,
            node_id: self.args.node_id,
            key: self.args.key.clone(),
            model: self.encoder()?,
            max_batch_size: self.args.config.max_batch_size,
            batcher: myself.clone(),
            batcher_stats: self.args.stats.clone(),
            shared: self.args.shared.clone(),
            batches,
            compute_nice: self.args.config.compute_nice,
            alive: alive.clone(),
        })?;
        self.args.directory.attach_thread(&path, alive);
        self.workers[index] = WorkerSlot {
            joined: Some(joined),
            thread: Some(thread),
            busy: false,
            jobs: 0,
            free_since: Instant::now(),
        };
        Ok(())
    }

    /// Worker `index`'s thread died at `died_at`: a new one takes its place while the restart
    /// budget allows; past it, the worker stays down, and with the last one down every
    /// request is refused with the reason.
    fn worker_died(
        &mut self,
        myself: &ActorRef<BatcherMsg>,
        index: usize,
        died_at: Instant,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        if index >= self.workers.len() {
            return Ok(());
        }
        self.worker_done(index);
        // The thread has ended or is ending: nothing waits for it.
        self.workers[index] = WorkerSlot::empty();
        let path = worker_path(&self.args.path, index);
        tracing::warn!(model = %self.args.key, worker = index, %reason, "inference worker failed");
        match self.args.budget.try_restart(&path, Instant::now()) {
            Ok(()) => {
                self.spawn_worker(index, myself)?;
                let latency = died_at.elapsed();
                self.args
                    .directory
                    .stats(&path, "inference_worker")
                    .restarted();
                self.args
                    .shared
                    .worker_restarts
                    .fetch_add(1, Ordering::Relaxed);
                let mut latencies = lock(&self.args.shared.restart_latencies);
                if latencies.len() >= RESTART_HISTORY {
                    latencies.remove(0);
                }
                latencies.push(latency);
                drop(latencies);
                tracing::info!(model = %self.args.key, worker = index, restart_ms = latency.as_secs_f64() * 1e3, "inference worker restarted");
            }
            Err(escalation) => {
                tracing::error!(model = %self.args.key, worker = index, %escalation, "not restarting the inference worker");
                if self.workers.iter().all(|slot| slot.thread.is_none()) {
                    for job in self.lanes.take_batch_weighted(usize::MAX) {
                        let _ = job.reply.send(Err(self.unavailable(&escalation)));
                    }
                    self.broken = Some(escalation);
                }
            }
        }
        Ok(())
    }
}

impl Actor for Batcher {
    type Msg = BatcherMsg;
    type State = BatcherState;
    type Arguments = BatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: BatcherArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let count = args.config.workers_per_model.max(1);
        let mut state = BatcherState {
            lanes: Lanes::new(args.config.lanes, args.config.queue_capacity),
            workers: (0..count).map(|_| WorkerSlot::empty()).collect(),
            in_flight_jobs: 0,
            peak_outstanding: 0,
            recent_peaks: std::collections::VecDeque::new(),
            flush_at: None,
            next_batch_id: 0,
            drain_waiters: Vec::new(),
            broken: None,
            args,
        };
        for index in 0..count {
            state.spawn_worker(index, &myself)?;
        }
        let shared = state.args.shared.clone();
        state.args.directory.set_detail(
            &state.args.path,
            Arc::new(move || {
                let c = shared.counters();
                format!(
                    "lanes {:?}, in flight {}, batches {}, rows {}",
                    shared.lane_depths(),
                    c.in_flight,
                    c.batches,
                    c.rows
                )
            }),
        );
        tracing::info!(model = %state.args.key, workers = count, "batcher started");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.stats.handled();
        match message {
            BatcherMsg::Submit(job) => state.submit(job),
            BatcherMsg::Flush => state.flush_at = None,
            BatcherMsg::WorkerIdle { worker } => state.worker_done(worker),
            BatcherMsg::WorkerDied { worker, at, reason } => {
                state.worker_died(&myself, worker, at, reason)?
            }
            BatcherMsg::Drain(reply) => state.drain_waiters.push(reply),
            BatcherMsg::Generate(job) => {
                let _ = job.events.send(GenEvent::Failed(ServeError::WrongKind {
                    model: state.args.key.name.clone(),
                    version: state.args.key.version.clone(),
                    serves: "embed",
                    asked: "generate",
                }));
            }
            BatcherMsg::GenerationEnded | BatcherMsg::EngineFailed { .. } => {}
        }
        state.dispatch(&myself);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Dropping the senders ends each worker thread after its current batch; the batcher
        // waits for them (at most the drain timeout), so none outlives it.
        let threads: Vec<_> = state
            .workers
            .iter_mut()
            .filter_map(|slot| {
                slot.thread = None;
                slot.joined.take()
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        if tokio::time::timeout(state.args.config.drain_timeout, joined)
            .await
            .is_err()
        {
            tracing::warn!(model = %state.args.key, "a worker thread is still computing after the drain timeout");
        }
        for job in state.lanes.take_batch_weighted(usize::MAX) {
            let _ = job.reply.send(Err(ServeError::ShuttingDown));
        }
        state.publish_depths();
        tracing::info!(model = %state.args.key, "batcher stopped");
        Ok(())
    }
}

/// What waits for a free worker.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    /// Texts queued, over every lane.
    weight: usize,
    /// Requests queued.
    jobs: usize,
    /// How long the oldest has waited, counted from when the worker became free.
    waited: Duration,
}

/// The flush rule: a free worker takes a batch now when it is full, when the oldest request
/// has waited `max_queue_delay`, when as many requests wait as were outstanding at the recent
/// peak (`target_jobs`: nobody else is coming, so waiting longer only adds latency), or when
/// a drain is waiting. Otherwise the batcher waits for the batch to fill, at most until the
/// delay is up.
fn flush_now(waiting: Waiting, target_jobs: usize, draining: bool, config: &ServingConfig) -> bool {
    waiting.weight >= config.max_batch_size
        || waiting.waited >= config.max_queue_delay
        || waiting.jobs >= target_jobs
        || draining
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServingConfig {
        ServingConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(5),
            ..ServingConfig::default()
        }
    }

    fn waiting(weight: usize, jobs: usize, waited_ms: u64) -> Waiting {
        Waiting {
            weight,
            jobs,
            waited: Duration::from_millis(waited_ms),
        }
    }

    #[test]
    fn a_partial_batch_waits_for_more_while_more_are_outstanding() {
        // 3 of a peak of 16 outstanding requests queued, 1 ms in: more are coming.
        assert!(!flush_now(waiting(3, 3, 1), 16, false, &config()));
    }

    #[test]
    fn a_full_batch_goes_at_once() {
        // 8 texts fill the batch even from 2 requests, however short the wait.
        assert!(flush_now(waiting(8, 2, 0), 16, false, &config()));
    }

    #[test]
    fn the_oldest_request_never_waits_past_the_delay() {
        assert!(!flush_now(waiting(1, 1, 4), 16, false, &config()));
        assert!(flush_now(waiting(1, 1, 5), 16, false, &config()));
    }

    #[test]
    fn when_everyone_outstanding_is_queued_the_batch_goes() {
        // A lone client (peak 1) never waits for company; 4 clients, all queued, neither.
        assert!(flush_now(waiting(1, 1, 0), 1, false, &config()));
        assert!(flush_now(waiting(4, 4, 0), 4, false, &config()));
        assert!(!flush_now(waiting(3, 3, 0), 4, false, &config()));
    }

    #[test]
    fn a_waiting_drain_flushes_what_is_queued() {
        assert!(flush_now(waiting(1, 1, 0), 16, true, &config()));
    }
}
