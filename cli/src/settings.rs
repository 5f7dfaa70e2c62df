//! `troupe settings`: cluster settings, written through Raft.

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_proto::v1::{GetSettingRequest, ReadRequest, SetSettingRequest, SettingEntry};

use super::remote::{admin, block_on, print_json, print_write, ListArgs, WriteOptions};
use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Set a cluster setting; prints the revision it applied at (the current one when the
    /// value was already so). A lost CAS exits 3. limits.max_texts_per_request,
    /// limits.max_chars_per_text, limits.request_timeout_ms, limits.max_prompt_chars,
    /// limits.default_max_tokens, limits.max_tokens, limits.generate_timeout_ms and
    /// routing.max_attempts change every running node as it applies the write ("" unsets);
    /// other configuration keys are refused; any other key is the cluster's own data.
    Set(SetArgs),
    /// One setting's value and revisions. A key never set exits 1 with NOT_FOUND.
    Get(GetArgs),
    /// Every setting, by key.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    pub key: String,
    #[arg(allow_hyphen_values = true)]
    pub value: String,
    #[command(flatten)]
    pub write: WriteOptions,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    pub key: String,
    #[command(flatten)]
    pub read: ListArgs,
}

#[derive(Serialize)]
struct SettingView {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
}

impl From<SettingEntry> for SettingView {
    fn from(entry: SettingEntry) -> Self {
        Self {
            key: entry.key,
            value: entry.value,
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
        }
    }
}

fn print_table(settings: &[SettingView]) {
    println!("{:<32} {:>12} value", "key", "mod_revision");
    for setting in settings {
        println!(
            "{:<32} {:>12} {}",
            setting.key, setting.mod_revision, setting.value
        );
    }
}

pub fn run(command: SettingsCommand) -> Result<(), CliError> {
    block_on(execute(command))
}

/// Runs one `settings` command (the shell runs them through this too).
pub async fn execute(command: SettingsCommand) -> Result<(), CliError> {
    match command {
        SettingsCommand::Set(args) => {
            let write = args.write;
            let reply = admin(&write.addr)
                .await?
                .set_setting(SetSettingRequest {
                    key: args.key,
                    value: args.value,
                    expected_revision: write.expected_revision,
                    request_id: write.request_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_write(&reply, write.json)
        }
        SettingsCommand::Get(args) => {
            let reply = admin(&args.read.addr)
                .await?
                .get_setting(GetSettingRequest {
                    key: args.key.clone(),
                    read: Some(ReadRequest {
                        stale: args.read.stale,
                        min_revision: 0,
                    }),
                })
                .await?
                .into_inner();
            let setting = reply.setting.ok_or_else(|| CliError::Rpc {
                code: tonic::Code::NotFound,
                message: format!(
                    "setting '{}' is not set (cluster at revision {})",
                    args.key, reply.revision
                ),
            })?;
            let view = SettingView::from(setting);
            if args.read.json {
                return print_json(&view);
            }
            println!("{}", view.value);
            Ok(())
        }
        SettingsCommand::List(args) => {
            let reply = admin(&args.addr)
                .await?
                .list_settings(ReadRequest {
                    stale: args.stale,
                    min_revision: 0,
                })
                .await?
                .into_inner();
            let settings: Vec<SettingView> =
                reply.settings.into_iter().map(SettingView::from).collect();
            if args.json {
                return print_json(&settings);
            }
            print_table(&settings);
            Ok(())
        }
    }
}
