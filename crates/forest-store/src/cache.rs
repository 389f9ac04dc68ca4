//! A write-back cache of projections in front of the [`Store`].

use crate::slot_map::{self, Keyed, SlotMap, hash};
use crate::{NO_POSITION, OutboxEntry, Position, Store, StoreError};
use compact_str::CompactString;
use forest_domain::UserState;
use std::collections::VecDeque;

struct Slot {
    /// The user id the slot is found by (the map keeps only its hash).
    key: Key,
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
    /// The input partition of the user's last update (its position is that partition's).
    partition: i32,
    /// The input position the stored state reflects (as loaded or last written).
    position: Position,
    /// While dirty: the ticket of the batch in which it became dirty.
    since: u64,
}

impl Keyed for Slot {
    #[inline]
    fn key(&self) -> &str {
        self.key.as_str()
    }
}

/// Starts loading every cache line of `slot`.
#[inline]
fn prefetch_slot(slot: &Slot) {
    forest_domain::prefetch_lines(std::ptr::from_ref(slot).cast(), std::mem::size_of::<Slot>());
}

/// The slot a dirty-queue entry `(user_id, since)` stands for, if the entry is not stale: the
/// user is still dirty since that batch (see `ProjectionCache::dirty`).
#[inline]
fn queued_slot<'a>(slots: &'a SlotMap<Slot>, user_id: &Key, since: u64) -> Option<&'a Slot> {
    slots
        .get(hash(user_id), user_id)
        .filter(|s| s.dirty && s.since == since)
}

/// How many users ahead [`ProjectionCache::prepare_flush`] starts loading a queued user's
/// map bucket as it scans the dirty queue, and a written user's slot as it serialises them
/// (and half as far ahead, its heap parts). Public for `forest bench`'s durable floor, which
/// prepares its writes the same way.
pub const WRITE_AHEAD: usize = 16;

/// Estimated memory of a cached projection: the slot (with its key), the map's bucket, the
/// ring's and dirty queue's copies of the key, the projection's own id if too long to be
/// inline, and the heap behind the state's collections (by capacity). An estimate from the
/// public shape of [`UserState`], not an allocator count: private derived indexes (the
/// dedupe id index) are counted as one more entry's worth per remembered id. Computed at
/// commit and load, never per event.
pub fn estimate_bytes(s: &UserState) -> usize {
    use std::mem::size_of;
    // The map's 16-byte bucket (hash and box pointer) at its load factor (at most 3/4, and
    // 3/8 just after a doubling; the table never shrinks), and the ring's and dirty queue's
    // inline copies of the key (the slot's own is in the slot); an id too long to be inline
    // has its three copies on the heap.
    const MAP_ENTRY: usize = 32 + 2 * size_of::<Key>();
    let spilled = if s.user_id.len() > size_of::<Key>() {
        3 * s.user_id.len()
    } else {
        0
    };
    size_of::<Slot>()
        + MAP_ENTRY
        // The projection's own id is inline in the slot unless it is too long.
        + if s.user_id.is_heap_allocated() { s.user_id.capacity() } else { 0 }
        + spilled
        + s.species.as_ref().map_or(0, String::capacity)
        + s.counters.capacity() * size_of::<forest_domain::Counter>()
        + s.recent_ids.capacity() * 2 * size_of::<(i64, u64)>()
        // A note's rule is the process's interned pair, not the projection's.
        + s.recent_credits.capacity() * size_of::<forest_domain::CreditNote>()
        + s.day_quantities.capacity() * size_of::<forest_domain::DayQuantity>()
}

/// A user id as the cache keeps it: inline up to 24 bytes (ids are far shorter), so the
/// map's key compare reads the slot it finds (already prefetched on the fold path) instead
/// of a further heap object, and the dirty queue and the eviction ring, which hold a copy
/// per user, allocate nothing.
/// Why: at 1 M users each of those heap keys was a miss to memory (the compare in every
/// lookup was most of the processor's `memcmp`, 7.5 % of a profile's samples), one
/// allocation per new or newly dirty user, and the commit's sort of the dirty ids chased a
/// pointer per compare.
type Key = CompactString;

