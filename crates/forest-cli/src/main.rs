//! `forest`: one binary, one subcommand per job. `main` only parses flags, sets up logging and
//! hands over to the subcommand's `run`.

mod demo;
mod processor;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "forest",
    version,
    about = "Forest: personal carbon accounts as an event-sourced stream processor"
)]
struct Cli {
    /// Rules file (TOML). Default: the built-in rules.
    #[arg(long, global = true, env = "FOREST_RULES")]
    rules: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on a generated workload and check its invariants.
    Demo(demo::DemoArgs),
    /// Run the processor against a Kafka cluster until SIGTERM or Ctrl-C.
    Processor(processor::ProcessorArgs),
    /// Validate a rules file and print its rules.
    Rules,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FOREST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rules = match &cli.rules {
        Some(p) => forest_domain::RuleSet::from_path(p)?,
        None => forest_domain::RuleSet::default(),
    };
    match cli.command {
        Command::Demo(args) => demo::run(args, &rules),
        Command::Processor(args) => processor::run(args, rules),
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
