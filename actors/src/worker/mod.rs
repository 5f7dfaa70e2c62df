//! InferenceWorker: owns a model and runs forward passes on a dedicated OS thread, never in
//! `handle`. The batcher sends batches straight to the thread (one hop less per request);
//! the thread answers each request and tells the batcher when it is free. The actor is the
//! thread's supervised face: the thread reports its death to it, and it fails. A panic during a batch fails that batch with
//! `UNAVAILABLE`, ends the thread and fails the actor, so the batcher restarts it with a
//! fresh thread; the model's weights are shared, so a restart does not reload them.

pub mod messages;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_models::SentenceEmbedder;

pub use messages::{WorkerCrashed, WorkerMsg};

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
    /// The batcher's mailbox counter, for the `WorkerIdle` this worker sends it.
    pub batcher_stats: Arc<ActorStats>,
    /// This worker's own mailbox counter.
    pub stats: Arc<ActorStats>,
    pub shared: Arc<BatcherShared>,
    /// Batches from the batcher, straight to the thread.
    pub batches: mpsc::Receiver<Batch>,
    /// The thread's scheduling priority (see `troupe_models::priority`).
    pub compute_nice: i32,
}

pub struct WorkerState {
    stats: Arc<ActorStats>,
}

pub struct InferenceWorker;

impl Actor for InferenceWorker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let name = format!("infer-{}-{}", args.key, args.index);
        let stats = args.stats.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || thread_main(args, myself))?;
        Ok(WorkerState { stats })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stats.handled();
        let WorkerMsg::ThreadDied { at, reason } = message;
        Err(Box::new(WorkerCrashed { at, reason }))
    }
}

fn panic_reason(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}

/// Computes batches until the batcher drops its sender (stop or restart) or a batch fails.
fn thread_main(args: WorkerArgs, actor: ActorRef<WorkerMsg>) {
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
        let _ = send(&actor, &args.stats, WorkerMsg::ThreadDied { at, reason });
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

    /// Stands in for the batcher: takes its messages and keeps nothing.
    struct NoBatcher;

    impl Actor for NoBatcher {
        type Msg = BatcherMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<BatcherMsg>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
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
    async fn a_panicking_batch_fails_every_request_in_it_and_then_the_actor() {
        let (batcher, _) = Actor::spawn(None, NoBatcher, ()).await.unwrap();
        let (batches, receiver) = mpsc::channel();
        let shared = Arc::new(BatcherShared::default());
        let stats = Arc::new(ActorStats::default());
        let args = WorkerArgs {
            index: 0,
            node_id: 1,
            key: ModelKey {
                name: "minilm".into(),
                version: "1".into(),
            },
            model: Arc::new(BrokenEngine),
            max_batch_size: 8,
            batcher,
            batcher_stats: Arc::default(),
            stats: stats.clone(),
            shared: shared.clone(),
            batches: receiver,
            compute_nice: 0,
        };
        let (worker, ended) = Actor::spawn(None, InferenceWorker, args).await.unwrap();
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
        // The thread reported its death and the actor failed with it, for its supervisor
        // (the batcher) to restart; the report was counted and handled.
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .expect("the worker actor did not stop")
            .unwrap();
        assert!(matches!(worker.get_status(), ractor::ActorStatus::Stopped));
        assert_eq!(stats.mailbox_depth(), 0);
    }
}
