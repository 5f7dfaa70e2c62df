//! One Jepsen-style run: clients doing reads, writes and compare-and-sets on a few registers
//! (cluster settings) against random nodes, a nemesis injecting one fault at a time on a
//! schedule drawn from a seed, a watcher on every node, and the checks at the end:
//!
//! - each register's history is linearizable ([`crate::history`]);
//! - every acknowledged write is in every node's watch stream, at the revision it was
//!   acknowledged with (no acknowledged write lost);
//! - every node's watch stream is the same sequence of revisions, with no gap;
//! - no write applied twice: every value written is unique, and appears at most once in a
//!   stream, whatever the retries and leader changes in between.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use troupe_proto::v1::WatchRequest;

use crate::client::{Answer, NodeClient};
use crate::cluster::Cluster;
use crate::history::{self, Event, Op};

/// A fault the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// kill -9, restarted at the heal.
    Kill,
    /// SIGSTOP, SIGCONT at the heal.
    Pause,
    /// The target cut off from every other node.
    Isolate,
    /// The target and one other node can talk, but not to the rest (a majority in a cluster of
    /// 5, the pair in a cluster of 3 keeps quorum).
    Minority,
    /// Two halves that both see the target, and not each other.
    Bridge,
    /// Every log flush and vote save of the target takes 300 ms longer (a failpoint).
    SlowDisk,
    /// The target's next log flush fails, as an fsync error would: the node must stop rather
    /// than go on with a page cache it cannot trust. Restarted at the heal.
    DiskFail,
    /// The target's clocks jump: its wall clock by ±30..150 s, its monotonic clock forward by
    /// as much (the elector's timing uses it). Set back at the heal (the monotonic clock stays
    /// ahead).
    Clock,
    /// A crash: SIGKILL at once, or an abort at a failpoint in the Raft storage (which one the
    /// seed decides), then the dead node's disk is checked and it is restarted at once. For
    /// crash durability runs (`--crash-cycles`).
    Crash,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::Minority,
        FaultKind::Bridge,
        FaultKind::SlowDisk,
        FaultKind::DiskFail,
        FaultKind::Clock,
        FaultKind::Crash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::Minority => "minority",
            FaultKind::Bridge => "bridge",
            FaultKind::SlowDisk => "slow-disk",
            FaultKind::DiskFail => "disk-fail",
            FaultKind::Clock => "clock",
            FaultKind::Crash => "crash",
        }
    }

    /// Faults made with the node's failpoints (troupe-failpoints).
    pub fn uses_failpoints(self) -> bool {
        matches!(
            self,
            FaultKind::SlowDisk | FaultKind::DiskFail | FaultKind::Clock | FaultKind::Crash
        )
    }

    /// The failpoints that make this fault on a node, for a step that holds `hold_ms`.
    fn failpoints(self, hold_ms: u64) -> String {
        match self {
            FaultKind::SlowDisk => "raft.log.flush=sleep(300); raft.meta.write=sleep(300)".into(),
            FaultKind::DiskFail => "raft.log.flush=1*error".into(),
            FaultKind::Clock => {
                // From the step, so the seed decides it: 30..150 s, either way.
                let seconds = 30 + (hold_ms / 7) % 121;
                let sign = if hold_ms.is_multiple_of(2) { "" } else { "-" };
                format!("clock.offset_ms={sign}{}", seconds * 1000)
            }
            _ => String::new(),
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn is_partition(self) -> bool {
        matches!(
            self,
            FaultKind::Isolate | FaultKind::Minority | FaultKind::Bridge
        )
    }
}

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Whichever node leads when the fault begins.
    Leader,
    /// A node by 0-based index.
    Node(usize),
}

/// One step of the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Quiet time before the fault, ms.
    pub quiet_ms: u64,
    pub fault: FaultKind,
    pub target: Target,
    /// How long the fault lasts, ms.
    pub hold_ms: u64,
}

/// SplitMix64: a small, well-mixed generator, so that a seed is all a schedule needs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }
}

/// The schedule a seed gives: faults from `faults`, one at a time, until `total` is used up.
pub fn schedule(seed: u64, faults: &[FaultKind], nodes: usize, total: Duration) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    let mut used = 0u64;
    let total = total.as_millis() as u64;
    if faults.is_empty() {
        return steps;
    }
    loop {
        let quiet_ms = rng.between(1_000, 3_000);
        let hold_ms = rng.between(1_000, 5_000);
        if used + quiet_ms + hold_ms > total {
            break;
        }
        used += quiet_ms + hold_ms;
        let fault = faults[rng.next_u64() as usize % faults.len()];
        let target = if rng.next_u64().is_multiple_of(2) {
            Target::Leader
        } else {
            Target::Node(rng.next_u64() as usize % nodes)
        };
        steps.push(Step {
            quiet_ms,
            fault,
            target,
            hold_ms,
        });
    }
    steps
}

/// `cycles` crashes, one node at a time, 100..600 ms apart; which node and which crash point
/// ([`crate::crash::POINTS`], picked by `hold_ms`) come from the seed.
pub fn crash_schedule(seed: u64, cycles: usize, nodes: usize) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    (0..cycles)
        .map(|_| Step {
            quiet_ms: rng.between(100, 600),
            fault: FaultKind::Crash,
            target: if rng.next_u64().is_multiple_of(2) {
                Target::Leader
            } else {
                Target::Node(rng.next_u64() as usize % nodes)
            },
            hold_ms: rng.next_u64() % 1_000_000,
        })
        .collect()
}

