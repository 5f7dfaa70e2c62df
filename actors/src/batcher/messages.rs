//! What a batcher is sent. Commands are one-way; queries carry an `RpcReplyPort`.

use std::time::Instant;

use ractor::RpcReplyPort;
use tokio::sync::{mpsc, oneshot};
use troupe_models::generate::{FinishReason, SamplingParams};

use crate::error::ServeError;

/// Embeddings for one request, in its text order.
pub type JobResult = Result<Vec<Vec<f32>>, ServeError>;

/// One Embed request waiting for a batch.
#[derive(Debug)]
pub struct EmbedJob {
    pub texts: Vec<String>,
    pub request_id: String,
    pub task: String,
    pub lane: usize,
    pub deadline: Option<Instant>,
    pub received: Instant,
    pub reply: oneshot::Sender<JobResult>,
}

/// One Generate request waiting for, or holding, a place in a decoder's steps.
#[derive(Debug)]
pub struct GenJob {
    /// The prompt's token ids (already through the chat template, if any).
    pub prompt_ids: Vec<u32>,
    pub params: SamplingParams,
    pub request_id: String,
    pub lane: usize,
    pub deadline: Option<Instant>,
    pub received: Instant,
    /// Where the stream goes. Dropping the receiver cancels the request: its KV blocks are
    /// freed at the next step.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

/// What a generation stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A token: its id, its log-probability under the model, and the text it releases
    /// (empty while a character or a possible stop string is incomplete).
    Token { id: u32, logprob: f32, text: String },
    /// The end: why, the text still held back, and the usage.
    Done {
        finish: FinishReason,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed (before or during generation).
    Failed(ServeError),
}

/// A batch on its way to a worker.
#[derive(Debug)]
pub struct Batch {
    pub id: u64,
    pub jobs: Vec<EmbedJob>,
}

/// A batcher's counters, read without messaging it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatcherCounters {
    pub batches: u64,
    /// Texts computed.
    pub rows: u64,
    /// Requests computed.
    pub jobs: u64,
    /// Requests refused because their lane was full.
    pub rejected_full: u64,
    /// Requests dropped because their deadline passed before compute.
    pub expired: u64,
    /// Requests dropped before compute because their caller had gone (cancelled or timed out
    /// on its side).
    pub cancelled: u64,
    /// Requests answered UNAVAILABLE because their worker failed.
    pub failed: u64,
    /// Requests waiting now.
    pub queued: u64,
    /// Batches being computed now.
    pub in_flight: u64,
    pub worker_restarts: u64,
}

#[derive(Debug)]
pub enum BatcherMsg {
    Submit(EmbedJob),
    /// A generation request (decoders only).
    Generate(GenJob),
    /// A decoder's step loop finished a request (any way): one fewer outstanding.
    GenerationEnded,
    /// A decoder's step loop panicked: restart it.
    EngineFailed {
        reason: String,
    },
    /// A flush timer fired: dispatch what has waited `max_queue_delay`.
    Flush,
    /// Worker `worker` finished a batch and can take another.
    WorkerIdle {
        worker: usize,
    },
    /// Worker `worker`'s thread failed a batch at `at` and ended: start another in its place.
    WorkerDied {
        worker: usize,
        at: Instant,
        reason: String,
    },
    /// Answer once every queued and in-flight request is answered; refuse new ones.
    Drain(RpcReplyPort<()>),
}

impl crate::lanes::Weighted for EmbedJob {
    fn weight(&self) -> usize {
        self.texts.len()
    }
}
