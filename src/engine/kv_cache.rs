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

    /// A copy of the values in `range` with room for `room`.
    fn slice(&self, range: std::ops::Range<usize>, room: usize) -> Rows {
        fn copy<T: Copy>(r: &[T], range: std::ops::Range<usize>, room: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(room.max(range.len()));
            out.extend_from_slice(&r[range]);
            out
        }
        match self {
            Rows::F32(r) => Rows::F32(copy(r, range, room)),
            Rows::F16(r) => Rows::F16(copy(r, range, room)),
        }
    }

    /// Drops the first `n` values (the rest move to the front; the room stays).
    fn drop_front(&mut self, n: usize) {
        match self {
            Rows::F32(r) => drop(r.drain(..n.min(r.len()))),
            Rows::F16(r) => drop(r.drain(..n.min(r.len()))),
        }
    }

    fn shrink_to(&mut self, n: usize) {
        match self {
            Rows::F32(r) => r.shrink_to(n),
            Rows::F16(r) => r.shrink_to(n),
        }
    }
}

/// A layer's cached keys or values as attention reads them.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// One layer's keys and values: rows for positions `first..` (a global layer keeps every
/// position, `first` stays 0; a sliding-window layer drops the positions no later query can
/// see).
#[derive(Debug, Clone, Default)]
struct Layer {
    k: Rows,
    v: Rows,
    first: usize,
    window: Option<usize>,
}

impl Layer {
    /// Whether a query at position `n` (after a prefix of `n` positions) finds every row it
    /// attends to.
    fn holds_prefix(&self, n: usize) -> bool {
        self.first == 0 || self.window.is_some_and(|w| self.first + w <= n + 1)
    }
}

/// Per-sequence key/value cache: for each layer, the keys and the values of the cached
/// positions, row by row (`[positions, kv_heads * head_dim]`, f32 or f16 as the model asks
/// at the first step). Room is reserved ahead (see [`KvCache::reserve`]) so that decode steps
/// append without reallocating.
///
/// Sliding-window layers (Gemma 3's local layers) keep a window's worth of rows, not the whole
/// sequence: before a step, the rows no query from the step's first position on can see are
/// dropped from the front (moved in bulk once the room ahead is used up, so a decode step
/// pays one row's move on average) and the layer's room shrinks to a window and a chunk. The
/// prompt is held whole until it is prefilled (see [`KvCache::hold`]) so that the prefix cache
/// and prompt twins can copy it.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Layer>,
    len: usize,
    reserve: usize,
    /// Nothing is dropped while fewer positions than this are cached.
    hold: usize,
    /// Values per position per layer (known from the first step on).
    kv_dim: usize,
}

