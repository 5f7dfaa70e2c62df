//! Scheduler: one per loaded decoder version. Continuous batching over a paged KV cache.
//!
//! It speaks the batcher protocol ([`BatcherMsg`]), so the supervisor, the serving table,
//! restarts and draining treat it as they treat an encoder's batcher. The actor forwards
//! requests to a step loop on its own thread and restarts that thread if it panics (drawing
//! on the node's restart budget).
//!
//! Each step of the loop:
//! 1. takes new requests into their priority lanes (a full lane refuses at once);
//! 2. drops what is cancelled (the caller's stream is gone) or past its deadline, freeing
//!    blocks at once;
//! 3. admits waiting sequences, highest lane first, while KV blocks are free. A sequence that
//!    cannot get blocks may preempt running ones of a lower lane: they give their blocks back
//!    and wait at the head of their lane with their tokens kept, and are prefilled again when
//!    readmitted (recompute, not swap: at 135 M parameters a prefill is cheaper than moving the
//!    cache out of memory and back);
//! 4. runs one ragged batch: every decoding sequence's last token, plus prompt chunks up to
//!    `prefill_chunk` tokens, so a long prompt never stalls the running streams for long;
//! 5. samples, streams each token out, and frees the blocks of finished sequences.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_models::decoder::{Decoder, KvPool, SeqStep, BLOCK_TOKENS};
use troupe_models::generate::Decoding;
use troupe_models::LoadedModel;

use crate::batcher::{BatcherArgs, BatcherHandle, BatcherMsg, GenEvent, GenJob};
use crate::error::ServeError;
use crate::lanes::Lanes;
use crate::stats::{send, ActorStats};

/// A fixed-bucket histogram, readable without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        if let Some(bucket) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(upper bound in seconds, cumulative count)` per bucket, then the sum in seconds and
    /// the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&bound, count)| {
                cumulative += count.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        (
            buckets,
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
        )
    }
}

const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A decoder's figures, for /metrics and the tests.
#[derive(Debug)]
pub struct GenStats {
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    /// Sequences holding KV blocks now.
    pub running: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between two tokens of one stream.
    pub inter_token: Histogram,
}

impl Default for GenStats {
    fn default() -> Self {
        Self {
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            running: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            inter_token: Histogram::new(ITL_BUCKETS),
        }
    }
}

/// Blocks that fit `kv_cache_mb` for `decoder`.
pub fn kv_blocks(decoder: &Decoder, kv_cache_mb: usize) -> usize {
    let config = decoder.model.config();
    let per_block = KvPool::block_bytes(config.layers, decoder.model.kv_width(), BLOCK_TOKENS);
    (kv_cache_mb << 20) / per_block
}

/// What the step loop is sent.
enum Work {
    Job(GenJob),
}

/// A request in a lane: new, or preempted with its progress kept.
struct Waiting {
    job: GenJob,
    /// Prompt plus the tokens generated before a preemption.
    tokens: Vec<u32>,
    decoding: Decoding,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// A sequence holding KV blocks.
struct Running {
    job: GenJob,
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    decoding: Decoding,
    /// Admission order: the latest admitted of the lowest lane is preempted first.
    admitted: u64,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Running {
    fn into_waiting(self) -> Waiting {
        Waiting {
            job: self.job,
            tokens: self.tokens,
            decoding: self.decoding,
            first_token: self.first_token,
            last_token: self.last_token,
        }
    }
}

struct StepLoop {
    decoder: Arc<Decoder>,
    pool: KvPool,
    lanes: Lanes<Waiting>,
    running: Vec<Running>,
    next_admission: u64,
    prefill_chunk: usize,
    shared: Arc<crate::batcher::BatcherShared>,
    actor: ActorRef<BatcherMsg>,
    /// The actor's mailbox counter.
    stats: Arc<ActorStats>,
    key: crate::table::ModelKey,
}

impl StepLoop {
    fn unavailable(&self, reason: &str) -> ServeError {
        ServeError::Unavailable {
            model: self.key.name.clone(),
            version: self.key.version.clone(),
            reason: reason.to_owned(),
        }
    }

