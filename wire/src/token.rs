//! The join token an operator hands to a new gateway: self-contained, so that
//! `skymesh-agent join TOKEN` needs nothing else to find, authenticate and enroll
//! with the controller.
//!
//! Text form: `skymesh-join-1.` followed by unpadded base64url of a JSON object
//! with the controller endpoints, the SHA-256 fingerprint of the controller's CA
//! certificate (the pin) and the token's id and secret. The controller keeps only
//! a hash of the secret.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "skymesh-join-1.";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Control endpoints, `host:port` (QUIC, UDP).
    pub controllers: Vec<String>,
    /// Lower-case hex SHA-256 of the CA certificate's DER encoding.
    pub ca_sha256: String,
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("controllers", &self.controllers)
            .field("ca_sha256", &self.ca_sha256)
            .field("id", &self.id)
            .field("secret", &"***")
            .finish()
    }
}

/// Why a string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a skymesh join token: it must start with {PREFIX:?} (copy the whole line `skymeshctl join-token create` printed)")]
    Prefix,
    #[error("the join token is damaged ({0}); copy the whole line `skymeshctl join-token create` printed")]
    Damaged(String),
    #[error("the join token names no controller endpoint")]
    NoController,
    #[error("the join token's CA fingerprint {0:?} is not 64 hex digits")]
    Fingerprint(String),
}

impl JoinToken {
    pub fn encode(&self) -> String {
        // Serializing a struct of strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TokenError::Damaged(e.to_string()))?;
        let token: JoinToken =
            serde_json::from_slice(&json).map_err(|e| TokenError::Damaged(e.to_string()))?;
        if token.controllers.is_empty() {
            return Err(TokenError::NoController);
        }
        if token.ca_sha256.len() != 64
            || !token
                .ca_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::Fingerprint(token.ca_sha256));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            controllers: vec!["203.0.113.2:7443".into()],
            ca_sha256: "ab".repeat(32),
            id: "t-1".into(),
            secret: "very-secret".into(),
        }
    }

    #[test]
    fn round_trip_and_golden_prefix() {
        let text = token().encode();
        assert!(
            text.starts_with("skymesh-join-1.eyJjb250cm9sbGVycyI6"),
            "{text}"
        );
        assert_eq!(JoinToken::decode(&text).expect("decode"), token());
        // Surrounding whitespace from a file or a shell is fine.
        assert_eq!(
            JoinToken::decode(&format!("  {text}\n")).expect("decode"),
            token()
        );
    }

    #[test]
    fn bad_tokens_say_what_is_wrong() {
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::Prefix));
        let text = token().encode();
        let cut = &text[..text.len() - 7];
        assert!(matches!(
            JoinToken::decode(cut),
            Err(TokenError::Damaged(_))
        ));
        let mut t = token();
        t.ca_sha256 = "xyz".into();
        assert!(matches!(
            JoinToken::decode(&t.encode()),
            Err(TokenError::Fingerprint(_))
        ));
        let mut t = token();
        t.controllers.clear();
        assert_eq!(
            JoinToken::decode(&t.encode()),
            Err(TokenError::NoController)
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", token()).contains("very-secret"));
    }
}
