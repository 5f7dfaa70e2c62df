//! `troupe models push` over real gRPC: the node stores verified bytes content-addressed,
//! records the version, serves it from its own copy; the same bytes again change nothing;
//! other bytes under the same version, corrupt bytes and cut-off uploads are refused and
//! leave nothing behind.

mod common;

use common::*;
use tonic::Code;
use troupe_models::artifact::Manifest;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::push_model_chunk::Part;
use troupe_proto::v1::{FileChunk, PushModelChunk, PushModelHeader};

async fn started(dir: &tempfile::TempDir) -> troupe_node::RunningNode {
    start_cluster(dir, 1).await.remove(0)
}

/// A push with these chunks after a header for `model_dir`'s real manifest.
async fn raw_push(
    node: &troupe_node::RunningNode,
    model_dir: &std::path::Path,
    version: &str,
    chunks: Vec<FileChunk>,
) -> Result<troupe_proto::v1::PushModelResponse, tonic::Status> {
    let manifest = Manifest::of_dir(model_dir).unwrap();
    let header = PushModelHeader {
        name: "tiny".into(),
        version: version.into(),
        files: troupe_node::server::push::manifest_entries(&manifest),
        format: String::new(),
        request_id: String::new(),
        precision: String::new(),
    };
    let messages = std::iter::once(PushModelChunk {
        part: Some(Part::Header(header)),
    })
    .chain(chunks.into_iter().map(|chunk| PushModelChunk {
        part: Some(Part::Chunk(chunk)),
    }));
    let mut client = AdminClient::connect(format!("http://{}", node.api_addr))
        .await
        .unwrap();
    client
        .push_model(tokio_stream::iter(messages.collect::<Vec<_>>()))
        .await
        .map(|r| r.into_inner())
}

/// Every file of `dir` as chunks, `corrupt` flipping one byte of the named file.
fn chunks_of(dir: &std::path::Path, corrupt: Option<&str>) -> Vec<FileChunk> {
    let manifest = Manifest::of_dir(dir).unwrap();
    let mut chunks = Vec::new();
    for (index, file) in manifest.files.iter().enumerate() {
        let mut data = std::fs::read(dir.join(&file.path)).unwrap();
        if corrupt == Some(file.path.as_str()) {
            data[0] ^= 0xff;
        }
        for (n, piece) in data.chunks(4096).enumerate() {
            chunks.push(FileChunk {
                file: index as u32,
                offset: (n * 4096) as u64,
                data: piece.to_vec(),
            });
        }
    }
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_version_is_stored_verified_recorded_and_served_from_the_nodes_own_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = started(&dir).await;
    let addr = node.api_addr.to_string();
    let model_arg = model.to_string_lossy().into_owned();
    let push = |version: &'static str, dir: String| {
        let addr = addr.clone();
        async move {
            troupe(args(&[
                "models",
                "push",
                &dir,
                "--name",
                "tiny",
                "--version",
                version,
                "--addr",
                &addr,
                "--quiet",
                "--json",
            ]))
            .await
        }
    };

    let first = push("1", model_arg.clone()).await;
    assert!(first.status.success(), "{:?}", text(&first));
    let first: serde_json::Value = serde_json::from_str(&text(&first).0).unwrap();
    let digest = Manifest::of_dir(&model).unwrap().digest();
    assert_eq!(first["digest"], digest.as_str());
    assert_eq!(first["changed"], true);
    assert!(dir.path().join("node1/models").join(&digest).is_dir());

    // The source directory goes away: the node serves from its own verified copy.
    let moved = dir.path().join("moved");
    std::fs::rename(&model, &moved).unwrap();
    let activated = troupe(args(&[
        "models",
        "activate",
        "tiny",
        "1",
        "--addr",
        &addr,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    wait_serving(&node).await;
    let reply = inference_client(&node)
        .await
        .embed(embed_request("tiny", &["pushed"], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.model_version, "1");

    // The same bytes again: a no-op.
    let moved_arg = moved.to_string_lossy().into_owned();
    let again = push("1", moved_arg.clone()).await;
    assert!(again.status.success(), "{:?}", text(&again));
    let again: serde_json::Value = serde_json::from_str(&text(&again).0).unwrap();
    assert_eq!(again["changed"], false);

    // Other bytes under the same version: refused before anything is stored.
    let other = dir.path().join("other");
    troupe_models::write_tiny_model_dir(&other, 99).unwrap();
    let clash = push("1", other.to_string_lossy().into_owned()).await;
    let (_, stderr) = text(&clash);
    assert_eq!(clash.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ALREADY_EXISTS: "), "{stderr}");
    let other_digest = Manifest::of_dir(&other).unwrap().digest();
    assert!(!dir.path().join("node1/models").join(&other_digest).exists());

    // Without --version the digest names the version.
    let auto = push_default(&addr, &other).await;
    assert_eq!(auto["version"], &other_digest[..12]);
    node.shutdown().await.unwrap();
}

async fn push_default(addr: &str, dir: &std::path::Path) -> serde_json::Value {
    let dir = dir.to_string_lossy().into_owned();
    let output = troupe(args(&[
        "models", "push", &dir, "--name", "tiny", "--addr", addr, "--quiet", "--json",
    ]))
    .await;
    assert!(output.status.success(), "{:?}", text(&output));
    serde_json::from_str(&text(&output).0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_cut_off_uploads_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = started(&dir).await;
    let digest = Manifest::of_dir(&model).unwrap().digest();
    let store = dir.path().join("node1/models");

    let status = raw_push(
        &node,
        &model,
        "1",
        chunks_of(&model, Some("model.safetensors")),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("model.safetensors"),
        "{}",
        status.message()
    );

    let mut cut = chunks_of(&model, None);
    cut.pop();
    let status = raw_push(&node, &model, "1", cut).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("ended after"),
        "{}",
        status.message()
    );

    // Two chunks of one file swapped.
    let mut out_of_order = chunks_of(&model, None);
    let second = out_of_order
        .windows(2)
        .position(|pair| pair[0].file == pair[1].file)
        .unwrap();
    out_of_order.swap(second, second + 1);
    let status = raw_push(&node, &model, "1", out_of_order)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Nothing under the digest, no staging left, no version recorded.
    assert!(!store.join(&digest).exists());
    let leftovers: Vec<_> = std::fs::read_dir(&store)
        .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let listed = troupe(args(&[
        "models",
        "list",
        "--addr",
        &node.api_addr.to_string(),
        "--json",
    ]))
    .await;
    assert_eq!(text(&listed).0.trim(), "[]");

    // A whole, correct upload afterwards works.
    let reply = raw_push(&node, &model, "1", chunks_of(&model, None))
        .await
        .unwrap();
    assert!(reply.changed);
    assert_eq!(reply.digest, digest);
    node.shutdown().await.unwrap();
}