    /// One request is over: the actor counts it.
    fn ended(&self) {
        let _ = send(&self.actor, &self.stats, BatcherMsg::GenerationEnded);
    }

    fn accept(&mut self, job: GenJob) {
        let total = job.prompt_ids.len() + job.params.max_tokens;
        let blocks = self.pool.blocks_for(total);
        if blocks > self.pool.total_blocks() {
            let _ = job.events.send(GenEvent::Failed(ServeError::TooLong {
                model: self.key.name.clone(),
                reason: format!(
                    "the prompt ({} tokens) plus max_tokens ({}) needs {blocks} KV blocks of {BLOCK_TOKENS} tokens, and the whole cache holds {} (serving.kv_cache_mb): lower max_tokens, shorten the prompt, or raise kv_cache_mb",
                    job.prompt_ids.len(),
                    job.params.max_tokens,
                    self.pool.total_blocks()
                ),
            }));
            self.ended();
            return;
        }
        let (lane, deadline, received) = (job.lane, job.deadline, job.received);
        let eos = self.decoder.model.config().eos;
        let waiting = Waiting {
            tokens: job.prompt_ids.clone(),
            decoding: Decoding::new(job.params.clone(), eos),
            job,
            first_token: None,
            last_token: None,
        };
        if let Err((full, waiting)) = self.lanes.push(lane, waiting, received, deadline) {
            self.shared.rejected_full.fetch_add(1, Ordering::Relaxed);
            let _ = waiting
                .job
                .events
                .send(GenEvent::Failed(ServeError::QueueFull {
                    model: self.key.name.clone(),
                    version: self.key.version.clone(),
                    lane: full.lane,
                    capacity: full.capacity,
                }));
            self.ended();
        }
    }

    /// Frees what nobody waits for any more, and what ran out of time.
    fn drop_gone(&mut self, now: Instant) {
        let expired = |job: &GenJob| job.deadline.is_some_and(|d| d <= now);
        for waiting in self
            .lanes
            .take_where(|w, _| w.job.events.is_closed() || expired(&w.job))
        {
            self.finish_early(waiting.job, now);
        }
        let mut kept = Vec::with_capacity(self.running.len());
        for running in std::mem::take(&mut self.running) {
            if running.job.events.is_closed() || expired(&running.job) {
                self.pool.release(running.blocks);
                self.finish_early(running.job, now);
            } else {
                kept.push(running);
            }
        }
        self.running = kept;
    }

    fn finish_early(&self, job: GenJob, now: Instant) {
        if job.events.is_closed() {
            self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %job.request_id, "generation cancelled by its caller");
        } else {
            self.shared.expired.fetch_add(1, Ordering::Relaxed);
            let waited_ms = now.duration_since(job.received).as_millis() as u64;
            let _ = job
                .events
                .send(GenEvent::Failed(ServeError::DeadlineExceeded { waited_ms }));
        }
        self.ended();
    }

    /// Blocks a sequence of `tokens` tokens needs for its next step (which writes up to
    /// position `tokens - 1`), beyond the `held` it has.
    fn missing_blocks(&self, tokens: usize, held: usize) -> usize {
        self.pool.blocks_for(tokens).saturating_sub(held)
    }

    /// Preempts running sequences of a lane below `lane` (latest admitted of the lowest lane
    /// first) until `needed` blocks are free. Returns whether they are.
    fn preempt_for(&mut self, lane: usize, needed: usize) -> bool {
        while self.pool.free_blocks() < needed {
            let victim = self
                .running
                .iter()
                .enumerate()
                .filter(|(_, r)| r.job.lane > lane)
                .max_by_key(|(_, r)| (r.job.lane, r.admitted))
                .map(|(i, _)| i);
            let Some(victim) = victim else {
                return false;
            };
            let mut running = self.running.swap_remove(victim);
            self.pool.release(std::mem::take(&mut running.blocks));
            self.shared
                .generation
                .preemptions
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = %running.job.request_id, lane = running.job.lane, "preempted by a higher lane; it will be prefilled again");
            let (lane, deadline, received) =
                (running.job.lane, running.job.deadline, running.job.received);
            self.lanes
                .push_front(lane, running.into_waiting(), received, deadline);
        }
        true
    }

