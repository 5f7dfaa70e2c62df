//! `troupe-jepsen`: a Jepsen-style run against a troupe cluster it starts itself.
//!
//! ```text
//! troupe-jepsen --cluster local --bin target/release/troupe --time 60 --seed 7
//! troupe-jepsen --cluster compose --project troupe --time 60   # after scripts/compose-up.sh
//! ```
//!
//! It prints the seed and the schedule first; the same seed gives the same schedule. The exit
//! status is 0 when every check passed, 1 when a check found an anomaly, 2 when the run could
//! not be made.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use troupe_cluster_tests::cluster::Cluster;
use troupe_cluster_tests::compose::ComposeCluster;
use troupe_cluster_tests::local::{can_partition, LocalCluster};
use troupe_cluster_tests::runner::{self, FaultKind, RunConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tier {
    /// `troupe node` processes on this machine, in network namespaces when run as root.
    Local,
    /// The containers of a running docker-compose project (`scripts/compose-up.sh`), hurt
    /// with `docker kill`, `docker pause` and `docker network disconnect`.
    Compose,
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
    /// The troupe binary the nodes run (local).
    #[arg(long, env = "TROUPE_BIN", default_value = "troupe")]
    bin: PathBuf,
    /// Nodes in the cluster (local).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The compose project (compose).
    #[arg(long, env = "TROUPE_COMPOSE_PROJECT", default_value = "troupe")]
    project: String,
    /// The nodes' network as docker-compose.yml names it (compose).
    #[arg(long, default_value = "troupe")]
    network: String,
    /// The nodes' published API addresses, node1 first (compose).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:7700,127.0.0.1:7710,127.0.0.1:7720"
    )]
    addrs: Vec<String>,
    /// CA certificate of the cluster (compose; compose-up.sh prints the export line).
    #[arg(long, env = "TROUPE_CA")]
    ca: Option<PathBuf>,
    /// An admin client certificate and its key (compose).
    #[arg(long, env = "TROUPE_CERT")]
    cert: Option<PathBuf>,
    #[arg(long, env = "TROUPE_KEY")]
    key: Option<PathBuf>,
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
    /// Faults to draw from, comma-separated: kill, pause, isolate, minority, bridge,
    /// slow-disk, disk-fail, clock (partitions need root: they use network namespaces; the
    /// last three use the nodes' failpoints, local tier only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,isolate,minority,bridge,slow-disk,disk-fail,clock"
    )]
    faults: Vec<String>,
    /// Each request's deadline, seconds.
    #[arg(long, default_value_t = 3.0)]
    op_timeout: f64,
    /// Lines for every node's [raft] config section (local).
    #[arg(long, default_value = "")]
    raft: String,
    /// Directory for the nodes' data and logs (default: a new one under /tmp); kept when a
    /// check fails.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Embed traffic beside the register clients, to this model (its active version must be
    /// loaded: the compose tier's is).
    #[arg(long)]
    embed_model: Option<String>,
    /// The model's directory, pushed and activated before the run (local; the compose
    /// cluster serves its model already).
    #[arg(long, env = "TROUPE_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Concurrent Embed loops, with --embed-model.
    #[arg(long, default_value_t = 2)]
    embed_clients: usize,
    /// Keep the local cluster's data and logs even when every check passed.
    #[arg(long)]
    keep: bool,
    /// Crash durability instead of the fault schedule (local tier): this many crashes, one
    /// node at a time, each a kill -9 or an abort at a failpoint in the Raft storage, with the
    /// dead node's disk checked before it restarts. --time is then the least run time.
    #[arg(long)]
    crash_cycles: Option<usize>,
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
                    "troupe-jepsen: unknown fault {name:?}: choose from kill, pause, isolate, minority, bridge, slow-disk, disk-fail, clock"
                );
                return ExitCode::from(2);
            }
        }
    }
    let nodes = match args.cluster {
        Tier::Local => args.nodes,
        Tier::Compose => args.addrs.len(),
    };
    if nodes < 3
        || args.clients == 0
        || args.keys == 0
        || !args.time.is_finite()
        || args.time <= 0.0
    {
        eprintln!("troupe-jepsen: --nodes (or --addrs) must be >= 3, --clients and --keys >= 1, --time > 0");
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let partitions = faults.iter().any(|f| f.is_partition());
    let netns = partitions && args.cluster == Tier::Local && can_partition();
    if partitions && args.cluster == Tier::Local && !netns {
        eprintln!("troupe-jepsen: partitions need root, ip and iptables; running without them");
        faults.retain(|f| !f.is_partition());
    }
    if args.crash_cycles.is_some() && args.cluster != Tier::Local {
        eprintln!("troupe-jepsen: --crash-cycles needs the local tier (it reads the dead nodes' data dirs and sets their failpoints)");
        return ExitCode::from(2);
    }
    if args.cluster == Tier::Compose && faults.iter().any(|f| f.uses_failpoints()) {
        eprintln!("troupe-jepsen: slow-disk, disk-fail and clock use failpoints, which only the local tier sets; running without them");
        faults.retain(|f| !f.uses_failpoints());
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
        embed: args.embed_model.clone().map(|model| runner::EmbedLoad {
            model,
            clients: args.embed_clients.max(1),
        }),
        crash_cycles: args.crash_cycles,
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
    let report = runtime.block_on(async {
        match args.cluster {
            Tier::Local => {
                eprintln!(
                    "troupe-jepsen: seed {seed}: {nodes} nodes of {} under {}{}",
                    args.bin.display(),
                    dir.display(),
                    if netns {
                        ", each in its own network namespace"
                    } else {
                        " on 127.0.0.1"
                    }
                );
                let mut cluster =
                    LocalCluster::start(&args.bin, &dir, nodes, netns, &args.raft).await?;
                if let Some(model) = &args.embed_model {
                    let Some(model_dir) = &args.model_dir else {
                        return Err("--embed-model on the local tier needs --model-dir (or TROUPE_MODEL_DIR): the model to push".to_owned());
                    };
                    cluster.serve_model(model_dir, model)?;
                }
                if args.keep {
                    cluster.keep();
                }
                Ok(run_on(&mut cluster, &config).await)
            }
            Tier::Compose => {
                let Some(ca) = args.ca.clone() else {
                    return Err("the compose tier needs the cluster's CA: --ca or TROUPE_CA (source the env file compose-up.sh wrote)".to_owned());
                };
                let tls = troupe_transport::ClientTls {
                    ca,
                    identity: args.cert.clone().zip(args.key.clone()),
                };
                eprintln!(
                    "troupe-jepsen: seed {seed}: compose project {:?}, nodes at {}",
                    args.project,
                    args.addrs.join(", ")
                );
                let mut cluster =
                    ComposeCluster::attach(&args.project, &args.network, &args.addrs, &tls)?;
                cluster.wait_converged(Duration::from_secs(60)).await?;
                Ok(run_on(&mut cluster, &config).await)
            }
        }
    });
    let logs = match args.cluster {
        Tier::Local => format!("data and logs kept in {}", dir.display()),
        Tier::Compose => format!("logs: docker compose -p {} logs", args.project),
    };
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("troupe-jepsen: the run could not be made: {e} ({logs})");
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
    if args.cluster == Tier::Local {
        for (key, lines) in &report.failed_histories {
            let path = dir.join(format!("history-{key}.txt"));
            if let Err(e) =
                std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, lines.join("\n")))
            {
                eprintln!("troupe-jepsen: {}: {e}", path.display());
            } else {
                eprintln!(
                    "troupe-jepsen: {key}'s operations are in {}",
                    path.display()
                );
            }
        }
    }
    if report.anomalies() > 0 {
        eprintln!("troupe-jepsen: FAILED with seed {seed} ({logs})");
        ExitCode::from(1)
    } else if !report.errors.is_empty() {
        eprintln!("troupe-jepsen: the run was incomplete with seed {seed} ({logs})");
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The run, and the cluster's data kept when a check failed.
async fn run_on(cluster: &mut impl Cluster, config: &RunConfig) -> runner::Report {
    let report = runner::run(cluster, config, |line| eprintln!("jepsen: {line}")).await;
    if !report.passed() {
        cluster.keep();
    }
    report
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
    let percent = |f: Option<f64>| f.map_or("-".to_owned(), |f| format!("{:.1}%", f * 100.0));
    if !report.crash_points.is_empty() {
        println!("| crash point | crashes | at the point |");
        println!("|---|---:|---:|");
        for (point, (asked, reached)) in &report.crash_points {
            println!("| {point} | {asked} | {reached} |");
        }
    } else if report.embed.is_some() {
        println!("| fault | node | was leader | at s | held s | longest write gap s | Embeds ok (healthy entry) | Embeds ok (all) | back to 80% throughput s |");
        println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("| fault | node | was leader | at s | held s | longest write gap s |");
        println!("|---|---:|---|---:|---:|---:|");
    }
    for fault in report.faults.iter().filter(|f| f.fault != FaultKind::Crash) {
        let embed = match report.embed {
            Some(_) => format!(
                " {} | {} | {} |",
                percent(fault.embed_ok_healthy),
                percent(fault.embed_ok_all),
                fault
                    .embed_recovery_ms
                    .map_or("-".to_owned(), |ms| format!("{:.2}", ms as f64 / 1e3))
            ),
            None => String::new(),
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.3} |{embed}",
            fault.fault.name(),
            fault.node,
            if fault.was_leader { "yes" } else { "no" },
            fault.began_ms as f64 / 1e3,
            (fault.healed_ms - fault.began_ms) as f64 / 1e3,
            fault.max_gap_ms as f64 / 1e3
        );
    }
    if let Some(embed) = &report.embed {
        println!(
            "Embeds: {} sent, {} ok ({}); baseline {:.1}/s",
            embed.requests,
            embed.ok,
            percent((embed.requests > 0).then(|| embed.ok as f64 / embed.requests as f64)),
            embed.baseline_per_s
        );
        for error in &embed.sample_errors {
            println!("  {error}");
        }
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
        ("refused but applied", &report.refused_but_applied),
        ("refusals (samples)", &report.refusal_samples),
        ("durable state gone back", &report.durability),
        ("errors", &report.errors),
    ] {
        println!("{what}: {}", list.len());
        for line in list {
            println!("  {line}");
        }
    }
}
