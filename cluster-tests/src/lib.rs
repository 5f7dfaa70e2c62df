//! troupe-cluster-tests: what multi-node tests share.
//!
//! - [`history`]: a linearizability checker for register histories (write, read,
//!   compare-and-set) recorded by clients of a cluster under faults.
//! - [`wait`]: waiting on a condition with a deadline, never a fixed sleep.
//!
//! The in-process N-node sandbox and the docker tier join this crate with the consensus
//! and cluster issues.

pub mod history;
pub mod wait;
