//! The cloud's answers kept on the device: a bounded LRU keyed by (SHA-256 of the input
//! pixels, teacher version). Every entry belongs to the teacher version the device last heard
//! of; hearing of another one empties the cache.
//!
//! Private requests are never cached: a key is only made from a request that may leave the
//! device ([`CacheKey::of`] is `None` for a private one), and only the cloud's answers are
//! stored, which a private request never gets.

use std::collections::{BTreeMap, HashMap};

use fedge_core::params::ContentHash;

use super::Request;

/// The cache's key of a non-private request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `request`, `None` when it is private (never cached).
    pub fn of(request: &Request) -> Option<Self> {
        (!request.private).then(|| Self(ContentHash::of_bytes(&request.pixels).0))
    }
}

/// A cached answer of the teacher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachedAnswer {
    /// The teacher's class.
    pub class: usize,
    /// Its probability.
    pub confidence: f32,
    /// The teacher version that answered.
    pub model_version: u64,
    /// The tier that answered.
    pub tier: fedge_core::wire::AnswerTier,
}

/// A bounded LRU of the teacher's answers (capacity 0: off).
#[derive(Debug, Default)]
pub struct AnswerCache {
    capacity: usize,
    /// The teacher version every entry belongs to.
    version: Option<u64>,
    entries: HashMap<CacheKey, (CachedAnswer, u64)>,
    /// Last use tick -> key, oldest first.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
}

impl AnswerCache {
    /// An empty cache of at most `capacity` answers.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The device heard of teacher `version`: when it is not the entries', they are dropped.
    /// Returns whether anything was dropped.
    pub fn teacher(&mut self, version: u64) -> bool {
        if self.version == Some(version) {
            return false;
        }
        self.version = Some(version);
        let dropped = !self.entries.is_empty();
        self.entries.clear();
        self.order.clear();
        dropped
    }

    /// The teacher's answer to `key` under the current teacher version, marked as just used.
    pub fn get(&mut self, key: &CacheKey) -> Option<CachedAnswer> {
        self.tick += 1;
        let tick = self.tick;
        let (answer, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, *key);
        Some(*answer)
    }

    /// Keeps the teacher's `answer` to `key`, dropping the least recently used entry when
    /// full. An answer of another teacher version than the current one first moves the cache
    /// to that version (newer answers only: an older one is not kept).
    pub fn put(&mut self, key: CacheKey, answer: CachedAnswer) {
        if self.capacity == 0 {
            return;
        }
        match self.version {
            Some(v) if answer.model_version < v => return,
            Some(v) if answer.model_version == v => {}
            _ => {
                self.teacher(answer.model_version);
            }
        }
        self.tick += 1;
        if let Some((_, used)) = self.entries.insert(key, (answer, self.tick)) {
            self.order.remove(&used);
        }
        self.order.insert(self.tick, key);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: u8, private: bool) -> Request {
        Request { pixels: vec![b; 784], private, max_cost: None }
    }

    fn ans(class: usize, v: u64) -> CachedAnswer {
        CachedAnswer { class, confidence: 0.9, model_version: v, tier: fedge_core::wire::AnswerTier::Root }
    }

    #[test]
    fn least_recently_used_goes_first_and_the_bound_holds() {
        let mut c = AnswerCache::new(3);
        let k: Vec<CacheKey> = (0..5).map(|b| CacheKey::of(&req(b, false)).unwrap()).collect();
        for (i, key) in k.iter().take(3).enumerate() {
            c.put(*key, ans(i, 1));
        }
        assert_eq!(c.get(&k[0]).map(|a| a.class), Some(0), "k0 is now the most recent");
        c.put(k[3], ans(3, 1));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&k[1]), None, "k1 was the least recently used");
        assert!(c.get(&k[0]).is_some() && c.get(&k[2]).is_some() && c.get(&k[3]).is_some());
        for i in 0..100u8 {
            c.put(CacheKey::of(&req(i.wrapping_add(10), false)).unwrap(), ans(1, 1));
            assert!(c.len() <= 3);
        }
        let mut off = AnswerCache::new(0);
        off.put(k[0], ans(0, 1));
        assert!(off.is_empty() && off.get(&k[0]).is_none());
    }

    #[test]
    fn a_new_teacher_version_invalidates_everything() {
        let mut c = AnswerCache::new(10);
        let a = CacheKey::of(&req(1, false)).unwrap();
        let b = CacheKey::of(&req(2, false)).unwrap();
        c.put(a, ans(4, 1));
        assert!(!c.teacher(1), "the same version keeps the entries");
        assert_eq!(c.get(&a), Some(ans(4, 1)));
        assert!(c.teacher(2));
        assert_eq!(c.get(&a), None);
        // An answer of the newer version moves the cache on; a late one of the older is dropped.
        c.put(b, ans(5, 3));
        c.put(a, ans(4, 2));
        assert_eq!((c.get(&b), c.get(&a)), (Some(ans(5, 3)), None));
    }

    #[test]
    fn private_requests_have_no_key() {
        assert!(CacheKey::of(&req(1, true)).is_none());
        assert_eq!(CacheKey::of(&req(1, false)), CacheKey::of(&req(1, false)));
        assert_ne!(CacheKey::of(&req(1, false)), CacheKey::of(&req(2, false)));
    }
}
