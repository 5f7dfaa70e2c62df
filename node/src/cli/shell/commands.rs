//! The shell's commands: their grammar (clap, without a binary name) and what each runs.
//! Most reuse the `troupe` subcommand of the same job, with the session's node address.

use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio_stream::StreamExt;
use troupe_proto::v1::{HistoryRequest, ReadRequest, RestartActorRequest, WatchRequest};

use super::complete::Names;
use super::words;
use crate::cli::cluster::{self, ActorsArgs, StatusArgs};
use crate::cli::models::{self, ActivateArgs, PushArgs, StateArgs};
use crate::cli::priorities::{self, SetArgs};
use crate::cli::remote::{self, admin, node_status, print_json, ListArgs, WriteOptions};
use crate::error::CliError;

/// How long `embed` and `similar` wait for an answer.
const EMBED_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `generate` and `chat` wait for a whole answer.
const GENERATE_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ShellCommand {
    /// Leader, term, every member's role and applied revision, and how each node's
    /// heartbeats see its peers.
    Status,
    /// The members: id, addresses, role, applied revision, and this node's view of each
    /// (up, suspect, down; RTT).
    Nodes,
    /// This node's Raft position: role, term, leader, log, commit and apply indexes,
    /// snapshot, voters and learners.
    Raft,
    /// Model versions: `models` (or `models list`), `models push DIR --name NAME`,
    /// `models activate NAME VERSION` (waits for the rollout), `models retire NAME VERSION`.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Task priorities: `priorities` (or `priorities list`), `priorities set TASK PRIORITY
    /// [--expected-revision R]`.
    Priorities {
        #[command(subcommand)]
        action: Option<PrioritiesAction>,
    },
    /// A node's actor tree with mailbox depth and restart counts (this node, or node ID).
    Actors { node: Option<u64> },
    /// `actor restart PATH [--node ID]`: restart one actor through its supervisor.
    Actor {
        #[command(subcommand)]
        action: ActorAction,
    },
    /// Follow metadata changes as they apply (from --from REV, default the next one); Ctrl-C
    /// stops, or --count N changes.
    Watch {
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        count: Option<usize>,
    },
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
    /// The models, priorities and settings as they were at revision REV (while the node's
    /// history still holds it).
    History { revision: u64 },
    /// List the commands, or explain one: `help models`.
    Help { command: Option<String> },
    /// Leave the shell (so does Ctrl-D).
    #[command(alias = "exit")]
    Quit,
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Registered versions, their state and each node's readiness.
    List,
    /// Upload a model directory to the node; the others pull it.
    Push {
        dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Roll VERSION out and wait until it is active everywhere (or failed, with why).
    Activate {
        name: String,
        version: String,
        /// Return once the rollout is requested, without waiting for it.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// Stop serving VERSION.
    Retire {
        name: String,
        version: String,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum PrioritiesAction {
    /// Tasks in scheduling order.
    List,
    /// Set TASK's priority (higher is served first); CAS with --expected-revision.
    Set {
        task: String,
        #[arg(allow_hyphen_values = true)]
        priority: i32,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum ActorAction {
    /// Restart the actor at PATH (see `actors`).
    Restart {
        path: String,
        #[arg(long)]
        node: Option<u64>,
    },
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
    conversation: Vec<troupe_proto::v1::ChatMessage>,
}

/// The names of the commands, for completion and `help`.
pub fn command_names() -> Vec<String> {
    use clap::CommandFactory;
    Line::command()
        .get_subcommands()
        .flat_map(|c| {
            std::iter::once(c.get_name().to_owned()).chain(c.get_all_aliases().map(str::to_owned))
        })
        .collect()
}

/// The subcommands of `command` (`models` → list, push, activate, retire).
pub fn subcommand_names(command: &str) -> Vec<String> {
    use clap::CommandFactory;
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
        let json_flag = words.len() != before;
        if words.is_empty() {
            return Ok(Next::Continue);
        }
        let parsed = match Line::try_parse_from(&words) {
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
        let json = self.json || json_flag || parsed.json;
        self.run(parsed.command, json).await
    }

    fn write(&self, expected_revision: Option<u64>, json: bool) -> WriteOptions {
        WriteOptions {
            expected_revision,
            request_id: None,
            addr: self.addr.clone(),
            json,
        }
    }

    fn list(&self, json: bool) -> ListArgs {
        ListArgs {
            addr: self.addr.clone(),
            stale: false,
            json,
        }
    }

    async fn run(&mut self, command: ShellCommand, json: bool) -> Result<Next, CliError> {
        let addr = self.addr.clone();
        match command {
            ShellCommand::Status => cluster::status(&StatusArgs { addr, json }).await?,
            ShellCommand::Nodes => nodes(&addr, json).await?,
            ShellCommand::Raft => raft(&addr, json).await?,
            ShellCommand::Models { action } => match action.unwrap_or(ModelsAction::List) {
                ModelsAction::List => models::list(self.list(json)).await?,
                ModelsAction::Push { dir, name, version } => {
                    super::super::push::push(PushArgs {
                        dir,
                        name,
                        version,
                        format: None,
                        precision: None,
                        addr,
                        quiet: json,
                        json,
                    })
                    .await?
                }
                ModelsAction::Activate {
                    name,
                    version,
                    no_wait,
                    expected_revision,
                } => {
                    models::activate(ActivateArgs {
                        target: StateArgs {
                            name,
                            version,
                            write: self.write(expected_revision, json),
                        },
                        wait: !no_wait,
                        wait_timeout: models::DEFAULT_WAIT_TIMEOUT_S,
                    })
                    .await?
                }
                ModelsAction::Retire {
                    name,
                    version,
                    expected_revision,
                } => {
                    models::set_state(
                        StateArgs {
                            name,
                            version,
                            write: self.write(expected_revision, json),
                        },
                        "retired",
                    )
                    .await?
                }
            },
            ShellCommand::Priorities { action } => match action.unwrap_or(PrioritiesAction::List) {
                PrioritiesAction::List => priorities::list(self.list(json)).await?,
                PrioritiesAction::Set {
                    task,
                    priority,
                    expected_revision,
                } => {
                    priorities::set(SetArgs {
                        name: task,
                        priority,
                        write: self.write(expected_revision, json),
                    })
                    .await?
                }
            },
            ShellCommand::Actors { node } => {
                let addr = node_api(&addr, node).await?;
                cluster::actors(&ActorsArgs { addr, json }).await?
            }
            ShellCommand::Actor {
                action: ActorAction::Restart { path, node },
            } => restart_actor(&node_api(&addr, node).await?, path, json).await?,
            ShellCommand::Watch { from, count } => watch(&addr, from, count, json).await?,
            ShellCommand::Embed { model, text } => {
                embed(&addr, model, text.join(" "), json).await?
            }
            ShellCommand::Similar { model, text } => {
                similar(&addr, model, &text.join(" "), json).await?
            }
            ShellCommand::Generate {
                model,
                max_tokens,
                temperature,
                prompt,
            } => {
                let request = troupe_proto::v1::GenerateRequest {
                    prompt: prompt.join(" "),
                    max_tokens,
                    temperature,
                    ..Default::default()
                };
                stream_generation(&addr, model, request, json).await?;
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
                    let mut messages = self.conversation.clone();
                    messages.push(troupe_proto::v1::ChatMessage {
                        role: "user".into(),
                        content: message.join(" "),
                    });
                    let request = troupe_proto::v1::GenerateRequest {
                        messages: messages.clone(),
                        max_tokens,
                        temperature,
                        ..Default::default()
                    };
                    let answer = stream_generation(&addr, model, request, json).await?;
                    messages.push(troupe_proto::v1::ChatMessage {
                        role: "assistant".into(),
                        content: answer,
                    });
                    self.conversation = messages;
                }
            }
            ShellCommand::History { revision } => history(&addr, revision, json).await?,
            ShellCommand::Help { command } => help(command.as_deref())?,
            ShellCommand::Quit => return Ok(Next::Quit),
        }
        Ok(Next::Continue)
    }
}

fn help(command: Option<&str>) -> Result<(), CliError> {
    use clap::CommandFactory;
    let mut line = Line::command();
    match command {
        None => {
            println!("commands (`help COMMAND` for one; add --json for JSON):");
            for sub in line.get_subcommands() {
                let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
                println!("  {:<11} {}", sub.get_name(), about);
            }
            Ok(())
        }
        Some(name) => {
            let sub = line.find_subcommand_mut(name).ok_or_else(|| {
                CliError::Usage(format!("no command {name:?}: `help` lists them"))
            })?;
            println!("{}", sub.render_long_help());
            Ok(())
        }
    }
}

/// The API address of node `id` (this node when `None`).
async fn node_api(addr: &str, id: Option<u64>) -> Result<String, CliError> {
    let Some(id) = id else {
        return Ok(addr.to_owned());
    };
    let status = node_status(addr).await?;
    if status.id == id {
        return Ok(addr.to_owned());
    }
    status
        .members
        .iter()
        .find(|m| m.id == id)
        .filter(|m| !m.api_addr.is_empty())
        .map(|m| m.api_addr.clone())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "node {id} is not a member with a known API address (`nodes` lists them)"
            ))
        })
}

#[derive(Serialize)]
struct NodeRow {
    id: u64,
    api_addr: String,
    peer_addr: String,
    voter: bool,
    /// As seen from the node the shell talks to: "self", up, suspect, down or unknown.
    seen_as: String,
    rtt_micros: Option<u64>,
    role: String,
    applied_revision: Option<u64>,
}

async fn nodes(addr: &str, json: bool) -> Result<(), CliError> {
    let status = node_status(addr).await?;
    let rows: Vec<NodeRow> = status
        .members
        .iter()
        .map(|m| {
            let peer = status.peers.iter().find(|p| p.node_id == m.id);
            let is_self = m.id == status.id;
            NodeRow {
                id: m.id,
                api_addr: m.api_addr.clone(),
                peer_addr: m.peer_addr.clone(),
                voter: status.voters.contains(&m.id),
                seen_as: if is_self {
                    "self".into()
                } else {
                    peer.map_or("unknown".into(), |p| p.state.clone())
                },
                rtt_micros: peer.and_then(|p| p.rtt_micros),
                role: if is_self {
                    status.role.clone()
                } else {
                    peer.map(|p| p.raft_role.clone()).unwrap_or_default()
                },
                applied_revision: if is_self {
                    Some(status.applied_revision)
                } else {
                    peer.map(|p| p.applied_revision)
                },
            }
        })
        .collect();
    if json {
        return print_json(&rows);
    }
    println!(
        "{:>4}  {:<21}  {:<21}  {:<7}  {:<9}  {:>8}  {:<9}  {:>8}",
        "id", "api", "peer", "member", "seen as", "rtt ms", "role", "applied"
    );
    for row in &rows {
        println!(
            "{:>4}  {:<21}  {:<21}  {:<7}  {:<9}  {:>8}  {:<9}  {:>8}",
            row.id,
            if row.api_addr.is_empty() {
                "-"
            } else {
                &row.api_addr
            },
            row.peer_addr,
            if row.voter { "voter" } else { "learner" },
            row.seen_as,
            row.rtt_micros
                .map_or("-".into(), |r| format!("{:.2}", r as f64 / 1e3)),
            if row.role.is_empty() { "-" } else { &row.role },
            row.applied_revision.map_or("-".into(), |r| r.to_string()),
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct RaftView {
    id: u64,
    role: String,
    term: u64,
    leader: Option<u64>,
    last_log_index: u64,
    committed_index: Option<u64>,
    applied_index: u64,
    applied_revision: u64,
    snapshot_index: u64,
    snapshot_revision: u64,
    purged_index: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    leader_changes: u64,
    sync_lag: u64,
    insecure: bool,
    removed: String,
}

async fn raft(addr: &str, json: bool) -> Result<(), CliError> {
    let s = node_status(addr).await?;
    let view = RaftView {
        id: s.id,
        role: s.role,
        term: s.term,
        leader: s.leader,
        last_log_index: s.last_log_index,
        committed_index: s.committed_index,
        applied_index: s.applied_index,
        applied_revision: s.applied_revision,
        snapshot_index: s.snapshot_index,
        snapshot_revision: s.snapshot_revision,
        purged_index: s.purged_index,
        voters: s.voters,
        learners: s.learners,
        leader_changes: s.leader_changes,
        sync_lag: s.sync_lag,
        insecure: s.insecure,
        removed: s.removed,
    };
    if json {
        return print_json(&view);
    }
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for (field, value) in [
        ("node", view.id.to_string()),
        ("role", view.role.clone()),
        ("term", view.term.to_string()),
        ("leader", opt(view.leader)),
        ("last log index", view.last_log_index.to_string()),
        ("committed index", opt(view.committed_index)),
        ("applied index", view.applied_index.to_string()),
        ("applied revision", view.applied_revision.to_string()),
        ("snapshot index", view.snapshot_index.to_string()),
        ("snapshot revision", view.snapshot_revision.to_string()),
        ("purged index", view.purged_index.to_string()),
        ("voters", format!("{:?}", view.voters)),
        ("learners", format!("{:?}", view.learners)),
        ("leader changes", view.leader_changes.to_string()),
        ("sync lag (entries)", view.sync_lag.to_string()),
        (
            "security",
            if view.insecure {
                "INSECURE (plaintext)"
            } else {
                "mtls"
            }
            .to_owned(),
        ),
        (
            "removed",
            if view.removed.is_empty() {
                "no".to_owned()
            } else {
                view.removed.clone()
            },
        ),
    ] {
        println!("{field:<19} {value}");
    }
    Ok(())
}

async fn restart_actor(addr: &str, path: String, json: bool) -> Result<(), CliError> {
    let reply = admin(addr)
        .await?
        .restart_actor(RestartActorRequest { path })
        .await?
        .into_inner();
    if json {
        return print_json(&serde_json::json!({"path": reply.path, "restarts": reply.restarts}));
    }
    println!("restarted {} (restarts: {})", reply.path, reply.restarts);
    Ok(())
}

async fn watch(
    addr: &str,
    from: Option<u64>,
    count: Option<usize>,
    json: bool,
) -> Result<(), CliError> {
    let from_revision = match from {
        Some(from) => from,
        None => node_status(addr).await?.applied_revision + 1,
    };
    // A watch runs until stopped: its deadline is a day.
    let channel = remote::channel(addr, Duration::from_secs(86_400)).await?;
    let mut stream = troupe_proto::v1::admin_client::AdminClient::new(channel)
        .watch(WatchRequest { from_revision })
        .await?
        .into_inner();
    if !json {
        eprintln!("watching from revision {from_revision} (Ctrl-C stops)");
    }
    let mut seen = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while count.is_none_or(|count| seen < count) {
        let change = tokio::select! {
            change = stream.next() => change,
            _ = &mut interrupted => break,
        };
        let Some(change) = change else { break };
        let change = change?;
        seen += 1;
        if json {
            let value: serde_json::Value =
                serde_json::from_str(&change.value_json).unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::json!({"revision": change.revision, "key": change.key, "value": value})
            );
        } else {
            println!(
                "{:>8}  {:<40}  {}",
                change.revision, change.key, change.value_json
            );
        }
    }
    Ok(())
}

/// Streams a generation into the terminal (or prints its chunks as JSON lines); returns its
/// text.
async fn stream_generation(
    addr: &str,
    model: Option<String>,
    mut request: troupe_proto::v1::GenerateRequest,
    json: bool,
) -> Result<String, CliError> {
    use std::io::Write;
    request.model = pick_model_of(addr, model, "generate").await?;
    let mut client = remote::inference(addr, GENERATE_TIMEOUT).await?;
    let mut call = tonic::Request::new(request);
    call.set_timeout(GENERATE_TIMEOUT);
    let mut stream = client.generate(call).await?.into_inner();
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.message().await? {
        text.push_str(&chunk.text);
        if json {
            print_json(&serde_json::json!({
                "token_ids": chunk.token_ids,
                "text": chunk.text,
                "finish_reason": chunk.finish_reason,
                "served_by": chunk.served_by,
            }))?;
            continue;
        }
        print!("{}", chunk.text);
        let _ = stdout.flush();
        if let Some(usage) = chunk.usage {
            println!(
                "\n({}, {} prompt + {} generated tokens)",
                chunk.finish_reason, usage.prompt_tokens, usage.completion_tokens
            );
        }
    }
    Ok(text)
}

/// The model to embed with: `model`, or the one name with an active version.
async fn pick_model(addr: &str, model: Option<String>) -> Result<String, CliError> {
    pick_model_of(addr, model, "embed").await
}

/// `model`, or the one model of `kind` (`embed` or `generate`) with an active version.
async fn pick_model_of(addr: &str, model: Option<String>, kind: &str) -> Result<String, CliError> {
    if let Some(model) = model {
        return Ok(model);
    }
    let models = admin(addr)
        .await?
        .list_models(ReadRequest {
            stale: true,
            min_revision: 0,
        })
        .await?
        .into_inner()
        .models;
    let mut active: Vec<String> = models
        .into_iter()
        .filter(|m| {
            m.state == "active" && troupe_models::ModelFormat::from_name(&m.format).kind() == kind
        })
        .map(|m| m.name)
        .collect();
    active.dedup();
    match active.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::Usage(format!(
            "no {kind} model is active: `models push` and `models activate` one first"
        ))),
        many => Err(CliError::Usage(format!(
            "several models are active ({}): name one with --model",
            many.join(", ")
        ))),
    }
}

async fn embed_texts(
    addr: &str,
    model: Option<String>,
    texts: Vec<String>,
) -> Result<(String, troupe_proto::v1::EmbedResponse), CliError> {
    let model = pick_model(addr, model).await?;
    let reply = remote::embed_texts(addr, &model, texts, EMBED_TIMEOUT).await?;
    Ok((model, reply))
}

async fn embed(
    addr: &str,
    model: Option<String>,
    text: String,
    json: bool,
) -> Result<(), CliError> {
    let (model, reply) = embed_texts(addr, model, vec![text]).await?;
    let values = reply
        .embeddings
        .into_iter()
        .next()
        .map(|e| e.values)
        .unwrap_or_default();
    if json {
        return print_json(&serde_json::json!({
            "model": model,
            "version": reply.model_version,
            "served_by": reply.served_by,
            "embedding": values,
        }));
    }
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    let head: Vec<String> = values.iter().take(6).map(|v| format!("{v:+.4}")).collect();
    println!(
        "{model}@{} on node {}: {} dims, norm {norm:.4}\n[{}, ...]",
        reply.model_version,
        reply.served_by,
        values.len(),
        head.join(", ")
    );
    Ok(())
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

async fn similar(
    addr: &str,
    model: Option<String>,
    line: &str,
    json: bool,
) -> Result<(), CliError> {
    let (first, second) = line
        .split_once('|')
        .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| CliError::Usage("usage: similar TEXT1 | TEXT2".into()))?;
    let (model, reply) = embed_texts(addr, model, vec![first.clone(), second.clone()]).await?;
    let [a, b] = reply.embeddings.as_slice() else {
        return Err(CliError::Usage(format!(
            "the node answered {} embeddings for 2 texts",
            reply.embeddings.len()
        )));
    };
    let score = cosine(&a.values, &b.values);
    if json {
        return print_json(&serde_json::json!({
            "model": model,
            "version": reply.model_version,
            "texts": [first, second],
            "cosine": score,
        }));
    }
    println!("cosine {score:.4}  ({model}@{})", reply.model_version);
    Ok(())
}

async fn history(addr: &str, revision: u64, json: bool) -> Result<(), CliError> {
    let reply = admin(addr)
        .await?
        .history(HistoryRequest { revision })
        .await?
        .into_inner();
    if json {
        let models: Vec<_> = reply
            .models
            .iter()
            .map(|m| {
                serde_json::json!({"name": m.name, "version": m.version, "state": m.state,
                    "digest": m.digest, "mod_revision": m.mod_revision})
            })
            .collect();
        let tasks: Vec<_> = reply
            .tasks
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "priority": t.priority, "mod_revision": t.mod_revision}))
            .collect();
        let settings: Vec<_> = reply
            .settings
            .iter()
            .map(|s| serde_json::json!({"key": s.key, "value": s.value, "mod_revision": s.mod_revision}))
            .collect();
        return print_json(&serde_json::json!({
            "revision": reply.revision,
            "oldest_revision": reply.oldest_revision,
            "models": models,
            "tasks": tasks,
            "settings": settings,
        }));
    }
    println!(
        "as of revision {} (this node can go back to {})",
        reply.revision, reply.oldest_revision
    );
    println!(
        "\n{:<24} {:<14} {:<8} {:>8}",
        "model", "version", "state", "mod rev"
    );
    for m in &reply.models {
        println!(
            "{:<24} {:<14} {:<8} {:>8}",
            m.name, m.version, m.state, m.mod_revision
        );
    }
    println!("\n{:<24} {:>9} {:>8}", "task", "priority", "mod rev");
    for t in &reply.tasks {
        println!("{:<24} {:>9} {:>8}", t.name, t.priority, t.mod_revision);
    }
    println!("\n{:<24} {:<24} {:>8}", "setting", "value", "mod rev");
    for s in &reply.settings {
        println!("{:<24} {:<24} {:>8}", s.key, s.value, s.mod_revision);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_parses_every_command() {
        for line in [
            "status",
            "nodes --json",
            "raft",
            "models",
            "models list",
            "models push /tmp/m --name m",
            "models activate m v1",
            "models retire m v1 --expected-revision 3",
            "priorities",
            "priorities set search -2 --expected-revision 0",
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
            "exit",
        ] {
            let words = words::split(line).unwrap();
            if let Err(error) = Line::try_parse_from(&words) {
                panic!("{line:?}: {error}");
            }
        }
        assert!(Line::try_parse_from(["history", "x"]).is_err());
        assert!(command_names().contains(&"similar".to_owned()));
        assert_eq!(subcommand_names("actor"), ["restart"]);
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
    }
}
