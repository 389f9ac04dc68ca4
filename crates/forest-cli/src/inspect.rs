//! `forest user` and `forest rebuild`: look into a processor's store, and rebuild one from the
//! log.

use anyhow::{Context, ensure};
use forest_domain::{RuleSet, UserState};
use forest_kafka::end_offsets;
use forest_processor::{ProcessorConfig, ProcessorStats, Topics};
use forest_store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct UserArgs {
    /// The user id.
    id: String,
    /// The processor's RocksDB directory (read without stopping the processor).
    #[arg(long, env = "FOREST_STORE", default_value = "forest-data/processor")]
    store: PathBuf,
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

pub fn user(args: UserArgs, rules: &RuleSet) -> anyhow::Result<()> {
    let store = Store::open_read_only(&args.store)?;
    let Some(s) = store.get_user(&args.id)? else {
        anyhow::bail!(
            "no user {:?} in {} (ids are case-sensitive; a store holds only the users of the partitions its processor owns)",
            args.id,
            args.store.display()
        );
    };
    print_user(&s, rules);
    Ok(())
}

fn print_user(s: &UserState, rules: &RuleSet) {
    let (species, to_go) = s.progress(rules);
    println!(
        "user {} (progress and timezone under the loaded rules {})",
        s.user_id, rules.version
    );
    println!(
        "  balance        {} g; next tree {} ({} g), {} g to go",
        s.balance_g, species.id, species.cost_g, to_go
    );
    println!("  lifetime       {} g credited", s.lifetime_g);
    println!(
        "  trees          {} matured, {} g spent",
        s.trees_matured, s.spent_g
    );
    println!(
        "  timezone       {}",
        s.timezone
            .map_or(format!("{} (default)", rules.timezone), |t| t.to_string())
    );
    if let Some(n) = s.newest_event_ms {
        println!("  newest event   {}", when(n));
    }
    if let Some(f) = s.dedupe_floor_ms {
        println!(
            "  dedupe floor   {} (events at or before it are too late)",
            when(f)
        );
    }
    println!("  recent credits (oldest first; rule and rules version as stored with each credit):");
    if s.recent_credits.is_empty() {
        println!("    none");
    }
    for c in &s.recent_credits {
        // The rule that made the credit, as stored with it: the loaded rules file may be a later
        // version that names or numbers rules differently.
        let (rule, version) = s
            .note_rule(c)
            .map_or(("?", "?"), |r| (r.rule_id, r.rules_version));
        let why = match c.limited_by {
            None => "full credit".to_string(),
            Some(l) => format!("limited: {l}"),
        };
        println!(
            "    {}  {:<22} rule {:<24} rules {:<12} {:>6} g of {:>6} g  {why}",
            when(c.event_ms),
            c.behaviour.to_string(),
            rule,
            version,
            c.credited_g,
            c.raw_g
        );
    }
    if !s.day_quantities.is_empty() {
        println!("  day quantities (counted once per local day):");
        for q in &s.day_quantities {
            println!(
                "    {:<22} day {}: {} (interval sum {}, largest day total {})",
                q.behaviour.to_string(),
                q.day,
                q.quantity(),
                q.added,
                q.day_total
            );
        }
    }
    println!("  cap counters:");
    for c in &s.counters {
        println!(
            "    {:<22} {:?}: {} events, {} g",
            c.behaviour.to_string(),
            c.bucket,
            c.events,
            c.grams
        );
    }
}

#[derive(clap::Args)]
pub struct RebuildArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "FOREST_BROKERS")]
    brokers: String,
    /// Prefix of the topic names.
    #[arg(long, env = "FOREST_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// Fresh directory for the rebuilt store (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// The live store to compare with.
    #[arg(long, env = "FOREST_STORE")]
    compare_with: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
    /// librdkafka setting passed through, repeatable: --kafka-config key=value.
    #[arg(long = "kafka-config", value_parser = crate::common::parse_kv)]
    kafka_config: Vec<(String, String)>,
}

/// Replays the input topics, up to their end offsets at the start, through the processor
/// into a fresh store, emitting nothing; then reports how it differs from the live store.
pub fn rebuild(args: RebuildArgs, rules: RuleSet) -> anyhow::Result<()> {
    ensure!(
        !args.out.exists(),
        "--out {} exists; a rebuild writes a fresh store",
        args.out.display()
    );
    let topics = Topics::prefixed(&args.topic_prefix);
    let mut ends = Vec::new();
    for t in [&topics.payments, &topics.mobility, &topics.commands] {
        for (p, end) in end_offsets(&args.brokers, t)? {
            ends.push((t.clone(), p, end));
        }
    }
    let total: i64 = ends.iter().map(|e| e.2).sum();
    let mut cfg = ProcessorConfig::new(args.brokers.clone(), args.out.clone());
    cfg.topics = topics;
    cfg.group_id = format!(
        "forest-rebuild-{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S%3f")
    );
    cfg.rules = Arc::new(rules.clone());
    cfg.dry_run = true;
    cfg.kafka = args.kafka_config;
    let stats = Arc::new(ProcessorStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handle = {
        let (s, d) = (stats.clone(), stop.clone());
        std::thread::spawn(move || forest_processor::run(cfg, d, s))
    };
    eprintln!(
        "rebuilding from {total} input records into {}",
        args.out.display()
    );
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if handle.is_finished() {
            break;
        }
        let got = stats.committed_offsets();
        if ends
            .iter()
            .all(|(t, p, end)| *end == 0 || got.get(&(t.clone(), *p)).is_some_and(|o| o >= end))
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            stop.store(true, Ordering::Relaxed);
            anyhow::bail!(
                "the rebuild did not reach the end offsets within {} s",
                args.timeout_secs
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the rebuild panicked"))?
        .context("rebuild failed")?;
    println!(
        "rebuilt {} records ({} applied, {} rejected) in {:.1} s into {} (rules {})",
        ProcessorStats::get(&stats.committed_records),
        ProcessorStats::get(&stats.applied),
        ProcessorStats::get(&stats.rejected),
        started.elapsed().as_secs_f64(),
        args.out.display(),
        rules.version
    );
    let Some(live) = args.compare_with else {
        return Ok(());
    };
    let rebuilt = Store::open_read_only(&args.out)?;
    let live = Store::open_read_only(&live)
        .with_context(|| format!("cannot open the live store {}", live.display()))?;
    let (mut same, mut differ, mut only_rebuilt, mut shown) = (0u64, 0u64, 0u64, 0);
    let mut balance_delta: i128 = 0;
    for u in rebuilt.users() {
        let u = u?;
        match live.get_user(&u.user_id)? {
            Some(l) if l == u => same += 1,
            Some(l) => {
                differ += 1;
                balance_delta += i128::from(u.balance_g) - i128::from(l.balance_g);
                if shown < 10 {
                    shown += 1;
                    println!(
                        "  {:<24} live: balance {} g, lifetime {} g, trees {}; rebuilt: balance {} g, lifetime {} g, trees {}",
                        u.user_id,
                        l.balance_g,
                        l.lifetime_g,
                        l.trees_matured,
                        u.balance_g,
                        u.lifetime_g,
                        u.trees_matured
                    );
                }
            }
            None => only_rebuilt += 1,
        }
    }
    let mut only_live = 0u64;
    for l in live.users() {
        if rebuilt.get_user(&l?.user_id)?.is_none() {
            only_live += 1;
        }
    }
    println!(
        "compared with the live store: {same} users equal, {differ} differ (rebuilt balance - live balance: {balance_delta} g in total), {only_rebuilt} only rebuilt, {only_live} only live"
    );
    Ok(())
}
