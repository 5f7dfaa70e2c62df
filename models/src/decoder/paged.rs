//! The paged KV cache: keys and values of every running sequence in fixed blocks of
//! `block_size` tokens, drawn from one pool sized by a memory budget.
//!
//! A sequence owns a list of blocks (its block table); token `p` lives in block
//! `table[p / block_size]`, slot `p % block_size`. Blocks are handed out and taken back whole,
//! so memory does not fragment, and a finished or cancelled sequence returns its blocks at
//! once.

/// Where the keys and values of all sequences live.
#[derive(Debug)]
pub struct KvPool {
    layers: usize,
    block_size: usize,
    /// Floats per token per layer for keys (and as many for values): kv_heads × head_dim.
    width: usize,
    blocks: usize,
    /// Per layer: `[blocks, block_size, width]`.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    free: Vec<u32>,
}

impl KvPool {
    /// A pool of `blocks` blocks of `block_size` tokens for a model of `layers` layers whose
    /// keys are `width` floats per token.
    pub fn new(layers: usize, width: usize, block_size: usize, blocks: usize) -> Self {
        let size = blocks * block_size * width;
        Self {
            layers,
            block_size: block_size.max(1),
            width,
            blocks,
            keys: (0..layers).map(|_| vec![0f32; size]).collect(),
            values: (0..layers).map(|_| vec![0f32; size]).collect(),
            // Popped from the end: block 0 goes first.
            free: (0..blocks as u32).rev().collect(),
        }
    }

    /// Bytes one block holds across all layers (keys and values).
    pub fn block_bytes(layers: usize, width: usize, block_size: usize) -> usize {
        2 * layers * block_size * width * std::mem::size_of::<f32>()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `tokens` tokens needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes `n` blocks, or none when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at))
    }

    /// Gives blocks back.
    ///
    /// # Panics
    /// In debug builds, if a block is out of range or already free (a scheduler bug).
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for block in blocks {
            debug_assert!((block as usize) < self.blocks, "block {block} out of range");
            debug_assert!(!self.free.contains(&block), "block {block} freed twice");
            self.free.push(block);
        }
    }

    fn offset(&self, table: &[u32], position: usize) -> usize {
        let block = table[position / self.block_size] as usize;
        (block * self.block_size + position % self.block_size) * self.width
    }

    /// Stores token `position`'s key and value for `layer`.
    pub(crate) fn store(
        &mut self,
        layer: usize,
        table: &[u32],
        position: usize,
        key: &[f32],
        value: &[f32],
    ) {
        let at = self.offset(table, position);
        self.keys[layer][at..at + self.width].copy_from_slice(key);
        self.values[layer][at..at + self.width].copy_from_slice(value);
    }

    /// Token `position`'s keys and values in `layer`.
    #[inline]
    pub(crate) fn read(&self, layer: usize, table: &[u32], position: usize) -> (&[f32], &[f32]) {
        let at = self.offset(table, position);
        (
            &self.keys[layer][at..at + self.width],
            &self.values[layer][at..at + self.width],
        )
    }

    pub fn layers(&self) -> usize {
        self.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_lent_whole_and_come_back() {
        let mut pool = KvPool::new(2, 4, 16, 5);
        assert_eq!(pool.blocks_for(17), 2);
        let a = pool.allocate(3).unwrap();
        assert_eq!(pool.free_blocks(), 2);
        assert!(pool.allocate(3).is_none(), "no partial allocation");
        assert_eq!(pool.free_blocks(), 2);
        pool.release(a);
        assert_eq!(pool.free_blocks(), 5);
    }

    #[test]
    fn a_token_reads_back_what_was_stored_in_its_slot() {
        let mut pool = KvPool::new(1, 2, 4, 4);
        let table = pool.allocate(2).unwrap();
        for p in 0..8 {
            let k = [p as f32, 1.0];
            let v = [0.0, p as f32];
            pool.store(0, &table, p, &k, &v);
        }
        for p in 0..8 {
            let (k, v) = pool.read(0, &table, p);
            assert_eq!((k[0], v[1]), (p as f32, p as f32));
        }
    }
}
