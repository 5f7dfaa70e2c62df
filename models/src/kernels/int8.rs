//! int8 linear layers: weights quantised once at load, activations per row at run time,
//! an exact integer GEMM, then the fp32 epilogues of [`super::cpu`].
//!
//! - Weights: symmetric int8 per output column, `w ≈ s_w[c] · q[k, c]` with q in -127..=127,
//!   packed for the tile kernels ([`super::int8_tiles`]) in blocks of 64 columns.
//! - Activations: asymmetric uint8 per row (per token), `x ≈ s_x[r] · (u[r, k] - z[r])` with
//!   u in 0..=255 and the zero point z chosen so that 0.0 is exact. A row's whole range is
//!   used, which matters after GELU, whose outputs are almost all above -0.17.
//! - `Σ_k x·w ≈ s_x[r] · s_w[c] · (Σ_k u·q - z[r] · Σ_k q[k, c])`: the integer sum is exact in
//!   i32 (|Σ u·q| ≤ 255 · 127 · K, far from overflow for any K under 66 000), the column sums
//!   are kept from packing, and every kernel gives the same integers.
//! - Outliers stay fp32. BERT's activations carry a few huge channels (all-MiniLM-L6-v2's
//!   `[CLS]` row holds ~28 in channel 99 where the rest are ~0.05), and a few rows of its FFN
//!   output weights are 20-50 times the others. A per-row or per-column scale set by such a
//!   value leaves everything else a handful of levels. So each row's [`DYNAMIC_OUTLIERS`]
//!   largest activations, and the weight rows (input channels) whose largest value is over
//!   [`STATIC_OUTLIER_RATIO`] times the median row's, are taken out of the integer product
//!   and added back exactly, `x[r, k] · W[k, :]` in fp32. That costs about 2% of the
//!   multiply-adds and moves the worst cosine against fp32 from 0.993 to above 0.999.
//! - Output: dequantised to fp32 tile by tile, outliers added; bias, GELU, residual and layer
//!   norm are the fp32 kernels' own, run on each task's rows while they are in cache.

use rayon::prelude::*;

use super::int8_tiles::{Int8Kernel, TileSums, BLOCK_COLUMNS, GROUP_BYTES, MAX_TILE_ROWS};
use super::math::dispatch_simd;
use super::packed::split_gemm;
use super::{Activation, Epilogue};

/// Most rows one rayon task quantises or multiplies.
const MAX_ROWS_PER_TASK: usize = 48;

/// Largest activations per row kept out of the integer product.
pub const DYNAMIC_OUTLIERS: usize = 8;

/// A weight row (input channel) whose largest magnitude is over this many times the median
/// row's is kept fp32.
pub const STATIC_OUTLIER_RATIO: f32 = 3.0;

/// At most this many input channels of one weight are kept fp32 statically.
const MAX_STATIC_OUTLIERS: usize = 64;

/// Biggest `K` for which the i32 sums cannot overflow: 255 · 127 · K < 2³¹.
const MAX_INNER: usize = (i32::MAX as usize) / (255 * 127);

/// A linear layer's weight `[in, out]`, quantised and packed for the tile kernels.
#[derive(Clone)]
pub struct QuantizedWeight {
    inner: usize,
    outer: usize,
    /// `inner` rounded up to a multiple of 4 (one k-group).
    groups: usize,
    /// `[outer / 64 blocks][groups][256 bytes]`, zero past `inner` and past `outer`.
    packed: Vec<i8>,
    /// Per output column, `outer` of them.
    scales: Vec<f32>,
    /// `Σ_k q[k, c]` per output column.
    column_sums: Vec<i32>,
    /// The fp32 weight, `[inner, outer]`: outlier channels are multiplied with it.
    exact: Vec<f32>,
    /// Input channels always kept out of the integer product (their packed rows are zero).
    static_channels: Vec<usize>,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("in", &self.inner)
            .field("out", &self.outer)
            .finish_non_exhaustive()
    }
}

/// Why a weight cannot be quantised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    #[error("weight holds {len} values, not [{inner}, {outer}]")]
    Shape {
        inner: usize,
        outer: usize,
        len: usize,
    },
    #[error("weight has {inner} input features; int8 sums support at most {max}")]
    TooWide { inner: usize, max: usize },
    #[error("weight value at [{row}, {column}] is not finite")]
    NotFinite { row: usize, column: usize },
}

