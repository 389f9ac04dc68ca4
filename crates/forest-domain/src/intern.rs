//! Rule identities held once for the life of the process.
//!
//! Why: every credit note names the rules version and rule id it was made under
//! ([`crate::NoteRule`]). Shared as `Arc<str>`, reusing a projection's rule table entry for
//! another rule cost up to four (usually two) atomic read-modify-writes on counters every
//! worker shares, and each projection read from the store allocated its strings anew.
//! Interned, an entry is two plain pointers and a read allocates nothing for it
//! (BENCHMARKS.md, session 15, has what that measured: no change in the fold, 3 % in a
//! benchmark that reads every projection back).
//!
//! The table never shrinks. Legitimately it holds the distinct rules versions and rule ids of
//! the rules files this process loaded and of the projections it read: a few per rules
//! version. Stored bytes that are not (a corrupt projection) could name any strings, so the
//! table is bounded: past [`MAX_INTERNED`] distinct strings a new one is refused, and the
//! projection naming it fails to read instead of growing the process without end.
//!
//! Each thread remembers the strings it interned last, so reading a projection normally takes
//! no lock: the workers would otherwise share the table's lock on every load.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Most distinct strings the process interns: far above any deployment's rules history (200
/// rules versions of 20 rules is 4,200), far below a memory problem (a few MiB).
pub(crate) const MAX_INTERNED: usize = 1 << 16;

/// Strings each thread looked up last, checked before the shared table.
const RECENT: usize = 32;

static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();

thread_local! {
    static RECENTLY: RefCell<Vec<&'static str>> = const { RefCell::new(Vec::new()) };
}

/// The process's one copy of `s`, made on first use; `None` if `s` is new and the table
/// already holds [`MAX_INTERNED`] strings.
pub(crate) fn intern(s: &str) -> Option<&'static str> {
    if let Some(hit) = RECENTLY.with(|r| r.borrow().iter().copied().find(|&x| x == s)) {
        return Some(hit);
    }
    let interned = {
        let table = TABLE.get_or_init(Mutex::default);
        // A panic while the lock was held cannot leave the set half-changed: `insert` of a
        // leaked string is the only write.
        let mut set = table.lock().unwrap_or_else(PoisonError::into_inner);
        match set.get(s) {
            Some(&interned) => interned,
            None if set.len() >= MAX_INTERNED => return None,
            None => {
                let interned: &'static str = Box::leak(Box::from(s));
                set.insert(interned);
                interned
            }
        }
    };
    RECENTLY.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() >= RECENT {
            r.remove(0);
        }
        r.push(interned);
    });
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
}
