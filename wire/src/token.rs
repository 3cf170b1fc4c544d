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
    /// A controller endpoint no agent can ever dial; retrying cannot help.
    #[error("the join token's controller endpoint {value:?} {problem}; create a token with the controller's reachable address (`skymeshctl join-token create`)")]
    Controller {
        value: String,
        problem: &'static str,
    },
}

/// Checks that `addr`, a token's `host:port`, could ever be dialled: a port other
/// than 0, and an IP address (when it is one) that names a single reachable host,
/// not "any" (0.0.0.0, ::), broadcast or multicast. A host name is left to DNS,
/// which may change, so only its port is checked.
pub fn check_controller(addr: &str) -> Result<(), TokenError> {
    let refuse = |problem| {
        Err(TokenError::Controller {
            value: addr.to_string(),
            problem,
        })
    };
    if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
        let ip = sock.ip();
        if sock.port() == 0 {
            return refuse("has port 0, which cannot be dialled");
        }
        if ip.is_unspecified() {
            return refuse("is the unspecified address (\"any\"), which names no host");
        }
        if ip.is_multicast() {
            return refuse("is a multicast address, not one controller");
        }
        if ip == std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
            return refuse("is the broadcast address, not one controller");
        }
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            match port.parse::<u16>() {
                Ok(0) => refuse("has port 0, which cannot be dialled"),
                Ok(_) => Ok(()),
                Err(_) => refuse("has no valid port (want host:port, port 1-65535)"),
            }
        }
        _ => refuse("is not host:port (want e.g. 203.0.113.2:7443 or [2001:db8::1]:7443)"),
    }
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
        for c in &token.controllers {
            check_controller(c)?;
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
    fn controllers_that_can_never_be_dialled_are_refused() {
        for bad in [
            "0.0.0.0:0",
            "0.0.0.0:7443",
            "[::]:7443",
            "255.255.255.255:1",
            "224.0.0.1:7443",
            "[ff02::1]:7443",
            "203.0.113.2:0",
            "controller.example:0",
            "controller.example",
            "controller.example:http",
        ] {
            let mut t = token();
            t.controllers = vec!["203.0.113.2:7443".into(), bad.into()];
            match JoinToken::decode(&t.encode()) {
                Err(e @ TokenError::Controller { .. }) => {
                    assert!(e.to_string().contains(bad), "{e}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        for good in [
            "203.0.113.2:7443",
            "[2001:db8::1]:7443",
            "controller.example:7443",
        ] {
            let mut t = token();
            t.controllers = vec![good.into()];
            assert!(JoinToken::decode(&t.encode()).is_ok(), "{good}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        assert!(!format!("{:?}", token()).contains("very-secret"));
    }
}
