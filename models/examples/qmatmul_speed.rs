use std::time::Instant;
use troupe_models::decoder::QMatrix;
use troupe_models::quant::GgmlType;
fn main() {
    for (ty, bytes) in [(GgmlType::Q4_1, 20usize), (GgmlType::Q8_0, 34)] {
        let (rows, cols) = (1536usize, 576usize);
        let data: Vec<u8> = (0..rows * cols / 32 * bytes)
            .map(|i| if i % bytes < 2 { 0x20 } else { (i * 7) as u8 })
            .collect();
        let m = QMatrix::from_ggml(ty, &data, rows, cols);
        for tokens in [1usize, 4, 16] {
            let x: Vec<f32> = (0..tokens * cols).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut out = vec![0f32; tokens * rows];
            let n = 2000 / tokens;
            let started = Instant::now();
            for _ in 0..n {
                m.matmul(&x, tokens, &mut out);
            }
            let secs = started.elapsed().as_secs_f64();
            let blocks = (rows * cols / 32 * n) as f64;
            println!(
                "{ty:?} tokens {tokens}: {:.2} ns per block, {:.2} ns per block-token, {:.1} GB/s",
                secs * 1e9 / blocks,
                secs * 1e9 / blocks / tokens as f64,
                m.bytes() as f64 * n as f64 / secs / 1e9
            );
        }
    }
}