impl Step {
    /// A crash step's point.
    pub fn crash_point(&self) -> &'static str {
        crate::crash::POINTS[self.hold_ms as usize % crate::crash::POINTS.len()]
    }
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    pub duration: Duration,
    pub clients: usize,
    pub keys: usize,
    pub faults: Vec<FaultKind>,
    /// Each request's deadline.
    pub op_timeout: Duration,
    /// Embed traffic beside the register clients, when the cluster serves a model.
    pub embed: Option<EmbedLoad>,
    /// Instead of the fault schedule: this many crashes (kill -9 and failpoint aborts), each
    /// followed by a check of the dead node's disk.
    pub crash_cycles: Option<usize>,
}

/// Embed traffic: `clients` loops, each sending one-text Embeds to the nodes in turn (as a
/// round-robin balancer without health checks would), so the nodes' routers must serve
/// requests whose chosen worker node is the faulty one.
#[derive(Debug, Clone)]
pub struct EmbedLoad {
    pub model: String,
    pub clients: usize,
}

/// One Embed as recorded: the node it entered, when it completed (µs since the start), and
/// whether it succeeded.
#[derive(Debug, Clone, Copy)]
struct EmbedRecord {
    node: usize,
    completed: u64,
    ok: bool,
}

/// What the Embed traffic saw.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EmbedReport {
    pub requests: usize,
    pub ok: usize,
    /// Successful Embeds per second in quiet time (no fault, and at least 1 s after a heal):
    /// the median of 500 ms windows.
    pub baseline_per_s: f64,
    /// The first errors seen, for a look.
    pub sample_errors: Vec<String>,
}

/// Why a node's watch stream could not be followed (it is then not compared).
type WatchFailures = Arc<Mutex<Vec<String>>>;

/// One client operation as recorded.
#[derive(Debug, Clone)]
struct Record {
    key: usize,
    op: Op,
    invoked: u64,
    completed: Option<u64>,
    /// For an acknowledged write: the revision it applied at.
    revision: Option<u64>,
    /// For a read: the revision of the value it returned. For the dump of a failed key.
    read_revision: Option<u64>,
    /// The node's API address the client sent it to.
    via: Arc<str>,
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub fault: FaultKind,
    /// The node hit, 1-based.
    pub node: usize,
    pub was_leader: bool,
    /// ms since the run began.
    pub began_ms: u64,
    pub healed_ms: u64,
    /// The longest time without an acknowledged write, from the fault until 1 s after the
    /// heal, ms.
    pub max_gap_ms: u64,
    /// Embed traffic during the fault: the fraction that succeeded of the requests sent to
    /// the healthy nodes (their routers must route around the faulty one), and of all.
    pub embed_ok_healthy: Option<f64>,
    pub embed_ok_all: Option<f64>,
    /// From the heal until Embed throughput is back to 80% of the baseline (the start of the
    /// first 500 ms window that reaches it), ms.
    pub embed_recovery_ms: Option<u64>,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub seed: u64,
    pub schedule: Vec<Step>,
    pub faults: Vec<FaultEvent>,
    pub ops: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Keys whose history is not linearizable, with the check's explanation.
    pub non_linearizable: Vec<String>,
    /// Acknowledged writes missing from a node's watch stream, or there at another revision.
    pub lost_writes: Vec<String>,
    /// Watch streams that differ, go backwards, or miss revisions others have.
    pub watch_anomalies: Vec<String>,
    /// Values that applied more than once (at more than one revision).
    pub duplicates: Vec<String>,
    /// Writes refused as certainly not applied that applied all the same.
    pub refused_but_applied: Vec<String>,
    /// Some of the errors definite refusals came with.
    pub refusal_samples: Vec<String>,
    /// The operations of each key that is not linearizable, one per line, for a look.
    #[serde(skip)]
    pub failed_histories: Vec<(String, Vec<String>)>,
    /// The longest time without an acknowledged write in the whole run, ms.
    pub max_gap_ms: u64,
    pub final_revision: u64,
    /// Things that stopped the run from checking what it meant to.
    pub errors: Vec<String>,
    /// Crash runs: per crash point, (crashes asked for, crashes that happened at the point;
    /// the rest were a SIGKILL after 3 s).
    pub crash_points: std::collections::BTreeMap<String, (usize, usize)>,
    /// Crash runs: durable state that went back on a node's disk between two crashes.
    pub durability: Vec<String>,
    pub embed: Option<EmbedReport>,
}

impl Report {
    pub fn anomalies(&self) -> usize {
        self.non_linearizable.len()
            + self.lost_writes.len()
            + self.watch_anomalies.len()
            + self.duplicates.len()
            + self.durability.len()
            + self.refused_but_applied.len()
    }

    pub fn passed(&self) -> bool {
        self.anomalies() == 0 && self.errors.is_empty()
    }
}

/// The changes of a watch stream as one node delivered them: (revision, key, the setting's
/// value).
type Changes = Vec<(u64, String, Option<String>)>;

/// One node's watch stream, and the revision ranges (inclusive) it could not deliver: when a
/// restarted node's history starts after the watcher's position, the node answers OUT_OF_RANGE
/// with its snapshot revision, and the watcher goes on from there. Those revisions are not
/// compared.
#[derive(Debug, Clone, Default, PartialEq)]
struct Stream {
    changes: Changes,
    skipped: Vec<(u64, u64)>,
}

