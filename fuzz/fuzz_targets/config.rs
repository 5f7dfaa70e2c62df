//! Fuzz target: troupe::fuzz_entry::config (see node/src/fuzz_entry.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| troupe::fuzz_entry::config(data));
