//! The lab's topology file (`configs/lab.toml`): sites and the WAN between their
//! gateways, parsed strictly and validated once into typed values. Errors name the
//! file, the key, the value and what is expected.

use crate::wan::PairShape;
use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    sites: Vec<RawSite>,
    #[serde(default)]
    wan: Vec<RawWan>,
    #[serde(default)]
    ai_backends: Vec<RawAiBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAiBackend {
    site: String,
    name: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    cloud: String,
    region: String,
    vpc: String,
    #[serde(default)]
    nat: bool,
    #[serde(default)]
    transit: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWan {
    from: String,
    to: String,
    #[serde(default = "yes")]
    symmetric: bool,
    delay: Option<String>,
    jitter: Option<String>,
    loss: Option<String>,
    rate: Option<String>,
    mtu: Option<u32>,
}

fn yes() -> bool {
    true
}

/// One cloud site of the lab.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub name: String,
    pub cloud: String,
    pub region: String,
    pub vpc: Ipv4Net,
    pub nat: bool,
    /// The gateway may forward between other sites (`[node] transit`).
    pub transit: bool,
}

/// A sample AI backend (`skymesh-ai-backend`) in a site's VPC host, standing in
/// for that cloud's AI service.
#[derive(Debug, Clone, PartialEq)]
pub struct AiBackendSpec {
    pub site: String,
    /// Its upstream name in the gateway.
    pub name: String,
    pub models: Vec<String>,
    /// Serve HTTPS with a certificate from the lab's CA.
    pub tls: bool,
}

/// The validated topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub sites: Vec<Site>,
    /// Shape of every listed ordered pair (site names); others are perfect links.
    pub wan: BTreeMap<(String, String), PairShape>,
    pub ai_backends: Vec<AiBackendSpec>,
}

