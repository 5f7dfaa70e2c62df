//! `troupe bench raft`: the metadata store's put throughput and latency, contended
//! compare-and-set, and leader failover (kill -9) and pause (SIGSTOP), run with the identical workload against troupe and,
//! in the same run, against etcd (the workload of shared/peers/etcd_bench.py).

mod phases;
mod store;

/// Client stubs for the subset of etcd's v3 API that `troupe bench raft --etcd` drives
/// (`cli/proto/etcd/kv_subset.proto`, compiled by this crate's build script).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod etcd {
    tonic::include_proto!("etcdserverpb");
}

use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use self::phases::{CasResult, Fault, FaultResult, PutResult, Workload};
use self::store::{Kind, Store};
use crate::error::CliError;
use crate::remote::print_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Put,
    Cas,
    Failover,
    Pause,
}

#[derive(Debug, Args)]
pub struct RaftArgs {
    /// API addresses of the troupe nodes, comma-separated (all members, so failover can find
    /// the survivors).
    #[arg(long, value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Client endpoints of an etcd cluster to run the identical workload against, in the same
    /// run (e.g. from shared/peers/etcd3.sh endpoints).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Concurrent clients for the put phase, each a closed loop on one shared channel.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    pub clients: Vec<usize>,
    /// Measured seconds per put point and for the CAS phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Unmeasured seconds before each measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Bytes per put value.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Distinct keys per put client.
    #[arg(long, default_value_t = 1000)]
    pub keyspace: usize,
    /// Clients in the CAS phase.
    #[arg(long, default_value_t = 16)]
    pub cas_clients: usize,
    /// Keys the CAS clients contend on.
    #[arg(long, default_value_t = 8)]
    pub cas_keys: usize,
    /// Rounds of the failover phase (leader kills) and of the pause phase (leader pauses).
    #[arg(long, default_value_t = 5)]
    pub failover_rounds: usize,
    /// Shell command that kill -9s troupe member {n} (1-based, --addr order; also {i}, {ep}).
    #[arg(long, value_name = "TEMPLATE")]
    pub kill_cmd: Option<String>,
    /// Shell command that restarts troupe member {n} on its data dir.
    #[arg(long, value_name = "TEMPLATE")]
    pub restart_cmd: Option<String>,
    /// As --kill-cmd, for etcd member {n} (--etcd order).
    #[arg(long, value_name = "TEMPLATE")]
    pub etcd_kill_cmd: Option<String>,
    /// As --restart-cmd, for etcd.
    #[arg(long, value_name = "TEMPLATE")]
    pub etcd_restart_cmd: Option<String>,
    /// Shell command that pauses troupe member {n} (SIGSTOP), for the pause phase.
    #[arg(long, value_name = "TEMPLATE")]
    pub pause_cmd: Option<String>,
    /// Shell command that resumes troupe member {n} (SIGCONT).
    #[arg(long, value_name = "TEMPLATE")]
    pub resume_cmd: Option<String>,
    /// As --pause-cmd, for etcd.
    #[arg(long, value_name = "TEMPLATE")]
    pub etcd_pause_cmd: Option<String>,
    /// As --resume-cmd, for etcd.
    #[arg(long, value_name = "TEMPLATE")]
    pub etcd_resume_cmd: Option<String>,
    /// Seconds the leader stays paused in each pause round.
    #[arg(long, default_value_t = 5.0)]
    pub pause_secs: f64,
    /// Phases to run, in this order (pause runs only when asked for).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Phase::Put, Phase::Cas, Phase::Failover])]
    pub phases: Vec<Phase>,
    /// Deadline of each put, read and CAS.
    #[arg(long, default_value_t = 5.0)]
    pub rpc_timeout: f64,
    /// Seconds between failover probe puts.
    #[arg(long, default_value_t = 0.02)]
    pub probe_interval: f64,
    /// Deadline of each failover probe.
    #[arg(long, default_value_t = 2.0)]
    pub probe_timeout: f64,
    /// Seconds before each kill and after each restart.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON document to this file (the table still goes to stdout).
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<std::path::PathBuf>,
}

/// Everything measured against one store.
#[derive(Debug, Serialize)]
pub struct StoreReport {
    store: Kind,
    endpoints: Vec<String>,
    put: Vec<PutResult>,
    cas: Option<CasResult>,
    failover: Option<FaultResult>,
    pause: Option<FaultResult>,
    /// Why a requested phase did not run.
    skipped: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    value_size: usize,
    seconds: f64,
    stores: Vec<StoreReport>,
}

fn seconds(flag: &str, value: f64) -> Result<Duration, CliError> {
    if value.is_finite() && value >= 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(CliError::Usage(format!(
            "--{flag} {value} must be a number of seconds >= 0"
        )))
    }
}

