//! The fp32 GEMM of the encoder's linear layers, against weights packed once at load.
//!
//! A weight `[inner, outer]` is stored as panels of [`PANEL`] columns; inside a panel, the
//! 32 values of each `k` are contiguous, so the inner loop reads the weight in one forward
//! stream and never repacks it (a general GEMM repacks its right-hand side on every call,
//! which at batch 1 costs as much as the arithmetic). The activations are read in place:
//! a tile of up to [`MAX_TILE_ROWS`] rows broadcasts one value per row and `k`.
//!
//! Three inner loops compute the same sums in the same order: AVX-512 (2 × 16 lanes per
//! row, 24 accumulators), AVX2 + FMA (one half-panel at a time) and portable scalar code
//! with `mul_add`. The driver ([`matmul`]) splits rows and panels over the encoder pool
//! ([`super::pool`]) and runs the epilogue on whole rows while they are in cache.

use super::pool::{self, SharedSlice};
use super::Epilogue;

/// Output columns of a packed panel (and of a tile).
pub const PANEL: usize = 32;

/// Most rows of one tile.
pub const MAX_TILE_ROWS: usize = 12;

/// Most rows one task multiplies: its activations stay in L2 while it walks the panels.
const MAX_ROWS_PER_TASK: usize = 96;

/// A tile's sums: `[row][column]`.
pub type TileSums = [[f32; PANEL]; MAX_TILE_ROWS];

/// An fp32 weight `[inner, outer]` in panels of [`PANEL`] columns (the last one padded with
/// zeros).
#[derive(Clone)]
pub struct PackedWeight {
    inner: usize,
    outer: usize,
    panels: Vec<f32>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("inner", &self.inner)
            .field("outer", &self.outer)
            .finish_non_exhaustive()
    }
}

impl PackedWeight {
    /// Packs a row-major `[inner, outer]` weight.
    ///
    /// # Panics
    /// If `weight` is not `inner * outer` long; the encoder sizes both from the same tensor.
    pub fn pack(weight: &[f32], inner: usize, outer: usize) -> Self {
        assert_eq!(weight.len(), inner * outer, "weight is not [inner, outer]");
        Self::pack_with(inner, outer, |k, c| weight[k * outer + c])
    }

    /// Packs the `[inner, outer]` matrix whose element `(k, c)` is `value(k, c)`: a strided
    /// or transposed view packs without an intermediate copy.
    pub fn pack_with(inner: usize, outer: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        let panels = outer.div_ceil(PANEL);
        let mut packed = vec![0.0f32; panels * inner * PANEL];
        for (panel, block) in packed.chunks_exact_mut(inner * PANEL).enumerate() {
            let first = panel * PANEL;
            let columns = PANEL.min(outer - first);
            for (k, slot) in block.chunks_exact_mut(PANEL).enumerate() {
                for (c, slot) in slot[..columns].iter_mut().enumerate() {
                    *slot = value(k, first + c);
                }
            }
        }
        Self {
            inner,
            outer,
            panels: packed,
        }
    }

    /// The weight back in row-major `[inner, outer]`.
    pub fn unpack(&self) -> Vec<f32> {
        let mut weight = vec![0.0f32; self.inner * self.outer];
        for panel in 0..self.panel_count() {
            let first = panel * PANEL;
            let columns = PANEL.min(self.outer - first);
            for (k, slot) in self.panel(panel).chunks_exact(PANEL).enumerate() {
                weight[k * self.outer + first..][..columns].copy_from_slice(&slot[..columns]);
            }
        }
        weight
    }

    pub fn inner(&self) -> usize {
        self.inner
    }

    pub fn outer(&self) -> usize {
        self.outer
    }

    pub fn panel_count(&self) -> usize {
        self.outer.div_ceil(PANEL)
    }

