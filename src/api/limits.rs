//! Per-key concurrency limit, counted in sequences (prompts x `n`), not HTTP requests. A
//! request takes a [`Permit`] for its sequences before it reaches the engine and keeps it
//! until its response is complete (a streamed response carries it in its body), so one key
//! cannot fill the engine's queue. A request of more sequences than the limit counts as the
//! limit (it runs alone). Over the limit: `429 too_many_concurrent_requests`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::{ApiError, ErrorKind};

#[derive(Debug)]
pub struct ConcurrencyLimiter {
    /// 0 disables the limit.
    max: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

/// A slot in the limiter, released on drop.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConcurrencyLimiter>,
    key: String,
    count: usize,
}

impl ConcurrencyLimiter {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, in_flight: Mutex::new(HashMap::new()) })
    }

    pub fn acquire(self: &Arc<Self>, key: &str) -> Result<Permit, ApiError> {
        self.acquire_n(key, 1)
    }

    /// A permit for `count` sequences.
    pub fn acquire_n(self: &Arc<Self>, key: &str, count: usize) -> Result<Permit, ApiError> {
        let count = if self.max > 0 { count.clamp(1, self.max) } else { count.max(1) };
        let mut map = self.in_flight.lock();
        let n = map.entry(key.to_string()).or_insert(0);
        if self.max > 0 && *n + count > self.max {
            return Err(ApiError::new(
                ErrorKind::TooManyConcurrentRequests,
                format!(
                    "Too many concurrent requests for this API key ({} sequences in flight, {} more asked, \
                     limit {}); retry when one finishes.",
                    n, count, self.max
                ),
            ));
        }
        *n += count;
        Ok(Permit { limiter: self.clone(), key: key.to_string(), count })
    }

    /// Requests in flight for a key.
    pub fn in_flight(&self, key: &str) -> usize {
        self.in_flight.lock().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut map = self.limiter.in_flight.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(self.count);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_and_release() -> Result<(), ApiError> {
        let l = ConcurrencyLimiter::new(2);
        let a = l.acquire("k")?;
        let _b = l.acquire("k")?;
        assert_eq!(l.acquire("k").map(|_| ()).map_err(|e| e.kind), Err(ErrorKind::TooManyConcurrentRequests));
        let _other = l.acquire("j")?;
        drop(a);
        let _c = l.acquire("k")?;
        assert_eq!(l.in_flight("k"), 2);
        Ok(())
    }

    #[test]
    fn counts_sequences() -> Result<(), ApiError> {
        let l = ConcurrencyLimiter::new(4);
        let a = l.acquire_n("k", 3)?;
        assert!(l.acquire_n("k", 2).is_err());
        let _b = l.acquire_n("k", 1)?;
        drop(a);
        assert_eq!(l.in_flight("k"), 1);
        // Larger than the limit: counts as the whole limit, alone.
        assert!(l.acquire_n("j", 100).is_ok_and(|p| p.count == 4));
        Ok(())
    }

    #[test]
    fn zero_means_unlimited() -> Result<(), ApiError> {
        let l = ConcurrencyLimiter::new(0);
        let permits = (0..100).map(|_| l.acquire("k")).collect::<Result<Vec<_>, _>>()?;
        assert_eq!(l.in_flight("k"), permits.len());
        drop(permits);
        assert_eq!(l.in_flight("k"), 0);
        Ok(())
    }
}
