//! Each sequence's keys and values: what attention reads at every step after the first,
//! and what the prefix cache keeps of finished sequences.

use half::f16;

/// How keys and values are stored. f16 (the default for serving, as llama.cpp's) halves the
/// bytes every decode step reads; f32 is exact, the reference the tolerances are stated
/// against (`engine::tests::f16_kv_cache_stays_close_to_f32`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// One layer's keys (or values) of every cached position, row by row.
#[derive(Debug, Clone)]
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Default for Rows {
    fn default() -> Self {
        Rows::F32(Vec::new())
    }
}

impl Rows {
    fn new(t: KvType) -> Self {
        match t {
            KvType::F32 => Rows::F32(Vec::new()),
            KvType::F16 => Rows::F16(Vec::new()),
        }
    }

    fn kind(&self) -> KvType {
        match self {
            Rows::F32(_) => KvType::F32,
            Rows::F16(_) => KvType::F16,
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::F32(r) => r.len(),
            Rows::F16(r) => r.len(),
        }
    }

    fn capacity(&self) -> usize {
        match self {
            Rows::F32(r) => r.capacity(),
            Rows::F16(r) => r.capacity(),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Rows::F32(r) => r.truncate(n),
            Rows::F16(r) => r.truncate(n),
        }
    }

    fn reserve_exact(&mut self, n: usize) {
        match self {
            Rows::F32(r) => r.reserve_exact(n),
            Rows::F16(r) => r.reserve_exact(n),
        }
    }

    fn shrink_to_fit(&mut self) {
        match self {
            Rows::F32(r) => r.shrink_to_fit(),
            Rows::F16(r) => r.shrink_to_fit(),
        }
    }

    fn extend(&mut self, x: &[f32]) {
        match self {
            Rows::F32(r) => r.extend_from_slice(x),
            Rows::F16(r) => {
                let at = r.len();
                r.resize(at + x.len(), f16::ZERO);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut r[at..], x);
            }
        }
    }

    fn view(&self) -> KvRows<'_> {
        match self {
            Rows::F32(r) => KvRows::F32(r),
            Rows::F16(r) => KvRows::F16(r),
        }
    }

    /// A copy of the first `n` values with room for `room`.
    fn prefix(&self, n: usize, room: usize) -> Rows {
        match self {
            Rows::F32(r) => {
                let mut out = Vec::with_capacity(room.max(n));
                out.extend_from_slice(&r[..n]);
                Rows::F32(out)
            }
            Rows::F16(r) => {
                let mut out = Vec::with_capacity(room.max(n));
                out.extend_from_slice(&r[..n]);
                Rows::F16(out)
            }
        }
    }
}

/// A layer's cached keys or values as attention reads them.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Per-sequence key/value cache: for each layer, the keys and the values of every cached
/// position, row by row (`[positions, kv_heads * head_dim]`, f32 or f16 as the model asks
/// at the first step). Room is reserved ahead (see [`KvCache::reserve`]) so that decode steps
/// append without reallocating.
#[derive(Debug, Default)]
pub struct KvCache {
    k: Vec<Rows>,
    v: Vec<Rows>,
    len: usize,
    reserve: usize,
    /// Values per position per layer (known from the first step on).
    kv_dim: usize,
}

const KV_CHUNK: usize = 128;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { k: vec![Rows::default(); num_layers], v: vec![Rows::default(); num_layers], len: 0, reserve: 0, kv_dim: 0 }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the values are stored.
    pub fn kv_type(&self) -> KvType {
        self.k.first().map_or(KvType::F32, Rows::kind)
    }

    /// Asks for room for `positions` in all (allocated at the next step). Untouched room
    /// costs address space, not memory.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = self.reserve.max(positions);
    }

    /// Bytes of keys and values held (filled positions, all layers).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.len * self.kv_dim * self.kv_type().bytes()
    }

    /// Before a step that fills up to `need` positions: drops what a failed step may have
    /// left past `len` and makes room. An empty cache takes the type `kv_type`; a filled one
    /// keeps its own.
    pub(crate) fn prepare(&mut self, num_layers: usize, kv_dim: usize, need: usize, kv_type: KvType) {
        self.kv_dim = kv_dim;
        if self.k.len() != num_layers {
            self.k.resize_with(num_layers, Rows::default);
            self.v.resize_with(num_layers, Rows::default);
        }
        if self.len == 0 && self.kv_type() != kv_type {
            for l in self.k.iter_mut().chain(self.v.iter_mut()) {
                *l = Rows::new(kv_type);
            }
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
        self.k[i].extend(k);
        self.v[i].extend(v);
    }

    /// Layer `i`'s keys and values so far (the step's new positions included).
    pub(crate) fn layer(&self, i: usize) -> (KvRows<'_>, KvRows<'_>) {
        (self.k[i].view(), self.v[i].view())
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

    /// Makes this (empty) cache hold `other`'s first `n` positions, in `other`'s type, with
    /// room for what was reserved.
    pub(crate) fn copy_prefix(&mut self, other: &KvCache, n: usize) {
        let n = n.min(other.len);
        let per = other.kv_dim;
        let room = self.reserve.max(n).div_ceil(KV_CHUNK) * KV_CHUNK * per;
        self.k = other.k.iter().map(|r| r.prefix(n * per, room)).collect();
        self.v = other.v.iter().map(|r| r.prefix(n * per, room)).collect();
        self.len = n;
        self.kv_dim = per;
    }
}
