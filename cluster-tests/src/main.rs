//! `troupe-jepsen`: a Jepsen-style run against a troupe cluster it starts itself.
//!
//! ```text
//! troupe-jepsen --cluster local --bin target/release/troupe --time 60 --seed 7
//! ```
//!
//! It prints the seed and the schedule first; the same seed gives the same schedule. The exit
//! status is 0 when every check passed, 1 when a check found an anomaly, 2 when the run could
//! not be made.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use troupe_cluster_tests::local::{can_partition, LocalCluster};
use troupe_cluster_tests::runner::{self, FaultKind, RunConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tier {
    /// `troupe node` processes on this machine, in network namespaces when run as root.
    Local,
}

#[derive(Debug, Parser)]
#[command(
    name = "troupe-jepsen",
    about = "Clients, a nemesis and a linearizability checker against a troupe cluster"
)]
struct Args {
    /// Where the cluster runs.
    #[arg(long, value_enum, default_value_t = Tier::Local)]
    cluster: Tier,
    /// The troupe binary the nodes run.
    #[arg(long, env = "TROUPE_BIN", default_value = "troupe")]
    bin: PathBuf,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of workload and faults.
    #[arg(long, default_value_t = 60.0)]
    time: f64,
    /// The schedule's seed (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 5)]
    clients: usize,
    /// Registers (cluster settings) the clients share.
    #[arg(long, default_value_t = 3)]
    keys: usize,
    /// Faults to draw from, comma-separated: kill, pause, isolate, minority, bridge
    /// (partitions need root: they use network namespaces).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,isolate,minority,bridge"
    )]
    faults: Vec<String>,
    /// Each request's deadline, seconds.
    #[arg(long, default_value_t = 3.0)]
    op_timeout: f64,
    /// Lines for every node's [raft] config section.
    #[arg(long, default_value = "")]
    raft: String,
    /// Directory for the nodes' data and logs (default: a new one under /tmp); kept when a
    /// check fails.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut faults = Vec::new();
    for name in &args.faults {
        match FaultKind::parse(name.trim()) {
            Some(fault) => faults.push(fault),
            None => {
                eprintln!(
                    "troupe-jepsen: unknown fault {name:?}: choose from kill, pause, isolate, minority, bridge"
                );
                return ExitCode::from(2);
            }
        }
    }
    if args.nodes < 3
        || args.clients == 0
        || args.keys == 0
        || !args.time.is_finite()
        || args.time <= 0.0
    {
        eprintln!("troupe-jepsen: --nodes must be >= 3, --clients and --keys >= 1, --time > 0");
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let partitions = faults.iter().any(|f| f.is_partition());
    let netns = partitions && can_partition();
    if partitions && !netns {
        eprintln!("troupe-jepsen: partitions need root, ip and iptables; running without them");
        faults.retain(|f| !f.is_partition());
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("troupe-jepsen.{}.{seed:x}", std::process::id()))
    });
    let config = RunConfig {
        seed,
        duration: Duration::from_secs_f64(args.time),
        clients: args.clients,
        keys: args.keys,
        faults,
        op_timeout: Duration::from_secs_f64(args.op_timeout),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("troupe-jepsen: cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let Tier::Local = args.cluster;
    let report = runtime.block_on(async {
        eprintln!(
            "troupe-jepsen: seed {seed}: {} nodes of {} under {}{}",
            args.nodes,
            args.bin.display(),
            dir.display(),
            if netns {
                ", each in its own network namespace"
            } else {
                " on 127.0.0.1"
            }
        );
        let mut cluster =
            LocalCluster::start(&args.bin, &dir, args.nodes, netns, &args.raft).await?;
        let report = runner::run(&mut cluster, &config, |line| eprintln!("jepsen: {line}")).await;
        if !report.passed() {
            cluster.keep();
        }
        Ok::<_, String>(report)
    });
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!(
                "troupe-jepsen: the run could not be made: {e} (logs under {})",
                dir.display()
            );
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.json_out {
        if let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default())
        {
            eprintln!("troupe-jepsen: {}: {e}", path.display());
        }
    }
    print_summary(&report);
    if report.anomalies() > 0 {
        eprintln!(
            "troupe-jepsen: FAILED with seed {seed} (data and logs kept in {})",
            dir.display()
        );
        ExitCode::from(1)
    } else if !report.errors.is_empty() {
        eprintln!(
            "troupe-jepsen: the run was incomplete with seed {seed} (data and logs kept in {})",
            dir.display()
        );
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_summary(report: &runner::Report) {
    println!("seed: {}", report.seed);
    println!(
        "ops: {} ({} ok, {} refused, {} unknown); faults: {}; final revision {}",
        report.ops,
        report.ok,
        report.failed,
        report.unknown,
        report.faults.len(),
        report.final_revision
    );
    println!("| fault | node | was leader | at s | held s | longest write gap s |");
    println!("|---|---:|---|---:|---:|---:|");
    for fault in &report.faults {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.3} |",
            fault.fault.name(),
            fault.node,
            if fault.was_leader { "yes" } else { "no" },
            fault.began_ms as f64 / 1e3,
            (fault.healed_ms - fault.began_ms) as f64 / 1e3,
            fault.max_gap_ms as f64 / 1e3
        );
    }
    println!(
        "longest write gap in the run: {:.3} s",
        report.max_gap_ms as f64 / 1e3
    );
    for (what, list) in [
        ("not linearizable", &report.non_linearizable),
        ("lost writes", &report.lost_writes),
        ("watch anomalies", &report.watch_anomalies),
        ("applied twice", &report.duplicates),
        ("errors", &report.errors),
    ] {
        println!("{what}: {}", list.len());
        for line in list {
            println!("  {line}");
        }
    }
}
