//! The versioned rules file: behaviour -> grams, caps, time windows and the species catalogue.
//!
//! Rules live in data, not code, because Ant Forest's numbers changed over the years (walking
//! was cut back after fake-step abuse) and a credit must say which numbers produced it. The
//! built-in default is `rules/default.toml`; a deployment can load its own file.

use crate::Behaviour;
use crate::NoteRule;
use crate::behaviour::Unit;
use chrono_tz::Tz;
use serde::Deserialize;
use std::path::Path;

/// The built-in rules file.
pub const DEFAULT_RULES_TOML: &str = include_str!("../rules/default.toml");

/// A rules file that cannot be used. Not retriable: the file must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("rules file is not valid TOML for Forest's schema: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("rules file: {0}")]
    Invalid(String),
}

impl RulesError {
    /// Rules errors are configuration errors: retrying without a fix cannot help.
    pub fn is_retriable(&self) -> bool {
        false
    }
}

/// Cap period: a calendar day or month in the user's timezone.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CapPeriod {
    Day,
    Month,
}

/// What a cap limits within its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapLimit {
    /// At most this many events earn energy.
    Events(u32),
    /// At most this many grams are credited.
    Grams(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub period: CapPeriod,
    pub limit: CapLimit,
}

/// What a rule's `max_quantity` limits, and how reports of one day combine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantityScope {
    /// Each report stands alone: `max_quantity` limits one report.
    #[default]
    Report,
    /// Reports of one user and local day are one quantity (a step counter's day): the fold
    /// keeps it per day; `Tally::Add` reports add to it, a `Tally::DayTotal` report raises it to
    /// at least the total it states, and the day's quantity is the larger of the two (so a
    /// producer that sends both views of the same steps is not credited twice, whatever the
    /// order). `max_quantity` limits the day's quantity: a report that would take it higher is
    /// rejected as absurd. A report earns the grams of the day's new quantity minus those of
    /// its old one. Needs a per-unit rule (`milligrams_per_unit`).
    Day,
}

/// How an event's grams are computed before caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earn {
    /// A fixed number of grams per qualifying event.
    PerEvent { grams: u64 },
    /// `quantity * milligrams / 1000` grams, rounded down. Milligrams keep it in integers
    /// (walking is 0.02 g per step).
    PerUnit { milligrams: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub behaviour: Behaviour,
    pub earn: Earn,
    /// Below this quantity the event is accepted but earns 0 g (for a day-scoped rule: below
    /// it, the day's quantity earns 0 g).
    pub min_quantity: i64,
    /// Above this quantity the event is rejected as absurd; for a day-scoped rule, the day's
    /// quantity.
    pub max_quantity: i64,
    pub quantity_scope: QuantityScope,
    pub caps: Vec<Cap>,
    /// (rules version, `id`), interned: what each credit note made under this rule names
    /// (see [`crate::CreditNote::rule`]).
    pub(crate) note_rule: &'static NoteRule,
}