impl QuantizedWeight {
    /// Quantises a row-major `[inner, outer]` fp32 weight (burn's `Linear` layout).
    pub fn quantize(weight: &[f32], inner: usize, outer: usize) -> Result<Self, QuantizeError> {
        if weight.len() != inner * outer || inner == 0 || outer == 0 {
            return Err(QuantizeError::Shape {
                inner,
                outer,
                len: weight.len(),
            });
        }
        if inner > MAX_INNER {
            return Err(QuantizeError::TooWide {
                inner,
                max: MAX_INNER,
            });
        }
        if let Some(index) = weight.iter().position(|w| !w.is_finite()) {
            return Err(QuantizeError::NotFinite {
                row: index / outer,
                column: index % outer,
            });
        }
        let static_channels = static_outlier_channels(weight, outer);
        let mut is_static = vec![false; inner];
        for &channel in &static_channels {
            is_static[channel] = true;
        }
        let mut scales = vec![0.0f32; outer];
        for (_, row) in weight
            .chunks_exact(outer)
            .enumerate()
            .filter(|(k, _)| !is_static[*k])
        {
            for (scale, w) in scales.iter_mut().zip(row) {
                *scale = scale.max(w.abs());
            }
        }
        for scale in &mut scales {
            *scale /= 127.0;
        }
        let groups = inner.div_ceil(4);
        let blocks = outer.div_ceil(BLOCK_COLUMNS);
        let mut packed = vec![0i8; blocks * groups * GROUP_BYTES];
        let mut column_sums = vec![0i32; outer];
        for (k, row) in weight.chunks_exact(outer).enumerate() {
            if is_static[k] {
                continue;
            }
            for (column, (&w, &scale)) in row.iter().zip(&scales).enumerate() {
                let q = if scale > 0.0 {
                    (w / scale).round_ties_even().clamp(-127.0, 127.0) as i8
                } else {
                    0
                };
                let (block, within) = (column / BLOCK_COLUMNS, column % BLOCK_COLUMNS);
                packed[(block * groups + k / 4) * GROUP_BYTES + 4 * within + k % 4] = q;
                column_sums[column] += i32::from(q);
            }
        }
        Ok(Self {
            inner,
            outer,
            groups,
            packed,
            scales,
            column_sums,
            exact: weight.to_vec(),
            static_channels,
        })
    }

    /// Input channels kept fp32 for every row.
    pub fn static_channels(&self) -> &[usize] {
        &self.static_channels
    }

    /// Input features.
    pub fn inner(&self) -> usize {
        self.inner
    }

    /// Output features.
    pub fn outer(&self) -> usize {
        self.outer
    }

    fn blocks(&self) -> usize {
        self.outer.div_ceil(BLOCK_COLUMNS)
    }

    fn block(&self, index: usize) -> &[i8] {
        let size = self.groups * GROUP_BYTES;
        &self.packed[index * size..(index + 1) * size]
    }
}

/// Rows of `weight` (`[inner, outer]`) whose largest magnitude is over
/// [`STATIC_OUTLIER_RATIO`] times the median row's, the largest [`MAX_STATIC_OUTLIERS`].
fn static_outlier_channels(weight: &[f32], outer: usize) -> Vec<usize> {
    let row_max: Vec<f32> = weight
        .chunks_exact(outer)
        .map(|row| row.iter().fold(0.0f32, |max, w| max.max(w.abs())))
        .collect();
    let mut sorted = row_max.clone();
    sorted.sort_by(f32::total_cmp);
    let limit = STATIC_OUTLIER_RATIO * sorted[sorted.len() / 2];
    let mut channels: Vec<usize> = (0..row_max.len()).filter(|&k| row_max[k] > limit).collect();
    channels.sort_by(|&a, &b| row_max[b].total_cmp(&row_max[a]).then(a.cmp(&b)));
    channels.truncate(MAX_STATIC_OUTLIERS);
    channels.sort_unstable();
    channels
}

/// Activations quantised per row: `x[r, k] ≈ scale[r] · (u[r, k] - zero[r])`.
#[derive(Debug, Clone)]
pub struct QuantizedRows {
    rows: usize,
    /// Bytes per row: the input width rounded up to a whole k-group, zero-padded.
    stride: usize,
    values: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<i32>,
    /// `outliers_per_row` (channel, value) pairs per row, added back in fp32; unused slots
    /// hold a value of 0.
    outliers: Vec<(u32, f32)>,
    outliers_per_row: usize,
}