    fn admit(&mut self) {
        while let Some((lane, head)) = self.lanes.peek() {
            let needed = self.missing_blocks(head.tokens.len(), 0);
            if self.pool.free_blocks() < needed && !self.preempt_for(lane, needed) {
                break;
            }
            let Some(waiting) = self.lanes.take_batch(1).pop() else {
                break;
            };
            let blocks = self
                .pool
                .allocate(needed)
                .expect("blocks were checked free");
            self.next_admission += 1;
            self.running.push(Running {
                job: waiting.job,
                tokens: waiting.tokens,
                cached: 0,
                blocks,
                decoding: waiting.decoding,
                admitted: self.next_admission,
                first_token: waiting.first_token,
                last_token: waiting.last_token,
            });
        }
    }

    /// Gives every running sequence the blocks its next step writes to, highest lane and
    /// earliest admitted first, preempting lower lanes (or, last, itself) when the cache is
    /// full.
    fn grow(&mut self) {
        let mut order: Vec<(usize, u64)> = self
            .running
            .iter()
            .map(|r| (r.job.lane, r.admitted))
            .collect();
        order.sort_unstable();
        for (lane, admitted) in order {
            // Preemption moves sequences around: find each by its admission.
            let Some(i) = self.running.iter().position(|r| r.admitted == admitted) else {
                continue;
            };
            let needed =
                self.missing_blocks(self.running[i].tokens.len(), self.running[i].blocks.len());
            if needed == 0 {
                continue;
            }
            if self.pool.free_blocks() < needed && !self.preempt_for(lane, needed) {
                // No lower lane to take from: this sequence waits instead.
                let mut running = self.running.swap_remove(i);
                self.pool.release(std::mem::take(&mut running.blocks));
                self.shared
                    .generation
                    .preemptions
                    .fetch_add(1, Ordering::Relaxed);
                let (lane, deadline, received) =
                    (running.job.lane, running.job.deadline, running.job.received);
                self.lanes
                    .push_front(lane, running.into_waiting(), received, deadline);
                continue;
            }
            let blocks = self
                .pool
                .allocate(needed)
                .expect("blocks were checked free");
            if let Some(r) = self.running.iter_mut().find(|r| r.admitted == admitted) {
                r.blocks.extend(blocks);
            }
        }
    }

