//! WireGuard key handling: generation, derivation and the private key as a secret
//! type. Output is byte-for-byte what `wg genkey` / `wg pubkey` print.

use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
use rand::RngCore;
use skymesh_wire::key::{decode_key, encode_key};
use skymesh_wire::{KeyError, PublicKey};
use std::fmt;

/// A static private key. Never printed: `Debug` shows `***`.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A fresh key from the OS RNG, clamped exactly as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(clamp(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// Parses the base64 text of a key file (surrounding whitespace allowed).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(Self::from_bytes)
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(XPublic::from(&self.0).to_bytes())
    }

    /// The base64 text `wg genkey` would print for this key (without newline).
    pub fn to_base64(&self) -> String {
        encode_key(&self.0.to_bytes())
    }

    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(***)")
    }
}

/// Curve25519 clamping, as `wg genkey` applies it before printing.
fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubkey_matches_known_vector() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let private =
            PrivateKey::from_base64("dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=").expect("key");
        assert_eq!(
            private.public_key().to_string(),
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a.to_base64(), b.to_base64());
        let bytes = decode_key(&a.to_base64()).expect("round trip");
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xC0, 0x40);
        assert_eq!(format!("{a:?}"), "PrivateKey(***)");
    }
}
