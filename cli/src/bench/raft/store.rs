//! The two stores `troupe bench raft` drives, behind one interface, so that the identical
//! workload runs against troupe (its Admin API: a put is a cluster-setting write) and against
//! etcd (its v3 KV API). One HTTP/2 channel per endpoint, shared by every client task, as in
//! shared/peers/etcd_bench.py.

use std::time::Duration;

use super::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use super::etcd::kv_client::KvClient;
use super::etcd::maintenance_client::MaintenanceClient;
use super::etcd::request_op::Request as EtcdOp;
use super::etcd::response_op::Response as EtcdReply;
use super::etcd::{Compare, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::{GetSettingRequest, NodeStatusRequest, ReadRequest, SetSettingRequest};

use crate::error::CliError;

/// Which store is behind the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Troupe,
    Etcd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Troupe => "troupe",
            Kind::Etcd => "etcd",
        }
    }
}

#[derive(Clone)]
enum Conn {
    Troupe(AdminClient<crate::remote::Api>),
    Etcd {
        kv: KvClient<Channel>,
        maintenance: MaintenanceClient<Channel>,
    },
}

/// One member's view of the cluster.
#[derive(Debug, Clone, Copy)]
pub struct MemberStatus {
    pub id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// The last log index this member holds.
    pub last_index: u64,
    pub applied_index: u64,
}

/// What a lost compare-and-set saw: the key's current revision and value.
#[derive(Debug, Clone)]
pub struct Current {
    pub mod_revision: u64,
    pub value: String,
}

