//! A write-back cache of projections in front of the [`Store`].

use crate::{OutboxEntry, Store, StoreError};
use forest_domain::UserState;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;

struct Slot {
    state: UserState,
    dirty: bool,
    /// CLOCK's reference bit: set when the user is used again after it was loaded, cleared
    /// when the eviction hand passes it (a second chance).
    referenced: bool,
    /// Estimated heap bytes of this slot (see [`estimate_bytes`]), as of its last commit or
    /// load.
    bytes: usize,
    /// The [`ProjectionCache::prepare`] ticket that last took this user's state; above the
    /// durable ticket, that write may not have landed, and the store still holds an older
    /// state: the slot must not be evicted (a reload would read the old one).
    ticket: u64,
}

/// Estimated memory of a cached projection: the slot, the map entry's key, and the heap
/// behind the state's collections (by capacity). An estimate from the public shape of
/// [`UserState`], not an allocator count: private derived indexes (the dedupe id index) are
/// counted as one more entry's worth per remembered id. Computed at commit and load, never
/// per event.
pub fn estimate_bytes(s: &UserState) -> usize {
    use std::mem::size_of;
    const MAP_ENTRY: usize = 48;
    size_of::<Slot>()
        + MAP_ENTRY
        + 2 * s.user_id.len()
        + s.species.as_ref().map_or(0, String::capacity)
        + s.counters.capacity() * size_of::<forest_domain::Counter>()
        + s.recent_ids.capacity() * 2 * size_of::<(i64, u64)>()
        + s.recent_credits.capacity() * size_of::<forest_domain::CreditNote>()
        // The rule table's strings are shared with the loaded rules when the fold made them,
        // and the table's own after a load; counted as its own (at most a few entries).
        + s.credit_rules.capacity() * size_of::<forest_domain::NoteRule>()
        + s.credit_rules
            .iter()
            .map(|r| r.rules_version.len() + r.rule_id.len())
            .sum::<usize>()
        + s.day_quantities.capacity() * size_of::<forest_domain::DayQuantity>()
}

/// Hot users' projections in memory. Reads fall through to RocksDB on a miss; writes stay in
/// memory until [`ProjectionCache::commit`], which writes every dirty user ONCE together with
/// the batch's offsets and outbox entries. Between commits the cache may hold state newer than
/// the store; that state is exactly what the uncommitted events produced, so dropping the cache
/// (a crash) and replaying from the stored offsets reproduces it.
///
/// Writes may be split in two ([`ProjectionCache::prepare`] on the folding thread,
/// [`Store::write_prepared`] on another, then [`ProjectionCache::durable`]): until a prepared
/// write is durable, its users stay cached however full the cache is.
///
/// Memory: after a commit at most `capacity` users, and at most `max_bytes` estimated bytes
/// ([`estimate_bytes`]), stay cached; beyond either, clean users are evicted down to 3/4 of
/// the bound (so trimming runs once per many batches, not every batch). A batch can
/// temporarily hold more (every user it touched is kept until it is written).
///
/// Eviction is CLOCK (second chance), an approximation of least-recently-used that costs
/// one boolean store per hit on the fold path: users sit in a ring in load order; the hand
/// evicts the first user not used since it last passed and gives the others a second
/// chance. Users touched again since they were loaded (the hot ones) outlive those touched
/// once (a scan over many cold users), which evicting in hash order did not guarantee.
pub struct ProjectionCache {
    slots: FxHashMap<String, Slot>,
    capacity: usize,
    max_bytes: usize,
    /// Sum of the slots' `bytes`.
    bytes: usize,
    dirty: Vec<String>,
    /// Sum of the dirty users' `bytes` (see [`ProjectionCache::dirty_bytes`]).
    dirty_bytes: usize,
    /// CLOCK's ring: cached users in load order; the front is under the hand. May hold ids
    /// no longer cached (dropped by `discard_dirty`), skipped when the hand reaches them.
    ring: VecDeque<String>,
    /// The last ticket [`ProjectionCache::prepare`] handed out, and the highest one whose
    /// write is durable.
    prepared: u64,
    durable: u64,
}

impl ProjectionCache {
    /// A cache bounded by users only.
    pub fn new(capacity: usize) -> Self {
        Self::with_bounds(capacity, usize::MAX)
    }

    /// A cache bounded by `capacity` users and `max_bytes` estimated bytes, whichever is
    /// reached first.
    pub fn with_bounds(capacity: usize, max_bytes: usize) -> Self {
        Self {
            slots: FxHashMap::default(),
            capacity,
            max_bytes,
            bytes: 0,
            dirty: Vec::new(),
            dirty_bytes: 0,
            ring: VecDeque::new(),
            prepared: 0,
            durable: 0,
        }
    }

