//! Weight matrices kept quantised in memory, and the kernels that multiply by them.
//!
//! A [`QMatrix`] holds a GGUF projection (`[rows = out, cols = in]`) as its blocks of 32
//! weights: the quants as bytes, and each block's f16 scale (and Q4_1 minimum) widened to f32
//! once at load. `x · Wᵀ` dequantises 32 weights at a time into registers, exactly as
//! gguf-py does (`d * q + m`), and accumulates in f32 against each token's activations, which
//! stay f32. Decode at batch 1 reads every weight once per token, so the bytes moved, not the
//! arithmetic, set the speed: Q4_1 moves 0.75 bytes per weight against f32's 4.
//!
//! Work is split by output rows over rayon's pool; each task computes all tokens for its
//! rows, so a token's result does not depend on which other tokens share the step.

use rayon::prelude::*;

use crate::kernels::math::dispatch_simd;
use crate::quant::GgmlType;

/// Weights per quantisation block (Q4_0, Q4_1, Q8_0).
pub const BLOCK: usize = 32;

/// Tokens computed together against one dequantised block.
const TILE: usize = 4;

/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 32;

/// How a matrix's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 4-bit quants with a scale and a minimum per block: `w = d * q + m`, `q` in 0..16.
    Q4_1,
    /// 4-bit quants with a scale per block: `w = d * (q - 8)`.
    Q4_0,
    /// 8-bit signed quants with a scale per block: `w = d * q`.
    Q8_0,
    /// Plain f32 (for types with no fused kernel: F32, F16).
    F32,
}

/// A `[rows, cols]` weight matrix, quantised.
#[derive(Debug, Clone)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Q4: 16 bytes per block (low nibbles are weights 0..16, high nibbles 16..32).
    /// Q8_0: 32 signed bytes per block. F32: unused.
    quants: Vec<u8>,
    /// Per block: the scale, then (Q4_1) the minimum. F32: the weights themselves.
    scales: Vec<f32>,
}

