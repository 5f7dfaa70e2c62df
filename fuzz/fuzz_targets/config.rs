//! Fuzz target: troupe_node::fuzz_entry::config (see node/src/fuzz_entry.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| troupe_node::fuzz_entry::config(data));