/// Moves the static channels and the `DYNAMIC_OUTLIERS` largest others of `row` into
/// `outliers` and zeroes them in `row`.
#[inline(always)]
fn take_outliers(row: &mut [f32], static_channels: &[usize], outliers: &mut [(u32, f32)]) {
    let (fixed, dynamic) = outliers.split_at_mut(static_channels.len());
    for (slot, &channel) in fixed.iter_mut().zip(static_channels) {
        *slot = (channel as u32, row[channel]);
        row[channel] = 0.0;
    }
    // The largest magnitudes, kept sorted (largest first) by insertion. A chunk of 16 whose
    // largest magnitude cannot enter is skipped after one vectorised pass; after the first
    // chunks that is nearly all of them.
    dynamic.fill((0, 0.0));
    let mut smallest = 0.0f32;
    for (index, chunk) in row.chunks(16).enumerate() {
        let chunk_max = chunk.iter().fold(0.0f32, |max, x| {
            let magnitude = x.abs();
            if magnitude > max {
                magnitude
            } else {
                max
            }
        });
        if chunk_max <= smallest {
            continue;
        }
        for (offset, &x) in chunk.iter().enumerate() {
            if x.abs() <= smallest {
                continue;
            }
            let mut at = dynamic.len() - 1;
            while at > 0 && dynamic[at - 1].1.abs() < x.abs() {
                dynamic[at] = dynamic[at - 1];
                at -= 1;
            }
            dynamic[at] = ((16 * index + offset) as u32, x);
            smallest = dynamic[dynamic.len() - 1].1.abs();
        }
    }
    for &(channel, value) in dynamic.iter() {
        if value != 0.0 {
            row[channel as usize] = 0.0;
        }
    }
}

/// Adding it to a value in 0..=255 leaves the value rounded to an integer (ties to even) in
/// the low mantissa byte: 1.5 · 2²³, whose unit in the last place is 1.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn quantize_row(row: &[f32], out: &mut [u8]) -> (f32, i32) {
    // Range with 0 included, in 16 lanes so that it vectorises.
    let (mut lows, mut highs) = ([0.0f32; 16], [0.0f32; 16]);
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((low, high), &x) in lows.iter_mut().zip(highs.iter_mut()).zip(chunk) {
            *low = if x < *low { x } else { *low };
            *high = if x > *high { x } else { *high };
        }
    }
    let (mut low, mut high) = (0.0f32, 0.0f32);
    for &x in lows.iter().chain(tail) {
        low = if x < low { x } else { low };
    }
    for &x in highs.iter().chain(tail) {
        high = if x > high { x } else { high };
    }
    let range = high - low;
    if !(range > 0.0 && range.is_finite()) {
        // All zeros (padding rows), or a non-finite row: encode it as zeros.
        out.fill(0);
        return (0.0, 0);
    }
    let scale = range / 255.0;
    let inv_scale = 255.0 / range;
    let zero = (-low * inv_scale).round_ties_even().clamp(0.0, 255.0);
    for (u, &x) in out.iter_mut().zip(row) {
        let level = (x * inv_scale + zero).clamp(0.0, 255.0);
        *u = (level + ROUNDING_MAGIC).to_bits() as u8;
    }
    out[row.len()..].fill(0);
    (scale, zero as i32)
}

/// One row: `scratch` gets the row without its outliers, `outliers` the outliers, `out` the
/// quantised rest; returns the row's scale and zero point.
#[inline(always)]
fn prepare_row(
    row: &[f32],
    scratch: &mut [f32],
    static_channels: &[usize],
    outliers: &mut [(u32, f32)],
    out: &mut [u8],
) -> (f32, i32) {
    scratch.copy_from_slice(row);
    take_outliers(scratch, static_channels, outliers);
    quantize_row(scratch, out)
}
dispatch_simd!(
    prepare_row_simd,
    prepare_row,
    (row: &[f32], scratch: &mut [f32], static_channels: &[usize], outliers: &mut [(u32, f32)], out: &mut [u8]) -> (f32, i32)
);

