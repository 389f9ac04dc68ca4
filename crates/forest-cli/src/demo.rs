//! `forest demo`: generate a workload, decode, fold, and print a summary with invariant checks.

use anyhow::ensure;
use forest_domain::{RuleSet, UserState};
use forest_workload::{Generator, WorkloadConfig};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Number of input records to generate.
    #[arg(long, default_value_t = 1_000_000, env = "FOREST_DEMO_EVENTS")]
    events: u64,
    /// Number of distinct users (Zipf-distributed activity).
    #[arg(long, default_value_t = 100_000, env = "FOREST_DEMO_USERS")]
    users: u64,
    /// Seed of the workload: the same seed gives the same records.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub fn run(args: DemoArgs, rules: &RuleSet) -> anyhow::Result<()> {
    ensure!(args.users > 0, "--users must be at least 1");
    let started = Instant::now();
    let workload = Generator::new(WorkloadConfig {
        seed: args.seed,
        users: args.users,
        events: args.events,
        ..WorkloadConfig::default()
    });
    let mut states: FxHashMap<String, UserState> = FxHashMap::default();
    let mut rejections: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut credited_g = 0u64;
    let mut tree_ids = FxHashSet::default();
    let mut duplicate_trees = 0u64;
    let mut records = 0u64;
    for rec in workload {
        records += 1;
        let event = match rec.to_event() {
            Ok(e) => e,
            Err(r) => {
                *rejections.entry(r.code()).or_default() += 1;
                continue;
            }
        };
        let state = states
            .entry(event.user_id.clone())
            .or_insert_with(|| UserState::new(event.user_id.clone()));
        match rules.apply(state, &event) {
            Ok(o) => {
                credited_g += o.credit.map_or(0, |c| c.credited_g);
                for t in o.trees {
                    if !tree_ids.insert(t.tree_id) {
                        duplicate_trees += 1;
                    }
                }
            }
            Err(r) => *rejections.entry(r.code()).or_default() += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let matured: u64 = states.values().map(|s| s.trees_matured).sum();
    let conserved = states
        .values()
        .all(|s| s.lifetime_g == s.balance_g + s.spent_g);
    let lifetime: u64 = states.values().map(|s| s.lifetime_g).sum();

    println!("Forest demo (in-process fold; rules {})", rules.version);
    println!("  records in         {records}");
    println!("  users              {}", states.len());
    println!("  grams credited     {credited_g}");
    println!("  rejections         {}", rejections.values().sum::<u64>());
    for (code, n) in &rejections {
        println!("    {code:<18} {n}");
    }
    println!("  trees matured      {matured}");
    println!(
        "  throughput         {:.0} records/s ({secs:.2} s)",
        records as f64 / secs
    );
    let ok = conserved
        && lifetime == credited_g
        && matured == tree_ids.len() as u64
        && duplicate_trees == 0;
    println!(
        "  check              {}: lifetime == balance + spent for every user; tree ids unique ({} ids, {} duplicates)",
        if ok { "OK" } else { "FAILED" },
        tree_ids.len(),
        duplicate_trees
    );
    ensure!(ok, "demo invariants do not hold");
    Ok(())
}
