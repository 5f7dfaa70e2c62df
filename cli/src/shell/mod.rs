//! `troupe shell`: the admin actor shell. An interactive prompt (rustyline: history in the
//! data dir, tab completion of commands, model names, versions, tasks and actor paths) over
//! one node's Admin and Inference services, or one command with `-c`.
//!
//! Each line is parsed by the grammar in [`commands`] and run against the node; table output
//! by default, JSON with `--json` (for the session, or per command).

mod commands;
mod complete;
mod inference;
mod words;

use std::path::PathBuf;

use clap::Args;
use rustyline::error::ReadlineError;
use rustyline::history::DefaultHistory;
use rustyline::{Config, Editor};

use crate::error::CliError;

pub use commands::Session;

/// Lines kept in the history file.
const HISTORY_LINES: usize = 1000;

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// API address of the node to talk to.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// Run one command, print its output and exit: 0 when it succeeded, non-zero (with the
    /// error on stderr) when it failed.
    #[arg(short = 'c', long = "command", value_name = "COMMAND")]
    pub command: Option<String>,
    /// Print JSON wherever a command has data.
    #[arg(long)]
    pub json: bool,
    /// Directory holding the history file (shell_history); default $TROUPE_HOME.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

pub fn run(args: ShellArgs) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let mut session = Session::new(args.addr.clone(), args.json);
    if let Some(line) = &args.command {
        return runtime.block_on(session.execute(line)).map(|_| ());
    }
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(troupe_models::fetch::troupe_home);
    interactive(&runtime, &mut session, dir.join("shell_history"))
}

/// The prompt loop: runs until `quit`, `exit` or Ctrl-D. A failed command prints its error
/// and the loop goes on; Ctrl-C clears the line.
pub fn interactive(
    runtime: &tokio::runtime::Runtime,
    session: &mut Session,
    history: PathBuf,
) -> Result<(), CliError> {
    let config = Config::builder()
        .max_history_size(HISTORY_LINES)
        .map_err(|e| CliError::Usage(e.to_string()))?
        .auto_add_history(true)
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor: Editor<complete::ShellHelper, DefaultHistory> =
        Editor::with_config(config).map_err(|e| CliError::Usage(format!("no terminal: {e}")))?;
    let names = complete::Names::default();
    editor.set_helper(Some(complete::ShellHelper::new(names.clone())));
    if let Some(parent) = history.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    // A missing history file is a first run.
    let _ = editor.load_history(&history);
    runtime.block_on(session.refresh_names(&names));
    println!(
        "troupe shell on {} (`help` lists the commands; Tab completes; Ctrl-D or `quit` leaves)",
        session.addr()
    );
    loop {
        match editor.readline(&session.prompt()) {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                match runtime.block_on(session.execute(line)) {
                    Ok(commands::Next::Quit) => break,
                    Ok(commands::Next::Continue) => {}
                    Err(error) => eprintln!("error: {error}"),
                }
                runtime.block_on(session.refresh_names(&names));
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(error) => return Err(CliError::Usage(format!("reading the prompt: {error}"))),
        }
    }
    if let Err(error) = editor.save_history(&history) {
        eprintln!(
            "warning: cannot save the shell history to {}: {error}",
            history.display()
        );
    }
    Ok(())
}
