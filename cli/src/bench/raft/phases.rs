//! The three workloads, as in shared/peers/etcd_bench.py: closed-loop puts, contended
//! compare-and-set, and a faulty leader (kill -9, or SIGSTOP) with probe puts at the survivors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::store::{MemberStatus, Store};
use crate::error::CliError;

/// What every phase shares, from the command line.
#[derive(Debug, Clone)]
pub struct Workload {
    pub duration: Duration,
    pub warmup: Duration,
    pub value_size: usize,
    pub keyspace: usize,
    pub cas_clients: usize,
    pub cas_keys: usize,
    pub failover_rounds: usize,
    pub rpc_timeout: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub settle: Duration,
}

/// How long the cluster may take to have a leader and every member caught up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failover round may take before it is given up.
const FAILOVER_MAX: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub n: usize,
}

impl Latency {
    /// Nearest-rank percentiles over seconds, reported in ms (etcd_bench.py's method).
    fn of(mut seconds: Vec<f64>) -> Self {
        seconds.sort_by(f64::total_cmp);
        let pick = |p: f64| crate::bench::serve::percentile(&seconds, p) * 1e3;
        Self {
            p50_ms: pick(50.0),
            p99_ms: pick(99.0),
            max_ms: seconds.last().map_or(f64::NAN, |s| s * 1e3),
            n: seconds.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PutResult {
    pub clients: usize,
    pub ops: usize,
    pub ops_per_s: f64,
    pub errors: u64,
    pub latency: Latency,
}

impl PutResult {
    pub fn line(&self) -> String {
        format!(
            "put clients={:>3} {:>9.1} ops/s p50={:.2}ms p99={:.2}ms max={:.1}ms errors={}",
            self.clients,
            self.ops_per_s,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.errors
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CasResult {
    pub clients: usize,
    pub keys: usize,
    pub cas_ok: u64,
    pub cas_ok_per_s: f64,
    pub conflicts: u64,
    /// Lost CAS attempts / all CAS attempts.
    pub conflict_rate: Option<f64>,
    pub errors: u64,
    /// Per attempt.
    pub attempt_latency: Latency,
    pub sum_of_counters: u64,
    pub successful_cas_total: u64,
    /// The counters add up to the successful CAS: no update was lost.
    pub lost_update_check_ok: bool,
}

impl CasResult {
    pub fn line(&self) -> String {
        format!(
            "cas clients={} keys={} {:.1} CAS/s ok conflict_rate={} attempt p50={:.2}ms p99={:.2}ms lost-update-check={} errors={}",
            self.clients,
            self.keys,
            self.cas_ok_per_s,
            self.conflict_rate.map_or("-".to_owned(), |r| format!("{r:.3}")),
            self.attempt_latency.p50_ms,
            self.attempt_latency.p99_ms,
            if self.lost_update_check_ok { "ok" } else { "MISMATCH" },
            self.errors
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultRound {
    pub round: usize,
    /// 1-based, in endpoint order: the leader when the fault began.
    pub faulty_member: usize,
    /// Seconds from the fault until the first probe put was acknowledged; `None`: never
    /// within the round's limit.
    pub unavailable_s: Option<f64>,
    /// The longest time without an acknowledged probe, from the fault until `settle` after it
    /// was healed; `None` when no probe was acknowledged.
    pub max_gap_s: Option<f64>,
    pub probes: u64,
    pub failed_probes: u64,
    pub new_leader: Option<usize>,
    pub term_before: u64,
    pub term_after: Option<u64>,
    /// Seconds from the fault until the member was healed (restarted or resumed).
    pub healed_s: Option<f64>,
    /// Every probe that finished, in the order sent: the failover timeline (scripts/plots.py
    /// draws acknowledged probes per interval around each fault from it).
    pub timeline: Vec<ProbeSample>,
}

/// One probe put of a fault round; times in seconds from the fault.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeSample {
    pub sent_s: f64,
    pub done_s: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultResult {
    /// How the leader was made faulty: `kill` (kill -9, restarted after the first
    /// acknowledged probe) or `pause` (SIGSTOP, SIGCONT after the hold).
    pub fault: &'static str,
    /// Seconds the fault was held (0 for a kill: it is healed as soon as a probe succeeds).
    pub hold_s: f64,
    pub rounds: Vec<FaultRound>,
    /// Of `unavailable_s` over the rounds.
    pub median_s: Option<f64>,
    pub max_s: Option<f64>,
    /// Of `max_gap_s` over the rounds.
    pub max_gap_median_s: Option<f64>,
    pub max_gap_max_s: Option<f64>,
}

/// One way to make the leader faulty, and to heal it.
pub struct Fault<'a> {
    pub name: &'static str,
    pub inject: &'a str,
    pub heal: &'a str,
    /// How long the fault lasts at least; a kill lasts until the first acknowledged probe.
    pub hold: Duration,
}

fn timeout_error(what: &str, store: &Store) -> CliError {
    CliError::Rpc {
        code: tonic::Code::Unavailable,
        message: format!(
            "{what}: the {} cluster at {} did not get ready (a leader and every member caught up) within {}s",
            store.kind.name(),
            store.endpoints.join(","),
            READY_TIMEOUT.as_secs()
        ),
    }
}

/// Waits until a leader accepts a put and every member has applied close to the leader's
/// log; returns the leader's index.
async fn wait_ready(store: &Store, what: &str) -> Result<usize, CliError> {
    let members: Vec<usize> = (0..store.endpoints.len()).collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut ticker = tokio::time::interval(POLL);
    while Instant::now() < deadline {
        ticker.tick().await;
        let Some(leader) = store.leader_index(&members, Duration::from_secs(1)).await else {
            continue;
        };
        let ready_key = store.key(format_args!("ready"));
        if store
            .put(leader, &ready_key, "1", Duration::from_secs(2))
            .await
            .is_err()
        {
            continue;
        }
        let statuses: Vec<Option<MemberStatus>> =
            store.statuses(&members, Duration::from_secs(1)).await;
        if statuses.iter().any(Option::is_none) {
            continue;
        }
        let statuses: Vec<MemberStatus> = statuses.into_iter().flatten().collect();
        let last = statuses.iter().map(|s| s.last_index).max().unwrap_or(0);
        if statuses.iter().all(|s| s.applied_index + 5 >= last) {
            return Ok(leader);
        }
    }
    Err(timeout_error(what, store))
}

/// A value of exactly `size` bytes that differs per write: a 16-digit sequence, then 'v's.
fn value(size: usize, seq: u64) -> String {
    let mut value = format!("{seq:016}");
    value.extend(std::iter::repeat_n('v', size.saturating_sub(value.len())));
    value
}

pub async fn put(store: &Store, work: &Workload, clients: usize) -> Result<PutResult, CliError> {
    let leader = wait_ready(store, "put").await?;
    let start = Instant::now();
    let measure_from = start + work.warmup;
    let end = measure_from + work.duration;
    let errors = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (store, work, errors, seq) = (store.clone(), work.clone(), errors.clone(), seq.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            for i in 0usize.. {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let key = store.key(format_args!("put/{client:03}/{:05}", i % work.keyspace));
                let value = value(work.value_size, seq.fetch_add(1, Ordering::Relaxed));
                if store
                    .put(leader, &key, &value, work.rpc_timeout)
                    .await
                    .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if t0 >= measure_from {
                    latencies.push(t0.elapsed().as_secs_f64());
                }
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.map_err(|e| CliError::Runtime(e.to_string()))?);
    }
    let ops = latencies.len();
    Ok(PutResult {
        clients,
        ops,
        ops_per_s: ops as f64 / work.duration.as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        latency: Latency::of(latencies),
    })
}

#[derive(Default)]
struct CasCounts {
    ok: AtomicU64,
    ok_total: AtomicU64,
    conflicts: AtomicU64,
    errors: AtomicU64,
}

pub async fn cas(store: &Store, work: &Workload) -> Result<CasResult, CliError> {
    let leader = wait_ready(store, "cas").await?;
    let keys: Arc<Vec<String>> = Arc::new(
        (0..work.cas_keys)
            .map(|k| store.key(format_args!("cas/{k:02}")))
            .collect(),
    );
    for key in keys.iter() {
        store
            .put(leader, key, "0", work.rpc_timeout)
            .await
            .map_err(|s| CliError::Rpc {
                code: s.code(),
                message: format!("resetting {key}: {}", s.message()),
            })?;
    }
    let measure_from = Instant::now() + work.warmup;
    let end = measure_from + work.duration;
    let counts = Arc::new(CasCounts::default());
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..work.cas_clients {
        let (store, work, keys, counts) =
            (store.clone(), work.clone(), keys.clone(), counts.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            // A fixed per-client sequence of keys (a small LCG), reproducible run to run.
            let mut state = 1000 + client as u64;
            while Instant::now() < end {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = &keys[((state >> 33) % keys.len() as u64) as usize];
                let mut current = match store.get(leader, key, work.rpc_timeout).await {
                    Ok(current) => current,
                    Err(_) => {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                loop {
                    let Ok(count) = current.value.parse::<u64>() else {
                        counts.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    };
                    let next = (count + 1).to_string();
                    let t0 = Instant::now();
                    let result = store
                        .cas(leader, key, current.mod_revision, &next, work.rpc_timeout)
                        .await;
                    let t1 = Instant::now();
                    let measured = t0 >= measure_from && t1 <= end;
                    if measured {
                        latencies.push((t1 - t0).as_secs_f64());
                    }
                    match result {
                        Ok(None) => {
                            counts.ok_total.fetch_add(1, Ordering::Relaxed);
                            if measured {
                                counts.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        Ok(Some(seen)) => {
                            if measured {
                                counts.conflicts.fetch_add(1, Ordering::Relaxed);
                            }
                            current = seen;
                            if t1 >= end {
                                break;
                            }
                        }
                        Err(_) => {
                            // Outcome unknown: the lost-update check may be off by one.
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.map_err(|e| CliError::Runtime(e.to_string()))?);
    }
    let mut sum = 0;
    for key in keys.iter() {
        let current = store
            .get(leader, key, work.rpc_timeout)
            .await
            .map_err(|s| CliError::Rpc {
                code: s.code(),
                message: format!("reading {key}: {}", s.message()),
            })?;
        sum += current.value.parse::<u64>().map_err(|_| CliError::Rpc {
            code: tonic::Code::DataLoss,
            message: format!("{key} holds '{}', not a counter", current.value),
        })?;
    }
    let ok = counts.ok.load(Ordering::Relaxed);
    let conflicts = counts.conflicts.load(Ordering::Relaxed);
    let ok_total = counts.ok_total.load(Ordering::Relaxed);
    let attempts = ok + conflicts;
    Ok(CasResult {
        clients: work.cas_clients,
        keys: work.cas_keys,
        cas_ok: ok,
        cas_ok_per_s: ok as f64 / work.duration.as_secs_f64(),
        conflicts,
        conflict_rate: (attempts > 0).then(|| conflicts as f64 / attempts as f64),
        errors: counts.errors.load(Ordering::Relaxed),
        attempt_latency: Latency::of(latencies),
        sum_of_counters: sum,
        successful_cas_total: ok_total,
        lost_update_check_ok: sum == ok_total,
    })
}

/// Runs a kill or restart template through `sh -c`: `{n}` is the 1-based member index,
/// `{i}` the 0-based one, `{ep}` its endpoint.
async fn run_template(template: &str, member: usize, endpoint: &str) -> Result<(), CliError> {
    let command = template
        .replace("{n}", &(member + 1).to_string())
        .replace("{i}", &member.to_string())
        .replace("{ep}", endpoint);
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .map_err(|_| CliError::Usage(format!("`{command}` did not finish within 60s")))?
        .map_err(|e| CliError::Usage(format!("cannot run `{command}`: {e}")))?;
    if !output.status.success() {
        return Err(CliError::Usage(format!(
            "`{command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Rounds of: wait for a leader, make it faulty, send a probe put to a survivor every
/// `probe_interval` (round robin, each with `probe_timeout`), heal the member once the fault has
/// lasted `hold` and a probe has succeeded, and keep probing for `settle`.
pub async fn fault_rounds(
    store: &Store,
    work: &Workload,
    fault: &Fault<'_>,
    mut report: impl FnMut(&str),
) -> Result<FaultResult, CliError> {
    let members: Vec<usize> = (0..store.endpoints.len()).collect();
    let mut rounds = Vec::new();
    let probe_key = store.key(format_args!("{}/probe", fault.name));
    for round in 1..=work.failover_rounds {
        let leader = wait_ready(store, fault.name).await?;
        let term_before = store
            .status(leader, Duration::from_secs(1))
            .await
            .map_or(0, |s| s.term);
        let survivors: Vec<usize> = members.iter().copied().filter(|&m| m != leader).collect();
        for &member in &survivors {
            // Connect the survivors' channels before the fault, so the probe measures Raft.
            let warm = store.key(format_args!("{}/warm", fault.name));
            let _ = store.put(member, &warm, "x", Duration::from_secs(5)).await;
        }
        tokio::time::sleep(work.settle).await;

        run_template(fault.inject, leader, &store.endpoints[leader]).await?;
        let faulted_at = Instant::now();
        let mut acks: Vec<Instant> = Vec::new();
        let (mut probes, mut failed) = (0u64, 0u64);
        let mut healed_at: Option<Instant> = None;
        let mut timeline: Vec<ProbeSample> = Vec::new();
        let mut inflight = tokio::task::JoinSet::new();
        let mut ticker = tokio::time::interval(work.probe_interval);
        loop {
            let now = Instant::now();
            match healed_at {
                Some(at) if now >= at + work.settle => break,
                None if (!acks.is_empty() && now >= faulted_at + fault.hold)
                    || now >= faulted_at + FAILOVER_MAX.max(fault.hold) =>
                {
                    run_template(fault.heal, leader, &store.endpoints[leader]).await?;
                    healed_at = Some(Instant::now());
                }
                _ => {}
            }
            tokio::select! {
                _ = ticker.tick() => {
                    let member = survivors[probes as usize % survivors.len()];
                    let (store, key, timeout) = (store.clone(), probe_key.clone(), work.probe_timeout);
                    let value = probes.to_string();
                    let sent = Instant::now();
                    inflight.spawn(async move {
                        let ok = store.put(member, &key, &value, timeout).await.is_ok();
                        (sent, Instant::now(), ok)
                    });
                    probes += 1;
                }
                Some(joined) = inflight.join_next(), if !inflight.is_empty() => {
                    match joined {
                        Ok((sent, done, ok)) => {
                            timeline.push(ProbeSample {
                                sent_s: sent.saturating_duration_since(faulted_at).as_secs_f64(),
                                done_s: done.saturating_duration_since(faulted_at).as_secs_f64(),
                                ok,
                            });
                            if ok {
                                acks.push(done);
                            } else {
                                failed += 1;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
            }
        }
        inflight.abort_all();
        acks.sort();
        timeline.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
        let first_ok = acks.first().copied();
        let max_gap = first_ok.map(|_| {
            std::iter::once(faulted_at)
                .chain(acks.iter().copied())
                .collect::<Vec<_>>()
                .windows(2)
                .map(|pair| (pair[1] - pair[0]).as_secs_f64())
                .fold(0.0, f64::max)
        });
        let new_leader = store.leader_index(&survivors, Duration::from_secs(1)).await;
        let term_after = match new_leader {
            Some(member) => store
                .status(member, Duration::from_secs(1))
                .await
                .map(|s| s.term),
            None => None,
        };
        let record = FaultRound {
            round,
            faulty_member: leader + 1,
            unavailable_s: first_ok.map(|at| (at - faulted_at).as_secs_f64()),
            max_gap_s: max_gap,
            probes,
            failed_probes: failed,
            new_leader: new_leader.map(|m| m + 1),
            term_before,
            term_after,
            healed_s: healed_at.map(|at| (at - faulted_at).as_secs_f64()),
            timeline,
        };
        let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.3}"));
        report(&format!(
            "{} round {round}: member {}, first put ok after {} s, longest gap {} s, {} of {} probes failed, new leader {:?}, term {} -> {:?}",
            fault.name,
            record.faulty_member,
            secs(record.unavailable_s),
            secs(record.max_gap_s),
            record.failed_probes,
            record.probes,
            record.new_leader,
            record.term_before,
            record.term_after
        ));
        rounds.push(record);
        wait_ready(store, fault.name).await?;
        tokio::time::sleep(work.settle).await;
    }
    let sorted = |values: Vec<Option<f64>>| {
        let mut ok: Vec<f64> = values.into_iter().flatten().collect();
        ok.sort_by(f64::total_cmp);
        (ok.get(ok.len() / 2).copied(), ok.last().copied())
    };
    let (median_s, max_s) = sorted(rounds.iter().map(|r| r.unavailable_s).collect());
    let (max_gap_median_s, max_gap_max_s) = sorted(rounds.iter().map(|r| r.max_gap_s).collect());
    Ok(FaultResult {
        fault: fault.name,
        hold_s: fault.hold.as_secs_f64(),
        rounds,
        median_s,
        max_s,
        max_gap_median_s,
        max_gap_max_s,
    })
}
