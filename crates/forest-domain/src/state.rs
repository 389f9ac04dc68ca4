//! The per-user projection and the fold that updates it.

use crate::Behaviour;
use crate::event::{Action, Event, Tally};
use crate::rejection::{Malformed, Rejection};
use crate::rules::{Cap, CapLimit, CapPeriod, QuantityScope, Rule, RuleSet};
use chrono::{Datelike, Offset, TimeZone};
use chrono_tz::Tz;
use compact_str::CompactString;
use forest_proto::v1::TreeMatured;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::VecDeque;

const DAY_MS: i64 = 86_400_000;
/// Below this many remembered ids a linear scan beats hashing; above it an index is built.
const INDEX_THRESHOLD: usize = 32;
/// Caps per rule whose counter positions the fold remembers between checking and updating.
const MAX_CAPS_REMEMBERED: usize = 4;

/// A calendar bucket in the user's timezone. Days count from 0001-01-01 (chrono's CE days);
/// months are `year * 12 + month0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Bucket {
    Day(i32),
    Month(i32),
}

impl Bucket {
    fn period(self) -> CapPeriod {
        match self {
            Self::Day(_) => CapPeriod::Day,
            Self::Month(_) => CapPeriod::Month,
        }
    }
}

/// Credited events and grams of one behaviour in one bucket: what the caps need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub behaviour: Behaviour,
    pub bucket: Bucket,
    pub events: u32,
    pub grams: u64,
}

/// The quantity of one behaviour on one local day, for a rule whose `quantity_scope` is `day`
/// (walking by default): see [`crate::QuantityScope::Day`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayQuantity {
    pub behaviour: Behaviour,
    /// Local day, as in [`Bucket::Day`].
    pub day: i32,
    /// Sum of the day's accepted `Tally::Add` reports (intervals).
    pub added: i64,
    /// Largest accepted `Tally::DayTotal` report (the day's cumulative total).
    pub day_total: i64,
}

impl DayQuantity {
    /// The day's quantity: both kinds of report count the same steps, so the larger view wins
    /// (`max` and `+` commute, so the order of the day's reports does not change it).
    pub fn quantity(&self) -> i64 {
        self.added.max(self.day_total)
    }
}

/// Cached values derived from other fields: never serialised, never compared.
#[derive(Debug, Clone, Default)]
struct Derived<T>(T);
impl<T> PartialEq for Derived<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Derived<T> {}

/// The UTC span of one local day and its (day, month) buckets, so most events skip the
/// timezone lookup. Only days whose UTC offset is the same all day (no DST switch inside) are
/// cached.
#[derive(Debug, Clone, Copy, Default)]
struct DayCache {
    tz: Option<Tz>,
    /// The day ends `DAY_MS` later (only days without a DST switch are cached).
    start_ms: i64,
    day: i32,
    month: i32,
}

impl DayCache {
    const EMPTY: Self = Self {
        tz: None,
        start_ms: 0,
        day: 0,
        month: 0,
    };

    fn get(&self, tz: Tz, ms: i64) -> Option<(i32, i32)> {
        // Not `ms - start_ms`: that overflows for an event time near `i64::MAX` when the
        // cached day starts before 1970 UTC. A cached start is a calendar instant, far from
        // the limits, so the addition cannot overflow (saturating all the same).
        (self.tz == Some(tz) && ms >= self.start_ms && ms < self.start_ms.saturating_add(DAY_MS))
            .then_some((self.day, self.month))
    }
}

/// Local (day, month) of `ms` in `tz`, `None` if it cannot be placed on a calendar; with the
/// local day's span when it may be cached.
fn day_of(tz: Tz, ms: i64) -> Option<((i32, i32), Option<DayCache>)> {
    let offset_at = |t: i64| -> Option<i64> {
        let utc = chrono::DateTime::from_timestamp_millis(t)?.naive_utc();
        Some(i64::from(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc()) * 1000)
    };
    let offset = offset_at(ms)?;
    let local_ms = ms.checked_add(offset)?;
    let date = chrono::DateTime::from_timestamp_millis(local_ms)?.date_naive();
    let day = date.num_days_from_ce();
    let month = date.year() * 12 + date.month0() as i32;
    // Cache the day only if the UTC offset is the same all day (no DST switch inside it).
    let start_ms = local_ms - local_ms.rem_euclid(DAY_MS) - offset;
    let end_ms = start_ms + DAY_MS;
    let span = (offset_at(start_ms) == Some(offset) && offset_at(end_ms - 1) == Some(offset))
        .then_some(DayCache {
            tz: Some(tz),
            start_ms,
            day,
            month,
        });
    Some(((day, month), span))
}

/// Slots of the per-thread memo of local days (a power of two).
const SHARED_DAYS: usize = 16;

thread_local! {
    /// Local days this thread looked up recently, for any user: new and rarely active users,
    /// late events and counter pruning find their day here instead of in chrono-tz. A memo of
    /// the pure function [`day_of`], so it cannot change a result. Direct-mapped by UTC day and
    /// timezone.
    static SHARED: [Cell<DayCache>; SHARED_DAYS] =
        const { [const { Cell::new(DayCache::EMPTY) }; SHARED_DAYS] };
}

/// [`day_of`] through the per-thread memo.
fn shared_day_of(tz: Tz, ms: i64) -> Option<((i32, i32), Option<DayCache>)> {
    let slot = (ms.div_euclid(DAY_MS) as u64 ^ (tz as u64).wrapping_mul(0x9E37_79B9)) as usize
        % SHARED_DAYS;
    let cached = SHARED.with(|days| days[slot].get());
    if let Some(b) = cached.get(tz, ms) {
        return Some((b, Some(cached)));
    }
    let found = day_of(tz, ms)?;
    if let Some(span) = found.1 {
        SHARED.with(|days| days[slot].set(span));
    }
    Some(found)
}

/// Asks the CPU to load the cache line at `p`; it does not wait for it. The one place that
/// issues the instruction; the helpers below are ways to name the address.
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that reads nothing and never faults, whatever the address
    // (`unsafe` is needed before Rust 1.87, the workspace's MSRV is 1.85).
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the CPU to load `p`'s cache line; it does not wait for it.
#[inline(always)]
fn prefetch<T>(p: &T) {
    prefetch_line(std::ptr::from_ref(p).cast());
}

/// [`prefetch`] of a raw address, which may be an empty collection's dangling one: a prefetch
/// never faults, whatever the address.
#[inline(always)]
fn prefetch_raw<T>(p: *const T) {
    prefetch_line(p.cast());
}

/// Starts loading every cache line the `len` bytes at `p` overlap (at least the first), and
/// waits for none of them. A hint for code that knows which memory it reads next (the fold's
/// and the writer's look-ahead, the next records' bytes): misses started early overlap.
/// Safe whatever the address: a prefetch reads nothing and never faults.
#[inline(always)]
pub fn prefetch_lines(p: *const u8, len: usize) {
    // From the start of `p`'s line, so a block that is not 64-byte aligned gets its last line
    // too; `wrapping_*` compute addresses without asserting they are in bounds.
    let skew = p.addr() & 63;
    let line = p.wrapping_sub(skew);
    for offset in (0..skew + len.max(1)).step_by(64) {
        prefetch_line(line.wrapping_add(offset));
    }
}

/// The set of remembered id hashes once a user has more than [`INDEX_THRESHOLD`] of them.
///
/// Open addressing with linear probing and backward-shift deletion: the dedupe window's steady
/// churn (about one insert and one remove per accepted event) leaves no tombstones behind, so
/// probes stay short and the table never needs a rehash to clean up. 0 marks an empty slot;
/// the id hash 0 is kept in a flag of its own.
#[derive(Debug, Clone)]
struct IdIndex {
    slots: Box<[u64]>,
    /// `64 - log2(slots.len())`: the shift that takes a slot number from the top bits.
    shift: u32,
    /// Non-zero hashes held.
    len: usize,
    has_zero: bool,
}

impl IdIndex {
    fn from_ids(ids: impl Iterator<Item = u64>, n: usize) -> Self {
        let mut ix = Self::with_slots((2 * n).next_power_of_two().max(64));
        for h in ids {
            ix.insert(h);
        }
        ix
    }

