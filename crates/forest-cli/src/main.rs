//! `forest`: one binary, one subcommand per job. `main` only parses flags (command line, then
//! environment, then an optional TOML config file), sets up logging and hands over to the
//! subcommand's `run`.

mod bench;
mod broker;
mod common;
mod config;
mod demo;
mod fulfilment;
mod inspect;
mod loadgen;
mod processor;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the processor allocates and frees several small
/// blocks per record (the record's bytes, the decoded event's strings, outbox entries), and
/// glibc's allocator was 14 % of its profile (BENCHMARKS.md, session 9).
///
/// With transparent huge pages (mimalloc's default: `madvise(MADV_HUGEPAGE)` on its arenas),
/// and freed memory kept rather than returned to the system (see [`keep_freed_memory`]). Why:
/// at 1 M users the projection cache's slots and their parts lie at random over gigabytes,
/// and with 4 KiB pages most look-ahead prefetches likely waited for an address translation
/// (the workers' largest look-ahead stage sat on its `prefetcht0`, BENCHMARKS.md, session
/// 30). Over 7 alternated pairs with huge pages and no purging, the processor's workers spent
/// less CPU per event in 11 of 14 phases, 1.84 CPU-s per M on average against 2.07 (session
/// 31). Sessions 12-30 built without them (`no_thp`): then, before most of the look-ahead
/// prefetching, zeroing each 2 MiB page whole at its first touch cost more than the
/// translations saved (11.6 % more CPU per event at 1 M users, session 12).
/// `MIMALLOC_ALLOW_THP=0` turns huge pages off for the whole process.
///
/// Built with the `malloc-override` feature (off by default), it is also `malloc` and `free`
/// for the C and C++ code linked in: librdkafka and RocksDB. Through glibc, librdkafka's
/// messages (allocated on its broker thread, freed on the consumer's) were 13 % of its broker
/// thread's samples and 15 % of the thread running the bench's plain consumer. In 6 alternated
/// pairs with the feature, the processor's peak RSS was 25-31 % lower and the plain consumer
/// (a) 45-66 % faster, but the processor was not: its throughput (b) was lower in 4 of the 6
/// pairs (-13 % to +11 %), and its ceiling phase (f), the processor's batched consumption with
/// decoding and the fold, used more CPU per event in all 6 (BENCHMARKS.md, session 28). So it
/// is a choice of memory over throughput, left to the deployment.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "forest",
    version,
    about = "Forest: personal carbon accounts as an event-sourced stream processor",
    // A flag given twice keeps the last: the config file's flags go first, so the command
    // line wins.
    args_override_self = true
)]
struct Cli {
    /// TOML config file: a table per subcommand of flag = value (see README). Command-line
    /// flags win over it.
    #[arg(long, global = true, env = "FOREST_CONFIG")]
    config: Option<PathBuf>,
    /// Rules file (TOML). Default: the built-in rules.
    #[arg(long, global = true, env = "FOREST_RULES")]
    rules: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline (load generator, processor, fulfilment, a simulated partner) on
    /// the embedded broker, or on --brokers, and check its invariants.
    Demo(demo::DemoArgs),
    /// Produce a generated workload to the input topics.
    Loadgen(loadgen::LoadgenArgs),
    /// Benchmark: raw consume vs the processor end to end on one preloaded topic set, and
    /// latency at fixed rates; prints one table.
    Bench(bench::BenchArgs),
    /// Run the embedded Kafka-protocol broker on its own; prints its bootstrap address.
    Broker(broker::BrokerArgs),
    /// Run the processor against a Kafka cluster until SIGTERM or Ctrl-C.
    Processor(processor::ProcessorArgs),
    /// Run partner fulfilment against a Kafka cluster until SIGTERM or Ctrl-C.
    Fulfilment(fulfilment::FulfilmentArgs),
    /// Validate a partner file and print its sites and capacities.
    Partners(fulfilment::PartnersArg),
    /// Print one user's projection from a processor's store, with recent credits explained.
    User(inspect::UserArgs),
    /// Rebuild projections from the log into a fresh store (emitting nothing) and report how
    /// they differ from a live store, e.g. after a rules change.
    Rebuild(inspect::RebuildArgs),
    /// Validate a rules file and print its rules.
    Rules,
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (libmimalloc-sys 0.1.49 names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc to keep the memory the process frees instead of returning it to the system
/// (`purge_delay` -1), unless the environment sets mimalloc's purge delay
/// (`MIMALLOC_PURGE_DELAY`, or its older name `MIMALLOC_RESET_DELAY`, in any case). Why: a
/// purge returns parts of a 2 MiB huge page, which splits it into 4 KiB pages (until
/// khugepaged, slowly, collapses it again), and a processor frees and reuses memory all the
/// time (batches, evicted users). With purging on, huge pages helped the bench's second
/// processor run in a process (less CPU in 4 of 5 pairs) and not its third (2 of 5); without
/// purging, 11 of 14 over 7 pairs (session 31). The cost: the resident size stays at its peak,
/// which for a processor bounded by `--cache-mb` is where it runs anyway.
fn keep_freed_memory() {
    /// Its default in mimalloc v3: what the option at that index reads when no environment
    /// variable set it. Anything else means the index names another option (a mimalloc
    /// update): then nothing is set.
    const V3_DEFAULT_MS: std::ffi::c_long = 1000;
    if purge_delay_in_environment() {
        return;
    }
    // SAFETY: reads and sets one option, first thing in `main`, before any thread is started
    // (the set is a plain write); mimalloc reads it whenever it considers a purge.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == V3_DEFAULT_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

/// Whether the environment sets mimalloc's purge delay: mimalloc reads its variables in any
/// case, and the delay under its older name too.
fn purge_delay_in_environment() -> bool {
    std::env::vars_os().any(|(k, _)| {
        k.to_str().is_some_and(|k| {
            k.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY")
                || k.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")
        })
    })
}

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    let args = match config::args_with_file(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        // Colour only on a terminal: log files and collectors get plain `key=value` text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FOREST_LOG")
                // The demo prints its own progress and summary; services log their lifecycle.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(match cli.command {
                        Command::Demo(_) | Command::Bench(_) => "warn",
                        _ => "info",
                    })
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let rules = match &cli.rules {
        Some(p) => forest_domain::RuleSet::from_path(p)?,
        None => forest_domain::RuleSet::default(),
    };
    match cli.command {
        Command::Demo(args) => demo::run(args, rules),
        Command::Loadgen(args) => loadgen::run(args),
        Command::Broker(args) => broker::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Processor(args) => processor::run(args, rules),
        Command::Fulfilment(args) => fulfilment::run(args),
        Command::Partners(args) => fulfilment::show(args),
        Command::User(args) => inspect::user(args, &rules),
        Command::Rebuild(args) => inspect::rebuild(args, rules),
        Command::Rules => {
            println!(
                "rules version {} (timezone {})",
                rules.version, rules.timezone
            );
            for r in rules.rules() {
                println!(
                    "  {:<24} {:<22} {:?} caps {:?}",
                    r.id, r.behaviour, r.earn, r.caps
                );
            }
            for s in &rules.species {
                println!("  species {:<20} {:>7} g  {}", s.id, s.cost_g, s.name);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MI_OPTION_PURGE_DELAY, keep_freed_memory};

    /// `keep_freed_memory` finds the option by its index in mimalloc v3's enum; a mimalloc
    /// update that moves it would make it set nothing, silently (the guard in it). This test
    /// binary has the same global allocator, so the update fails here instead.
    #[test]
    fn freed_memory_is_kept_through_mimallocs_purge_delay() {
        if super::purge_delay_in_environment() {
            // The environment decides, as `keep_freed_memory` lets it.
            return;
        }
        // SAFETY: reads one option (the test sets it only below, on this thread).
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            before, 1000,
            "option 15 no longer reads mimalloc v3's purge_delay default"
        );
        keep_freed_memory();
        // SAFETY: reads one option.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
