//! Inference workers: the OS threads a batcher runs forward passes on. Each owns nothing but
//! a share of the model's weights; the batcher sends it batches straight (no mailbox on the
//! way), and it answers each request and tells the batcher when it is free.
//!
//! A panic or an engine error during a batch fails that batch's requests with `UNAVAILABLE`
//! and ends the thread, which reports its death to the batcher (`WorkerDied`). The batcher
//! starts a fresh thread in its place, drawing on the node's restart budget; the weights are
//! shared, so a restart does not reload them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use ractor::ActorRef;
use troupe_models::SentenceEmbedder;

use crate::batcher::{Batch, BatcherMsg, BatcherShared, JobResult};
use crate::error::ServeError;
use crate::stats::{send, ActorStats};
use crate::table::ModelKey;

pub struct WorkerArgs {
    pub index: usize,
    pub node_id: u64,
    pub key: ModelKey,
    pub model: Arc<dyn SentenceEmbedder>,
    pub max_batch_size: usize,
    pub batcher: ActorRef<BatcherMsg>,
    /// The batcher's mailbox counter, for the messages this worker sends it.
    pub batcher_stats: Arc<ActorStats>,
    pub shared: Arc<BatcherShared>,
    /// Batches from the batcher.
    pub batches: mpsc::Receiver<Batch>,
    /// The thread's scheduling priority (see `troupe_models::priority`).
    pub compute_nice: i32,
    /// Set while the thread runs (the actor tree's view shows it).
    pub alive: Arc<AtomicBool>,
}

/// Starts a worker thread. It runs until the batcher drops its sender (stop or restart) or
/// a batch fails.
pub fn start(args: WorkerArgs) -> std::io::Result<std::thread::JoinHandle<()>> {
    args.alive.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name(format!("infer-{}-{}", args.key, args.index))
        .spawn(move || {
            let alive = args.alive.clone();
            thread_main(args);
            alive.store(false, Ordering::Relaxed);
        })
}

fn panic_reason(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}

/// Computes batches until the batcher drops its sender (stop or restart) or a batch fails.
fn thread_main(args: WorkerArgs) {
    if let Err(error) = troupe_models::priority::lower_current_thread_priority(args.compute_nice) {
        tracing::warn!(%error, nice = args.compute_nice, "cannot lower the worker thread's priority");
    }
    while let Ok(batch) = args.batches.recv() {
        let span = tracing::info_span!("batch", node_id = args.node_id, model = %args.key, batch_id = batch.id, worker = args.index, jobs = batch.jobs.len());
        let _entered = span.enter();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let ids: Vec<&str> = batch.jobs.iter().map(|j| j.request_id.as_str()).collect();
            tracing::debug!(request_ids = ?ids, "batch started");
        }
        let (inputs, replies): (Vec<_>, Vec<_>) = batch
            .jobs
            .into_iter()
            .map(|job| {
                (
                    (job.texts, job.deadline, job.request_id, job.received),
                    job.reply,
                )
            })
            .unzip();
        let outcome = catch_unwind(AssertUnwindSafe(|| compute(&args, &inputs)));
        let reason = match outcome {
            Ok(Ok(results)) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
                let idle = BatcherMsg::WorkerIdle { worker: args.index };
                let _ = send(&args.batcher, &args.batcher_stats, idle);
                continue;
            }
            Ok(Err(reason)) => reason,
            Err(panic) => panic_reason(panic),
        };
        let at = Instant::now();
        tracing::error!(%reason, "inference batch failed; the worker restarts");
        // Counted before anyone is answered: a client that sees its failure finds it in the
        // counters.
        args.shared.failed_batch(replies.len() as u64);
        for reply in replies {
            let _ = reply.send(Err(ServeError::WorkerFailed {
                model: args.key.name.clone(),
                version: args.key.version.clone(),
                reason: reason.clone(),
            }));
        }
        args.alive.store(false, Ordering::Relaxed);
        let died = BatcherMsg::WorkerDied {
            worker: args.index,
            at,
            reason,
        };
        let _ = send(&args.batcher, &args.batcher_stats, died);
        return;
    }
}

type Input = (Vec<String>, Option<Instant>, String, Instant);