    fn with_slots(n: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        Self {
            slots: vec![0; n].into_boxed_slice(),
            shift: 64 - n.trailing_zeros(),
            len: 0,
            has_zero: false,
        }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// A hash's home slot. The multiply spreads ids whose xxh3 hashes differ only in some bits.
    #[inline]
    fn home(&self, h: u64) -> usize {
        (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The slot holding `h` (non-zero), or the empty slot ending its probe.
    #[inline]
    fn probe(&self, h: u64) -> (usize, bool) {
        let mask = self.mask();
        let mut i = self.home(h);
        loop {
            match self.slots[i] {
                s if s == h => return (i, true),
                0 => return (i, false),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Starts loading the slot a probe for `h` begins at.
    #[inline]
    fn prefetch(&self, h: u64) {
        if let Some(s) = self.slots.get(self.home(h)) {
            prefetch(s);
        }
    }

    fn contains(&self, h: u64) -> bool {
        if h == 0 {
            return self.has_zero;
        }
        self.probe(h).1
    }

    fn insert(&mut self, h: u64) {
        if h == 0 {
            self.has_zero = true;
            return;
        }
        // At most half full.
        if 2 * (self.len + 1) > self.slots.len() {
            let mut bigger = Self::with_slots(2 * self.slots.len());
            bigger.has_zero = self.has_zero;
            for &s in self.slots.iter().filter(|&&s| s != 0) {
                bigger.insert(s);
            }
            *self = bigger;
        }
        let (i, found) = self.probe(h);
        if !found {
            self.slots[i] = h;
            self.len += 1;
        }
    }

    fn remove(&mut self, h: u64) {
        if h == 0 {
            self.has_zero = false;
            return;
        }
        let (mut hole, found) = self.probe(h);
        if !found {
            return;
        }
        // Backward shift: pull later entries of the cluster into the hole when the hole lies
        // between their home slot and where they sit, so every probe still finds them.
        let mask = self.mask();
        let mut j = (hole + 1) & mask;
        loop {
            let s = self.slots[j];
            if s == 0 {
                break;
            }
            let home = self.home(s);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = s;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = 0;
        self.len -= 1;
    }
}

/// The projection of one user: what Forest stores per user.
///
/// Dedupe: the ids (xxh3-64 hashes) of accepted events are remembered while their event time
/// is within the grace window behind the user's newest event, and at most
/// `RuleSet::dedupe_max_ids` of them. An event older than the window is rejected as too late,
/// so it can never be credited twice either. When the count bound forces an id out early, the
/// user's `dedupe_floor_ms` rises to that id's event time and events at or before the floor are
/// rejected as too late too: the bound costs late acceptance for very busy users, never a
/// double credit. The one remaining risk is two distinct ids of one user with equal 64-bit
/// hashes inside the window (about 1 in 10^13 for 1,024 ids); the second would be taken for a
/// duplicate.
///
/// Stored (serde) as the fields below in order, with the credit notes' rules as a table of at
/// most [`RECENT_CREDITS`] (rules version, rule id) pairs after the notes, each note holding
/// its rule's index in it (see [`CreditNote::rule`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserState {
    /// Inline up to 24 bytes (the workload's ids are 12; longer ones, up to `MAX_ID_BYTES`,
    /// go to the heap), stored as a plain string. Why: as a `String` it was a heap block of
    /// its own, read by every event's user check and by the lookup of every map keyed by the
    /// projection's own id: one more cache miss per event for a user not in cache
    /// (BENCHMARKS.md, session 22: with this and the fold bench's map keyed inline, its
    /// look-ahead fold at 1 M users went from 1.4-1.5 to 1.8 M events/s).
    pub user_id: CompactString,
    /// Grams available towards the next tree.
    pub balance_g: u64,
    /// All grams ever credited.
    pub lifetime_g: u64,
    /// Grams spent on matured trees. Invariant: `lifetime_g == balance_g + spent_g`.
    pub spent_g: u64,
    pub trees_matured: u64,
    /// Chosen species id; `None` means the rules' default species.
    pub species: Option<String>,
    /// `None` means the rules' timezone.
    pub timezone: Option<Tz>,
    /// Newest accepted event time: the watermark the grace window hangs from.
    pub newest_event_ms: Option<i64>,
    /// Events at or before this time are rejected (see the type's docs).
    pub dedupe_floor_ms: Option<i64>,
    pub counters: Vec<Counter>,
    /// (event time, id hash) of accepted events, oldest accepted first. Stored compactly (see
    /// [`ids_codec`]): for a busy user this is most of the projection.
    pub recent_ids: VecDeque<(i64, u64)>,
    /// The last [`RECENT_CREDITS`] credits, oldest first: what `forest user` shows to explain
    /// a balance. Small and fixed-size, so it costs little in every stored projection.
    pub recent_credits: VecDeque<CreditNote>,
    /// Per behaviour and local day, the quantity of day-scoped rules (walking): see
    /// [`DayQuantity`]. Pruned with the cap counters, so at most about four days per behaviour.
    pub day_quantities: Vec<DayQuantity>,
    /// Boxed: only busy users have one, and inline its 32 bytes made every projection a
    /// cache line longer for the fold to load. The price is one more dependent load before a
    /// busy user's index slot can be prefetched; a busy user's projection is usually in cache.
    index: Derived<Option<Box<IdIndex>>>,
    day_cache: Derived<DayCache>,
    /// Per behaviour and cap period, where that counter was last found in `counters`: a hint,
    /// checked before use.
    counter_hints: Derived<CounterHints>,
}

const COUNTER_HINTS: usize = 2 * Behaviour::COUNT;

/// The `counter_hints` slot of a behaviour's counters of one cap period.
#[inline]
fn counter_slot(behaviour: Behaviour, period: CapPeriod) -> usize {
    2 * behaviour.index() + usize::from(period == CapPeriod::Month)
}

/// `UserState::counter_hints`: per behaviour and cap period, where in `counters` the counter of
/// the newest bucket is. The newest bucket is the one almost every event asks for, and knowing
/// it also answers "is there a counter for this bucket?" without a scan when the event's bucket
/// is newer (the first event of a behaviour on a new day): that scan over all the user's
/// counters was the fold's costliest loop. Derived from `counters`: rebuilt when first needed
/// after a load, and by the pruning pass as it moves the counters.
///
/// It also keeps the oldest day and month any counter has, so that pruning (tried whenever an
/// event opens a counter) skips its pass over the counters when none can be old enough.
#[derive(Debug, Clone)]
struct CounterHints {
    valid: bool,
    at: [u8; COUNTER_HINTS],
    /// No counter has a day (month) before this: a lower bound, exact after a rebuild.
    oldest_day: i32,
    oldest_month: i32,
}

impl CounterHints {
    /// No counter of this behaviour and period.
    const NONE: u8 = u8::MAX;
    /// The position does not fit in a hint: scan.
    const UNKNOWN: u8 = u8::MAX - 1;
}

impl Default for CounterHints {
    fn default() -> Self {
        Self {
            valid: false,
            at: [CounterHints::NONE; COUNTER_HINTS],
            oldest_day: i32::MAX,
            oldest_month: i32::MAX,
        }
    }
}

impl CounterHints {
    /// Takes a counter of `behaviour` and `bucket` at position `at` of `counters` into
    /// account: the newest of its behaviour and period so far if its bucket is newer, and the
    /// oldest bounds. (Passed by value: reading a just-written counter back from a cold cache
    /// line would wait for that line.)
    fn note(&mut self, counters: &[Counter], at: usize, behaviour: Behaviour, bucket: Bucket) {
        let number = bucket_number(bucket);
        match bucket {
            Bucket::Day(d) => self.oldest_day = self.oldest_day.min(d),
            Bucket::Month(m) => self.oldest_month = self.oldest_month.min(m),
        }
        let slot = counter_slot(behaviour, bucket.period());
        let newer = match self.at[slot] {
            Self::NONE => true,
            Self::UNKNOWN => false,
            old => counters
                .get(usize::from(old))
                .is_none_or(|o| number > bucket_number(o.bucket)),
        };
        if newer {
            self.at[slot] = u8::try_from(at)
                .ok()
                .filter(|&i| i < Self::UNKNOWN)
                .unwrap_or(Self::UNKNOWN);
        }
    }
}

/// A bucket's number within its period (day or month number), for ordering buckets of one
/// period.
#[inline]
fn bucket_number(b: Bucket) -> i32 {
    match b {
        Bucket::Day(n) | Bucket::Month(n) => n,
    }
}

/// How many credits a projection keeps for explanations.
pub const RECENT_CREDITS: usize = 5;

/// A stored credit explanation: the behaviour, the rule that credited it (under which rules
/// version), what the rule gave and what was credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditNote {
    pub event_ms: i64,
    pub behaviour: Behaviour,
    /// The rules version and rule id the credit was made under: the process's one copy of the
    /// pair (see [`crate::intern`]), so setting it is one store and a note costs no string.
    /// `None` only for a stored note whose index its projection's rule table did not hold.
    /// Stored as that index into a table of the projection's distinct pairs (one byte per
    /// note instead of two strings).
    pub rule: Option<&'static NoteRule>,
    pub raw_g: u64,
    pub credited_g: u64,
    pub limited_by: Option<NoteLimit>,
}

/// The identity of the rule behind stored credits: see [`CreditNote::rule`].
///
/// Each distinct pair exists once in the process, its strings the process's interned copies
/// (see [`crate::intern`]), shared with the [`RuleSet`] that made the credits and with every
/// projection: a note names it with a pointer, and a projection holds no strings of its own.
/// Stored as plain strings, in a table per projection (see [`UserState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct NoteRule {
    pub rules_version: &'static str,
    pub rule_id: &'static str,
}

/// [`NoteRule`] as read: the same fields, each read into its interned copy.
#[derive(Deserialize)]
#[serde(rename = "NoteRule")]
struct StoredNoteRule {
    rules_version: Interned,
    rule_id: Interned,
}

// By hand: serde's derive would tie a `&'static str` field to the input's lifetime.
impl<'de> Deserialize<'de> for NoteRule {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = StoredNoteRule::deserialize(de)?;
        Ok(Self {
            rules_version: s.rules_version.0,
            rule_id: s.rule_id.0,
        })
    }
}

/// The stored encoding of [`UserState::recent_ids`] in binary formats: one byte string holding,
/// per id, its event time as a zigzag varint of the difference from the previous id's (from 0
/// for the first), then its hash as 8 little-endian bytes. Why: a busy user keeps up to
/// `dedupe_max_ids` (1,024) ids, and at projection interval 0 the projection is
/// written after every batch that touched the user; as a sequence of postcard varints an id
/// took ~17 bytes and a generic per-element encode (a 64-bit hash is a 10-byte varint), here
/// ~11 bytes and a copy. Human-readable formats (TOML in tests) keep the plain list.
mod ids_codec {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::cell::RefCell;
    use std::collections::VecDeque;

    thread_local! {
        /// Reused across projections: the encoding is written here, then copied out once.
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    pub fn serialize<S: Serializer>(ids: &VecDeque<(i64, u64)>, ser: S) -> Result<S::Ok, S::Error> {
        if ser.is_human_readable() {
            return ids.serialize(ser);
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            let mut prev = 0i64;
            for &(t, h) in ids {
                let d = t.wrapping_sub(prev);
                let mut z = ((d << 1) ^ (d >> 63)) as u64;
                while z >= 0x80 {
                    buf.push((z as u8) | 0x80);
                    z >>= 7;
                }
                buf.push(z as u8);
                buf.extend_from_slice(&h.to_le_bytes());
                prev = t;
            }
            ser.serialize_bytes(&buf)
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<VecDeque<(i64, u64)>, D::Error> {
        if de.is_human_readable() {
            return VecDeque::deserialize(de);
        }
        de.deserialize_bytes(Ids)
    }

    struct Ids;

    impl<'de> Visitor<'de> for Ids {
        type Value = VecDeque<(i64, u64)>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("recent event ids as bytes")
        }

        fn visit_bytes<E: de::Error>(self, mut b: &[u8]) -> Result<Self::Value, E> {
            let mut ids = VecDeque::new();
            let mut prev = 0i64;
            while !b.is_empty() {
                let mut z = 0u64;
                let mut shift = 0;
                loop {
                    let (&byte, rest) = b
                        .split_first()
                        .ok_or_else(|| E::custom("recent ids: truncated time"))?;
                    b = rest;
                    if shift > 63 {
                        return Err(E::custom("recent ids: time varint too long"));
                    }
                    z |= u64::from(byte & 0x7f) << shift;
                    shift += 7;
                    if byte < 0x80 {
                        break;
                    }
                }
                let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
                let (h, rest) = b
                    .split_first_chunk::<8>()
                    .ok_or_else(|| E::custom("recent ids: truncated hash"))?;
                b = rest;
                prev = prev.wrapping_add(d);
                ids.push_back((prev, u64::from_le_bytes(*h)));
            }
            Ok(ids)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut bytes = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            self.visit_bytes(&bytes)
        }
    }
}

/// The stored encoding of a [`UserState`], as its fields were when serde derived it (so every
/// stored projection still reads): the credit notes name their rules by index into a table
/// stored after them. The table is made here from the notes' interned pairs, each distinct
/// pair once, in the order the notes first name them, and read back into those pairs (with no
/// heap block for up to [`RECENT_CREDITS`] of them): the fold itself keeps no per-user table
/// (see [`crate::intern`] for why).
mod stored {
    use super::{CreditNote, NoteRule, RECENT_CREDITS, UserState, ids_codec};
    use crate::{Behaviour, Counter, DayQuantity, NoteLimit};
    use chrono_tz::Tz;
    use compact_str::CompactString;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::{self, SerializeSeq};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::VecDeque;

    /// A [`CreditNote`] as stored.
    #[derive(Serialize, Deserialize)]
    #[serde(rename = "CreditNote")]
    struct StoredNote {
        event_ms: i64,
        behaviour: Behaviour,
        rule: u8,
        raw_g: u64,
        credited_g: u64,
        limited_by: Option<NoteLimit>,
    }

    /// The distinct rules of a projection's notes, in the order the notes first name them:
    /// the stored table. Inline for the [`RECENT_CREDITS`] notes the fold keeps; only a
    /// projection not written by the fold can need more.
    #[derive(Default)]
    struct Table {
        inline: [Option<&'static NoteRule>; RECENT_CREDITS],
        more: Vec<&'static NoteRule>,
    }

    impl Table {
        fn of(notes: &VecDeque<CreditNote>) -> Self {
            let mut t = Self::default();
            for r in notes.iter().filter_map(|n| n.rule) {
                if t.index_of(r).is_none() {
                    t.push(r);
                }
            }
            t
        }

        fn push(&mut self, r: &'static NoteRule) {
            match self.inline.iter_mut().find(|e| e.is_none()) {
                Some(e) => *e = Some(r),
                None => self.more.push(r),
            }
        }

        fn iter(&self) -> impl Iterator<Item = &'static NoteRule> + '_ {
            self.inline
                .iter()
                .map_while(|e| *e)
                .chain(self.more.iter().copied())
        }

        fn len(&self) -> usize {
            self.inline.iter().take_while(|e| e.is_some()).count() + self.more.len()
        }

        fn get(&self, i: usize) -> Option<&'static NoteRule> {
            match self.inline.get(i) {
                Some(e) => *e,
                None => self.more.get(i - RECENT_CREDITS).copied(),
            }
        }

        /// Pairs are interned, one copy each: the address is the identity.
        fn index_of(&self, r: &'static NoteRule) -> Option<usize> {
            self.iter().position(|x| std::ptr::eq(x, r))
        }
    }

    /// The notes as stored: each rule as its place in the table, or `u8::MAX` for a note
    /// naming none (read back as none), so a table may hold at most 255 rules.
    struct NotesOut<'a>(&'a VecDeque<CreditNote>, &'a Table);

    impl Serialize for NotesOut<'_> {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            let mut seq = ser.serialize_seq(Some(self.0.len()))?;
            for n in self.0 {
                let rule = match n.rule.and_then(|r| self.1.index_of(r)) {
                    None => u8::MAX,
                    Some(i) => u8::try_from(i)
                        .ok()
                        .filter(|&i| i < u8::MAX)
                        .ok_or_else(|| ser::Error::custom("credit notes name 256 rules or more"))?,
                };
                seq.serialize_element(&StoredNote {
                    event_ms: n.event_ms,
                    behaviour: n.behaviour,
                    rule,
                    raw_g: n.raw_g,
                    credited_g: n.credited_g,
                    limited_by: n.limited_by,
                })?;
            }
            seq.end()
        }
    }

    impl Serialize for Table {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            // Counted first: a binary format writes the length before the entries.
            let mut seq = ser.serialize_seq(Some(self.len()))?;
            for r in self.iter() {
                seq.serialize_element(r)?;
            }
            seq.end()
        }
    }

    /// The stored table as read: each entry, at its stored position, as the process's pair.
    impl<'de> Deserialize<'de> for Table {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Table;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a sequence of rule identities")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Table, A::Error> {
                    let mut t = Table::default();
                    while let Some(r) = seq.next_element::<NoteRule>()? {
                        // The strings are interned already; the pair may be new.
                        let pair = crate::intern::intern_rule(r.rules_version, r.rule_id)
                            .ok_or_else(|| {
                                de::Error::custom(format_args!(
                                    "rule identity {r:?}: the process already holds {} \
                                     distinct ones",
                                    crate::intern::MAX_INTERNED
                                ))
                            })?;
                        t.push(pair);
                    }
                    Ok(t)
                }
            }
            de.deserialize_seq(V)
        }
    }

    fn ser_ids<S: Serializer>(ids: &&VecDeque<(i64, u64)>, ser: S) -> Result<S::Ok, S::Error> {
        ids_codec::serialize(ids, ser)
    }

    #[derive(Serialize)]
    #[serde(rename = "UserState")]
    struct Out<'a> {
        user_id: &'a CompactString,
        balance_g: u64,
        lifetime_g: u64,
        spent_g: u64,
        trees_matured: u64,
        species: &'a Option<String>,
        timezone: &'a Option<Tz>,
        newest_event_ms: Option<i64>,
        dedupe_floor_ms: Option<i64>,
        counters: &'a Vec<Counter>,
        #[serde(serialize_with = "ser_ids")]
        recent_ids: &'a VecDeque<(i64, u64)>,
        recent_credits: NotesOut<'a>,
        credit_rules: &'a Table,
        day_quantities: &'a Vec<DayQuantity>,
    }

    impl Serialize for UserState {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            let table = Table::of(&self.recent_credits);
            Out {
                user_id: &self.user_id,
                balance_g: self.balance_g,
                lifetime_g: self.lifetime_g,
                spent_g: self.spent_g,
                trees_matured: self.trees_matured,
                species: &self.species,
                timezone: &self.timezone,
                newest_event_ms: self.newest_event_ms,
                dedupe_floor_ms: self.dedupe_floor_ms,
                counters: &self.counters,
                recent_ids: &self.recent_ids,
                recent_credits: NotesOut(&self.recent_credits, &table),
                credit_rules: &table,
                day_quantities: &self.day_quantities,
            }
            .serialize(ser)
        }
    }

    /// The notes as read, their rules still indices (into a table that comes after them).
    struct NotesIn {
        notes: VecDeque<CreditNote>,
        /// The stored index of each note's rule, the first [`RECENT_CREDITS`] inline.
        first: [u8; RECENT_CREDITS],
        rest: Vec<u8>,
    }

    impl<'de> Deserialize<'de> for NotesIn {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = NotesIn;

                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a sequence of credit notes")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NotesIn, A::Error> {
                    let mut out = NotesIn {
                        notes: VecDeque::new(),
                        first: [u8::MAX; RECENT_CREDITS],
                        rest: Vec::new(),
                    };
                    while let Some(n) = seq.next_element::<StoredNote>()? {
                        if out.notes.capacity() == 0 {
                            out.notes.reserve_exact(RECENT_CREDITS);
                        }
                        match out.first.get_mut(out.notes.len()) {
                            Some(slot) => *slot = n.rule,
                            None => out.rest.push(n.rule),
                        }
                        out.notes.push_back(CreditNote {
                            event_ms: n.event_ms,
                            behaviour: n.behaviour,
                            rule: None,
                            raw_g: n.raw_g,
                            credited_g: n.credited_g,
                            limited_by: n.limited_by,
                        });
                    }
                    Ok(out)
                }
            }
            de.deserialize_seq(V)
        }
    }

    #[derive(Deserialize)]
    #[serde(rename = "UserState")]
    struct In {
        user_id: CompactString,
        balance_g: u64,
        lifetime_g: u64,
        spent_g: u64,
        trees_matured: u64,
        species: Option<String>,
        timezone: Option<Tz>,
        newest_event_ms: Option<i64>,
        dedupe_floor_ms: Option<i64>,
        counters: Vec<Counter>,
        #[serde(with = "ids_codec")]
        recent_ids: VecDeque<(i64, u64)>,
        recent_credits: NotesIn,
        credit_rules: Table,
        day_quantities: Vec<DayQuantity>,
    }

    impl<'de> Deserialize<'de> for UserState {
        fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
            let s = In::deserialize(de)?;
            let NotesIn {
                mut notes,
                first,
                rest,
            } = s.recent_credits;
            for (n, &i) in notes.iter_mut().zip(first.iter().chain(&rest)) {
                n.rule = s.credit_rules.get(usize::from(i));
            }
            Ok(UserState {
                user_id: s.user_id,
                balance_g: s.balance_g,
                lifetime_g: s.lifetime_g,
                spent_g: s.spent_g,
                trees_matured: s.trees_matured,
                species: s.species,
                timezone: s.timezone,
                newest_event_ms: s.newest_event_ms,
                dedupe_floor_ms: s.dedupe_floor_ms,
                counters: s.counters,
                recent_ids: s.recent_ids,
                recent_credits: notes,
                day_quantities: s.day_quantities,
                ..UserState::default()
            })
        }
    }
}

