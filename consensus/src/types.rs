//! openraft's type configuration for troupe: what a node is, what the log carries.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::metadata::{Outcome, ProposalBatch};

pub type NodeId = u64;

/// How to reach a node: its public API and its peer (Raft, blobs, forwarding) address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddr {
    pub api_addr: String,
    pub peer_addr: String,
}

impl NodeAddr {
    /// Checks an address other nodes and clients dial: `HOST:PORT`, where HOST is an IPv4
    /// address, a bracketed IPv6 address (`[::1]:7701`) or a DNS name (`node2:7701`, resolved
    /// at each connect, so a node whose IP changes keeps its name), and PORT is 1..=65535.
    /// The error says what is wrong, for the caller to name the field.
    pub fn check_dialable(addr: &str) -> Result<(), String> {
        if addr.parse::<std::net::SocketAddr>().is_ok() {
            return if addr.ends_with(":0") {
                Err(format!("{addr:?} has port 0, which no one can dial"))
            } else {
                Ok(())
            };
        }
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(format!("{addr:?} is not HOST:PORT"));
        };
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(format!("{addr:?} has no valid port (1 to 65535)"));
        }
        // Underscores are not in RFC 1123 host names, but resolvers answer them, and Docker
        // network names (`project_default`) carry them.
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.trim_end_matches('.').split('.').all(label_ok)
            // All-digit dotted names are malformed IPv4 addresses, not names.
            && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        if host_ok {
            Ok(())
        } else {
            Err(format!(
                "{addr:?}: {host:?} is not an IP address or a host name (IPv6 goes in brackets: [::1]:7701)"
            ))
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "api={} peer={}", self.api_addr, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// troupe's Raft: a batch of metadata proposals per entry in, one outcome per proposal out.
    pub TypeConfig:
        D = ProposalBatch,
        R = Vec<Outcome>,
        NodeId = NodeId,
        Node = NodeAddr,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddr>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddr>;
pub type Vote = openraft::Vote<NodeId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialable_addresses_are_ip_or_host_name_and_port() {
        for good in [
            "127.0.0.1:7701",
            "[::1]:7701",
            "node2:7701",
            "troupe-node-2.troupe_default:7701",
            "node2.:7701",
        ] {
            assert_eq!(NodeAddr::check_dialable(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "node2",
            "node2:",
            "node2:0",
            "127.0.0.1:0",
            "node2:70000",
            ":7701",
            "no de:7701",
            "-node:7701",
            "a..b:7701",
            "::1:7701",
            "300.1.1.1:7701",
            "http://node2:7701",
        ] {
            assert!(NodeAddr::check_dialable(bad).is_err(), "{bad:?}");
        }
    }
}
