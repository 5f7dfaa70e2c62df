//! The compose tier: the nodes of a running docker-compose project (`scripts/compose-up.sh`),
//! hurt through the Docker engine as an operator's tools would hurt them:
//!
//! - kill: `docker kill` (SIGKILL), with the container's restart policy set aside until the
//!   heal (`docker start`), so the node stays down for the whole fault;
//! - pause: `docker pause` (the cgroup freezer), `docker unpause`;
//! - partitions: `docker network disconnect` from the project's network. Each group of nodes
//!   that can still talk (see [`crate::cluster::groups`]) gets a network of its own, on which
//!   each node keeps its service name as an alias. Members are service names resolved at each
//!   connect, so a node reaches exactly the nodes that share a network with it. A node is
//!   never left without a network: its published API port stays reachable from the host, so
//!   clients can still talk to an isolated leader, as they could in a real split.
//!
//! Everything this makes (side networks) is removed at the heal and on drop; the project's
//! containers are left running, healed.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::client::NodeClient;
use crate::cluster::{groups, Cluster};

/// Labels docker compose puts on what it makes.
const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";
/// On the side networks this run makes, so a crashed run's leftovers can be found.
const RUN_LABEL: &str = "troupe-jepsen";

struct Container {
    service: String,
    id: String,
    /// The restart policy it had, set aside while it is killed.
    restart_policy: String,
    killed: bool,
    paused: bool,
}

/// The containers of a compose project, their API addresses as published on the host, and
/// the TLS settings of an admin client.
pub struct ComposeCluster {
    project: String,
    network: String,
    containers: Vec<Container>,
    addrs: Vec<String>,
    tls: Arc<troupe_transport::rustls::ClientConfig>,
    /// Side networks made for the current partition.
    side_networks: Vec<String>,
    /// Nodes currently disconnected from the project's network.
    moved: Vec<usize>,
}

impl ComposeCluster {
    /// Attaches to project `project`: services `node1`..`nodeN` for the N addresses in
    /// `addrs` (their published API ports), on the project's network `network` (as named in
    /// docker-compose.yml). Leftovers of an earlier run that did not heal are healed first.
    pub fn attach(
        project: &str,
        network: &str,
        addrs: &[String],
        tls: &troupe_transport::ClientTls,
    ) -> Result<Self, String> {
        docker(&["version", "--format", "{{.Server.Version}}"])
            .map_err(|e| format!("no Docker engine: {e}"))?;
        let mut containers = Vec::new();
        for i in 1..=addrs.len() {
            let service = format!("node{i}");
            let ids = docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label={PROJECT_LABEL}={project}"),
                "--filter",
                &format!("label={SERVICE_LABEL}={service}"),
            ])?;
            let id = match ids.split_whitespace().collect::<Vec<_>>()[..] {
                [id] => id.to_owned(),
                [] => {
                    return Err(format!(
                        "compose project {project:?} has no container for service {service}: start the cluster with scripts/compose-up.sh (TROUPE_COMPOSE_PROJECT={project})"
                    ))
                }
                _ => {
                    return Err(format!(
                        "compose project {project:?} has several containers for service {service}: {ids}"
                    ))
                }
            };
            let restart_policy =
                docker(&["inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", &id])?;
            containers.push(Container {
                service,
                id,
                restart_policy: restart_policy.trim().to_owned(),
                killed: false,
                paused: false,
            });
        }
        let network = format!("{project}_{network}");
        docker(&["network", "inspect", "-f", "{{.Name}}", &network])
            .map_err(|e| format!("compose project {project:?} has no network {network:?}: {e}"))?;
        let tls = tls.config().map_err(|e| format!("client TLS: {e}"))?;
        let mut cluster = Self {
            project: project.to_owned(),
            network,
            containers,
            addrs: addrs.to_vec(),
            tls,
            side_networks: Vec::new(),
            moved: Vec::new(),
        };
        cluster.remove_leftovers()?;
        Ok(cluster)
    }

    fn side_network_name(&self, n: usize) -> String {
        format!("{}_jepsen{n}", self.project)
    }

    /// Side networks of an earlier run of this project that did not heal; its nodes go back
    /// on the project's network.
    fn remove_leftovers(&mut self) -> Result<(), String> {
        let names = docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label={RUN_LABEL}={}", self.project),
        ])?;
        self.side_networks = names.split_whitespace().map(str::to_owned).collect();
        self.moved = (0..self.containers.len())
            .filter(|&i| !self.on_network(i, &self.network))
            .collect();
        self.heal_network()
    }

    fn on_network(&self, node: usize, network: &str) -> bool {
        docker(&[
            "inspect",
            "-f",
            &format!("{{{{if index .NetworkSettings.Networks {network:?}}}}}yes{{{{end}}}}"),
            &self.containers[node].id,
        ])
        .is_ok_and(|out| out.trim() == "yes")
    }

    fn connect(&self, node: usize, network: &str) -> Result<(), String> {
        let container = &self.containers[node];
        docker(&[
            "network",
            "connect",
            "--alias",
            &container.service,
            network,
            &container.id,
        ])
        .map(drop)
    }
}