/// A string read into the process's interned copy (see [`crate::intern`]): read from the
/// input in place when the format allows, so a loaded projection allocates nothing for its
/// rule table.
struct Interned(&'static str);

impl<'de> Deserialize<'de> for Interned {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};
        struct V;
        impl Visitor<'_> for V {
            type Value = Interned;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }

            // Borrowed and owned strings arrive here too (serde's defaults forward to it).
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                crate::intern::intern(s).map(Interned).ok_or_else(|| {
                    E::custom(format_args!(
                        "rule identity {s:?}: the process already holds {} distinct ones",
                        crate::intern::MAX_INTERNED
                    ))
                })
            }
        }
        de.deserialize_str(V)
    }
}

/// Why a stored credit was below its raw grams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteLimit {
    BelowMinimum,
    Cap(CapPeriod, CapKind),
    /// Appended last: the stored encoding numbers variants by position.
    AlreadyCounted,
}

/// Which quantity a cap limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapKind {
    Events(u32),
    Grams(u64),
}

impl From<Limit> for NoteLimit {
    fn from(l: Limit) -> Self {
        match l {
            Limit::BelowMinimum => Self::BelowMinimum,
            Limit::AlreadyCounted => Self::AlreadyCounted,
            Limit::Cap(c) => Self::Cap(
                c.period,
                match c.limit {
                    CapLimit::Events(n) => CapKind::Events(n),
                    CapLimit::Grams(g) => CapKind::Grams(g),
                },
            ),
        }
    }
}

impl std::fmt::Display for NoteLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let period = |p: &CapPeriod| match p {
            CapPeriod::Day => "day",
            CapPeriod::Month => "month",
        };
        match self {
            Self::BelowMinimum => write!(f, "below the rule's minimum quantity"),
            Self::AlreadyCounted => write!(f, "the day's quantity was already credited"),
            Self::Cap(p, CapKind::Events(n)) => write!(f, "cap of {n} events per {}", period(p)),
            Self::Cap(p, CapKind::Grams(g)) => write!(f, "cap of {g} g per {}", period(p)),
        }
    }
}

/// What limited a credit below its raw grams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Quantity under the rule's minimum: accepted, 0 g.
    BelowMinimum,
    /// A day-scoped rule's report that did not raise the day's quantity (a re-sent or smaller
    /// day total): accepted, 0 g.
    AlreadyCounted,
    Cap(Cap),
}

/// The explanation every credit carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credit<'r> {
    pub behaviour: Behaviour,
    pub rules_version: &'r str,
    pub rule_id: &'r str,
    /// Grams the rule gives before caps.
    pub raw_g: u64,
    /// Grams actually added to the balance.
    pub credited_g: u64,
    pub limited_by: Option<Limit>,
}

/// The result of applying one accepted event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome<'r> {
    /// `Some` for credit events (even when 0 g), `None` for commands.
    pub credit: Option<Credit<'r>>,
    /// Trees this event completed, usually none.
    pub trees: Vec<TreeMatured>,
}

impl UserState {
    pub fn new(user_id: impl AsRef<str>) -> Self {
        Self {
            user_id: CompactString::new(user_id.as_ref()),
            ..Self::default()
        }
    }

