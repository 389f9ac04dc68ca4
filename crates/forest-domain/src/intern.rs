//! Rule identities held once for the life of the process.
//!
//! Why: every credit note names the rules version and rule id it was made under
//! ([`crate::NoteRule`]). Shared as `Arc<str>`, each reuse of a projection's rule table entry
//! cost four atomic read-modify-writes on counters every worker shares, and each projection
//! read from the store allocated its strings anew. Interned, an entry is two plain pointers
//! and a read allocates nothing for it (BENCHMARKS.md, session 15, has what that measured).
//!
//! The table never shrinks. It holds the distinct rules versions and rule ids of the rules
//! files this process loaded and of the projections it read: a few per rules version.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();

/// The process's one copy of `s`, made on first use.
pub(crate) fn intern(s: &str) -> &'static str {
    let table = TABLE.get_or_init(Mutex::default);
    // A panic while the lock was held cannot leave the set half-changed: `insert` of a
    // leaked string is the only write.
    let mut set = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&interned) = set.get(s) {
        return interned;
    }
    let interned: &'static str = Box::leak(Box::from(s));
    set.insert(interned);
    interned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_copy() {
        let a = intern(&String::from("2026.11-1"));
        let b = intern(&String::from("2026.11-1"));
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "2026.11-1");
        let c = intern("walking-v2");
        assert!(!std::ptr::eq(a, c));
        assert_eq!(c, "walking-v2");
    }
}