    /// Estimated bytes of the cached projections (as of their last commit or load).
    pub fn bytes(&self) -> usize {
        self.bytes
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
        let slot = match self.slots.get_mut(user_id) {
            Some(slot) => {
                slot.referenced = true;
                slot
            }
            None => {
                let state = store
                    .get_user(user_id)?
                    .unwrap_or_else(|| UserState::new(user_id));
                let bytes = estimate_bytes(&state);
                self.bytes += bytes;
                self.ring.push_back(user_id.to_owned());
                self.slots.entry(user_id.to_owned()).or_insert(Slot {
                    state,
                    dirty: false,
                    referenced: false,
                    bytes,
                    ticket: 0,
                })
            }
        };
        let out = f(&mut slot.state);
        if out.is_ok() && !slot.dirty {
            slot.dirty = true;
            self.dirty.push(user_id.to_owned());
            self.dirty_bytes += slot.bytes;
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
        let (prepared, ticket) = self.prepare(store, offsets, outbox)?;
        match store.write_prepared(prepared) {
            Ok(seqs) => {
                self.durable(ticket);
                Ok(seqs)
            }
            Err(e) => {
                self.forget_undurable();
                Err(e)
            }
        }
    }

    /// A batch of offsets and outbox entries only: the dirty users stay dirty (so they are
    /// neither evicted nor forgotten) until a later [`ProjectionCache::prepare`] stores them.
    /// For a caller that keeps, in the same batch, what it needs to rebuild them after a crash
    /// (the processor's replay records). Same ticket rules as `prepare`.
    pub fn prepare_without_projections<'o>(
        &mut self,
        store: &Store,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<(crate::PreparedBatch, u64), StoreError> {
        let prepared = store.prepare([], offsets, outbox)?;
        self.prepared += 1;
        Ok((prepared, self.prepared))
    }

    /// Estimated bytes (see [`estimate_bytes`]) of the dirty users, as of their last write or
    /// load: what a caller deferring writes weighs against the cache's bounds.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }

    /// The first half of [`ProjectionCache::commit`]: serialises every dirty user with the
    /// offsets and outbox entries, and marks them clean. Returns the batch to write and its
    /// ticket, which [`ProjectionCache::durable`] takes once the write succeeded. Tickets must
    /// be written and reported durable in order.
    pub fn prepare<'o>(
        &mut self,
        store: &Store,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<(crate::PreparedBatch, u64), StoreError> {
        self.dirty.sort_unstable();
        let prepared = {
            let slots = &self.slots;
            let states = self
                .dirty
                .iter()
                .filter_map(|u| slots.get(u))
                .map(|s| &s.state);
            store.prepare(states, offsets, outbox)?
        };
        self.prepared += 1;
        let ticket = self.prepared;
        self.dirty_bytes = 0;
        for u in self.dirty.drain(..) {
            if let Some(s) = self.slots.get_mut(&u) {
                s.dirty = false;
                s.ticket = ticket;
                let b = estimate_bytes(&s.state);
                self.bytes = self.bytes - s.bytes + b;
                s.bytes = b;
            }
        }
        Ok((prepared, ticket))
    }

    /// Records that the write of `ticket` (and so of every earlier one) is durable, and trims
    /// the cache to its bounds.
    pub fn durable(&mut self, ticket: u64) {
        self.durable = self.durable.max(ticket);
        if self.slots.len() > self.capacity || self.bytes > self.max_bytes {
            self.evict(self.capacity * 3 / 4, self.max_bytes / 4 * 3);
        }
    }

    /// Drops every user whose latest state is dirty, or prepared and not durable: after a
    /// failed write, what the store holds is the truth.
    pub fn forget_undurable(&mut self) {
        let durable = self.durable;
        let mut freed = 0;
        self.slots.retain(|_, s| {
            let keep = !s.dirty && s.ticket <= durable;
            if !keep {
                freed += s.bytes;
            }
            keep
        });
        self.bytes -= freed;
        self.dirty.clear();
        self.dirty_bytes = 0;
    }

    fn evict(&mut self, users: usize, bytes: usize) {
        // Users the hand may not take (dirty, or written but not yet durable) go round again;
        // two turns of the ring without reaching the bound means nothing more can go now.
        let mut turns = 2 * self.ring.len() + 1;
        while self.slots.len() > users || self.bytes > bytes {
            if turns == 0 {
                break;
            }
            turns -= 1;
            let Some(u) = self.ring.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(&u) else {
                continue; // dropped by discard_dirty
            };
            if slot.dirty || slot.ticket > self.durable {
                self.ring.push_back(u);
            } else if slot.referenced {
                slot.referenced = false;
                self.ring.push_back(u);
            } else if let Some(slot) = self.slots.remove(&u) {
                self.bytes -= slot.bytes;
            }
        }
        // Ids of discarded users pile up only after failed writes; drop them when they
        // outnumber the cached users.
        if self.ring.len() > 2 * self.slots.len() + 1024 {
            let slots = &self.slots;
            self.ring.retain(|u| slots.contains_key(u));
        }
    }

    /// Forgets uncommitted changes (after a failed write, the events are replayed instead).
    pub fn discard_dirty(&mut self) {
        self.dirty_bytes = 0;
        for u in self.dirty.drain(..) {
            if let Some(slot) = self.slots.remove(&u) {
                self.bytes -= slot.bytes;
            }
        }
    }

    /// Drops every cached user (e.g. on partition revocation: memory goes back).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.dirty.clear();
        self.dirty_bytes = 0;
        self.ring.clear();
        self.bytes = 0;
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

    fn touch(cache: &mut ProjectionCache, store: &Store, u: &str) {
        cache
            .update(store, u, |s| Ok::<_, ()>(s.balance_g += 1))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn eviction_keeps_the_recently_used_users() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(8);
        for i in 0..8 {
            touch(&mut cache, &store, &format!("u{i}"));
        }
        cache.commit(&store, [], &[]).unwrap();
        assert_eq!(cache.len(), 8);
        // u0..u2 are used again; u3..u7 are not.
        for u in ["u0", "u1", "u2"] {
            touch(&mut cache, &store, u);
        }
        touch(&mut cache, &store, "u8");
        touch(&mut cache, &store, "u9");
        cache.commit(&store, [], &[]).unwrap();
        // Over capacity: down to 6, the oldest not used again go first.
        assert_eq!(cache.len(), 6);
        for u in ["u0", "u1", "u2", "u7", "u8", "u9"] {
            assert!(cache.peek(u).is_some(), "{u} was evicted");
        }
        for u in ["u3", "u4", "u5", "u6"] {
            assert!(cache.peek(u).is_none(), "{u} was kept");
        }
        // A scan over many cold users does not push out a user in use throughout.
        for i in 0..100 {
            touch(&mut cache, &store, "u0");
            touch(&mut cache, &store, &format!("cold{i}"));
            cache.commit(&store, [], &[]).unwrap();
        }
        assert!(cache.peek("u0").is_some());
        assert!(cache.len() <= 8);
        assert_eq!(store.get_user("u0").unwrap().unwrap().balance_g, 102);
    }

    #[test]
    fn the_byte_bound_evicts_before_the_user_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let one = estimate_bytes(&UserState::new("u00"));
        // Room for ten users by bytes, a million by count.
        let mut cache = ProjectionCache::with_bounds(1_000_000, 10 * one);
        for i in 0..50 {
            touch(&mut cache, &store, &format!("u{i:02}"));
        }
        assert_eq!(cache.len(), 50, "a batch keeps every user it touched");
        cache.commit(&store, [], &[]).unwrap();
        assert!(cache.bytes() <= 10 * one / 4 * 3, "{} bytes", cache.bytes());
        assert!(cache.len() <= 7 && cache.len() >= 5, "{}", cache.len());
        let expected: usize = (0..50)
            .map(|i| format!("u{i:02}"))
            .filter_map(|u| cache.peek(&u).map(estimate_bytes))
            .sum();
        assert_eq!(
            cache.bytes(),
            expected,
            "the running total matches the slots"
        );
        // Evicted users are intact in the store.
        assert_eq!(store.get_user("u00").unwrap().unwrap().balance_g, 1);
        cache.clear();
        assert_eq!(cache.bytes(), 0);
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

    /// Split writes: users of a prepared batch stay cached until it is durable (the store
    /// still has their old state), dirty users are never evicted, and a failed write forgets
    /// exactly what the store does not hold.
    #[test]
    fn users_of_a_batch_not_yet_durable_are_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(4);
        for i in 0..8 {
            touch(&mut cache, &store, &format!("u{i}"));
        }
        let (first, t1) = cache.prepare(&store, [], &[]).unwrap();
        // The next batch is folded while the first is "being written": three new users and
        // one of the first batch's.
        for u in ["n0", "n1", "n2", "u0"] {
            touch(&mut cache, &store, u);
        }
        let (second, t2) = cache.prepare(&store, [], &[]).unwrap();
        touch(&mut cache, &store, "d0");
        store.write_prepared(first).unwrap();
        cache.durable(t1);
        // Over the bound of 4, but the second batch's users (not durable) and the dirty one
        // stay; only the first batch's others may go.
        for u in ["n0", "n1", "n2", "u0", "d0"] {
            assert!(
                cache.peek(u).is_some(),
                "{u} was evicted before it was durable"
            );
        }
        assert_eq!(cache.len(), 5, "the first batch's other users are evicted");
        assert_eq!(cache.peek("u0").unwrap().balance_g, 2);
        assert_eq!(store.get_user("u0").unwrap().unwrap().balance_g, 1);
        // A failed second write: its users and the dirty one are dropped, so the next read
        // comes from the store.
        drop(second);
        cache.forget_undurable();
        for u in ["n0", "n1", "n2", "u0", "d0"] {
            assert!(cache.peek(u).is_none(), "{u} kept after a failed write");
        }
        let b = cache
            .update(&store, "u0", |s| Ok::<_, ()>(s.balance_g))
            .unwrap();
        assert_eq!(b, Ok(1));
        let _ = t2;
    }
}
