#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| skymesh_fuzz::node::node_inner(data));
