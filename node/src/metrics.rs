//! Prometheus metrics: what request handlers record as they go (latency and outcome per model
//! and task, forwards per peer, blob bytes), and what is read from the node's state when
//! `/metrics` is scraped (batches, queues, Raft, heartbeats, actor restarts). The text is the
//! Prometheus exposition format 0.0.4, written here rather than through a client library:
//! every value already lives in the node's own counters, so a scrape only formats them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use troupe_transport::{PeerTransport, Verifier};

use troupe_actors::batcher::BATCH_SIZE_BUCKETS;
use troupe_actors::TreeView;
use troupe_consensus::{Metadata, Role};

/// Upper bounds of the request latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }
}

/// What the handlers record. Shared by the API and peer services and the metrics endpoint.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// (model, task) -> latency of Embed as the client saw it at this node.
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// (model, task, gRPC code) -> Embed requests answered.
    requests: Mutex<BTreeMap<(String, String, String), u64>>,
    /// (peer, gRPC code) -> requests this node forwarded.
    forwarded: Mutex<BTreeMap<(u64, String), u64>>,
    /// Model bytes pulled from peers, and sent to peers.
    pub blob_bytes_received: Arc<AtomicU64>,
    pub blob_bytes_sent: Arc<AtomicU64>,
    /// API calls the gate denied, by reason.
    pub api_denials: Arc<troupe_transport::Denials>,
    /// Open, idle-closed, evicted and refused connections of each port.
    pub api_conns: Arc<troupe_transport::ConnStats>,
    pub peer_conns: Arc<troupe_transport::ConnStats>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A gRPC code as Prometheus label value, e.g. `OK`, `RESOURCE_EXHAUSTED`.
pub fn code_label(code: Option<tonic::Code>) -> String {
    match code {
        None => "OK".into(),
        Some(code) => crate::server::status::code_name(code).to_owned(),
    }
}

impl NodeMetrics {
    /// One Embed answered to a client: how long it took and with which code.
    pub fn record_request(
        &self,
        model: &str,
        task: &str,
        code: Option<tonic::Code>,
        took: Duration,
    ) {
        let task = if task.is_empty() { "default" } else { task };
        lock(&self.latency)
            .entry((model.to_owned(), task.to_owned()))
            .or_default()
            .observe(took.as_secs_f64());
        *lock(&self.requests)
            .entry((model.to_owned(), task.to_owned(), code_label(code)))
            .or_default() += 1;
    }

    /// One request forwarded to `peer`, answered with `code`.
    pub fn record_forward(&self, peer: u64, code: Option<tonic::Code>) {
        *lock(&self.forwarded)
            .entry((peer, code_label(code)))
            .or_default() += 1;
    }

