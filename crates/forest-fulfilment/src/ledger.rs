//! The fulfilment state machine, free of I/O: which tree goes to which site, the backlog, the
//! capacity used per season, and what each confirmation does. The runtime feeds it records and
//! persists what it changed; unit tests drive it directly.
//!
//! Determinism: every choice depends only on the ledger's state and the input, never on the
//! clock or on hash order, so the same inputs in the same order give the same orders.
//!
//! Seasons: a season is a calendar year (UTC). The current season is the latest year of any
//! `matured_at` seen (event time, so a replay agrees). A tree is planted in the current season
//! or later, never in the past: when a new season starts, the backlog is retried against its
//! fresh capacity before the tree that opened it.

use crate::partners::Partners;
use chrono::Datelike;
use forest_proto::v1::planting_confirmed::Result as Report;
use forest_proto::v1::{Certificate, PlantingConfirmed, PlantingOrder, TreeMatured};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Why a tree waits in the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BacklogReason {
    /// No active partner plants the species at all.
    NoPartnerForSpecies,
    /// Partners plant it, but every site is full for the season.
    CapacityExhausted,
    /// Every site with capacity already rejected this tree.
    AllSitesRejected,
}

impl BacklogReason {
    /// Metric label and log code.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoPartnerForSpecies => "no_partner_for_species",
            Self::CapacityExhausted => "capacity_exhausted",
            Self::AllSitesRejected => "all_sites_rejected",
        }
    }
}

/// Where an order stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderState {
    /// Sent to a partner; waiting for its report.
    Allocated {
        partner_id: String,
        site_id: String,
        region: String,
        season: i32,
    },
    /// No site could take it yet.
    Backlog { reason: BacklogReason, seq: u64 },
    /// Closed: planted, certificate issued. Keeps its slot of the season's capacity.
    Planted {
        partner_id: String,
        site_id: String,
        season: i32,
        tree_code: String,
    },
}

/// One tree's order, stored under its `order_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub order_id: String,
    pub tree_id: String,
    pub user_id: String,
    pub species_id: String,
    pub matured_at_ms: i64,
    /// Allocations made so far (0 while it never left the backlog).
    pub attempt: u32,
    /// Sites that rejected this tree; never chosen again for it.
    pub rejected_by: Vec<String>,
    pub state: OrderState,
}

/// The order id of a tree: derived, so a re-delivered TreeMatured finds its order.
pub fn order_id(tree_id: &str) -> String {
    format!("order:{tree_id}")
}

/// What partners pass to their own systems: equal for every re-delivery of one allocation,
/// different for a re-allocation (which is a new request to a new site).
pub fn idempotency_key(order_id: &str, attempt: u32) -> String {
    format!("{order_id}#{attempt}")
}

pub fn certificate_id(order_id: &str) -> String {
    format!("certificate:{order_id}")
}

/// Where the ledger reads and writes orders: the store plus the batch's unwritten changes in
/// the runtime, a map in tests.
pub trait OrderBook {
    type Error;
    fn get(&mut self, order_id: &str) -> Result<Option<OrderRecord>, Self::Error>;
    fn put(&mut self, record: OrderRecord);
}

impl OrderBook for BTreeMap<String, OrderRecord> {
    type Error = std::convert::Infallible;
    fn get(&mut self, order_id: &str) -> Result<Option<OrderRecord>, Self::Error> {
        Ok(BTreeMap::get(self, order_id).cloned())
    }
    fn put(&mut self, record: OrderRecord) {
        self.insert(record.order_id.clone(), record);
    }
}

/// An output the runtime must emit (through the outbox).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Order(PlantingOrder),
    Certificate(Certificate),
}

/// What became of a TreeMatured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeOutcome {
    Ordered,
    Backlogged(BacklogReason),
    /// Its order exists already (a re-delivery).
    Duplicate,
    /// Not a valid TreeMatured; the runtime dead-letters it.
    Invalid(String),
}

/// What became of a confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmationOutcome {
    /// Order closed, certificate emitted.
    Planted,
    /// Rejected, and the tree went to another site...
    Reallocated,
    /// ...or to the backlog.
    Backlogged(BacklogReason),
    /// Already applied (a re-delivered report).
    Duplicate,
    /// No such order.
    Unknown,
    /// Contradicts the order's state: from a partner the order is not with, or a rejection of
    /// a planted tree.
    Stale(String),
    Invalid(String),
}

