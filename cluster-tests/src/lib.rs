//! troupe-cluster-tests: the fault tier.
//!
//! - [`history`]: a linearizability checker for register histories (write, read,
//!   compare-and-set) recorded by clients of a cluster under faults.
//! - [`client`]: the register client over the Admin API, and how its answers are sorted into
//!   definite and unknown outcomes.
//! - [`cluster`]: what the runner needs of a cluster, whatever runs it.
//! - [`local`]: a cluster of real `troupe node` processes, each in a network namespace of its
//!   own (when run as root), that can be killed, paused and partitioned.
//! - [`compose`]: the containers of a docker-compose project, hurt with `docker kill`,
//!   `docker pause` and `docker network disconnect`.
//! - [`crash`]: crash durability: what a killed node holds on disk, and what must never go
//!   back between crashes.
//! - [`runner`]: one run: the workload, a nemesis on a seeded schedule, and the checks.
//! - [`wait`]: waiting on a condition with a deadline, never a fixed sleep.
//!
//! `troupe-jepsen` (src/main.rs) is the command line over these.

pub mod client;
pub mod cluster;
pub mod compose;
pub mod crash;
pub mod history;
pub mod local;
pub mod runner;
pub use troupe_wait as wait;