impl QuantizedRows {
    /// Quantises `x`, row-major `[rows, width]`, one row per token, keeping
    /// `static_channels` and each row's largest values aside in fp32.
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `width` (callers pass tensor dimensions).
    pub fn quantize(x: &[f32], width: usize, static_channels: &[usize]) -> Self {
        assert!(
            width > 0 && x.len().is_multiple_of(width),
            "input is not [rows, width]"
        );
        let rows = x.len() / width;
        let stride = width.next_multiple_of(4);
        let outliers_per_row = static_channels.len() + DYNAMIC_OUTLIERS;
        let mut values = vec![0u8; rows * stride];
        let mut params = vec![(0.0f32, 0i32); rows];
        let mut outliers = vec![(0u32, 0.0f32); rows * outliers_per_row];
        values
            .par_chunks_mut(stride * MAX_ROWS_PER_TASK)
            .zip(x.par_chunks(width * MAX_ROWS_PER_TASK))
            .zip(params.par_chunks_mut(MAX_ROWS_PER_TASK))
            .zip(outliers.par_chunks_mut(outliers_per_row * MAX_ROWS_PER_TASK))
            .for_each(|(((out, x), params), outliers)| {
                let mut scratch = vec![0.0f32; width];
                for (((row, out_row), param), row_outliers) in x
                    .chunks_exact(width)
                    .zip(out.chunks_exact_mut(stride))
                    .zip(params.iter_mut())
                    .zip(outliers.chunks_exact_mut(outliers_per_row))
                {
                    *param =
                        prepare_row_simd(row, &mut scratch, static_channels, row_outliers, out_row);
                }
            });
        let (scales, zeros) = params.into_iter().unzip();
        Self {
            rows,
            stride,
            values,
            scales,
            zeros,
            outliers,
            outliers_per_row,
        }
    }