impl ConfirmationOutcome {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Planted => "planted",
            Self::Reallocated => "reallocated",
            Self::Backlogged(_) => "backlogged",
            Self::Duplicate => "duplicate",
            Self::Unknown => "unknown_order",
            Self::Stale(_) => "stale",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// Capacity used at one site for one species in one season.
type UsedKey = (i32, String, String);

pub struct Ledger {
    partners: Partners,
    season: i32,
    used: BTreeMap<UsedKey, u32>,
    /// FIFO: backlog seq -> (order id, species).
    backlog: BTreeMap<u64, (String, String)>,
    next_seq: u64,
    changes: Changes,
}

/// What changed since the runtime last persisted, as key-value writes.
#[derive(Default)]
struct Changes {
    used: BTreeSet<UsedKey>,
    backlog_added: BTreeSet<u64>,
    backlog_removed: BTreeSet<u64>,
    meta: bool,
}

/// Key prefixes of the fulfilment's state in the store's key-value column family.
pub mod keys {
    pub const ORDER: &[u8] = b"o/";
    pub const USED: &[u8] = b"u/";
    pub const BACKLOG: &[u8] = b"b/";
    pub const META: &[u8] = b"m/ledger";

    pub fn order(order_id: &str) -> Vec<u8> {
        [ORDER, order_id.as_bytes()].concat()
    }
    pub fn used(season: i32, site: &str, species: &str) -> Vec<u8> {
        format!("u/{season}/{site}/{species}").into_bytes()
    }
    pub fn backlog(seq: u64) -> Vec<u8> {
        [BACKLOG, &seq.to_be_bytes()].concat()
    }
}

/// A stored value that does not decode: the store was written by something else.
#[derive(Debug, thiserror::Error)]
#[error("fulfilment state under {key} is corrupt: {reason}")]
pub struct CorruptState {
    pub key: String,
    pub reason: String,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain structs of strings and integers into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(key: &[u8], bytes: &'a [u8]) -> Result<T, CorruptState> {
    postcard::from_bytes(bytes).map_err(|e| CorruptState {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl Ledger {
    pub fn new(partners: Partners) -> Self {
        Self {
            partners,
            season: i32::MIN,
            used: BTreeMap::new(),
            backlog: BTreeMap::new(),
            next_seq: 0,
            changes: Changes::default(),
        }
    }

    /// Rebuilds the ledger from its stored key-value pairs (`keys::USED`, `keys::BACKLOG`
    /// prefixes and `keys::META`).
    pub fn load(
        partners: Partners,
        used: &[(Vec<u8>, Vec<u8>)],
        backlog: &[(Vec<u8>, Vec<u8>)],
        meta: Option<&[u8]>,
    ) -> Result<Self, CorruptState> {
        let mut l = Self::new(partners);
        for (k, v) in used {
            let (season, site, species, n): (i32, String, String, u32) = decode(k, v)?;
            l.used.insert((season, site, species), n);
        }
        for (k, v) in backlog {
            let seq = k
                .strip_prefix(keys::BACKLOG)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| CorruptState {
                    key: String::from_utf8_lossy(k).into_owned(),
                    reason: "backlog key is not b/<u64>".into(),
                })?;
            l.backlog.insert(seq, decode(k, v)?);
        }
        if let Some(m) = meta {
            (l.season, l.next_seq) = decode(keys::META, m)?;
        }
        Ok(l)
    }

    /// Key-value writes (`None` deletes) for everything changed since the last call.
    pub fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let c = std::mem::take(&mut self.changes);
        let mut out = Vec::new();
        for k in c.used {
            let n = self.used.get(&k).copied().unwrap_or(0);
            let key = keys::used(k.0, &k.1, &k.2);
            out.push((key, Some(encode(&(k.0, &k.1, &k.2, n)))));
        }
        for seq in c.backlog_removed {
            if !c.backlog_added.contains(&seq) {
                out.push((keys::backlog(seq), None));
            }
        }
        for seq in c.backlog_added {
            if let Some(v) = self.backlog.get(&seq) {
                out.push((keys::backlog(seq), Some(encode(v))));
            }
        }
        if c.meta {
            out.push((
                keys::META.to_vec(),
                Some(encode(&(self.season, self.next_seq))),
            ));
        }
        out
    }

    pub fn partners(&self) -> &Partners {
        &self.partners
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// The current season (year), if any tree was seen.
    pub fn season(&self) -> Option<i32> {
        (self.season != i32::MIN).then_some(self.season)
    }

    /// Every (season, site, species, trees allocated) with a count, in key order.
    pub fn used_entries(&self) -> impl Iterator<Item = (i32, &str, &str, u32)> {
        self.used
            .iter()
            .map(|((y, site, sp), n)| (*y, site.as_str(), sp.as_str(), *n))
    }

    /// Order ids waiting in the backlog, oldest first.
    pub fn backlog_ids(&self) -> impl Iterator<Item = &str> {
        self.backlog.values().map(|(id, _)| id.as_str())
    }

    /// Trees allocated so far at a site for a species in a season.
    pub fn used(&self, season: i32, site: &str, species: &str) -> u32 {
        self.used
            .get(&(season, site.to_string(), species.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Replaces the partner list (a reload) and retries the backlog against it.
    pub fn set_partners<B: OrderBook>(
        &mut self,
        partners: Partners,
        book: &mut B,
        out: &mut Vec<Effect>,
    ) -> Result<usize, B::Error> {
        self.partners = partners;
        self.retry_backlog(book, None, out)
    }

    /// Folds one TreeMatured.
    pub fn on_tree<B: OrderBook>(
        &mut self,
        book: &mut B,
        tree: &TreeMatured,
        out: &mut Vec<Effect>,
    ) -> Result<TreeOutcome, B::Error> {
        if let Err(problem) = validate_tree(tree) {
            return Ok(TreeOutcome::Invalid(problem));
        }
        let Some(year) = year_of(tree.matured_at_ms) else {
            return Ok(TreeOutcome::Invalid(format!(
                "matured_at_ms {} is not a representable date",
                tree.matured_at_ms
            )));
        };
        let id = order_id(&tree.tree_id);
        if book.get(&id)?.is_some() {
            return Ok(TreeOutcome::Duplicate);
        }
        if year > self.season {
            let had_season = self.season();
            self.season = year;
            self.changes.meta = true;
            if had_season.is_some() {
                let n = self.retry_backlog(book, None, out)?;
                tracing::info!(season = year, allocated = n, "new planting season");
            }
        }
        let mut rec = OrderRecord {
            order_id: id,
            tree_id: tree.tree_id.clone(),
            user_id: tree.user_id.clone(),
            species_id: tree.species_id.clone(),
            matured_at_ms: tree.matured_at_ms,
            attempt: 0,
            rejected_by: Vec::new(),
            state: OrderState::Backlog {
                reason: BacklogReason::NoPartnerForSpecies,
                seq: 0,
            },
        };
        let outcome = match self.allocate(&mut rec, out) {
            None => TreeOutcome::Ordered,
            Some(reason) => TreeOutcome::Backlogged(reason),
        };
        book.put(rec);
        Ok(outcome)
    }

    /// Folds one partner report.
    pub fn on_confirmation<B: OrderBook>(
        &mut self,
        book: &mut B,
        c: &PlantingConfirmed,
        out: &mut Vec<Effect>,
    ) -> Result<ConfirmationOutcome, B::Error> {
        if c.order_id.is_empty() || c.partner_id.is_empty() || c.idempotency_key.is_empty() {
            return Ok(ConfirmationOutcome::Invalid(
                "order_id, partner_id and idempotency_key are required".into(),
            ));
        }
        let Some(report) = &c.result else {
            return Ok(ConfirmationOutcome::Invalid(
                "the report is neither planted nor rejected".into(),
            ));
        };
        if let Report::Planted(p) = report {
            if p.tree_code.is_empty() {
                return Ok(ConfirmationOutcome::Invalid(
                    "a planted report needs the partner's tree_code".into(),
                ));
            }
        }
        let Some(mut rec) = book.get(&c.order_id)? else {
            return Ok(ConfirmationOutcome::Unknown);
        };
        let rejected = matches!(report, Report::Rejected(_));
        if rec.attempt == 0 || c.idempotency_key != idempotency_key(&rec.order_id, rec.attempt) {
            // About another allocation of this tree. Every earlier one ended in a rejection,
            // so a rejection is a re-sent report and anything else contradicts it.
            let earlier =
                (1..rec.attempt).any(|a| c.idempotency_key == idempotency_key(&rec.order_id, a));
            return Ok(if earlier && rejected {
                ConfirmationOutcome::Duplicate
            } else if earlier {
                ConfirmationOutcome::Stale(format!(
                    "order {} allocation {} was rejected before; it is now at attempt {}",
                    rec.order_id, c.idempotency_key, rec.attempt
                ))
            } else {
                ConfirmationOutcome::Stale(format!(
                    "order {} has no allocation {}",
                    rec.order_id, c.idempotency_key
                ))
            });
        }
        let outcome = match (&rec.state, report) {
            (OrderState::Allocated { partner_id, .. }, _) if *partner_id != c.partner_id => {
                return Ok(ConfirmationOutcome::Stale(format!(
                    "order {} is with partner {partner_id}, not {}",
                    rec.order_id, c.partner_id
                )));
            }
            (
                OrderState::Allocated {
                    partner_id,
                    site_id,
                    season,
                    ..
                },
                Report::Planted(p),
            ) => {
                out.push(Effect::Certificate(Certificate {
                    certificate_id: certificate_id(&rec.order_id),
                    user_id: rec.user_id.clone(),
                    tree_id: rec.tree_id.clone(),
                    order_id: rec.order_id.clone(),
                    species_id: rec.species_id.clone(),
                    partner_id: partner_id.clone(),
                    site_id: site_id.clone(),
                    tree_code: p.tree_code.clone(),
                    planted_on: p.planted_on.clone(),
                }));
                rec.state = OrderState::Planted {
                    partner_id: partner_id.clone(),
                    site_id: site_id.clone(),
                    season: *season,
                    tree_code: p.tree_code.clone(),
                };
                ConfirmationOutcome::Planted
            }
            (
                OrderState::Allocated {
                    site_id, season, ..
                },
                Report::Rejected(_),
            ) => {
                let key = (*season, site_id.clone(), rec.species_id.clone());
                if let Some(n) = self.used.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    self.changes.used.insert(key);
                }
                rec.rejected_by.push(site_id.clone());
                let species = rec.species_id.clone();
                let outcome = match self.allocate(&mut rec, out) {
                    None => ConfirmationOutcome::Reallocated,
                    Some(reason) => ConfirmationOutcome::Backlogged(reason),
                };
                book.put(rec);
                // The rejecting site has a free slot again; a waiting tree may take it.
                self.retry_backlog(book, Some(&species), out)?;
                return Ok(outcome);
            }
            (OrderState::Planted { .. }, Report::Planted(_)) => ConfirmationOutcome::Duplicate,
            (OrderState::Planted { .. }, Report::Rejected(_)) => {
                ConfirmationOutcome::Stale(format!("order {} is already planted", rec.order_id))
            }
            // The current allocation was rejected and the tree waits for another site.
            (OrderState::Backlog { .. }, Report::Rejected(_)) => ConfirmationOutcome::Duplicate,
            (OrderState::Backlog { .. }, Report::Planted(_)) => {
                ConfirmationOutcome::Stale(format!(
                    "order {} was rejected by this allocation's site",
                    rec.order_id
                ))
            }
        };
        if outcome == ConfirmationOutcome::Planted {
            book.put(rec);
        }
        Ok(outcome)
    }

    /// Allocates the backlog in FIFO order (of one species, or all), as far as capacity goes.
    /// Returns how many trees left it.
    pub fn retry_backlog<B: OrderBook>(
        &mut self,
        book: &mut B,
        species: Option<&str>,
        out: &mut Vec<Effect>,
    ) -> Result<usize, B::Error> {
        let season = self.season;
        let candidates: Vec<(u64, String)> = self
            .backlog
            .iter()
            .filter(|(_, (_, s))| species.is_none_or(|x| x == s))
            .map(|(&seq, (id, _))| (seq, id.clone()))
            .collect();
        // A species with no site left for a tree that excludes nothing has none for any tree.
        let mut full: BTreeSet<String> = BTreeSet::new();
        let mut allocated = 0;
        for (seq, id) in candidates {
            let Some(mut rec) = book.get(&id)? else {
                // The backlog names an order that does not exist: drop the dangling entry.
                self.backlog.remove(&seq);
                self.changes.backlog_removed.insert(seq);
                continue;
            };
            if full.contains(&rec.species_id) {
                continue;
            }
            if self
                .choose(&rec.species_id, season, &rec.rejected_by)
                .is_err()
            {
                if rec.rejected_by.is_empty() {
                    full.insert(rec.species_id.clone());
                }
                continue;
            }
            self.backlog.remove(&seq);
            self.changes.backlog_removed.insert(seq);
            let placed = self.allocate(&mut rec, out).is_none();
            debug_assert!(placed, "choose() succeeded just before");
            allocated += 1;
            book.put(rec);
        }
        Ok(allocated)
    }

    /// The site for a tree: among active partners' sites that plant the species, have capacity
    /// left this season and have not rejected the tree, the one with the most capacity left;
    /// ties go to the smallest (partner id, site id). "Most left" spreads trees over sites in
    /// proportion to what each can still take, so no site is drained first.
    fn choose(
        &self,
        species: &str,
        season: i32,
        rejected_by: &[String],
    ) -> Result<(String, String, String), BacklogReason> {
        let mut any_site = false;
        let mut any_unrejected = false;
        let mut best: Option<(u32, &str, &str, &str)> = None;
        for (partner, site, capacity) in self.partners.sites_for(species) {
            any_site = true;
            if rejected_by.iter().any(|r| *r == site.id) {
                continue;
            }
            any_unrejected = true;
            let left = capacity.saturating_sub(self.used(season, &site.id, species));
            if left == 0 {
                continue;
            }
            let better = match best {
                None => true,
                Some((l, p, s, _)) => {
                    (
                        left,
                        std::cmp::Reverse((partner.id.as_str(), site.id.as_str())),
                    ) > (l, std::cmp::Reverse((p, s)))
                }
            };
            if better {
                best = Some((left, &partner.id, &site.id, &site.region));
            }
        }
        match best {
            Some((_, p, s, r)) => Ok((p.to_string(), s.to_string(), r.to_string())),
            None if !any_site => Err(BacklogReason::NoPartnerForSpecies),
            None if !any_unrejected => Err(BacklogReason::AllSitesRejected),
            None => Err(BacklogReason::CapacityExhausted),
        }
    }

    /// Allocates `rec` in the current season (emitting its order) or puts it in the backlog.
    /// Returns the backlog reason if it could not be placed.
    fn allocate(&mut self, rec: &mut OrderRecord, out: &mut Vec<Effect>) -> Option<BacklogReason> {
        let season = self.season;
        match self.choose(&rec.species_id, season, &rec.rejected_by) {
            Ok((partner_id, site_id, region)) => {
                let key = (season, site_id.clone(), rec.species_id.clone());
                *self.used.entry(key.clone()).or_insert(0) += 1;
                self.changes.used.insert(key);
                rec.attempt += 1;
                out.push(Effect::Order(PlantingOrder {
                    order_id: rec.order_id.clone(),
                    tree_id: rec.tree_id.clone(),
                    user_id: rec.user_id.clone(),
                    species_id: rec.species_id.clone(),
                    partner_id: partner_id.clone(),
                    site_id: site_id.clone(),
                    region: region.clone(),
                    idempotency_key: idempotency_key(&rec.order_id, rec.attempt),
                    attempt: rec.attempt,
                    // Event time of the tree, not the wall clock: a replayed order is
                    // byte-identical to the first delivery.
                    created_at_ms: rec.matured_at_ms,
                }));
                rec.state = OrderState::Allocated {
                    partner_id,
                    site_id,
                    region,
                    season,
                };
                None
            }
            Err(reason) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.changes.meta = true;
                self.backlog
                    .insert(seq, (rec.order_id.clone(), rec.species_id.clone()));
                self.changes.backlog_added.insert(seq);
                rec.state = OrderState::Backlog { reason, seq };
                Some(reason)
            }
        }
    }
}

fn validate_tree(t: &TreeMatured) -> Result<(), String> {
    if t.user_id.is_empty() || t.species_id.is_empty() || t.tree_seq == 0 {
        return Err("user_id, species_id and tree_seq (from 1) are required".into());
    }
    let want = forest_domain::tree_id(&t.user_id, t.tree_seq);
    if t.tree_id != want {
        return Err(format!(
            "tree_id {:?} is not derived from its user and sequence (want {want:?})",
            t.tree_id
        ));
    }
    Ok(())
}

/// The calendar year (UTC) of a timestamp; `None` outside chrono's range.
pub fn year_of(ms: i64) -> Option<i32> {
    chrono::DateTime::from_timestamp_millis(ms).map(|d| d.year())
}

#[cfg(test)]
mod tests {
    use super::*;
    use forest_proto::v1::{Planted, PlantingRejected};

    const Y2026: i64 = 1_780_000_000_000; // 2026-05-28
    const Y2027: i64 = 1_800_000_000_000; // 2027-01-15

    fn partners(toml: &str) -> Partners {
        Partners::from_toml(&format!("version = \"t\"\n{toml}"), "test").unwrap()
    }

    fn two_sites() -> Partners {
        partners(
            r#"
[[partners]]
id = "a"
name = "A"
active = true
sites = [ { id = "a1", region = "R1", capacity = { saxaul = 2 } },
          { id = "a2", region = "R2", capacity = { saxaul = 3 } } ]
[[partners]]
id = "b"
name = "B"
active = true
sites = [ { id = "b1", region = "R3", capacity = { saxaul = 3, red_willow = 1 } } ]
"#,
        )
    }

    fn tree(user: &str, seq: u64, species: &str, at: i64) -> TreeMatured {
        TreeMatured {
            tree_id: forest_domain::tree_id(user, seq),
            user_id: user.into(),
            tree_seq: seq,
            species_id: species.into(),
            energy_spent_g: 17_900,
            matured_at_ms: at,
            rules_version: "t".into(),
            trigger_event_id: "e".into(),
        }
    }

    fn orders(out: &[Effect]) -> Vec<&PlantingOrder> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Order(o) => Some(o),
                _ => None,
            })
            .collect()
    }

    fn planted(order: &PlantingOrder) -> PlantingConfirmed {
        PlantingConfirmed {
            order_id: order.order_id.clone(),
            partner_id: order.partner_id.clone(),
            result: Some(Report::Planted(Planted {
                site_id: order.site_id.clone(),
                tree_code: "T1".into(),
                planted_on: "2026-06-01".into(),
                ..Default::default()
            })),
            reported_at_ms: 0,
            idempotency_key: order.idempotency_key.clone(),
        }
    }

    fn rejected(order: &PlantingOrder) -> PlantingConfirmed {
        PlantingConfirmed {
            order_id: order.order_id.clone(),
            partner_id: order.partner_id.clone(),
            result: Some(Report::Rejected(PlantingRejected {
                reason: "flooded".into(),
            })),
            reported_at_ms: 0,
            idempotency_key: order.idempotency_key.clone(),
        }
    }

    #[test]
    fn most_capacity_left_wins_and_ties_go_to_the_smallest_ids() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        for u in 0..8 {
            let t = tree(&format!("u{u}"), 1, "saxaul", Y2026);
            assert_eq!(
                l.on_tree(&mut book, &t, &mut out).unwrap(),
                TreeOutcome::Ordered
            );
        }
        let sites: Vec<&str> = orders(&out).iter().map(|o| o.site_id.as_str()).collect();
        // Left: a1 2, a2 3, b1 3 -> a2 (tie with b1, smaller id), b1, then a1/a2/b1 all 2...
        assert_eq!(sites, ["a2", "b1", "a1", "a2", "b1", "a1", "a2", "b1"]);
        assert_eq!(l.used(2026, "a1", "saxaul"), 2);
        assert_eq!(l.used(2026, "b1", "saxaul"), 3);
        assert!(
            orders(&out)
                .iter()
                .all(|o| o.attempt == 1 && o.idempotency_key.ends_with("#1"))
        );
    }