const KV_CHUNK: usize = 128;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![Layer::default(); num_layers], len: 0, reserve: 0, hold: 0, kv_dim: 0 }
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
        self.layers.first().map_or(KvType::F32, |l| l.k.kind())
    }

    /// Asks for room for `positions` in all (allocated at the next step). Untouched room
    /// costs address space, not memory.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = self.reserve.max(positions);
    }

    /// Keeps every row of the first `positions` until that many are cached (a prompt, so
    /// that it can be copied whole when its prefill ends).
    pub fn hold(&mut self, positions: usize) {
        self.hold = positions;
    }

    /// Bytes of keys and values held (all layers).
    pub fn bytes(&self) -> usize {
        let rows: usize = self.layers.iter().map(|l| self.len.saturating_sub(l.first)).sum();
        2 * rows * self.kv_dim * self.kv_type().bytes()
    }

    /// Whether a step at position `n` (after the first `n` positions) finds every row it
    /// needs: always for `n = len`; for fewer, not once a window layer dropped rows it needs.
    pub fn holds_prefix(&self, n: usize) -> bool {
        n <= self.len && self.layers.iter().all(|l| l.holds_prefix(n))
    }

    /// The fewest positions this cache can be cut back to ([`KvCache::holds_prefix`]).
    pub fn min_prefix(&self) -> usize {
        self.layers.iter().filter(|l| l.first > 0).filter_map(|l| Some(l.first + l.window? - 1)).max().unwrap_or(0)
    }

    /// The position of layer `i`'s first cached row.
    pub(crate) fn first(&self, i: usize) -> usize {
        self.layers[i].first
    }

    /// Before a step that fills up to `need` positions: drops what a failed step may have
    /// left past `len`, drops the rows that window layers (`windows[i]`, one per layer) no
    /// longer need, and makes room. An empty cache takes the type `kv_type`; a filled one
    /// keeps its own.
    pub(crate) fn prepare(&mut self, windows: &[Option<usize>], kv_dim: usize, need: usize, kv_type: KvType) {
        self.kv_dim = kv_dim;
        if self.layers.len() != windows.len() {
            self.layers.resize_with(windows.len(), Layer::default);
        }
        if self.len == 0 {
            for l in &mut self.layers {
                l.first = 0;
                if l.k.kind() != kv_type {
                    (l.k, l.v) = (Rows::new(kv_type), Rows::new(kv_type));
                }
            }
        }
        let want = need.max(self.reserve).div_ceil(KV_CHUNK) * KV_CHUNK;
        let (len, may_drop) = (self.len, self.len >= self.hold);
        for (l, &window) in self.layers.iter_mut().zip(windows) {
            l.window = window;
            let held = len - l.first;
            l.k.truncate(held * kv_dim);
            l.v.truncate(held * kv_dim);
            if l.k.capacity() >= (need - l.first) * kv_dim && l.v.capacity() >= (need - l.first) * kv_dim {
                continue;
            }
            let Some(w) = window else {
                for r in [&mut l.k, &mut l.v] {
                    r.reserve_exact(want * kv_dim - r.len());
                }
                continue;
            };
            // Positions before `dead` are out of every later query's window.
            let dead = (len + 1).saturating_sub(w);
            if may_drop && dead > l.first {
                for r in [&mut l.k, &mut l.v] {
                    r.drop_front((dead - l.first) * kv_dim);
                }
                l.first = dead;
            }
            let rows = need - l.first;
            let room = rows.max((w + KV_CHUNK).min(want - l.first));
            for r in [&mut l.k, &mut l.v] {
                if r.capacity() < rows * kv_dim {
                    r.reserve_exact(room * kv_dim - r.len());
                } else if r.capacity() > (room + KV_CHUNK) * kv_dim {
                    r.shrink_to(room * kv_dim);
                }
            }
        }
    }

    /// Appends one position's key and value for layer `i`.
    pub(crate) fn push(&mut self, i: usize, k: &[f32], v: &[f32]) {
        self.layers[i].k.extend(k);
        self.layers[i].v.extend(v);
    }

    /// Layer `i`'s keys and values so far (the step's new positions included), rows from
    /// position [`KvCache::first`] on.
    pub(crate) fn layer(&self, i: usize) -> (KvRows<'_>, KvRows<'_>) {
        (self.layers[i].k.view(), self.layers[i].v.view())
    }

    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position from `n` on (the room stays; the next step overwrites it) and
    /// returns how many are kept: `n`, or 0 when a window layer no longer holds the rows
    /// position `n` would attend to (the caller runs the prefix again).
    pub fn rewind(&mut self, n: usize) -> usize {
        let n = n.min(self.len);
        self.len = if self.holds_prefix(n) { n } else { 0 };
        self.len
    }

    /// Keeps the first `n` positions (as [`KvCache::rewind`]) and gives back the room past
    /// them.
    pub(crate) fn truncate(&mut self, n: usize) {
        let n = self.rewind(n);
        for l in &mut self.layers {
            if n == 0 {
                l.first = 0;
            }
            for r in [&mut l.k, &mut l.v] {
                r.truncate((n - l.first) * self.kv_dim);
                r.shrink_to_fit();
            }
        }
        self.reserve = n;
    }

    /// Makes this (empty) cache hold `other`'s first `n` positions, in `other`'s type, with
    /// room for what was reserved; false (and nothing copied) when `other` cannot be cut
    /// back to `n` ([`KvCache::holds_prefix`]).
    pub(crate) fn copy_prefix(&mut self, other: &KvCache, n: usize) -> bool {
        if !other.holds_prefix(n) {
            return false;
        }
        let per = other.kv_dim;
        let want = self.reserve.max(n).div_ceil(KV_CHUNK) * KV_CHUNK;
        self.layers = other
            .layers
            .iter()
            .map(|l| {
                // A window layer copies only what a query at `n` can see.
                let from = match l.window {
                    Some(w) => l.first.max((n + 1).saturating_sub(w)),
                    None => 0,
                };
                let room = match l.window {
                    Some(w) => (n - from).max((w + KV_CHUNK).min(want - from)),
                    None => want,
                };
                let rows = (from - l.first) * per..(n - l.first) * per;
                Layer { k: l.k.slice(rows.clone(), room * per), v: l.v.slice(rows, room * per), first: from, window: l.window }
            })
            .collect();
        self.len = n;
        self.kv_dim = per;
        true
    }
}
