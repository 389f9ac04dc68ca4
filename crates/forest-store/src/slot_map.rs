//! The projection cache's map from user id to boxed slot: open addressing with linear
//! probing, whose bucket for a key can be prefetched before the key is looked up.
//!
//! Why not a `HashMap`: at 1 M users the cache's map is far larger than the CPU's caches, so
//! finding a user's entry is a miss to memory (the control bytes, then the bucket) on every
//! event. The processor prefetches a user's slot a few records before folding it, but the
//! lookup that finds the slot had to wait for those misses itself: with a `HashMap` there is
//! no way to start loading a key's bucket without looking it up. It was the largest item of a
//! 1 M-user profile (session 14: 11.5 % of the processor's samples in `HashMap::get`, most of
//! it in that prefetching lookup). Here a bucket's place follows from the key's hash alone
//! ([`SlotMap::prefetch`]), so a caller can start loading it further ahead, and the lookup
//! then finds it in the cache.

use rustc_hash::FxBuildHasher;
use std::hash::BuildHasher;

/// What the map finds a value by: its key, kept in the value itself (the map keeps only the
/// key's hash beside the box).
pub(crate) trait Keyed {
    fn key(&self) -> &str;
}

/// The hash a key is stored and looked up under.
#[inline]
pub(crate) fn hash(key: &str) -> u64 {
    hash_bytes(key.as_bytes())
}

/// [`hash`] of a key given as bytes, which need not be UTF-8: a caller holding a record's key
/// can hash it once, before (or without) checking it is a user id (see
/// [`crate::ProjectionCache::user_hash`]).
#[inline]
pub(crate) fn hash_bytes(key: &[u8]) -> u64 {
    FxBuildHasher.hash_one(key)
}

struct Entry<T> {
    hash: u64,
    value: Box<T>,
}

/// Buckets of 16 bytes (the hash and the box), at most 3/4 full, a power of two of them.
/// Deletion shifts the following entries back (no tombstones), so a lookup stops at the first
/// empty bucket.
pub(crate) struct SlotMap<T> {
    buckets: Box<[Option<Entry<T>>]>,
    len: usize,
    /// 64 minus log2 of the bucket count: the top bits of the hash times a constant pick its
    /// home bucket (see `home`).
    shift: u32,
}

const MIN_BUCKETS: usize = 16;

impl<T: Keyed> Default for SlotMap<T> {
    fn default() -> Self {
        Self::with_buckets(MIN_BUCKETS)
    }
}