/// One batch: requests past their deadline are answered without compute; texts are
/// tokenised per request, so one bad text fails only its own request. `Err` means the
/// model itself failed: the batch fails and the worker restarts.
fn compute(args: &WorkerArgs, inputs: &[Input]) -> Result<Vec<JobResult>, String> {
    crate::failpoints::before_batch();
    let now = Instant::now();
    let mut results: Vec<Option<JobResult>> = Vec::with_capacity(inputs.len());
    let mut ids: Vec<Vec<u32>> = Vec::new();
    let mut spans = Vec::with_capacity(inputs.len());
    for (texts, deadline, request_id, received) in inputs {
        if deadline.is_some_and(|d| d <= now) {
            args.shared.expired_at_worker();
            tracing::debug!(%request_id, "deadline passed before compute");
            results.push(Some(Err(ServeError::DeadlineExceeded {
                waited_ms: now.duration_since(*received).as_millis() as u64,
            })));
            spans.push(None);
            continue;
        }
        match args.model.tokenize(texts) {
            Ok(tokens) => {
                spans.push(Some(tokens.len()));
                ids.extend(tokens);
                results.push(None);
            }
            Err(error) => {
                let (index, reason) = match error {
                    troupe_models::ModelError::Tokenize { index, reason } => (index, reason),
                    other => (0, other.to_string()),
                };
                results.push(Some(Err(ServeError::InvalidText { index, reason })));
                spans.push(None);
            }
        }
    }
    if !ids.is_empty() {
        crate::failpoints::during_batch();
        let embeddings = args
            .model
            .embed_token_ids(&ids, args.max_batch_size.max(1))
            .map_err(|e| e.to_string())?;
        let computed = spans.iter().flatten().count() as u64;
        args.shared.computed(computed, ids.len() as u64);
        // Each request's sequences follow the previous one's in `ids`: it takes its vectors
        // off the front, moved, not copied.
        let mut rows = embeddings.into_iter();
        for (slot, span) in results.iter_mut().zip(&spans) {
            if let Some(len) = span {
                *slot = Some(Ok(rows.by_ref().take(*len).collect()));
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(Err(ServeError::ShuttingDown)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr};
    use std::time::Duration;
    use troupe_models::ModelError;

    /// Tokenises anything; its forward pass panics, as a broken engine would.
    struct BrokenEngine;

    impl SentenceEmbedder for BrokenEngine {
        fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, ModelError> {
            Ok(texts.iter().map(|_| vec![101, 102]).collect())
        }

        fn embed_token_ids(
            &self,
            _ids: &[Vec<u32>],
            _batch_size: usize,
        ) -> Result<Vec<Vec<f32>>, ModelError> {
            panic!("the engine broke");
        }

        fn dimension(&self) -> usize {
            4
        }
    }

    /// Stands in for the batcher: passes its messages on to the test.
    struct Relay;

    impl Actor for Relay {
        type Msg = BatcherMsg;
        type State = tokio::sync::mpsc::UnboundedSender<BatcherMsg>;
        type Arguments = tokio::sync::mpsc::UnboundedSender<BatcherMsg>;

        async fn pre_start(
            &self,
            _myself: ActorRef<BatcherMsg>,
            to_test: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(to_test)
        }

        async fn handle(
            &self,
            _myself: ActorRef<BatcherMsg>,
            message: BatcherMsg,
            to_test: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = to_test.send(message);
            Ok(())
        }
    }

    fn job(
        text: &str,
    ) -> (
        crate::batcher::EmbedJob,
        tokio::sync::oneshot::Receiver<JobResult>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = crate::batcher::EmbedJob {
            texts: vec![text.to_owned()],
            request_id: format!("req-{text}"),
            task: String::new(),
            lane: 0,
            deadline: None,
            received: Instant::now(),
            reply,
        };
        (job, answer)
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_every_request_in_it_and_the_thread_reports_its_death() {
        let (to_test, mut from_batcher) = tokio::sync::mpsc::unbounded_channel();
        let (batcher, _) = Actor::spawn(None, Relay, to_test).await.unwrap();
        let (batches, receiver) = mpsc::channel();
        let shared = Arc::new(BatcherShared::default());
        let batcher_stats = Arc::new(ActorStats::default());
        let alive = Arc::new(AtomicBool::new(false));
        let thread = start(WorkerArgs {
            index: 3,
            node_id: 1,
            key: ModelKey {
                name: "minilm".into(),
                version: "1".into(),
            },
            model: Arc::new(BrokenEngine),
            max_batch_size: 8,
            batcher: batcher.clone(),
            batcher_stats: batcher_stats.clone(),
            shared: shared.clone(),
            batches: receiver,
            compute_nice: 0,
            alive: alive.clone(),
        })
        .unwrap();
        let (first, first_answer) = job("a");
        let (second, second_answer) = job("b");
        batches
            .send(Batch {
                id: 1,
                jobs: vec![first, second],
            })
            .unwrap();
        for answer in [first_answer, second_answer] {
            match tokio::time::timeout(Duration::from_secs(10), answer).await {
                Ok(Ok(Err(ServeError::WorkerFailed { reason, .. }))) => {
                    assert!(reason.contains("the engine broke"), "{reason}");
                }
                other => panic!("expected WorkerFailed, got {other:?}"),
            }
        }
        assert_eq!(shared.counters().failed, 2);
        // The thread told the batcher it died, naming itself and why, and ended.
        let message = tokio::time::timeout(Duration::from_secs(10), from_batcher.recv())
            .await
            .expect("no message from the worker");
        match message {
            Some(BatcherMsg::WorkerDied { worker, reason, .. }) => {
                assert_eq!(worker, 3);
                assert!(reason.contains("the engine broke"), "{reason}");
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .expect("the thread ended by a caught panic, not an uncaught one");
        assert!(!alive.load(Ordering::Relaxed));
        // The report was counted in the batcher's mailbox.
        assert_eq!(batcher_stats.mailbox_depth(), 1);
        batcher.stop(None);
    }
}