/// Why a rules file's version or rule id could not be interned (see [`crate::intern`]).
fn too_many_identities() -> String {
    format!(
        "this process already holds {} distinct rules versions, rule ids or pairs of them; \
         restart it",
        crate::intern::MAX_INTERNED
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Species {
    pub id: String,
    pub name: String,
    pub cost_g: u64,
}

/// A validated rules file. Cheap to share by reference; [`RuleSet::apply`] is the fold.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub version: String,
    pub timezone: Tz,
    pub grace_window_ms: i64,
    pub max_future_skew_ms: i64,
    pub dedupe_max_ids: usize,
    pub species: Vec<Species>,
    pub(crate) default_species: usize,
    /// Cheapest species: a balance below it cannot mature any tree, so the fold skips the
    /// species lookup on almost every event.
    pub(crate) min_species_cost: u64,
    rules: [Option<Rule>; Behaviour::COUNT],
}

// ---- file schema ----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    version: String,
    timezone: String,
    grace_window_hours: u32,
    max_future_skew_secs: u32,
    dedupe_max_ids: usize,
    default_species: String,
    species: Vec<SpeciesFile>,
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpeciesFile {
    id: String,
    name: String,
    cost_g: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    behaviour: Behaviour,
    grams: Option<u64>,
    milligrams_per_unit: Option<u64>,
    unit: Option<Unit>,
    #[serde(default)]
    min_quantity: i64,
    max_quantity: i64,
    #[serde(default)]
    quantity_scope: QuantityScope,
    #[serde(default)]
    caps: Vec<CapFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapFile {
    period: CapPeriod,
    max_events: Option<u32>,
    max_grams: Option<u64>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::from_toml(DEFAULT_RULES_TOML).expect("the built-in rules file is valid")
    }
}

impl RuleSet {
    pub fn from_path(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text)?;
        let invalid = |m: String| Err(RulesError::Invalid(m));

        if file.version.trim().is_empty() {
            return invalid("`version` must not be empty".into());
        }
        let timezone: Tz = match file.timezone.parse() {
            Ok(tz) => tz,
            Err(_) => return invalid(format!("timezone {:?} is not an IANA name", file.timezone)),
        };
        if file.grace_window_hours == 0 {
            return invalid("`grace_window_hours` must be at least 1".into());
        }
        if file.dedupe_max_ids == 0 {
            return invalid("`dedupe_max_ids` must be at least 1".into());
        }
        if file.species.is_empty() {
            return invalid("at least one [[species]] is required".into());
        }
        let mut species = Vec::with_capacity(file.species.len());
        for s in file.species {
            if s.cost_g == 0 {
                return invalid(format!("species {:?}: cost_g must be > 0", s.id));
            }
            if species.iter().any(|x: &Species| x.id == s.id) {
                return invalid(format!("species {:?} is listed twice", s.id));
            }
            species.push(Species {
                id: s.id,
                name: s.name,
                cost_g: s.cost_g,
            });
        }
        let Some(default_species) = species.iter().position(|s| s.id == file.default_species)
        else {
            return invalid(format!(
                "default_species {:?} is not in the species list",
                file.default_species
            ));
        };

        let mut rules: [Option<Rule>; Behaviour::COUNT] = Default::default();
        for r in file.rules {
            let earn = match (r.grams, r.milligrams_per_unit) {
                (Some(grams), None) => Earn::PerEvent { grams },
                (None, Some(milligrams)) => {
                    if r.unit != Some(r.behaviour.unit()) {
                        return invalid(format!(
                            "rule {:?}: milligrams_per_unit needs unit = {:?} for {}",
                            r.id,
                            r.behaviour.unit(),
                            r.behaviour
                        ));
                    }
                    Earn::PerUnit { milligrams }
                }
                _ => {
                    return invalid(format!(
                        "rule {:?}: set exactly one of `grams` or `milligrams_per_unit`",
                        r.id
                    ));
                }
            };
            if r.quantity_scope == QuantityScope::Day && !matches!(earn, Earn::PerUnit { .. }) {
                return invalid(format!(
                    "rule {:?}: quantity_scope = \"day\" needs milligrams_per_unit (a day's \
                     quantity earns per unit, not per event)",
                    r.id
                ));
            }
            if r.id.trim().is_empty() {
                return invalid("every rule needs a non-empty `id`".into());
            }
            if r.min_quantity < 0 || r.max_quantity < r.min_quantity {
                return invalid(format!(
                    "rule {:?}: need 0 <= min_quantity <= max_quantity",
                    r.id
                ));
            }
            let mut caps = Vec::with_capacity(r.caps.len());
            for c in r.caps {
                let limit = match (c.max_events, c.max_grams) {
                    (Some(n), None) => CapLimit::Events(n),
                    (None, Some(g)) => CapLimit::Grams(g),
                    _ => {
                        return invalid(format!(
                            "rule {:?}: each cap sets exactly one of max_events or max_grams",
                            r.id
                        ));
                    }
                };
                caps.push(Cap {
                    period: c.period,
                    limit,
                });
            }
            let slot = &mut rules[r.behaviour.index()];
            if slot.is_some() {
                return invalid(format!("behaviour {} has more than one rule", r.behaviour));
            }
            let Some(note_rule) = crate::intern::intern_rule(&file.version, &r.id) else {
                return invalid(too_many_identities());
            };
            *slot = Some(Rule {
                note_rule,
                id: r.id,
                behaviour: r.behaviour,
                earn,
                min_quantity: r.min_quantity,
                max_quantity: r.max_quantity,
                quantity_scope: r.quantity_scope,
                caps,
            });
        }
        let min_species_cost = species.iter().map(|s| s.cost_g).min().unwrap_or(u64::MAX);
        Ok(Self {
            version: file.version,
            timezone,
            grace_window_ms: i64::from(file.grace_window_hours) * 3_600_000,
            max_future_skew_ms: i64::from(file.max_future_skew_secs) * 1_000,
            dedupe_max_ids: file.dedupe_max_ids,
            species,
            default_species,
            min_species_cost,
            rules,
        })
    }

    /// The rule for a behaviour, or `None` if this rules version does not credit it.
    pub fn rule(&self, b: Behaviour) -> Option<&Rule> {
        self.rules[b.index()].as_ref()
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().flatten()
    }

    pub fn species(&self, id: &str) -> Option<&Species> {
        self.species.iter().find(|s| s.id == id)
    }

    pub fn default_species(&self) -> &Species {
        &self.species[self.default_species]
    }
}