    /// Runs one step; returns false when there was nothing to run.
    fn step(&mut self) -> bool {
        if self.running.is_empty() {
            return false;
        }
        // Decodes first (one token each), then prompt chunks within the budget.
        let mut budget = self.prefill_chunk.max(1);
        let mut spans = Vec::with_capacity(self.running.len());
        for r in &self.running {
            let left = r.tokens.len() - r.cached;
            let take = if left <= 1 {
                left
            } else {
                let take = left.min(budget);
                budget -= take;
                take
            };
            spans.push(take);
        }
        let steps: Vec<SeqStep<'_>> = self
            .running
            .iter()
            .zip(&spans)
            .map(|(r, &take)| SeqStep {
                tokens: &r.tokens[r.cached..r.cached + take],
                start: r.cached,
                blocks: &r.blocks,
                logits: take > 0 && r.cached + take == r.tokens.len(),
            })
            .collect();
        crate::failpoints::during_batch();
        let logits = self.decoder.model.step(&mut self.pool, &steps);
        drop(steps);
        let stats = &self.shared.generation;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let mut logits = logits.into_iter();
        let now = Instant::now();
        let mut finished = Vec::new();
        for (index, take) in spans.into_iter().enumerate() {
            let r = &mut self.running[index];
            if r.cached < r.job.prompt_ids.len() {
                let prompt = (r.cached + take).min(r.job.prompt_ids.len()) - r.cached;
                stats
                    .prompt_tokens
                    .fetch_add(prompt as u64, Ordering::Relaxed);
            }
            r.cached += take;
            if take == 0 || r.cached < r.tokens.len() {
                continue;
            }
            let Some(row) = logits.next() else { continue };
            let emitted = r.decoding.next(&row, &self.decoder.tokenizer);
            match r.first_token {
                None => {
                    r.first_token = Some(now);
                    stats.ttft.observe(now.duration_since(r.job.received));
                }
                Some(_) => {
                    if let Some(last) = r.last_token {
                        stats.inter_token.observe(now.duration_since(last));
                    }
                }
            }
            r.last_token = Some(now);
            if let Some(id) = emitted.token {
                r.tokens.push(id);
                stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let _ = r.job.events.send(GenEvent::Token {
                    id,
                    logprob: emitted.logprob,
                    text: if emitted.finish.is_some() {
                        String::new()
                    } else {
                        emitted.text.clone()
                    },
                });
            }
            if let Some(finish) = emitted.finish {
                let _ = r.job.events.send(GenEvent::Done {
                    finish,
                    text: emitted.text,
                    prompt_tokens: r.job.prompt_ids.len(),
                    completion_tokens: r.decoding.tokens().len(),
                });
                finished.push(index);
            }
        }
        for index in finished.into_iter().rev() {
            let r = self.running.swap_remove(index);
            self.pool.release(r.blocks);
            self.shared.jobs.fetch_add(1, Ordering::Relaxed);
            self.ended();
        }
        true
    }

    fn publish(&self) {
        let stats = &self.shared.generation;
        let total = self.pool.total_blocks() as u64;
        stats.kv_blocks_total.store(total, Ordering::Relaxed);
        stats
            .kv_blocks_used
            .store(total - self.pool.free_blocks() as u64, Ordering::Relaxed);
        stats
            .running
            .store(self.running.len() as u64, Ordering::Relaxed);
        self.shared
            .queued
            .store(self.lanes.len() as u64, Ordering::Relaxed);
        self.shared
            .in_flight
            .store(self.running.len() as u64, Ordering::Relaxed);
        *self
            .shared
            .lane_depths
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = self.lanes.depths();
    }

