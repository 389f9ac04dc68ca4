//! Rule identities held once for the life of the process.
//!
//! Why: every credit note names the rules version and rule id it was made under
//! ([`crate::NoteRule`]). Shared as `Arc<str>`, they cost atomic read-modify-writes on
//! counters every worker shares, and each projection read from the store allocated its
//! strings anew; interned, a read allocates nothing for them (BENCHMARKS.md, session 15: no
//! change in the fold, 3 % in a benchmark that reads every projection back).
//!
//! The table never shrinks. Legitimately it holds the distinct rules versions and rule ids of
//! the rules files this process loaded and of the projections it read: a few per rules
//! version. Stored bytes that are not (a corrupt projection) could name any strings, so the
//! table is bounded: past [`MAX_INTERNED`] distinct strings a new one is refused, and the
//! projection naming it fails to read instead of growing the process without end.
//!
//! Each thread remembers the strings it interned last, so reading a projection normally takes
//! no lock: the workers would otherwise share the table's lock on every load.
//!
//! The (rules version, rule id) pairs are interned the same way, on top of the strings
//! ([`intern_rule`]): a credit note names its rule by a pointer to the pair, so the fold sets
//! it with one store, and a projection needs no rule table of its own in memory (BENCHMARKS.md,
//! session 27: keeping such a table cost the fold 18-24 % at 100 users).

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::NoteRule;

/// Most distinct strings the process interns, and separately most distinct (rules version,
/// rule id) pairs: far above any deployment's rules history (200 rules versions of 20 rules
/// is 4,200 of each), far below a memory problem (a few MiB).
pub(crate) const MAX_INTERNED: usize = 1 << 16;

/// Strings each thread looked up last, checked before the shared table.
const RECENT: usize = 32;

static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
static RULES: OnceLock<Mutex<HashSet<&'static NoteRule>>> = OnceLock::new();

thread_local! {
    static RECENTLY: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
    static RECENT_RULES: RefCell<Vec<&'static NoteRule>> = const { RefCell::new(Vec::new()) };
}

/// Keeps `x` among a thread's last [`RECENT`] lookups.
fn remember<T: Copy>(recent: &RefCell<Vec<T>>, x: T) {
    let mut r = recent.borrow_mut();
    if r.len() >= RECENT {
        r.remove(0);
    }
    r.push(x);
}

/// `wanted`'s copy in `table`, made by `leak` on first use; `None` if it is new and the
/// table already holds [`MAX_INTERNED`] values.
fn find_or_leak<T: Eq + std::hash::Hash + ?Sized>(
    table: &'static OnceLock<Mutex<HashSet<&'static T>>>,
    wanted: &T,
    leak: impl FnOnce() -> &'static T,
) -> Option<&'static T> {
    let table = table.get_or_init(Mutex::default);
    // A panic while the lock was held cannot leave the set half-changed: `insert` of a leaked
    // value is the only write.
    let mut set = table.lock().unwrap_or_else(PoisonError::into_inner);
    match set.get(wanted) {
        Some(&interned) => Some(interned),
        None if set.len() >= MAX_INTERNED => None,
        None => {
            let interned = leak();
            set.insert(interned);
            Some(interned)
        }
    }
}

/// The process's one copy of `s`, made on first use; `None` if `s` is new and the table
/// already holds [`MAX_INTERNED`] strings.
pub(crate) fn intern(s: &str) -> Option<&'static str> {
    if let Some(hit) = RECENTLY.with(|r| r.borrow().iter().copied().find(|&x| x == s)) {
        return Some(hit);
    }
    let interned = find_or_leak(&TABLE, s, || Box::leak(Box::from(s)))?;
    RECENTLY.with(|r| remember(r, interned));
    Some(interned)
}

/// The process's one copy of the pair (`rules_version`, `rule_id`), its strings interned too;
/// `None` if either string or the pair is new and its table is full (see [`MAX_INTERNED`]).
pub(crate) fn intern_rule(rules_version: &str, rule_id: &str) -> Option<&'static NoteRule> {
    let hit = RECENT_RULES.with(|r| {
        r.borrow()
            .iter()
            .copied()
            .find(|x| x.rules_version == rules_version && x.rule_id == rule_id)
    });
    if hit.is_some() {
        return hit;
    }
    let wanted = NoteRule {
        rules_version: intern(rules_version)?,
        rule_id: intern(rule_id)?,
    };
    let interned = find_or_leak(&RULES, &wanted, || Box::leak(Box::new(wanted)))?;
    RECENT_RULES.with(|r| remember(r, interned));
    Some(interned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy() {
        let a = intern(&String::from("2026.11-1")).unwrap();
        let b = intern(&String::from("2026.11-1")).unwrap();
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "2026.11-1");
        let c = intern("walking-v2").unwrap();
        assert!(!std::ptr::eq(a, c));
        assert_eq!(c, "walking-v2");
        // From another thread (its own recent list, empty): the same copies.
        let (a2, c2) =
            std::thread::spawn(|| (intern("2026.11-1").unwrap(), intern("walking-v2").unwrap()))
                .join()
                .unwrap();
        assert!(std::ptr::eq(a, a2) && std::ptr::eq(c, c2));
    }

    #[test]
    fn equal_rule_pairs_share_one_copy_whatever_thread() {
        let p = intern_rule(&String::from("2026.11-1"), "walking-v2").unwrap();
        assert_eq!((p.rules_version, p.rule_id), ("2026.11-1", "walking-v2"));
        assert!(std::ptr::eq(p.rules_version, intern("2026.11-1").unwrap()));
        assert!(std::ptr::eq(
            p,
            intern_rule("2026.11-1", "walking-v2").unwrap()
        ));
        // ("a", "b.c") and ("a.b", "c") are different pairs.
        let q = intern_rule("2026.11-1.walking-v2", "").unwrap();
        assert!(!std::ptr::eq(p, q));
        let other = std::thread::spawn(|| {
            std::ptr::from_ref(intern_rule("2026.11-1", "walking-v2").unwrap()) as usize
        })
        .join()
        .unwrap();
        assert_eq!(std::ptr::from_ref(p) as usize, other);
    }
}
