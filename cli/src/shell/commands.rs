//! The shell's grammar and what each command runs. The admin commands are the `troupe`
//! CLI's own (`cluster`, `models`, `priorities`, `settings`, `watch`, `history`: the same
//! clap types and the same code), with the session's node as `--addr`. Short words stand
//! for the common ones (`status` is `cluster status`, see [`ALIASES`]); `embed`, `similar`,
//! `generate` and `chat` take the rest of the line (`inference`).

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use troupe_proto::v1::{ChatMessage, GenerateRequest, ReadRequest};

use super::complete::Names;
use super::{inference, words};
use crate::cluster::{self, ClusterCommand};
use crate::error::CliError;
use crate::models::{self, ModelsCommand};
use crate::priorities::{self, PrioritiesCommand};
use crate::remote::admin;
use crate::revisions::{self, HistoryArgs, WatchArgs};
use crate::settings::{self, SettingsCommand};

#[derive(Debug, Parser)]
#[command(
    name = "",
    no_binary_name = true,
    disable_version_flag = true,
    disable_help_subcommand = true,
    override_usage = "COMMAND [ARGS] [--json]"
)]
struct Line {
    #[command(subcommand)]
    command: ShellCommand,
}

#[derive(Debug, Subcommand)]
enum ShellCommand {
    /// Membership, status, members, Raft position and actor trees (`troupe cluster`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Model versions: list, push, register, activate (--wait for the rollout), retire;
    /// fetch into this machine's cache (`troupe models`).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Task priorities (`troupe priorities`).
    #[command(subcommand)]
    Priorities(PrioritiesCommand),
    /// Cluster settings (`troupe settings`).
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Follow metadata changes as they apply; Ctrl-C stops, or --count N (`troupe watch`).
    Watch(WatchArgs),
    /// The metadata as it was at a past revision (`troupe history`).
    History(HistoryArgs),
    /// Embed TEXT (the rest of the line) with the active model (or --model NAME).
    Embed {
        #[arg(long)]
        model: Option<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// `similar TEXT1 | TEXT2`: the cosine similarity of two texts' embeddings.
    Similar {
        #[arg(long)]
        model: Option<String>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Generate from PROMPT (the rest of the line) with the active generative model (or
    /// --model NAME), streaming the text as it comes.
    Generate {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        prompt: Vec<String>,
    },
    /// Chat: MESSAGE (the rest of the line) goes to the model with the conversation so far,
    /// through its chat template, and the answer streams in. `chat --reset` starts over.
    Chat {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Forget the conversation.
        #[arg(long)]
        reset: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        message: Vec<String>,
    },
    /// List the commands, or explain one: `help models`, `help cluster status`.
    Help { command: Vec<String> },
    /// Leave the shell (so does Ctrl-D).
    #[command(alias = "exit")]
    Quit,
}

/// The shell's short words: typing the left-hand words runs the right-hand command, with
/// the rest of the line after it. A command group typed alone lists.
pub const ALIASES: &[(&str, &str)] = &[
    ("status", "cluster status"),
    ("nodes", "cluster nodes"),
    ("raft", "cluster raft"),
    ("actors", "cluster actors"),
    ("actor restart", "cluster restart-actor"),
    ("models", "models list"),
    ("priorities", "priorities list"),
    ("settings", "settings list"),
];

/// `words` with a leading alias replaced by what it stands for. A group's bare name
/// (`models`) stands for its listing only when nothing follows it but flags.
fn expand(words: Vec<String>) -> Vec<String> {
    for (short, long) in ALIASES {
        let short: Vec<&str> = short.split(' ').collect();
        if words.len() < short.len() || words.iter().zip(&short).any(|(w, s)| w != s) {
            continue;
        }
        let rest = &words[short.len()..];
        let is_group = long.starts_with(short[0]) && short.len() == 1;
        if is_group && rest.first().is_some_and(|w| !w.starts_with('-')) {
            continue;
        }
        return long
            .split(' ')
            .map(str::to_owned)
            .chain(rest.iter().cloned())
            .collect();
    }
    words
}

/// The grammar with the session's node as every command's default `--addr`, and (with
/// `json`) JSON output by default.
fn grammar(addr: &str, json: bool) -> clap::Command {
    fn with_session(mut command: clap::Command, addr: &str, json: bool) -> clap::Command {
        let has = |command: &clap::Command, id: &str| {
            command.get_arguments().any(|a| a.get_id().as_str() == id)
        };
        if has(&command, "addr") {
            let addr = addr.to_owned();
            command = command.mut_arg("addr", |a| a.required(false).default_value(addr));
        }
        if json && has(&command, "json") {
            command = command.mut_arg("json", |a| a.default_value("true"));
        }
        let names: Vec<String> = command
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        for name in names {
            command = command.mut_subcommand(name, |c| with_session(c, addr, json));
        }
        command
    }
    with_session(Line::command(), addr, json)
}

/// What the prompt loop does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Quit,
}

/// One shell's connection settings.
pub struct Session {
    addr: String,
    json: bool,
    /// The `chat` conversation so far.
    conversation: Vec<ChatMessage>,
}

/// The names of the commands and short words, for completion and `help`.
pub fn command_names() -> Vec<String> {
    Line::command()
        .get_subcommands()
        .flat_map(|c| {
            std::iter::once(c.get_name().to_owned()).chain(c.get_all_aliases().map(str::to_owned))
        })
        .chain(
            ALIASES
                .iter()
                .map(|(short, _)| short.split(' ').next().unwrap_or(short).to_owned()),
        )
        .collect()
}

/// The subcommands of `command` (`models` → list, push, activate, ...; `actor` → restart).
pub fn subcommand_names(command: &str) -> Vec<String> {
    let short: Vec<String> = ALIASES
        .iter()
        .filter_map(|(short, _)| short.strip_prefix(command)?.strip_prefix(' '))
        .map(str::to_owned)
        .collect();
    if !short.is_empty() {
        return short;
    }
    Line::command()
        .find_subcommand(command)
        .map(|c| {
            c.get_subcommands()
                .map(|s| s.get_name().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl Session {
    pub fn new(addr: String, json: bool) -> Self {
        Self {
            addr,
            json,
            conversation: Vec::new(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn prompt(&self) -> String {
        format!("troupe {}> ", self.addr)
    }

    /// Refreshes what completion offers: model names and versions, tasks, actor paths. A
    /// node that does not answer leaves the old names.
    pub async fn refresh_names(&self, names: &Names) {
        let Ok(mut client) = admin(&self.addr).await else {
            return;
        };
        let read = ReadRequest {
            stale: true,
            min_revision: 0,
        };
        if let Ok(reply) = client.list_models(read).await {
            names.set_models(
                reply
                    .into_inner()
                    .models
                    .into_iter()
                    .map(|m| (m.name, m.version))
                    .collect(),
            );
        }
        if let Ok(reply) = client.list_priorities(read).await {
            names.set_tasks(
                reply
                    .into_inner()
                    .tasks
                    .into_iter()
                    .map(|t| t.name)
                    .collect(),
            );
        }
        if let Ok(reply) = client
            .actor_tree(troupe_proto::v1::ActorTreeRequest {})
            .await
        {
            names.set_actors(
                reply
                    .into_inner()
                    .actors
                    .into_iter()
                    .map(|a| a.path)
                    .collect(),
            );
        }
    }

    /// Parses and runs one line.
    pub async fn execute(&mut self, line: &str) -> Result<Next, CliError> {
        let mut words = words::split(line).map_err(CliError::Usage)?;
        // `--json` anywhere, also after the free text of `embed` and `similar`.
        let before = words.len();
        words.retain(|w| w != "--json");
        let json = self.json || words.len() != before;
        if words.is_empty() {
            return Ok(Next::Continue);
        }
        let parsed = grammar(&self.addr, json)
            .try_get_matches_from(expand(words))
            .and_then(|matches| Line::from_arg_matches(&matches));
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(error) if error.kind() == clap::error::ErrorKind::DisplayHelp => {
                print!("{error}");
                return Ok(Next::Continue);
            }
            Err(error) => {
                let message = error.to_string();
                let message = message.strip_prefix("error: ").unwrap_or(&message);
                return Err(CliError::Usage(message.trim_end().replace("\n\n", "\n")));
            }
        };
        self.run(parsed.command, json).await
    }

    async fn run(&mut self, command: ShellCommand, json: bool) -> Result<Next, CliError> {
        let addr = self.addr.clone();
        match command {
            ShellCommand::Cluster(command) => cluster::execute(command).await?,
            ShellCommand::Models(command) => models::execute(command).await?,
            ShellCommand::Priorities(command) => priorities::execute(command).await?,
            ShellCommand::Settings(command) => settings::execute(command).await?,
            ShellCommand::Watch(args) => revisions::watch(&args).await?,
            ShellCommand::History(args) => revisions::history(&args).await?,
            ShellCommand::Embed { model, text } => {
                inference::embed(&addr, model, text.join(" "), json).await?
            }
            ShellCommand::Similar { model, text } => {
                inference::similar(&addr, model, &text.join(" "), json).await?
            }
            ShellCommand::Generate {
                model,
                max_tokens,
                temperature,
                prompt,
            } => {
                let request = GenerateRequest {
                    prompt: prompt.join(" "),
                    max_tokens,
                    temperature,
                    ..Default::default()
                };
                inference::stream_generation(&addr, model, request, json).await?;
            }
            ShellCommand::Chat {
                model,
                max_tokens,
                temperature,
                reset,
                message,
            } => {
                if reset {
                    self.conversation.clear();
                    println!("(a new conversation)");
                }
                if !message.is_empty() {
                    let request = GenerateRequest {
                        max_tokens,
                        temperature,
                        ..Default::default()
                    };
                    let message = message.join(" ");
                    inference::chat(&addr, &mut self.conversation, model, request, message, json)
                        .await?;
                }
            }
            ShellCommand::Help { command } => help(&self.addr, command)?,
            ShellCommand::Quit => return Ok(Next::Quit),
        }
        Ok(Next::Continue)
    }
}

fn help(addr: &str, command: Vec<String>) -> Result<(), CliError> {
    let mut line = grammar(addr, false);
    if command.is_empty() {
        println!("commands (`help COMMAND` for one; add --json for JSON):");
        for sub in line.get_subcommands() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            println!("  {:<13} {}", sub.get_name(), about);
        }
        println!("short words:");
        for (short, long) in ALIASES {
            println!("  {short:<13} {long}");
        }
        return Ok(());
    }
    // `help models` is the group; `help status` is what the short word stands for.
    let find = |line: &mut clap::Command, path: &[String]| {
        let mut found = Some(line);
        for name in path {
            found = found.and_then(|c| c.find_subcommand_mut(name));
        }
        found.map(|c| c.render_long_help())
    };
    let text = find(&mut line, &command)
        .or_else(|| find(&mut line, &expand(command.clone())))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "no command {:?}: `help` lists them",
                command.join(" ")
            ))
        })?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(line: &str) -> Result<ShellCommand, clap::Error> {
        let words = expand(words::split(line).unwrap());
        grammar("127.0.0.1:7700", false)
            .try_get_matches_from(words)
            .and_then(|matches| Line::from_arg_matches(&matches))
            .map(|line| line.command)
    }

    #[test]
    fn the_grammar_parses_every_command() {
        for line in [
            "status",
            "nodes",
            "raft",
            "cluster status",
            "cluster nodes --addr 127.0.0.1:7710",
            "models",
            "models list",
            "models push /tmp/m --name m",
            "models activate m v1 --wait",
            "models retire m v1 --expected-revision 3",
            "priorities",
            "priorities set search -2 --expected-revision 0",
            "settings",
            "settings set k v",
            "actors",
            "actors 2",
            "actor restart node/health --node 1",
            "watch --count 2",
            "embed --model m a --b c",
            "similar a b | c d",
            "history 4",
            "generate --max-tokens 8 Once upon a time",
            "chat --reset",
            "chat What is 2 + 2?",
            "help models",
            "help cluster status",
            "exit",
        ] {
            if let Err(error) = parses(line) {
                panic!("{line:?}: {error}");
            }
        }
        assert!(parses("history x").is_err());
        assert!(
            parses("node --insecure").is_err(),
            "`troupe node` is not a shell command"
        );
        assert!(command_names().contains(&"similar".to_owned()));
        assert!(command_names().contains(&"status".to_owned()));
        assert_eq!(subcommand_names("actor"), ["restart"]);
        assert!(subcommand_names("models").contains(&"activate".to_owned()));
    }

    #[test]
    fn the_session_node_is_every_command_s_default_address() {
        let Ok(ShellCommand::Priorities(PrioritiesCommand::Set(set))) =
            parses("priorities set search 7")
        else {
            panic!("not a priorities set");
        };
        assert_eq!(set.write.addr, "127.0.0.1:7700");
        assert_eq!(set.priority, 7);
        let Ok(ShellCommand::Cluster(ClusterCommand::Actors(actors))) = parses("actors 2") else {
            panic!("`actors 2` is not cluster actors");
        };
        assert_eq!(
            (actors.addr.as_str(), actors.node),
            ("127.0.0.1:7700", Some(2))
        );
        // An explicit --addr wins.
        let Ok(ShellCommand::Cluster(ClusterCommand::Status(status))) =
            parses("status --addr 127.0.0.1:7710")
        else {
            panic!("not cluster status");
        };
        assert_eq!(status.addr, "127.0.0.1:7710");
        // `models NAME` is not the listing: the group's words pass through unchanged.
        assert!(parses("models bogus").is_err());
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((inference::cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!(inference::cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
    }
}
