//! Prefix caching: the keys and values of finished sequences are kept (up to a byte budget,
//! least recently used out first) so that a new request whose prompt starts with the same
//! tokens on the same adapter skips their prefill. A long shared system prompt is then run
//! once, not once per request. Entries are keyed by adapter generation (a LoRA on k/v
//! changes the cached values; a reloaded adapter is a new generation, so nothing stale is
//! reused) and by the requests' prefix scope (one per API key in the gateway). A hit copies the shared rows into the new sequence's own cache, so running
//! sequences never share mutable state.

use super::model::KvCache;

/// Shorter shared prefixes are not worth an entry's bookkeeping.
const MIN_TOKENS: usize = 16;

/// (adapter generation or 0 for the base model, the requests' prefix scope).
pub(crate) type CacheKey = (u64, u64);

struct Entry {
    adapter: CacheKey,
    /// The tokens whose keys and values `cache` holds (`cache.len()` of them).
    tokens: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

pub(crate) struct PrefixCache {
    capacity: usize,
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
}

/// A lookup's answer: which entry and how many of its leading positions to copy.
pub(crate) struct Hit {
    entry: usize,
    pub tokens: usize,
}

impl PrefixCache {
    /// A cache that holds at most `capacity` bytes of keys and values (0 turns it off).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, entries: Vec::new(), bytes: 0, clock: 0 }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest cached prefix of `prompt` on `adapter`, leaving at least the prompt's
    /// last token to run (its logits pick the first generated token).
    pub fn lookup(&mut self, adapter: CacheKey, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(1);
        let (entry, tokens) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            // A cache whose window layers dropped the rows this prefix needs cannot serve it.
            .filter(|&(i, n)| self.entries[i].cache.holds_prefix(n))
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))?;
        if tokens < MIN_TOKENS {
            return None;
        }
        self.clock += 1;
        self.entries[entry].last_used = self.clock;
        Some(Hit { entry, tokens })
    }

    /// Copies a hit's rows into `cache` (which must be empty); false if nothing was copied.
    pub fn fill(&self, hit: &Hit, cache: &mut KvCache) -> bool {
        self.entries.get(hit.entry).is_some_and(|e| cache.copy_prefix(&e.cache, hit.tokens))
    }

    /// Keeps a finished sequence's cache; `tokens` are the sequence's tokens (only the first
    /// `cache.len()` have keys and values).
    pub fn insert(&mut self, adapter: CacheKey, tokens: &[u32], mut cache: KvCache) {
        let n = cache.len().min(tokens.len());
        if self.capacity == 0 || n < MIN_TOKENS {
            return;
        }
        let tokens = &tokens[..n];
        // Already covered by an entry that extends it (and can be cut back as far): just mark
        // that entry used.
        self.clock += 1;
        let min = cache.min_prefix();
        let covers = |e: &Entry| e.adapter == adapter && e.tokens.starts_with(tokens) && e.cache.min_prefix() <= min;
        if let Some(e) = self.entries.iter_mut().find(|e| covers(e)) {
            e.last_used = self.clock;
            return;
        }
        cache.truncate(n);
        let bytes = cache.bytes();
        if bytes > self.capacity {
            return;
        }
        // Entries the new one extends are redundant now.
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            if e.adapter == adapter && tokens.starts_with(&e.tokens) && min <= e.cache.min_prefix() {
                self.bytes -= e.bytes;
                self.entries.swap_remove(i);
            } else {
                i += 1;
            }
        }
        while self.bytes + bytes > self.capacity {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i) else {
                break;
            };
            self.bytes -= self.entries[oldest].bytes;
            self.entries.swap_remove(oldest);
        }
        self.bytes += bytes;
        self.entries.push(Entry { adapter, tokens: tokens.to_vec(), cache, bytes, last_used: self.clock });
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_cache::KvRows;

    /// A cache of `n` positions whose values encode (layer, position), one value per row.
    fn filled(n: usize, layers: usize, tag: f32) -> KvCache {
        let mut c = KvCache::new(layers);
        c.prepare(&vec![None; layers], 1, n, crate::engine::model::KvType::F32);
        for p in 0..n {
            for l in 0..layers {
                let x = tag + (l * 1000 + p) as f32;
                c.push(l, &[x], &[-x]);
            }
        }
        c.commit(n);
        c
    }

    #[test]
    fn longest_prefix_on_the_same_adapter_is_copied() -> Result<(), String> {
        let mut pc = PrefixCache::new(1 << 20);
        let a: Vec<u32> = (0..40).collect();
        let mut b: Vec<u32> = (0..30).collect();
        b.extend(100..120);
        pc.insert((0, 0), &a, filled(40, 2, 0.0));
        pc.insert((7, 0), &b, filled(50, 2, 0.5));
        assert_eq!(pc.len(), 2);

        // Shares 30 tokens with `a` and `b`, but only `a` is on the base model.
        let mut prompt: Vec<u32> = (0..30).collect();
        prompt.extend(200..210);
        let hit = pc.lookup((0, 0), &prompt).ok_or("no hit")?;
        assert_eq!(hit.tokens, 30);
        let mut c = KvCache::new(2);
        pc.fill(&hit, &mut c);
        assert_eq!(c.len(), 30);
        let (KvRows::F32(k), KvRows::F32(v)) = c.layer(1) else { return Err("not f32".into()) };
        assert_eq!((k.len(), k[29], v[29]), (30, 1029.0, -1029.0));

        // The whole prompt cached: the last token is still left to run.
        let hit = pc.lookup((0, 0), &a).ok_or("no hit")?;
        assert_eq!(hit.tokens, 39);
        // Too short a match, or another adapter: nothing.
        assert!(pc.lookup((0, 0), &[0, 1, 2, 3, 9, 9, 9]).is_none());
        assert!(pc.lookup((3, 0), &a).is_none());
        // Same tokens and adapter, another scope (API key): nothing.
        assert!(pc.lookup((0, 9), &a).is_none());
        Ok(())
    }

    /// `n` positions run one step at a time through layer 0 with a window of 4 and a global
    /// layer 1, so layer 0 drops rows once its room is used up.
    fn windowed(n: usize) -> KvCache {
        let mut c = KvCache::new(2);
        for p in 0..n {
            c.prepare(&[Some(4), None], 1, p + 1, crate::engine::model::KvType::F32);
            c.push(0, &[p as f32], &[p as f32]);
            c.push(1, &[p as f32], &[p as f32]);
            c.commit(1);
        }
        c
    }

    /// With sliding-window layers, a finished sequence's cache serves only prefixes near its
    /// end; the whole prompt (kept when its prefill ended) still serves requests that share
    /// just the prompt, and the windowed entry that extends it does not replace it.
    #[test]
    fn entries_whose_window_rows_are_gone_serve_only_long_prefixes() -> Result<(), String> {
        let mut pc = PrefixCache::new(1 << 20);
        let seq: Vec<u32> = (0..300).collect();
        let done = windowed(300);
        assert!(done.min_prefix() > 200, "rows were dropped");
        pc.insert((0, 0), &seq[..40], windowed(40));
        pc.insert((0, 0), &seq, done);
        assert_eq!(pc.len(), 2, "the windowed entry does not replace the whole prompt");

        // Shares 100 tokens: the long entry cannot be cut back to 100, the prompt serves 40.
        let mut other: Vec<u32> = (0..100).collect();
        other.push(999);
        assert_eq!(pc.lookup((0, 0), &other).ok_or("no hit")?.tokens, 40);
        // A continuation of the whole sequence (the next turn of a chat): the long entry.
        let mut next = seq.clone();
        next.extend([7, 8, 9]);
        let hit = pc.lookup((0, 0), &next).ok_or("no hit")?;
        assert_eq!(hit.tokens, 300);
        let mut c = KvCache::new(2);
        assert!(pc.fill(&hit, &mut c));
        assert_eq!((c.len(), c.first(1)), (300, 0));
        let (KvRows::F32(k), _) = c.layer(0) else { return Err("not f32".into()) };
        assert_eq!(k, &[297.0, 298.0, 299.0][..], "a window layer's copy holds what position 300 sees");
        // Inserting the prompt again changes nothing.
        pc.insert((0, 0), &seq[..40], windowed(40));
        assert_eq!(pc.len(), 2);
        Ok(())
    }

    #[test]
    fn budget_evicts_least_recently_used_and_extensions_replace() -> Result<(), String> {
        let per = filled(20, 1, 0.0).bytes();
        let mut pc = PrefixCache::new(per * 2);
        let seq = |base: u32| (base..base + 20).collect::<Vec<u32>>();
        pc.insert((0, 0), &seq(0), filled(20, 1, 0.0));
        pc.insert((0, 0), &seq(100), filled(20, 1, 0.0));
        pc.lookup((0, 0), &seq(0)).ok_or("no hit")?; // 0 is now the most recent
        pc.insert((0, 0), &seq(200), filled(20, 1, 0.0));
        assert_eq!((pc.len(), pc.bytes()), (2, per * 2));
        assert!(pc.lookup((0, 0), &seq(100)).is_none(), "the least recently used entry went");
        assert!(pc.lookup((0, 0), &seq(0)).is_some());

        // A longer sequence over an entry's tokens replaces it; a prefix of one adds nothing.
        let mut longer = seq(0);
        longer.extend(500..510);
        pc.insert((0, 0), &longer, filled(30, 1, 0.0));
        // seq(0)'s entry is replaced; seq(200)'s goes to make room for the 30 positions.
        assert_eq!((pc.len(), pc.bytes()), (1, per * 3 / 2));
        assert_eq!(pc.lookup((0, 0), &longer).ok_or("no hit")?.tokens, 29);
        pc.insert((0, 0), &seq(0), filled(20, 1, 0.0));
        assert_eq!((pc.len(), pc.bytes()), (1, per * 3 / 2));

        // Off: nothing is kept.
        let mut off = PrefixCache::new(0);
        off.insert((0, 0), &seq(0), filled(20, 1, 0.0));
        assert_eq!(off.len(), 0);
        Ok(())
    }
}