impl Cluster for ComposeCluster {
    fn node_count(&self) -> usize {
        self.containers.len()
    }

    fn partitions(&self) -> bool {
        true
    }

    fn client(&self, node: usize, timeout: Duration) -> Result<NodeClient, String> {
        NodeClient::new(&self.addrs[node], Some(self.tls.clone()), timeout)
    }

    fn is_up(&self, node: usize) -> bool {
        let c = &self.containers[node];
        !c.killed && !c.paused
    }

    fn kill(&mut self, node: usize) -> Result<(), String> {
        self.resume(node)?;
        let c = &self.containers[node];
        // The policy (unless-stopped) would start it again at once.
        docker(&["update", "--restart", "no", &c.id])?;
        docker(&["kill", "--signal", "KILL", &c.id])?;
        self.containers[node].killed = true;
        Ok(())
    }

    fn restart(&mut self, node: usize) -> Result<(), String> {
        let c = &self.containers[node];
        if !c.killed {
            return Ok(());
        }
        docker(&["start", &c.id])?;
        if !c.restart_policy.is_empty() {
            docker(&["update", "--restart", &c.restart_policy, &c.id])?;
        }
        self.containers[node].killed = false;
        Ok(())
    }

    fn pause(&mut self, node: usize) -> Result<(), String> {
        docker(&["pause", &self.containers[node].id])?;
        self.containers[node].paused = true;
        Ok(())
    }

    fn resume(&mut self, node: usize) -> Result<(), String> {
        if !self.containers[node].paused {
            return Ok(());
        }
        docker(&["unpause", &self.containers[node].id])?;
        self.containers[node].paused = false;
        Ok(())
    }

    fn partition(&mut self, pairs: &[(usize, usize)]) -> Result<(), String> {
        self.heal_network()?;
        let groups = groups(self.node_count(), pairs);
        // The largest group stays on the project's network; each other group gets its own.
        let stay = groups.first().cloned().unwrap_or_default();
        for (n, group) in groups.iter().enumerate().skip(1) {
            let name = self.side_network_name(n);
            docker(&[
                "network",
                "create",
                "--label",
                &format!("{RUN_LABEL}={}", self.project),
                &name,
            ])?;
            self.side_networks.push(name.clone());
            for &node in group {
                self.connect(node, &name)?;
            }
        }
        for node in (0..self.node_count()).filter(|n| !stay.contains(n)) {
            docker(&[
                "network",
                "disconnect",
                &self.network,
                &self.containers[node].id,
            ])?;
            self.moved.push(node);
        }
        Ok(())
    }

    fn heal_network(&mut self) -> Result<(), String> {
        for node in std::mem::take(&mut self.moved) {
            if !self.on_network(node, &self.network) {
                self.connect(node, &self.network)?;
            }
        }
        for name in std::mem::take(&mut self.side_networks) {
            for c in &self.containers {
                // Not connected is fine: the container may not be on this one.
                let _ = docker(&["network", "disconnect", "--force", &name, &c.id]);
            }
            docker(&["network", "rm", &name])?;
        }
        Ok(())
    }

    /// The containers and their logs stay either way; nothing to do.
    fn keep(&mut self) {}
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if let Err(e) = self.heal_all() {
            eprintln!(
                "troupe-jepsen: could not heal compose project {:?}: {e}",
                self.project
            );
        }
    }
}

/// Runs `docker ARGS`; its stdout, or an error with its stderr.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
