//! Peer trust, over real sockets: three nodes with mTLS, attacked on the peer port the way an
//! outsider (or a confused member) would, each attack refused, logged, counted in /metrics,
//! and the cluster's state unchanged; certificate rotation under load without a failed
//! request; a removed node that notices; and a node without certificates that will not start.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use troupe_node::RunningNode;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::raft_peer_client::RaftPeerClient;
use troupe_proto::v1::{AppendEntriesRequest, RaftVote, SetSettingRequest, VoteRequest};
use troupe_transport::certs::{self, Authority, Validity};
use troupe_transport::{ClientTls, Identity, Refusal};

const WAIT: Duration = Duration::from_secs(20);

fn admin_tls(certs: &Path) -> ClientTls {
    ClientTls {
        ca: certs.join("ca.crt"),
        identity: Some((
            certs.join("client-admin.crt"),
            certs.join("client-admin.key"),
        )),
    }
}

/// A channel to `addr` over TLS with `tls`, or plaintext without.
async fn channel(addr: std::net::SocketAddr, tls: Option<&ClientTls>) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    let config = tls.map(|tls| tls.config().unwrap());
    troupe_transport::connect_client_lazy(endpoint, config)
}

async fn admin(node: &RunningNode, certs: &Path) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(channel(node.api_addr, Some(&admin_tls(certs))).await)
}

async fn set_setting<T>(
    client: &mut AdminClient<T>,
    key: &str,
    value: &str,
) -> Result<u64, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .set_setting(SetSettingRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().revision)
}

/// Every node's (digest, applied log index, term), once they agree on the index.
async fn cluster_state(nodes: &[RunningNode]) -> Vec<(String, u64, u64)> {
    wait_for("the nodes to apply the same log index", WAIT, || async {
        let mut states = Vec::new();
        for node in nodes {
            let (digest, index) = node.metadata.state_digest().await;
            states.push((digest, index, node.metadata.status().term));
        }
        states.iter().all(|s| s.1 == states[0].1).then_some(states)
    })
    .await
}

/// Writes `cert`/`key` PEM next to each other under `dir` and returns their ClientTls,
/// trusting `ca`.
fn client_files(dir: &Path, name: &str, ca: &Path, cert_pem: &str, key_pem: &str) -> ClientTls {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    ClientTls {
        ca: ca.to_owned(),
        identity: Some((cert, key)),
    }
}

/// A Raft message an attacker sends to the peer port.
enum RaftMessage {
    Vote(VoteRequest),
    Append(AppendEntriesRequest),
}

fn vote(term: u64, candidate: u64) -> RaftMessage {
    RaftMessage::Vote(VoteRequest {
        vote: Some(RaftVote {
            term,
            node_id: candidate,
            committed: false,
        }),
        last_log_id: None,
    })
}

fn append(term: u64, leader: u64) -> RaftMessage {
    RaftMessage::Append(AppendEntriesRequest {
        vote: Some(RaftVote {
            term,
            node_id: leader,
            committed: true,
        }),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    })
}

/// Sends a Vote or an AppendEntries to `node`'s peer port as `tls` would.
async fn raft_call(
    node: &RunningNode,
    tls: Option<&ClientTls>,
    message: RaftMessage,
) -> Result<(), tonic::Status> {
    let mut client = RaftPeerClient::new(channel(node.peer_addr, tls).await);
    match message {
        RaftMessage::Append(request) => client.append_entries(request).await.map(|_| ()),
        RaftMessage::Vote(request) => client.vote(request).await.map(|_| ()),
    }
}

/// An attack on the peer port: its name, the client's TLS, the message, the code expected
/// (`None`: the handshake itself fails) and the refusal counted.
type Attack<'a> = (
    &'a str,
    Option<&'a ClientTls>,
    RaftMessage,
    Option<tonic::Code>,
    Refusal,
);

