//! The integer inner loops of the int8 GEMM: one tile of up to [`MAX_TILE_ROWS`] rows by
//! [`BLOCK_COLUMNS`] columns, `Σ_k a[r, k] · w[k, c]` with `a` unsigned bytes and `w` signed
//! bytes, accumulated exactly in i32.
//!
//! Three versions compute the same integers: AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds an
//! instruction), AVX2 (bytes widened to i16, then `vpmaddwd`) and portable scalar code. AVX2's
//! `vpmaddubsw` is not used: it adds two u8 × i8 products into a saturating i16, and
//! 2 · 255 · 127 overflows it, so its results would differ from the other two.
//!
//! Weights are packed by [`super::int8`] in blocks of 64 columns; inside a block, for every
//! group of 4 consecutive `k`, 256 bytes: column `c`'s 4 bytes at `4c..4c + 4`. A 64-byte
//! quarter is then exactly one `vpdpbusd` operand for 16 columns.

/// Output columns of a packed weight block (and of a tile).
pub const BLOCK_COLUMNS: usize = 64;

/// Bytes of one `k`-group (4 values of `k`) of a packed block.
pub const GROUP_BYTES: usize = 4 * BLOCK_COLUMNS;

/// Most rows of one tile.
pub const MAX_TILE_ROWS: usize = 6;

/// A tile's raw accumulators: `[row][column]`.
pub type TileSums = [[i32; BLOCK_COLUMNS]; MAX_TILE_ROWS];

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AVX-512 F/BW + VNNI: `vpdpbusd` on 512-bit vectors.
    Avx512Vnni,
    /// AVX2: sign/zero extension to i16 and `vpmaddwd`.
    Avx2,
    /// Plain Rust, any CPU.
    Scalar,
}

impl Int8Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Vnni => "avx512-vnni",
            Self::Avx2 => "avx2",
            Self::Scalar => "scalar",
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512Vnni | Self::Avx2 => false,
            Self::Scalar => true,
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        [Self::Avx512Vnni, Self::Avx2]
            .into_iter()
            .find(|kernel| kernel.is_available())
            .unwrap_or(Self::Scalar)
    }

    /// Every kernel this CPU runs, fastest first.
    pub fn available() -> Vec<Self> {
        [Self::Avx512Vnni, Self::Avx2, Self::Scalar]
            .into_iter()
            .filter(|kernel| kernel.is_available())
            .collect()
    }

    /// Sums of `rows` rows of `a` (row stride `a_stride` bytes, `4 * groups` bytes read per
    /// row) against one packed block of `groups` k-groups, into `out[..rows]`.
    ///
    /// # Panics
    /// If the slices are too short for the shape, or `rows` is 0 or above
    /// [`MAX_TILE_ROWS`]; the caller sizes them from the same packed weight.
    pub fn tile(
        self,
        a: &[u8],
        a_stride: usize,
        rows: usize,
        block: &[i8],
        groups: usize,
        out: &mut TileSums,
    ) {
        assert!(
            (1..=MAX_TILE_ROWS).contains(&rows),
            "tile rows out of range"
        );
        assert!(
            block.len() >= groups * GROUP_BYTES,
            "weight block too short"
        );
        assert!(
            a.len() >= (rows - 1) * a_stride + 4 * groups,
            "activation rows too short"
        );
        assert!(self.is_available(), "int8 kernel not supported by this CPU");
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features are present (checked above) and the asserts bound every
            // read: row r reads a[r * a_stride .. r * a_stride + 4 * groups], the block
            // groups * GROUP_BYTES bytes.
            Self::Avx512Vnni => unsafe {
                x86::tile_avx512_vnni_rows(rows, a, a_stride, block, groups, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Self::Avx2 => unsafe { x86::tile_avx2_rows(rows, a, a_stride, block, groups, out) },
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512Vnni | Self::Avx2 => unreachable!("is_available is false off x86-64"),
            Self::Scalar => tile_scalar(a, a_stride, rows, block, groups, out),
        }
    }
}

