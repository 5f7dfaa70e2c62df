//! Fuzz target: troupe::fuzz_entry::raft_payload (see node/src/fuzz_entry.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| troupe::fuzz_entry::raft_payload(data));
