//! Forest's pure carbon domain: the rules that turn low-carbon behaviour into grams of "green
//! energy", the per-user projection, and [`RuleSet::apply`], the fold from events to state.
//!
//! This crate does no I/O and reads no clock: no tokio, rdkafka or RocksDB. That is what lets
//! the processor replay a Kafka log after a crash and arrive at exactly the same projections,
//! and what lets tests compare the real pipeline against a plain in-memory fold.
//!
//! Guarantees of [`RuleSet::apply`]:
//! - deterministic: the same events in the same order from the same state give the same state
//!   and outcomes;
//! - a rejected event leaves the state unchanged, and every rejection is a typed [`Rejection`];
//! - no cap in the rules file is ever exceeded;
//! - conservation: `lifetime_g == balance_g + spent_g`;
//! - an event id is credited at most once per user (see [`UserState`] for the bound);
//! - a tree's id is `<user_id>/<seq>`, so a replay re-emits the same tree ids;
//! - a day-scoped rule (walking) credits a user's day once: a day total and interval reports
//!   of the same steps are not both credited, and the day's quantity never exceeds the rule's
//!   `max_quantity` (see [`QuantityScope::Day`]).
//!
//! Decoding ([`Event::decode`], [`Event::decode_into`]) gives the same event or rejection as
//! prost's decode followed by the contract's checks, whichever path a record takes (the
//! common shapes are read without copies, everything else by prost).

pub mod batch;
mod behaviour;
mod event;
mod intern;
mod rejection;
mod rules;
mod state;
mod wire;

pub use behaviour::{Behaviour, Unit};
pub use event::{Action, Event, InputKind, MAX_ID_BYTES, MAX_SOURCE_BYTES, MAX_TEXT_BYTES, Tally};
pub use rejection::{Malformed, Rejection};
pub use rules::{
    Cap, CapLimit, CapPeriod, DEFAULT_RULES_TOML, Earn, QuantityScope, Rule, RuleSet, RulesError,
    Species,
};
pub use state::prefetch_lines;
pub use state::{
    Bucket, CapKind, Counter, Credit, CreditNote, DayQuantity, Limit, NoteLimit, NoteRule, Outcome,
    RECENT_CREDITS, UserState, tree_id,
};
