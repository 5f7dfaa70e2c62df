//! Decode and prefill speed of the serving decoder on one machine:
//! `cargo run -p troupe-models --example decode_speed -- GGUF [STREAMS]`.
use std::time::Instant;
use troupe_models::decoder::{QuantLlama, SeqStep};
use troupe_models::gguf::GgufFile;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("GGUF path");
    let streams: usize = args.next().map_or(1, |s| s.parse().unwrap());
    let file = GgufFile::open(std::path::Path::new(&path)).unwrap();
    let model = QuantLlama::load(&file).unwrap();
    println!(
        "weights in memory: {:.1} MB",
        model.weight_bytes() as f64 / 1e6
    );
    let mut pool = model.new_pool(16, 512);
    for prompt in [128usize, 512] {
        let ids: Vec<u32> = (0..prompt as u32).map(|i| 100 + i % 1000).collect();
        let blocks = pool.allocate(pool.blocks_for(prompt)).unwrap();
        let started = Instant::now();
        for chunk in (0..prompt).step_by(64) {
            let end = (chunk + 64).min(prompt);
            model.step(
                &mut pool,
                &[SeqStep {
                    tokens: &ids[chunk..end],
                    start: chunk,
                    blocks: &blocks,
                    logits: end == prompt,
                }],
            );
        }
        let secs = started.elapsed().as_secs_f64();
        println!("prefill {prompt}: {:.1} tokens/s", prompt as f64 / secs);
        pool.release(blocks);
    }
    let tokens = 128;
    let tables: Vec<Vec<u32>> = (0..streams)
        .map(|_| pool.allocate(pool.blocks_for(tokens + 1)).unwrap())
        .collect();
    let started = Instant::now();
    for position in 0..tokens {
        let ids = [100 + position as u32];
        let steps: Vec<SeqStep> = tables
            .iter()
            .map(|t| SeqStep {
                tokens: &ids,
                start: position,
                blocks: t,
                logits: true,
            })
            .collect();
        model.step(&mut pool, &steps);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "decode, {streams} streams x {tokens} tokens: {:.1} tokens/s aggregate, {:.2} ms per step",
        (streams * tokens) as f64 / secs,
        secs * 1e3 / tokens as f64
    );
}
