//! `troupe certs`: the cluster CA and its certificates, made here with rcgen.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use troupe_transport::certs;

use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a new cluster CA (ca.crt, ca.key), node certificates node-<id>.crt/.key for ids
    /// 1..N (valid for 127.0.0.1, ::1, localhost and each --host), and an admin client
    /// certificate (client-admin.crt/.key, role admin), and the API token signing key with
    /// its JWKS (jwt-signing.key, jwks.json). Keys are written 0600; an existing, non-empty
    /// DIR is never touched.
    Init(InitArgs),
    /// Issue one more node certificate (node-<id>.crt/.key) from the CA in DIR.
    AddNode(AddNodeArgs),
    /// Issue a client certificate (client-<name>.crt/.key) that grants ROLE on the API port,
    /// an alternative to a token.
    AddClient(AddClientArgs),
}

#[derive(Debug, Args)]
pub struct AddClientArgs {
    /// A directory made by `troupe certs init` (it holds ca.crt and ca.key).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The client's name: 1 to 64 of a-z, 0-9, '.', '_', '-'.
    #[arg(long)]
    pub name: String,
    /// read, infer, operator or admin.
    #[arg(long)]
    pub role: troupe_transport::Role,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to create (it must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Node certificates to make, for ids 1..=N.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub nodes: u64,
    /// Another host name or IP address every node certificate is valid for (repeatable),
    /// e.g. --host node1 --host node2 --host node3 for the compose cluster.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AddNodeArgs {
    /// A directory made by `troupe certs init` (it holds ca.crt and ca.key).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The new node's id.
    #[arg(long)]
    pub id: u64,
    /// Another host name or IP address the certificate is valid for (repeatable).
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

fn certs_error(error: certs::CertsError) -> CliError {
    CliError::Usage(error.to_string())
}

pub fn run(command: CertsCommand) -> Result<(), CliError> {
    let written = match command {
        CertsCommand::Init(args) => certs::init(&args.out, args.nodes, &args.hosts),
        CertsCommand::AddNode(args) => certs::add_node(&args.dir, args.id, &args.hosts),
        CertsCommand::AddClient(args) => certs::add_client(&args.dir, &args.name, args.role),
    }
    .map_err(certs_error)?;
    for path in written.files {
        println!("{}", path.display());
    }
    Ok(())
}
