//! `troupe bench engine`: sentences/s and ms/batch of the engine, plus the backend's GEMM
//! speed, in the peers' workload (see shared/peers and scripts/bench-engine.sh).

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use troupe_models::bench::{bench_engine, bench_gemm, EngineResult, GemmResult};
use troupe_models::{Embedder, EncoderBackend, Precision};

use crate::error::CliError;
use crate::{init_threads, with_backend, DeviceKind, ModelSource};

#[derive(Debug, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Token counts per sentence ([CLS]/[SEP] included).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 128])]
    pub tokens: Vec<usize>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    pub batches: Vec<usize>,
    /// Seconds to run each point (at least).
    #[arg(long, default_value_t = 2.0)]
    pub min_time: f64,
    /// Upper bound on repetitions per point.
    #[arg(long, default_value_t = 200)]
    pub max_reps: usize,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Linear layers in fp32, or int8 (weights per channel, activations per token, integer
    /// GEMM with VNNI/AVX2 kernels): fp32 or int8.
    #[arg(long, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    device: String,
    precision: Precision,
    threads: usize,
    engine: Vec<EngineResult>,
    gemm: GemmResult,
    gflop_per_128_token_sentence: f64,
}

pub fn run(args: EngineArgs) -> Result<(), CliError> {
    if !(args.min_time.is_finite() && args.min_time > 0.0) {
        return Err(CliError::Usage(format!(
            "--min-time {} must be a positive number of seconds",
            args.min_time
        )));
    }
    init_threads(args.threads)?;
    args.device.check_available()?;
    let dir = args.source.resolve()?;
    with_backend!(args.device, |Backend, device| engine_on::<Backend>(
        &args, &dir, &device
    ))
}

fn engine_on<B: EncoderBackend>(
    args: &EngineArgs,
    dir: &std::path::Path,
    device: &B::Device,
) -> Result<(), CliError> {
    let embedder = Embedder::<B>::load_with_precision(dir, device, args.precision)?;
    let min_time = Duration::from_secs_f64(args.min_time);
    let threads = rayon::current_num_threads();
    if !args.json {
        let kernel = match args.precision {
            Precision::Fp32 => String::new(),
            Precision::Int8 => format!(
                " int8-kernel={}",
                troupe_models::kernels::int8_tiles::Int8Kernel::best().name()
            ),
        };
        println!(
            "device={} (cpu: burn flex with troupe's fused kernels) precision={}{kernel} threads={threads} model={}",
            format!("{:?}", args.device).to_lowercase(),
            args.precision,
            dir.display()
        );
    }
    let mut engine = Vec::new();
    for &tokens in &args.tokens {
        for &batch in &args.batches {
            let result = bench_engine(&embedder, tokens, batch, min_time, args.max_reps)?;
            if !args.json {
                println!(
                    "tokens={:4} batch={:3} reps={:4} ms/batch={:9.2} sentences/sec={:9.1} GFLOP/s={:7.1}",
                    result.tokens, result.batch, result.reps, result.ms_per_batch,
                    result.sentences_per_sec, result.gflops
                );
            }
            engine.push(result);
        }
    }
    let hidden = embedder.config().hidden_size;
    let gemm = bench_gemm::<B>(device, (4096, hidden, 4 * hidden), min_time);
    let report = Report {
        device: format!("{:?}", args.device).to_lowercase(),
        precision: args.precision,
        threads,
        engine,
        gflop_per_128_token_sentence: embedder.config().forward_flops(128) / 1e9,
        gemm,
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        println!("{text}");
    } else {
        println!(
            "gemm {}x{}x{}: {:.1} GFLOP/s; engine cost {:.2} GFLOP per 128-token sentence",
            report.gemm.m,
            report.gemm.k,
            report.gemm.n,
            report.gemm.gflops,
            report.gflop_per_128_token_sentence
        );
    }
    Ok(())
}