/// How far below its bounds a trim takes the cache: 1/1024 of each (at least one user or
/// byte), so a trim evicts that plus what the batches since the last one brought in. Why so
/// little: eviction runs on the worker that folds (walking the ring and freeing the evicted
/// users' states), and a large trim stops the fold for all of it. Until session 25 a trim
/// went down to 3/4 of the bound, so that it ran once per many batches: a quarter
/// of the cache at once. At the processor's default bounds (1 M users, 1 GiB) and 1 M Zipf
/// users, the worker then spent about 0.4 CPU-s trimming every 4-5 M events, the
/// slowest seconds of the latency runs at 100-150 K events/s on one core (BENCHMARKS.md,
/// session 25). A small trim also keeps the cache near its bound instead of swinging
/// between 3/4 and full: fewer reloads from the store, and on average more memory in use
/// (the peak is the same).
pub const TRIM_SLACK: usize = 1024;

/// Hot users' projections in memory. Reads fall through to RocksDB on a miss; writes stay in
/// memory until [`ProjectionCache::commit`], which writes every dirty user ONCE together with
/// the batch's offsets and outbox entries. Between commits the cache may hold state newer than
/// the store; that state is exactly what the uncommitted events produced, so dropping the cache
/// (a crash) and replaying from the stored offsets reproduces it.
///
/// A caller may also write only some dirty users per batch ([`ProjectionCache::prepare_flush`],
/// oldest dirty first, each stored with the input position it reflects), if it keeps what
/// rebuilds the others (the processor's replay records); [`ProjectionCache::update_at`] then
/// skips a replayed record the stored projection holds already.
///
/// Writes may be split in two ([`ProjectionCache::prepare`] on the folding thread,
/// [`Store::write_prepared`] on another, then [`ProjectionCache::durable`]): until a prepared
/// write is durable, its users stay cached however full the cache is.
///
/// Memory: after a commit at most `capacity` users, and at most `max_bytes` estimated bytes
/// ([`estimate_bytes`]), stay cached; beyond either, clean users are evicted to just below
/// the bound ([`TRIM_SLACK`]), so each trim evicts about what the batches since the last one
/// brought in. A batch can temporarily hold more (every user it touched is kept until it is
/// written).
///
/// Eviction is CLOCK (second chance), an approximation of least-recently-used that costs
/// one boolean store per hit on the fold path: users sit in a ring in load order; the hand
/// evicts the first user not used since it last passed and gives the others a second
/// chance. Users touched again since they were loaded (the hot ones) outlive those touched
/// once (a scan over many cold users), which evicting in hash order did not guarantee.
pub struct ProjectionCache {
    /// Boxed: a slot is a few hundred bytes, and a map of inline slots moved every cached
    /// projection on each doubling while it filled (at 1 M users, the rehash's copy into
    /// fresh pages was 12.7 % of a profile's samples), and left about half its buckets' bytes
    /// empty. A boxed slot never moves; the map holds the key's hash and a pointer, and the
    /// key is in the slot.
    slots: SlotMap<Slot>,
    capacity: usize,
    max_bytes: usize,
    /// Sum of the slots' `bytes`.
    bytes: usize,
    /// Dirty users in the order they became dirty, with that batch's ticket (the slot's
    /// `since`). An entry whose slot is no longer dirty with that `since` is stale and skipped.
    dirty: VecDeque<(Key, u64)>,
    dirty_count: usize,
    /// Sum of the dirty users' `bytes` (see [`ProjectionCache::dirty_bytes`]).
    dirty_bytes: usize,
    /// CLOCK's ring: cached users in load order; the front is under the hand. May hold ids
    /// no longer cached (dropped by `discard_dirty`), skipped when the hand reaches them.
    ring: VecDeque<Key>,
    /// The last ticket [`ProjectionCache::prepare`] handed out, and the highest one whose
    /// write is durable.
    prepared: u64,
    durable: u64,
}

