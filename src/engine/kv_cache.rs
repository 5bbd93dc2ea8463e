//! Each sequence's keys and values: what attention reads at every step after the first,
//! and what the prefix cache keeps of finished sequences.

/// Per-sequence key/value cache: for each layer, the keys and the values of every cached
/// position, row by row (`[positions, kv_heads * head_dim]`, f32). Room is reserved ahead
/// (see [`KvCache::reserve`]) so that decode steps append without reallocating.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    reserve: usize,
    /// Values per position per layer (known from the first step on).
    kv_dim: usize,
}

const KV_CHUNK: usize = 128;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { k: vec![Vec::new(); num_layers], v: vec![Vec::new(); num_layers], len: 0, reserve: 0, kv_dim: 0 }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Asks for room for `positions` in all (allocated at the next step). Untouched room
    /// costs address space, not memory.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = self.reserve.max(positions);
    }

    /// Bytes of keys and values held (filled positions, all layers).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim * 4
    }

    /// Before a step that fills up to `need` positions: drops what a failed step may have
    /// left past `len` and makes room.
    pub(crate) fn prepare(&mut self, num_layers: usize, kv_dim: usize, need: usize) {
        self.kv_dim = kv_dim;
        if self.k.len() != num_layers {
            self.k.resize_with(num_layers, Vec::new);
            self.v.resize_with(num_layers, Vec::new);
        }
        let want = need.max(self.reserve).div_ceil(KV_CHUNK) * KV_CHUNK * kv_dim;
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(self.len * kv_dim);
            if l.capacity() < need * kv_dim {
                l.reserve_exact(want - l.len());
            }
        }
    }

    /// Appends one position's key and value for layer `i`.
    pub(crate) fn push(&mut self, i: usize, k: &[f32], v: &[f32]) {
        self.k[i].extend_from_slice(k);
        self.v[i].extend_from_slice(v);
    }

    /// Layer `i`'s keys and values so far (the step's new positions included).
    pub(crate) fn layer(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.k[i], &self.v[i])
    }

    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position from `n` on (the room stays; the next step overwrites it).
    pub fn rewind(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Keeps the first `n` positions and gives back the room past them.
    pub(crate) fn truncate(&mut self, n: usize) {
        let n = n.min(self.len);
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            l.truncate(n * self.kv_dim);
            l.shrink_to_fit();
        }
        self.len = n;
        self.reserve = n;
    }

    /// Makes this (empty) cache hold `other`'s first `n` positions, with room for what was
    /// reserved.
    pub(crate) fn copy_prefix(&mut self, other: &KvCache, n: usize) {
        let n = n.min(other.len);
        if self.k.len() != other.k.len() {
            self.k.resize_with(other.k.len(), Vec::new);
            self.v.resize_with(other.v.len(), Vec::new);
        }
        let per = other.kv_dim;
        for (dst, src) in self.k.iter_mut().zip(&other.k).chain(self.v.iter_mut().zip(&other.v)) {
            dst.clear();
            let want = self.reserve.max(n).div_ceil(KV_CHUNK) * KV_CHUNK * per;
            dst.reserve_exact(want);
            dst.extend_from_slice(&src[..n * per]);
        }
        self.len = n;
        self.kv_dim = per;
    }
}