fn tile_scalar(
    a: &[u8],
    a_stride: usize,
    rows: usize,
    block: &[i8],
    groups: usize,
    out: &mut TileSums,
) {
    for (row, sums) in out.iter_mut().enumerate().take(rows) {
        sums.fill(0);
        let a_row = &a[row * a_stride..row * a_stride + 4 * groups];
        for (a4, group) in a_row.chunks_exact(4).zip(block.chunks_exact(GROUP_BYTES)) {
            for (sum, w4) in sums.iter_mut().zip(group.chunks_exact(4)) {
                *sum += i32::from(a4[0]) * i32::from(w4[0])
                    + i32::from(a4[1]) * i32::from(w4[1])
                    + i32::from(a4[2]) * i32::from(w4[2])
                    + i32::from(a4[3]) * i32::from(w4[3]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{TileSums, BLOCK_COLUMNS, GROUP_BYTES};

    /// `$name(rows, ..)` calls `$kernel::<R>` for the runtime row count (1..=6), so each row
    /// count gets its own fully unrolled register tile.
    macro_rules! by_rows {
        ($name:ident, $kernel:ident) => {
            /// # Safety
            /// As the kernel it calls.
            pub(super) unsafe fn $name(
                rows: usize,
                a: &[u8],
                a_stride: usize,
                block: &[i8],
                groups: usize,
                out: &mut TileSums,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe {
                    match rows {
                        1 => $kernel::<1>(a, a_stride, block, groups, out),
                        2 => $kernel::<2>(a, a_stride, block, groups, out),
                        3 => $kernel::<3>(a, a_stride, block, groups, out),
                        4 => $kernel::<4>(a, a_stride, block, groups, out),
                        5 => $kernel::<5>(a, a_stride, block, groups, out),
                        _ => $kernel::<6>(a, a_stride, block, groups, out),
                    }
                }
            }
        };
    }
    by_rows!(tile_avx512_vnni_rows, tile_avx512_vnni);
    by_rows!(tile_avx2_rows, tile_avx2);

    /// `R` rows × 64 columns in 4·R zmm accumulators; per k-group, 4 weight loads, R
    /// broadcasts and 4·R `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI present; `a` holds `R` rows of `4 * groups` bytes at stride
    /// `a_stride`, `block` `groups * GROUP_BYTES` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_avx512_vnni<const R: usize>(
        a: &[u8],
        a_stride: usize,
        block: &[i8],
        groups: usize,
        out: &mut TileSums,
    ) {
        let mut acc = [[_mm512_setzero_si512(); 4]; R];
        let a_ptr = a.as_ptr();
        let b_ptr = block.as_ptr();
        for group in 0..groups {
            // SAFETY (all pointer reads): inside the bounds the caller guarantees.
            unsafe {
                let weights = b_ptr.add(group * GROUP_BYTES);
                let w0 = _mm512_loadu_si512(weights.cast());
                let w1 = _mm512_loadu_si512(weights.add(64).cast());
                let w2 = _mm512_loadu_si512(weights.add(128).cast());
                let w3 = _mm512_loadu_si512(weights.add(192).cast());
                for (row, acc_row) in acc.iter_mut().enumerate() {
                    let a4 = a_ptr
                        .add(row * a_stride + 4 * group)
                        .cast::<i32>()
                        .read_unaligned();
                    let a4 = _mm512_set1_epi32(a4);
                    acc_row[0] = _mm512_dpbusd_epi32(acc_row[0], a4, w0);
                    acc_row[1] = _mm512_dpbusd_epi32(acc_row[1], a4, w1);
                    acc_row[2] = _mm512_dpbusd_epi32(acc_row[2], a4, w2);
                    acc_row[3] = _mm512_dpbusd_epi32(acc_row[3], a4, w3);
                }
            }
        }
        for (acc_row, out_row) in acc.iter().zip(out.iter_mut()) {
            for (quarter, value) in acc_row.iter().enumerate() {
                // SAFETY: 16 i32 at 16 * quarter of a 64-element row.
                unsafe {
                    _mm512_storeu_si512(out_row[16 * quarter..].as_mut_ptr().cast(), *value);
                }
            }
        }
    }

    /// `R` rows × 64 columns, 16 columns at a time. Each 16-byte slice of a group (4 columns
    /// × 4 k) is sign-extended to 16 i16 and multiplied by the row's 4 activations
    /// zero-extended to i16 and repeated; `vpmaddwd` leaves, per column, two i32 halves
    /// (k 0-1 and k 2-3) that are added at the end. Exact: no intermediate can overflow.
    ///
    /// # Safety
    /// AVX2 present; bounds as [`tile_avx512_vnni`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2<const R: usize>(
        a: &[u8],
        a_stride: usize,
        block: &[i8],
        groups: usize,
        out: &mut TileSums,
    ) {
        let a_ptr = a.as_ptr();
        let b_ptr = block.as_ptr();
        for sixteen in 0..BLOCK_COLUMNS / 16 {
            let mut acc = [[_mm256_setzero_si256(); 4]; R];
            for group in 0..groups {
                // SAFETY (all pointer reads): inside the bounds the caller guarantees.
                unsafe {
                    let weights = b_ptr.add(group * GROUP_BYTES + 64 * sixteen);
                    let w = [
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(weights.cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(weights.add(16).cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(weights.add(32).cast())),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(weights.add(48).cast())),
                    ];
                    for (row, acc_row) in acc.iter_mut().enumerate() {
                        let a4 = a_ptr
                            .add(row * a_stride + 4 * group)
                            .cast::<i32>()
                            .read_unaligned();
                        let a16 = _mm256_cvtepu8_epi16(_mm_set1_epi32(a4));
                        for (sum, w) in acc_row.iter_mut().zip(w) {
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(a16, w));
                        }
                    }
                }
            }
            for (acc_row, out_row) in acc.iter().zip(out.iter_mut()) {
                let mut halves = [0i32; 32];
                for (index, value) in acc_row.iter().enumerate() {
                    // SAFETY: 8 i32 at 8 * index of a 32-element array.
                    unsafe {
                        _mm256_storeu_si256(halves[8 * index..].as_mut_ptr().cast(), *value);
                    }
                }
                // halves[2c], halves[2c + 1]: column c of these 16 (k 0-1, k 2-3).
                for (column, pair) in halves.chunks_exact(2).enumerate() {
                    out_row[16 * sixteen + column] = pair[0] + pair[1];
                }
            }
        }
    }
}