/// `/metrics` on `node` shows `reason` refused at least `at_least` times.
async fn metrics_count(node: &RunningNode, reason: &str) -> u64 {
    let (_, body) = http_get(node.metrics_addr, "/metrics").await;
    let series = format!("troupe_peer_refusals_total{{node=\"1\",reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_peer_port_admits_only_member_nodes_and_bad_raft_messages_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 3, &[]).unwrap();
    let nodes = tls_cluster(&dir, &certs_dir, 3).await;
    let mut client = admin(&nodes[1], &certs_dir).await;
    set_setting(&mut client, "before", "attacks").await.unwrap();
    let before = cluster_state(&nodes).await;
    let term = before[0].2;
    let target = &nodes[0];
    let ca = certs_dir.join("ca.crt");
    let node2 = ClientTls {
        ca: ca.clone(),
        identity: Some((certs_dir.join("node-2.crt"), certs_dir.join("node-2.key"))),
    };

    // A CA of someone else's, and certificates this CA signed that must still fail.
    let other = dir.path().join("other");
    certs::init(&other, 3, &[]).unwrap();
    let authority = Authority::load(&ca, &certs_dir.join("ca.key")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = authority
        .issue(
            &Identity::Node(2),
            &certs::node_hosts(&[]),
            Validity {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap();
    let stranger = authority
        .issue(
            &Identity::Node(9),
            &certs::node_hosts(&[]),
            Validity::days(1),
        )
        .unwrap();
    let files = dir.path().join("attack");
    std::fs::create_dir_all(&files).unwrap();
    let expired = client_files(&files, "expired", &ca, &expired.cert_pem, &expired.key_pem);
    let stranger = client_files(&files, "node-9", &ca, &stranger.cert_pem, &stranger.key_pem);
    let foreign = ClientTls {
        ca: ca.clone(),
        identity: Some((other.join("node-2.crt"), other.join("node-2.key"))),
    };
    let admin = admin_tls(&certs_dir);
    let anonymous = ClientTls {
        ca: ca.clone(),
        identity: None,
    };

    // (case, client TLS, message, expected code, or None when the handshake itself fails, and
    // the refusal counted)
    let cases: Vec<Attack> = vec![
        (
            "plaintext",
            None,
            vote(term + 1, 2),
            Some(tonic::Code::Unauthenticated),
            Refusal::Plaintext,
        ),
        (
            "TLS without a client certificate",
            Some(&anonymous),
            vote(term + 1, 2),
            Some(tonic::Code::Unauthenticated),
            Refusal::NoCertificate,
        ),
        (
            "a node certificate from another CA",
            Some(&foreign),
            vote(term + 1, 2),
            None,
            Refusal::BadCertificate,
        ),
        (
            "the admin client certificate",
            Some(&admin),
            vote(term + 1, 2),
            Some(tonic::Code::PermissionDenied),
            Refusal::ClientCertificate,
        ),
        (
            "an expired node certificate",
            Some(&expired),
            vote(term + 1, 2),
            None,
            Refusal::BadCertificate,
        ),
        (
            "node 2's certificate claiming node 3 in a Vote",
            Some(&node2),
            vote(term + 1, 3),
            Some(tonic::Code::PermissionDenied),
            Refusal::WrongSender,
        ),
        (
            "node 2's certificate claiming node 3 in an AppendEntries",
            Some(&node2),
            append(term + 1, 3),
            Some(tonic::Code::PermissionDenied),
            Refusal::WrongSender,
        ),
        (
            "a forged AppendEntries from a non-member certificate",
            Some(&stranger),
            append(term, 9),
            Some(tonic::Code::PermissionDenied),
            Refusal::NotMember,
        ),
        (
            "a Vote at term u64::MAX from a member certificate",
            Some(&node2),
            vote(u64::MAX, 2),
            Some(tonic::Code::InvalidArgument),
            Refusal::BadMessage,
        ),
        (
            "an AppendEntries at term u64::MAX from a member certificate",
            Some(&node2),
            append(u64::MAX, 2),
            Some(tonic::Code::InvalidArgument),
            Refusal::BadMessage,
        ),
        (
            "an AppendEntries without a vote from a member certificate",
            Some(&node2),
            RaftMessage::Append(AppendEntriesRequest::default()),
            Some(tonic::Code::InvalidArgument),
            Refusal::BadMessage,
        ),
    ];
    for (case, tls, message, code, refusal) in cases {
        let counted = target.transport.refusals().count(refusal);
        let answer = raft_call(target, tls, message).await;
        let status = answer.expect_err(case);
        match code {
            Some(code) => {
                assert_eq!(status.code(), code, "{case}: {status:?}");
                assert_eq!(Refusal::of(&status), Some(refusal), "{case}: {status:?}");
            }
            // The handshake failed: the client sees a transport error, never an answer. With
            // TLS 1.3 the client may finish its side before the server checks its certificate,
            // so the connection can also close under the first call (CANCELLED).
            None => assert!(
                std::error::Error::source(&status).is_some()
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Internal
                            | tonic::Code::Cancelled
                    ),
                "{case}: {status:?}"
            ),
        }
        wait_for(
            &format!("{case}: the refusal to be counted"),
            WAIT,
            || async { (target.transport.refusals().count(refusal) > counted).then_some(()) },
        )
        .await;
        assert!(
            metrics_count(target, refusal.label()).await > counted,
            "{case}: /metrics"
        );
        assert_eq!(
            cluster_state(&nodes).await,
            before,
            "{case}: the cluster's state changed"
        );
    }
    // The cluster is whole: same leader, and writes apply everywhere.
    set_setting(&mut client, "after", "attacks").await.unwrap();
    let after = cluster_state(&nodes).await;
    assert!(
        after.iter().all(|s| s.2 == term && s.0 == after[0].0),
        "{after:?}"
    );
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// Replaces `path` atomically (the reloader never sees half a file).
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_reloads(nodes: &[RunningNode], at_least: u64) {
    for node in nodes {
        let tls = node.transport.tls_state().unwrap().clone();
        wait_for("every node to reload its certificates", WAIT, || async {
            (tls.reloads() >= at_least).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotating_every_certificate_to_a_new_ca_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 3, &[]).unwrap();
    // The clients trust a bundle of both CAs for the whole run, as an operator's would.
    let new_dir = dir.path().join("new");
    certs::init(&new_dir, 3, &[]).unwrap();
    let old_ca = std::fs::read_to_string(certs_dir.join("ca.crt")).unwrap();
    let new_ca = std::fs::read_to_string(new_dir.join("ca.crt")).unwrap();
    let bundle = format!("{old_ca}{new_ca}");
    let client_ca = dir.path().join("client-ca.crt");
    std::fs::write(&client_ca, &bundle).unwrap();
    let nodes = tls_cluster(&dir, &certs_dir, 3).await;
    let client_tls = ClientTls {
        ca: client_ca.clone(),
        identity: None,
    };

    // Load: writes through each node (followers forward them over the peer port), until
    // told to stop. A token, not a client certificate: it outlives the CA it was minted under.
    let token = mint(&certs_dir, troupe_transport::Role::Operator);
    let mut writers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let client = AdminClient::new(authed(
            channel(node.api_addr, Some(&client_tls)).await,
            &token,
        ));
        writers.push(move |n: u64| {
            let mut client = client.clone();
            async move {
                set_setting(&mut client, &format!("load-{i}"), &n.to_string())
                    .await
                    .map(|_| ())
            }
        });
    }
    let load = WriteLoad::start(writers);
    load.progress(30).await;
    // 1. Every node trusts both CAs.
    replace(&certs_dir.join("ca.crt"), &bundle);
    wait_reloads(&nodes, 1).await;
    load.progress(30).await;
    // 2. Every node gets a certificate of the new CA (key first, then the certificate).
    for id in 1..=3 {
        let key = std::fs::read_to_string(new_dir.join(format!("node-{id}.key"))).unwrap();
        let cert = std::fs::read_to_string(new_dir.join(format!("node-{id}.crt"))).unwrap();
        replace(&certs_dir.join(format!("node-{id}.key")), &key);
        replace(&certs_dir.join(format!("node-{id}.crt")), &cert);
    }
    wait_reloads(&nodes, 2).await;
    load.progress(30).await;
    // 3. The old CA is dropped.
    replace(&certs_dir.join("ca.crt"), &new_ca);
    wait_reloads(&nodes, 3).await;
    load.progress(30).await;
    // New connections prove the new material is in force: a client trusting only the new CA
    // reaches every node, and a node certificate of the old CA is refused on the peer port.
    let new_only = ClientTls {
        ca: new_dir.join("ca.crt"),
        identity: None,
    };
    // The old CA's key is still in the directory: a node certificate it issues now is one
    // a node not yet rotated would hold.
    let old_ca_file = dir.path().join("old-ca.crt");
    std::fs::write(&old_ca_file, &old_ca).unwrap();
    let stale = Authority::load(&old_ca_file, &certs_dir.join("ca.key"))
        .unwrap()
        .issue(
            &Identity::Node(2),
            &certs::node_hosts(&[]),
            Validity::days(1),
        )
        .unwrap();
    let stale = client_files(
        dir.path(),
        "stale-node-2",
        &new_dir.join("ca.crt"),
        &stale.cert_pem,
        &stale.key_pem,
    );
    let counted = nodes[0].transport.refusals().count(Refusal::BadCertificate);
    let term = nodes[0].metadata.status().term;
    raft_call(&nodes[0], Some(&stale), vote(term + 1, 2))
        .await
        .unwrap_err();
    wait_for("the old CA's certificate to be refused", WAIT, || async {
        (nodes[0].transport.refusals().count(Refusal::BadCertificate) > counted).then_some(())
    })
    .await;
    for node in &nodes {
        let mut fresh = AdminClient::new(authed(
            channel(node.api_addr, Some(&new_only)).await,
            &token,
        ));
        fresh
            .node_status(troupe_proto::v1::NodeStatusRequest {})
            .await
            .unwrap();
    }
    let (done, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during the rotation");
    assert!(done >= 120);
    let states = cluster_state(&nodes).await;
    assert!(states.iter().all(|s| s.0 == states[0].0));
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_node_is_refused_and_notices_it_was_removed() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 3, &[]).unwrap();
    let nodes = tls_cluster(&dir, &certs_dir, 3).await;
    let leader_id = nodes[0].metadata.status().leader.unwrap();
    // Remove a follower (never the leader, so the remaining two keep their leader).
    let removed_id = if leader_id == 3 { 2 } else { 3 };
    let leader = &nodes[leader_id as usize - 1];
    let removed = &nodes[removed_id as usize - 1];
    leader.metadata.remove(removed_id).await.unwrap();

    wait_for("the removed node to notice", WAIT, || async {
        removed.metadata.status().removed
    })
    .await;
    wait_for("the removed node to stop serving", WAIT, || async {
        (!removed.tree.health.borrow().serving).then_some(())
    })
    .await;
    let health = removed.tree.health.borrow().clone();
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.contains("removed from the cluster")),
        "{health:?}"
    );
    // Its certificate no longer opens the members' peer ports.
    let its_cert = ClientTls {
        ca: certs_dir.join("ca.crt"),
        identity: Some((
            certs_dir.join(format!("node-{removed_id}.crt")),
            certs_dir.join(format!("node-{removed_id}.key")),
        )),
    };
    let term = leader.metadata.status().term;
    let status = raft_call(leader, Some(&its_cert), vote(term + 1, removed_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(Refusal::of(&status), Some(Refusal::NotMember));
    // It does not campaign: over many election timeouts its term stays put, and so does the
    // members' (a campaign it won nothing with would still raise its own term).
    // Nor does it heartbeat the members any more: they would only refuse it again.
    wait_for("the removed node to stop heartbeating", WAIT, || async {
        removed.tree.peers.snapshot().is_empty().then_some(())
    })
    .await;
    // A heartbeat or pre-vote sent just before the node noticed can still be on its way: the
    // count to hold still is the one no call already sent can change, i.e. unchanged for
    // longer than such a call may take (a heartbeat's or a pre-vote's timeout, well under
    // 500 ms here).
    let settled = Duration::from_millis(500);
    let refused = wait_for(
        "calls sent before the removal was noticed to land",
        WAIT,
        || async {
            let before = leader.transport.refusals().count(Refusal::NotMember);
            tokio::time::sleep(settled).await;
            (leader.transport.refusals().count(Refusal::NotMember) == before).then_some(before)
        },
    )
    .await;
    let removed_term = removed.metadata.status().term;
    let mut client = admin(leader, &certs_dir).await;
    // Writes go on for 2 s (many election timeouts); after each, look for any sign of a
    // campaign or a call from the removed node. None may come before the window ends.
    let campaigned = tokio::time::timeout(Duration::from_secs(2), async {
        for i in 0u64.. {
            set_setting(&mut client, "after-removal", &i.to_string())
                .await
                .unwrap();
            let seen = (
                removed.metadata.status().term,
                leader.metadata.status().term,
                leader.transport.refusals().count(Refusal::NotMember),
            );
            if seen != (removed_term, term, refused) {
                return seen;
            }
        }
        unreachable!()
    })
    .await;
    assert!(
        campaigned.is_err(),
        "the removed node campaigned or kept calling: (its term, the leader's term, refusals) = {campaigned:?}, was {:?}",
        (removed_term, term, refused)
    );
    assert_eq!(leader.metadata.status().voters.len(), 2);

    // A new node with a certificate from `certs add-node` joins as a learner: before it is a
    // member it lets the leader in (it has no membership yet), and the members let it in as
    // soon as the leader has appended it.
    certs::add_node(&certs_dir, 4, &[]).unwrap();
    let joiner = start_node_with(4, &dir, |config| {
        config.insecure = false;
        config.tls.dir = Some(certs_dir.clone());
    })
    .await;
    leader
        .metadata
        .add_learner(
            4,
            troupe_consensus::types::NodeAddr {
                api_addr: joiner.api_addr.to_string(),
                peer_addr: joiner.peer_addr.to_string(),
            },
        )
        .await
        .unwrap();
    let (_, index) = leader.metadata.state_digest().await;
    joiner
        .metadata
        .wait_applied_index(index, WAIT)
        .await
        .unwrap();
    assert_eq!(
        joiner.metadata.state_digest().await,
        leader.metadata.state_digest().await
    );
    assert_eq!(joiner.metadata.status().removed, None);
    joiner.shutdown().await.unwrap();
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_node_without_certificates_or_insecure_exits_2_naming_both_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node1").to_string_lossy().into_owned();
    let output = troupe(args(&[
        "node",
        "--id",
        "1",
        "--api",
        "127.0.0.1:0",
        "--peer",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--data-dir",
        &data,
    ]))
    .await;
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("troupe certs init") && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert!(
        !Path::new(&data).join("raft").exists(),
        "it must not start at all"
    );
}

#[tokio::test]
async fn certs_init_writes_private_keys_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let out_arg = out.to_string_lossy().into_owned();
    // A client's TLS settings do not matter to a command that connects to nothing, even
    // when their files are missing.
    let made = tokio::task::spawn_blocking({
        let out_arg = out_arg.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_troupe"))
                .args([
                    "certs", "init", "--out", &out_arg, "--nodes", "2", "--host", "node1",
                ])
                .env("TROUPE_CA", "/nonexistent/ca.crt")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(made.status.success(), "{:?}", text(&made));
    for name in ["ca", "node-1", "node-2", "client-admin"] {
        let key: PathBuf = out.join(format!("{name}.key"));
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600,
            "{name}"
        );
        assert!(out.join(format!("{name}.crt")).is_file());
    }
    let node1 = std::fs::read(out.join("node-1.crt")).unwrap();
    let again = troupe(args(&["certs", "init", "--out", &out_arg, "--nodes", "2"])).await;
    assert_eq!(again.status.code(), Some(2));
    assert!(
        text(&again).1.contains("never overwrites"),
        "{:?}",
        text(&again)
    );
    assert_eq!(std::fs::read(out.join("node-1.crt")).unwrap(), node1);
    let added = troupe(args(&["certs", "add-node", "--dir", &out_arg, "--id", "3"])).await;
    assert!(added.status.success(), "{:?}", text(&added));
    let again = troupe(args(&["certs", "add-node", "--dir", &out_arg, "--id", "3"])).await;
    assert_eq!(again.status.code(), Some(2));
    // Each certificate names its holder, and the material loads as a node's.
    for id in 1..=3 {
        let state =
            troupe_transport::TlsState::load(troupe_transport::TlsFiles::for_node(&out, id))
                .unwrap();
        assert_eq!(state.current().identity, Identity::Node(id));
    }
    let admin = certs::Authority::load(&out.join("ca.crt"), &out.join("ca.key"));
    assert!(admin.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    let new_dir = dir.path().join("new");
    certs::init(&certs_dir, 1, &[]).unwrap();
    certs::init(&new_dir, 1, &[]).unwrap();
    let (api, peer, metrics) = (free_port(), free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["node", "--id", "1"])
        .args(["--api", &format!("127.0.0.1:{api}")])
        .args(["--peer", &format!("127.0.0.1:{peer}")])
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .arg("--data-dir")
        .arg(dir.path().join("node1"))
        .arg("--tls-dir")
        .arg(&certs_dir)
        // An hour between checks: only the signal can make it reload during this test.
        .env("TROUPE_TLS_RELOAD_INTERVAL_MS", "3600000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id() as libc::pid_t;
    let child = Kill(&mut child);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let reloads = || async move {
        let series = "troupe_tls_reloads_total{node=\"1\",result=\"ok\"} ";
        let Ok(stream) = tokio::net::TcpStream::connect(metrics).await else {
            return None;
        };
        drop(stream);
        let (_, body) = http_get(metrics, "/metrics").await;
        body.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(wait_for("the node's metrics", WAIT, reloads).await, 0);

    // Rotate to the new CA in one step (this node is alone), then SIGHUP.
    let bundle = std::fs::read_to_string(certs_dir.join("ca.crt")).unwrap()
        + &std::fs::read_to_string(new_dir.join("ca.crt")).unwrap();
    replace(&certs_dir.join("ca.crt"), &bundle);
    for file in ["node-1.key", "node-1.crt"] {
        replace(
            &certs_dir.join(file),
            &std::fs::read_to_string(new_dir.join(file)).unwrap(),
        );
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for("the reload after SIGHUP", WAIT, || async {
        (reloads().await? == 1).then_some(())
    })
    .await;
    // A client that trusts only the new CA now reaches the API.
    let new_only = ClientTls {
        ca: new_dir.join("ca.crt"),
        identity: None,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{api}"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    let channel = troupe_transport::connect_client(endpoint, Some(new_only.config().unwrap()))
        .await
        .unwrap();
    AdminClient::new(authed(
        channel,
        &mint(&certs_dir, troupe_transport::Role::Read),
    ))
    .node_status(troupe_proto::v1::NodeStatusRequest {})
    .await
    .unwrap();
    // SIGTERM stops it cleanly.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
