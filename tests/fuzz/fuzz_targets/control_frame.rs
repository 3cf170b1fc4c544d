#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| skymesh_fuzz::control::control_frame(data));