impl QMatrix {
    /// From a GGUF tensor's bytes: `rows` rows of `cols` weights of type `ty`.
    ///
    /// # Panics
    /// If `data` is not `rows * cols` weights of `ty` (the GGUF reader checked the tensor's
    /// size against its shape and type).
    pub fn from_ggml(ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Self {
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let blocks = rows * cols / BLOCK;
        let quantised = cols.is_multiple_of(BLOCK);
        match ty {
            GgmlType::Q4_1 if quantised => {
                assert_eq!(data.len(), blocks * 20, "Q4_1 size");
                let mut quants = Vec::with_capacity(blocks * 16);
                let mut scales = Vec::with_capacity(blocks * 2);
                for block in data.chunks_exact(20) {
                    scales.extend([f16(&block[0..2]), f16(&block[2..4])]);
                    quants.extend_from_slice(&block[4..20]);
                }
                Self {
                    kind: QKind::Q4_1,
                    rows,
                    cols,
                    quants,
                    scales,
                }
            }
            GgmlType::Q4_0 if quantised => {
                assert_eq!(data.len(), blocks * 18, "Q4_0 size");
                let mut quants = Vec::with_capacity(blocks * 16);
                let mut scales = Vec::with_capacity(blocks);
                for block in data.chunks_exact(18) {
                    scales.push(f16(&block[0..2]));
                    quants.extend_from_slice(&block[2..18]);
                }
                Self {
                    kind: QKind::Q4_0,
                    rows,
                    cols,
                    quants,
                    scales,
                }
            }
            GgmlType::Q8_0 if quantised => {
                assert_eq!(data.len(), blocks * 34, "Q8_0 size");
                let mut quants = Vec::with_capacity(blocks * 32);
                let mut scales = Vec::with_capacity(blocks);
                for block in data.chunks_exact(34) {
                    scales.push(f16(&block[0..2]));
                    quants.extend_from_slice(&block[2..34]);
                }
                Self {
                    kind: QKind::Q8_0,
                    rows,
                    cols,
                    quants,
                    scales,
                }
            }
            _ => {
                let mut weights = vec![0f32; rows * cols];
                ty.dequantize(data, &mut weights);
                Self::from_f32(weights, rows, cols)
            }
        }
    }

    /// A plain f32 matrix.
    pub fn from_f32(weights: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(weights.len(), rows * cols, "f32 size");
        Self {
            kind: QKind::F32,
            rows,
            cols,
            quants: Vec::new(),
            scales: weights,
        }
    }

    /// Stacks matrices of one kind and width into one (their rows in order), so that one
    /// pass computes Q, K and V, or gate and up.
    pub fn stack(parts: &[QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.kind != first.kind || p.cols != first.cols)
        {
            return None;
        }
        Some(QMatrix {
            kind: first.kind,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        })
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * 4
    }

    /// Row `row`, dequantised into `out` (`cols` values).
    pub fn row(&self, row: usize, out: &mut [f32]) {
        let blocks = self.cols / BLOCK;
        match self.kind {
            QKind::F32 => out.copy_from_slice(&self.scales[row * self.cols..][..self.cols]),
            kind => {
                for b in 0..blocks {
                    let at = row * blocks + b;
                    let w = dequant_block(kind, &self.quants, &self.scales, at);
                    out[b * BLOCK..][..BLOCK].copy_from_slice(&w);
                }
            }
        }
    }

    /// `out[t, r] = Σ_c x[t, c] · W[r, c]` for `tokens` rows of `x` (`[tokens, cols]`);
    /// `out` is `[tokens, rows]`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        assert_eq!(x.len(), tokens * self.cols, "input shape");
        assert_eq!(out.len(), tokens * self.rows, "output shape");
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let tasks = self.rows.div_ceil(ROWS_PER_TASK);
        let run = |task: usize| {
            let first = task * ROWS_PER_TASK;
            let last = (first + ROWS_PER_TASK).min(self.rows);
            let mut local = [0f32; ROWS_PER_TASK * TILE];
            for t0 in (0..tokens).step_by(TILE) {
                let n = TILE.min(tokens - t0);
                let xs = &x[t0 * self.cols..(t0 + n) * self.cols];
                rows_kernel(self, first, last, xs, n, &mut local);
                for t in 0..n {
                    for r in first..last {
                        // SAFETY: each task writes only its own rows' columns of `out`,
                        // whose bounds were asserted above; no two tasks share an element.
                        unsafe {
                            *out_ptr.get().add((t0 + t) * self.rows + r) =
                                local[t * ROWS_PER_TASK + (r - first)];
                        }
                    }
                }
            }
        };
        if tasks == 1 || self.rows * self.cols * tokens < SERIAL_WORK {
            (0..tasks).for_each(run);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
const SERIAL_WORK: usize = 1 << 15;

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointer is only written at disjoint offsets by the tasks of one `matmul`,
// which returns after all of them finish.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

#[inline(always)]
fn dequant_block(kind: QKind, quants: &[u8], scales: &[f32], at: usize) -> [f32; BLOCK] {
    let mut w = [0f32; BLOCK];
    match kind {
        QKind::Q4_1 => {
            let (d, m) = (scales[2 * at], scales[2 * at + 1]);
            let q = &quants[at * 16..][..16];
            for j in 0..16 {
                w[j] = d * (q[j] & 0x0F) as f32 + m;
                w[j + 16] = d * (q[j] >> 4) as f32 + m;
            }
        }
        QKind::Q4_0 => {
            let d = scales[at];
            let q = &quants[at * 16..][..16];
            for j in 0..16 {
                w[j] = d * ((q[j] & 0x0F) as i32 - 8) as f32;
                w[j + 16] = d * ((q[j] >> 4) as i32 - 8) as f32;
            }
        }
        QKind::Q8_0 => {
            let d = scales[at];
            let q = &quants[at * 32..][..32];
            for j in 0..BLOCK {
                w[j] = q[j] as i8 as f32 * d;
            }
        }
        QKind::F32 => unreachable!("f32 matrices have no blocks"),
    }
    w
}

/// Rows `first..last` of `m` against `n` (≤ TILE) tokens `xs`, into
/// `out[t * ROWS_PER_TASK + (r - first)]`. (The matrix comes in parts so that the dispatch
/// macro's signature stays plain slices.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body(
    kind: QKind,
    quants: &[u8],
    scales: &[f32],
    cols: usize,
    (first, last): (usize, usize),
    xs: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let blocks = cols / BLOCK;
    for r in first..last {
        let mut acc = [[0f32; BLOCK]; TILE];
        if kind == QKind::F32 {
            let w = &scales[r * cols..][..cols];
            for (t, acc) in acc.iter_mut().enumerate().take(n) {
                let x = &xs[t * cols..][..cols];
                for (wc, xc) in w.chunks_exact(BLOCK).zip(x.chunks_exact(BLOCK)) {
                    for j in 0..BLOCK {
                        acc[j] += wc[j] * xc[j];
                    }
                }
            }
        } else {
            for b in 0..blocks {
                let w = dequant_block(kind, quants, scales, r * blocks + b);
                for (t, acc) in acc.iter_mut().enumerate().take(n) {
                    let x = &xs[t * cols + b * BLOCK..][..BLOCK];
                    for j in 0..BLOCK {
                        acc[j] += w[j] * x[j];
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate().take(n) {
            out[t * ROWS_PER_TASK + (r - first)] = lane_sum(acc);
        }
    }
}

/// Sums 32 lanes pairwise (a fixed order, so results do not depend on the caller).
#[inline(always)]
fn lane_sum(v: &[f32; BLOCK]) -> f32 {
    let mut half = [0f32; 16];
    for j in 0..16 {
        half[j] = v[j] + v[j + 16];
    }
    let mut quarter = [0f32; 8];
    for j in 0..8 {
        quarter[j] = half[j] + half[j + 8];
    }
    let (a, b, c, d) = (
        quarter[0] + quarter[4],
        quarter[1] + quarter[5],
        quarter[2] + quarter[6],
        quarter[3] + quarter[7],
    );
    (a + c) + (b + d)
}

#[inline(always)]
fn rows_entry(m: &QMatrix, first: usize, last: usize, xs: &[f32], n: usize, out: &mut [f32]) {
    rows_body(
        m.kind,
        &m.quants,
        &m.scales,
        m.cols,
        (first, last),
        xs,
        n,
        out,
    )
}

dispatch_simd!(rows_generic, rows_entry, (m: &QMatrix, first: usize, last: usize, xs: &[f32], n: usize, out: &mut [f32]) -> ());

/// Rows `first..last` of `m` against `n` (≤ TILE) tokens: the AVX2 kernels for the
/// quantised kinds where the CPU has them, else the portable loop.
fn rows_kernel(m: &QMatrix, first: usize, last: usize, xs: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if m.kind != QKind::F32 && avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); `xs` holds `n` rows of `cols`
        // and `out` at least `n * ROWS_PER_TASK` values (the caller's shapes).
        unsafe {
            match n {
                1 => avx2::rows::<1>(m, first, last, xs, out),
                2 => avx2::rows::<2>(m, first, last, xs, out),
                3 => avx2::rows::<3>(m, first, last, xs, out),
                _ => avx2::rows::<4>(m, first, last, xs, out),
            }
        }
        return;
    }
    rows_generic(m, first, last, xs, n, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{QKind, QMatrix, BLOCK, ROWS_PER_TASK};

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    /// One block's 32 weights as four vectors of 8 f32. (No closures here: a closure would
    /// not inherit the target features, and every intrinsic would become a call.)
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(kind: QKind, quants: *const u8, scales: *const f32, at: usize) -> [__m256; 4] {
        if kind == QKind::Q8_0 {
            let base = quants.add(at * 32);
            let d = _mm256_set1_ps(*scales.add(at));
            let v0 = _mm_loadl_epi64(base as *const __m128i);
            let v1 = _mm_loadl_epi64(base.add(8) as *const __m128i);
            let v2 = _mm_loadl_epi64(base.add(16) as *const __m128i);
            let v3 = _mm_loadl_epi64(base.add(24) as *const __m128i);
            return [
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v2)), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v3)), d),
            ];
        }
        let q = _mm_loadu_si128(quants.add(at * 16) as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let (d, m) = if kind == QKind::Q4_1 {
            (*scales.add(2 * at), *scales.add(2 * at + 1))
        } else {
            let d = *scales.add(at);
            (d, -8.0 * d)
        };
        let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
        // d * q + m, rounded twice as gguf-py does (no fused multiply-add).
        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        [
            _mm256_add_ps(_mm256_mul_ps(q0, d), m),
            _mm256_add_ps(_mm256_mul_ps(q1, d), m),
            _mm256_add_ps(_mm256_mul_ps(q2, d), m),
            _mm256_add_ps(_mm256_mul_ps(q3, d), m),
        ]
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(one)
    }

    /// `N` tokens against rows `first..last`, two accumulator chains per token and row
    /// (even and odd vectors of a block), added in the same order whatever `N` is, so a
    /// token's result does not depend on the tokens beside it. With one token, two rows go
    /// together so that four chains hide the FMA latency.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `xs` holds `N` rows of `m.cols()` values; `out` holds at
    /// least `N * ROWS_PER_TASK`; `first..last` are rows of `m`, at most `ROWS_PER_TASK`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows<const N: usize>(
        m: &QMatrix,
        first: usize,
        last: usize,
        xs: &[f32],
        out: &mut [f32],
    ) {
        let cols = m.cols;
        let blocks = cols / BLOCK;
        assert!(xs.len() >= N * cols && out.len() >= N * ROWS_PER_TASK);
        assert!(last <= m.rows && last - first <= ROWS_PER_TASK);
        let (kind, quants, scales, x) = (m.kind, m.quants.as_ptr(), m.scales.as_ptr(), xs.as_ptr());
        let mut r = first;
        if N == 1 {
            while r + 2 <= last {
                let (mut a0, mut a1, mut b0, mut b1) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                for b in 0..blocks {
                    let wa = block(kind, quants, scales, r * blocks + b);
                    let wb = block(kind, quants, scales, (r + 1) * blocks + b);
                    let xb = x.add(b * BLOCK);
                    let x0 = _mm256_loadu_ps(xb);
                    let x1 = _mm256_loadu_ps(xb.add(8));
                    let x2 = _mm256_loadu_ps(xb.add(16));
                    let x3 = _mm256_loadu_ps(xb.add(24));
                    a0 = _mm256_fmadd_ps(wa[0], x0, a0);
                    a1 = _mm256_fmadd_ps(wa[1], x1, a1);
                    b0 = _mm256_fmadd_ps(wb[0], x0, b0);
                    b1 = _mm256_fmadd_ps(wb[1], x1, b1);
                    a0 = _mm256_fmadd_ps(wa[2], x2, a0);
                    a1 = _mm256_fmadd_ps(wa[3], x3, a1);
                    b0 = _mm256_fmadd_ps(wb[2], x2, b0);
                    b1 = _mm256_fmadd_ps(wb[3], x3, b1);
                }
                out[r - first] = hsum(_mm256_add_ps(a0, a1));
                out[r + 1 - first] = hsum(_mm256_add_ps(b0, b1));
                r += 2;
            }
        }
        while r < last {
            let mut even = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            for b in 0..blocks {
                let w = block(kind, quants, scales, r * blocks + b);
                for t in 0..N {
                    let xb = x.add(t * cols + b * BLOCK);
                    even[t] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), even[t]);
                    odd[t] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), odd[t]);
                    even[t] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), even[t]);
                    odd[t] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), odd[t]);
                }
            }
            for t in 0..N {
                out[t * ROWS_PER_TASK + (r - first)] = hsum(_mm256_add_ps(even[t], odd[t]));
            }
            r += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_q4_1(d: f32, m: f32, quants: [u8; 32]) -> Vec<u8> {
        let mut block = half::f16::from_f32(d).to_le_bytes().to_vec();
        block.extend(half::f16::from_f32(m).to_le_bytes());
        block.extend((0..16).map(|j| quants[j] | quants[j + 16] << 4));
        block
    }

    #[test]
    fn the_fused_product_equals_dequantise_then_multiply() {
        let (rows, cols) = (70, 64);
        let mut data = Vec::new();
        for r in 0..rows * cols / BLOCK {
            let quants: [u8; 32] = std::array::from_fn(|j| ((j * 7 + r) % 16) as u8);
            data.extend(block_q4_1(0.01 * (r % 5) as f32 + 0.02, -0.1, quants));
        }
        let m = QMatrix::from_ggml(GgmlType::Q4_1, &data, rows, cols);
        let mut dense = vec![0f32; rows * cols];
        GgmlType::Q4_1.dequantize(&data, &mut dense);
        for tokens in [1, 3, 4, 9] {
            let x: Vec<f32> = (0..tokens * cols)
                .map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8)
                .collect();
            let mut out = vec![0f32; tokens * rows];
            m.matmul(&x, tokens, &mut out);
            for t in 0..tokens {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| f64::from(x[t * cols + c]) * f64::from(dense[r * cols + c]))
                        .sum();
                    let got = out[t * rows + r];
                    assert!(
                        (f64::from(got) - want).abs() < 1e-4,
                        "t {t} r {r}: {got} vs {want}"
                    );
                }
            }
            // A token's result does not depend on the tokens beside it.
            let mut alone = vec![0f32; rows];
            m.matmul(&x[(tokens - 1) * cols..], 1, &mut alone);
            assert_eq!(alone, out[(tokens - 1) * rows..]);
        }
        let mut row = vec![0f32; cols];
        m.row(5, &mut row);
        assert_eq!(row, dense[5 * cols..6 * cols]);
    }

    #[test]
    fn stacked_matrices_compute_their_parts_in_order() {
        let part = |seed: usize| {
            let w: Vec<f32> = (0..4 * 32).map(|i| ((i + seed) % 9) as f32).collect();
            QMatrix::from_f32(w, 4, 32)
        };
        let (a, b) = (part(1), part(2));
        let both = QMatrix::stack(&[a.clone(), b.clone()]).unwrap();
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let (mut oa, mut ob, mut o) = (vec![0f32; 4], vec![0f32; 4], vec![0f32; 8]);
        a.matmul(&x, 1, &mut oa);
        b.matmul(&x, 1, &mut ob);
        both.matmul(&x, 1, &mut o);
        assert_eq!(o, [oa, ob].concat());
    }
}
