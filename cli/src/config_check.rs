//! `troupe config check FILE`.

use std::path::PathBuf;

use clap::Subcommand;

use crate::error::CliError;
use troupe_node::config::{ConfigError, NodeConfig};

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a node config (TOML, with TROUPE_* environment applied).
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ConfigCommand) -> Result<(), CliError> {
    let ConfigCommand::Check { file, json } = command;
    let mut config = NodeConfig::from_file(&file)?;
    config.apply_env(|name| std::env::var(name).ok())?;
    let problems = config.problems();
    if json {
        let list: Vec<_> = problems
            .iter()
            .map(|p| serde_json::json!({"field": p.field, "problem": p.problem, "fix": p.fix}))
            .collect();
        super::remote::print_json(
            &serde_json::json!({"ok": problems.is_empty(), "problems": list}),
        )?;
    } else if problems.is_empty() {
        println!("ok");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems).into())
    }
}
