//! ggml's tensor types that troupe reads, and their dequantisation, bit for bit as gguf-py's
//! `gguf.quants.dequantize` computes it (f16 scales widened to f32, then one f32 multiply and,
//! for Q4_1, one f32 add: never fused).
//!
//! | type | block | bytes | value |
//! |---|---|---|---|
//! | F32 | 1 | 4 | itself |
//! | F16 | 1 | 2 | widened |
//! | Q4_0 | 32 | 18 | `d * (q - 8)`, q a nibble |
//! | Q4_1 | 32 | 20 | `d * q + m`, q a nibble |
//! | Q8_0 | 32 | 34 | `d * q`, q an i8 |
//!
//! In a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high
//! nibble.

use half::f16;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl GgmlType {
    /// The types troupe reads, for error messages.
    pub const SUPPORTED: &'static str = "F32, F16, Q4_0, Q4_1 and Q8_0";

    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }

    /// Dequantises whole blocks: `out.len()` elements from `data`, which holds exactly
    /// their blocks.
    ///
    /// # Panics
    /// If the lengths disagree (the caller sizes both from the same tensor entry).
    pub fn dequantize(self, data: &[u8], out: &mut [f32]) {
        let (per, bytes) = (self.block_elements(), self.block_bytes());
        assert_eq!(out.len() % per, 0, "not whole blocks");
        assert_eq!(
            data.len(),
            out.len() / per * bytes,
            "data and output disagree"
        );
        for (block, values) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
            self.dequantize_block(block, values);
        }
    }

    /// One block of `block_bytes()` into `block_elements()` values.
    #[inline]
    pub fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        let scale = |at: usize| f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
        match self {
            Self::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            Self::F16 => out[0] = scale(0),
            Self::Q4_0 => {
                let d = scale(0);
                for (j, &q) in block[2..].iter().enumerate() {
                    out[j] = d * ((q & 0x0F) as i32 - 8) as f32;
                    out[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
            Self::Q4_1 => {
                let (d, m) = (scale(0), scale(2));
                for (j, &q) in block[4..].iter().enumerate() {
                    out[j] = d * (q & 0x0F) as f32 + m;
                    out[j + QK / 2] = d * (q >> 4) as f32 + m;
                }
            }
            Self::Q8_0 => {
                let d = scale(0);
                for (j, &q) in block[2..].iter().enumerate() {
                    out[j] = q as i8 as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_1_puts_low_nibbles_first_and_adds_the_minimum() {
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let mut out = [0f32; 32];
        GgmlType::Q4_1.dequantize(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_are_signed() {
        let mut block = f16_bytes(0.25).to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut out = [0f32; 32];
        GgmlType::Q8_0.dequantize(&block, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[31], 3.75);
        let mut block = f16_bytes(2.0).to_vec();
        block.extend([0x0Fu8; 16]);
        GgmlType::Q4_0.dequantize(&block, &mut out);
        assert_eq!((out[0], out[16]), (14.0, -16.0));
    }
}