impl<T: Keyed> SlotMap<T> {
    fn with_buckets(n: usize) -> Self {
        debug_assert!(n.is_power_of_two() && n >= MIN_BUCKETS);
        Self {
            buckets: std::iter::repeat_with(|| None).take(n).collect(),
            len: 0,
            shift: 64 - n.trailing_zeros(),
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// Fx's multiply leaves its best-mixed bits at the top; a second multiply spreads them
    /// over the bits the home bucket is taken from.
    #[inline]
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Starts loading the home bucket of `hash` into the CPU cache; changes nothing.
    #[inline]
    pub(crate) fn prefetch(&self, hash: u64) {
        if let Some(b) = self.buckets.get(self.home(hash)) {
            forest_domain::prefetch_lines(
                std::ptr::from_ref(b).cast(),
                std::mem::size_of::<Option<Entry<T>>>(),
            );
        }
    }

    fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            match &self.buckets[i] {
                None => return None,
                Some(e) if e.hash == hash && e.value.key() == key => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    #[inline]
    pub(crate) fn get(&self, hash: u64, key: &str) -> Option<&T> {
        let i = self.find(hash, key)?;
        self.buckets[i].as_ref().map(|e| &*e.value)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, hash: u64, key: &str) -> Option<&mut T> {
        let i = self.find(hash, key)?;
        self.buckets[i].as_mut().map(|e| &mut *e.value)
    }

    /// The value of the first entry stored under `hash`, found without comparing keys: for
    /// prefetching only. The key compare would read the value itself, the very miss a
    /// prefetch is to start without waiting for. With 64-bit hashes, another key's value is
    /// found only on a full hash collision, and then the wrong lines are loaded, nothing more.
    #[inline]
    pub(crate) fn get_by_hash(&self, hash: u64) -> Option<&T> {
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            match &self.buckets[i] {
                None => return None,
                Some(e) if e.hash == hash => return Some(&e.value),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    pub(crate) fn contains(&self, hash: u64, key: &str) -> bool {
        self.find(hash, key).is_some()
    }

    /// Adds `value`, whose key must not be in the map yet, and returns it.
    pub(crate) fn insert_new(&mut self, hash: u64, value: Box<T>) -> &mut T {
        debug_assert!(!self.contains(hash, value.key()), "key inserted twice");
        if 4 * (self.len + 1) > 3 * self.buckets.len() {
            let bigger = Self::with_buckets(2 * self.buckets.len());
            let old = std::mem::replace(self, bigger);
            for e in old.buckets.into_vec().into_iter().flatten() {
                self.place(e);
            }
        }
        let i = self.place(Entry { hash, value });
        match &mut self.buckets[i] {
            Some(e) => &mut e.value,
            None => unreachable!("just placed"),
        }
    }

    /// Puts `e` in the first free bucket from its home; returns where.
    fn place(&mut self, e: Entry<T>) -> usize {
        let mask = self.mask();
        let mut i = self.home(e.hash);
        while self.buckets[i].is_some() {
            i = (i + 1) & mask;
        }
        self.buckets[i] = Some(e);
        self.len += 1;
        i
    }

    pub(crate) fn remove(&mut self, hash: u64, key: &str) -> Option<Box<T>> {
        let mut hole = self.find(hash, key)?;
        let removed = self.buckets[hole].take().map(|e| e.value);
        self.len -= 1;
        // Shift back every following entry of the run that may move into the hole: one whose
        // home is not between the hole and it (cyclically).
        let mask = self.mask();
        let mut j = (hole + 1) & mask;
        while let Some(e) = &self.buckets[j] {
            let home = self.home(e.hash);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.buckets.swap(hole, j);
                hole = j;
            }
            j = (j + 1) & mask;
        }
        removed
    }

    /// Keeps only the values `keep` says yes to. Rebuilds the table (for the rare paths that
    /// drop many users at once: a failed write, a discarded batch).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&mut T) -> bool) {
        let n = self.buckets.len();
        let old = std::mem::replace(self, Self::with_buckets(n));
        for mut e in old.buckets.into_vec().into_iter().flatten() {
            if keep(&mut e.value) {
                self.place(e);
            }
        }
    }

    /// Empties the map, keeping its buckets.
    pub(crate) fn clear(&mut self) {
        self.buckets.iter_mut().for_each(|b| *b = None);
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq)]
    struct V {
        key: String,
        n: u32,
    }

    impl Keyed for V {
        fn key(&self) -> &str {
            &self.key
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        Bump(u16),
        RetainEven,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // A small key space, so keys come back after removal and runs collide.
        prop_oneof![
            8 => (0..300u16, any::<u32>()).prop_map(|(k, n)| Op::Insert(k, n)),
            4 => (0..300u16).prop_map(Op::Remove),
            3 => (0..300u16).prop_map(Op::Bump),
            1 => Just(Op::RetainEven),
            1 => Just(Op::Clear),
        ]
    }

    /// The key's hash with only a few distinct values: every lookup walks long runs of
    /// colliding entries, and removals shift entries whose home is elsewhere in the run.
    fn colliding(key: &str) -> u64 {
        hash(key) % 7
    }

    /// Runs `ops` on a map hashing with `h` and on a `HashMap`; `real_hashes` when `h` is
    /// [`hash`] (whose values for these few keys do not collide).
    fn check(ops: Vec<Op>, h: fn(&str) -> u64, real_hashes: bool) {
        let mut map = SlotMap::<V>::default();
        let mut model = HashMap::<String, u32>::new();
        for op in ops {
            match op {
                Op::Insert(k, n) => {
                    let key = format!("user-{k}");
                    if let Some(v) = map.get_mut(h(&key), &key) {
                        v.n = n;
                    } else {
                        let v = map.insert_new(
                            h(&key),
                            Box::new(V {
                                key: key.clone(),
                                n,
                            }),
                        );
                        assert_eq!(v.n, n);
                    }
                    model.insert(key, n);
                }
                Op::Remove(k) => {
                    let key = format!("user-{k}");
                    let removed = map.remove(h(&key), &key).map(|v| v.n);
                    assert_eq!(removed, model.remove(&key));
                }
                Op::Bump(k) => {
                    let key = format!("user-{k}");
                    if let Some(v) = map.get_mut(h(&key), &key) {
                        v.n = v.n.wrapping_add(1);
                    }
                    if let Some(n) = model.get_mut(&key) {
                        *n = n.wrapping_add(1);
                    }
                }
                Op::RetainEven => {
                    map.retain(|v| v.n % 2 == 0);
                    model.retain(|_, n| *n % 2 == 0);
                }
                Op::Clear => {
                    map.clear();
                    model.clear();
                }
            }
            assert_eq!(map.len(), model.len());
            assert_eq!(map.is_empty(), model.is_empty());
        }
        for k in 0..300u16 {
            let key = format!("user-{k}");
            assert_eq!(
                map.get(h(&key), &key).map(|v| v.n),
                model.get(&key).copied()
            );
            assert_eq!(map.contains(h(&key), &key), model.contains_key(&key));
            if real_hashes {
                // The hash alone finds the key.
                assert_eq!(
                    map.get_by_hash(h(&key)).map(|v| v.key.as_str()),
                    model.contains_key(&key).then_some(key.as_str())
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any sequence of inserts, updates, removals, retains and clears leaves the map
        /// holding exactly what a `HashMap` holds.
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec(op(), 1..600)) {
            check(ops, hash, true);
        }

        /// The same with hashes that collide all the time.
        #[test]
        fn behaves_like_a_hash_map_when_hashes_collide(
            ops in proptest::collection::vec(op(), 1..400)
        ) {
            check(ops, colliding, false);
        }
    }

    #[test]
    fn grows_past_its_first_buckets_and_finds_every_key() {
        let mut map = SlotMap::<V>::default();
        for n in 0..10_000u32 {
            let key = format!("u{n}");
            map.insert_new(hash(&key), Box::new(V { key, n }));
        }
        assert_eq!(map.len(), 10_000);
        assert!(4 * map.len() <= 3 * map.buckets.len());
        for n in 0..10_000u32 {
            let key = format!("u{n}");
            assert_eq!(map.get(hash(&key), &key).map(|v| v.n), Some(n));
        }
        assert!(map.get(hash("absent"), "absent").is_none());
    }
}
