//! The allowed range of every numeric and duration field of the API's request
//! bodies, and the one check of each. The handlers take these types, the
//! OpenAPI document states the same bounds from these constants, and
//! `skymeshctl` checks its flags with the same functions before sending, so the
//! three cannot drift apart.
//!
//! Each type checks its range while it is deserialized: a body whose field is out
//! of range never reaches a handler, and the refusal names the field (serde's
//! path), the value and the allowed range.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Shortest join-token lifetime.
pub const TTL_MIN_SECS: u64 = 1;
/// Longest join-token lifetime: a year. A token that should outlive that is a
/// standing credential; create it with `"never"` so that it is visibly one.
pub const TTL_MAX_SECS: u64 = 365 * DAY;
/// Largest `weight_ms` of a link override: an hour, far above any real cost,
/// so that sums of costs stay finite and comparable.
pub const WEIGHT_MS_MAX: f64 = 3_600_000.0;
/// Longest prefix length of any address family (IPv6).
pub const PREFIX_LEN_MAX: u8 = 128;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
/// The units a TTL may use, longest first, with their length in seconds.
const TTL_UNITS: [(char, u64); 4] = [('d', DAY), ('h', HOUR), ('m', MINUTE), ('s', 1)];

/// Why a TTL was refused. The text names the value and the allowed range; the
/// caller names the field (`ttl`, `--ttl`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error(
        "{0} is not a lifetime: expected a whole number with a unit s, m, h or d, \
         from 1s to 365d (e.g. \"24h\", \"30m\", \"7d\"), or \"never\""
    )]
    Syntax(String),
    #[error(
        "{0} is out of range: a join token lives from 1s to 365d (31536000 s); \
         use \"never\" for a token that does not expire"
    )]
    Range(String),
}

/// Parses a join token's lifetime: `"never"` (`None`) or a whole number without
/// leading zeros followed by one unit `s`, `m`, `h` or `d`, from 1s to 365d.
/// Exactly the strings [`ttl_pattern`] matches.
pub fn parse_ttl(text: &str) -> Result<Option<u64>, TtlError> {
    if text == "never" {
        return Ok(None);
    }
    let syntax = || TtlError::Syntax(format!("{text:?}"));
    let mut chars = text.chars();
    let unit = chars.next_back().ok_or_else(syntax)?;
    let digits = chars.as_str();
    let &(_, unit_secs) = TTL_UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .ok_or_else(syntax)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return Err(syntax());
    }
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_secs))
        .filter(|s| (TTL_MIN_SECS..=TTL_MAX_SECS).contains(s))
        .ok_or_else(|| TtlError::Range(format!("{text:?}")))?;
    Ok(Some(secs))
}

/// The regular expression (ECMA-262, as OpenAPI uses) of exactly the strings
/// [`parse_ttl`] accepts: each unit's count is bounded by 365 days.
pub fn ttl_pattern() -> String {
    let units: Vec<String> = TTL_UNITS
        .iter()
        .map(|&(unit, secs)| format!("{}{unit}", range_regex(TTL_MAX_SECS / secs)))
        .collect();
    format!("^(never|{})$", units.join("|"))
}

/// A regular expression of the decimal numbers 1..=max without leading zeros.
fn range_regex(max: u64) -> String {
    let digits: Vec<u8> = max.to_string().bytes().map(|b| b - b'0').collect();
    let n = digits.len();
    let mut alts = Vec::new();
    // Every number with fewer digits than max.
    if n > 1 {
        alts.push(format!("[1-9][0-9]{{0,{}}}", n - 2));
    }
    // Same length as max: equal on a prefix, smaller at one digit, anything after.
    for i in 0..n {
        let lowest = if i == 0 { 1 } else { 0 };
        if digits[i] > lowest {
            let prefix: String = digits[..i].iter().map(|d| d.to_string()).collect();
            let rest = n - i - 1;
            let class = if digits[i] - 1 == lowest {
                lowest.to_string()
            } else {
                format!("[{lowest}-{}]", digits[i] - 1)
            };
            let tail = match rest {
                0 => String::new(),
                1 => "[0-9]".to_string(),
                r => format!("[0-9]{{{r}}}"),
            };
            alts.push(format!("{prefix}{class}{tail}"));
        }
    }
    alts.push(max.to_string());
    format!("({})", alts.join("|"))
}

/// A join token's lifetime in a request body; `None` never expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub Option<u64>);

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => parse_ttl(&s).map(Ttl).map_err(D::Error::custom),
            other => Err(D::Error::custom(TtlError::Syntax(other.to_string()))),
        }
    }
}

/// A prefix length, 0 to [`PREFIX_LEN_MAX`]; whether it fits the address
/// family and range is the handler's question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLen(pub u8);

