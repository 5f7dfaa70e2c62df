//! The API port against a client that lies, floods or sends garbage, over real sockets: each
//! probe gets a clear code, nothing invalid reaches the Raft log, /metrics stays bounded,
//! idle and flooding connections cannot lock clients out.

mod common;

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use common::*;
use tokio::io::AsyncReadExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;
use troupe_node::RunningNode;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::{
    ClusterInitRequest, Member, NodeStatusRequest, RestartActorRequest, SetPriorityRequest,
    SetSettingRequest, WatchRequest,
};

const WAIT: Duration = Duration::from_secs(20);

async fn admin(node: &RunningNode) -> AdminClient<tonic::transport::Channel> {
    AdminClient::connect(format!("http://{}", node.api_addr))
        .await
        .unwrap()
        .max_decoding_message_size(usize::MAX)
}

/// Sends raw bytes as a request body and reads the reply as raw bytes.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

async fn raw_call(node: &RunningNode, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.api_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_oversized_input_is_refused_before_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(&dir, 1).await;
    let node = &nodes[0];
    let mut client = admin(node).await;
    client
        .set_setting(SetSettingRequest {
            key: "ok".into(),
            value: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = node.metadata.status();

    // A body that is not protobuf: the client's fault, so INVALID_ARGUMENT.
    let status = raw_call(
        node,
        "/troupe.v1.Admin/SetSetting",
        vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x99],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A 3.9 MB setting value: refused before it is proposed.
    let status = client
        .set_setting(SetSettingRequest {
            key: "big".into(),
            value: "x".repeat(3_900_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_setting_value_bytes"),
        "{status:?}"
    );

    // Invalid names: refused at the edge.
    for name in ["bad name", "", "a/b", "nul\0byte"] {
        let status = client
            .set_priority(SetPriorityRequest {
                name: name.into(),
                priority: 5,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
    }
    // A 10 KB name is refused with a short message naming the limit, never echoed whole
    // (which would push the status past the client's header limit).
    let huge = "m".repeat(10_000);
    let status = client
        .set_setting(SetSettingRequest {
            key: huge.clone(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 300, "{}", status.message().len());
    let status = InferenceClientExt::embed_huge(node, &huge).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 300);
    // An unknown 10 KB actor path: NOT_FOUND, the message bounded.
    let status = client
        .restart_actor(RestartActorRequest { path: huge.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().len() <= 1100, "{}", status.message().len());

    // None of it took a log entry or a revision.
    let after = node.metadata.status();
    assert_eq!(after.last_log_index, before.last_log_index);
    assert_eq!(after.applied_revision, before.applied_revision);

    // Init on a formed cluster naming other members is refused, naming the members it has;
    // the same members again is an idempotent OK.
    let status = client
        .cluster_init(ClusterInitRequest {
            members: vec![
                Member {
                    id: 1,
                    peer_addr: node.peer_addr.to_string(),
                    api_addr: node.api_addr.to_string(),
                },
                Member {
                    id: 7,
                    peer_addr: "127.0.0.1:9".into(),
                    api_addr: "127.0.0.1:9".into(),
                },
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("members 1"), "{status:?}");
    let again = client
        .cluster_init(ClusterInitRequest {
            members: vec![Member {
                id: 1,
                peer_addr: node.peer_addr.to_string(),
                api_addr: node.api_addr.to_string(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.initialized);

    // The node still serves.
    client.node_status(NodeStatusRequest {}).await.unwrap();
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

struct InferenceClientExt;

impl InferenceClientExt {
    async fn embed_huge(node: &RunningNode, model: &str) -> tonic::Status {
        let mut client = troupe_proto::v1::inference_client::InferenceClient::connect(format!(
            "http://{}",
            node.api_addr
        ))
        .await
        .unwrap();
        client
            .embed(embed_request(model, &["hi"], ""))
            .await
            .unwrap_err()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_names_do_not_grow_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(&dir, 1).await;
    let node = &nodes[0];
    let mut client = troupe_proto::v1::inference_client::InferenceClient::connect(format!(
        "http://{}",
        node.api_addr
    ))
    .await
    .unwrap();
    let size = || async { http_get(node.metrics_addr, "/metrics").await.1.len() };
    // Every kind of series the probes below can make exists once before measuring: an
    // unknown model and task (NOT_FOUND), and a refused name (INVALID_ARGUMENT).
    client
        .embed(embed_request("warm-up", &["x"], "t"))
        .await
        .unwrap_err();
    client
        .embed(embed_request("warm up", &["x"], ""))
        .await
        .unwrap_err();
    let before = size().await;
    for i in 0..3000 {
        let status = client
            .embed(embed_request(
                &format!("model-{i}"),
                &["x"],
                &format!("task-{i}"),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // A NUL byte or a newline in a name is refused before it can reach a label.
    for bad in ["nul\0model", "line\nbreak"] {
        let status = client
            .embed(embed_request(bad, &["x"], ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let after = size().await;
    assert!(
        after < before + 1024,
        "/metrics grew from {before} to {after} bytes"
    );
    let (_, body) = http_get(node.metrics_addr, "/metrics").await;
    assert!(
        body.contains("model=\"other\""),
        "unknown models count as other"
    );
    assert!(!body.contains("model-17") && !body.contains('\0'));
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// Reads until the server closes the connection.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_close_and_a_flood_cannot_lock_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster_with(&dir, 1, |_, config| {
        config.limits.idle_timeout_s = 1;
        config.limits.max_connections = 16;
    })
    .await;
    let node = &nodes[0];

    // A connection that never sends a byte is closed by the idle timeout.
    let mut silent = tokio::net::TcpStream::connect(node.api_addr).await.unwrap();
    let idle_closed = tokio::time::timeout(WAIT, closed_by_server(&mut silent)).await;
    assert!(idle_closed.is_ok(), "an idle connection stayed open");

    // A watch stream with nothing to say is a call in flight: it outlives the idle timeout.
    let mut client = admin(node).await;
    let mut watch = client
        .watch(WatchRequest { from_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let idle_before = metric_value(
        node,
        "troupe_connections_closed_total{node=\"1\",port=\"api\",reason=\"idle\"} ",
    )
    .await;
    wait_for("two more idle sweeps", WAIT, || async {
        let mut probe = tokio::net::TcpStream::connect(node.api_addr).await.ok()?;
        closed_by_server(&mut probe).await;
        let now = metric_value(
            node,
            "troupe_connections_closed_total{node=\"1\",port=\"api\",reason=\"idle\"} ",
        )
        .await;
        (now >= idle_before + 2).then_some(())
    })
    .await;
    client
        .set_setting(SetSettingRequest {
            key: "after-idle".into(),
            value: "1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let change = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap();
    assert!(change.is_some(), "the watch stream was closed");

    // A flood of silent connections, far past the limit: the oldest idle ones make room,
    // and a fresh client is answered within a second.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = tokio::net::TcpStream::connect(node.api_addr).await {
            flood.push(stream);
        }
    }
    let started = Instant::now();
    let mut fresh = tonic::transport::Endpoint::from_shared(format!("http://{}", node.api_addr))
        .unwrap()
        .timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map(AdminClient::new)
        .unwrap();
    fresh.node_status(NodeStatusRequest {}).await.unwrap();
    eprintln!(
        "a fresh client under the flood was answered in {:?}",
        started.elapsed()
    );
    let evicted = metric_value(
        node,
        "troupe_connections_closed_total{node=\"1\",port=\"api\",reason=\"evicted\"} ",
    )
    .await;
    assert!(evicted >= 100, "evicted {evicted}");
    let open = metric_value(node, "troupe_open_connections{node=\"1\",port=\"api\"} ").await;
    assert!(open <= 16, "{open} open connections, the limit is 16");
    drop(flood);
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

async fn metric_value(node: &RunningNode, series: &str) -> u64 {
    let (_, body) = http_get(node.metrics_addr, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The header of a push of `model` as `name`.
fn push_header(model: &std::path::Path, name: &str) -> troupe_proto::v1::PushModelChunk {
    use troupe_proto::v1::{push_model_chunk::Part, PushModelHeader};
    let manifest = troupe_models::artifact::Manifest::of_dir(model).unwrap();
    troupe_proto::v1::PushModelChunk {
        part: Some(Part::Header(PushModelHeader {
            name: name.into(),
            version: "1".into(),
            files: troupe_node::server::push::manifest_entries(&manifest),
            ..Default::default()
        })),
    }
}

/// Everything in node 1's artifact store.
fn store_entries(dir: &tempfile::TempDir) -> Vec<String> {
    std::fs::read_dir(dir.path().join("node1").join("models"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_store_nothing_they_should_not() {
    use troupe_proto::v1::push_model_chunk::Part;
    use troupe_proto::v1::FileChunk;
    let dir = tempfile::tempdir().unwrap();
    // A staging directory left by a push cut off by a crash is removed at start.
    let leftover = dir.path().join("node1/models/.abc.1-0.partial");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let nodes = start_cluster(&dir, 1).await;
    let node = &nodes[0];
    assert!(
        !leftover.exists(),
        "the leftover staging dir is still there"
    );
    let model = tiny_model_dir(&dir);
    let addr = node.api_addr.to_string();

    // An invalid name is refused before a byte is stored.
    let header = push_header(&model, "bad name");
    let chunk = troupe_proto::v1::PushModelChunk {
        part: Some(Part::Chunk(FileChunk {
            file: 0,
            offset: 0,
            data: vec![1, 2, 3],
        })),
    };
    let status = admin(node)
        .await
        .push_model(tokio_stream::iter([header, chunk]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(store_entries(&dir).is_empty(), "{:?}", store_entries(&dir));

    // A client that stops midway: its staging directory goes with it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(push_header(&model, "cut-off")).await.unwrap();
    let big = model.join("model.safetensors");
    let bytes = std::fs::read(&big).unwrap();
    let index = troupe_models::artifact::Manifest::of_dir(&model)
        .unwrap()
        .files
        .iter()
        .position(|f| f.path == "model.safetensors")
        .unwrap() as u32;
    tx.send(troupe_proto::v1::PushModelChunk {
        part: Some(Part::Chunk(FileChunk {
            file: index,
            offset: 0,
            data: bytes[..bytes.len() / 2].to_vec(),
        })),
    })
    .await
    .unwrap();
    let mut client = admin(node).await;
    let call = tokio::spawn(async move {
        client
            .push_model(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    wait_for("the push to start staging", WAIT, || async {
        store_entries(&dir)
            .iter()
            .any(|e| e.ends_with(".partial"))
            .then_some(())
    })
    .await;
    call.abort();
    drop(tx);
    wait_for("the cut-off push's staging dir to go", WAIT, || async {
        (!store_entries(&dir).iter().any(|e| e.ends_with(".partial"))).then_some(())
    })
    .await;

    // A symlink in the pushed directory is refused by name, and nothing is sent.
    let linked = dir.path().join("linked");
    troupe_models::write_tiny_model_dir(&linked, 7).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", linked.join("passwd")).unwrap();
    let pushed = troupe(args(&[
        "models",
        "push",
        &linked.to_string_lossy(),
        "--name",
        "linked",
        "--addr",
        &addr,
        "--quiet",
    ]))
    .await;
    let (_, stderr) = text(&pushed);
    assert!(!pushed.status.success());
    assert!(
        stderr.contains("passwd") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert!(store_entries(&dir).is_empty(), "{:?}", store_entries(&dir));

    // An honest push still works.
    push_model(&addr, &model, "tiny", "1").await;
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