/// Which dirty users a batch writes (see [`ProjectionCache::prepare_flush`]).
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    /// Users dirty since a batch whose ticket is below this.
    pub before: u64,
    /// And then more, oldest first, until at most this many stay dirty.
    pub max_dirty: usize,
}

impl Flush {
    /// Every dirty user.
    pub const ALL: Flush = Flush {
        before: u64::MAX,
        max_dirty: 0,
    };
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
            slots: SlotMap::default(),
            capacity,
            max_bytes,
            bytes: 0,
            dirty: VecDeque::new(),
            dirty_count: 0,
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
        let out = self.update_at(store, user_id, hash(user_id), 0, None, f)?;
        Ok(out.expect("only a replayed record is skipped"))
    }

    /// [`ProjectionCache::update`] for a record of input `partition`. With `replay` (the
    /// record's lane and offset), the record is being folded again after a restart: if the
    /// user's stored position is past it, the stored state has it already and `f` does not
    /// run (`None`). That is exact because a replay folds a partition's records in the order
    /// they were first folded, so a stored position marks a prefix of that order.
    ///
    /// `user_hash` is [`ProjectionCache::user_hash`] of `user_id`: a caller that prefetched
    /// the user has it already, and a cached user's hash is not computed again. Correctness
    /// does not rest on it: a user not found under `user_hash` is looked for again under the
    /// hash of `user_id` before it is loaded (a miss reads RocksDB anyway), so a wrong hash
    /// costs a lookup, never a second slot for one user.
    pub fn update_at<T, E>(
        &mut self,
        store: &Store,
        user_id: &str,
        user_hash: u64,
        partition: i32,
        replay: Option<(u8, i64)>,
        f: impl FnOnce(&mut UserState) -> Result<T, E>,
    ) -> Result<Option<Result<T, E>>, StoreError> {
        let slot = match self.slots.get_mut(user_hash, user_id) {
            Some(slot) => {
                slot.referenced = true;
                slot
            }
            None => {
                let h = hash(user_id);
                if h != user_hash {
                    return self.update_at(store, user_id, h, partition, replay, f);
                }
                let (state, position) = store
                    .get_user_at(user_id)?
                    .unwrap_or_else(|| (UserState::new(user_id), NO_POSITION));
                let bytes = estimate_bytes(&state);
                self.bytes += bytes;
                self.ring.push_back(Key::from(user_id));
                self.slots.insert_new(
                    h,
                    Box::new(Slot {
                        key: Key::from(user_id),
                        state,
                        dirty: false,
                        referenced: false,
                        bytes,
                        ticket: 0,
                        partition,
                        position,
                        since: 0,
                    }),
                )
            }
        };
        slot.partition = partition;
        if let Some((lane, offset)) = replay {
            if slot
                .position
                .get(lane as usize)
                .is_some_and(|&p| p > offset)
            {
                return Ok(None);
            }
        }
        let out = f(&mut slot.state);
        if out.is_ok() && !slot.dirty {
            slot.dirty = true;
            slot.since = self.prepared + 1;
            self.dirty.push_back((Key::from(user_id), slot.since));
            self.dirty_count += 1;
            self.dirty_bytes += slot.bytes;
        }
        Ok(Some(out))
    }

    /// Starts loading the cache entry of a user (its map slot and projection) into the CPU
    /// cache, if the user is cached; changes nothing. Why: at 100 K users and more, finding a
    /// user's entry is a miss to memory on every event, and the fold waits for it (the map
    /// lookup and its key compare were 12-14 % of a worker's samples in session 11). A caller
    /// that calls this for the next few users of a batch before folding them has those misses
    /// overlap, instead of following one another. The lookup itself reads the user's map
    /// bucket: call [`ProjectionCache::prefetch_entry`] a few records earlier still, or it
    /// waits for that.
    ///
    /// Takes the user's [`ProjectionCache::user_hash`], not the id: the caller hashes each
    /// record's key once for all the prefetch stages and the fold.
    pub fn prefetch(&self, user_hash: u64) {
        // By hash alone: comparing the key would wait for the slot being prefetched.
        if let Some(slot) = self.slots.get_by_hash(user_hash) {
            prefetch_slot(slot);
        }
    }

    /// The hash the cache finds `user_id` by, from its bytes (UTF-8 or not: a record's key
    /// can be hashed before it is checked, and a key that is no user id is only a useless
    /// prefetch). The same for a `&str` id and its bytes.
    #[inline]
    pub fn user_hash(user_id: &[u8]) -> u64 {
        slot_map::hash_bytes(user_id)
    }

    /// Starts loading the map bucket where the user's entry is (or would be), changing
    /// nothing: for a caller that will call [`ProjectionCache::prefetch`] for the same user a
    /// few records later, so that that lookup finds its bucket loaded instead of waiting for
    /// it (see the `slot_map` module).
    #[inline]
    pub fn prefetch_entry(&self, user_hash: u64) {
        self.slots.prefetch(user_hash);
    }

    /// Starts loading the heap parts of the user's cached projection (see
    /// [`UserState::prefetch_stored_parts`]), if cached; changes nothing. For a caller that
    /// called [`ProjectionCache::prefetch`] for the user a few records earlier: the entry is
    /// loaded by now, and the fold's next misses (its ids, counters and credits) are started
    /// before the fold waits on them one by one. (Before session 22 the state's user id was
    /// a heap part too: at 100 K users its compare alone was 4 % of a worker's samples. It
    /// is inline in the slot now, unless too long.)
    pub fn prefetch_parts(&self, user_hash: u64) {
        // By hash alone, as `prefetch`: a hint needs no key compare (another user with the
        // same hash only has the wrong parts loaded).
        if let Some(slot) = self.slots.get_by_hash(user_hash) {
            slot.state.prefetch_stored_parts();
        }
    }

    /// The cached projection of a user, if cached (for tests and diagnostics).
    pub fn peek(&self, user_id: &str) -> Option<&UserState> {
        self.slots.get(hash(user_id), user_id).map(|s| &s.state)
    }

    /// The dirty users' states: what the next full flush will write (the changelog mirrors
    /// them).
    pub fn dirty_states(&self) -> impl Iterator<Item = &UserState> {
        self.dirty
            .iter()
            .filter_map(|(u, since)| queued_slot(&self.slots, u, *since))
            .map(|s| &s.state)
    }

    pub fn dirty_len(&self) -> usize {
        self.dirty_count
    }

    /// Estimated bytes (see [`estimate_bytes`]) of the dirty users, as of their last write or
    /// load: what a caller deferring writes weighs against the cache's bounds.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }

    /// The ticket of the batch being filled: users that become dirty now carry it.
    pub fn next_ticket(&self) -> u64 {
        self.prepared + 1
    }

    /// The ticket of the batch in which the longest-dirty user became dirty (`None`: none
    /// is dirty). Every user dirtied in an earlier batch has been written since.
    pub fn oldest_dirty(&mut self) -> Option<u64> {
        while let Some((u, since)) = self.dirty.front() {
            if queued_slot(&self.slots, u, *since).is_some() {
                return Some(*since);
            }
            self.dirty.pop_front();
        }
        None
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Writes every dirty user once, with the batch's next offsets and outbox entries, in one
    /// atomic batch; then trims the cache to its bounds. Returns the outbox sequence numbers
    /// assigned. Tickets must be written and reported durable in order.
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

    /// The first half of [`ProjectionCache::commit`]: serialises every dirty user with the
    /// offsets and outbox entries, and marks them clean. Returns the batch to write and its
    /// ticket, which [`ProjectionCache::durable`] takes once the write succeeded. Tickets must
    /// be written and reported durable in order. Positions are not tracked
    /// ([`NO_POSITION`]).
    pub fn prepare<'o>(
        &mut self,
        store: &Store,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<(crate::PreparedBatch, u64), StoreError> {
        let (prepared, ticket, _) =
            self.prepare_flush(store, Flush::ALL, |_| NO_POSITION, offsets, outbox)?;
        Ok((prepared, ticket))
    }

    /// [`ProjectionCache::prepare`] writing only the users `flush` selects, oldest dirty
    /// first, each with `position(its partition)`; the others stay dirty (so they are neither
    /// evicted nor forgotten) for a later batch. For a caller that keeps in the same batch
    /// what rebuilds them after a crash (the processor's replay records). Also returns how
    /// many users it writes.
    pub fn prepare_flush<'o>(
        &mut self,
        store: &Store,
        flush: Flush,
        position: impl Fn(i32) -> Position,
        offsets: impl IntoIterator<Item = (&'o str, i32, i64)>,
        outbox: &[OutboxEntry],
    ) -> Result<(crate::PreparedBatch, u64, usize), StoreError> {
        // Each taken user's slot is found once, as the queue is checked for stale entries,
        // and serialised from that reference: at 1 M users every lookup is a miss to memory,
        // and this one used to be repeated to serialise the user.
        let slots = &self.slots;
        let mut taken: Vec<(Key, u64, &Slot)> = Vec::new();
        // The map buckets of the users WRITE_AHEAD places on in the queue start loading first.
        for (u, _) in self.dirty.iter().take(WRITE_AHEAD) {
            slots.prefetch(hash(u));
        }
        while let Some((u, since)) = self.dirty.front() {
            if let Some((ahead, _)) = self.dirty.get(WRITE_AHEAD) {
                slots.prefetch(hash(ahead));
            }
            let Some(slot) = queued_slot(slots, u, *since) else {
                self.dirty.pop_front(); // stale: written or dropped since
                continue;
            };
            if *since >= flush.before && self.dirty_count - taken.len() <= flush.max_dirty {
                break;
            }
            if let Some((u, since)) = self.dirty.pop_front() {
                taken.push((u, since, slot));
            }
        }
        // Key order: the memtable's skip list then finds each insert near the previous one.
        taken.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Serialised loading a few users ahead: each one's slot 16 users ahead, its heap
        // parts 8 ahead. Why: at 1 M users a written user was last touched up to an interval
        // ago and is out of the CPU's caches; serialising waited on its slot and then on
        // each of its parts in turn.
        let states = taken.iter().enumerate().map(|(i, (_, _, s))| {
            if let Some((_, _, ahead)) = taken.get(i + WRITE_AHEAD) {
                prefetch_slot(ahead);
            }
            if let Some((_, _, ahead)) = taken.get(i + WRITE_AHEAD / 2) {
                ahead.state.prefetch_stored_parts();
            }
            (&s.state, position(s.partition))
        });
        let prepared = store.prepare(states, offsets, outbox);
        let taken: Vec<(Key, u64)> = taken.into_iter().map(|(u, since, _)| (u, since)).collect();
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Still dirty: back in the queue (its order only matters to the caller's
                // replay bookkeeping, which a failed batch ends anyway).
                for entry in taken.into_iter().rev() {
                    self.dirty.push_front(entry);
                }
                return Err(e);
            }
        };
        self.prepared += 1;
        let ticket = self.prepared;
        for (u, _) in &taken {
            if let Some(s) = self.slots.get_mut(hash(u), u) {
                s.dirty = false;
                s.ticket = ticket;
                s.position = position(s.partition);
                self.dirty_bytes = self.dirty_bytes.saturating_sub(s.bytes);
                let b = estimate_bytes(&s.state);
                self.bytes = self.bytes - s.bytes + b;
                s.bytes = b;
            }
        }
        self.dirty_count -= taken.len();
        Ok((prepared, ticket, taken.len()))
    }

    /// The prepared batch `ticket` (and every one before it) is durable: its users may be
    /// evicted again, and the cache is trimmed to its bounds.
    pub fn durable(&mut self, ticket: u64) {
        self.durable = self.durable.max(ticket);
        if self.slots.len() > self.capacity || self.bytes > self.max_bytes {
            let below = |bound: usize| bound.saturating_sub((bound / TRIM_SLACK).max(1));
            self.evict(below(self.capacity), below(self.max_bytes));
        }
    }

    /// A prepared write failed (or will never be written): drops every user whose cached
    /// state is not durably stored (dirty, or prepared but not durable), so their next use
    /// reads what the store holds.
    pub fn forget_undurable(&mut self) {
        let durable = self.durable;
        let mut freed = 0;
        self.slots.retain(|s| {
            let keep = !s.dirty && s.ticket <= durable;
            if !keep {
                freed += s.bytes;
            }
            keep
        });
        self.bytes -= freed;
        self.dirty.clear();
        self.dirty_count = 0;
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
            let h = hash(&u);
            let Some(slot) = self.slots.get_mut(h, &u) else {
                continue; // dropped by discard_dirty
            };
            if slot.dirty || slot.ticket > self.durable {
                self.ring.push_back(u);
            } else if slot.referenced {
                slot.referenced = false;
                self.ring.push_back(u);
            } else if let Some(slot) = self.slots.remove(h, &u) {
                self.bytes -= slot.bytes;
            }
        }
        // Ids of discarded users pile up only after failed writes; drop them when they
        // outnumber the cached users.
        if self.ring.len() > 2 * self.slots.len() + 1024 {
            let slots = &self.slots;
            self.ring.retain(|u| slots.contains(hash(u), u));
        }
    }

    /// Drops every dirty user (a failed batch): the next update reloads what the store holds.
    pub fn discard_dirty(&mut self) {
        let mut freed = 0;
        self.slots.retain(|s| {
            if s.dirty {
                freed += s.bytes;
            }
            !s.dirty
        });
        self.bytes -= freed;
        self.dirty.clear();
        self.dirty_count = 0;
        self.dirty_bytes = 0;
    }

    /// Empties the cache (partitions revoked: another worker may change these users).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.dirty.clear();
        self.dirty_count = 0;
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

    /// User ids past the inline keys' 24 bytes spill to the heap: they must be found,
    /// written and counted the same way.
    #[test]
    fn user_ids_too_long_to_be_inline_behave_like_short_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(100);
        let long = "u".repeat(100);
        let ids = ["short", "exactly-24-bytes-long-id", long.as_str()];
        for round in 0..3u64 {
            for id in ids {
                cache
                    .update(&store, id, |s| {
                        s.balance_g += 1 + round;
                        Ok::<_, ()>(())
                    })
                    .unwrap()
                    .unwrap();
            }
        }
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.dirty_len(), 3);
        let long_bytes = estimate_bytes(cache.peek(&long).unwrap());
        let short_bytes = estimate_bytes(cache.peek("short").unwrap());
        assert!(
            long_bytes >= short_bytes + 3 * 100,
            "a spilled id's heap copies are counted: {long_bytes} vs {short_bytes}"
        );
        cache.commit(&store, [("t", 0, 3)], &[]).unwrap();
        assert_eq!(cache.dirty_len(), 0);
        for id in ids {
            assert_eq!(cache.peek(id).unwrap().balance_g, 6, "{id}");
            assert_eq!(store.get_user(id).unwrap().unwrap().balance_g, 6, "{id}");
        }
    }

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
    fn a_wrong_user_hash_finds_the_same_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(100);
        let bump = |s: &mut UserState| {
            s.balance_g += 1;
            Ok::<_, ()>(())
        };
        cache
            .update_at(&store, "a", hash("a"), 0, None, bump)
            .unwrap();
        // A new user under a wrong hash, then a cached one: each still one slot.
        cache
            .update_at(&store, "b", hash("a"), 0, None, bump)
            .unwrap();
        cache
            .update_at(&store, "a", hash("b"), 0, None, bump)
            .unwrap();
        cache.update_at(&store, "b", 7, 0, None, bump).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.peek("a").map(|s| s.balance_g), Some(2));
        assert_eq!(cache.peek("b").map(|s| s.balance_g), Some(2));
    }

    #[test]
    fn a_replayed_record_below_the_stored_position_is_skipped_and_flushes_take_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(100);
        let bump = |s: &mut UserState| Ok::<_, ()>(s.balance_g += 1);
        // Batch 1 changes a (partition 3) and b; batch 2 changes b and c.
        for u in ["a", "b"] {
            cache.update_at(&store, u, hash(u), 3, None, bump).unwrap();
        }
        let flush = |cache: &mut ProjectionCache, before, max_dirty, pos: fn(i32) -> Position| {
            cache
                .prepare_flush(&store, Flush { before, max_dirty }, pos, [], &[])
                .unwrap()
        };
        let (p, t1, n) = flush(&mut cache, 0, usize::MAX, |_| NO_POSITION);
        assert_eq!(
            (n, cache.dirty_len(), cache.oldest_dirty()),
            (0, 2, Some(1))
        );
        store.write_prepared(p).unwrap();
        cache.durable(t1);
        for u in ["b", "c"] {
            cache.update_at(&store, u, hash(u), 3, None, bump).unwrap();
        }
        // Batch 2 writes the users dirty since batch 1, at partition 3's position then.
        let (p, t2, n) = flush(&mut cache, 2, usize::MAX, |p| [p as i64 * 10, 5, -2]);
        assert_eq!(
            (n, cache.dirty_len(), cache.oldest_dirty()),
            (2, 1, Some(2))
        );
        store.write_prepared(p).unwrap();
        cache.durable(t2);
        assert_eq!(
            store
                .get_user_at("b")
                .unwrap()
                .map(|(s, pos)| (s.balance_g, pos)),
            Some((2, [30, 5, -2]))
        );
        assert_eq!(store.get_user("c").unwrap(), None, "c waits");
        // After a restart: a record of lane 1 below b's position is in its state already;
        // one at or past it is not.
        let mut cache = ProjectionCache::new(100);
        assert_eq!(
            cache
                .update_at(&store, "b", hash("b"), 3, Some((1, 4)), bump)
                .unwrap(),
            None
        );
        assert_eq!(
            cache
                .update_at(&store, "b", hash("b"), 3, Some((0, 30)), bump)
                .unwrap(),
            Some(Ok(()))
        );
        assert_eq!(
            cache
                .update_at(&store, "c", hash("c"), 3, Some((0, 0)), bump)
                .unwrap(),
            Some(Ok(()))
        );
        assert_eq!(cache.peek("b").map(|s| s.balance_g), Some(3));
        // Over the bound on dirty users, the oldest go first.
        let (_, _, n) = flush(&mut cache, 0, 1, |_| NO_POSITION);
        assert_eq!((n, cache.dirty_len()), (1, 1));
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
        // Over capacity: down to 7 (one below the bound), the oldest not used again go first.
        assert_eq!(cache.len(), 7);
        for u in ["u0", "u1", "u2", "u6", "u7", "u8", "u9"] {
            assert!(cache.peek(u).is_some(), "{u} was evicted");
        }
        for u in ["u3", "u4", "u5"] {
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
    fn a_cache_bounded_at_zero_users_keeps_none_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
        let mut cache = ProjectionCache::new(0);
        touch(&mut cache, &store, "a");
        cache.commit(&store, [], &[]).unwrap();
        assert_eq!(cache.len(), 0);
        assert_eq!(store.get_user("a").unwrap().unwrap().balance_g, 1);
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
        // Trimmed to just below the bound: one more cached user would not fit under it.
        let below = 10 * one - (10 * one / TRIM_SLACK).max(1);
        let kept: Vec<usize> = (0..50)
            .map(|i| format!("u{i:02}"))
            .filter_map(|u| cache.peek(&u).map(estimate_bytes))
            .collect();
        let biggest = kept.iter().copied().max().unwrap();
        assert!(cache.bytes() <= below, "{} bytes", cache.bytes());
        assert!(cache.bytes() + biggest > below, "{} bytes", cache.bytes());
        assert!(cache.len() < 10 && cache.len() >= 5, "{}", cache.len());
        let expected: usize = kept.iter().sum();
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