    fn panel(&self, index: usize) -> &[f32] {
        &self.panels[index * self.inner * PANEL..(index + 1) * self.inner * PANEL]
    }
}

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// AVX-512 F: 2 zmm per row.
    Avx512,
    /// AVX2 + FMA: 2 ymm per row, one half-panel at a time.
    Avx2,
    /// Plain Rust (`mul_add`), any CPU.
    Scalar,
}

impl F32Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2-fma",
            Self::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512 | Self::Avx2 => false,
            Self::Scalar => true,
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<F32Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Avx512, Self::Avx2]
                .into_iter()
                .find(|kernel| kernel.is_available())
                .unwrap_or(Self::Scalar)
        })
    }

    /// Every kernel this CPU runs, fastest first.
    pub fn available() -> Vec<Self> {
        [Self::Avx512, Self::Avx2, Self::Scalar]
            .into_iter()
            .filter(|kernel| kernel.is_available())
            .collect()
    }

    /// Sums of `rows` rows of `a` (row stride `a_stride`, `inner` values read per row)
    /// against one packed panel, into `out[..rows]`.
    ///
    /// # Panics
    /// If the slices are too short for the shape, or `rows` is 0 or above
    /// [`MAX_TILE_ROWS`]; the driver sizes them from the same packed weight.
    pub fn tile(
        self,
        a: &[f32],
        a_stride: usize,
        rows: usize,
        panel: &[f32],
        inner: usize,
        out: &mut TileSums,
    ) {
        assert!(
            (1..=MAX_TILE_ROWS).contains(&rows),
            "tile rows out of range"
        );
        assert!(panel.len() >= inner * PANEL, "weight panel too short");
        assert!(
            a.len() >= (rows - 1) * a_stride + inner,
            "activation rows too short"
        );
        assert!(self.is_available(), "fp32 kernel not supported by this CPU");
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features are present (checked above) and the asserts bound every
            // read: row r reads a[r * a_stride .. r * a_stride + inner], the panel
            // inner * PANEL values.
            Self::Avx512 => unsafe { x86::tile_avx512_rows(rows, a, a_stride, panel, inner, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Self::Avx2 => unsafe { x86::tile_avx2_rows(rows, a, a_stride, panel, inner, out) },
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512 | Self::Avx2 => unreachable!("is_available is false off x86-64"),
            Self::Scalar => tile_scalar(a, a_stride, rows, panel, inner, out),
        }
    }
}

fn tile_scalar(
    a: &[f32],
    a_stride: usize,
    rows: usize,
    panel: &[f32],
    inner: usize,
    out: &mut TileSums,
) {
    for (row, sums) in out.iter_mut().enumerate().take(rows) {
        sums.fill(0.0);
        let a_row = &a[row * a_stride..row * a_stride + inner];
        for (&value, weights) in a_row.iter().zip(panel.chunks_exact(PANEL)) {
            for (sum, &weight) in sums.iter_mut().zip(weights) {
                *sum = value.mul_add(weight, *sum);
            }
        }
    }
}

/// How `matmul` splits `rows × panels` over `threads`: row blocks of whole tiles, and when
/// there are too few of those to keep every thread busy, column blocks of whole panels too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    pub rows_per_task: usize,
    pub row_tasks: usize,
    pub units_per_task: usize,
    pub column_tasks: usize,
}

impl Split {
    /// `units` column units (panels or blocks), tiles of `tile_rows`, at most `max_rows`
    /// rows per task.
    pub(crate) fn new(
        rows: usize,
        units: usize,
        threads: usize,
        tile_rows: usize,
        max_rows: usize,
    ) -> Self {
        let threads = threads.max(1);
        let rows_per_task = rows
            .div_ceil(4 * threads)
            .next_multiple_of(tile_rows)
            .min(max_rows)
            .max(1);
        let row_tasks = rows.div_ceil(rows_per_task);
        let column_tasks = if row_tasks >= 2 * threads {
            1
        } else {
            (4 * threads).div_ceil(row_tasks).min(units).max(1)
        };
        let units_per_task = units.div_ceil(column_tasks).max(1);
        Self {
            rows_per_task,
            row_tasks,
            units_per_task,
            column_tasks: units.div_ceil(units_per_task),
        }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.row_tasks * self.column_tasks
    }