    #[test]
    fn a_redelivered_tree_makes_no_second_order() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        let t = tree("u", 1, "saxaul", Y2026);
        assert_eq!(
            l.on_tree(&mut book, &t, &mut out).unwrap(),
            TreeOutcome::Ordered
        );
        assert_eq!(
            l.on_tree(&mut book, &t, &mut out).unwrap(),
            TreeOutcome::Duplicate
        );
        assert_eq!(orders(&out).len(), 1);
    }

    #[test]
    fn invalid_trees_are_reported_not_ordered() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        let mut t = tree("u", 1, "saxaul", Y2026);
        t.tree_id = "u/2".into();
        assert!(
            matches!(l.on_tree(&mut book, &t, &mut out).unwrap(), TreeOutcome::Invalid(e) if e.contains("u/1"))
        );
        let t = tree("u", 1, "saxaul", i64::MAX);
        assert!(matches!(
            l.on_tree(&mut book, &t, &mut out).unwrap(),
            TreeOutcome::Invalid(_)
        ));
        assert!(out.is_empty() && book.is_empty());
    }

    #[test]
    fn full_capacity_backlogs_then_a_reload_allocates_in_arrival_order() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        let outcomes: Vec<_> = (0..10)
            .map(|u| {
                l.on_tree(
                    &mut book,
                    &tree(&format!("u{u}"), 1, "saxaul", Y2026),
                    &mut out,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == TreeOutcome::Ordered)
                .count(),
            8
        );
        assert_eq!(
            outcomes[8],
            TreeOutcome::Backlogged(BacklogReason::CapacityExhausted)
        );
        let none = l
            .on_tree(&mut book, &tree("p", 1, "oak", Y2026), &mut out)
            .unwrap();
        assert_eq!(
            none,
            TreeOutcome::Backlogged(BacklogReason::NoPartnerForSpecies)
        );
        assert_eq!(l.backlog_len(), 3);
        out.clear();
        let mut more = two_sites();
        more.partners[0].sites[0]
            .capacity
            .insert("saxaul".into(), 3);
        assert_eq!(l.set_partners(more, &mut book, &mut out).unwrap(), 1);
        assert_eq!(orders(&out)[0].user_id, "u8", "oldest first");
        assert_eq!(orders(&out)[0].site_id, "a1");
        assert_eq!(l.backlog_len(), 2);
    }

    #[test]
    fn a_new_season_brings_fresh_capacity_to_the_backlog_first() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        for u in 0..9 {
            l.on_tree(
                &mut book,
                &tree(&format!("u{u}"), 1, "saxaul", Y2026),
                &mut out,
            )
            .unwrap();
        }
        assert_eq!(l.backlog_len(), 1);
        out.clear();
        let t = tree("new", 1, "saxaul", Y2027);
        assert_eq!(
            l.on_tree(&mut book, &t, &mut out).unwrap(),
            TreeOutcome::Ordered
        );
        let users: Vec<&str> = orders(&out).iter().map(|o| o.user_id.as_str()).collect();
        assert_eq!(users, ["u8", "new"]);
        assert_eq!(l.season(), Some(2027));
        assert_eq!(
            l.used(2027, "a2", "saxaul") + l.used(2027, "b1", "saxaul"),
            2
        );
        // A late 2026 tree is planted in the current season, 2027.
        out.clear();
        l.on_tree(&mut book, &tree("late", 1, "saxaul", Y2026), &mut out)
            .unwrap();
        assert_eq!(
            book["order:late/1"].state,
            OrderState::Allocated {
                partner_id: orders(&out)[0].partner_id.clone(),
                site_id: orders(&out)[0].site_id.clone(),
                region: orders(&out)[0].region.clone(),
                season: 2027,
            }
        );
    }

    #[test]
    fn planted_closes_with_a_certificate_and_duplicates_are_recognised() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        l.on_tree(&mut book, &tree("u", 1, "saxaul", Y2026), &mut out)
            .unwrap();
        let order = orders(&out)[0].clone();
        out.clear();
        assert_eq!(
            l.on_confirmation(&mut book, &planted(&order), &mut out)
                .unwrap(),
            ConfirmationOutcome::Planted
        );
        let Effect::Certificate(c) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (
                c.order_id.as_str(),
                c.user_id.as_str(),
                c.tree_code.as_str()
            ),
            ("order:u/1", "u", "T1")
        );
        assert_eq!(c.certificate_id, "certificate:order:u/1");
        out.clear();
        assert_eq!(
            l.on_confirmation(&mut book, &planted(&order), &mut out)
                .unwrap(),
            ConfirmationOutcome::Duplicate
        );
        assert!(matches!(
            l.on_confirmation(&mut book, &rejected(&order), &mut out)
                .unwrap(),
            ConfirmationOutcome::Stale(_)
        ));
        let mut other = order.clone();
        other.order_id = "order:nobody/1".into();
        assert_eq!(
            l.on_confirmation(&mut book, &planted(&other), &mut out)
                .unwrap(),
            ConfirmationOutcome::Unknown
        );
        let mut empty = planted(&order);
        empty.result = None;
        assert!(matches!(
            l.on_confirmation(&mut book, &empty, &mut out).unwrap(),
            ConfirmationOutcome::Invalid(_)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn a_rejection_releases_capacity_and_reallocates_elsewhere() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        l.on_tree(&mut book, &tree("u", 1, "red_willow", Y2026), &mut out)
            .unwrap();
        let first = orders(&out)[0].clone();
        assert_eq!(first.site_id, "b1", "the only red willow site");
        out.clear();
        // b1 rejects; nothing else plants red willow.
        let r = l
            .on_confirmation(&mut book, &rejected(&first), &mut out)
            .unwrap();
        assert_eq!(
            r,
            ConfirmationOutcome::Backlogged(BacklogReason::AllSitesRejected)
        );
        assert_eq!(l.used(2026, "b1", "red_willow"), 0);
        // The freed slot goes to the next red willow tree, not back to the rejected one.
        l.on_tree(&mut book, &tree("v", 1, "red_willow", Y2026), &mut out)
            .unwrap();
        assert_eq!(orders(&out)[0].user_id, "v");
        // A re-delivered rejection is a duplicate, not a second release.
        assert_eq!(
            l.on_confirmation(&mut book, &rejected(&first), &mut out)
                .unwrap(),
            ConfirmationOutcome::Duplicate
        );
        assert_eq!(l.used(2026, "b1", "red_willow"), 1);

        // Saxaul has three sites: a rejection moves the tree to another one, attempt 2.
        out.clear();
        l.on_tree(&mut book, &tree("w", 1, "saxaul", Y2026), &mut out)
            .unwrap();
        let s1 = orders(&out)[0].clone();
        out.clear();
        assert_eq!(
            l.on_confirmation(&mut book, &rejected(&s1), &mut out)
                .unwrap(),
            ConfirmationOutcome::Reallocated
        );
        let s2 = orders(&out)[0].clone();
        assert_eq!(
            (s2.order_id.as_str(), s2.attempt),
            (s1.order_id.as_str(), 2)
        );
        assert_ne!(s2.site_id, s1.site_id);
        assert_eq!(s2.idempotency_key, "order:w/1#2");
        // A late "planted" for the rejected allocation contradicts it.
        assert!(matches!(
            l.on_confirmation(&mut book, &planted(&s1), &mut out)
                .unwrap(),
            ConfirmationOutcome::Stale(_)
        ));
        // A re-sent rejection of attempt 1 is a duplicate: it must not reject attempt 2.
        let used = l.used(2026, &s2.site_id, "saxaul");
        out.clear();
        assert_eq!(
            l.on_confirmation(&mut book, &rejected(&s1), &mut out)
                .unwrap(),
            ConfirmationOutcome::Duplicate
        );
        assert_eq!(l.used(2026, &s2.site_id, "saxaul"), used);
        assert!(out.is_empty());
        // A report naming an allocation that never existed is stale.
        let mut bogus = rejected(&s2);
        bogus.idempotency_key = "order:w/1#9".into();
        assert!(matches!(
            l.on_confirmation(&mut book, &bogus, &mut out).unwrap(),
            ConfirmationOutcome::Stale(_)
        ));
    }

    #[test]
    fn state_survives_a_store_round_trip() {
        let mut l = Ledger::new(two_sites());
        let mut book = BTreeMap::new();
        let mut out = Vec::new();
        for u in 0..11 {
            l.on_tree(
                &mut book,
                &tree(&format!("u{u}"), 1, "saxaul", Y2026),
                &mut out,
            )
            .unwrap();
        }
        let mut kv: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (k, v) in l.take_changes() {
            match v {
                Some(v) => kv.insert(k, v),
                None => kv.remove(&k),
            };
        }
        let scan = |p: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            kv.iter()
                .filter(|(k, _)| k.starts_with(p))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let back = Ledger::load(
            two_sites(),
            &scan(keys::USED),
            &scan(keys::BACKLOG),
            kv.get(keys::META).map(Vec::as_slice),
        )
        .unwrap();
        assert_eq!(back.used, l.used);
        assert_eq!(back.backlog, l.backlog);
        assert_eq!((back.season, back.next_seq), (l.season, l.next_seq));
        assert!(l.take_changes().is_empty(), "nothing changed since");
    }
}
