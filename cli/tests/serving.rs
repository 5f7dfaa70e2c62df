//! The serving path end to end over real gRPC on 127.0.0.1: a node started by `troupe_node::run`
//! serves Embed with the same output as the local engine, through the CLI and a raw client;
//! every kind of bad input gets its own code and a message that says what to change.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use tonic::Code;
use troupe_models::{CpuBackend, Embedder};
use troupe_node::config::NodeConfig;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn json_lines(text: &str) -> Vec<Vec<f32>> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn assert_close(actual: &[Vec<f32>], expected: &[Vec<f32>]) {
    assert_eq!(actual.len(), expected.len());
    for (row, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.len(), e.len(), "row {row}");
        let worst = a
            .iter()
            .zip(e)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "row {row} differs by {worst}");
    }
}

/// The services a node names through server reflection, asked with the given protocol
/// version's generated client (`v1` or `v1alpha`).
macro_rules! reflected_services {
    ($version:ident, $addr:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", $addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match replies.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection reply {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_by_run_serves_embed_equal_to_the_local_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (model_dir, name) = match real_model() {
        Some(model) => (model, "all-MiniLM-L6-v2"),
        None => (tiny_model_dir(&dir), "tiny"),
    };
    let (api, peer) = (free_port(), free_port());
    let config = NodeConfig {
        id: 1,
        api: format!("127.0.0.1:{api}"),
        peer: format!("127.0.0.1:{peer}"),
        metrics: "127.0.0.1:0".into(),
        data_dir: dir.path().join("node1"),
        insecure: true,
        ..NodeConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(async move {
        let result = troupe_node::run(config, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(error) = &result {
            eprintln!("the node stopped: {error}");
        }
        result
    });
    let addr = format!("127.0.0.1:{api}");
    let members = format!("1=127.0.0.1:{peer}@{addr}");
    wait_for(
        "the node to accept cluster init",
        Duration::from_secs(30),
        || {
            // A node that stopped (it printed why) will never take it.
            assert!(!node.is_finished(), "the node stopped before cluster init");
            let command = args(&["cluster", "init", "--addr", &addr, "--members", &members]);
            async move { troupe(command).await.status.success().then_some(()) }
        },
    )
    .await;
    let dir_arg = model_dir.to_string_lossy().into_owned();
    for command in [
        vec![
            "models",
            "register",
            name,
            "--version",
            "1",
            "--dir",
            &dir_arg,
            "--addr",
            &addr,
        ],
        vec!["models", "activate", name, "1", "--addr", &addr],
    ] {
        let output = troupe(args(&command)).await;
        assert!(output.status.success(), "{command:?}: {:?}", text(&output));
    }

    let texts = [
        "A man is eating food.",
        "The new movie is awesome",
        "",
        "naïve café — déjà vu, 東京 and emoji 🙂",
        "a much longer sentence that goes on and on so that this batch needs padding for the shorter rows beside it",
    ];
    let expected = Embedder::<CpuBackend>::load(&model_dir, &troupe_models::cpu_device())
        .unwrap()
        .embed(&texts, 32)
        .unwrap();

    // The CLI twin of the local embed: the same JSON lines. It retries while the version
    // loads, as a client would on UNAVAILABLE.
    let mut command = vec!["embed", "--addr", &addr, "--model", name];
    command.extend(texts);
    let remote = wait_for("the model to serve", Duration::from_secs(60), || {
        let command = args(&command);
        async move {
            let output = troupe(command).await;
            let (stdout, stderr) = text(&output);
            if output.status.success() {
                return Some(json_lines(&stdout));
            }
            assert!(stderr.starts_with("error: UNAVAILABLE: "), "{stderr}");
            None
        }
    })
    .await;
    assert_close(&remote, &expected);

    // A raw gRPC client sees the version and the revision it was served at.
    let mut client = InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let reply = client
        .embed(embed_request(name, &texts, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.model_version, "1");
    assert!(reply.revision >= 2, "revision {}", reply.revision);
    assert!(!reply.request_id.is_empty());
    let rows: Vec<Vec<f32>> = reply.embeddings.into_iter().map(|e| e.values).collect();
    assert_close(&rows, &expected);

    // Server reflection (both protocol versions) lists every API service, so grpcurl works
    // without proto files, and only those: the peer port's services are not here.
    for services in [
        reflected_services!(v1, addr),
        reflected_services!(v1alpha, addr),
    ] {
        for service in [
            "troupe.v1.Inference",
            "troupe.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(services.iter().any(|s| s == service), "{services:?}");
        }
        for service in [
            "troupe.v1.RaftPeer",
            "troupe.v1.Peer",
            "troupe.v1.Artifacts",
        ] {
            assert!(!services.iter().any(|s| s == service), "{services:?}");
        }
    }

    let status = troupe(args(&["models", "list", "--addr", &addr, "--json"])).await;
    let listed: serde_json::Value = serde_json::from_str(&text(&status).0).unwrap();
    assert_eq!(listed[0]["state"], "active");
    assert_eq!(listed[0]["local_state"], "ready");

    let _ = stop.send(());
    node.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_own_code_and_a_message_that_says_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |config| {
        config.limits.max_texts_per_request = 4;
        config.limits.max_chars_per_text = 50;
        config.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    let addr = node.api_addr.to_string();
    let set = troupe(args(&["priorities", "set", "search", "5", "--addr", &addr])).await;
    assert!(set.status.success(), "{:?}", text(&set));
    let client = inference_client(&node).await;
    let call = |request: troupe_proto::v1::EmbedRequest| {
        let mut client = client.clone();
        async move { client.embed(request).await.map(|r| r.into_inner()) }
    };
    let failure = |result: Result<troupe_proto::v1::EmbedResponse, tonic::Status>| {
        let status = result.unwrap_err();
        (status.code(), status.message().to_owned())
    };

    let (code, message) = failure(call(embed_request("tiny", &[], "")).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("texts is empty"), "{message}");

    let (code, message) = failure(call(embed_request("tiny", &["a"; 5], "")).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("limit is 4") && message.contains("max_texts_per_request"),
        "{message}"
    );

    let long = "x".repeat(51);
    let (code, message) = failure(call(embed_request("tiny", &["ok", &long], "")).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("text 1 has 51 characters"), "{message}");

    // Characters, not bytes: 50 multi-byte characters pass.
    let accents = "é".repeat(50);
    call(embed_request("tiny", &[&accents], "")).await.unwrap();

    let (code, message) = failure(call(embed_request("nope", &["a"], "")).await);
    assert_eq!(code, Code::NotFound);
    assert!(
        message.contains("model 'nope' is not registered"),
        "{message}"
    );

    let (code, message) = failure(call(embed_request("", &["a"], "")).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("field 'model' is required"), "{message}");

    let mut versioned = embed_request("tiny", &["a"], "");
    versioned.version = "9".into();
    let (code, message) = failure(call(versioned).await);
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("no version '9'"), "{message}");

    let (code, message) = failure(call(embed_request("tiny", &["a"], "unknown-task")).await);
    assert_eq!(code, Code::NotFound);
    assert!(
        message.contains("troupe priorities set unknown-task"),
        "{message}"
    );
    call(embed_request("tiny", &["a"], "search")).await.unwrap();

    let mut wrong_version = tonic::Request::new(embed_request("tiny", &["a"], ""));
    wrong_version
        .metadata_mut()
        .insert("x-troupe-api-version", "7".parse().unwrap());
    let status = client.clone().embed(wrong_version).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("1..=1"), "{}", status.message());

    // A message over max_message_bytes is refused before it is decoded.
    let huge = "y".repeat(70 * 1024);
    let status = call(embed_request("tiny", &[&huge], "")).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(status.message().contains("65536"), "{}", status.message());

    // The CLI reports the code name first and exits non-zero.
    let output = troupe(args(&["embed", "--addr", &addr, "--model", "x", "hello"])).await;
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: NOT_FOUND: model 'x' is not registered"),
        "{stderr}"
    );

    // None of it hurt the node.
    let reply = call(embed_request("tiny", &["still fine"], ""))
        .await
        .unwrap();
    assert_eq!(reply.embeddings.len(), 1);
    assert_eq!(health_status(&node, "").await, SERVING);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_a_new_version_switches_without_errors_and_unloads_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = tiny_model_dir(&dir);
    let node = serving_node(&dir, &first, "tiny", |_| {}).await;
    let second = dir.path().join("tiny-v2");
    troupe_models::write_tiny_model_dir(&second, 8).unwrap();

    // Clients keep sending while version 2 loads and takes over.
    let mut client = inference_client(&node).await;
    let load = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..400 {
                let reply = client
                    .embed(embed_request("tiny", &["during the switch"], ""))
                    .await
                    .expect("no request fails during a version switch")
                    .into_inner();
                versions.push(reply.model_version);
                if versions.last().map(String::as_str) == Some("2") {
                    break;
                }
            }
            versions
        })
    };
    register_and_activate(&node, &second, "tiny", "2").await;
    let versions = load.await.unwrap();
    assert_eq!(versions.first().map(String::as_str), Some("1"));

    let served = wait_for("version 2 to serve", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let reply = client
                .embed(embed_request("tiny", &["after"], ""))
                .await
                .unwrap()
                .into_inner();
            (reply.model_version == "2").then_some(reply)
        }
    })
    .await;
    assert_eq!(served.embeddings.len(), 1);
    wait_for(
        "version 1 to be unloaded",
        Duration::from_secs(30),
        || async {
            let actors = node.tree.actors();
            (!actors.iter().any(|a| a.path.contains("tiny@1"))).then_some(())
        },
    )
    .await;
    // Each version's record says, through Raft, where this node is with it.
    let addr = node.api_addr.to_string();
    wait_for(
        "readiness reports in the metadata",
        Duration::from_secs(30),
        || {
            let addr = addr.clone();
            async move {
                let listed = troupe(args(&["models", "list", "--addr", &addr, "--json"])).await;
                let listed: serde_json::Value = serde_json::from_str(&text(&listed).0).ok()?;
                let nodes = |version: &str| {
                    let reports = listed
                        .as_array()?
                        .iter()
                        .find(|m| m["version"] == version)?["nodes"]
                        .as_array()?
                        .iter()
                        .map(|n| {
                            (
                                n["node_id"].as_u64(),
                                n["state"].as_str().map(str::to_owned),
                            )
                        })
                        .collect::<Vec<_>>();
                    Some(reports)
                };
                let v1 = nodes("1")?;
                let v2 = nodes("2")?;
                (v1 == [(Some(1), Some("unloaded".to_owned()))]
                    && v2 == [(Some(1), Some("ready".to_owned()))])
                .then_some(())
            }
        },
    )
    .await;
    // The retired version is refused with a message that says how to use it again.
    let mut request = embed_request("tiny", &["old"], "");
    request.version = "1".into();
    let status = client.embed(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("retired"), "{}", status.message());
    node.shutdown().await.unwrap();
}