    /// Whether each task owns whole output rows (so it can run the epilogue itself).
    pub(crate) fn whole_rows(&self) -> bool {
        self.column_tasks == 1
    }
}

/// `a @ w` for `rows` rows of `a` (row stride `a_stride`) and the panels in `panels`, on
/// this thread: `store(row, first_column, sums)` receives each tile row's sums for the
/// columns `first_column..first_column + sums.len()`.
pub fn product(
    kernel: F32Kernel,
    a: &[f32],
    a_stride: usize,
    rows: usize,
    w: &PackedWeight,
    panels: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, &[f32]),
) {
    if rows == 0 {
        return;
    }
    // Tiles as even as possible: 16 rows are 8 + 8, not 12 + 4.
    let tiles = rows.div_ceil(MAX_TILE_ROWS);
    let tile_rows = rows.div_ceil(tiles);
    let mut sums: TileSums = [[0.0; PANEL]; MAX_TILE_ROWS];
    for panel in panels {
        let first_column = panel * PANEL;
        let columns = PANEL.min(w.outer - first_column);
        for tile_row in (0..rows).step_by(tile_rows) {
            let rows_here = tile_rows.min(rows - tile_row);
            kernel.tile(
                &a[tile_row * a_stride..],
                a_stride,
                rows_here,
                w.panel(panel),
                w.inner,
                &mut sums,
            );
            for (r, tile_sums) in sums.iter().enumerate().take(rows_here) {
                store(tile_row + r, first_column, &tile_sums[..columns]);
            }
        }
    }
}

/// One GEMM task's share of the output: its rows and its column units (panels or blocks).
pub(crate) struct TaskBlock {
    pub rows: std::ops::Range<usize>,
    pub units: std::ops::Range<usize>,
}

