//! Prometheus exposition text shared by the agent and the controller: the
//! `prometheus-client` encoder writes OpenMetrics, while scrapers asking for the
//! classic format (and `promtool check metrics`) expect version 0.0.4.

/// The Prometheus text format (0.0.4) from the encoder's OpenMetrics: a counter's
/// HELP and TYPE name its `_total` series, and there are no `# UNIT` or `# EOF`
/// lines. Served as `text/plain; version=0.0.4`, this is what Prometheus and
/// `promtool check metrics` expect.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(&name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_metadata_names_the_total_series() {
        let om = "# HELP a_total_x Foo.\n# HELP x Things.\n# TYPE x counter\n# UNIT x seconds\nx_total 3\n# TYPE g gauge\ng 1\n# EOF\n";
        let text = classic_text(om);
        assert_eq!(
            text,
            "# HELP a_total_x Foo.\n# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n# TYPE g gauge\ng 1\n"
        );
    }
}
