//! A node whose disk fills up: writes fail with a clear error, health turns NOT_SERVING with
//! the reason and /readyz answers 503, and once space is freed a restart recovers with every
//! acknowledged write. The data dir is a small tmpfs this test mounts (it needs root; without
//! it the test says SKIPPED).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::{GetSettingRequest, ReadRequest, SetSettingRequest};

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs of `size` at `path`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(path.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_serving_honestly_and_a_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let Some(tmpfs) = Tmpfs::mount(&data, "12m") else {
        panic!(
            "cannot mount a tmpfs at {} although running as root",
            data.display()
        );
    };
    let nodes = start_cluster(&dir, 1).await;
    let node = &nodes[0];
    let mut client = AdminClient::connect(format!("http://{}", node.api_addr))
        .await
        .unwrap();
    // Fill the disk with acknowledged writes until one fails.
    let value = "v".repeat(60 * 1024);
    let mut acknowledged = Vec::new();
    let mut failure = None;
    for i in 0..2000 {
        let key = format!("fill-{i}");
        match client
            .set_setting(SetSettingRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(reply) => acknowledged.push((key, reply.into_inner().revision)),
            Err(status) => {
                failure = Some(status);
                break;
            }
        }
    }
    let failure = failure.expect("the disk never filled up");
    eprintln!(
        "after {} acknowledged writes: {failure:?}",
        acknowledged.len()
    );
    assert!(!acknowledged.is_empty());
    assert!(
        matches!(
            failure.code(),
            tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::ResourceExhausted
        ),
        "{failure:?}"
    );
    // Health tells the truth: NOT_SERVING, and /readyz says why.
    wait_for("/readyz to answer 503", WAIT, || async {
        let (code, body) = http_get(node.metrics_addr, "/readyz").await;
        (code == 503).then_some(body)
    })
    .await;
    let (_, body) = http_get(node.metrics_addr, "/readyz").await;
    eprintln!("/readyz: {body}");
    assert!(
        body.contains("Raft") || body.contains("disk") || body.contains("storage"),
        "{body}"
    );
    assert_eq!(
        health_status(node, "").await,
        2,
        "grpc.health says NOT_SERVING"
    );

    // Free space, restart on the same data dir: every acknowledged write is there.
    tmpfs.resize("64m");
    let nodes = {
        let mut nodes = nodes;
        let node = nodes.pop().unwrap();
        let _ = node.shutdown().await;
        vec![start_node(1, &dir).await]
    };
    let node = &nodes[0];
    node.metadata.wait_for_leader(WAIT).await.unwrap();
    let mut client = AdminClient::connect(format!("http://{}", node.api_addr))
        .await
        .unwrap();
    for (key, revision) in &acknowledged {
        let setting = client
            .get_setting(GetSettingRequest {
                key: key.clone(),
                read: Some(ReadRequest::default()),
            })
            .await
            .unwrap()
            .into_inner()
            .setting
            .unwrap_or_else(|| panic!("acknowledged write {key} is lost"));
        assert_eq!(setting.mod_revision, *revision, "{key}");
        assert_eq!(setting.value.len(), value.len());
    }
    // And it takes writes again.
    client
        .set_setting(SetSettingRequest {
            key: "after".into(),
            value: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("/readyz to answer 200", WAIT, || async {
        let (code, _) = http_get(node.metrics_addr, "/readyz").await;
        (code == 200).then_some(())
    })
    .await;
    for node in nodes {
        node.shutdown().await.unwrap();
    }
    drop(tmpfs);
}