impl Stream {
    /// The revision to watch from next.
    fn next_revision(&self) -> u64 {
        let changed = self.changes.last().map_or(0, |c| c.0);
        let skipped = self.skipped.last().map_or(0, |s| s.1);
        changed.max(skipped) + 1
    }

    fn covers(&self, revision: u64) -> bool {
        !self
            .skipped
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&revision))
    }
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Runs the workload and the schedule against `cluster`, then checks the histories.
pub async fn run(cluster: &mut impl Cluster, config: &RunConfig, log: impl Fn(&str)) -> Report {
    let nodes = cluster.node_count();
    let faults: Vec<FaultKind> = config
        .faults
        .iter()
        .copied()
        .filter(|f| !f.is_partition() || cluster.partitions())
        .collect();
    let mut report = Report {
        seed: config.seed,
        schedule: match config.crash_cycles {
            Some(cycles) => crash_schedule(config.seed, cycles, nodes),
            None => schedule(config.seed, &faults, nodes, config.duration),
        },
        ..Report::default()
    };
    let mut disks: Vec<Option<crate::crash::DiskState>> = vec![None; nodes];
    if faults.len() < config.faults.len() {
        report.errors.push(
            "partitions were asked for but this run cannot make network namespaces (run as root)"
                .into(),
        );
    }
    log(&format!("seed {} schedule:", config.seed));
    for (i, step) in report.schedule.iter().enumerate() {
        log(&format!(
            "  {}: after {} ms quiet, {} {:?} for {} ms",
            i + 1,
            step.quiet_ms,
            step.fault.name(),
            step.target,
            step.hold_ms
        ));
    }
    let start = Instant::now();
    // Keys of their own per run: a run repeated with the same seed on the same cluster must
    // not read the values an earlier one wrote.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let prefix = format!(
        "jepsen-{:x}-{:x}",
        config.seed & 0xffff_ffff,
        run & 0xff_ffff
    );
    let keys: Vec<String> = (0..config.keys).map(|k| format!("{prefix}-k{k}")).collect();

    // Watchers, one per node, from the first revision. They stop on their own signal, after
    // the clients and after the cluster has converged.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (stop_watchers, watchers_stop) = watch::channel(false);
    let mut watchers = Vec::new();
    let streams: Vec<Arc<Mutex<Stream>>> = (0..nodes).map(|_| Arc::default()).collect();
    let watch_failures = WatchFailures::default();
    for (node, stream) in streams.iter().enumerate() {
        let client = match cluster.client(node, Duration::from_secs(3600)) {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        watchers.push(tokio::spawn(watch_node(
            node,
            client,
            stream.clone(),
            watch_failures.clone(),
            watchers_stop.clone(),
        )));
    }

    // Clients.
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let acks: Arc<Mutex<Vec<u64>>> = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refusals: Refusals = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..config.clients {
        let clients = match clients_of(cluster, config.op_timeout) {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        };
        let (records, acks, keys) = (records.clone(), acks.clone(), keys.clone());
        let (refused, refusals) = (refused.clone(), refusals.clone());
        let mut stop = stop_rx.clone();
        let seed = config.seed ^ ((c as u64 + 1) << 48);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let mut seq = 0u64;
            // Each client talks to one node, as Jepsen's do: a client of a faulty node waits
            // it out, the others measure what the healthy nodes give.
            let node = c % clients.len();
            while !*stop.borrow_and_update() {
                // A stagger between operations, as Jepsen's clients have: it keeps histories
                // to a size the checker can search.
                tokio::time::sleep(Duration::from_millis(rng.between(5, 25))).await;
                let key = rng.next_u64() as usize % keys.len();
                let client = &clients[node];
                // Unique values: client in the top bits, a sequence number below.
                seq += 1;
                let value = ((c as u64 + 1) << 32) | seq;
                let request_id = format!("{}-c{c}-{seq}", keys[key]);
                let mut done = Vec::new();
                match rng.next_u64() % 5 {
                    0 | 1 => done.push(read(client, key, &keys[key], start).await),
                    2 | 3 => done.push(
                        write(client, key, &keys[key], value, None, &request_id, start)
                            .await
                            .unwrap_or_else(|why| {
                                refusals.lock().unwrap().push((key, value, why));
                                None
                            }),
                    ),
                    _ => {
                        // Compare-and-set from what a read just returned.
                        let (record, register) =
                            read_register(client, key, &keys[key], start).await;
                        if let Some(record) = record {
                            done.push(Some(record));
                        }
                        if let Some(register) = register {
                            let mut cas = write(
                                client,
                                key,
                                &keys[key],
                                value,
                                Some(register),
                                &request_id,
                                start,
                            )
                            .await
                            .unwrap_or_else(|why| {
                                refusals.lock().unwrap().push((key, value, why));
                                None
                            });
                            if let Some(record) = &mut cas {
                                if let Op::Write { value } = record.op {
                                    let succeeded =
                                        record.completed.is_none() || record.revision.is_some();
                                    record.op = Op::Cas {
                                        expected: register.value,
                                        new: value,
                                        succeeded,
                                    };
                                }
                            }
                            done.push(cas);
                        }
                    }
                }
                let asked = done.len();
                let done: Vec<Record> = done.into_iter().flatten().collect();
                refused.fetch_add(asked - done.len(), std::sync::atomic::Ordering::Relaxed);
                for record in done {
                    if matches!(
                        record.op,
                        Op::Write { .. }
                            | Op::Cas {
                                succeeded: true,
                                ..
                            }
                    ) && record.revision.is_some()
                    {
                        acks.lock().unwrap().push(record.completed.unwrap_or(0));
                    }
                    records.lock().unwrap().push(record);
                }
            }
        }));
    }

    // Embed traffic.
    let embeds: Arc<Mutex<Vec<EmbedRecord>>> = Arc::default();
    let embed_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    if let Some(load) = &config.embed {
        for e in 0..load.clients {
            let clients = match clients_of(cluster, config.op_timeout) {
                Ok(c) => c,
                Err(e) => {
                    report.errors.push(e);
                    return report;
                }
            };
            let (embeds, errors, model) =
                (embeds.clone(), embed_errors.clone(), load.model.clone());
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut seq = 0usize;
                while !*stop.borrow_and_update() {
                    let node = (e + seq) % clients.len();
                    seq += 1;
                    let text = format!("troupe-jepsen embed {e} {seq}: the quick brown fox");
                    let result = clients[node].embed(&model, &text).await;
                    if let Err(error) = &result {
                        {
                            let mut errors = errors.lock().unwrap();
                            if errors.len() < 10 {
                                errors.push(format!("node {}: {error}", node + 1));
                            }
                        }
                        // A refusal comes back at once; do not spin on it.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    embeds.lock().unwrap().push(EmbedRecord {
                        node,
                        completed: now_ms(start),
                        ok: result.is_ok(),
                    });
                }
            }));
        }
    }

    // The nemesis.
    for step in report.schedule.clone() {
        tokio::time::sleep(Duration::from_millis(step.quiet_ms)).await;
        let leader = cluster.leader().await;
        let node = match step.target {
            Target::Leader => leader.unwrap_or(0),
            Target::Node(i) => i,
        };
        let others: Vec<usize> = (0..nodes).filter(|&n| n != node).collect();
        let began_ms = now_ms(start) / 1000;
        if step.fault == FaultKind::Crash {
            let point = step.crash_point();
            let crashed = crash(cluster, node, leader, point, &mut disks, &mut report).await;
            log(&format!(
                "{:>7.2} s: crash node {}{} at {point}{}",
                began_ms as f64 / 1e3,
                node + 1,
                if leader == Some(node) {
                    " (the leader)"
                } else {
                    ""
                },
                if crashed {
                    ""
                } else {
                    " (not reached in 3 s: killed)"
                }
            ));
            report.faults.push(FaultEvent {
                fault: step.fault,
                node: node + 1,
                was_leader: leader == Some(node),
                began_ms,
                healed_ms: now_ms(start) / 1000,
                max_gap_ms: 0,
                embed_ok_healthy: None,
                embed_ok_all: None,
                embed_recovery_ms: None,
            });
            continue;
        }
        let injected = match step.fault {
            FaultKind::Kill => cluster.kill(node),
            FaultKind::Pause => cluster.pause(node),
            FaultKind::Isolate => {
                cluster.partition(&others.iter().map(|&o| (node, o)).collect::<Vec<_>>())
            }
            FaultKind::Minority => {
                // The target and one other node on one side.
                let buddy = others[0];
                let pairs: Vec<(usize, usize)> = [node, buddy]
                    .iter()
                    .flat_map(|&a| {
                        others
                            .iter()
                            .filter(move |&&o| o != buddy)
                            .map(move |&o| (a, o))
                    })
                    .collect();
                cluster.partition(&pairs)
            }
            FaultKind::Bridge => {
                let (left, right) = others.split_at(others.len() / 2);
                let pairs: Vec<(usize, usize)> = left
                    .iter()
                    .flat_map(|&a| right.iter().map(move |&b| (a, b)))
                    .collect();
                cluster.partition(&pairs)
            }
            FaultKind::SlowDisk | FaultKind::DiskFail | FaultKind::Clock => {
                cluster.set_failpoints(node, &step.fault.failpoints(step.hold_ms))
            }
            FaultKind::Crash => unreachable!("crashes are handled above"),
        };
        log(&format!(
            "{:>7.2} s: {} node {}{}",
            began_ms as f64 / 1e3,
            step.fault.name(),
            node + 1,
            if leader == Some(node) {
                " (the leader)"
            } else {
                ""
            }
        ));
        if let Err(e) = injected {
            report.errors.push(format!("{}: {e}", step.fault.name()));
        }
        tokio::time::sleep(Duration::from_millis(step.hold_ms)).await;
        let healed = match step.fault {
            FaultKind::Kill => cluster.restart(node),
            FaultKind::Pause => cluster.resume(node),
            FaultKind::SlowDisk => cluster.set_failpoints(node, ""),
            FaultKind::Clock => cluster.set_failpoints(node, "clock.offset_ms=0"),
            // A node whose flush failed has stopped (a restart of a running node does nothing).
            FaultKind::DiskFail => cluster
                .set_failpoints(node, "")
                .and_then(|()| cluster.restart(node)),
            _ => cluster.heal_network(),
        };
        let healed_ms = now_ms(start) / 1000;
        log(&format!("{:>7.2} s: healed", healed_ms as f64 / 1e3));
        if let Err(e) = healed {
            report
                .errors
                .push(format!("heal {}: {e}", step.fault.name()));
        }
        report.faults.push(FaultEvent {
            fault: step.fault,
            node: node + 1,
            was_leader: leader == Some(node),
            began_ms,
            healed_ms,
            max_gap_ms: 0,
            embed_ok_healthy: None,
            embed_ok_all: None,
            embed_recovery_ms: None,
        });
    }
    let remaining = config.duration.saturating_sub(start.elapsed());
    tokio::time::sleep(remaining).await;

    // Stop the clients, heal everything, let the cluster converge.
    let _ = stop_tx.send(true);
    let stopped_us = now_ms(start);
    for task in tasks {
        let _ = task.await;
    }
    if let Err(e) = cluster.heal_all() {
        report.errors.push(format!("final heal: {e}"));
    }
    let final_revision = match cluster.wait_converged(Duration::from_secs(60)).await {
        Ok(revision) => revision,
        Err(e) => {
            report.errors.push(e);
            0
        }
    };
    report.final_revision = final_revision;
    // Final reads of every key on every node join the histories.
    let mut records = std::mem::take(&mut *records.lock().unwrap());
    for node in 0..nodes {
        if let Ok(client) = cluster.client(node, Duration::from_secs(10)) {
            for (k, key) in keys.iter().enumerate() {
                if let Some(record) = read(&client, k, key, start).await {
                    records.push(record);
                }
            }
        }
    }
    // Streams: every watcher up to the last acknowledged write (later revisions may be
    // refused writes, which change nothing and send no change).
    let last_ack = records.iter().filter_map(|r| r.revision).max().unwrap_or(0);
    let caught_up = crate::wait::until(
        "every watch stream to reach the last acknowledged write",
        Duration::from_secs(30),
        || {
            let behind = streams
                .iter()
                .any(|s| s.lock().unwrap().next_revision() <= last_ack);
            std::future::ready((!behind).then_some(()))
        },
    )
    .await;
    // A stream that never caught up is reported by the checks below, change by change.
    drop(caught_up);
    let _ = stop_watchers.send(true);
    for watcher in watchers {
        if let Err(e) = watcher.await {
            report.errors.push(format!("a watcher failed: {e}"));
        }
    }
    let streams: Vec<Stream> = streams
        .iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    report
        .errors
        .extend(watch_failures.lock().unwrap().iter().cloned());

    // Counts and availability.
    report.failed = refused.load(std::sync::atomic::Ordering::Relaxed);
    report.ops = records.len() + report.failed;
    for record in &records {
        match record.completed {
            None => report.unknown += 1,
            Some(_) => report.ok += 1,
        }
    }
    let mut acks = std::mem::take(&mut *acks.lock().unwrap());
    acks.sort_unstable();
    report.max_gap_ms = max_gap(&acks, 0, config.duration.as_micros() as u64) / 1000;
    for fault in &mut report.faults {
        // Not past the clients' end: a fault healed at the very end has no second after it.
        let to = ((fault.healed_ms + 1000) * 1000).min(stopped_us);
        fault.max_gap_ms =
            max_gap(&acks, fault.began_ms * 1000, to.max(fault.began_ms * 1000)) / 1000;
    }
    if config.embed.is_some() {
        let embeds = std::mem::take(&mut *embeds.lock().unwrap());
        let errors = std::mem::take(&mut *embed_errors.lock().unwrap());
        report.embed = Some(embed_report(&mut report.faults, &embeds, errors));
    }
    let refusals = std::mem::take(&mut *refusals.lock().unwrap());
    check(&mut report, &records, &keys, &streams);
    check_refusals(&mut report, &refusals, &keys, &streams);
    report
}