    /// The loop: runs until the actor drops its sender and nothing is left.
    fn run(&mut self, work: &mpsc::Receiver<Work>, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::Acquire) {
                self.fail_all("the node is stopping: retry on another node");
                return;
            }
            let idle = self.running.is_empty() && self.lanes.is_empty();
            let next = if idle {
                match work.recv() {
                    Ok(next) => Some(next),
                    Err(_) => return,
                }
            } else {
                None
            };
            for Work::Job(job) in next.into_iter().chain(work.try_iter()) {
                self.accept(job);
            }
            let now = Instant::now();
            self.drop_gone(now);
            self.admit();
            self.grow();
            // Before the step too: the step sends tokens, and a client that has its first
            // token must find the blocks behind it in the gauges (a test scrapes them then).
            self.publish();
            self.step();
            self.publish();
            if self.running.is_empty() && !self.lanes.is_empty() {
                // Everything waiting needs more blocks than the cache has free, and nothing
                // runs to free them: only a deadline or a cancellation changes that.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Fails every request it holds (the loop is going away).
    fn fail_all(&mut self, reason: &str) {
        let error = self.unavailable(reason);
        for waiting in self.lanes.take_batch(usize::MAX) {
            let _ = waiting.job.events.send(GenEvent::Failed(error.clone()));
            self.ended();
        }
        for running in std::mem::take(&mut self.running) {
            self.pool.release(running.blocks);
            let _ = running.job.events.send(GenEvent::Failed(error.clone()));
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
            self.ended();
        }
        self.publish();
    }
}

pub struct SchedulerState {
    args: BatcherArgs,
    decoder: Arc<Decoder>,
    work: Option<mpsc::Sender<Work>>,
    /// The loop's end of `work`. It outlives a loop that panics: requests sent while the
    /// loop is being restarted wait in the channel for the next one instead of being lost.
    inbox: Arc<std::sync::Mutex<mpsc::Receiver<Work>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Tells the loop to fail what it holds and end (the scheduler is stopping).
    stop: Arc<AtomicBool>,
    /// Requests handed to the loop and not yet ended.
    outstanding: usize,
    drain_waiters: Vec<ractor::RpcReplyPort<()>>,
    broken: Option<String>,
}

pub struct Scheduler;

impl Scheduler {
    /// Starts a scheduler linked to `supervisor`, returning the handle the node uses.
    pub async fn start(
        args: BatcherArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<BatcherHandle, ractor::SpawnErr> {
        crate::batcher::start_as(Scheduler, args, supervisor).await
    }
}

impl SchedulerState {
    fn spawn_loop(&mut self, myself: &ActorRef<BatcherMsg>) -> Result<(), ActorProcessingErr> {
        let inbox = self.inbox.clone();
        let blocks = kv_blocks(&self.decoder, self.args.config.kv_cache_mb);
        let mut step_loop = StepLoop {
            pool: self.decoder.model.new_pool(BLOCK_TOKENS, blocks),
            decoder: self.decoder.clone(),
            lanes: Lanes::new(self.args.config.lanes, self.args.config.queue_capacity),
            running: Vec::new(),
            next_admission: 0,
            prefill_chunk: self.args.config.prefill_chunk,
            shared: self.args.shared.clone(),
            actor: myself.clone(),
            stats: self.args.stats.clone(),
            key: self.args.key.clone(),
        };
        step_loop.publish();
        let stats = self.args.stats.clone();
        let nice = self.args.config.compute_nice;
        let actor = myself.clone();
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("decode-{}", self.args.key))
            .spawn(move || {
                if let Err(error) = troupe_models::priority::lower_current_thread_priority(nice) {
                    tracing::warn!(%error, "cannot lower the step loop's priority");
                }
                // Held for the loop's life; a panic is caught inside, so the lock is never
                // poisoned and the next loop takes the same channel.
                let receiver = inbox.lock().unwrap_or_else(|p| p.into_inner());
                let result = catch_unwind(AssertUnwindSafe(|| step_loop.run(&receiver, &stop)));
                drop(receiver);
                if let Err(panic) = result {
                    let reason = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "a panic".into());
                    step_loop.fail_all(&format!(
                        "its step loop failed ({reason}); it is being restarted, retry"
                    ));
                    let _ = send(&actor, &stats, BatcherMsg::EngineFailed { reason });
                }
            })
            .map_err(|e| format!("cannot start the step loop: {e}"))?;
        self.thread = Some(thread);
        Ok(())
    }