    /// The exposition text: recorded series, then the node's state as of now.
    pub fn render(
        &self,
        node_id: u64,
        tree: &TreeView,
        metadata: &Metadata,
        transport: &PeerTransport,
        verifier: Option<&Verifier>,
    ) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let node = format!("node=\"{node_id}\"");
        self.render_requests(&mut out, &node);
        render_serving(&mut out, &node, tree);
        render_raft(&mut out, &node, metadata, tree);
        render_peers(&mut out, &node, tree);
        render_transport(&mut out, &node, transport);
        self.render_auth(&mut out, &node, verifier);
        self.render_conns(&mut out, &node);
        family(
            &mut out,
            "troupe_blob_bytes_total",
            "counter",
            "Model artifact bytes moved between nodes, by direction.",
        );
        let _ = writeln!(
            out,
            "troupe_blob_bytes_total{{{node},direction=\"received\"}} {}",
            self.blob_bytes_received.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "troupe_blob_bytes_total{{{node},direction=\"sent\"}} {}",
            self.blob_bytes_sent.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "troupe_actor_restarts_total",
            "counter",
            "Restarts of each actor of the node's tree.",
        );
        for actor in tree.actors() {
            let _ = writeln!(
                out,
                "troupe_actor_restarts_total{{{node},path=\"{}\",kind=\"{}\"}} {}",
                escape(&actor.path),
                escape(&actor.kind),
                actor.restarts
            );
        }
        family(
            &mut out,
            "troupe_actor_mailbox_depth",
            "gauge",
            "Messages waiting in each actor's mailbox.",
        );
        for actor in tree.actors() {
            let _ = writeln!(
                out,
                "troupe_actor_mailbox_depth{{{node},path=\"{}\"}} {}",
                escape(&actor.path),
                actor.mailbox_depth
            );
        }
        out
    }

    /// Each port's connections.
    fn render_conns(&self, out: &mut String, node: &str) {
        let ports = [("api", &self.api_conns), ("peer", &self.peer_conns)];
        family(
            out,
            "troupe_open_connections",
            "gauge",
            "Open connections (TLS handshakes included), by port.",
        );
        for (port, stats) in ports {
            let _ = writeln!(
                out,
                "troupe_open_connections{{{node},port=\"{port}\"}} {}",
                stats.open.load(Ordering::Relaxed)
            );
        }
        family(
            out,
            "troupe_connections_closed_total",
            "counter",
            "Connections the node closed or refused, by port and reason: idle (no call for [limits] idle_timeout_s), evicted (the longest idle, for a new client at [limits] max_connections), refused (at the limit with none idle).",
        );
        for (port, stats) in ports {
            for (reason, count) in [
                ("idle", &stats.closed_idle),
                ("evicted", &stats.evicted),
                ("refused", &stats.refused),
            ] {
                let _ = writeln!(
                    out,
                    "troupe_connections_closed_total{{{node},port=\"{port}\",reason=\"{reason}\"}} {}",
                    count.load(Ordering::Relaxed)
                );
            }
        }
    }

    /// Denied API calls by reason, and the token keys in use.
    fn render_auth(&self, out: &mut String, node: &str, verifier: Option<&Verifier>) {
        family(
            out,
            "troupe_api_denials_total",
            "counter",
            "API calls refused for their credential (UNAUTHENTICATED) or role (forbidden: PERMISSION_DENIED), by reason.",
        );
        for (reason, count) in self.api_denials.snapshot() {
            let _ = writeln!(
                out,
                "troupe_api_denials_total{{{node},reason=\"{reason}\"}} {count}"
            );
        }
        let Some(verifier) = verifier else { return };
        family(
            out,
            "troupe_token_keys",
            "gauge",
            "Token verification keys in the node's JWKS.",
        );
        let _ = writeln!(out, "troupe_token_keys{{{node}}} {}", verifier.keys().len());
        family(
            out,
            "troupe_jwks_reloads_total",
            "counter",
            "JWKS reloads, by result (a failed one keeps the previous keys).",
        );
        let (ok, failed) = verifier.reloads();
        let _ = writeln!(
            out,
            "troupe_jwks_reloads_total{{{node},result=\"ok\"}} {ok}"
        );
        let _ = writeln!(
            out,
            "troupe_jwks_reloads_total{{{node},result=\"failed\"}} {failed}"
        );
    }

    fn render_requests(&self, out: &mut String, node: &str) {
        family(
            out,
            "troupe_request_duration_seconds",
            "histogram",
            "Embed latency at the node the client called, by model and task.",
        );
        for ((model, task), histogram) in lock(&self.latency).iter() {
            let labels = format!(
                "{node},model=\"{}\",task=\"{}\"",
                escape(model),
                escape(task)
            );
            let mut cumulative = 0;
            for (bound, count) in LATENCY_BUCKETS.iter().zip(&histogram.counts) {
                cumulative += count;
                let _ = writeln!(out, "troupe_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "troupe_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "troupe_request_duration_seconds_sum{{{labels}}} {}",
                histogram.sum
            );
            let _ = writeln!(
                out,
                "troupe_request_duration_seconds_count{{{labels}}} {}",
                histogram.count
            );
        }
        family(
            out,
            "troupe_requests_total",
            "counter",
            "Embed requests answered, by model, task and gRPC code (rejections included).",
        );
        for ((model, task, code), count) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "troupe_requests_total{{{node},model=\"{}\",task=\"{}\",code=\"{code}\"}} {count}",
                escape(model),
                escape(task)
            );
        }
        family(
            out,
            "troupe_forwarded_requests_total",
            "counter",
            "Requests this node's router forwarded, by peer and the peer's gRPC code.",
        );
        for ((peer, code), count) in lock(&self.forwarded).iter() {
            let _ = writeln!(
                out,
                "troupe_forwarded_requests_total{{{node},peer=\"{peer}\",code=\"{code}\"}} {count}"
            );
        }
    }
}