/// Runs a GEMM with `rows × outer` outputs on the encoder pool, split by [`Split`] over
/// `units` column units: `fill` computes one task's block into the shared output (each task's
/// block is disjoint from every other's), then the epilogue runs on every row, inside the task
/// when it owns whole rows. The fp32 and int8 GEMMs both run this way.
pub(crate) fn split_gemm(
    (rows, outer): (usize, usize),
    units: usize,
    (tile_rows, max_rows): (usize, usize),
    epilogue: &Epilogue<'_>,
    fill: impl Fn(&TaskBlock, &SharedSlice<'_>) + Sync,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * outer];
    if rows == 0 || outer == 0 {
        return out;
    }
    let pool = pool::global();
    let split = Split::new(rows, units, pool.threads(), tile_rows, max_rows);
    let shared = SharedSlice::new(&mut out);
    pool.run(split.tasks(), &|task| {
        let (row_task, column_task) = (task / split.column_tasks, task % split.column_tasks);
        let first_row = row_task * split.rows_per_task;
        let first_unit = column_task * split.units_per_task;
        let block = TaskBlock {
            rows: first_row..(first_row + split.rows_per_task).min(rows),
            units: first_unit..(first_unit + split.units_per_task).min(units),
        };
        fill(&block, &shared);
        if split.whole_rows() {
            // SAFETY: this task owns whole rows `block.rows`.
            let task_out =
                unsafe { shared.range(block.rows.start * outer..block.rows.end * outer) };
            epilogue.apply(task_out, first_row, outer);
        }
    });
    if !split.whole_rows() {
        epilogue.apply_in_parallel(&mut out, outer);
    }
    out
}

/// `x @ w` with `kernel` into `[rows, outer]`, then `epilogue` on every row.
pub fn matmul_with(
    kernel: F32Kernel,
    x: &[f32],
    w: &PackedWeight,
    epilogue: &Epilogue<'_>,
) -> Vec<f32> {
    let (inner, outer) = (w.inner, w.outer);
    assert_eq!(x.len() % inner.max(1), 0, "input is not [rows, inner]");
    let rows = x.len().checked_div(inner).unwrap_or(0);
    split_gemm(
        (rows, outer),
        w.panel_count(),
        (MAX_TILE_ROWS, MAX_ROWS_PER_TASK),
        epilogue,
        |block, shared| {
            let first_row = block.rows.start;
            product(
                kernel,
                &x[first_row * inner..],
                inner,
                block.rows.len(),
                w,
                block.units.clone(),
                |row, first_column, sums| {
                    // SAFETY: the row is in this task's rows and the columns in its panels,
                    // inside `out`; no other task writes them.
                    let start = (first_row + row) * outer + first_column;
                    unsafe { shared.range(start..start + sums.len()) }.copy_from_slice(sums);
                },
            );
        },
    )
}

/// [`matmul_with`] on the fastest kernel.
pub fn matmul(x: &[f32], w: &PackedWeight, epilogue: &Epilogue<'_>) -> Vec<f32> {
    matmul_with(F32Kernel::best(), x, w, epilogue)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{TileSums, PANEL};

    /// `$name(rows, ..)` calls `$kernel::<R>` for the runtime row count (1..=12), so each
    /// row count gets its own fully unrolled register tile.
    macro_rules! by_rows {
        ($name:ident, $kernel:ident, $($rows:literal)+) => {
            /// # Safety
            /// As the kernel it calls.
            pub(super) unsafe fn $name(
                rows: usize,
                a: &[f32],
                a_stride: usize,
                panel: &[f32],
                inner: usize,
                out: &mut TileSums,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe {
                    match rows {
                        $($rows => $kernel::<$rows>(a, a_stride, panel, inner, out),)+
                        _ => unreachable!("tile rows are checked by F32Kernel::tile"),
                    }
                }
            }
        };
    }
    by_rows!(tile_avx512_rows, tile_avx512, 1 2 3 4 5 6 7 8 9 10 11 12);
    by_rows!(tile_avx2_rows, tile_avx2, 1 2 3 4 5 6 7 8 9 10 11 12);

    /// `R` rows × 32 columns in 2·R zmm accumulators; per `k`, 2 weight loads, R broadcasts
    /// and 2·R FMAs.
    ///
    /// # Safety
    /// AVX-512 F present; `a` holds `R` rows of `inner` values at stride `a_stride`, the
    /// panel `inner * PANEL` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512<const R: usize>(
        a: &[f32],
        a_stride: usize,
        panel: &[f32],
        inner: usize,
        out: &mut TileSums,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let a_ptr = a.as_ptr();
        let w_ptr = panel.as_ptr();
        for k in 0..inner {
            // SAFETY (all pointer reads): inside the bounds the caller guarantees.
            unsafe {
                let weights = w_ptr.add(k * PANEL);
                let w0 = _mm512_loadu_ps(weights);
                let w1 = _mm512_loadu_ps(weights.add(16));
                for (row, acc_row) in acc.iter_mut().enumerate() {
                    let value = _mm512_set1_ps(*a_ptr.add(row * a_stride + k));
                    acc_row[0] = _mm512_fmadd_ps(value, w0, acc_row[0]);
                    acc_row[1] = _mm512_fmadd_ps(value, w1, acc_row[1]);
                }
            }
        }
        for (acc_row, out_row) in acc.iter().zip(out.iter_mut()) {
            // SAFETY: 2 × 16 f32 in a 32-element row.
            unsafe {
                _mm512_storeu_ps(out_row.as_mut_ptr(), acc_row[0]);
                _mm512_storeu_ps(out_row[16..].as_mut_ptr(), acc_row[1]);
            }
        }
    }

    /// `R` rows × 32 columns, 16 at a time, in 2·R ymm accumulators; the same sums as the
    /// AVX-512 tile, in the same order.
    ///
    /// # Safety
    /// AVX2 and FMA present; bounds as [`tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2<const R: usize>(
        a: &[f32],
        a_stride: usize,
        panel: &[f32],
        inner: usize,
        out: &mut TileSums,
    ) {
        let a_ptr = a.as_ptr();
        let w_ptr = panel.as_ptr();
        for half in 0..2 {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for k in 0..inner {
                // SAFETY (all pointer reads): inside the bounds the caller guarantees.
                unsafe {
                    let weights = w_ptr.add(k * PANEL + 16 * half);
                    let w0 = _mm256_loadu_ps(weights);
                    let w1 = _mm256_loadu_ps(weights.add(8));
                    for (row, acc_row) in acc.iter_mut().enumerate() {
                        let value = _mm256_set1_ps(*a_ptr.add(row * a_stride + k));
                        acc_row[0] = _mm256_fmadd_ps(value, w0, acc_row[0]);
                        acc_row[1] = _mm256_fmadd_ps(value, w1, acc_row[1]);
                    }
                }
            }
            for (acc_row, out_row) in acc.iter().zip(out.iter_mut()) {
                // SAFETY: 2 × 8 f32 at 16 * half of a 32-element row.
                unsafe {
                    _mm256_storeu_ps(out_row[16 * half..].as_mut_ptr(), acc_row[0]);
                    _mm256_storeu_ps(out_row[16 * half + 8..].as_mut_ptr(), acc_row[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Activation;

    struct Lcg(u64);
    impl Lcg {
        fn values(&mut self, len: usize) -> Vec<f32> {
            (0..len)
                .map(|_| {
                    self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        }
    }

    fn reference(x: &[f32], w: &[f32], inner: usize, outer: usize) -> Vec<f64> {
        let rows = x.len() / inner;
        let mut out = vec![0.0f64; rows * outer];
        for r in 0..rows {
            for k in 0..inner {
                for c in 0..outer {
                    out[r * outer + c] += x[r * inner + k] as f64 * w[k * outer + c] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn packing_round_trips() {
        let mut rng = Lcg(7);
        for (inner, outer) in [(1, 1), (3, 31), (5, 32), (7, 33), (16, 100)] {
            let w = rng.values(inner * outer);
            assert_eq!(PackedWeight::pack(&w, inner, outer).unpack(), w);
        }
    }

    #[test]
    fn every_kernel_matches_the_reference_on_odd_shapes() {
        let mut rng = Lcg(42);
        for (rows, inner, outer) in [
            (1, 1, 1),
            (1, 384, 384),
            (7, 37, 65),
            (13, 64, 96),
            (130, 50, 33),
        ] {
            let x = rng.values(rows * inner);
            let w = rng.values(inner * outer);
            let packed = PackedWeight::pack(&w, inner, outer);
            let want = reference(&x, &w, inner, outer);
            let bias = vec![0.0f32; outer];
            let none = Epilogue::Bias(&bias, Activation::None);
            let mut results = Vec::new();
            for kernel in F32Kernel::available() {
                let got = matmul_with(kernel, &x, &packed, &none);
                for (index, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= 1e-5 * (inner as f64).sqrt(),
                        "{} at {rows}x{inner}x{outer}, element {index}: {g} vs {e}",
                        kernel.name()
                    );
                }
                results.push(got);
            }
            // Every kernel adds the same products in the same order, with fused multiply-adds.
            for result in &results[1..] {
                assert_eq!(
                    result, &results[0],
                    "kernels differ at {rows}x{inner}x{outer}"
                );
            }
        }
    }

    #[test]
    fn splits_cover_every_row_and_panel_once() {
        for rows in [1, 5, 16, 47, 128, 1000, 4096] {
            for units in [1, 3, 12, 48] {
                for threads in [1, 2, 8] {
                    let split = Split::new(rows, units, threads, MAX_TILE_ROWS, MAX_ROWS_PER_TASK);
                    assert!(split.rows_per_task * split.row_tasks >= rows);
                    assert!(split.rows_per_task * (split.row_tasks - 1) < rows);
                    assert!(split.units_per_task * split.column_tasks >= units);
                    assert!(split.units_per_task * (split.column_tasks - 1) < units);
                }
            }
        }
    }
}
