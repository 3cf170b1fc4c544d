//! Reading what an operator points the agent at (the config, a key, a join token, the
//! daemon's status answer) with a size cap, so that `--config /dev/zero` or a huge
//! file is refused instead of growing memory until the OOM killer. The one place
//! the agent reads a whole input into memory; it never writes.

use std::io::Read;
use std::path::Path;

/// The largest config file read (1 MiB; a real one is a few KiB).
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// The largest private key or join token read (64 KiB; a real one is under 1 KiB).
pub const SECRET_LIMIT: u64 = 64 << 10;
/// The largest cached netmap read from the state dir (64 MiB; 10,000 peers take
/// a few MiB).
pub const CACHE_LIMIT: u64 = 64 << 20;
/// The largest `status` answer read from the admin socket (16 MiB).
pub const STATUS_LIMIT: u64 = 16 << 20;

/// Reads `reader` to its end as UTF-8, refusing more than `limit` bytes. The error
/// says the limit; the caller names the input.
pub fn read_to_string(reader: impl Read, limit: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    into_string(bytes, limit)
}

/// Opens and reads the file at `path`, refusing more than `limit` bytes.
pub fn read_file(path: &Path, limit: u64) -> std::io::Result<String> {
    read_to_string(std::fs::File::open(path)?, limit)
}

/// Checks what a `take(limit + 1)` read returned: over `limit` bytes, or not
/// UTF-8, is an error.
pub fn into_string(bytes: Vec<u8>, limit: u64) -> std::io::Result<String> {
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the limit of {limit} bytes; is this the right file?"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_an_endless_input_at_the_limit() {
        let err = read_to_string(std::io::repeat(0), 100).expect_err("endless input read");
        assert!(err.to_string().contains("limit of 100 bytes"), "{err}");
        assert_eq!(read_to_string(&b"abc"[..], 3).expect("at the limit"), "abc");
        assert!(read_to_string(&b"abcd"[..], 3).is_err());
    }
}