    /// The species the next tree will be, and grams still needed for it.
    pub fn progress<'r>(&self, rules: &'r RuleSet) -> (&'r crate::Species, u64) {
        let sp = self.current_species(rules);
        (sp, sp.cost_g.saturating_sub(self.balance_g))
    }

    fn current_species<'r>(&self, rules: &'r RuleSet) -> &'r crate::Species {
        // A species dropped from a later catalogue falls back to the default.
        self.species
            .as_deref()
            .and_then(|id| rules.species(id))
            .unwrap_or(rules.default_species())
    }

    /// The rules version and rule id a stored credit was made under, `None` if its stored
    /// index was not in its projection's rule table (only possible in a projection not
    /// written by the fold).
    pub fn note_rule(&self, note: &CreditNote) -> Option<&NoteRule> {
        note.rule
    }

    /// Keeps `note` as the newest credit explanation, dropping the oldest past
    /// [`RECENT_CREDITS`].
    fn push_note(&mut self, note: CreditNote) {
        // More than one note to drop only in a projection not written by the fold.
        while self.recent_credits.len() >= RECENT_CREDITS {
            self.recent_credits.pop_front();
        }
        if self.recent_credits.capacity() == 0 {
            // It fills up to exactly this size: allocate once.
            self.recent_credits.reserve_exact(RECENT_CREDITS);
        }
        self.recent_credits.push_back(note);
    }

    /// Where the counter of `behaviour` in `bucket` is. There is at most one per pair. The
    /// hint answers for the newest bucket and for any newer one (absent); only an older bucket
    /// (a late event) needs a scan, from the end because recent buckets were opened last.
    fn counter_index(&mut self, behaviour: Behaviour, bucket: Bucket) -> Option<usize> {
        let is = |c: &Counter| c.behaviour == behaviour && c.bucket == bucket;
        let slot = counter_slot(behaviour, bucket.period());
        let hint = self.counter_hints().at[slot];
        if hint == CounterHints::NONE {
            return None;
        }
        if let Some(c) = (hint != CounterHints::UNKNOWN)
            .then(|| self.counters.get(usize::from(hint)))
            .flatten()
        {
            // A valid hint always names a counter of this behaviour and period; check anyway,
            // and scan if it does not.
            if c.behaviour == behaviour && c.bucket.period() == bucket.period() {
                let (newest, wanted) = (bucket_number(c.bucket), bucket_number(bucket));
                if wanted == newest {
                    return Some(usize::from(hint));
                }
                if wanted > newest {
                    return None;
                }
            }
        }
        self.counters.iter().rposition(is)
    }

    /// The [`CounterHints`], rebuilt from `counters` if they were loaded since.
    fn counter_hints(&mut self) -> &CounterHints {
        let h = &mut self.counter_hints.0;
        if !h.valid {
            *h = CounterHints {
                valid: true,
                ..CounterHints::default()
            };
            for (i, c) in self.counters.iter().enumerate() {
                h.note(&self.counters, i, c.behaviour, c.bucket);
            }
        }
        h
    }

    /// Appends a new counter, keeping the hints right.
    fn open_counter(&mut self, counter: Counter) {
        let (behaviour, bucket) = (counter.behaviour, counter.bucket);
        self.counters.push(counter);
        let h = &mut self.counter_hints.0;
        // If not valid, it is rebuilt (with this counter) when next needed.
        if h.valid {
            h.note(&self.counters, self.counters.len() - 1, behaviour, bucket);
        }
    }

    fn seen(&mut self, hash: u64) -> bool {
        if self.recent_ids.len() <= INDEX_THRESHOLD {
            return self.recent_ids.iter().any(|&(_, h)| h == hash);
        }
        let ids = &self.recent_ids;
        self.index
            .0
            .get_or_insert_with(|| {
                Box::new(IdIndex::from_ids(ids.iter().map(|&(_, h)| h), ids.len()))
            })
            .contains(hash)
    }

    fn remember(&mut self, at_ms: i64, hash: u64, max_ids: usize) {
        self.recent_ids.push_back((at_ms, hash));
        if let Some(ix) = self.index.0.as_mut() {
            ix.insert(hash);
        }
        while self.recent_ids.len() > max_ids {
            if let Some((t, h)) = self.recent_ids.pop_front() {
                self.dedupe_floor_ms = Some(self.dedupe_floor_ms.map_or(t, |f| f.max(t)));
                if let Some(ix) = self.index.0.as_mut() {
                    ix.remove(h);
                }
            }
        }
    }

    /// Forget ids the grace window no longer needs: a re-delivery of them is too late anyway.
    fn prune_ids(&mut self, horizon_ms: i64) {
        while let Some(&(t, h)) = self.recent_ids.front() {
            if t >= horizon_ms {
                break;
            }
            self.recent_ids.pop_front();
            if let Some(ix) = self.index.0.as_mut() {
                ix.remove(h);
            }
        }
    }

    /// Forget counters of buckets that end before the horizon: no acceptable event falls in them.
    fn prune_counters(&mut self, horizon_ms: i64, tz: Tz) {
        // Not through `buckets`: the horizon's day would evict the current day from the
        // user's cache.
        let Some(((day, month), _)) = shared_day_of(tz, horizon_ms) else {
            return;
        };
        let h = self.counter_hints();
        if h.oldest_day >= day && h.oldest_month >= month {
            return; // nothing to forget (the usual case): the counters are not even read
        }
        // `Vec::retain`, rebuilding the hints as the counters move.
        let mut hints = CounterHints {
            valid: true,
            ..CounterHints::default()
        };
        let mut kept = 0;
        for i in 0..self.counters.len() {
            let (behaviour, bucket) = (self.counters[i].behaviour, self.counters[i].bucket);
            let keep = match bucket {
                Bucket::Day(d) => d >= day,
                Bucket::Month(m) => m >= month,
            };
            if keep {
                self.counters.swap(kept, i);
                hints.note(&self.counters, kept, behaviour, bucket);
                kept += 1;
            }
        }
        self.counters.truncate(kept);
        self.counter_hints.0 = hints;
    }

    /// Forget day quantities of days before the horizon's: no acceptable event falls in them.
    /// Only called when an event opens a day (so it touches `day_quantities` anyway).
    fn prune_day_quantities(&mut self, horizon_ms: i64, tz: Tz) {
        if let Some(((day, _), _)) = shared_day_of(tz, horizon_ms) {
            self.day_quantities.retain(|q| q.day >= day);
        }
    }

    /// Starts loading the cold parts of the projection that applying an event (of `rule`, id
    /// hash `hash`) will touch late: the oldest remembered id (pruned or evicted by most
    /// accepted events), the id index's slot for `hash`, the counters of the rule's caps, the
    /// credit ring's slot the new note goes to and the day's quantity. The misses then overlap
    /// instead of following one another. Reads only fields the fold reads anyway, and changes
    /// nothing.
    #[inline]
    fn prefetch(&self, rule: Option<&Rule>, hash: u64) {
        if let Some(front) = self.recent_ids.front() {
            prefetch(front);
        }
        if let Some(ix) = &self.index.0 {
            ix.prefetch(hash);
        }
        let Some(rule) = rule else {
            return;
        };
        for cap in rule.caps.iter().take(2) {
            let slot = counter_slot(rule.behaviour, cap.period);
            let hint = usize::from(self.counter_hints.0.at[slot]);
            if let Some(c) = self.counters.get(hint) {
                prefetch(c);
            }
        }
        // A full ring's new note overwrites the oldest one's slot; otherwise it follows the
        // newest (usually in the same cache line).
        let kept = self.recent_credits.len();
        let slot = if kept >= RECENT_CREDITS {
            self.recent_credits.front()
        } else {
            self.recent_credits.back()
        };
        if let Some(n) = slot {
            prefetch(n);
        }
        if rule.quantity_scope == QuantityScope::Day {
            if let Some(q) = self.day_quantities.last() {
                prefetch(q);
            }
        }
    }

    /// Starts loading every cache line of the projection itself (not its heap parts: see
    /// [`UserState::prefetch_stored_parts`]), changing nothing: for a caller that will read
    /// it a few projections from now.
    #[inline]
    pub fn prefetch_own_lines(&self) {
        prefetch_lines(std::ptr::from_ref(self).cast(), std::mem::size_of::<Self>());
    }

    /// Starts loading the first cache line of each heap part a stored encoding reads (the
    /// user id if too long to be inline, counters, ids, credits and day quantities), changing
    /// nothing. For a writer that serialises many projections in a row, or a fold that knows
    /// its next users: with their misses started a few projections ahead, they overlap instead
    /// of following one another.
    #[inline]
    pub fn prefetch_stored_parts(&self) {
        if self.user_id.is_heap_allocated() {
            prefetch_raw(self.user_id.as_ptr());
        }
        prefetch_raw(self.counters.as_ptr());
        prefetch_raw(self.recent_ids.as_slices().0.as_ptr());
        prefetch_raw(self.recent_credits.as_slices().0.as_ptr());
        prefetch_raw(self.day_quantities.as_ptr());
    }

    /// Local (day, month) of `ms` in `tz`, `None` if it cannot be placed on a calendar.
    fn buckets(&mut self, tz: Tz, ms: i64) -> Option<(i32, i32)> {
        if let Some(b) = self.day_cache.0.get(tz, ms) {
            return Some(b);
        }
        let (b, span) = shared_day_of(tz, ms)?;
        if let Some(span) = span {
            self.day_cache.0 = span;
        }
        Some(b)
    }
}

impl RuleSet {
    /// Starts loading the parts of `state` that applying `event` to it will touch, without
    /// changing anything: a hint for a caller that knows which event it folds next (a batch),
    /// so that the memory reads of the next event overlap the work on this one. The batch fold
    /// with look-ahead ([`crate::batch::fold_ahead`]) calls it; the processor does not (it
    /// decodes each record just before folding it: decoding a few records ahead to call this
    /// cost more than it saved, BENCHMARKS.md, session 15).
    #[inline]
    pub fn prefetch(&self, state: &UserState, event: &Event) {
        let rule = match &event.action {
            Action::Credit { behaviour, .. } => self.rule(*behaviour),
            _ => None,
        };
        state.prefetch(rule, xxhash_rust::xxh3::xxh3_64(event.event_id.as_bytes()));
    }

    /// Folds one event into a user's projection.
    ///
    /// Deterministic: it reads no clock and does no I/O; "now" is the event's
    /// `received_at_ms` (the Kafka record time). On `Err` the state is unchanged.
    pub fn apply<'r>(
        &'r self,
        state: &mut UserState,
        event: &Event,
    ) -> Result<Outcome<'r>, Rejection> {
        if !state.user_id.is_empty() && state.user_id != event.user_id {
            return Err(Malformed::WrongUser {
                state: state.user_id.to_string(),
                event: event.user_id.clone(),
            }
            .into());
        }
        let t = event.occurred_at_ms;
        let rule = match &event.action {
            Action::Credit { behaviour, .. } => match self.rule(*behaviour) {
                Some(r) => Some(r),
                None => {
                    return Err(Rejection::UnknownBehaviour(format!(
                        "{behaviour} has no rule in rules version {}",
                        self.version
                    )));
                }
            },
            _ => None,
        };
        // Hashed before the checks that may reject the event, so that its index slot can be
        // loaded while they run.
        let hash = xxhash_rust::xxh3::xxh3_64(event.event_id.as_bytes());
        state.prefetch(rule, hash);
        if let (
            Action::Credit {
                behaviour,
                quantity,
                ..
            },
            Some(rule),
        ) = (&event.action, rule)
        {
            if *quantity < 0 {
                return Err(Rejection::NegativeAmount {
                    behaviour: *behaviour,
                    value: *quantity,
                });
            }
            if *quantity > rule.max_quantity {
                return Err(Rejection::AbsurdValue {
                    behaviour: *behaviour,
                    value: *quantity,
                    max: rule.max_quantity,
                });
            }
        }
        if t > event.received_at_ms.saturating_add(self.max_future_skew_ms) {
            return Err(Rejection::TooEarly {
                occurred_at_ms: t,
                received_at_ms: event.received_at_ms,
            });
        }
        if let Some(horizon) = self.horizon(state) {
            if t < horizon {
                return Err(Rejection::TooLate {
                    occurred_at_ms: t,
                    horizon_ms: horizon,
                });
            }
        }
        if state.seen(hash) {
            return Err(Rejection::Duplicate);
        }
        // The oldest id is usually forgotten below (pruned or evicted): start loading its index
        // slot now. The id itself was prefetched above and has had time to arrive.
        if let (Some(ix), Some(&(_, h))) = (&state.index.0, state.recent_ids.front()) {
            ix.prefetch(h);
        }
        let tz = state.timezone.unwrap_or(self.timezone);
        let Some((day, month)) = state.buckets(tz, t) else {
            return Err(Malformed::TimeOutOfRange(t).into());
        };
        // A day-scoped rule (walking) checks the day's quantity, not just the report's.
        let mut day_quantity = None;
        if let (
            Action::Credit {
                behaviour,
                quantity,
                tally,
            },
            Some(rule),
        ) = (&event.action, rule)
        {
            if rule.quantity_scope == QuantityScope::Day {
                let ix = state
                    .day_quantities
                    .iter()
                    .position(|q| q.behaviour == *behaviour && q.day == day);
                let old = ix.map_or(
                    DayQuantity {
                        behaviour: *behaviour,
                        day,
                        added: 0,
                        day_total: 0,
                    },
                    |ix| state.day_quantities[ix],
                );
                let mut new = old;
                match tally {
                    Tally::Add => new.added = old.added.saturating_add(*quantity),
                    Tally::DayTotal => new.day_total = old.day_total.max(*quantity),
                }
                if new.quantity() > rule.max_quantity {
                    return Err(Rejection::AbsurdValue {
                        behaviour: *behaviour,
                        value: new.quantity(),
                        max: rule.max_quantity,
                    });
                }
                day_quantity = Some((ix, old.quantity(), new));
            }
        }

        // The species check is the last validation; from here on the event is accepted.
        if let Action::ChooseSpecies { species_id } = &event.action {
            if self.species(species_id).is_none() {
                return Err(Rejection::UnknownSpecies(species_id.clone()));
            }
        }
        if state.user_id.is_empty() {
            state.user_id = CompactString::new(&event.user_id);
        }
        let mut outcome = Outcome::default();
        let mut opened = false;
        let mut opened_day = false;
        match (&event.action, rule) {
            (
                Action::Credit {
                    behaviour,
                    quantity,
                    ..
                },
                Some(rule),
            ) => {
                let (raw, mut limited_by) = match day_quantity {
                    None => {
                        let raw = rule.raw_grams(*quantity);
                        (raw, (raw == 0).then_some(Limit::BelowMinimum))
                    }
                    Some((ix, before, new)) => {
                        // Grams of the day's new quantity minus those of its old one: the
                        // day's reports earn, in total, the grams of the day's quantity, in
                        // any order and without a rounding loss per report.
                        let after = new.quantity();
                        let raw = rule.raw_grams(after).saturating_sub(rule.raw_grams(before));
                        match ix {
                            Some(ix) => state.day_quantities[ix] = new,
                            None => {
                                opened_day = true;
                                state.day_quantities.push(new);
                            }
                        }
                        let why = if after <= before {
                            Limit::AlreadyCounted
                        } else {
                            Limit::BelowMinimum
                        };
                        (raw, (raw == 0).then_some(why))
                    }
                };
                let mut credited = raw;
                // Counter positions found while checking the caps, reused to update them.
                let mut found = [None; MAX_CAPS_REMEMBERED];
                for (i, cap) in rule.caps.iter().enumerate() {
                    let bucket = match cap.period {
                        CapPeriod::Day => Bucket::Day(day),
                        CapPeriod::Month => Bucket::Month(month),
                    };
                    let ix = state.counter_index(*behaviour, bucket);
                    if let Some(f) = found.get_mut(i) {
                        *f = ix;
                    }
                    let (events, grams) = ix.map_or((0, 0), |ix| {
                        let c = &state.counters[ix];
                        (c.events, c.grams)
                    });
                    let room = match cap.limit {
                        CapLimit::Events(n) if events >= n => 0,
                        CapLimit::Events(_) => credited,
                        CapLimit::Grams(g) => g.saturating_sub(grams),
                    };
                    if room < credited {
                        credited = room;
                        limited_by = Some(Limit::Cap(*cap));
                    }
                }
                if credited > 0 {
                    for (i, cap) in rule.caps.iter().enumerate() {
                        let bucket = match cap.period {
                            CapPeriod::Day => Bucket::Day(day),
                            CapPeriod::Month => Bucket::Month(month),
                        };
                        // Counters are only appended in this loop, so a position found above
                        // still holds; one not found then may have been opened by an earlier
                        // cap of the same period, so look again.
                        let ix = match found.get(i) {
                            Some(Some(ix)) => Some(*ix),
                            _ => state.counter_index(*behaviour, bucket),
                        };
                        match ix {
                            Some(ix) => {
                                let c = &mut state.counters[ix];
                                c.events += 1;
                                c.grams += credited;
                            }
                            None => {
                                opened = true;
                                state.open_counter(Counter {
                                    behaviour: *behaviour,
                                    bucket,
                                    events: 1,
                                    grams: credited,
                                });
                            }
                        }
                    }
                    state.balance_g += credited;
                    state.lifetime_g += credited;
                }
                state.push_note(CreditNote {
                    event_ms: t,
                    behaviour: *behaviour,
                    rule: Some(rule.note_rule),
                    raw_g: raw,
                    credited_g: credited,
                    limited_by: limited_by.map(NoteLimit::from),
                });
                outcome.credit = Some(Credit {
                    behaviour: *behaviour,
                    rules_version: &self.version,
                    rule_id: &rule.id,
                    raw_g: raw,
                    credited_g: credited,
                    limited_by,
                });
            }
            (Action::ChooseSpecies { species_id }, _) => state.species = Some(species_id.clone()),
            (Action::SetTimezone { timezone }, _) => state.timezone = Some(*timezone),
            (Action::Credit { .. }, None) => unreachable!("rule looked up above"),
        }

        state.newest_event_ms = Some(state.newest_event_ms.map_or(t, |n| n.max(t)));
        state.remember(t, hash, self.dedupe_max_ids);
        if let Some(h) = self.horizon(state) {
            state.prune_ids(h);
            // Counters change bucket at most once a day per behaviour: prune only then.
            if opened {
                state.prune_counters(h, tz);
            }
            if opened_day {
                state.prune_day_quantities(h, tz);
            }
        }

        if state.balance_g >= self.min_species_cost {
            let species = state.current_species(self);
            while state.balance_g >= species.cost_g {
                state.balance_g -= species.cost_g;
                state.spent_g += species.cost_g;
                state.trees_matured += 1;
                outcome.trees.push(TreeMatured {
                    tree_id: tree_id(&state.user_id, state.trees_matured),
                    user_id: state.user_id.to_string(),
                    tree_seq: state.trees_matured,
                    species_id: species.id.clone(),
                    energy_spent_g: species.cost_g,
                    matured_at_ms: t,
                    rules_version: self.version.clone(),
                    trigger_event_id: event.event_id.clone(),
                });
            }
        }
        Ok(outcome)
    }

    /// The earliest event time this user can still accept, if any event was accepted yet.
    fn horizon(&self, state: &UserState) -> Option<i64> {
        let window = state
            .newest_event_ms
            .map(|n| n.saturating_sub(self.grace_window_ms));
        match (window, state.dedupe_floor_ms) {
            (Some(w), Some(f)) => Some(w.max(f.saturating_add(1))),
            (w, f) => w.or(f.map(|f| f.saturating_add(1))),
        }
    }
}

