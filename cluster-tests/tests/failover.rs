//! A write sent to a follower while the leader is paused (SIGSTOP) or killed succeeds: the
//! follower gives the silent leader up as soon as it knows another one, instead of failing
//! after its forward timeout. The write applies once. Three real `troupe node` processes with
//! mTLS (the binary next to this test's, built by `cargo build -p troupe`), each in a network
//! namespace of its own when run as root.

use std::path::PathBuf;
use std::time::Duration;

use troupe_cluster_tests::client::Answer;
use troupe_cluster_tests::cluster::Cluster;
use troupe_cluster_tests::local::LocalCluster;

/// `target/<profile>/troupe`, beside `target/<profile>/deps/<this test>`.
fn troupe_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TROUPE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("troupe"))
        .expect("a target directory");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p troupe` (or set TROUPE_BIN)",
        bin.display()
    );
    bin
}

/// Writes through a follower while `fault` holds the leader down; `heal` undoes it.
async fn write_through_a_follower_while_the_leader_is_down(
    fault: fn(&mut LocalCluster, usize) -> Result<(), String>,
    heal: fn(&mut LocalCluster, usize) -> Result<(), String>,
) {
    let dir = tempfile::tempdir().unwrap();
    // The forward timeout stays at its default (5 s); the fault lasts longer than that. As
    // root, each node has a network namespace and fixed ports of its own; on 127.0.0.1 the
    // ports are picked free and may, rarely, be taken before the node binds them.
    let namespaces = troupe_cluster_tests::local::can_partition();
    let mut cluster = LocalCluster::start(&troupe_bin(), dir.path(), 3, namespaces, "")
        .await
        .unwrap();
    let leader = cluster.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    // Requests wait up to 20 s: far past the forward timeout, so only a failover answers OK.
    let client = cluster.client(follower, Duration::from_secs(20)).unwrap();
    let before = client.write("failover-probe", 1, None, "warm-up").await;
    assert!(
        matches!(before, Answer::Ok(_)),
        "a write before the fault: {before:?}"
    );

    fault(&mut cluster, leader).unwrap();
    let answer = client.write("failover-probe", 2, None, "").await;
    let revision = match answer {
        Answer::Ok(revision) => revision,
        other => panic!("the write during the fault: {other:?}"),
    };
    heal(&mut cluster, leader).unwrap();
    let converged = cluster
        .wait_converged(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(converged >= revision);

    // Every node has the value, written once, at the acknowledged revision.
    for node in 0..3 {
        let reader = cluster.client(node, Duration::from_secs(10)).unwrap();
        match reader.read("failover-probe").await {
            Answer::Ok(register) => {
                assert_eq!(register.value, Some(2), "node {}", node + 1);
                assert_eq!(register.mod_revision, revision, "node {}", node + 1);
            }
            other => panic!("read on node {}: {other:?}", node + 1),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_fails_over_from_a_paused_leader() {
    // The paused leader holds the forwarded write and never answers: before failover, the
    // follower answered UNAVAILABLE after its 5 s forward timeout.
    write_through_a_follower_while_the_leader_is_down(LocalCluster::pause, LocalCluster::resume)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_fails_over_from_a_killed_leader() {
    write_through_a_follower_while_the_leader_is_down(LocalCluster::kill, LocalCluster::restart)
        .await;
}
