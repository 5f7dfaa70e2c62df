//! `troupe bench`: the benchmarks, each run side by side with its peer where it has one.
//!
//! - [`engine`]: the inference engine alone (sentences/s, ms/batch, the backend's GEMM).
//! - [`raft`]: the metadata store against etcd (with the etcd client, `bench/raft/etcd`).
//! - [`serve`]: a serving node under closed-loop Embed load, beside the raw engine.
//! - [`generate`]: the decoder in llama.cpp's workloads.

mod engine;
mod generate;
mod raft;
pub(crate) mod serve;

use clap::Subcommand;

use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the inference engine end to end (tokenise, forward, pool, normalise).
    Engine(engine::EngineArgs),
    /// Put throughput and latency, contended CAS and leader failover of the metadata store,
    /// with the same workload against etcd in the same run (`--etcd`).
    Raft(Box<raft::RaftArgs>),
    /// Closed-loop Embed load against a node at several concurrencies, with the raw engine
    /// in the same run: throughput, latency, batch size, serving efficiency, batching gain.
    Serve(serve::ServeArgs),
    /// Decoder speed in llama.cpp's workloads: the engine alone (prefill, decode, streams
    /// stepped together), or streams against a node or an OpenAI-compatible server.
    Generate(generate::GenerateBenchArgs),
}

pub fn run(command: BenchCommand) -> Result<(), CliError> {
    match command {
        BenchCommand::Engine(args) => engine::run(args),
        BenchCommand::Raft(args) => raft::run(*args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Generate(args) => generate::run(args),
    }
}