impl PrefixLen {
    /// The check, for a body's JSON value or a CLI flag's text read as JSON.
    pub fn check(v: &Value) -> Result<Self, String> {
        v.as_u64()
            .filter(|n| *n <= u64::from(PREFIX_LEN_MAX))
            .and_then(|n| u8::try_from(n).ok())
            .map(PrefixLen)
            .ok_or_else(|| {
                format!("{v} is out of range: expected a whole number from 0 to {PREFIX_LEN_MAX}")
            })
    }
}

impl<'de> Deserialize<'de> for PrefixLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::check(&Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A link's weight in milliseconds, 0 to [`WEIGHT_MS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightMs(pub f64);

impl WeightMs {
    /// The check, for a body's JSON value or a CLI flag's text read as JSON.
    pub fn check(v: &Value) -> Result<Self, String> {
        v.as_f64()
            .filter(|w| w.is_finite() && (0.0..=WEIGHT_MS_MAX).contains(w))
            .map(WeightMs)
            .ok_or_else(|| {
                format!(
                    "{v} is out of range: expected milliseconds from 0 to {WEIGHT_MS_MAX}, e.g. 40"
                )
            })
    }
}

impl<'de> Deserialize<'de> for WeightMs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::check(&Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// Reads a CLI flag's text as the JSON value the API would get, and checks it
/// with `check`: `skymeshctl` refuses what the API would, before sending.
pub fn check_flag<T>(text: &str, check: impl Fn(&Value) -> Result<T, String>) -> Result<T, String> {
    let v: Value = serde_json::from_str(text).map_err(|_| format!("{text:?} is not a number"))?;
    check(&v)
}

/// The shape of an IPv4 or IPv6 prefix, which [`CidrText`] checks; whether it
/// is a prefix is the handler's question (a 422).
pub const CIDR_PATTERN: &str = "^[0-9A-Fa-f:.]{2,45}/[0-9]{1,3}$";
/// The longest string [`CIDR_PATTERN`] matches.
pub const CIDR_MAX_LEN: usize = 45 + 1 + 3;

/// A prefix in a request body, of the shape [`CIDR_PATTERN`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrText(pub String);

impl CidrText {
    fn has_shape(s: &str) -> bool {
        let Some((addr, len)) = s.split_once('/') else {
            return false;
        };
        (2..=45).contains(&addr.len())
            && addr
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && (1..=3).contains(&len.len())
            && len.bytes().all(|b| b.is_ascii_digit())
    }
}

impl<'de> Deserialize<'de> for CidrText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v.as_str() {
            Some(s) if Self::has_shape(s) => Ok(CidrText(s.to_string())),
            _ => Err(D::Error::custom(format!(
                "{v} is not a CIDR prefix: expected e.g. \"10.0.0.0/16\" or \"fd00:1::/48\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        for (text, want) in [
            ("never", Ok(None)),
            ("1s", Ok(Some(1))),
            ("365d", Ok(Some(TTL_MAX_SECS))),
            ("8760h", Ok(Some(TTL_MAX_SECS))),
            ("525600m", Ok(Some(TTL_MAX_SECS))),
            ("31536000s", Ok(Some(TTL_MAX_SECS))),
            ("24h", Ok(Some(86_400))),
        ] {
            assert_eq!(parse_ttl(text), want, "{text}");
        }
        for text in [
            "", "0s", "0", "-1s", "1.5h", "07d", "1h30m", "1 h", "8000y", "d", "never ", "1S",
        ] {
            assert!(
                matches!(parse_ttl(text), Err(TtlError::Syntax(_))),
                "{text}"
            );
        }
        for text in [
            "366d",
            "8761h",
            "525601m",
            "31536001s",
            "18446744073709551615s",
            "18446744073709551616s",
            "99999999999999999999999d",
        ] {
            assert!(matches!(parse_ttl(text), Err(TtlError::Range(_))), "{text}");
        }
    }

    #[test]
    fn range_regex_spells_the_range() {
        assert_eq!(
            range_regex(365),
            "([1-9][0-9]{0,1}|[1-2][0-9]{2}|3[0-5][0-9]|36[0-4]|365)"
        );
        assert_eq!(range_regex(9), "([1-8]|9)");
        assert_eq!(range_regex(10), "([1-9][0-9]{0,0}|10)");
    }

    #[test]
    fn cidr_shape() {
        for ok in ["10.0.0.0/16", "fd00:1::/48", "::/0", "10.0.0.1/999", "aa/1"] {
            assert!(CidrText::has_shape(ok), "{ok}");
        }
        for bad in [
            "banana",
            "10.0.0.0",
            "/16",
            "10.0.0.0/",
            "10.0.0.0/1234",
            "a/1",
            "10.0.0.0/16/1",
            "fe80::1%eth0/64",
            "10.0.0.0/16\n",
        ] {
            assert!(!CidrText::has_shape(bad), "{bad}");
        }
    }
}
