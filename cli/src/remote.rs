//! Talking to a running node from the CLI: connect, call with a deadline, follow the leader
//! for membership changes, print JSON or a table.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::inference_client::InferenceClient;
use troupe_proto::v1::{EmbedRequest, EmbedResponse, NodeStatusRequest, NodeStatusResponse};
use troupe_transport::ClientTls;

use crate::error::CliError;

/// How long one CLI call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs an async CLI command on a small runtime.
pub fn block_on<T>(future: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    // One worker per core, or TOKIO_WORKER_THREADS.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(e.to_string()))?
        .block_on(future)
}

/// How this process's remote commands reach nodes: plaintext (`None`), or TLS with `--ca`
/// (and a client certificate with `--cert`/`--key`). Set from the command line, or by
/// `troupe up` for the cluster it made. The files are read at the first connection, so a
/// command that connects to nothing never reads them.
static CLIENT_TLS: Mutex<Option<(ClientTls, Option<ClientConfig>)>> = Mutex::new(None);

type ClientConfig = Arc<troupe_transport::rustls::ClientConfig>;

/// Makes every later connection of this process use `tls`.
pub fn use_tls(tls: ClientTls) {
    *CLIENT_TLS.lock().unwrap_or_else(|p| p.into_inner()) = Some((tls, None));
}

/// The bearer token every call of this process sends (`--token`, `--token-file`, or the
/// one `troupe up` minted).
static TOKEN: Mutex<Option<MetadataValue<Ascii>>> = Mutex::new(None);

/// Makes every later call of this process send `token` as `authorization: Bearer`.
pub fn use_token(token: &str) -> Result<(), CliError> {
    let token = token.trim();
    let value = format!("Bearer {token}").parse().map_err(|_| {
        CliError::Usage(
            "--token (TROUPE_TOKEN): a token is printable ASCII (a JWT from `troupe token issue`)"
                .into(),
        )
    })?;
    *TOKEN.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    Ok(())
}

/// Adds the process's bearer token to each call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel to a node that sends this process's credentials.
pub type Api = InterceptedService<Channel, Bearer>;

fn with_token(channel: Channel) -> Api {
    let token = TOKEN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    InterceptedService::new(channel, Bearer(token))
}

/// The client configuration connections use (built once from the files), or `None` for
/// plaintext.
fn client_config() -> Result<Option<ClientConfig>, CliError> {
    let mut slot = CLIENT_TLS.lock().unwrap_or_else(|p| p.into_inner());
    let Some((tls, config)) = slot.as_mut() else {
        return Ok(None);
    };
    if config.is_none() {
        *config = Some(tls.config().map_err(|e| {
            CliError::Usage(format!(
                "--ca/--cert/--key (TROUPE_CA, TROUPE_CERT, TROUPE_KEY): {e}"
            ))
        })?);
    }
    Ok(config.clone())
}

/// A channel on `endpoint` that connects on first use, over TLS when this process uses it.
pub fn lazy_channel(endpoint: Endpoint) -> Result<Api, CliError> {
    Ok(with_token(troupe_transport::connect_client_lazy(
        endpoint,
        client_config()?,
    )))
}

/// A channel to a node's API address; every call on it times out after `timeout`.
pub async fn channel(addr: &str, timeout: Duration) -> Result<Api, CliError> {
    let tls = client_config()?;
    let hint = if tls.is_some() {
        " (with --ca: does the node serve TLS with a certificate of that CA?)"
    } else {
        ""
    };
    let connect = |reason: String| CliError::Connect {
        addr: addr.to_owned(),
        reason: format!("{reason}{hint}"),
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| connect(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .tcp_nodelay(true);
    troupe_transport::connect_client(endpoint, tls)
        .await
        .map(with_token)
        .map_err(|e| connect(crate::error::chain(&e)))
}

pub async fn admin(addr: &str) -> Result<AdminClient<Api>, CliError> {
    Ok(AdminClient::new(channel(addr, CALL_TIMEOUT).await?))
}

/// An Inference client that accepts replies as large as a node may send.
pub async fn inference(addr: &str, timeout: Duration) -> Result<InferenceClient<Api>, CliError> {
    Ok(InferenceClient::new(channel(addr, timeout).await?).max_decoding_message_size(usize::MAX))
}

/// One Embed of `texts` with `model`'s active version, within `timeout` (sent as the
/// request's deadline too).
pub async fn embed_texts(
    addr: &str,
    model: &str,
    texts: Vec<String>,
    timeout: Duration,
) -> Result<EmbedResponse, CliError> {
    let mut request = tonic::Request::new(EmbedRequest {
        model: model.to_owned(),
        texts,
        ..Default::default()
    });
    request.set_timeout(timeout);
    Ok(inference(addr, timeout)
        .await?
        .embed(request)
        .await?
        .into_inner())
}

pub async fn node_status(addr: &str) -> Result<NodeStatusResponse, CliError> {
    Ok(admin(addr)
        .await?
        .node_status(NodeStatusRequest {})
        .await?
        .into_inner())
}

/// The API address of the current leader, as `addr` knows it.
pub async fn leader_api(addr: &str) -> Result<String, CliError> {
    let status = node_status(addr).await?;
    let leader = status.leader.ok_or_else(|| CliError::Rpc {
        code: tonic::Code::Unavailable,
        message: "the cluster has no leader right now: retry shortly".into(),
    })?;
    if leader == status.id {
        return Ok(addr.to_owned());
    }
    status
        .members
        .iter()
        .find(|m| m.id == leader && !m.api_addr.is_empty())
        .map(|m| m.api_addr.clone())
        .ok_or_else(|| CliError::Rpc {
            code: tonic::Code::FailedPrecondition,
            message: format!("node {leader} leads but its API address is unknown: run the command with --addr of node {leader}"),
        })
}

pub fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
    println!("{text}");
    Ok(())
}

/// Options every metadata write takes.
#[derive(Debug, Clone, clap::Args)]
pub struct WriteOptions {
    /// Apply only if the key is at this revision (0: it must not exist yet). A lost
    /// compare-and-set exits 3.
    #[arg(long)]
    pub expected_revision: Option<u64>,
    /// Idempotency key: a retry with the same key applies once and gets the first result.
    #[arg(long)]
    pub request_id: Option<String>,
    /// API address of any node; followers forward writes to the leader.
    #[arg(long)]
    pub addr: String,
    /// Print `{"revision": R, "changed": bool}` instead of the bare revision.
    #[arg(long)]
    pub json: bool,
}

/// Prints a write's result: the revision, or JSON with `--json`.
pub fn print_write(reply: &troupe_proto::v1::WriteResponse, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(
            &serde_json::json!({"revision": reply.revision, "changed": reply.changed}),
        );
    }
    println!("{}", reply.revision);
    Ok(())
}

/// Options every metadata listing takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// API address of any node.
    #[arg(long)]
    pub addr: String,
    /// Read this node's local state without the leader (may lag).
    #[arg(long)]
    pub stale: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
