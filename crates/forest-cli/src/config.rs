//! The optional TOML config file. Each table is named after a subcommand and holds its flags
//! by their long names:
//!
//! ```toml
//! [processor]
//! brokers = "kafka-0:9092"
//! batch-size = 5000
//! kafka-config = ["fetch.wait.max.ms=10"]
//!
//! [fulfilment]
//! brokers = "kafka-0:9092"
//! partners = "/etc/forest/partners.toml"
//! ```
//!
//! The file's flags are inserted right after the subcommand name, before the command line's
//! own, and clap keeps the last value of a flag: so the command line wins, then the file, then
//! the environment (`FOREST_*`), then the defaults. An unknown key fails like an unknown flag.

use anyhow::{Context, bail};
use std::ffi::OsString;
use std::path::PathBuf;

const SUBCOMMANDS: &[&str] = &[
    "demo",
    "loadgen",
    "broker",
    "bench",
    "processor",
    "fulfilment",
    "partners",
    "rules",
    "user",
    "rebuild",
];

/// The command line with the config file's flags for the chosen subcommand spliced in.
pub fn args_with_file(mut args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let Some(at) = args
        .iter()
        .position(|a| a.to_str().is_some_and(|s| SUBCOMMANDS.contains(&s)))
    else {
        return Ok(args);
    };
    let sub = args[at].to_string_lossy().into_owned();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("the config file {} is not valid TOML", path.display()))?;
    for key in table.keys() {
        if !SUBCOMMANDS.contains(&key.as_str()) {
            bail!(
                "the config file {} has a table [{key}]; tables are named after subcommands: {}",
                path.display(),
                SUBCOMMANDS.join(", ")
            );
        }
    }
    let Some(section) = table.get(&sub) else {
        return Ok(args);
    };
    let Some(section) = section.as_table() else {
        bail!(
            "the config file {}: `{sub}` must be a table ([{sub}])",
            path.display()
        );
    };
    let mut flags: Vec<OsString> = Vec::new();
    for (key, value) in section {
        let flag = format!("--{key}");
        let mut push = |v: &toml::Value| -> anyhow::Result<()> {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(true) => {
                    flags.push(flag.clone().into());
                    return Ok(());
                }
                toml::Value::Boolean(false) => return Ok(()),
                other => bail!(
                    "the config file {}: [{sub}] {key} = {other} is not a string, number or boolean",
                    path.display()
                ),
            };
            flags.push(flag.clone().into());
            flags.push(text.into());
            Ok(())
        };
        match value {
            toml::Value::Array(items) => items.iter().try_for_each(&mut push)?,
            v => push(v)?,
        }
    }
    args.splice(at + 1..at + 1, flags);
    Ok(args)
}

/// `--config PATH`, `--config=PATH`, or `FOREST_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("FOREST_CONFIG").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_flags_go_before_the_command_lines_own() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        std::fs::write(
            &p,
            "[processor]\nbrokers = \"k:9092\"\nbatch-size = 100\nkafka-config = [\"a=1\", \"b=2\"]\n[demo]\nno-progress = true\n",
        )
        .unwrap();
        let ps = p.to_str().unwrap();
        let got = args_with_file(args(&[
            "forest",
            "--config",
            ps,
            "processor",
            "--batch-size",
            "7",
        ]))
        .unwrap();
        assert_eq!(
            got,
            args(&[
                "forest",
                "--config",
                ps,
                "processor",
                "--batch-size",
                "100",
                "--brokers",
                "k:9092",
                "--kafka-config",
                "a=1",
                "--kafka-config",
                "b=2",
                "--batch-size",
                "7"
            ])
        );
        let got = args_with_file(args(&["forest", "demo", "--config", ps])).unwrap();
        assert_eq!(
            got,
            args(&["forest", "demo", "--no-progress", "--config", ps])
        );
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        std::fs::write(&p, "[procesor]\nbrokers = \"k\"\n").unwrap();
        let e = args_with_file(args(&[
            "forest",
            "--config",
            p.to_str().unwrap(),
            "processor",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("[procesor]") && e.contains("processor"), "{e}");
        let e = args_with_file(args(&["forest", "--config", "/nope.toml", "demo"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nope.toml"), "{e}");
    }
}