impl Topology {
    pub fn load(file: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self> {
        let f = file.display();
        let raw: RawTopology = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{f}: {}", e.to_string().trim_end()))?;
        if raw.sites.is_empty() {
            bail!("{f}: sites: the lab needs at least one [[sites]] entry");
        }
        let mut sites: Vec<Site> = Vec::new();
        for (i, s) in raw.sites.iter().enumerate() {
            let ok = !s.name.is_empty()
                && s.name.len() <= 10
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !ok {
                bail!("{f}: sites[{i}].name = {:?}: expected 1-10 characters of a-z, 0-9 or '-' (it becomes part of namespace and interface names)", s.name);
            }
            if sites.iter().any(|o| o.name == s.name) {
                bail!(
                    "{f}: sites[{i}].name = {:?}: another site has this name",
                    s.name
                );
            }
            let vpc: Ipv4Net = s.vpc.parse().map_err(|_| {
                anyhow::anyhow!("{f}: sites[{i}] ({:?}).vpc = {:?}: expected an IPv4 CIDR such as \"10.0.0.0/16\"", s.name, s.vpc)
            })?;
            if vpc.trunc() != vpc
                || vpc.prefix_len() > 24
                || !Ipv4Net::new(std::net::Ipv4Addr::new(10, 0, 0, 0), 8)
                    .is_ok_and(|ten| ten.contains(&vpc))
            {
                bail!("{f}: sites[{i}] ({:?}).vpc = {:?}: expected a network inside 10.0.0.0/8 with a prefix of /24 or shorter, host bits clear", s.name, s.vpc);
            }
            if let Some(o) = sites
                .iter()
                .find(|o| o.vpc.contains(&vpc) || vpc.contains(&o.vpc))
            {
                bail!(
                    "{f}: sites[{i}] ({:?}).vpc = {:?}: overlaps {} of site {:?}",
                    s.name,
                    s.vpc,
                    o.vpc,
                    o.name
                );
            }
            sites.push(Site {
                name: s.name.clone(),
                cloud: s.cloud.clone(),
                region: s.region.clone(),
                vpc,
                nat: s.nat,
                transit: s.transit,
            });
        }
        let mut wan = BTreeMap::new();
        for (i, w) in raw.wan.iter().enumerate() {
            for (key, name) in [("from", &w.from), ("to", &w.to)] {
                if !sites.iter().any(|s| &s.name == name) {
                    let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
                    bail!("{f}: wan[{i}].{key} = {name:?}: no such site (sites: {names:?})");
                }
            }
            if w.from == w.to {
                bail!(
                    "{f}: wan[{i}]: from and to are both {:?}; a pair needs two sites",
                    w.from
                );
            }
            let at = |key: &str| format!("{f}: wan[{i}] ({} -> {}).{key}", w.from, w.to);
            let shape = PairShape {
                delay: w
                    .delay
                    .as_deref()
                    .map(|v| duration(v).with_context(|| format!("{} = {v:?}", at("delay"))))
                    .transpose()?
                    .unwrap_or_default(),
                jitter: w
                    .jitter
                    .as_deref()
                    .map(|v| duration(v).with_context(|| format!("{} = {v:?}", at("jitter"))))
                    .transpose()?
                    .unwrap_or_default(),
                loss: w
                    .loss
                    .as_deref()
                    .map(|v| percent(v).with_context(|| format!("{} = {v:?}", at("loss"))))
                    .transpose()?
                    .unwrap_or(0.0),
                rate_bps: w
                    .rate
                    .as_deref()
                    .map(|v| rate(v).with_context(|| format!("{} = {v:?}", at("rate"))))
                    .transpose()?,
                mtu: match w.mtu {
                    None => None,
                    Some(m) if (576..=9000).contains(&m) => Some(m as usize),
                    Some(m) => bail!("{} = {m}: expected 576..=9000 bytes", at("mtu")),
                },
                up: true,
            };
            wan.insert((w.from.clone(), w.to.clone()), shape);
            if w.symmetric {
                wan.entry((w.to.clone(), w.from.clone())).or_insert(shape);
            }
        }
        let mut ai_backends: Vec<AiBackendSpec> = Vec::new();
        for (i, b) in raw.ai_backends.iter().enumerate() {
            if !sites.iter().any(|s| s.name == b.site) {
                let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "{f}: ai_backends[{i}].site = {:?}: no such site (sites: {names:?})",
                    b.site
                );
            }
            if ai_backends.iter().any(|o| o.site == b.site) {
                bail!(
                    "{f}: ai_backends[{i}].site = {:?}: one backend per site",
                    b.site
                );
            }
            let ok = !b.name.is_empty()
                && b.name.len() <= 32
                && b.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !ok || ai_backends.iter().any(|o| o.name == b.name) {
                bail!("{f}: ai_backends[{i}].name = {:?}: expected a unique name of 1-32 letters, digits or '-'", b.name);
            }
            ai_backends.push(AiBackendSpec {
                site: b.site.clone(),
                name: b.name.clone(),
                models: if b.models.is_empty() {
                    vec!["gpt-4o-mini".into(), "text-embedding-3-small".into()]
                } else {
                    b.models.clone()
                },
                tls: b.tls,
            });
        }
        Ok(Self {
            sites,
            wan,
            ai_backends,
        })
    }

    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    pub fn shape(&self, from: &str, to: &str) -> PairShape {
        self.wan
            .get(&(from.to_string(), to.to_string()))
            .copied()
            .unwrap_or_default()
    }
}

/// "12ms", "1.5ms", "2s", "250us".
pub fn duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        bail!("expected a duration with a unit, like \"12ms\", \"1.5ms\" or \"2s\"");
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("expected a number before the unit, like \"12ms\""))?;
    if !(0.0..=60.0).contains(&(v * scale)) {
        bail!("expected 0 to 60 seconds");
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// "3%", "0.5%" → 0.03, 0.005.
pub fn percent(text: &str) -> Result<f64> {
    let n = text
        .trim()
        .strip_suffix('%')
        .context("expected a percentage, like \"2%\" or \"0.5%\"")?;
    let v: f64 = n
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("expected a number before '%', like \"2%\""))?;
    if !(0.0..=100.0).contains(&v) {
        bail!("expected 0% to 100%");
    }
    Ok(v / 100.0)
}

