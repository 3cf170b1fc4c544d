//! Reading Prometheus metrics the way a scraper does: a plain HTTP/1.0 GET from inside the
//! agent's namespace, then the text exposition format parsed into samples.

use crate::netns::run_in_netns;
use anyhow::{bail, Context, Result};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Label pairs, in the order they appear.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// All samples.
    pub samples: Vec<Sample>,
    /// The raw body (for error messages).
    pub text: String,
}

impl Metrics {
    /// Sum of the samples named `name` whose labels include all of `labels`; `None` if none match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let all = labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if all {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// Like [`Metrics::get`] but 0 when absent (counters that have not been touched yet).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// `skymesh_dropped_packets_total{reason}`, 0 when absent.
    pub fn drops(&self, reason: &str) -> f64 {
        self.counter("skymesh_dropped_packets_total", &[("reason", reason)])
    }

    /// All `skymesh_dropped_packets_total` samples as reason → value, for messages.
    pub fn drops_by_reason(&self) -> Vec<(String, f64)> {
        self.samples
            .iter()
            .filter(|s| s.name == "skymesh_dropped_packets_total")
            .map(|s| {
                let reason = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "reason")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (reason, s.value)
            })
            .collect()
    }
}

/// Fetches `http://<listen>/metrics` from inside namespace `ns` and parses it.
pub fn scrape(ns: &str, listen: &str) -> Result<Metrics> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("metrics listen address {listen:?}"))?;
    let body = run_in_netns(ns, move || http_get(addr, "/metrics"))??;
    Ok(Metrics {
        samples: parse(&body),
        text: body,
    })
}

/// A minimal HTTP/1.0 GET returning the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .context("sending HTTP request")?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading response from {addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header/body separator in response: {text:.200}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        bail!("GET {addr}{path}: {status_line}");
    }
    Ok(body.to_string())
}

/// Parses the Prometheus/OpenMetrics text format (comments skipped, timestamps ignored).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

/// Parses one sample line; `None` if it is not one.
fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            let labels = parse_labels(&line[open + 1..close])?;
            (&line[..open], labels, &line[close + 1..])
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes.
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_comments() {
        let text = "# HELP x y\n# TYPE skymesh_dropped_packets_total counter\n\
            skymesh_dropped_packets_total{reason=\"malformed\"} 3\n\
            skymesh_dropped_packets_total{reason=\"replay\"} 2.0\n\
            skymesh_peer_rx_bytes_total{peer=\"a \\\"b\\\"\",x=\"1\"} 10 1700000000\n\
            skymesh_build_info{version=\"0.1.0\"} 1\nup 1\n# EOF\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 5, "{samples:?}");
        let m = Metrics {
            samples,
            text: text.to_string(),
        };
        assert_eq!(m.drops("malformed"), 3.0);
        assert_eq!(m.drops("replay"), 2.0);
        assert_eq!(m.drops("unknown_peer"), 0.0);
        assert_eq!(m.get("skymesh_dropped_packets_total", &[]), Some(5.0));
        assert_eq!(
            m.get("skymesh_peer_rx_bytes_total", &[("peer", "a \"b\"")]),
            Some(10.0)
        );
        assert_eq!(m.get("up", &[]), Some(1.0));
        assert_eq!(m.get("nope", &[]), None);
    }
}