/// Whether the node runs TLS, its certificates, and whom its ports refused.
fn render_transport(out: &mut String, node: &str, transport: &PeerTransport) {
    let tls = transport.tls_state();
    family(
        out,
        "troupe_insecure",
        "gauge",
        "1 when the node runs without TLS (--insecure): any peer is let in.",
    );
    let _ = writeln!(
        out,
        "troupe_insecure{{{node}}} {}",
        u64::from(tls.is_none())
    );
    family(
        out,
        "troupe_peer_refusals_total",
        "counter",
        "Connections and calls refused on the peer and API ports, by reason.",
    );
    for (reason, count) in transport.refusals().snapshot() {
        let _ = writeln!(
            out,
            "troupe_peer_refusals_total{{{node},reason=\"{reason}\"}} {count}"
        );
    }
    if let Some(tls) = tls {
        let material = tls.current();
        family(
            out,
            "troupe_tls_cert_expiry_timestamp_seconds",
            "gauge",
            "When the node's certificate expires (Unix seconds).",
        );
        let _ = writeln!(
            out,
            "troupe_tls_cert_expiry_timestamp_seconds{{{node}}} {}",
            material.not_after
        );
        family(
            out,
            "troupe_tls_reloads_total",
            "counter",
            "Certificate reloads, by result (a failed one keeps the previous certificates).",
        );
        let _ = writeln!(
            out,
            "troupe_tls_reloads_total{{{node},result=\"ok\"}} {}",
            tls.reloads()
        );
        let _ = writeln!(
            out,
            "troupe_tls_reloads_total{{{node},result=\"failed\"}} {}",
            tls.reload_failures()
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_serving(out: &mut String, node: &str, tree: &TreeView) {
    let batchers = tree.batchers();
    family(
        out,
        "troupe_batch_size",
        "histogram",
        "Texts per forward pass, by model version.",
    );
    for batcher in &batchers {
        let labels = format!(
            "{node},model=\"{}\",version=\"{}\"",
            escape(&batcher.key.name),
            escape(&batcher.key.version)
        );
        let counters = batcher.shared().counters();
        let mut cumulative = 0;
        for (bound, count) in BATCH_SIZE_BUCKETS
            .iter()
            .zip(batcher.shared().batch_sizes())
        {
            cumulative += count;
            let _ = writeln!(
                out,
                "troupe_batch_size_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "troupe_batch_size_bucket{{{labels},le=\"+Inf\"}} {}",
            counters.batches
        );
        let _ = writeln!(out, "troupe_batch_size_sum{{{labels}}} {}", counters.rows);
        let _ = writeln!(
            out,
            "troupe_batch_size_count{{{labels}}} {}",
            counters.batches
        );
    }
    family(
        out,
        "troupe_queue_depth",
        "gauge",
        "Requests queued in a model version's batcher, by lane.",
    );
    for batcher in &batchers {
        for (lane, depth) in batcher.shared().lane_depths().iter().enumerate() {
            let _ = writeln!(
                out,
                "troupe_queue_depth{{{node},model=\"{}\",version=\"{}\",lane=\"{lane}\"}} {depth}",
                escape(&batcher.key.name),
                escape(&batcher.key.version)
            );
        }
    }
    family(
        out,
        "troupe_batcher_rejections_total",
        "counter",
        "Requests a batcher refused or dropped, by reason.",
    );
    for batcher in &batchers {
        let counters = batcher.shared().counters();
        for (reason, count) in [
            ("queue_full", counters.rejected_full),
            ("deadline_exceeded", counters.expired),
            ("cancelled", counters.cancelled),
            ("worker_failed", counters.failed),
        ] {
            let _ = writeln!(out, "troupe_batcher_rejections_total{{{node},model=\"{}\",version=\"{}\",reason=\"{reason}\"}} {count}", escape(&batcher.key.name), escape(&batcher.key.version));
        }
    }
    render_generation(out, node, &batchers);
    family(
        out,
        "troupe_in_flight_requests",
        "gauge",
        "Requests this node is serving now (queued or computing).",
    );
    let _ = writeln!(
        out,
        "troupe_in_flight_requests{{{node}}} {}",
        tree.in_flight.get()
    );
    family(
        out,
        "troupe_serving",
        "gauge",
        "1 when the node is SERVING on grpc.health.v1.",
    );
    let _ = writeln!(
        out,
        "troupe_serving{{{node}}} {}",
        u8::from(tree.health.borrow().serving)
    );
}

fn render_raft(out: &mut String, node: &str, metadata: &Metadata, tree: &TreeView) {
    let status = metadata.status();
    let gauges = [
        ("troupe_raft_term", "The node's current Raft term.", status.term),
        ("troupe_raft_last_log_index", "Index of the last entry in the node's log.", status.last_log_index),
        ("troupe_raft_applied_index", "Index of the last entry the node applied.", status.applied_index),
        ("troupe_raft_applied_revision", "Revision of the last metadata write the node applied.", status.applied_revision),
        ("troupe_raft_is_leader", "1 on the Raft leader.", u64::from(status.role == Role::Leader)),
        ("troupe_raft_has_leader", "1 when the node knows a Raft leader.", u64::from(status.leader.is_some())),
        ("troupe_raft_sync_lag_entries", "Entries this node has still to apply, from the leader's applied index in its last heartbeat.", tree.peers.own_sync_lag()),
    ];
    for (name, help, value) in gauges {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{node}}} {value}");
    }
    family(out, "troupe_raft_sync_lag_seconds", "gauge", "How long this node has been behind the leader: the age of the oldest leader position it has not applied.");
    let _ = writeln!(
        out,
        "troupe_raft_sync_lag_seconds{{{node}}} {}",
        tree.peers.own_sync_lag_duration().as_secs_f64()
    );
    if let Some(committed) = status.committed_index {
        family(
            out,
            "troupe_raft_commit_index",
            "gauge",
            "Highest index a quorum holds (reported by the leader).",
        );
        let _ = writeln!(out, "troupe_raft_commit_index{{{node}}} {committed}");
    }
    family(
        out,
        "troupe_raft_leader_changes_total",
        "counter",
        "Times this node saw the Raft leader change.",
    );
    let _ = writeln!(
        out,
        "troupe_raft_leader_changes_total{{{node}}} {}",
        status.leader_changes
    );
}

fn render_peers(out: &mut String, node: &str, tree: &TreeView) {
    let peers = tree.peers.snapshot();
    family(
        out,
        "troupe_peer_up",
        "gauge",
        "1 while the peer answers heartbeats (up), 0 when suspect or down.",
    );
    for peer in &peers {
        let up = peer.state == troupe_actors::PeerState::Up;
        let _ = writeln!(
            out,
            "troupe_peer_up{{{node},peer=\"{}\",state=\"{}\"}} {}",
            peer.node_id,
            peer.state.as_str(),
            u8::from(up)
        );
    }
    family(
        out,
        "troupe_peer_heartbeat_rtt_seconds",
        "gauge",
        "Round trip of the last answered heartbeat to the peer.",
    );
    for peer in &peers {
        if let Some(rtt) = peer.rtt {
            let _ = writeln!(
                out,
                "troupe_peer_heartbeat_rtt_seconds{{{node},peer=\"{}\"}} {}",
                peer.node_id,
                rtt.as_secs_f64()
            );
        }
    }
    family(
        out,
        "troupe_peer_clock_offset_seconds",
        "gauge",
        "The peer's clock minus this node's (NTP-style midpoint estimate).",
    );
    for peer in &peers {
        let _ = writeln!(
            out,
            "troupe_peer_clock_offset_seconds{{{node},peer=\"{}\"}} {}",
            peer.node_id,
            peer.clock_offset_micros as f64 / 1e6
        );
    }
    family(
        out,
        "troupe_peer_sync_lag_entries",
        "gauge",
        "Entries the peer has still to apply, as this node's heartbeats see it.",
    );
    for peer in &peers {
        let _ = writeln!(
            out,
            "troupe_peer_sync_lag_entries{{{node},peer=\"{}\"}} {}",
            peer.node_id, peer.sync_lag
        );
    }
}

/// Decoders' figures: tokens, KV blocks, preemptions, time to first token and between tokens.
fn render_generation(out: &mut String, node: &str, batchers: &[troupe_actors::BatcherHandle]) {
    let decoders: Vec<_> = batchers
        .iter()
        .filter(|b| matches!(b.model(), troupe_models::LoadedModel::Decoder(_)))
        .collect();
    let labels = |b: &troupe_actors::BatcherHandle| {
        format!(
            "{node},model=\"{}\",version=\"{}\"",
            escape(&b.key.name),
            escape(&b.key.version)
        )
    };
    for (name, kind, help, value) in [
        (
            "troupe_generated_tokens_total",
            "counter",
            "Tokens generated, by model version.",
            (|g: &troupe_actors::scheduler::GenStats| load(&g.generated_tokens))
                as fn(&troupe_actors::scheduler::GenStats) -> u64,
        ),
        (
            "troupe_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled (again after a preemption), by model version.",
            |g| load(&g.prompt_tokens),
        ),
        (
            "troupe_decode_steps_total",
            "counter",
            "Decoder steps (ragged batches) run.",
            |g| load(&g.steps),
        ),
        (
            "troupe_preemptions_total",
            "counter",
            "Sequences preempted (their KV blocks taken for a higher lane, or the cache full); each is prefilled again when readmitted.",
            |g| load(&g.preemptions),
        ),
        (
            "troupe_running_sequences",
            "gauge",
            "Sequences holding KV blocks now.",
            |g| load(&g.running),
        ),
        (
            "troupe_kv_blocks_used",
            "gauge",
            "KV cache blocks (16 tokens each) held by sequences now.",
            |g| load(&g.kv_blocks_used),
        ),
        (
            "troupe_kv_blocks_free",
            "gauge",
            "KV cache blocks free now.",
            |g| load(&g.kv_blocks_total) - load(&g.kv_blocks_used),
        ),
    ] {
        family(out, name, kind, help);
        for b in &decoders {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                labels(b),
                value(&b.shared().generation)
            );
        }
    }
    for (name, help, pick) in [
        (
            "troupe_time_to_first_token_seconds",
            "From a generation's arrival to its first token.",
            (|g: &troupe_actors::scheduler::GenStats| &g.ttft)
                as fn(&troupe_actors::scheduler::GenStats) -> &troupe_actors::scheduler::Histogram,
        ),
        (
            "troupe_inter_token_seconds",
            "Between two tokens of one stream.",
            |g| &g.inter_token,
        ),
    ] {
        family(out, name, "histogram", help);
        for b in &decoders {
            let (buckets, sum, count) = pick(&b.shared().generation).snapshot();
            let labels = labels(b);
            for (bound, cumulative) in buckets {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
}

fn load(value: &std::sync::atomic::AtomicU64) -> u64 {
    value.load(std::sync::atomic::Ordering::Relaxed)
}
