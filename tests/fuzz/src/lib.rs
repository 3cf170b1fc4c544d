//! Harnesses of skymesh's fuzz targets: one function per target, taking the
//! fuzzer's bytes. `fuzz_targets/*.rs` only hand libFuzzer's input to them, so
//! a crash reproduces with any driver that calls the same function, and the
//! seed generator (`examples/make_seeds.rs`) builds its inputs with the same
//! fixtures.
//!
//! Each harness asserts what must hold for every input, not only that nothing
//! panics: a decoded message re-encodes to itself, a packet the agent writes
//! to its TUN passed cryptokey routing, a normalised path is a fixed point.
//!
//! This crate is test code: it must not be a dependency of anything, and it
//! owns no behaviour of the crates it drives.

pub mod config;
pub mod control;
pub mod gateway;
pub mod node;
pub mod packet;

/// Splits `data` into length-prefixed chunks: a 2-byte big-endian length, then
/// that many bytes (fewer at the end). A simple framing libFuzzer's mutations
/// keep mostly intact, for targets that take a sequence of inputs.
pub fn chunks(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (chunk, tail) = rest.split_at(len.min(rest.len()));
        data = tail;
        Some(chunk)
    })
}

/// The inverse of [`chunks`], for seeds.
pub fn join_chunks<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        let len = u16::try_from(p.len()).expect("chunk under 64 KiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}