/// "1gbit", "200mbit", "512kbit" → bits per second.
pub fn rate(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix("gbit") {
        (n.to_string(), 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n.to_string(), 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n.to_string(), 1e3)
    } else {
        bail!("expected a rate with a unit, like \"1gbit\", \"200mbit\" or \"512kbit\"");
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("expected a number before the unit, like \"200mbit\""))?;
    if v <= 0.0 {
        bail!("expected a rate above zero");
    }
    Ok((v * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lab_file_is_valid_and_realistic() {
        let file = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/lab.toml"));
        let t = Topology::load(file).expect("configs/lab.toml");
        let names: Vec<&str> = t.sites.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["aws", "gcp", "azure", "alibaba"]);
        assert_eq!(
            t.site("alibaba").map(|s| s.region.as_str()),
            Some("cn-shanghai")
        );
        assert_eq!(t.shape("gcp", "aws").delay, Duration::from_millis(10));
        // The direct path to cn-shanghai is longer than the detour through eastasia.
        let direct = t.shape("aws", "alibaba").delay;
        let via = t.shape("aws", "azure").delay + t.shape("azure", "alibaba").delay;
        assert!(direct > via, "direct {direct:?} vs via eastasia {via:?}");
        assert!(t.shape("alibaba", "aws").loss > 0.0);
    }

    #[test]
    fn values_parse_with_units() {
        assert_eq!(duration("1.5ms").ok(), Some(Duration::from_micros(1500)));
        assert_eq!(duration("2s").ok(), Some(Duration::from_secs(2)));
        assert!(duration("12").is_err());
        assert_eq!(percent("0.5%").ok(), Some(0.005));
        assert!(percent("120%").is_err());
        assert_eq!(rate("200mbit").ok(), Some(200_000_000));
        assert!(rate("fast").is_err());
    }

    #[test]
    fn bad_files_name_the_key_and_value() {
        let f = Path::new("lab.toml");
        let site = |name: &str, vpc: &str| {
            format!(
                "[[sites]]\nname = \"{name}\"\ncloud = \"c\"\nregion = \"r\"\nvpc = \"{vpc}\"\n"
            )
        };
        let cases = [
            (
                site("a", "10.0.0.0/16") + &site("b", "10.0.128.0/17"),
                "sites[1] (\"b\").vpc = \"10.0.128.0/17\": overlaps 10.0.0.0/16",
            ),
            (
                site("Bad_Name", "10.0.0.0/16"),
                "sites[0].name = \"Bad_Name\"",
            ),
            (site("a", "192.168.0.0/16"), "inside 10.0.0.0/8"),
            (
                site("a", "10.0.0.0/16") + "[[wan]]\nfrom = \"a\"\nto = \"zz\"\n",
                "wan[0].to = \"zz\": no such site",
            ),
            (
                site("a", "10.0.0.0/16")
                    + &site("b", "10.1.0.0/16")
                    + "[[wan]]\nfrom = \"a\"\nto = \"b\"\ndelay = \"10\"\n",
                "wan[0] (a -> b).delay = \"10\"",
            ),
            (
                site("a", "10.0.0.0/16") + "colour = 1\n",
                "unknown field `colour`",
            ),
        ];
        for (text, needle) in cases {
            let e = format!(
                "{:#}",
                Topology::parse(f, &text).expect_err("must be refused")
            );
            assert!(
                e.starts_with("lab.toml") && e.contains(needle),
                "{e:?} should contain {needle:?}"
            );
        }
    }
}
