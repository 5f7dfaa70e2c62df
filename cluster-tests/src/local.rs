//! The local tier: a 3-node (or N-node) troupe cluster of real `troupe node` processes with
//! mTLS, each in a network namespace of its own on a bridge this run creates, so that the
//! nemesis can cut links between nodes with iptables inside the namespaces. Without root (or
//! without `ip`), the nodes run on 127.0.0.1 and partitions are not available.
//!
//! Everything this creates (processes, namespaces, the bridge, one host firewall rule that
//! lets the bridge forward) is removed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::client::NodeClient;
use crate::cluster::Cluster;
use troupe_proto::v1::{ClusterInitRequest, Member};

const API_PORT: u16 = 7001;
const PEER_PORT: u16 = 7101;
const METRICS_PORT: u16 = 7201;

/// The namespaces and bridge of one run.
struct Network {
    tag: String,
    subnet: [u8; 3],
    nodes: usize,
    /// iptables rules (as `-A`-style arguments) that were added in the host namespace.
    host_rules: Vec<Vec<String>>,
}

impl Network {
    fn bridge(&self) -> String {
        format!("tjb{}", self.tag)
    }
    fn namespace(&self, node: usize) -> String {
        format!("tj{}n{}", self.tag, node + 1)
    }
    fn veth(&self, node: usize) -> String {
        format!("tj{}v{}", self.tag, node + 1)
    }
    fn ip(&self, node: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, node as u8 + 1)
    }

    fn create(nodes: usize, tag: String, nth: u32) -> Result<Self, String> {
        // A /24 no route on this host uses yet.
        let routes = output("ip", &["-4", "route", "show"])?;
        let seed = u32::from_str_radix(&tag, 16).unwrap_or(0) + nth;
        let subnet = (0..250u32)
            .map(|i| [10u8, 201, ((seed + i) % 250) as u8 + 1])
            .find(|[a, b, c]| !routes.contains(&format!("{a}.{b}.{c}.")))
            .ok_or("no free 10.201.x.0/24 subnet for the test network")?;
        let mut network = Self {
            tag,
            subnet,
            nodes: 0,
            host_rules: Vec::new(),
        };
        let bridge = network.bridge();
        let [a, b, c] = subnet;
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{a}.{b}.{c}.254/24"),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        // Docker sets the host's FORWARD policy to DROP; with br_netfilter that also drops
        // bridged frames between the namespaces. Let this bridge's own traffic through.
        let rule: Vec<String> = ["FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut insert = vec!["-I".to_owned()];
        insert.extend(rule.iter().cloned());
        if run_args("iptables", &insert).is_ok() {
            network.host_rules.push(rule);
        }
        for node in 0..nodes {
            let (ns, veth) = (network.namespace(node), network.veth(node));
            run("ip", &["netns", "add", &ns])?;
            network.nodes = node + 1;
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", &bridge, "up"])?;
            let ip = format!("{}/24", network.ip(node));
            run("ip", &["-n", &ns, "addr", "add", &ip, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    /// Drops every packet between the nodes of each pair (both directions).
    fn cut(&self, pairs: &[(usize, usize)]) -> Result<(), String> {
        for &(a, b) in pairs {
            for (here, there) in [(a, b), (b, a)] {
                let ns = self.namespace(here);
                let peer = self.ip(there).to_string();
                for (chain, flag) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                    run(
                        "ip",
                        &[
                            "netns", "exec", &ns, "iptables", "-A", chain, flag, &peer, "-j",
                            "DROP",
                        ],
                    )?;
                }
            }
        }
        Ok(())
    }

    fn heal(&self) -> Result<(), String> {
        for node in 0..self.nodes {
            let ns = self.namespace(node);
            for chain in ["INPUT", "OUTPUT"] {
                run("ip", &["netns", "exec", &ns, "iptables", "-F", chain])?;
            }
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for node in 0..self.nodes {
            let _ = run("ip", &["netns", "del", &self.namespace(node)]);
        }
        let _ = run("ip", &["link", "del", &self.bridge()]);
        for rule in &self.host_rules {
            let mut delete = vec!["-D".to_owned()];
            delete.extend(rule.iter().cloned());
            let _ = run_args("iptables", &delete);
        }
    }
}

struct Node {
    api: String,
    peer: String,
    config: PathBuf,
    log: PathBuf,
    /// The node's `TROUPE_FAILPOINTS_FILE`.
    failpoints: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// A running local cluster.
pub struct LocalCluster {
    bin: PathBuf,
    dir: PathBuf,
    keep_dir: bool,
    nodes: Vec<Node>,
    network: Option<Network>,
    tls: Arc<troupe_transport::rustls::ClientConfig>,
}

/// Whether this process can make network namespaces (root, and `ip` present).
pub fn can_partition() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("iptables")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

impl LocalCluster {
    /// Starts `count` nodes of `bin` under `dir` (created; removed on drop unless a check
    /// failed), forms the cluster and waits for a leader. `raft` adds lines to each node's
    /// `[raft]` section.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        count: usize,
        partitions: bool,
        raft: &str,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Clusters started at once in one process (tests) get different tags and subnets.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!(
            "{:04x}",
            (std::process::id() ^ nanos() ^ nth.wrapping_mul(0x9e37)) & 0xffff
        );
        let network = if partitions {
            Some(Network::create(count, tag, nth)?)
        } else {
            None
        };
        let hosts: Vec<String> = match &network {
            Some(net) => (0..count).map(|i| net.ip(i).to_string()).collect(),
            None => vec!["127.0.0.1".to_owned(); count],
        };
        let certs = dir.join("certs");
        let mut init = Command::new(bin);
        init.args(["certs", "init", "--out"])
            .arg(&certs)
            .args(["--nodes", &count.to_string()]);
        for host in hosts.iter().filter(|h| *h != "127.0.0.1") {
            init.args(["--host", host]);
        }
        run_command(&mut init)?;
        let tls = troupe_transport::ClientTls {
            ca: certs.join("ca.crt"),
            identity: Some((
                certs.join("client-admin.crt"),
                certs.join("client-admin.key"),
            )),
        }
        .config()
        .map_err(|e| format!("client TLS: {e}"))?;

        let mut nodes = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let (api, peer, metrics) = match network {
                Some(_) => (
                    format!("{host}:{API_PORT}"),
                    format!("{host}:{PEER_PORT}"),
                    format!("{host}:{METRICS_PORT}"),
                ),
                None => (free_port()?, free_port()?, free_port()?),
            };
            let config = dir.join(format!("n{}.toml", i + 1));
            let text = format!(
                "id = {id}\napi = \"{api}\"\npeer = \"{peer}\"\nmetrics = \"{metrics}\"\ndata_dir = \"{data}\"\n\n[tls]\ndir = \"{certs}\"\n\n[raft]\n{raft}\n",
                id = i + 1,
                data = dir.join(format!("n{}.data", i + 1)).display(),
                certs = certs.display(),
            );
            std::fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
            nodes.push(Node {
                api,
                peer,
                config,
                log: dir.join(format!("n{}.log", i + 1)),
                failpoints: dir.join(format!("n{}.failpoints", i + 1)),
                child: None,
                paused: false,
            });
        }
        let mut cluster = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            keep_dir: false,
            nodes,
            network,
            tls,
        };
        for i in 0..count {
            cluster.spawn(i)?;
        }
        let members = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Member {
                id: i as u64 + 1,
                peer_addr: n.peer.clone(),
                api_addr: n.api.clone(),
            })
            .collect();
        let first = cluster.client(0, Duration::from_secs(5))?;
        // The nodes may still be binding their ports.
        let last_error = std::sync::Mutex::new(String::new());
        crate::wait::until("cluster init", Duration::from_secs(30), || async {
            let request = ClusterInitRequest {
                members: Vec::clone(&members),
            };
            match first.admin().cluster_init(request).await {
                Ok(_) => Some(()),
                Err(status) => {
                    *last_error.lock().unwrap() = status.to_string();
                    None
                }
            }
        })
        .await
        .map_err(|e| format!("{e}: {}", last_error.lock().unwrap()))?;
        cluster.wait_converged(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Pushes the model directory `model_dir` to node 1 as `name` and activates it, waiting
    /// until every node serves it (`troupe models push`, `troupe models activate --wait`).
    pub fn serve_model(&self, model_dir: &Path, name: &str) -> Result<(), String> {
        let certs = self.dir.join("certs");
        let cli = |args: &[&str]| {
            let mut command = Command::new(&self.bin);
            command
                .args(args)
                .args(["--addr", &self.nodes[0].api, "--json"])
                .env("TROUPE_CA", certs.join("ca.crt"))
                .env("TROUPE_CERT", certs.join("client-admin.crt"))
                .env("TROUPE_KEY", certs.join("client-admin.key"));
            run_command(&mut command)
        };
        let dir = model_dir.to_string_lossy();
        let pushed = cli(&["models", "push", &dir, "--name", name, "--quiet"])?;
        let version = serde_json::from_str::<serde_json::Value>(pushed.trim())
            .ok()
            .and_then(|v| v["version"].as_str().map(str::to_owned))
            .ok_or_else(|| format!("troupe models push printed no version: {pushed}"))?;
        cli(&[
            "models",
            "activate",
            name,
            &version,
            "--wait",
            "--wait-timeout",
            "300",
        ])
        .map(drop)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn api_addr(&self, node: usize) -> &str {
        &self.nodes[node].api
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("{}: {e}", node.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = match &self.network {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.namespace(i)]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        command
            .arg("node")
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", "info")
            .env("TROUPE_FAILPOINTS_FILE", &node.failpoints)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    fn pid(&self, i: usize) -> Option<i32> {
        self.nodes[i].child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, i: usize, signal: i32) -> Result<(), String> {
        let pid = self
            .pid(i)
            .ok_or(format!("node {} is not running", i + 1))?;
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "signal {signal} to node {}: {}",
                i + 1,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Cluster for LocalCluster {
    fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn partitions(&self) -> bool {
        self.network.is_some()
    }

    fn client(&self, node: usize, timeout: Duration) -> Result<NodeClient, String> {
        NodeClient::new(&self.nodes[node].api, Some(self.tls.clone()), timeout)
    }

    fn is_up(&self, node: usize) -> bool {
        self.nodes[node].child.is_some() && !self.nodes[node].paused
    }

    /// kill -9 (the node's process, so `ip netns exec` has exec'd into it).
    fn kill(&mut self, i: usize) -> Result<(), String> {
        if self.nodes[i].paused {
            self.resume(i)?;
        }
        self.signal(i, libc::SIGKILL)?;
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts the node if it was killed or has exited on its own (a failed fsync stops it).
    fn restart(&mut self, i: usize) -> Result<(), String> {
        if let Some(child) = &mut self.nodes[i].child {
            match child.try_wait() {
                Ok(Some(_exited)) => self.nodes[i].child = None,
                _ => return Ok(()),
            }
        }
        self.spawn(i)
    }

    fn pause(&mut self, i: usize) -> Result<(), String> {
        self.signal(i, libc::SIGSTOP)?;
        self.nodes[i].paused = true;
        Ok(())
    }

    fn resume(&mut self, i: usize) -> Result<(), String> {
        if !self.nodes[i].paused {
            return Ok(());
        }
        self.signal(i, libc::SIGCONT)?;
        self.nodes[i].paused = false;
        Ok(())
    }

    fn partition(&mut self, pairs: &[(usize, usize)]) -> Result<(), String> {
        match &self.network {
            Some(net) => net.cut(pairs),
            None => {
                Err("partitions need network namespaces (run as root with ip and iptables)".into())
            }
        }
    }

    fn heal_network(&mut self) -> Result<(), String> {
        match &self.network {
            Some(net) => net.heal(),
            None => Ok(()),
        }
    }

    /// Keep the run directory (logs, data) after the cluster is dropped.
    fn keep(&mut self) {
        self.keep_dir = true;
    }

    fn failpoints(&self) -> bool {
        true
    }

    fn exited(&mut self, i: usize) -> bool {
        match &mut self.nodes[i].child {
            None => true,
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
        }
    }

    fn data_dir(&self, i: usize) -> Option<PathBuf> {
        Some(self.dir.join(format!("n{}.data", i + 1)))
    }

    /// Each node rereads its failpoint file within 50 ms; the file is replaced whole, so a
    /// node never reads half of it.
    fn set_failpoints(&mut self, i: usize, spec: &str) -> Result<(), String> {
        let path = &self.nodes[i].failpoints;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, spec)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // SAFETY: as in `signal`.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGCONT);
                    libc::kill(child.id() as i32, libc::SIGKILL);
                }
                let _ = child.wait();
            }
        }
        self.network.take();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

fn free_port() -> Result<String, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Ok(addr.to_string())
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    run_command(Command::new(program).args(args)).map(drop)
}

fn run_args(program: &str, args: &[String]) -> Result<(), String> {
    run_command(Command::new(program).args(args)).map(drop)
}

fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `command`; its stdout, or an error naming it with its stderr.
fn run_command(command: &mut Command) -> Result<String, String> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
