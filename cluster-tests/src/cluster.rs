//! What the runner needs of a cluster, whatever runs it: clients for each node, and the
//! faults. [`crate::local::LocalCluster`] runs `troupe node` processes on this machine;
//! [`crate::compose::ComposeCluster`] drives the containers of a docker-compose project.

use std::time::Duration;

use crate::client::NodeClient;

/// A cluster the nemesis can hurt. Nodes are 0-based indexes. Every fault has its heal, and a
/// heal of a node that is not hurt does nothing.
#[allow(async_fn_in_trait)] // used generically inside this crate only
pub trait Cluster {
    /// How many nodes.
    fn node_count(&self) -> usize;

    /// Whether [`Cluster::partition`] can cut links.
    fn partitions(&self) -> bool;

    /// A client of node `node`'s API whose requests wait at most `timeout`.
    fn client(&self, node: usize, timeout: Duration) -> Result<NodeClient, String>;

    /// Whether node `node` runs, unpaused (it can answer).
    fn is_up(&self, node: usize) -> bool;

    /// Kills the node at once (SIGKILL: no shutdown, no flush).
    fn kill(&mut self, node: usize) -> Result<(), String>;
    /// Starts a killed node again on its data.
    fn restart(&mut self, node: usize) -> Result<(), String>;
    /// Freezes the node (SIGSTOP, or the cgroup freezer).
    fn pause(&mut self, node: usize) -> Result<(), String>;
    fn resume(&mut self, node: usize) -> Result<(), String>;
    /// Cuts the link between the nodes of each pair, both ways; all other links work.
    fn partition(&mut self, pairs: &[(usize, usize)]) -> Result<(), String>;
    fn heal_network(&mut self) -> Result<(), String>;

    /// Keep what the run leaves (data, logs) for a look after a failed check.
    fn keep(&mut self);

    /// Whether the node's process has ended (killed, or exited on its own).
    fn exited(&mut self, node: usize) -> bool {
        !self.is_up(node)
    }

    /// The node's data dir on this machine, if the runner can read it while the node is down.
    fn data_dir(&self, node: usize) -> Option<std::path::PathBuf> {
        let _ = node;
        None
    }

    /// Whether [`Cluster::set_failpoints`] works here.
    fn failpoints(&self) -> bool {
        false
    }

    /// Replaces node `node`'s failpoints with `spec` (troupe-failpoints' grammar; "" clears
    /// them).
    fn set_failpoints(&mut self, node: usize, spec: &str) -> Result<(), String> {
        let _ = spec;
        Err(format!(
            "node {}: this tier cannot set failpoints",
            node + 1
        ))
    }

    /// Heals everything: the network, paused nodes, killed nodes.
    fn heal_all(&mut self) -> Result<(), String> {
        self.heal_network()?;
        for node in 0..self.node_count() {
            self.resume(node)?;
            self.restart(node)?;
        }
        Ok(())
    }

    /// Waits until every node answers, names the same leader, and has applied the same
    /// revision; returns that revision.
    async fn wait_converged(&self, timeout: Duration) -> Result<u64, String> {
        let clients: Vec<NodeClient> = (0..self.node_count())
            .map(|i| self.client(i, Duration::from_secs(1)))
            .collect::<Result<_, _>>()?;
        let last = std::sync::Mutex::new(String::new());
        crate::wait::until("the cluster to converge", timeout, || async {
            let mut views = Vec::new();
            for client in &clients {
                match client.status().await {
                    Ok(view) => views.push(view),
                    Err(e) => {
                        *last.lock().unwrap() = format!("{}: {e}", client.addr);
                        return None;
                    }
                }
            }
            let (leader, revision) = (views[0].leader, views[0].applied_revision);
            let converged = leader.is_some()
                && views
                    .iter()
                    .all(|v| v.leader == leader && v.applied_revision == revision);
            if !converged {
                *last.lock().unwrap() = format!("{views:?}");
            }
            converged.then_some(revision)
        })
        .await
        .map_err(|e| format!("{e}: {}", last.lock().unwrap()))
    }

    /// The leader named by the first node that answers, as a 0-based index.
    async fn leader(&self) -> Option<usize> {
        for i in (0..self.node_count()).filter(|&i| self.is_up(i)) {
            let Ok(client) = self.client(i, Duration::from_millis(500)) else {
                continue;
            };
            if let Ok(view) = client.status().await {
                if let Some(leader) = view.leader {
                    return Some(leader as usize - 1);
                }
            }
        }
        None
    }
}

/// The groups of nodes that can all talk to each other when the `cut` pairs cannot: the
/// maximal cliques of the graph of links left, so every link left is inside some group and no
/// group holds a cut pair. An isolated node is a group of its own. Largest groups first.
pub fn groups(nodes: usize, cut: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let linked = |a: usize, b: usize| {
        a != b
            && !cut
                .iter()
                .any(|&(x, y)| (x, y) == (a, b) || (y, x) == (a, b))
    };
    // Bron–Kerbosch without pivoting: clusters are a handful of nodes.
    fn extend(
        r: Vec<usize>,
        p: Vec<usize>,
        mut x: Vec<usize>,
        linked: &dyn Fn(usize, usize) -> bool,
        out: &mut Vec<Vec<usize>>,
    ) {
        if p.is_empty() && x.is_empty() {
            out.push(r);
            return;
        }
        let mut p = p;
        while let Some(v) = p.first().copied() {
            let mut r2 = r.clone();
            r2.push(v);
            let p2 = p.iter().copied().filter(|&u| linked(u, v)).collect();
            let x2 = x.iter().copied().filter(|&u| linked(u, v)).collect();
            extend(r2, p2, x2, linked, out);
            p.remove(0);
            x.push(v);
        }
    }
    let mut out = Vec::new();
    extend(
        Vec::new(),
        (0..nodes).collect(),
        Vec::new(),
        &linked,
        &mut out,
    );
    for group in &mut out {
        group.sort_unstable();
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_cover_every_link_left_and_no_cut_one() {
        // Nothing cut: one group.
        assert_eq!(groups(3, &[]), vec![vec![0, 1, 2]]);
        // Node 0 isolated.
        assert_eq!(groups(3, &[(0, 1), (0, 2)]), vec![vec![1, 2], vec![0]]);
        // A bridge: 1 and 2 cannot talk, 0 sees both.
        assert_eq!(groups(3, &[(2, 1)]), vec![vec![0, 1], vec![0, 2]]);
        // A minority of 2 in 5.
        let cut: Vec<_> = [0, 1]
            .iter()
            .flat_map(|&a| [2, 3, 4].map(|b| (a, b)))
            .collect();
        assert_eq!(groups(5, &cut), vec![vec![2, 3, 4], vec![0, 1]]);
        // Every pair cut: each node alone.
        let all: Vec<_> = (0..4)
            .flat_map(|a| (a + 1..4).map(move |b| (a, b)))
            .collect();
        assert_eq!(groups(4, &all), vec![vec![0], vec![1], vec![2], vec![3]]);
    }
}