/// The deterministic id of a user's `seq`-th tree. The sequence is the last `/`-separated
/// part, so the id is unambiguous even for user ids containing `/`.
pub fn tree_id(user_id: &str, seq: u64) -> String {
    format!("{user_id}/{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2025-11-25 12:00 Asia/Shanghai = 04:00 UTC.
    const NOON: i64 = 1_764_043_200_000;
    const H: i64 = 3_600_000;

    fn ev(id: &str, t: i64, action: Action) -> Event {
        Event {
            event_id: id.into(),
            user_id: "u".into(),
            occurred_at_ms: t,
            received_at_ms: t,
            action,
        }
    }

    fn credit(id: &str, t: i64, behaviour: Behaviour, quantity: i64) -> Event {
        ev(
            id,
            t,
            Action::Credit {
                behaviour,
                quantity,
                tally: Tally::Add,
            },
        )
    }

    /// A walking report of the day's cumulative total (`PERIOD_DAY`).
    fn day_total(id: &str, t: i64, steps: i64) -> Event {
        ev(
            id,
            t,
            Action::Credit {
                behaviour: Behaviour::Walking,
                quantity: steps,
                tally: Tally::DayTotal,
            },
        )
    }

    /// Applies `n` events of one behaviour at `t`; returns the grams each one credited.
    fn run(r: &RuleSet, s: &mut UserState, b: Behaviour, q: i64, n: usize, t: i64) -> Vec<u64> {
        (0..n)
            .map(|i| {
                let o = r
                    .apply(s, &credit(&format!("{b}-{t}-{i}"), t + i as i64, b, q))
                    .unwrap();
                o.credit.unwrap().credited_g
            })
            .collect()
    }

    #[test]
    fn every_per_event_rule_credits_its_grams() {
        let r = RuleSet::default();
        let expect = [
            (Behaviour::BusRide, 80),
            (Behaviour::SubwayRide, 52),
            (Behaviour::OfflinePayment, 5),
            (Behaviour::UtilityBill, 262),
            (Behaviour::MovieTicket, 180),
            (Behaviour::TrainTicket, 136),
            (Behaviour::HospitalAppointment, 277),
            (Behaviour::EInvoice, 5),
            (Behaviour::TrafficFine, 72),
            (Behaviour::EtcToll, 38),
            (Behaviour::EReceipt, 5),
            (Behaviour::ReusableCup, 50),
            (Behaviour::EStatement, 10),
        ];
        for (b, g) in expect {
            let mut s = UserState::new("u");
            let o = r.apply(&mut s, &credit("e", NOON, b, 10_000)).unwrap();
            let c = o.credit.unwrap();
            assert_eq!((c.raw_g, c.credited_g), (g, g), "{b}");
            assert_eq!(c.rule_id, r.rule(b).unwrap().id, "{b}");
            assert_eq!(c.rules_version, "2026.11-2");
            assert_eq!(s.balance_g, g);
        }
    }

    #[test]
    fn a_note_rule_is_stored_as_two_strings() {
        // The stored bytes of session 14's `Arc<str>` fields, each a postcard string (length,
        // then the bytes): the interned form writes and reads the same.
        let bytes = [
            9, b'2', b'0', b'2', b'6', b'.', b'1', b'1', b'-', b'2', 3, b'b', b'u', b's',
        ];
        let rule: NoteRule = postcard::from_bytes(&bytes).unwrap();
        assert_eq!((rule.rules_version, rule.rule_id), ("2026.11-2", "bus"));
        assert_eq!(postcard::to_allocvec(&rule).unwrap(), bytes);
    }

    #[test]
    fn credit_notes_read_back_naming_the_rules_own_pairs() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        for (i, b) in [Behaviour::BusRide, Behaviour::EInvoice, Behaviour::BusRide]
            .into_iter()
            .enumerate()
        {
            r.apply(
                &mut s,
                &credit(&format!("e{i}"), NOON + i as i64, b, 10_000),
            )
            .unwrap();
        }
        let bytes = postcard::to_allocvec(&s).unwrap();
        let back: UserState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        for n in &back.recent_credits {
            // Read back as the same copy the rules hold, not new strings.
            let own = r.rule(n.behaviour).unwrap().note_rule;
            assert!(std::ptr::eq(back.note_rule(n).unwrap(), own));
        }
        let bus = back.note_rule(&back.recent_credits[2]).unwrap();
        assert_eq!(bus.rule_id, r.rule(Behaviour::BusRide).unwrap().id);
        assert_eq!(bus.rules_version, "2026.11-2");
    }

    #[test]
    fn count_caps_per_day_and_month() {
        let r = RuleSet::default();
        for (b, per, cap) in [
            (Behaviour::OfflinePayment, 0, 10),
            (Behaviour::SubwayRide, 0, 5),
            (Behaviour::BusRide, 0, 10),
            (Behaviour::EInvoice, 0, 5),
            (Behaviour::EtcToll, 0, 10),
            (Behaviour::EReceipt, 0, 5),
            (Behaviour::ReusableCup, 0, 3),
            (Behaviour::UtilityBill, 1, 10),
            (Behaviour::MovieTicket, 1, 10),
            (Behaviour::TrainTicket, 1, 10),
            (Behaviour::HospitalAppointment, 1, 5),
            (Behaviour::TrafficFine, 1, 5),
        ] {
            let mut s = UserState::new("u");
            let got = run(&r, &mut s, b, 500, cap + 3, NOON);
            let g = r.rule(b).unwrap().raw_grams(500);
            let mut want = vec![g; cap];
            want.extend([0, 0, 0]);
            assert_eq!(got, want, "{b}");
            // The next day (daily caps) or next month (monthly caps) earns again.
            let later = if per == 0 {
                NOON + 24 * H
            } else {
                NOON + 7 * 24 * H
            };
            let got = run(&r, &mut s, b, 500, 1, later);
            assert_eq!(got, vec![g], "{b} in the next period");
        }
    }

    #[test]
    fn e_statement_has_a_day_and_a_month_cap() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        // 2 a day, 5 a month: days 1-3 give 2, 2, 1.
        let d = |i: i64| NOON + i * 24 * H - 20 * 24 * H; // early in the month
        let mut got = vec![];
        for day in 0..3 {
            got.extend(run(&r, &mut s, Behaviour::EStatement, 1, 3, d(day)));
        }
        assert_eq!(got, [10, 10, 0, 10, 10, 0, 10, 0, 0]);
    }

    #[test]
    fn walking_gram_cap_credits_the_part_that_fits() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let o = r
            .apply(&mut s, &credit("a", NOON, Behaviour::Walking, 10_000))
            .unwrap();
        assert_eq!(o.credit.unwrap().credited_g, 200);
        let o = r
            .apply(&mut s, &credit("b", NOON + 1, Behaviour::Walking, 10_000))
            .unwrap();
        let c = o.credit.unwrap();
        assert_eq!((c.raw_g, c.credited_g), (200, 96));
        assert!(matches!(
            c.limited_by,
            Some(Limit::Cap(Cap {
                period: CapPeriod::Day,
                ..
            }))
        ));
        let o = r
            .apply(&mut s, &credit("c", NOON + 2, Behaviour::Walking, 10_000))
            .unwrap();
        assert_eq!(o.credit.unwrap().credited_g, 0);
        assert_eq!(s.balance_g, 296);
    }

    #[test]
    fn bike_is_per_metre_with_a_daily_cap() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        assert_eq!(run(&r, &mut s, Behaviour::BikeRide, 3_250, 1, NOON), [65]);
        assert_eq!(
            run(&r, &mut s, Behaviour::BikeRide, 10_000, 1, NOON + H),
            [135]
        );
    }

    #[test]
    fn days_are_counted_in_shanghai_time() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        // 23:30 and 00:30 Shanghai are on different local days though within one UTC day.
        let before_midnight = NOON + 11 * H + 30 * 60_000;
        run(&r, &mut s, Behaviour::SubwayRide, 0, 5, before_midnight);
        assert_eq!(
            run(
                &r,
                &mut s,
                Behaviour::SubwayRide,
                0,
                1,
                before_midnight + 100
            ),
            [0]
        );
        assert_eq!(
            run(&r, &mut s, Behaviour::SubwayRide, 0, 1, before_midnight + H),
            [52]
        );
    }

    #[test]
    fn the_users_timezone_moves_the_day_boundary() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let tz = ev(
            "tz",
            NOON,
            Action::SetTimezone {
                timezone: chrono_tz::Europe::London,
            },
        );
        r.apply(&mut s, &tz).unwrap();
        // 23:30 Shanghai = 15:30 London (same London day as NOON Shanghai = 04:00 London).
        let t = NOON + 11 * H + 30 * 60_000;
        run(&r, &mut s, Behaviour::SubwayRide, 0, 5, NOON);
        assert_eq!(run(&r, &mut s, Behaviour::SubwayRide, 0, 1, t), [0]);
    }

    #[test]
    fn below_minimum_is_accepted_at_zero() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let o = r
            .apply(&mut s, &credit("a", NOON, Behaviour::OfflinePayment, 50))
            .unwrap();
        let c = o.credit.unwrap();
        assert_eq!((c.credited_g, c.limited_by), (0, Some(Limit::BelowMinimum)));
        // It is remembered: a re-delivery is a duplicate, not a second zero credit.
        let again = r.apply(&mut s, &credit("a", NOON, Behaviour::OfflinePayment, 50));
        assert_eq!(again.unwrap_err(), Rejection::Duplicate);
    }

    #[test]
    fn absurd_values_are_rejected_without_change() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let e = credit("a", NOON, Behaviour::Walking, 100_001);
        let before = s.clone();
        assert!(matches!(
            r.apply(&mut s, &e),
            Err(Rejection::AbsurdValue { max: 100_000, .. })
        ));
        assert_eq!(s, before);
        let e = credit("b", NOON, Behaviour::BikeRide, 100_001);
        assert_eq!(r.apply(&mut s, &e).unwrap_err().code(), "absurd_value");
    }

    #[test]
    fn too_early_and_too_late() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let mut e = credit("a", NOON, Behaviour::BusRide, 0);
        e.received_at_ms = NOON - 11 * 60_000;
        assert_eq!(r.apply(&mut s, &e).unwrap_err().code(), "too_early");
        e.received_at_ms = NOON - 9 * 60_000;
        r.apply(&mut s, &e).unwrap();
        // 72 h behind the newest event is still fine; one ms more is too late.
        r.apply(&mut s, &credit("b", NOON - 72 * H, Behaviour::BusRide, 0))
            .unwrap();
        let late = r.apply(
            &mut s,
            &credit("c", NOON - 72 * H - 1, Behaviour::BusRide, 0),
        );
        assert_eq!(
            late.unwrap_err(),
            Rejection::TooLate {
                occurred_at_ms: NOON - 72 * H - 1,
                horizon_ms: NOON - 72 * H
            }
        );
    }

    #[test]
    fn duplicates_are_not_credited_twice() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        r.apply(&mut s, &credit("a", NOON, Behaviour::BusRide, 0))
            .unwrap();
        let snapshot = s.clone();
        assert_eq!(
            r.apply(&mut s, &credit("a", NOON, Behaviour::BusRide, 0)),
            Err(Rejection::Duplicate)
        );
        assert_eq!(s, snapshot);
    }

    #[test]
    fn dedupe_bound_raises_the_floor_instead_of_forgetting() {
        let mut r = RuleSet::default();
        r.dedupe_max_ids = 40; // above the index threshold, so the hash index is exercised
        let mut s = UserState::new("u");
        for i in 0..50 {
            r.apply(
                &mut s,
                &credit(&format!("e{i}"), NOON + i, Behaviour::OfflinePayment, 10),
            )
            .unwrap();
        }
        assert_eq!(s.recent_ids.len(), 40);
        assert_eq!(s.dedupe_floor_ms, Some(NOON + 9));
        // e5 was forgotten, but its re-delivery is too late, not a second credit.
        let again = r.apply(
            &mut s,
            &credit("e5", NOON + 5, Behaviour::OfflinePayment, 10),
        );
        assert_eq!(again.unwrap_err().code(), "too_late");
        // e45 is still remembered.
        let again = r.apply(
            &mut s,
            &credit("e45", NOON + 45, Behaviour::OfflinePayment, 10),
        );
        assert_eq!(again.unwrap_err(), Rejection::Duplicate);
    }

    #[test]
    fn ids_and_counters_are_pruned_as_time_moves_on() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        for d in 0..10 {
            run(&r, &mut s, Behaviour::BusRide, 0, 3, NOON + d * 24 * H);
        }
        // 72 h window: ids from the last 3 days + the current one at most.
        assert!(s.recent_ids.len() <= 12, "{}", s.recent_ids.len());
        assert!(s.counters.len() <= 4, "{:?}", s.counters);
    }

    #[test]
    fn another_users_event_is_rejected_without_change() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        r.apply(&mut s, &credit("e1", NOON, Behaviour::SubwayRide, 1))
            .expect("own event");
        let before = s.clone();
        let mut other = credit("e2", NOON + H, Behaviour::SubwayRide, 1);
        other.user_id = "v".into();
        assert_eq!(
            r.apply(&mut s, &other).map(|_| ()),
            Err(Malformed::WrongUser {
                state: "u".into(),
                event: "v".into(),
            }
            .into())
        );
        assert_eq!(s, before);
    }

    #[test]
    fn a_tree_matures_with_a_deterministic_id() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let mut trees = vec![];
        // 10 bus rides a day (the cap) = 800 g a day: 60 days make two saxauls.
        for i in 0..600 {
            let t = NOON + (i / 10) * 24 * H + i % 10;
            let o = r
                .apply(&mut s, &credit(&format!("b{i}"), t, Behaviour::BusRide, 0))
                .unwrap();
            trees.extend(o.trees);
        }
        assert_eq!(s.lifetime_g, 48_000);
        assert_eq!(s.lifetime_g, s.balance_g + s.spent_g);
        let ids: Vec<_> = trees.iter().map(|t| t.tree_id.as_str()).collect();
        assert_eq!(ids.len() as u64, s.trees_matured);
        assert_eq!(ids, ["u/1", "u/2"]);
        assert_eq!(s.balance_g, 48_000 - 2 * 17_900);
        assert!(
            trees
                .iter()
                .all(|t| t.species_id == "saxaul" && t.energy_spent_g == 17_900)
        );
    }

    #[test]
    fn choosing_a_species_matures_at_once_if_the_balance_covers_it() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        s.balance_g = 20_000;
        s.lifetime_g = 20_000;
        let o = r
            .apply(
                &mut s,
                &ev(
                    "c",
                    NOON,
                    Action::ChooseSpecies {
                        species_id: "red_willow".into(),
                    },
                ),
            )
            .unwrap();
        assert!(o.trees.is_empty(), "22,400 g needed");
        let o = r
            .apply(
                &mut s,
                &ev(
                    "d",
                    NOON + 1,
                    Action::ChooseSpecies {
                        species_id: "saxaul".into(),
                    },
                ),
            )
            .unwrap();
        assert_eq!(o.trees.len(), 1);
        assert_eq!(s.balance_g, 2_100);
        let bad = ev(
            "e",
            NOON + 2,
            Action::ChooseSpecies {
                species_id: "oak".into(),
            },
        );
        assert_eq!(
            r.apply(&mut s, &bad).unwrap_err(),
            Rejection::UnknownSpecies("oak".into())
        );
    }

    #[test]
    fn time_beyond_the_calendar_is_malformed_not_a_panic() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let mut e = credit("x", i64::MAX, Behaviour::BusRide, 0);
        e.received_at_ms = i64::MAX;
        assert_eq!(
            r.apply(&mut s, &e).unwrap_err(),
            Malformed::TimeOutOfRange(i64::MAX).into()
        );
    }

    #[test]
    fn time_beyond_the_calendar_is_malformed_after_a_cached_day_before_1970_utc() {
        // 1 ms after the epoch is 1970-01-01 08:00 in Shanghai: the user's cached day starts
        // before the epoch, and an event at i64::MAX must still be rejected, not wrap around
        // into that day (or overflow).
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let mut first = credit("a", 1, Behaviour::BusRide, 1);
        first.received_at_ms = 1;
        assert!(r.apply(&mut s, &first).is_ok());
        let mut e = credit("x", i64::MAX, Behaviour::BusRide, 1);
        e.received_at_ms = i64::MAX;
        let before = s.clone();
        assert_eq!(
            r.apply(&mut s, &e).unwrap_err(),
            Malformed::TimeOutOfRange(i64::MAX).into()
        );
        assert_eq!(s, before);
    }

    proptest::proptest! {
        /// The compact id encoding gives back exactly what it was given, whatever the times
        /// (out of order, extremes) and hashes.
        #[test]
        fn recent_ids_round_trip_through_the_store_encoding(
            ids in proptest::collection::vec(
                (proptest::prelude::any::<i64>(), proptest::prelude::any::<u64>()),
                0..64,
            ),
        ) {
            let mut s = UserState::new("u");
            s.recent_ids = ids.into_iter().collect();
            let bytes = postcard::to_allocvec(&s).unwrap();
            let back: UserState = postcard::from_bytes(&bytes).unwrap();
            proptest::prop_assert_eq!(back.recent_ids, s.recent_ids);
        }
    }

    #[test]
    fn recent_ids_are_stored_in_about_eleven_bytes_each_and_damage_is_an_error() {
        let mut s = UserState::new("u");
        let base = NOON;
        s.recent_ids = (0..1024)
            .map(|i| {
                (
                    base + i * 60_000,
                    xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()),
                )
            })
            .chain([(i64::MIN, 0), (i64::MAX, u64::MAX), (-5, 1)])
            .collect();
        let plain = postcard::to_allocvec(&s.recent_ids).unwrap().len();
        let bytes = postcard::to_allocvec(&s).unwrap();
        let empty = postcard::to_allocvec(&UserState::new("u")).unwrap().len();
        let per_id = (bytes.len() - empty) as f64 / s.recent_ids.len() as f64;
        assert!(per_id < 12.0, "{per_id} bytes per id");
        assert!(
            plain as f64 / s.recent_ids.len() as f64 > 15.0,
            "plain {plain}"
        );
        let back: UserState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.recent_ids, s.recent_ids);
        // A byte string cut inside an id is refused, not read short. (postcard writes a byte
        // string as its length, then the bytes: the same as a `Vec<u8>`.)
        #[derive(Deserialize, Debug)]
        struct Ids(#[serde(with = "super::ids_codec")] VecDeque<(i64, u64)>);
        let whole = {
            let mut b = vec![0x02]; // time delta +1 (zigzag 2)
            b.extend_from_slice(&7u64.to_le_bytes());
            b
        };
        let ok: Ids = postcard::from_bytes(&postcard::to_allocvec(&whole).unwrap()).unwrap();
        assert_eq!(ok.0, VecDeque::from([(1, 7)]));
        for cut in [&whole[..5], &[0x80][..], &[0xff; 11][..]] {
            let bytes = postcard::to_allocvec(&cut.to_vec()).unwrap();
            assert!(postcard::from_bytes::<Ids>(&bytes).is_err(), "{cut:?}");
        }
    }

    #[test]
    fn state_round_trips_through_serde_with_its_index_rebuilt() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        run(&r, &mut s, Behaviour::OfflinePayment, 500, 40, NOON);
        let json = serde_json_like(&s);
        let mut back: UserState = json;
        assert_eq!(back, s);
        let dup = credit(
            "offline_payment-1764043200000-3",
            NOON + 3,
            Behaviour::OfflinePayment,
            500,
        );
        assert_eq!(r.apply(&mut back, &dup).unwrap_err(), Rejection::Duplicate);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_projection_is_at_most_five_cache_lines() {
        // The fold reads nearly every field of a projection for each event, and the look-ahead
        // prefetches all of it: each line more is one more miss per event for a user not in
        // cache (BENCHMARKS.md, session 22). A new field should displace or box another.
        // (Six lines until session 27 took the credit notes' rule table out: 304 bytes.)
        let size = std::mem::size_of::<UserState>();
        assert!(size <= 5 * 64, "UserState is {size} bytes");
    }

    #[test]
    fn the_user_id_is_stored_as_a_plain_string_whatever_its_length() {
        // Projections written while `user_id` was a `String` must still load: postcard writes
        // a string as its length and bytes, inline or not.
        for id in [
            "user-0000042",
            "an-id-of-more-than-twenty-four-bytes/with/slashes",
        ] {
            let s = UserState::new(id);
            assert_eq!(s.user_id.is_heap_allocated(), id.len() > 24, "{id}");
            let bytes = postcard::to_allocvec(&s).unwrap();
            // As a `String` was written: its length (one varint byte here), then its bytes.
            let mut plain = vec![u8::try_from(id.len()).unwrap()];
            plain.extend_from_slice(id.as_bytes());
            assert!(bytes.starts_with(&plain), "{id}: {bytes:?}");
            let back: UserState = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back.user_id, id);
            assert_eq!(back, s);
        }
    }

    #[test]
    fn the_id_index_is_a_set() {
        // Against a std set, through growth and heavy churn (backward-shift deletion), with
        // hashes that collide in their slot and the hash 0.
        let mut ix = IdIndex::from_ids([7, 0, 9].into_iter(), 3);
        let mut set: std::collections::HashSet<u64> = [7, 0, 9].into();
        let mut x = 1u64;
        for i in 0..200_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Few distinct values: the table fills, grows and churns.
            let h = match x >> 62 {
                0 => 0,
                1 => ((x >> 40) % 16) << 60,
                _ => (x >> 30) % 3_000,
            };
            if i % 3 == 0 {
                assert_eq!(ix.contains(h), set.contains(&h), "{h}");
            } else if (x >> 20) % 2 == 0 {
                ix.insert(h);
                set.insert(h);
            } else {
                ix.remove(h);
                set.remove(&h);
            }
            assert_eq!(ix.len + usize::from(ix.has_zero), set.len());
        }
        for h in 0..3_000 {
            assert_eq!(ix.contains(h), set.contains(&h), "{h}");
        }
    }

    #[test]
    fn cached_days_match_chrono_tz() {
        // Hours across DST switches (London, New York, Lord Howe's 30 min, Chatham) and a
        // fixed zone, in and out of order: through both caches, the answer of `day_of`.
        let mut s = UserState::new("u");
        let zones = [
            chrono_tz::Europe::London,
            chrono_tz::America::New_York,
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::Pacific::Chatham,
            chrono_tz::Asia::Shanghai,
        ];
        let start = 1_740_000_000_000i64;
        for step in 0..(400 * 24 * 4) {
            let ms = start + step * 15 * 60_000 + (step * 7_919) % 60_000;
            for tz in zones {
                let want = day_of(tz, ms).map(|(b, _)| b);
                assert_eq!(s.buckets(tz, ms), want, "{tz} {ms}");
                assert_eq!(shared_day_of(tz, ms - 73 * H).map(|(b, _)| b), {
                    day_of(tz, ms - 73 * H).map(|(b, _)| b)
                });
            }
        }
    }

    /// The default rules with `from` replaced by `to` (which must be there).
    fn rules_with(from: &str, to: &str) -> RuleSet {
        assert!(crate::DEFAULT_RULES_TOML.contains(from), "{from}");
        RuleSet::from_toml(&crate::DEFAULT_RULES_TOML.replacen(from, to, 1)).unwrap()
    }

    /// The store's encoding (postcard) there and back.
    fn stored(s: &UserState) -> UserState {
        postcard::from_bytes(&postcard::to_allocvec(s).unwrap()).unwrap()
    }

    #[test]
    fn a_credit_keeps_its_rules_version_and_rule_id_across_a_rules_change() {
        let v1 = RuleSet::default();
        // v2 renames the bus rule and changes its grams.
        let v2 = RuleSet::from_toml(
            &crate::DEFAULT_RULES_TOML
                .replacen("version = \"2026.11-2\"", "version = \"2027.01-1\"", 1)
                .replacen("id = \"bus_ride.v1\"", "id = \"bus_ride.v2\"", 1)
                .replacen("grams = 80 ", "grams = 60 ", 1),
        )
        .unwrap();
        let mut s = UserState::new("u");
        v1.apply(&mut s, &credit("a", NOON, Behaviour::BusRide, 0))
            .unwrap();
        v1.apply(&mut s, &credit("b", NOON + 1, Behaviour::SubwayRide, 0))
            .unwrap();
        // Stored, then read back by a processor that has loaded v2.
        let mut back = stored(&s);
        assert_eq!(back, s);
        let o = v2
            .apply(&mut back, &credit("c", NOON + 2, Behaviour::BusRide, 0))
            .unwrap();
        assert_eq!(o.credit.unwrap().credited_g, 60);
        let shown: Vec<_> = stored(&back)
            .recent_credits
            .iter()
            .map(|n| {
                let r = back.note_rule(n).unwrap();
                (
                    n.behaviour,
                    r.rules_version.to_string(),
                    r.rule_id.to_string(),
                    n.credited_g,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    Behaviour::BusRide,
                    "2026.11-2".into(),
                    "bus_ride.v1".into(),
                    80
                ),
                (
                    Behaviour::SubwayRide,
                    "2026.11-2".into(),
                    "subway_ride.v1".into(),
                    52
                ),
                (
                    Behaviour::BusRide,
                    "2027.01-1".into(),
                    "bus_ride.v2".into(),
                    60
                ),
            ]
        );
    }

    #[test]
    fn credit_notes_stay_few_and_name_their_rules_through_stored_round_trips() {
        // Many behaviours in turn, through stored round trips: every note still names its own
        // rule, and no more than RECENT_CREDITS notes are kept.
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let all = Behaviour::ALL;
        for i in 0..200usize {
            let b = all[(i * 7 + i / 3) % all.len()];
            r.apply(&mut s, &credit(&format!("e{i}"), NOON + i as i64, b, 5_000))
                .unwrap();
            if i % 17 == 0 {
                s = stored(&s);
            }
            assert!(s.recent_credits.len() <= RECENT_CREDITS);
            for n in &s.recent_credits {
                let nr = s.note_rule(n).unwrap();
                assert_eq!(*nr.rule_id, r.rule(n.behaviour).unwrap().id);
                assert_eq!(*nr.rules_version, r.version);
            }
        }
    }

    fn from_hex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Bytes written by session 26's code (serde's derive, with the per-user rule table kept in
    /// memory): bus, subway, bus and e-invoice credits, at 1_795_000_000_000 + 0..4 ms.
    const STORED_BEFORE_27_A: &str = "0175d901d901000000000186f8b2e5bd6800030100c4a95a02a0010200c4a95a01340900c4a95a01052980f8b2e5bd68caae0aa23395b926023c97ecc50384fdb8023842893272ff9188027af8e819635945840480f8b2e5bd68010050500082f8b2e5bd68020134340084f8b2e5bd68010050500086f8b2e5bd6809020505000309323032362e31312d320b6275735f726964652e763109323032362e31312d320e7375627761795f726964652e763109323032362e31312d320c655f696e766f6963652e763100";
    /// The same user after 23 more credits over many behaviours (ids `e0`..`e22`, at
    /// 1_795_000_000_100 + i ms): its table's entries were reused out of the notes' order.
    const STORED_BEFORE_27_B: &str = "0175e317e3170000000001f4f9b2e5bd68000e0100c4a95a03f0010200c4a95a02680900c4a95a01050000c4a95a03a802070184fc020290020e0184fc02010a0e00c4a95a010a050184fc020392060c00c4a95a020a0a0184fc0203d8010f00c4a95a01ac020300c4a95a02c801080184fc0202aa040d00c4a95a0132f90180f8b2e5bd68caae0aa23395b926023c97ecc50384fdb8023842893272ff9188027af8e81963594584c201a07203fd72379fc502efea503b02247e1f02b4973ad4fb58669102150b352e71ad805a02346ad1fe7fd5b749024db2080f01066618025e5456aba6c6eae0029bba8cf5f07e10a6025468563d48540c6f02050186cdfe188f1402d60e8d1a88b7af670285eb331e31a27e82020bf28d66253a5cec02a5730a157a47575a02daf36095f38a22d2020a3ba66fc74bb12f0201023cd9d40f8ba902f08cd282100547be02131c2ed13f1d4c3402cf7216f339e7efd002077f2abdd35075e3025accb626734d838e020159f2a93011289e05ecf9b2e5bd680d00323200eef9b2e5bd680302646400f0f9b2e5bd680a03484800f2f9b2e5bd680104505000f4f9b2e5bd68080195029502000509323032362e31312d320f7265757361626c655f6375702e763109323032362e31312d3217686f73706974616c5f6170706f696e746d656e742e763109323032362e31312d320c62696b655f726964652e763109323032362e31312d320f747261666669635f66696e652e763109323032362e31312d320b6275735f726964652e76310100c4a95ab0ea0100";

    #[test]
    fn projections_stored_before_the_rule_pairs_read_and_write_as_before() {
        const AT: i64 = 1_795_000_000_000;
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let seq = [
            Behaviour::BusRide,
            Behaviour::SubwayRide,
            Behaviour::BusRide,
            Behaviour::EInvoice,
        ];
        for (i, b) in seq.into_iter().enumerate() {
            r.apply(&mut s, &credit(&format!("a{i}"), AT + i as i64, b, 3_000))
                .unwrap();
        }
        // Written byte for byte as before (the old table was in first-use order here).
        let a = from_hex(STORED_BEFORE_27_A);
        assert_eq!(postcard::to_allocvec(&s).unwrap(), a);
        assert_eq!(postcard::from_bytes::<UserState>(&a).unwrap(), s);
        let all = Behaviour::ALL;
        for i in 0..23usize {
            let b = all[(i * 7 + i / 3) % all.len()];
            r.apply(
                &mut s,
                &credit(&format!("e{i}"), AT + 100 + i as i64, b, 5_000),
            )
            .unwrap();
        }
        // Read into the same notes, each naming its own rule, though the old table's order
        // differs from the one written now.
        let b = from_hex(STORED_BEFORE_27_B);
        let old: UserState = postcard::from_bytes(&b).unwrap();
        assert_eq!(old, s);
        let named: Vec<_> = old
            .recent_credits
            .iter()
            .map(|n| (n.behaviour, old.note_rule(n).unwrap().rule_id, n.credited_g))
            .collect();
        assert_eq!(
            named,
            [
                (Behaviour::ReusableCup, "reusable_cup.v1", 50),
                (Behaviour::BikeRide, "bike_ride.v1", 100),
                (Behaviour::TrafficFine, "traffic_fine.v1", 72),
                (Behaviour::BusRide, "bus_ride.v1", 80),
                (
                    Behaviour::HospitalAppointment,
                    "hospital_appointment.v1",
                    277
                ),
            ]
        );
        let again = postcard::to_allocvec(&s).unwrap();
        assert_ne!(again, b, "the table is now in first-use order");
        assert_eq!(postcard::from_bytes::<UserState>(&again).unwrap(), s);
    }

    #[test]
    fn a_note_whose_index_the_table_lacks_reads_as_naming_no_rule() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        r.apply(&mut s, &credit("a", NOON, Behaviour::BusRide, 3_000))
            .unwrap();
        let mut bytes = postcard::to_allocvec(&s).unwrap();
        // The stored table is the last but one field, the day quantities (empty: one 0 byte)
        // the last; drop the table's one entry (count 1, then two strings) for an empty one.
        let entry = postcard::to_allocvec(s.note_rule(&s.recent_credits[0]).unwrap()).unwrap();
        let table_at = bytes.len() - 1 - entry.len() - 1;
        assert_eq!(bytes[table_at], 1);
        bytes.drain(table_at..bytes.len() - 1);
        bytes.insert(table_at, 0);
        let back: UserState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.recent_credits.len(), 1);
        assert_eq!(back.note_rule(&back.recent_credits[0]), None);
        // And is written back with the index 255, which no table holds, and the empty table.
        // The note's index is followed by its raw and credited grams (80: a byte each) and
        // its `limited_by` (none: a byte), then comes the table.
        let written = postcard::to_allocvec(&back).unwrap();
        let rule_at = table_at - 4;
        assert_eq!(bytes[rule_at], 0, "the note's stored index");
        let mut expected = bytes.clone();
        expected[rule_at] = u8::MAX;
        assert_eq!(written, expected);
        let again: UserState = postcard::from_bytes(&written).unwrap();
        assert_eq!(again, back);
    }

    #[test]
    fn notes_naming_no_rule_are_not_counted_in_the_stored_table() {
        // Notes naming [bus, none, e-invoice, bus] are stored with the indices [0, 255, 1, 0]
        // and the table [bus, e-invoice].
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let behaviours = [
            Behaviour::BusRide,
            Behaviour::BusRide,
            Behaviour::EInvoice,
            Behaviour::BusRide,
        ];
        for (i, b) in behaviours.into_iter().enumerate() {
            r.apply(&mut s, &credit(&format!("e{i}"), NOON + i as i64, b, 3_000))
                .unwrap();
        }
        s.recent_credits[1].rule = None;
        /// The stored layout, read field by field.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Note {
            event_ms: i64,
            behaviour: Behaviour,
            rule: u8,
            raw_g: u64,
            credited_g: u64,
            limited_by: Option<NoteLimit>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Stored {
            user_id: CompactString,
            balance_g: u64,
            lifetime_g: u64,
            spent_g: u64,
            trees_matured: u64,
            species: Option<String>,
            timezone: Option<Tz>,
            newest_event_ms: Option<i64>,
            dedupe_floor_ms: Option<i64>,
            counters: Vec<Counter>,
            #[serde(with = "super::ids_codec")]
            recent_ids: VecDeque<(i64, u64)>,
            recent_credits: Vec<Note>,
            credit_rules: Vec<NoteRule>,
            day_quantities: Vec<DayQuantity>,
        }
        let bytes = postcard::to_allocvec(&s).unwrap();
        let stored: Stored = postcard::from_bytes(&bytes).unwrap();
        let indices: Vec<u8> = stored.recent_credits.iter().map(|n| n.rule).collect();
        assert_eq!(indices, [0, 255, 1, 0]);
        let ids: Vec<&str> = stored.credit_rules.iter().map(|r| r.rule_id).collect();
        assert_eq!(ids, ["bus_ride.v1", "e_invoice.v1"]);
        assert_eq!(postcard::from_bytes::<UserState>(&bytes).unwrap(), s);
    }

    #[test]
    fn a_month_gram_cap_credits_the_part_that_fits() {
        let r = rules_with(
            "caps = [{ period = \"month\", max_events = 10 }] # approx\n\n[[rules]]\nid = \"movie_ticket.v1\"",
            "caps = [{ period = \"month\", max_grams = 600 }]\n\n[[rules]]\nid = \"movie_ticket.v1\"",
        );
        let cap = r.rule(Behaviour::UtilityBill).unwrap().caps[0];
        assert_eq!(
            cap,
            Cap {
                period: CapPeriod::Month,
                limit: CapLimit::Grams(600)
            }
        );
        let mut s = UserState::new("u");
        // On different days of one month (Nov 2026): 262 + 262 + 76, then nothing.
        let mut got = vec![];
        for d in 0..4 {
            got.extend(run(
                &r,
                &mut s,
                Behaviour::UtilityBill,
                500,
                1,
                NOON + d * 24 * H,
            ));
        }
        assert_eq!(got, [262, 262, 76, 0]);
        let last = s.recent_credits.back().unwrap();
        assert_eq!(
            last.limited_by,
            Some(NoteLimit::Cap(CapPeriod::Month, CapKind::Grams(600)))
        );
        // December (Shanghai time) starts a new month.
        let december = NOON + 6 * 24 * H;
        assert_eq!(
            run(&r, &mut s, Behaviour::UtilityBill, 500, 1, december),
            [262]
        );
    }

    #[test]
    fn apply_rejects_a_behaviour_the_rules_have_no_rule_for() {
        let cut = crate::DEFAULT_RULES_TOML
            .split("[[rules]]\nid = \"e_statement.v1\"")
            .next()
            .unwrap();
        let r = RuleSet::from_toml(cut).unwrap();
        let mut s = UserState::new("u");
        let before = s.clone();
        let e = credit("a", NOON, Behaviour::EStatement, 0);
        let err = r.apply(&mut s, &e).unwrap_err();
        assert!(
            matches!(&err, Rejection::UnknownBehaviour(m) if m.contains("e_statement")),
            "{err:?}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn apply_rejects_a_negative_amount_without_change() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        run(&r, &mut s, Behaviour::OfflinePayment, 500, 1, NOON);
        let before = s.clone();
        let e = credit("neg", NOON + 1, Behaviour::OfflinePayment, -1);
        assert_eq!(
            r.apply(&mut s, &e).unwrap_err(),
            Rejection::NegativeAmount {
                behaviour: Behaviour::OfflinePayment,
                value: -1
            }
        );
        assert_eq!(s, before);
    }

    #[test]
    fn absurd_limits_for_rides_and_payments() {
        let r = RuleSet::default();
        for (b, max) in [
            (Behaviour::BusRide, 500_000),
            (Behaviour::SubwayRide, 500_000),
            (Behaviour::OfflinePayment, 10_000_000_000),
            (Behaviour::UtilityBill, 10_000_000_000),
            (Behaviour::CarpoolRide, 300_000),
            (Behaviour::EBikeRide, 100_000),
        ] {
            let mut s = UserState::new("u");
            assert_eq!(r.rule(b).unwrap().max_quantity, max, "{b}");
            // The maximum itself is fine; one more is absurd and changes nothing.
            r.apply(&mut s, &credit("ok", NOON, b, max)).unwrap();
            let before = s.clone();
            assert_eq!(
                r.apply(&mut s, &credit("big", NOON + 1, b, max + 1))
                    .unwrap_err(),
                Rejection::AbsurdValue {
                    behaviour: b,
                    value: max + 1,
                    max
                },
                "{b}"
            );
            assert_eq!(s, before, "{b}");
        }
    }

    #[test]
    fn a_utility_bill_under_cny_1_earns_nothing_and_is_not_counted() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        assert_eq!(r.rule(Behaviour::UtilityBill).unwrap().min_quantity, 100);
        let o = r
            .apply(&mut s, &credit("a", NOON, Behaviour::UtilityBill, 99))
            .unwrap();
        let c = o.credit.unwrap();
        assert_eq!(
            (c.raw_g, c.credited_g, c.limited_by),
            (0, 0, Some(Limit::BelowMinimum))
        );
        assert!(s.counters.is_empty(), "a 0 g credit does not use the cap");
        assert_eq!(
            run(&r, &mut s, Behaviour::UtilityBill, 100, 1, NOON + 1),
            [262]
        );
    }

    #[test]
    fn grace_window_and_future_skew_come_from_the_rules_file() {
        let r = RuleSet::from_toml(
            &crate::DEFAULT_RULES_TOML
                .replacen("grace_window_hours = 72", "grace_window_hours = 2", 1)
                .replacen("max_future_skew_secs = 600", "max_future_skew_secs = 30", 1),
        )
        .unwrap();
        assert_eq!((r.grace_window_ms, r.max_future_skew_ms), (2 * H, 30_000));
        let mut s = UserState::new("u");
        // 30 s ahead of the record time is fine, 30 s + 1 ms is too early.
        let mut e = credit("a", NOON, Behaviour::BusRide, 0);
        e.received_at_ms = NOON - 30_000;
        r.apply(&mut s, &e).unwrap();
        let mut e = credit("b", NOON + 1, Behaviour::BusRide, 0);
        e.received_at_ms = NOON + 1 - 30_001;
        assert_eq!(r.apply(&mut s, &e).unwrap_err().code(), "too_early");
        // 2 h behind the newest event is fine, 2 h + 1 ms is too late.
        r.apply(&mut s, &credit("c", NOON - 2 * H, Behaviour::BusRide, 0))
            .unwrap();
        assert_eq!(
            r.apply(
                &mut s,
                &credit("d", NOON - 2 * H - 1, Behaviour::BusRide, 0)
            )
            .unwrap_err(),
            Rejection::TooLate {
                occurred_at_ms: NOON - 2 * H - 1,
                horizon_ms: NOON - 2 * H
            }
        );
    }

    #[test]
    fn walking_interval_reports_add_up_to_the_days_absurd_limit() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        // Three intervals of 40,000 steps: the third would make 120,000 > 100,000 in one day.
        assert_eq!(
            run(&r, &mut s, Behaviour::Walking, 40_000, 2, NOON),
            [296, 0]
        );
        let before = s.clone();
        assert_eq!(
            r.apply(
                &mut s,
                &credit("third", NOON + 5, Behaviour::Walking, 40_000)
            )
            .unwrap_err(),
            Rejection::AbsurdValue {
                behaviour: Behaviour::Walking,
                value: 120_000,
                max: 100_000
            }
        );
        assert_eq!(s, before);
        // 20,000 more is exactly the limit; one more step is absurd.
        r.apply(
            &mut s,
            &credit("fill", NOON + 6, Behaviour::Walking, 20_000),
        )
        .unwrap();
        assert_eq!(
            r.apply(&mut s, &credit("one", NOON + 7, Behaviour::Walking, 1))
                .unwrap_err()
                .code(),
            "absurd_value"
        );
        // The next local day starts from 0.
        assert_eq!(
            run(&r, &mut s, Behaviour::Walking, 40_000, 1, NOON + 24 * H),
            [296]
        );
    }

    #[test]
    fn a_walking_day_total_credits_only_its_increase() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        let credited = |s: &mut UserState, e: Event| {
            let c = r.apply(s, &e).unwrap().credit.unwrap();
            (c.raw_g, c.credited_g, c.limited_by)
        };
        // Day totals 3,000 then 5,000: 60 g, then the 2,000 more steps, 40 g.
        assert_eq!(
            credited(&mut s, day_total("d1", NOON, 3_000)),
            (60, 60, None)
        );
        assert_eq!(
            credited(&mut s, day_total("d2", NOON + H, 5_000)),
            (40, 40, None)
        );
        // The same total re-sent under a new event id (or a smaller one) earns nothing.
        assert_eq!(
            credited(&mut s, day_total("d3", NOON + 2 * H, 5_000)),
            (0, 0, Some(Limit::AlreadyCounted))
        );
        assert_eq!(
            credited(&mut s, day_total("d4", NOON + 2 * H, 4_000)),
            (0, 0, Some(Limit::AlreadyCounted))
        );
        // Intervals count the same steps: they earn only once their sum passes the day total.
        assert_eq!(
            credited(
                &mut s,
                credit("i1", NOON + 3 * H, Behaviour::Walking, 4_000)
            ),
            (0, 0, Some(Limit::AlreadyCounted))
        );
        assert_eq!(
            credited(
                &mut s,
                credit("i2", NOON + 4 * H, Behaviour::Walking, 2_000)
            ),
            (20, 20, None)
        );
        assert_eq!(s.balance_g, 120, "the grams of 6,000 steps");
        assert_eq!(
            s.day_quantities,
            [DayQuantity {
                behaviour: Behaviour::Walking,
                day: s.day_quantities[0].day,
                added: 6_000,
                day_total: 5_000
            }]
        );
        // A day total above the limit is absurd even when sent once.
        assert_eq!(
            r.apply(&mut s, &day_total("big", NOON + 5 * H, 100_001))
                .unwrap_err()
                .code(),
            "absurd_value"
        );
    }

    #[test]
    fn walking_day_reports_give_the_same_grams_in_any_order() {
        let r = RuleSet::default();
        let reports = [
            day_total("a", NOON, 2_500),
            credit("b", NOON + 1, Behaviour::Walking, 1_230),
            day_total("c", NOON + 2, 4_100),
            credit("d", NOON + 3, Behaviour::Walking, 1_777),
            credit("e", NOON + 4, Behaviour::Walking, 49),
        ];
        let mut totals = std::collections::BTreeSet::new();
        // Every rotation and its reverse.
        for k in 0..reports.len() {
            for rev in [false, true] {
                let mut order: Vec<_> = reports.iter().cycle().skip(k).take(5).collect();
                if rev {
                    order.reverse();
                }
                let mut s = UserState::new("u");
                for e in order {
                    r.apply(&mut s, e).unwrap();
                }
                totals.insert((s.balance_g, s.day_quantities[0].quantity()));
            }
        }
        // max(1,230 + 1,777 + 49, 4,100) = 4,100 steps = 82 g, whatever the order.
        assert_eq!(totals.into_iter().collect::<Vec<_>>(), [(82, 4_100)]);
    }

    #[test]
    fn day_quantities_are_pruned_with_the_counters() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        for d in 0..10 {
            r.apply(
                &mut s,
                &day_total(&format!("w{d}"), NOON + d * 24 * H, 8_000),
            )
            .unwrap();
        }
        assert!(s.day_quantities.len() <= 4, "{:?}", s.day_quantities);
        assert_eq!(s.balance_g, 10 * 160);
    }

    #[test]
    fn new_mobility_behaviours_are_credited_per_metre_with_a_day_cap() {
        let r = RuleSet::default();
        let mut s = UserState::new("u");
        // Carpool: 136 g/km, at most 300 g a day.
        assert_eq!(
            run(&r, &mut s, Behaviour::CarpoolRide, 1_500, 1, NOON),
            [204]
        );
        assert_eq!(
            run(&r, &mut s, Behaviour::CarpoolRide, 1_500, 1, NOON + H),
            [96]
        );
        // E-bike: 15 g/km, at most 150 g a day.
        assert_eq!(run(&r, &mut s, Behaviour::EBikeRide, 4_000, 1, NOON), [60]);
        assert_eq!(
            run(&r, &mut s, Behaviour::EBikeRide, 8_000, 2, NOON + H),
            [90, 0]
        );
        let c = r.rule(Behaviour::CarpoolRide).unwrap();
        assert_eq!(c.id, "carpool_ride.v1");
        assert_eq!(r.rule(Behaviour::EBikeRide).unwrap().id, "e_bike_ride.v1");
    }

    /// A serde round trip through TOML, to test that the derived fields are not stored.
    fn serde_json_like(s: &UserState) -> UserState {
        let text = toml::to_string(s).unwrap();
        toml::from_str(&text).unwrap()
    }
}