impl RaftArgs {
    fn workload(&self) -> Result<Workload, CliError> {
        if self.addr.is_empty() && self.etcd.is_empty() {
            return Err(CliError::Usage(
                "nothing to measure: give --addr with troupe's API addresses and/or --etcd with etcd's endpoints".into(),
            ));
        }
        if self.clients.contains(&0) || self.cas_clients == 0 || self.cas_keys == 0 {
            return Err(CliError::Usage(
                "--clients, --cas-clients and --cas-keys must be >= 1".into(),
            ));
        }
        if self.value_size < 16 || self.keyspace == 0 {
            return Err(CliError::Usage(
                "--value-size must be >= 16 (the value starts with a 16-digit sequence number) and --keyspace >= 1".into(),
            ));
        }
        let duration = seconds("seconds", self.seconds)?;
        if duration.is_zero() {
            return Err(CliError::Usage("--seconds must be > 0".into()));
        }
        Ok(Workload {
            duration,
            warmup: seconds("warmup", self.warmup)?,
            value_size: self.value_size,
            keyspace: self.keyspace,
            cas_clients: self.cas_clients,
            cas_keys: self.cas_keys,
            failover_rounds: self.failover_rounds,
            rpc_timeout: seconds("rpc-timeout", self.rpc_timeout)?,
            probe_interval: seconds("probe-interval", self.probe_interval)?
                .max(Duration::from_millis(1)),
            probe_timeout: seconds("probe-timeout", self.probe_timeout)?,
            settle: seconds("settle", self.settle)?,
        })
    }
}

/// The commands that make one store's members faulty and heal them.
#[derive(Clone)]
struct FaultCommands {
    kill: Option<String>,
    restart: Option<String>,
    pause: Option<String>,
    resume: Option<String>,
}

struct Target {
    store: Store,
    commands: FaultCommands,
    report: StoreReport,
}

pub fn run(args: RaftArgs) -> Result<(), CliError> {
    let workload = args.workload()?;
    let mut targets = Vec::new();
    let pause_hold = seconds("pause-secs", args.pause_secs)?;
    for (kind, endpoints, commands) in [
        (
            Kind::Troupe,
            &args.addr,
            FaultCommands {
                kill: args.kill_cmd.clone(),
                restart: args.restart_cmd.clone(),
                pause: args.pause_cmd.clone(),
                resume: args.resume_cmd.clone(),
            },
        ),
        (
            Kind::Etcd,
            &args.etcd,
            FaultCommands {
                kill: args.etcd_kill_cmd.clone(),
                restart: args.etcd_restart_cmd.clone(),
                pause: args.etcd_pause_cmd.clone(),
                resume: args.etcd_resume_cmd.clone(),
            },
        ),
    ] {
        if endpoints.is_empty() {
            continue;
        }
        targets.push((kind, endpoints.clone(), commands));
    }
    let json = args.json;
    let json_out = args.json_out.clone();
    let report = crate::remote::block_on(async move {
        let mut stores = Vec::new();
        for (kind, endpoints, commands) in targets {
            stores.push(Target {
                store: Store::connect(kind, &endpoints)?,
                commands,
                report: StoreReport {
                    store: kind,
                    endpoints,
                    put: Vec::new(),
                    cas: None,
                    failover: None,
                    pause: None,
                    skipped: Vec::new(),
                },
            });
        }
        // Phase by phase, each store in turn, so that both see the same machine conditions.
        for phase in &args.phases {
            for target in &mut stores {
                let store = &target.store;
                let name = store.kind.name();
                match phase {
                    Phase::Put => {
                        for &clients in &args.clients {
                            let result = phases::put(store, &workload, clients).await?;
                            progress(json, &format!("{name:<6} {}", result.line()));
                            target.report.put.push(result);
                        }
                    }
                    Phase::Cas => {
                        let result = phases::cas(store, &workload).await?;
                        progress(json, &format!("{name:<6} {}", result.line()));
                        target.report.cas = Some(result);
                    }
                    Phase::Failover | Phase::Pause => {
                        let (fault, inject, heal, hold, flags) = match phase {
                            Phase::Failover => (
                                "failover",
                                &target.commands.kill,
                                &target.commands.restart,
                                Duration::ZERO,
                                ["kill", "restart"],
                            ),
                            _ => (
                                "pause",
                                &target.commands.pause,
                                &target.commands.resume,
                                pause_hold,
                                ["pause", "resume"],
                            ),
                        };
                        let (Some(inject), Some(heal)) = (inject, heal) else {
                            let prefix = match store.kind {
                                Kind::Troupe => "",
                                Kind::Etcd => "etcd-",
                            };
                            target.report.skipped.push(format!(
                                "{fault}: give the {name} {} and {} commands (--{prefix}{}-cmd, --{prefix}{}-cmd)",
                                flags[0], flags[1], flags[0], flags[1]
                            ));
                            continue;
                        };
                        let spec = Fault {
                            name: fault,
                            inject,
                            heal,
                            hold,
                        };
                        let result = phases::fault_rounds(store, &workload, &spec, |line| {
                            progress(json, &format!("{name:<6} {line}"))
                        })
                        .await?;
                        match phase {
                            Phase::Failover => target.report.failover = Some(result),
                            _ => target.report.pause = Some(result),
                        }
                    }
                }
            }
        }
        Ok(Report {
            value_size: workload.value_size,
            seconds: workload.duration.as_secs_f64(),
            stores: stores.into_iter().map(|t| t.report).collect(),
        })
    })?;
    if let Some(path) = &json_out {
        let text = serde_json::to_vec_pretty(&report)
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        std::fs::write(path, text).map_err(|e| {
            CliError::Output(std::io::Error::other(format!("{}: {e}", path.display())))
        })?;
    }
    if json {
        return print_json(&report);
    }
    print_table(&report);
    Ok(())
}