    fn answer_drain_waiters(&mut self) {
        if self.outstanding == 0 {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for Scheduler {
    type Msg = BatcherMsg;
    type State = SchedulerState;
    type Arguments = BatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: BatcherArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let LoadedModel::Decoder(decoder) = args.model.clone() else {
            return Err("a scheduler serves decoders".into());
        };
        let blocks = kv_blocks(&decoder, args.config.kv_cache_mb);
        if blocks == 0 {
            return Err(format!(
                "serving.kv_cache_mb = {} holds no KV block of {BLOCK_TOKENS} tokens for {}: raise it",
                args.config.kv_cache_mb, args.key
            )
            .into());
        }
        let (work, inbox) = mpsc::channel();
        let mut state = SchedulerState {
            args,
            decoder,
            work: Some(work),
            inbox: Arc::new(std::sync::Mutex::new(inbox)),
            thread: None,
            stop: Arc::new(AtomicBool::new(false)),
            outstanding: 0,
            drain_waiters: Vec::new(),
            broken: None,
        };
        state.spawn_loop(&myself)?;
        let shared = state.args.shared.clone();
        state.args.directory.set_detail(
            &state.args.path,
            Arc::new(move || {
                let g = &shared.generation;
                format!(
                    "running {}, queued {}, KV blocks {}/{}, tokens {}",
                    g.running.load(Ordering::Relaxed),
                    shared.counters().queued,
                    g.kv_blocks_used.load(Ordering::Relaxed),
                    g.kv_blocks_total.load(Ordering::Relaxed),
                    g.generated_tokens.load(Ordering::Relaxed),
                )
            }),
        );
        tracing::info!(model = %state.args.key, kv_blocks = blocks, "scheduler started");
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
            BatcherMsg::Generate(job) => {
                if let Some(reason) = &state.broken {
                    let _ = job.events.send(GenEvent::Failed(ServeError::Unavailable {
                        model: state.args.key.name.clone(),
                        version: state.args.key.version.clone(),
                        reason: reason.clone(),
                    }));
                } else if !state.drain_waiters.is_empty() {
                    let _ = job.events.send(GenEvent::Failed(ServeError::ShuttingDown));
                } else if let Some(work) = &state.work {
                    match work.send(Work::Job(job)) {
                        Ok(()) => state.outstanding += 1,
                        Err(mpsc::SendError(Work::Job(job))) => {
                            let _ = job.events.send(GenEvent::Failed(ServeError::Unavailable {
                                model: state.args.key.name.clone(),
                                version: state.args.key.version.clone(),
                                reason: "its step loop is restarting: retry".into(),
                            }));
                        }
                    }
                }
            }
            BatcherMsg::Submit(job) => {
                let _ = job.reply.send(Err(ServeError::WrongKind {
                    model: state.args.key.name.clone(),
                    version: state.args.key.version.clone(),
                    serves: "generate",
                    asked: "embed",
                }));
            }
            BatcherMsg::GenerationEnded => {
                state.outstanding = state.outstanding.saturating_sub(1);
            }
            BatcherMsg::EngineFailed { reason } => {
                let path = state.args.path.clone();
                tracing::warn!(model = %state.args.key, %reason, "the step loop failed");
                // The failed loop answered what it held (each counted as ended); what waits
                // in the channel goes to the next loop.
                if let Some(thread) = state.thread.take() {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
                match state.args.budget.try_restart(&path, Instant::now()) {
                    Ok(()) => {
                        state.spawn_loop(&myself)?;
                        state
                            .args
                            .shared
                            .worker_restarts
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(model = %state.args.key, "step loop restarted");
                    }
                    Err(escalation) => {
                        tracing::error!(model = %state.args.key, %escalation, "not restarting the step loop");
                        let error = ServeError::Unavailable {
                            model: state.args.key.name.clone(),
                            version: state.args.key.version.clone(),
                            reason: escalation.clone(),
                        };
                        let waiting: Vec<Work> = state
                            .inbox
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .try_iter()
                            .collect();
                        for Work::Job(job) in waiting {
                            let _ = job.events.send(GenEvent::Failed(error.clone()));
                            state.outstanding = state.outstanding.saturating_sub(1);
                        }
                        state.broken = Some(escalation);
                    }
                }
            }
            BatcherMsg::Drain(reply) => state.drain_waiters.push(reply),
            BatcherMsg::Flush | BatcherMsg::WorkerIdle { .. } | BatcherMsg::WorkerDied { .. } => {}
        }
        state.answer_drain_waiters();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The supervisor drained us first; whatever still runs is failed, and the loop ends.
        state.work = None;
        state.stop.store(true, Ordering::Release);
        if let Some(thread) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!(model = %state.args.key, "scheduler stopped");
        Ok(())
    }
}
