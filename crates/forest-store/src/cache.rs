//! A write-back cache of projections in front of the [`Store`].

use crate::{OutboxEntry, Store, StoreError};
use forest_domain::UserState;
use rustc_hash::FxHashMap;

struct Slot {
    state: UserState,
    dirty: bool,
}

/// Hot users' projections in memory. Reads fall through to RocksDB on a miss; writes stay in
/// memory until [`ProjectionCache::commit`], which writes every dirty user ONCE together with
/// the batch's offsets and outbox entries. Between commits the cache may hold state newer than
/// the store; that state is exactly what the uncommitted events produced, so dropping the cache
/// (a crash) and replaying from the stored offsets reproduces it.
///
/// Memory: at most `capacity` users stay cached after a commit; clean users beyond it are
/// evicted. A batch can temporarily hold more (every user it touched).
pub struct ProjectionCache {
    slots: FxHashMap<String, Slot>,
    capacity: usize,
    dirty: Vec<String>,
}

impl ProjectionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: FxHashMap::default(),
            capacity,
            dirty: Vec::new(),
        }
    }

    /// Runs `f` on the user's projection, loaded from the store (or new) on a miss. The user
    /// is marked dirty only if `f` returns `Ok`: a rejected event leaves the projection
    /// unchanged, so a stream of bad events for unknown users writes nothing.
    pub fn update<T, E>(
        &mut self,
        store: &Store,
        user_id: &str,
        f: impl FnOnce(&mut UserState) -> Result<T, E>,
    ) -> Result<Result<T, E>, StoreError> {
        if !self.slots.contains_key(user_id) {
            let state = store
                .get_user(user_id)?
                .unwrap_or_else(|| UserState::new(user_id));
            self.slots.insert(
                user_id.to_owned(),
                Slot {
                    state,
                    dirty: false,
                },
            );
        }
        let slot = self.slots.get_mut(user_id).expect("inserted above");
        let out = f(&mut slot.state);
        if out.is_ok() && !slot.dirty {
            slot.dirty = true;
            self.dirty.push(user_id.to_owned());
        }
        Ok(out)
    }

    /// The user's projection as the cache sees it (committed or not), without changing it.
    pub fn peek(&self, user_id: &str) -> Option<&UserState> {
        self.slots.get(user_id).map(|s| &s.state)
    }

    /// Users changed since the last commit.
    /// The projections changed since the last commit (what the next commit writes).
    pub fn dirty_states(&self) -> impl Iterator<Item = &UserState> {
        self.dirty
            .iter()
            .filter_map(|u| self.slots.get(u))
            .map(|s| &s.state)
    }

    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Writes dirty users, offsets and outbox entries in one batch; then trims the cache.
    pub fn commit<'o>(
        &mut self,
        store: &Store,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<std::ops::Range<u64>, StoreError> {
        // In key order: RocksDB's memtable skiplist remembers where the last insert went, so
        // sorted inserts skip most of the search (the search was ~8 % of the processor's CPU).
        self.dirty.sort_unstable();
        let seqs = {
            let slots = &self.slots;
            let states = self
                .dirty
                .iter()
                .filter_map(|u| slots.get(u))
                .map(|s| &s.state);
            store.commit(states, offsets, outbox)?
        };
        for u in self.dirty.drain(..) {
            if let Some(s) = self.slots.get_mut(&u) {
                s.dirty = false;
            }
        }
        if self.slots.len() > self.capacity {
            // Every slot is clean now. Drop down to 3/4 of capacity, so trimming happens once
            // per many batches rather than every batch.
            let target = self.capacity * 3 / 4;
            let excess = self.slots.len() - target;
            let victims: Vec<String> = self.slots.keys().take(excess).cloned().collect();
            for v in victims {
                self.slots.remove(&v);
            }
        }
        Ok(seqs)
    }

    /// Forgets uncommitted changes (after a failed write, the events are replayed instead).
    pub fn discard_dirty(&mut self) {
        for u in self.dirty.drain(..) {
            self.slots.remove(&u);
        }
    }

    /// Drops every cached user (e.g. on partition revocation: memory goes back).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_batch_writes_each_user_once_and_trims() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(8);
        for i in 0..1000 {
            let r = cache.update(&store, &format!("u{}", i % 10), |s| {
                s.balance_g += 1;
                Ok::<_, ()>(())
            });
            r.unwrap().unwrap();
        }
        // A failed update does not mark the user dirty.
        cache
            .update(&store, "never", |_| Err::<(), _>(()))
            .unwrap()
            .unwrap_err();
        assert_eq!(cache.dirty_len(), 10);
        cache.commit(&store, [("t", 0, 1000)], &[]).unwrap();
        assert_eq!(
            store.stats.writes.load(Ordering::Relaxed),
            11,
            "10 users + 1 offset"
        );
        assert!(cache.len() <= 8);
        assert_eq!(store.get_user("u3").unwrap().unwrap().balance_g, 100);
        // A trimmed user is read back from the store.
        for i in 0..10 {
            let b = cache.update(&store, &format!("u{i}"), |s| Ok::<_, ()>(s.balance_g));
            assert_eq!(b.unwrap(), Ok(100));
        }
        assert_eq!(store.get_user("never").unwrap(), None);
    }

    #[test]
    fn discarded_changes_are_reloaded_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(8);
        let set = |cache: &mut ProjectionCache, g| {
            cache
                .update(&store, "a", |s| Ok::<_, ()>(s.balance_g = g))
                .unwrap()
                .unwrap()
        };
        set(&mut cache, 5);
        cache.commit(&store, [], &[]).unwrap();
        set(&mut cache, 99);
        cache.discard_dirty();
        assert_eq!(cache.peek("a"), None);
        let b = cache
            .update(&store, "a", |s| Ok::<_, ()>(s.balance_g))
            .unwrap();
        assert_eq!(b, Ok(5));
    }
}