/// Definite refusals of writes: (key, value, the error).
type Refusals = Arc<Mutex<Vec<(usize, u64, String)>>>;

/// A write the cluster refused as certainly not applied must not show up applied in any
/// node's watch stream: a client that believed the refusal would be wrong.
fn check_refusals(
    report: &mut Report,
    refusals: &[(usize, u64, String)],
    keys: &[String],
    streams: &[Stream],
) {
    for (key, value, why) in refusals {
        let (name, text) = (format!("settings/{}", keys[*key]), value.to_string());
        let applied = streams.iter().find_map(|stream| {
            stream
                .changes
                .iter()
                .find(|(_, k, v)| *k == name && v.as_deref() == Some(text.as_str()))
                .map(|(revision, _, _)| *revision)
        });
        if let Some(revision) = applied {
            report.refused_but_applied.push(format!(
                "{name} = {value} was refused as not applied ({why}) but applied at revision {revision}"
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (_, _, why) in refusals {
        if seen.len() < 5 && seen.insert(why.clone()) {
            report.refusal_samples.push(why.clone());
        }
    }
}

/// One crash cycle: crash `node` at `point`, read its disk and compare it with what it held
/// after its last crash, restart it, and wait until it answers with a leader known. Returns
/// whether the crash happened at the point (else the node was killed after 3 s).
///
/// A vote is saved only in an election, so for the vote points a follower target is armed and
/// then the leader is killed and restarted at once (it comes back a follower): an election
/// follows, in which the target votes or stands.
async fn crash(
    cluster: &mut impl Cluster,
    node: usize,
    leader: Option<usize>,
    point: &str,
    disks: &mut [Option<crate::crash::DiskState>],
    report: &mut Report,
) -> bool {
    let mut at_point = true;
    let note = |report: &mut Report, e: String| {
        report.errors.push(format!("crash node {}: {e}", node + 1))
    };
    if point == "kill" {
        if let Err(e) = cluster.kill(node) {
            note(report, e);
        }
    } else {
        if let Err(e) = cluster.set_failpoints(node, &format!("{point}=1*abort")) {
            note(report, e);
        }
        if let Some(leader) = leader.filter(|&l| l != node && point.starts_with("raft.meta.")) {
            // The file is reread every 50 ms.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(e) = cluster.kill(leader).and_then(|()| cluster.restart(leader)) {
                note(report, e);
            }
        }
        let died = crate::wait::until("the node to abort", Duration::from_secs(3), || {
            let exited = cluster.exited(node);
            async move { exited.then_some(()) }
        })
        .await;
        if died.is_err() {
            at_point = false;
            if let Err(e) = cluster.kill(node) {
                note(report, e);
            }
        }
    }
    let counts = report.crash_points.entry(point.to_owned()).or_default();
    counts.0 += 1;
    counts.1 += usize::from(at_point);
    // Cleared before the restart: the node reads the file as it starts.
    if let Err(e) = cluster.set_failpoints(node, "") {
        note(report, e);
    }
    let last_disk = &mut disks[node];
    if let Some(dir) = cluster.data_dir(node) {
        match crate::crash::read_disk(&dir).await {
            Ok(now) => {
                if let Some(before) = last_disk {
                    report
                        .durability
                        .extend(crate::crash::regressions(node + 1, before, &now));
                }
                *last_disk = Some(now);
            }
            Err(e) => note(report, e),
        }
    }
    if let Err(e) = cluster.restart(node) {
        note(report, e);
        return at_point;
    }
    let client = match cluster.client(node, Duration::from_secs(1)) {
        Ok(client) => client,
        Err(e) => {
            note(report, e);
            return at_point;
        }
    };
    let back = crate::wait::until(
        "the restarted node to rejoin",
        Duration::from_secs(30),
        || async {
            client
                .status()
                .await
                .ok()
                .and_then(|s| s.leader)
                .map(|_| ())
        },
    )
    .await;
    if let Err(e) = back {
        note(report, e);
    }
    at_point
}

/// A client of every node, in node order.
fn clients_of(cluster: &impl Cluster, timeout: Duration) -> Result<Vec<NodeClient>, String> {
    (0..cluster.node_count())
        .map(|i| cluster.client(i, timeout))
        .collect()
}

/// Successful Embeds per second in `from..to` (µs).
fn embed_rate(embeds: &[EmbedRecord], from: u64, to: u64) -> f64 {
    let ok = embeds
        .iter()
        .filter(|r| r.ok && r.completed >= from && r.completed < to)
        .count();
    ok as f64 / ((to - from) as f64 / 1e6)
}

/// The Embed figures of the run and of each fault; see [`EmbedReport`] and [`FaultEvent`].
fn embed_report(
    faults: &mut [FaultEvent],
    embeds: &[EmbedRecord],
    sample_errors: Vec<String>,
) -> EmbedReport {
    const WINDOW: u64 = 500_000;
    const SETTLE: u64 = 1_000_000;
    let end = embeds.iter().map(|r| r.completed).max().unwrap_or(0);
    // Quiet windows: no fault, and at least SETTLE after the last heal.
    let quiet = |from: u64, to: u64| {
        faults.iter().all(|f| {
            let (began, healed) = (f.began_ms * 1000, f.healed_ms * 1000 + SETTLE);
            to <= began || from >= healed
        })
    };
    let mut rates: Vec<f64> = (0..end / WINDOW)
        .map(|w| (w * WINDOW, (w + 1) * WINDOW))
        .filter(|&(from, to)| from >= SETTLE && quiet(from, to))
        .map(|(from, to)| embed_rate(embeds, from, to))
        .collect();
    rates.sort_by(f64::total_cmp);
    let baseline = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    for fault in faults.iter_mut() {
        let (began, healed) = (fault.began_ms * 1000, fault.healed_ms * 1000);
        let during: Vec<&EmbedRecord> = embeds
            .iter()
            .filter(|r| r.completed >= began && r.completed < healed)
            .collect();
        let fraction = |records: &[&&EmbedRecord]| {
            (!records.is_empty())
                .then(|| records.iter().filter(|r| r.ok).count() as f64 / records.len() as f64)
        };
        let healthy: Vec<&&EmbedRecord> =
            during.iter().filter(|r| r.node + 1 != fault.node).collect();
        fault.embed_ok_healthy = fraction(&healthy);
        fault.embed_ok_all = fraction(&during.iter().collect::<Vec<_>>());
        if baseline > 0.0 {
            fault.embed_recovery_ms = (0..)
                .map(|step| healed + step * 100_000)
                .take_while(|from| from + WINDOW <= end)
                .find(|&from| embed_rate(embeds, from, from + WINDOW) >= 0.8 * baseline)
                .map(|from| (from - healed) / 1000);
        }
    }
    EmbedReport {
        requests: embeds.len(),
        ok: embeds.iter().filter(|r| r.ok).count(),
        baseline_per_s: baseline,
        sample_errors,
    }
}

/// The longest interval in `from..to` (µs) with no acknowledgement in `acks` (sorted).
fn max_gap(acks: &[u64], from: u64, to: u64) -> u64 {
    let mut last = from;
    let mut gap = 0;
    for &at in acks.iter().filter(|&&a| a > from && a <= to) {
        gap = gap.max(at - last);
        last = at;
    }
    gap.max(to.saturating_sub(last))
}

async fn read(client: &NodeClient, key: usize, name: &str, start: Instant) -> Option<Record> {
    read_register(client, key, name, start).await.0
}

async fn read_register(
    client: &NodeClient,
    key: usize,
    name: &str,
    start: Instant,
) -> (Option<Record>, Option<crate::client::Register>) {
    let invoked = now_ms(start);
    match client.read(name).await {
        Answer::Ok(register) => (
            Some(Record {
                key,
                op: Op::Read {
                    value: register.value,
                },
                invoked,
                completed: Some(now_ms(start)),
                revision: None,
                read_revision: Some(register.mod_revision),
                via: client.addr.as_str().into(),
            }),
            Some(register),
        ),
        // A failed read observed nothing.
        _ => (None, None),
    }
}

async fn write(
    client: &NodeClient,
    key: usize,
    name: &str,
    value: u64,
    expected: Option<crate::client::Register>,
    request_id: &str,
    start: Instant,
) -> Result<Option<Record>, String> {
    let invoked = now_ms(start);
    let answer = client
        .write(name, value, expected.map(|r| r.mod_revision), request_id)
        .await;
    let completed = now_ms(start);
    let (completed, revision) = match answer {
        Answer::Ok(revision) => (Some(completed), Some(revision)),
        // A lost compare-and-set is a definite outcome.
        Answer::Conflict => (Some(completed), None),
        // It did not apply: it has no place in the history (the caller checks that it is in
        // no watch stream either).
        Answer::Failed(why) => return Err(why),
        Answer::Unknown(_) => (None, None),
    };
    Ok(Some(Record {
        key,
        op: Op::Write { value },
        invoked,
        completed,
        revision,
        read_revision: None,
        via: client.addr.as_str().into(),
    }))
}

/// Follows one node's watch stream until told to stop, reconnecting from the next revision
/// after a failure (a killed or paused node).
async fn watch_node(
    node: usize,
    client: NodeClient,
    stream: Arc<Mutex<Stream>>,
    failures: WatchFailures,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let from = stream.lock().unwrap().next_revision();
        let request = tonic::Request::new(WatchRequest {
            from_revision: from,
        });
        let mut admin = client.admin();
        let opened = tokio::select! {
            opened = admin.watch(request) => opened,
            _ = stop.changed() => return,
        };
        let compacted_to = opened.as_ref().err().and_then(|status| {
            (status.code() == tonic::Code::OutOfRange)
                .then(|| status.metadata().get("x-troupe-snapshot-revision"))
                .flatten()
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        });
        if let Some(to) = compacted_to {
            stream.lock().unwrap().skipped.push((from, to));
            continue;
        }
        if let Err(status) = &opened {
            // Down, paused or cut off: expected during a fault, and retried. Anything else
            // is reported.
            if !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ) {
                let failure = format!(
                    "node {}: watch from revision {from}: {:?}: {}",
                    node + 1,
                    status.code(),
                    status.message()
                );
                let mut failures = failures.lock().unwrap();
                if !failures.contains(&failure) {
                    failures.push(failure);
                }
            }
        }
        if let Ok(response) = opened {
            let mut incoming = response.into_inner();
            loop {
                let next = tokio::select! {
                    next = incoming.message() => next,
                    _ = stop.changed() => return,
                };
                let Ok(Some(change)) = next else { break };
                let value = serde_json::from_str::<serde_json::Value>(&change.value_json)
                    .ok()
                    .and_then(|v| {
                        v.pointer("/record/value")
                            .and_then(|v| v.as_str())
                            .map(str::to_owned)
                    });
                stream
                    .lock()
                    .unwrap()
                    .changes
                    .push((change.revision, change.key, value));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    }
}

fn check(report: &mut Report, records: &[Record], keys: &[String], streams: &[Stream]) {
    // Linearizability, key by key.
    for (k, key) in keys.iter().enumerate() {
        let events: Vec<Event> = records
            .iter()
            .filter(|r| r.key == k)
            .map(|r| Event {
                op: r.op.clone(),
                invoked: r.invoked,
                completed: r.completed,
            })
            .collect();
        if let Err(violation) = history::check(&events) {
            if violation.undecided {
                report.errors.push(format!(
                    "{key}: the linearizability search gave up after {} steps ({} operations): undecided",
                    history::SEARCH_BUDGET,
                    events.len()
                ));
                continue;
            }
            let stuck = &events[violation.stuck_at];
            let mut lines: Vec<(u64, String)> = records
                .iter()
                .filter(|r| r.key == k)
                .map(|r| {
                    (
                        r.invoked,
                        format!(
                            "{:>12} {:>12?} via {} {:?} revision {:?} read revision {:?}",
                            r.invoked, r.completed, r.via, r.op, r.revision, r.read_revision
                        ),
                    )
                })
                .collect();
            lines.sort();
            report
                .failed_histories
                .push((key.clone(), lines.into_iter().map(|(_, l)| l).collect()));
            report.non_linearizable.push(format!(
                "{key}: {} operations; no order places {:?} (invoked at {:.3} s, completed at {:?} µs) after {} others",
                events.len(),
                stuck.op,
                stuck.invoked as f64 / 1e6,
                stuck.completed,
                violation.placed
            ));
        }
    }
    // Watch streams: ordered, alike, and holding every acknowledged write once.
    let setting = |k: usize| format!("settings/{}", keys[k]);
    for (node, stream) in streams.iter().enumerate() {
        let changes = &stream.changes;
        if let Some(pair) = changes.windows(2).find(|p| p[1].0 <= p[0].0) {
            report.watch_anomalies.push(format!(
                "node {}: revision {} after {}",
                node + 1,
                pair[1].0,
                pair[0].0
            ));
        }
        // Values are unique: one seen at two revisions applied twice; one seen twice at the
        // same revision was delivered twice (caught above as a revision out of order).
        let mut seen_at: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
        for (revision, key, value) in changes {
            if let Some(value) = value {
                seen_at.entry((key, value)).or_default().push(*revision);
            }
        }
        for ((key, value), mut revisions) in seen_at {
            revisions.dedup();
            if revisions.len() > 1 && keys.iter().any(|k| key.ends_with(k.as_str())) {
                report.duplicates.push(format!(
                    "node {}: {key} = {value} applied at revisions {revisions:?}",
                    node + 1
                ));
            }
        }
        let by_revision: BTreeMap<u64, (&str, Option<&str>)> = changes
            .iter()
            .map(|(r, k, v)| (*r, (k.as_str(), v.as_deref())))
            .collect();
        for record in records {
            let (Some(revision), value) = (record.revision, &record.op) else {
                continue;
            };
            if !stream.covers(revision) {
                continue;
            }
            let value = match value {
                Op::Write { value } | Op::Cas { new: value, .. } => value.to_string(),
                Op::Read { .. } => continue,
            };
            let expected_key = setting(record.key);
            match by_revision.get(&revision) {
                Some((key, Some(v))) if *key == expected_key && *v == value => {}
                found => report.lost_writes.push(format!(
                    "node {}: {expected_key} = {value} was acknowledged at revision {revision}; the stream has {found:?}",
                    node + 1
                )),
            }
        }
    }
    // Node by node against the first, over the revisions both delivered.
    if let Some(first) = streams.first() {
        for (node, stream) in streams.iter().enumerate().skip(1) {
            let both = |s: &Stream| -> Changes {
                s.changes
                    .iter()
                    .filter(|c| first.covers(c.0) && stream.covers(c.0))
                    .cloned()
                    .collect()
            };
            let (a, b) = (both(first), both(stream));
            if a != b {
                let at = a
                    .iter()
                    .zip(&b)
                    .position(|(x, y)| x != y)
                    .unwrap_or(a.len().min(b.len()));
                report.watch_anomalies.push(format!(
                    "node {} and node 1 differ at change {at} of {}/{}: {:?} vs {:?}",
                    node + 1,
                    b.len(),
                    a.len(),
                    b.get(at),
                    a.get(at)
                ));
            }
        }
    }
    report.lost_writes.truncate(20);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule() {
        let faults = [FaultKind::Kill, FaultKind::Pause, FaultKind::Isolate];
        let a = schedule(42, &faults, 3, Duration::from_secs(120));
        let b = schedule(42, &faults, 3, Duration::from_secs(120));
        let c = schedule(43, &faults, 3, Duration::from_secs(120));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() >= 10, "{}", a.len());
        let used: u64 = a.iter().map(|s| s.quiet_ms + s.hold_ms).sum();
        assert!(used <= 120_000);
        assert!(a.iter().all(|s| faults.contains(&s.fault)));
    }

    #[test]
    fn the_longest_gap_counts_the_edges() {
        assert_eq!(max_gap(&[], 0, 100), 100);
        assert_eq!(max_gap(&[10, 20, 90], 0, 100), 70);
        assert_eq!(max_gap(&[10, 20, 30], 15, 100), 70);
    }

    fn record(key: usize, op: Op, revision: Option<u64>) -> Record {
        Record {
            key,
            op,
            invoked: 0,
            completed: Some(1),
            revision,
            read_revision: None,
            via: "test".into(),
        }
    }

    #[test]
    fn a_lost_or_doubled_write_and_diverging_streams_are_caught() {
        let keys = vec!["r".to_owned()];
        let stream = |values: &[(u64, &str)]| -> Stream {
            Stream {
                changes: values
                    .iter()
                    .map(|(rev, v)| (*rev, "settings/r".to_owned(), Some(v.to_string())))
                    .collect(),
                skipped: Vec::new(),
            }
        };
        let records = vec![
            record(0, Op::Write { value: 5 }, Some(3)),
            record(0, Op::Write { value: 6 }, Some(4)),
        ];
        let mut clean = Report::default();
        let good = stream(&[(3, "5"), (4, "6")]);
        check(&mut clean, &records, &keys, &[good.clone(), good.clone()]);
        assert!(clean.passed(), "{clean:?}");

        let mut lost = Report::default();
        check(
            &mut lost,
            &records,
            &keys,
            &[good.clone(), stream(&[(3, "5")])],
        );
        assert_eq!(lost.lost_writes.len(), 1, "{lost:?}");
        assert_eq!(lost.watch_anomalies.len(), 1, "{lost:?}");

        // A node that restarted behind the watcher and skipped revisions 3-4 is compared
        // on the rest only.
        let mut skipped = Report::default();
        let mut partial = stream(&[]);
        partial.skipped.push((1, 4));
        check(&mut skipped, &records, &keys, &[good.clone(), partial]);
        assert!(skipped.passed(), "{skipped:?}");

        let mut doubled = Report::default();
        let twice = stream(&[(3, "5"), (4, "6"), (5, "5")]);
        check(&mut doubled, &records, &keys, &[twice.clone(), twice]);
        assert_eq!(doubled.duplicates.len(), 2, "{doubled:?}");

        let mut redelivered = Report::default();
        let again = stream(&[(3, "5"), (3, "5"), (4, "6")]);
        check(&mut redelivered, &records, &keys, &[again, good]);
        assert!(redelivered.duplicates.is_empty(), "{redelivered:?}");
        assert!(
            redelivered.watch_anomalies[0].contains("revision 3 after 3"),
            "{redelivered:?}"
        );
    }
}