impl Rule {
    /// Grams before caps for a quantity already checked against `max_quantity`.
    pub fn raw_grams(&self, quantity: i64) -> u64 {
        if quantity < self.min_quantity {
            return 0;
        }
        match self.earn {
            Earn::PerEvent { grams } => grams,
            Earn::PerUnit { milligrams } => {
                let mg = u128::from(quantity.unsigned_abs()) * u128::from(milligrams);
                u64::try_from(mg / 1000).unwrap_or(u64::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_cover_every_behaviour() {
        let r = RuleSet::default();
        // The issue asks for at least 14 behaviours: count the distinct behaviours and rule ids
        // the built-in FILE credits (not the enum's length, which a rules file need not cover).
        let behaviours: std::collections::BTreeSet<_> = r.rules().map(|x| x.behaviour).collect();
        let ids: std::collections::BTreeSet<_> = r.rules().map(|x| x.id.as_str()).collect();
        assert!(behaviours.len() >= 14, "{behaviours:?}");
        assert_eq!(ids.len(), behaviours.len(), "one rule id per rule");
        for b in Behaviour::ALL {
            let rule = r.rule(b).unwrap_or_else(|| panic!("no rule for {b}"));
            assert_eq!(rule.behaviour, b);
            assert_eq!(
                (rule.note_rule.rules_version, rule.note_rule.rule_id),
                (r.version.as_str(), rule.id.as_str())
            );
        }
        assert_eq!(
            behaviours.len(),
            Behaviour::COUNT,
            "every behaviour has a rule"
        );
        assert_eq!(
            r.rule(Behaviour::Walking).unwrap().quantity_scope,
            QuantityScope::Day
        );
        assert!(
            r.rules()
                .filter(|x| x.behaviour != Behaviour::Walking)
                .all(|x| x.quantity_scope == QuantityScope::Report)
        );
        assert_eq!(r.species("saxaul").map(|s| s.cost_g), Some(17_900));
        assert_eq!(r.species("red_willow").map(|s| s.cost_g), Some(22_400));
        assert_eq!(r.grace_window_ms, 72 * 3_600_000);
        assert_eq!(r.timezone, chrono_tz::Asia::Shanghai);
        assert_eq!(r.default_species().id, "saxaul");
    }

    #[test]
    fn walking_is_per_step_in_milligrams() {
        let r = RuleSet::default();
        let w = r.rule(Behaviour::Walking).unwrap();
        assert_eq!(w.raw_grams(10_000), 200);
        assert_eq!(w.raw_grams(49), 0, "0.98 g rounds down");
        assert_eq!(w.raw_grams(50), 1);
    }

    #[test]
    fn payment_below_minimum_earns_nothing() {
        let r = RuleSet::default();
        let p = r.rule(Behaviour::OfflinePayment).unwrap();
        assert_eq!(p.raw_grams(99), 0);
        assert_eq!(p.raw_grams(100), 5);
    }

    fn replace(from: &str, to: &str) -> Result<RuleSet, RulesError> {
        assert!(DEFAULT_RULES_TOML.contains(from), "{from}");
        RuleSet::from_toml(&DEFAULT_RULES_TOML.replacen(from, to, 1))
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        let msg = |r: Result<RuleSet, RulesError>| r.unwrap_err().to_string();
        assert!(msg(replace("Asia/Shanghai", "Mars/Base")).contains("Mars/Base"));
        assert!(
            msg(replace(
                "default_species = \"saxaul\"",
                "default_species = \"oak\""
            ))
            .contains("oak")
        );
        assert!(
            msg(replace("grams = 80", "grams = 80\nmilligrams_per_unit = 3"))
                .contains("exactly one")
        );
        assert!(
            msg(replace(
                "behaviour = \"bus_ride\"",
                "behaviour = \"walking\""
            ))
            .contains("more than one rule")
        );
        assert!(
            msg(replace(
                "behaviour = \"bus_ride\"",
                "behaviour = \"teleport\""
            ))
            .contains("teleport")
        );
        assert!(msg(replace("cost_g = 17900", "cost_g = 0")).contains("cost_g"));
        assert!(
            msg(replace(
                "version = \"2026.11-2\"",
                "version = \"2026.11-2\"\ncolour = 1"
            ))
            .contains("colour")
        );
    }

    #[test]
    fn a_day_scope_needs_a_per_unit_rule() {
        let bad = replace("grams = 80 ", "quantity_scope = \"day\"\ngrams = 80 ");
        let msg = bad.unwrap_err().to_string();
        assert!(
            msg.contains("bus_ride.v1") && msg.contains("milligrams_per_unit"),
            "{msg}"
        );
        let ok = replace(
            "milligrams_per_unit = 20           # configuration: 20 g/km",
            "milligrams_per_unit = 20\nquantity_scope = \"day\"",
        )
        .unwrap();
        assert_eq!(
            ok.rule(Behaviour::BikeRide).unwrap().quantity_scope,
            QuantityScope::Day
        );
        assert!(replace("quantity_scope = \"day\"", "quantity_scope = \"week\"").is_err());
    }

    #[test]
    fn a_missing_rule_is_allowed_and_reported_as_none() {
        let text =
            DEFAULT_RULES_TOML.replace("behaviour = \"e_statement\"", "behaviour = \"e_receipt\"");
        // Two rules for e_receipt is an error...
        assert!(RuleSet::from_toml(&text).is_err());
        // ...but dropping one leaves that behaviour without a rule.
        let cut = DEFAULT_RULES_TOML
            .split("[[rules]]\nid = \"e_statement.v1\"")
            .next()
            .unwrap();
        let r = RuleSet::from_toml(cut).unwrap();
        assert!(r.rule(Behaviour::EStatement).is_none());
    }
}