#[derive(Clone)]
pub struct Store {
    pub kind: Kind,
    pub endpoints: Vec<String>,
    conns: Vec<Conn>,
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

impl Store {
    /// Channels connect lazily, so a member that is down now does not fail the bench.
    pub fn connect(kind: Kind, endpoints: &[String]) -> Result<Self, CliError> {
        let mut conns = Vec::with_capacity(endpoints.len());
        for addr in endpoints {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| CliError::Usage(format!("bad endpoint '{addr}': {e}")))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true);
            // troupe over TLS with --ca; etcd is always plaintext here.
            conns.push(match kind {
                Kind::Troupe => {
                    Conn::Troupe(AdminClient::new(crate::remote::lazy_channel(endpoint)?))
                }
                Kind::Etcd => {
                    let channel = endpoint.connect_lazy();
                    Conn::Etcd {
                        kv: KvClient::new(channel.clone()),
                        maintenance: MaintenanceClient::new(channel),
                    }
                }
            });
        }
        Ok(Self {
            kind,
            endpoints: endpoints.to_vec(),
            conns,
        })
    }

    /// Setting keys may not hold '/', so troupe's keys use '.' where etcd's use '/'.
    pub fn key(&self, parts: std::fmt::Arguments<'_>) -> String {
        let key = format!("bench/{parts}");
        match self.kind {
            Kind::Troupe => key.replace('/', "."),
            Kind::Etcd => key,
        }
    }

    pub async fn put(
        &self,
        member: usize,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), Status> {
        match self.conns[member].clone() {
            Conn::Troupe(mut admin) => {
                let request = SetSettingRequest {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    expected_revision: None,
                    request_id: String::new(),
                };
                admin.set_setting(with_timeout(request, timeout)).await?;
            }
            Conn::Etcd { mut kv, .. } => {
                let request = PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                };
                kv.put(with_timeout(request, timeout)).await?;
            }
        }
        Ok(())
    }

    /// A linearizable read of one key. A missing key is `NOT_FOUND`.
    pub async fn get(
        &self,
        member: usize,
        key: &str,
        timeout: Duration,
    ) -> Result<Current, Status> {
        let missing = || Status::not_found(format!("key '{key}' is not set"));
        match self.conns[member].clone() {
            Conn::Troupe(mut admin) => {
                let request = GetSettingRequest {
                    key: key.to_owned(),
                    read: Some(ReadRequest {
                        stale: false,
                        min_revision: 0,
                    }),
                };
                let reply = admin.get_setting(with_timeout(request, timeout)).await?;
                let setting = reply.into_inner().setting.ok_or_else(missing)?;
                Ok(Current {
                    mod_revision: setting.mod_revision,
                    value: setting.value,
                })
            }
            Conn::Etcd { mut kv, .. } => {
                let request = RangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                };
                let reply = kv.range(with_timeout(request, timeout)).await?.into_inner();
                let kv = reply.kvs.into_iter().next().ok_or_else(missing)?;
                etcd_current(kv)
            }
        }
    }

    /// Writes `value` only if `key` is still at `expected`. `Ok(None)` when it won; the key's
    /// current revision and value when it lost.
    pub async fn cas(
        &self,
        member: usize,
        key: &str,
        expected: u64,
        value: &str,
        timeout: Duration,
    ) -> Result<Option<Current>, Status> {
        match self.conns[member].clone() {
            Conn::Troupe(mut admin) => {
                let request = SetSettingRequest {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    expected_revision: Some(expected),
                    request_id: String::new(),
                };
                match admin.set_setting(with_timeout(request, timeout)).await {
                    Ok(_) => Ok(None),
                    Err(status) if status.code() == Code::Aborted => {
                        // The lost write names the key's revision and, when short enough for
                        // a trailer, its value, as etcd's Txn answer does: no read back.
                        let current = status
                            .metadata()
                            .get("x-troupe-current-revision")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .ok_or_else(|| {
                                Status::internal(format!(
                                    "ABORTED without x-troupe-current-revision: {}",
                                    status.message()
                                ))
                            })?;
                        let value = status
                            .metadata()
                            .get_bin("x-troupe-current-value-bin")
                            .and_then(|v| v.to_bytes().ok())
                            .and_then(|v| String::from_utf8(v.to_vec()).ok());
                        match value {
                            Some(value) => Ok(Some(Current {
                                mod_revision: current,
                                value,
                            })),
                            None => self.get(member, key, timeout).await.map(Some),
                        }
                    }
                    Err(status) => Err(status),
                }
            }
            Conn::Etcd { mut kv, .. } => {
                let key_bytes = key.as_bytes().to_vec();
                let request = TxnRequest {
                    compare: vec![Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Mod as i32,
                        key: key_bytes.clone(),
                        target_union: Some(TargetUnion::ModRevision(expected as i64)),
                    }],
                    success: vec![RequestOp {
                        request: Some(EtcdOp::RequestPut(PutRequest {
                            key: key_bytes.clone(),
                            value: value.as_bytes().to_vec(),
                        })),
                    }],
                    failure: vec![RequestOp {
                        request: Some(EtcdOp::RequestRange(RangeRequest {
                            key: key_bytes,
                            ..Default::default()
                        })),
                    }],
                };
                let reply = kv.txn(with_timeout(request, timeout)).await?.into_inner();
                if reply.succeeded {
                    return Ok(None);
                }
                let kv = reply
                    .responses
                    .into_iter()
                    .find_map(|op| match op.response {
                        Some(EtcdReply::ResponseRange(range)) => range.kvs.into_iter().next(),
                        _ => None,
                    })
                    .ok_or_else(|| Status::internal("etcd Txn failed without the key's value"))?;
                etcd_current(kv).map(Some)
            }
        }
    }

    pub async fn status(&self, member: usize, timeout: Duration) -> Option<MemberStatus> {
        match self.conns[member].clone() {
            Conn::Troupe(mut admin) => {
                let status = admin
                    .node_status(with_timeout(NodeStatusRequest {}, timeout))
                    .await
                    .ok()?
                    .into_inner();
                Some(MemberStatus {
                    id: status.id,
                    leader: status.leader,
                    term: status.term,
                    last_index: status.last_log_index,
                    applied_index: status.applied_index,
                })
            }
            Conn::Etcd {
                mut maintenance, ..
            } => {
                let status = maintenance
                    .status(with_timeout(StatusRequest {}, timeout))
                    .await
                    .ok()?
                    .into_inner();
                let header = status.header?;
                Some(MemberStatus {
                    id: header.member_id,
                    leader: (status.leader != 0).then_some(status.leader),
                    term: status.raft_term,
                    last_index: status.raft_index,
                    applied_index: status.raft_applied_index,
                })
            }
        }
    }

    /// Every member's status, asked concurrently; `None` for a member that did not answer.
    pub async fn statuses(
        &self,
        members: &[usize],
        timeout: Duration,
    ) -> Vec<Option<MemberStatus>> {
        let handles: Vec<_> = members
            .iter()
            .map(|&member| {
                let store = self.clone();
                tokio::spawn(async move { store.status(member, timeout).await })
            })
            .collect();
        let mut statuses = Vec::with_capacity(handles.len());
        for handle in handles {
            statuses.push(handle.await.ok().flatten());
        }
        statuses
    }

    /// The index (in `endpoints`) of the member that leads, asking only `among`.
    pub async fn leader_index(&self, among: &[usize], timeout: Duration) -> Option<usize> {
        let statuses = self.statuses(among, timeout).await;
        statuses
            .into_iter()
            .zip(among)
            .find_map(|(status, &member)| {
                let status = status?;
                (status.leader == Some(status.id)).then_some(member)
            })
    }
}

fn etcd_current(kv: super::etcd::KeyValue) -> Result<Current, Status> {
    let value = String::from_utf8(kv.value)
        .map_err(|e| Status::internal(format!("etcd value is not UTF-8: {e}")))?;
    let mod_revision = u64::try_from(kv.mod_revision)
        .map_err(|_| Status::internal(format!("etcd mod_revision {} < 0", kv.mod_revision)))?;
    Ok(Current {
        mod_revision,
        value,
    })
}
