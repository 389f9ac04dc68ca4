//! The partner file: who plants which species, where, and how many trees a season.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The built-in partner list (sample data; see the file's header).
pub const DEFAULT_PARTNERS_TOML: &str = include_str!("../partners/default.toml");

/// A partner file that cannot be used. Never retriable as is: the file must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum PartnersError {
    #[error("cannot read the partner file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the partner file {origin} is not valid: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("the partner file {origin} is not valid: {problem}")]
    Invalid { origin: String, problem: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub id: String,
    pub region: String,
    /// Species id -> trees this site can plant per season.
    pub capacity: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    pub id: String,
    pub name: String,
    /// An inactive partner gets no new orders; its open orders stay open.
    pub active: bool,
    pub sites: Vec<Site>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Partners {
    /// Free text naming this edition of the file, logged on load and reload.
    pub version: String,
    pub partners: Vec<Partner>,
}

impl Default for Partners {
    fn default() -> Self {
        Self::from_toml(DEFAULT_PARTNERS_TOML, "(built-in)")
            .expect("the built-in partner file is valid; a unit test checks it")
    }
}

impl Partners {
    pub fn from_path(path: &Path) -> Result<Self, PartnersError> {
        let text = std::fs::read_to_string(path).map_err(|source| PartnersError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, PartnersError> {
        let p: Partners = toml::from_str(text).map_err(|source| PartnersError::Parse {
            origin: origin.into(),
            source,
        })?;
        let invalid = |problem: String| PartnersError::Invalid {
            origin: origin.into(),
            problem,
        };
        if p.version.trim().is_empty() {
            return Err(invalid("`version` must not be empty".into()));
        }
        let mut partner_ids = BTreeSet::new();
        let mut site_ids = BTreeSet::new();
        for partner in &p.partners {
            if partner.id.is_empty() || !partner_ids.insert(&partner.id) {
                return Err(invalid(format!(
                    "partner id {:?} is empty or listed twice; each partner needs its own id",
                    partner.id
                )));
            }
            for s in &partner.sites {
                if s.id.is_empty() || !site_ids.insert(&s.id) {
                    return Err(invalid(format!(
                        "site id {:?} (partner {}) is empty or used twice; site ids are unique across partners",
                        s.id, partner.id
                    )));
                }
                if s.capacity.keys().any(|k| k.is_empty()) {
                    return Err(invalid(format!("site {} lists an empty species id", s.id)));
                }
            }
        }
        Ok(p)
    }

    /// Every (partner, site, capacity) of an active partner that plants `species`.
    pub fn sites_for<'a>(
        &'a self,
        species: &'a str,
    ) -> impl Iterator<Item = (&'a Partner, &'a Site, u32)> + 'a {
        self.partners
            .iter()
            .filter(|p| p.active)
            .flat_map(move |p| {
                p.sites
                    .iter()
                    .filter_map(move |s| s.capacity.get(species).map(|&c| (p, s, c)))
            })
    }

    pub fn partner(&self, id: &str) -> Option<&Partner> {
        self.partners.iter().find(|p| p.id == id)
    }
}

/// Where the partner list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartnersSource {
    Builtin,
    /// Re-read every reload interval; a changed, valid file replaces the list at run time.
    File(PathBuf),
}

impl PartnersSource {
    pub fn load(&self) -> Result<(Partners, String), PartnersError> {
        match self {
            Self::Builtin => Ok((Partners::default(), DEFAULT_PARTNERS_TOML.to_string())),
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| PartnersError::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok((
                    Partners::from_toml(&text, &path.display().to_string())?,
                    text,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_is_valid_and_covers_the_species_catalogue() {
        let p = Partners::default();
        assert_eq!(p.partners.len(), 4);
        let rules = forest_domain::RuleSet::default();
        for species in &rules.species {
            assert!(p.sites_for(&species.id).count() > 0, "{}", species.id);
        }
    }

    #[test]
    fn duplicate_site_ids_are_rejected_with_the_id() {
        let t = DEFAULT_PARTNERS_TOML.replace("id = \"wuwei-minqin\"", "id = \"alxa-left-banner\"");
        let e = Partners::from_toml(&t, "x.toml").unwrap_err().to_string();
        assert!(
            e.contains("alxa-left-banner") && e.contains("x.toml"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_and_bad_types_say_where() {
        let e = Partners::from_toml("version = \"v\"\n[[partners]]\nid = \"a\"\nname = \"A\"\nactive = true\nsites = []\ncolour = 1\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Partners::from_toml("version = \"v\"\npartners = 3\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml"), "{e}");
    }

    #[test]
    fn inactive_partners_plant_nothing() {
        let mut p = Partners::default();
        let before = p.sites_for("mongolian_pine").count();
        p.partners.iter_mut().for_each(|x| x.active = false);
        assert!(before > 0);
        assert_eq!(p.sites_for("mongolian_pine").count(), 0);
    }
}