fn progress(json: bool, line: &str) {
    if !json {
        eprintln!("{line}");
    }
}

/// A Markdown table, one row per figure: each store's value, then troupe / etcd when both
/// ran; then each store's failover rounds and anything that went wrong or did not run.
fn print_table(report: &Report) {
    let stores = &report.stores;
    let mut rows: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    let mut row = |label: String, value: &dyn Fn(&StoreReport) -> Option<f64>| {
        rows.push((label, stores.iter().map(value).collect()));
    };
    let mut clients: Vec<usize> = Vec::new();
    for put in stores.iter().flat_map(|s| &s.put) {
        if !clients.contains(&put.clients) {
            clients.push(put.clients);
        }
    }
    for c in clients {
        let put = |s: &StoreReport| s.put.iter().find(|p| p.clients == c).cloned();
        row(format!("put {c} clients: ops/s"), &|s| {
            put(s).map(|p| p.ops_per_s)
        });
        row(format!("put {c} clients: p50 ms"), &|s| {
            put(s).map(|p| p.latency.p50_ms)
        });
        row(format!("put {c} clients: p99 ms"), &|s| {
            put(s).map(|p| p.latency.p99_ms)
        });
    }
    if stores.iter().any(|s| s.cas.is_some()) {
        row("cas: successes/s".into(), &|s| {
            s.cas.as_ref().map(|c| c.cas_ok_per_s)
        });
        row("cas: conflict rate".into(), &|s| {
            s.cas.as_ref().and_then(|c| c.conflict_rate)
        });
    }
    for (fault, of) in [
        (
            "failover",
            (|s| s.failover.as_ref()) as fn(&StoreReport) -> Option<&FaultResult>,
        ),
        ("pause", |s| s.pause.as_ref()),
    ] {
        if stores.iter().any(|s| of(s).is_some()) {
            row(format!("{fault}: first put ok, median s"), &|s| {
                of(s).and_then(|f| f.median_s)
            });
            row(format!("{fault}: first put ok, max s"), &|s| {
                of(s).and_then(|f| f.max_s)
            });
            row(format!("{fault}: longest gap, median s"), &|s| {
                of(s).and_then(|f| f.max_gap_median_s)
            });
            row(format!("{fault}: longest gap, max s"), &|s| {
                of(s).and_then(|f| f.max_gap_max_s)
            });
        }
    }
    let ratio = stores.len() == 2;
    let names: Vec<&str> = stores.iter().map(|s| s.store.name()).collect();
    print!("| test | {} |", names.join(" | "));
    println!("{}", if ratio { " troupe / etcd |" } else { "" });
    print!("|---|{}", "---:|".repeat(stores.len()));
    println!("{}", if ratio { "---:|" } else { "" });
    let cell = |v: Option<f64>| match v {
        None => "-".to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
    };
    for (label, values) in rows {
        let cells: Vec<String> = values.iter().map(|v| cell(*v)).collect();
        print!("| {label} | {} |", cells.join(" | "));
        if ratio {
            let r = match (values[0], values[1]) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
                _ => "-".to_owned(),
            };
            print!(" {r} |");
        }
        println!();
    }
    for store in stores {
        let name = store.store.name();
        for fault in [&store.failover, &store.pause].into_iter().flatten() {
            let rounds: Vec<String> = fault
                .rounds
                .iter()
                .map(|r| {
                    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.3}"));
                    format!("{}/{}", secs(r.unavailable_s), secs(r.max_gap_s))
                })
                .collect();
            println!(
                "{name} {} rounds (first ok / longest gap, s): {}",
                fault.fault,
                rounds.join(", ")
            );
        }
        if store.cas.as_ref().is_some_and(|c| !c.lost_update_check_ok) {
            println!("{name}: LOST UPDATE: the counters do not add up to the successful CAS");
        }
        for skipped in &store.skipped {
            println!("{name}: not run: {skipped}");
        }
    }
}
