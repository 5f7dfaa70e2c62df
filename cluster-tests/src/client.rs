//! A register client over troupe's Admin API: cluster settings are the registers. Reads are
//! linearizable GetSetting calls; writes are SetSetting with a request id; a compare-and-set is
//! SetSetting with the `expected_revision` a read returned.
//!
//! Every answer is sorted into what the checker needs: a definite success, a definite failure
//! (the write did not apply, and the node said so), or an unknown outcome.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::inference_client::InferenceClient;
use troupe_proto::v1::{
    EmbedRequest, GetSettingRequest, NodeStatusRequest, ReadRequest, SetSettingRequest,
};

/// The trailer a node sets on a failed write: `not-applied` (it certainly did not apply) or
/// `unknown` (it may have).
pub const OUTCOME_HEADER: &str = "x-troupe-outcome";

/// How one request ended, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    /// A compare-and-set that lost: the key was not at the expected revision.
    Conflict,
    /// It did not happen: a write refused before it reached a leader's log, or a read that
    /// failed (the code and message say why).
    Failed(String),
    /// It may or may not have happened (a timeout, a dropped connection, a node that cannot
    /// tell).
    Unknown(String),
}

/// A register's value and the revision that wrote it (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Register {
    pub value: Option<u64>,
    pub mod_revision: u64,
}

/// One node's Raft view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub applied_revision: u64,
}

/// A channel to one node's API port, TLS when `tls` is given.
#[derive(Clone)]
pub struct NodeClient {
    pub addr: String,
    admin: AdminClient<Channel>,
    inference: InferenceClient<Channel>,
    timeout: Duration,
}

impl NodeClient {
    /// Connects lazily: a node that is down now may be up by the first call.
    pub fn new(
        addr: &str,
        tls: Option<Arc<troupe_transport::rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = troupe_transport::connect_client_lazy(endpoint, tls);
        Ok(Self {
            addr: addr.to_owned(),
            admin: AdminClient::new(channel.clone()),
            inference: InferenceClient::new(channel),
            timeout,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A linearizable read of `key`.
    pub async fn read(&self, key: &str) -> Answer<Register> {
        let request = self.request(GetSettingRequest {
            key: key.to_owned(),
            read: Some(ReadRequest::default()),
        });
        match self.admin.clone().get_setting(request).await {
            Ok(reply) => match reply.into_inner().setting {
                None => Answer::Ok(Register {
                    value: None,
                    mod_revision: 0,
                }),
                Some(entry) => match entry.value.parse() {
                    Ok(value) => Answer::Ok(Register {
                        value: Some(value),
                        mod_revision: entry.mod_revision,
                    }),
                    Err(_) => Answer::Failed(format!(
                        "{key} holds {:?}, not a number this client wrote",
                        entry.value
                    )),
                },
            },
            // A read changes nothing: whatever went wrong, it did not happen.
            Err(status) => Answer::Failed(describe(&status)),
        }
    }

    /// Writes `value`; with `expected_revision`, only if the key is still at that revision.
    /// Answers the revision the write applied at.
    pub async fn write(
        &self,
        key: &str,
        value: u64,
        expected_revision: Option<u64>,
        request_id: &str,
    ) -> Answer<u64> {
        let request = self.request(SetSettingRequest {
            key: key.to_owned(),
            value: value.to_string(),
            expected_revision,
            request_id: request_id.to_owned(),
        });
        match self.admin.clone().set_setting(request).await {
            Ok(reply) => Answer::Ok(reply.into_inner().revision),
            Err(status) => classify_write_error(&status),
        }
    }

    pub async fn status(&self) -> Result<NodeView, String> {
        let request = self.request(NodeStatusRequest::default());
        let status = self
            .admin
            .clone()
            .node_status(request)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        Ok(NodeView {
            id: status.id,
            role: status.role,
            term: status.term,
            leader: status.leader,
            applied_revision: status.applied_revision,
        })
    }

    /// One Embed of `text` by the active version of `model`; the node that served it.
    pub async fn embed(&self, model: &str, text: &str) -> Result<u64, String> {
        let request = self.request(EmbedRequest {
            model: model.to_owned(),
            texts: vec![text.to_owned()],
            ..EmbedRequest::default()
        });
        let reply = self
            .inference
            .clone()
            .embed(request)
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        match reply.embeddings.as_slice() {
            [one] if !one.values.is_empty() => Ok(reply.served_by),
            _ => Err(format!(
                "an Embed of one text answered {} embeddings",
                reply.embeddings.len()
            )),
        }
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }
}

/// A failed write: definite when the node says it did not apply (or the request was refused
/// as invalid or unauthorised, or lost its compare-and-set), unknown otherwise.
pub fn classify_write_error<T>(status: &tonic::Status) -> Answer<T> {
    let outcome = status.metadata().get(OUTCOME_HEADER).map(|v| v.as_bytes());
    if outcome == Some(b"unknown") {
        return Answer::Unknown(describe(status));
    }
    let definite = outcome == Some(b"not-applied")
        || matches!(
            status.code(),
            Code::Aborted
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::NotFound
                | Code::AlreadyExists
                | Code::OutOfRange
        );
    if status.code() == Code::Aborted {
        Answer::Conflict
    } else if definite {
        Answer::Failed(describe(status))
    } else {
        Answer::Unknown(describe(status))
    }
}

fn describe(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    message.truncate(200);
    format!("{:?}: {message}", status.code())
}