    fn row_outliers(&self, row: usize) -> &[(u32, f32)] {
        &self.outliers[row * self.outliers_per_row..(row + 1) * self.outliers_per_row]
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// `out[r, c] = s_x[r] · s_w[c] · (sums[r, c] - z[r] · colsum[c]) + Σ_o x[r, k_o] · W[k_o, c]`
/// for one tile row; `exact` is the fp32 weight from this tile's first column, `stride` its
/// row length.
#[inline(always)]
fn dequantize_tile(
    sums: &[i32],
    column_sums: &[i32],
    weight_scales: &[f32],
    (row_scale, row_zero): (f32, i32),
    outliers: &[(u32, f32)],
    (exact, stride): (&[f32], usize),
    out: &mut [f32],
) {
    for (((value, &sum), &column_sum), &weight_scale) in
        out.iter_mut().zip(sums).zip(column_sums).zip(weight_scales)
    {
        *value = (sum - row_zero * column_sum) as f32 * (row_scale * weight_scale);
    }
    for &(channel, x) in outliers {
        if x == 0.0 {
            continue;
        }
        let start = channel as usize * stride;
        let width = out.len();
        for (value, &w) in out.iter_mut().zip(&exact[start..start + width]) {
            *value += x * w;
        }
    }
}

/// The exact integer product `Σ_k (u[r, k] - z[r]) · q[k, c]`, `[rows, outer]`, computed with
/// `kernel`. For tests: every kernel must give the same integers.
pub fn integer_product(kernel: Int8Kernel, x: &QuantizedRows, w: &QuantizedWeight) -> Vec<i32> {
    assert_eq!(
        x.stride,
        w.groups * 4,
        "activation width differs from weight"
    );
    let mut out = vec![0i32; x.rows * w.outer];
    let mut sums: TileSums = [[0; BLOCK_COLUMNS]; MAX_TILE_ROWS];
    for block in 0..w.blocks() {
        let first_column = block * BLOCK_COLUMNS;
        let columns = BLOCK_COLUMNS.min(w.outer - first_column);
        for first_row in (0..x.rows).step_by(MAX_TILE_ROWS) {
            let rows = MAX_TILE_ROWS.min(x.rows - first_row);
            kernel.tile(
                &x.values[first_row * x.stride..],
                x.stride,
                rows,
                w.block(block),
                w.groups,
                &mut sums,
            );
            for (r, tile_row) in sums.iter().enumerate().take(rows) {
                let row = first_row + r;
                for (c, &sum) in tile_row.iter().enumerate().take(columns) {
                    out[row * w.outer + first_column + c] =
                        sum - x.zeros[row] * w.column_sums[first_column + c];
                }
            }
        }
    }
    out
}

/// `x @ w` with `kernel`, dequantised into `[rows, outer]`, then `epilogue` on every row.
fn matmul(
    kernel: Int8Kernel,
    x: &QuantizedRows,
    w: &QuantizedWeight,
    epilogue: &Epilogue<'_>,
) -> Vec<f32> {
    assert_eq!(
        x.stride,
        w.groups * 4,
        "activation width differs from weight"
    );
    let outer = w.outer;
    split_gemm(
        (x.rows, outer),
        w.blocks(),
        (MAX_TILE_ROWS, MAX_ROWS_PER_TASK),
        epilogue,
        |task, shared| {
            let mut sums: TileSums = [[0; BLOCK_COLUMNS]; MAX_TILE_ROWS];
            for block in task.units.clone() {
                let first_column = block * BLOCK_COLUMNS;
                let columns = BLOCK_COLUMNS.min(outer - first_column);
                let column_sums = &w.column_sums[first_column..first_column + columns];
                let weight_scales = &w.scales[first_column..first_column + columns];
                for tile_row in task.rows.clone().step_by(MAX_TILE_ROWS) {
                    let tile_rows = MAX_TILE_ROWS.min(task.rows.end - tile_row);
                    kernel.tile(
                        &x.values[tile_row * x.stride..],
                        x.stride,
                        tile_rows,
                        w.block(block),
                        w.groups,
                        &mut sums,
                    );
                    for (r, tile_sums) in sums.iter().enumerate().take(tile_rows) {
                        let row = tile_row + r;
                        // SAFETY: the row is in this task's rows and the columns in its
                        // blocks, inside `out`; no other task writes them.
                        let start = row * outer + first_column;
                        let out_row = unsafe { shared.range(start..start + columns) };
                        dequantize_tile_simd(
                            &tile_sums[..columns],
                            column_sums,
                            weight_scales,
                            (x.scales[row], x.zeros[row]),
                            x.row_outliers(row),
                            (&w.exact[first_column..], outer),
                            out_row,
                        );
                    }
                }
            }
        },
    )
}
dispatch_simd!(
    dequantize_tile_simd,
    dequantize_tile,
    (sums: &[i32], column_sums: &[i32], weight_scales: &[f32], row: (f32, i32), outliers: &[(u32, f32)], exact: (&[f32], usize), out: &mut [f32]) -> ()
);

/// `x @ w` for row-major fp32 `x` `[rows, w.inner()]` (quantised per row here), then
/// `epilogue`, with the fastest kernel this CPU has.
pub(crate) fn matmul_f32(x: &[f32], w: &QuantizedWeight, epilogue: &Epilogue<'_>) -> Vec<f32> {
    let x = QuantizedRows::quantize(x, w.inner, &w.static_channels);
    matmul(Int8Kernel::best(), &x, w, epilogue)
}

/// `activation(x @ w + bias)` for row-major `x` `[rows, w.inner()]`, with `kernel`.
pub fn linear_with(
    kernel: Int8Kernel,
    x: &[f32],
    w: &QuantizedWeight,
    bias: &[f32],
    activation: Activation,
) -> Vec<f32> {
    assert_eq!(
        bias.len(),
        w.outer,
        "bias length differs from the weight's outputs"
    );
    let x = QuantizedRows::quantize(x, w.inner, &w.static_channels);
    matmul(kernel, &x, w, &Epilogue::Bias(bias, activation))
}

/// `activation(x @ w + bias)` with the fastest kernel this CPU has.
pub fn linear(x: &[f32], w: &QuantizedWeight, bias: &[f32], activation: Activation) -> Vec<f32> {
    linear_with(Int8Kernel::best(), x, w, bias, activation)
}

/// `layer_norm(x @ w + bias + residual)` with the fastest kernel this CPU has.
#[allow(clippy::too_many_arguments)]
pub fn linear_residual_layer_norm(
    x: &[f32],
    w: &QuantizedWeight,
    bias: &[f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(
        bias.len(),
        w.outer,
        "bias length differs from the weight's outputs"
    );
    assert_eq!(
        gamma.len(),
        w.outer,
        "gamma length differs from the weight's outputs"
    );
    assert_eq!(
        beta.len(),
        w.outer,
        "beta length differs from the weight's outputs"
    );
    let x = QuantizedRows::quantize(x, w.inner, &w.static_channels);
    assert_eq!(
        residual.len(),
        x.rows * w.outer,
        "residual shape differs from output"
    );
    matmul(
        Int8Kernel::best(),
        &x,
        w,
        &Epilogue::ResidualNorm {
            bias,
            residual,
            gamma,
            beta,
            epsilon: epsilon as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no rand crate.
    struct Numbers(u64);

    impl Numbers {
        fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }

        fn values(&mut self, len: usize, scale: f32) -> Vec<f32> {
            (0..len).map(|_| self.next_f32() * scale).collect()
        }
    }

    /// The integer product from the quantised values alone, in i64.
    fn reference(x: &QuantizedRows, w: &QuantizedWeight) -> Vec<i32> {
        let mut out = vec![0i32; x.rows * w.outer];
        for row in 0..x.rows {
            for column in 0..w.outer {
                let (block, within) = (column / BLOCK_COLUMNS, column % BLOCK_COLUMNS);
                let mut sum = 0i64;
                for k in 0..w.inner {
                    let q = w.packed[(block * w.groups + k / 4) * GROUP_BYTES + 4 * within + k % 4];
                    let u = x.values[row * x.stride + k];
                    sum += (i64::from(u) - i64::from(x.zeros[row])) * i64::from(q);
                }
                out[row * w.outer + column] = i32::try_from(sum).unwrap();
            }
        }
        out
    }

    #[test]
    fn every_kernel_gives_the_same_integers() {
        let kernels = Int8Kernel::available();
        assert!(kernels.contains(&Int8Kernel::Scalar));
        eprintln!("int8 kernels on this CPU: {kernels:?}");
        let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
        // Odd shapes on purpose: partial tiles, partial blocks, partial k-groups.
        for &(rows, inner, outer) in &[
            (1, 4, 1),
            (5, 7, 63),
            (6, 384, 64),
            (13, 33, 130),
            (37, 384, 1152),
            (128, 1536, 384),
        ] {
            let weight = numbers.values(inner * outer, 0.2);
            let mut x = numbers.values(rows * inner, 3.0);
            // Extreme rows: all zero, all positive, one huge outlier.
            x[..inner].fill(0.0);
            if rows > 2 {
                for value in &mut x[inner..2 * inner] {
                    *value = value.abs();
                }
                x[2 * inner] = 1000.0;
            }
            let w = QuantizedWeight::quantize(&weight, inner, outer).unwrap();
            let q = QuantizedRows::quantize(&x, inner, w.static_channels());
            let expected = reference(&q, &w);
            for &kernel in &kernels {
                assert_eq!(
                    integer_product(kernel, &q, &w),
                    expected,
                    "{} on {rows}x{inner}x{outer}",
                    kernel.name()
                );
            }
            // The threaded, dequantised path agrees with every kernel bit for bit too.
            let bias = numbers.values(outer, 0.1);
            let outputs: Vec<Vec<f32>> = kernels
                .iter()
                .map(|&kernel| linear_with(kernel, &x, &w, &bias, Activation::Gelu))
                .collect();
            for (kernel, output) in kernels.iter().zip(&outputs) {
                assert_eq!(output, &outputs[0], "{} differs", kernel.name());
            }
        }
    }

    #[test]
    fn the_int8_linear_is_close_to_the_fp32_one() {
        let mut numbers = Numbers(7);
        let (rows, inner, outer) = (29, 384, 200);
        let mut weight = numbers.values(inner * outer, 0.1);
        let mut x = numbers.values(rows * inner, 2.0);
        // BERT's kind of outliers: one weight row 20 times the rest, one huge activation.
        for w in &mut weight[3 * outer..4 * outer] {
            *w *= 20.0;
        }
        x[5 * inner + 7] = 40.0;
        let bias = numbers.values(outer, 0.5);
        let w = QuantizedWeight::quantize(&weight, inner, outer).unwrap();
        assert_eq!(w.static_channels(), &[3]);
        let got = linear(&x, &w, &bias, Activation::None);
        let mut worst = 0.0f32;
        for row in 0..rows {
            for column in 0..outer {
                let exact: f32 = (0..inner)
                    .map(|k| x[row * inner + k] * weight[k * outer + column])
                    .sum::<f32>()
                    + bias[column];
                worst = worst.max((got[row * outer + column] - exact).abs());
            }
        }
        // |x| ≤ 2 in 255 steps and |w| ≤ 0.1 in 254: errors of ~0.4% per product, mostly
        // cancelling over 384 terms; the outputs themselves are of order 1.
        assert!(worst < 0.05, "worst absolute error {worst}");
    }

    #[test]
    fn bad_weights_are_errors() {
        assert!(matches!(
            QuantizedWeight::quantize(&[1.0; 5], 2, 3),
            Err(QuantizeError::Shape { .. })
        ));
        assert_eq!(
            QuantizedWeight::quantize(&[1.0, f32::NAN, 0.0, 0.0], 2, 2).unwrap_err(),
            QuantizeError::NotFinite { row: 0, column: 1 }
        );
        let zero = QuantizedWeight::quantize(&[0.0; 6], 2, 3).unwrap();
        assert_eq!(
            linear(&[1.0, 2.0], &zero, &[0.5; 3], Activation::None),
            vec![0.5; 3]
        );
    }
}
