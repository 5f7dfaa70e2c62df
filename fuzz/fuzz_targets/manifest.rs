//! Fuzz target: troupe_node::fuzz_entry::manifest (see node/src/fuzz_entry.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| troupe_node::fuzz_entry::manifest(data));
