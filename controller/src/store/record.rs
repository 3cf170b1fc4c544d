//! The checksummed envelope every backend wraps a stored record in, so damage to the bytes at
//! rest (a flipped bit, a torn or overwritten page) is detected when the record is read instead of
//! being decoded as a different, plausible value.
//!
//! Layout: `version (1 byte) ++ payload ++ CRC-32 (4 bytes, big endian)`, where the CRC covers the
//! key's length and bytes, the version and the payload. Covering the key means a record that moved
//! to another key (a flipped bit in the key) fails too. CRC-32 detects every single-bit flip and
//! every burst of up to 32 bits, which a truncated cryptographic hash would only make unlikely.
//!
//! Owns the envelope only: what the payload holds (revisions, the value) is the backend's.

/// Envelope version of this layout; a record with any other first byte is refused.
pub(crate) const VERSION: u8 = 1;
/// Bytes the envelope adds around the payload.
pub(crate) const OVERHEAD: usize = 1 + 4;

/// Why a record failed its envelope check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("{len} bytes, shorter than the {OVERHEAD}-byte envelope")]
    TooShort { len: usize },
    #[error("unknown envelope version {0} (this controller writes version {VERSION})")]
    UnknownVersion(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
}

/// Wraps `payload` for storage under `key`.
pub(crate) fn seal(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(payload.len() + OVERHEAD);
    record.push(VERSION);
    record.extend_from_slice(payload);
    let crc = checksum(key, &record);
    record.extend_from_slice(&crc.to_be_bytes());
    record
}

/// The payload of a record stored under `key`, or why it cannot be trusted.
pub(crate) fn open<'a>(key: &str, record: &'a [u8]) -> Result<&'a [u8], Damage> {
    if record.len() < OVERHEAD {
        return Err(Damage::TooShort { len: record.len() });
    }
    let (body, stored) = record.split_at(record.len() - 4);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(stored);
    let stored = u32::from_be_bytes(crc);
    let computed = checksum(key, body);
    if stored != computed {
        return Err(Damage::Checksum { stored, computed });
    }
    match body.split_first() {
        Some((&VERSION, payload)) => Ok(payload),
        Some((&other, _)) => Err(Damage::UnknownVersion(other)),
        None => Err(Damage::TooShort { len: record.len() }),
    }
}

fn checksum(key: &str, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    // The length first, so moving bytes between the key and the body changes the sum too.
    hasher.update(&(key.len() as u64).to_be_bytes());
    hasher.update(key.as_bytes());
    hasher.update(body);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_to_its_payload() {
        let record = seal("/skymesh/tokens/abc", b"payload");
        assert_eq!(record.len(), 7 + OVERHEAD);
        assert_eq!(open("/skymesh/tokens/abc", &record), Ok(&b"payload"[..]));
        assert_eq!(open("/k", &seal("/k", b"")), Ok(&b""[..]));
    }

    #[test]
    fn every_single_bit_flip_anywhere_in_the_record_is_detected() {
        let key = "/skymesh/tokens/0123456789abcdef";
        let record = seal(key, br#"{"id":"0123456789abcdef","name":"aws-gw"}"#);
        for bit in 0..record.len() * 8 {
            let mut flipped = record.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                open(key, &flipped).is_err(),
                "bit {bit} flipped went undetected"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_in_the_key_is_detected() {
        let key = "/skymesh/tokens/0123456789abcdef";
        let record = seal(key, b"value");
        for bit in 0..key.len() * 8 {
            let mut other = key.as_bytes().to_vec();
            other[bit / 8] ^= 1 << (bit % 8);
            // A flip that leaves UTF-8 could not be a key at all; the rest must fail the check.
            if let Ok(other) = String::from_utf8(other) {
                assert!(open(&other, &record).is_err(), "key bit {bit} undetected");
            }
        }
    }

    #[test]
    fn short_records_and_unknown_versions_are_refused() {
        assert_eq!(open("/k", &[]), Err(Damage::TooShort { len: 0 }));
        assert_eq!(open("/k", &[1, 2, 3]), Err(Damage::TooShort { len: 3 }));
        // A well-formed envelope of a version this controller does not know.
        let mut record = vec![VERSION + 1, b'x'];
        let crc = checksum("/k", &record);
        record.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            open("/k", &record),
            Err(Damage::UnknownVersion(VERSION + 1))
        );
    }
}
