//! Supervision and batching under injected faults (feature `failpoints` of troupe-actors):
//! worker panics and their restarts, restart intensity, coalescing, priority lanes, full
//! queues and expired deadlines. The failpoints are process-wide, so these tests take turns.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use troupe_actors::failpoints;
use troupe_actors::BatcherCounters;

/// Failpoints are global: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn counters(node: &troupe_node::RunningNode) -> BatcherCounters {
    let batchers = node.tree.batchers();
    assert_eq!(batchers.len(), 1, "one loaded version");
    batchers[0].shared().counters()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_fails_only_its_batch_and_restarts_within_100ms() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |config| {
        config.serving.max_restarts = 1000;
    })
    .await;
    let mut client = inference_client(&node).await;
    const PANICS: usize = 50;
    for round in 0..PANICS {
        failpoints::panic_next_batches(1);
        let status = client
            .embed(embed_request("tiny", &["this batch panics"], ""))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "round {round}: {status:?}"
        );
        assert!(
            status.message().contains("restarted"),
            "{}",
            status.message()
        );
        // The next batch is served by the restarted worker (or waits for it in the queue).
        let reply = client
            .embed(embed_request("tiny", &["the next batch is fine"], ""))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(reply.into_inner().embeddings.len(), 1);
    }
    let batcher = &node.tree.batchers()[0];
    let mut latencies = batcher.shared().restart_latencies();
    assert_eq!(latencies.len(), PANICS);
    latencies.sort();
    let p99 = latencies[(PANICS * 99).div_ceil(100) - 1];
    eprintln!(
        "worker restart: p50 {:?}, p99 {:?}, max {:?}",
        latencies[PANICS / 2],
        p99,
        latencies[PANICS - 1]
    );
    assert!(p99 < Duration::from_millis(100), "p99 restart {p99:?}");
    let c = counters(&node);
    assert_eq!(
        (c.worker_restarts, c.failed),
        (PANICS as u64, PANICS as u64)
    );
    // The tree shows the restarts on the worker's path.
    let worker = node
        .tree
        .actors()
        .into_iter()
        .find(|a| a.path.ends_with("batcher:tiny@1/worker-0"))
        .unwrap();
    assert_eq!(worker.restarts, PANICS as u64);
    assert_eq!(health_status(&node, "").await, SERVING);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_restart_intensity_turns_health_to_not_serving_without_a_crash_loop() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |config| {
        config.serving.max_restarts = 3;
        config.serving.restart_window_s = 60;
    })
    .await;
    let mut client = inference_client(&node).await;
    failpoints::panic_next_batches(100);
    // 3 restarts are allowed; the 4th failure escalates.
    for _ in 0..4 {
        let status = client
            .embed(embed_request("tiny", &["boom"], ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    failpoints::panic_next_batches(0);
    wait_for(
        "health to turn NOT_SERVING",
        Duration::from_secs(10),
        || async { (health_status(&node, "").await == NOT_SERVING).then_some(()) },
    )
    .await;
    assert_eq!(
        health_status(&node, "troupe.v1.Inference").await,
        NOT_SERVING
    );
    let reasons = node.tree.health.borrow().reasons.join("; ");
    assert!(reasons.contains("restart intensity exceeded"), "{reasons}");
    // No crash loop: nothing restarts any more, and requests are refused at once.
    let status = client
        .embed(embed_request("tiny", &["after"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("restart intensity"),
        "{}",
        status.message()
    );
    assert_eq!(counters(&node).worker_restarts, 3);
    // The node itself is up: Admin still answers, and says why it is not serving.
    let addr = node.api_addr.to_string();
    let tree = troupe(args(&["cluster", "actors", "--addr", &addr, "--json"])).await;
    assert!(tree.status.success(), "{:?}", text(&tree));
    let tree: serde_json::Value = serde_json::from_str(&text(&tree).0).unwrap();
    assert_eq!(tree["serving"], false);
    assert!(
        tree["not_serving_reasons"][0]
            .as_str()
            .unwrap()
            .contains("restart intensity exceeded"),
        "{tree}"
    );
    let worker = tree["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == "node/batcher:tiny@1/worker-0")
        .unwrap();
    assert_eq!(worker["restarts"], 3);
    assert_eq!(tree["batchers"][0]["worker_restarts"], 3);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_coalesce_full_queues_refuse_at_once_and_expired_requests_never_reach_the_model(
) {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |config| {
        config.serving.max_batch_size = 64;
        config.serving.queue_capacity = 40;
        config.serving.lanes = 1;
    })
    .await;
    let client = inference_client(&node).await;
    let base = counters(&node);

    // 32 concurrent requests while the worker is held: one is in the worker, 31 queue, and
    // they leave in batches larger than one.
    let hold = failpoints::hold_batches();
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let text = format!("request {i}");
            client.embed(embed_request("tiny", &[&text], "")).await
        }));
    }
    wait_for("31 queued requests", Duration::from_secs(10), || async {
        (counters(&node).queued == 31).then_some(())
    })
    .await;

    // Fill the lane to its capacity (40) and one more: refused at once, while the worker is
    // still held, so the refusal did not wait for anything.
    let mut fillers = Vec::new();
    for _ in 0..9 {
        let mut client = client.clone();
        fillers.push(tokio::spawn(async move {
            client.embed(embed_request("tiny", &["filler"], "")).await
        }));
    }
    wait_for("a full lane", Duration::from_secs(10), || async {
        (counters(&node).queued == 40).then_some(())
    })
    .await;
    let status = client
        .clone()
        .embed(embed_request("tiny", &["one too many"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("full (40 waiting)"),
        "{}",
        status.message()
    );
    assert_eq!(counters(&node).rejected_full - base.rejected_full, 1);
    drop(hold);
    for call in calls.into_iter().chain(fillers) {
        call.await.unwrap().unwrap();
    }
    let after = counters(&node);
    let batches = after.batches - base.batches;
    assert_eq!(after.jobs - base.jobs, 41);
    assert!(
        (2..41).contains(&batches),
        "{batches} batches for 41 requests"
    );

    // Deadlines: hold the worker with one request, queue five with a 300 ms deadline.
    let base = counters(&node);
    let hold = failpoints::hold_batches();
    let blocker = {
        let mut client = client.clone();
        tokio::spawn(async move { client.embed(embed_request("tiny", &["blocker"], "")).await })
    };
    wait_for(
        "the blocker in the worker",
        Duration::from_secs(10),
        || async { (counters(&node).in_flight == 1).then_some(()) },
    )
    .await;
    let mut late = Vec::new();
    for _ in 0..5 {
        let mut client = client.clone();
        late.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(embed_request("tiny", &["too late"], ""));
            request.set_timeout(Duration::from_millis(300));
            client.embed(request).await
        }));
    }
    for call in late {
        let status = call.await.unwrap().unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    drop(hold);
    blocker.await.unwrap().unwrap();
    wait_for(
        "the expired requests to be dropped",
        Duration::from_secs(10),
        || async {
            // Dropped before compute either way: answered DEADLINE_EXCEEDED by the batcher,
            // or forgotten because the client had already given up.
            let c = counters(&node);
            let dropped = (c.expired - base.expired) + (c.cancelled - base.cancelled);
            (dropped == 5).then_some(c)
        },
    )
    .await;
    let c = counters(&node);
    // Only the blocker's one text was computed.
    assert_eq!((c.jobs - base.jobs, c.rows - base.rows), (1, 1));
    node.shutdown().await.unwrap();
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_a_high_priority_task_waits_less_than_a_low_priority_one() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |config| {
        config.serving.max_batch_size = 4;
    })
    .await;
    let addr = node.api_addr.to_string();
    for (task, priority) in [("interactive", "10"), ("backfill", "-10")] {
        let set = troupe(args(&[
            "priorities",
            "set",
            task,
            priority,
            "--addr",
            &addr,
        ]))
        .await;
        assert!(set.status.success(), "{:?}", text(&set));
    }
    // Every batch costs 4 ms, as a real model's would, so 16 clients contend for 4 slots.
    failpoints::set_batch_delay(Duration::from_millis(4));
    let client = inference_client(&node).await;
    let run = |task: &'static str, clients: usize| {
        (0..clients)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for _ in 0..25 {
                        let start = Instant::now();
                        client
                            .embed(embed_request("tiny", &["contended"], task))
                            .await
                            .unwrap();
                        latencies.push(start.elapsed());
                    }
                    latencies
                })
            })
            .collect::<Vec<_>>()
    };
    let high = run("interactive", 4);
    let low = run("backfill", 12);
    let mut high_latencies = Vec::new();
    for task in high {
        high_latencies.extend(task.await.unwrap());
    }
    let mut low_latencies = Vec::new();
    for task in low {
        low_latencies.extend(task.await.unwrap());
    }
    failpoints::set_batch_delay(Duration::ZERO);
    let (high_p50, low_p50) = (p50(high_latencies), p50(low_latencies));
    eprintln!("p50 interactive {high_p50:?}, backfill {low_p50:?}");
    assert!(high_p50 < low_p50, "high {high_p50:?} vs low {low_p50:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_then_finishes_the_requests_already_queued() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let node = serving_node(&dir, &model, "tiny", |_| {}).await;
    let client = inference_client(&node).await;
    let hold = failpoints::hold_batches();
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            let text = format!("in flight {i}");
            client.embed(embed_request("tiny", &[&text], "")).await
        }));
    }
    wait_for(
        "5 queued and 1 computing",
        Duration::from_secs(10),
        || async {
            let c = counters(&node);
            (c.queued == 5 && c.in_flight == 1).then_some(())
        },
    )
    .await;
    let api = node.api_addr;
    let stopping = tokio::spawn(node.shutdown());
    // New connections are refused while the queued requests are still being served.
    wait_for("the API port to close", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(api)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    drop(hold);
    for call in calls {
        let reply = call
            .await
            .unwrap()
            .expect("a queued request finishes during shutdown");
        assert_eq!(reply.into_inner().embeddings.len(), 1);
    }
    stopping.await.unwrap().unwrap();
}
