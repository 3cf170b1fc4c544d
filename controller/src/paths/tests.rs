//! The engine's decisions, driven by simulated agents and injected time.

use super::config::ordered;
use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skymesh_wire::{LinkReport, LinkSample, PathSpec, Via};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const SECOND: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
struct SimLink {
    rtt_ms: f64,
    loss_pct: f64,
    up: bool,
}

/// Agents reporting every second to an engine that recomputes every second.
struct Sim {
    engine: PathEngine,
    now: Instant,
    nodes: Vec<(String, bool)>,
    links: BTreeMap<(String, String), SimLink>,
    /// Nodes that have stopped reporting.
    silent: BTreeSet<String>,
    /// Each side's RTT is multiplied by a random factor in 1 ± this.
    jitter: Option<(StdRng, f64)>,
}

impl Sim {
    fn new(nodes: &[(&str, bool)], config: PathConfig) -> Self {
        let nodes: Vec<(String, bool)> = nodes.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        let mut engine = PathEngine::new(config);
        engine.set_nodes(nodes.clone());
        Self {
            engine,
            now: Instant::now(),
            nodes,
            links: BTreeMap::new(),
            silent: BTreeSet::new(),
            jitter: None,
        }
    }

    fn link(&mut self, a: &str, b: &str, rtt_ms: f64, loss_pct: f64) {
        let (a, b) = ordered(a, b);
        self.links.insert(
            (a.to_string(), b.to_string()),
            SimLink {
                rtt_ms,
                loss_pct,
                up: true,
            },
        );
    }

    fn set_up(&mut self, a: &str, b: &str, up: bool) {
        let (a, b) = ordered(a, b);
        if let Some(l) = self.links.get_mut(&(a.to_string(), b.to_string())) {
            l.up = up;
        }
    }

    fn report_all(&mut self) {
        for (node, _) in self.nodes.clone() {
            if self.silent.contains(&node) {
                continue;
            }
            let mut links = Vec::new();
            for ((a, b), l) in &self.links {
                let peer = if *a == node {
                    b
                } else if *b == node {
                    a
                } else {
                    continue;
                };
                let factor = match &mut self.jitter {
                    Some((rng, j)) => rng.gen_range(1.0 - *j..=1.0 + *j),
                    None => 1.0,
                };
                links.push(sample(peer, l.rtt_ms * factor, l.loss_pct, l.up));
            }
            self.engine.report(&node, &LinkReport { links }, self.now);
        }
    }

    /// Reports and recomputes at the current instant.
    fn start(&mut self) -> Vec<String> {
        self.report_all();
        self.engine.recompute(self.now)
    }

    /// One second later: reports, then recompute.
    fn tick(&mut self) -> Vec<String> {
        self.now += SECOND;
        self.start()
    }

    fn run(&mut self, secs: u64) {
        for _ in 0..secs {
            self.tick();
        }
    }

    fn spec(&self, from: &str, to: &str) -> PathSpec {
        self.engine
            .paths_for(from)
            .into_iter()
            .find(|p| p.dest == to)
            .unwrap_or_else(|| panic!("{from} has no path to {to}"))
    }

    /// The primary of the pair, checking that both ends agree.
    fn primary(&self, a: &str, b: &str) -> Via {
        let (ab, ba) = (self.spec(a, b), self.spec(b, a));
        assert_eq!(ab.primary, ba.primary, "{a}-{b} asymmetric");
        assert_eq!(ab.backup, ba.backup, "{a}-{b} asymmetric backup");
        ab.primary
    }

    fn backup(&self, a: &str, b: &str) -> Option<Via> {
        self.spec(a, b).backup
    }

    fn pair(&self, a: &str, b: &str) -> PairView {
        let (a, b) = ordered(a, b);
        self.engine
            .pairs(self.now)
            .into_iter()
            .find(|p| p.a == a && p.b == b)
            .unwrap_or_else(|| panic!("no pair {a}-{b}"))
    }

    fn link_view(&self, a: &str, b: &str) -> LinkView {
        let (a, b) = ordered(a, b);
        self.engine
            .links(self.now)
            .into_iter()
            .find(|l| l.a == a && l.b == b)
            .unwrap_or_else(|| panic!("no link {a}-{b}"))
    }
}

fn sample(peer: &str, rtt_ms: f64, loss_pct: f64, up: bool) -> LinkSample {
    LinkSample {
        peer: peer.to_string(),
        up,
        rtt_us: (rtt_ms * 1000.0).round() as u32,
        jitter_us: 0,
        loss_ppm: (loss_pct * 10_000.0).round() as u32,
    }
}

fn via(name: &str) -> Via {
    Via::Transit(name.to_string())
}

/// The lab: azure is the only transit; aws-alibaba and gcp-alibaba are long
/// and lossy, so their best way is through azure.
fn lab_with(config: PathConfig, gcp_transit: bool) -> Sim {
    let mut sim = Sim::new(
        &[
            ("aws", false),
            ("gcp", gcp_transit),
            ("azure", true),
            ("alibaba", false),
        ],
        config,
    );
    sim.link("aws", "gcp", 20.0, 0.0);
    sim.link("aws", "azure", 150.0, 0.0);
    sim.link("gcp", "azure", 140.0, 0.0);
    sim.link("azure", "alibaba", 30.0, 0.0);
    sim.link("aws", "alibaba", 220.0, 3.0);
    sim.link("gcp", "alibaba", 210.0, 3.0);
    sim
}

fn lab() -> Sim {
    lab_with(PathConfig::default(), false)
}

/// a-b direct, and a transit t whose path costs 121 ms.
fn triangle(direct_ms: f64) -> Sim {
    let mut sim = Sim::new(
        &[("a", false), ("b", false), ("t", true)],
        PathConfig::default(),
    );
    sim.link("a", "b", direct_ms, 0.0);
    sim.link("a", "t", 60.0, 0.0);
    sim.link("t", "b", 60.0, 0.0);
    sim
}

fn links_of(a: &str, b: &str, via: &Via) -> BTreeSet<(String, String)> {
    let link = |x: &str, y: &str| {
        let (x, y) = ordered(x, y);
        (x.to_string(), y.to_string())
    };
    match via {
        Via::Direct => [link(a, b)].into(),
        Via::Transit(t) => [link(a, t), link(t, b)].into(),
    }
}

#[test]
fn before_any_report_every_pair_is_direct_with_no_measurements() {
    let mut sim = lab();
    let changed = sim.engine.recompute(sim.now);
    assert_eq!(changed, ["alibaba", "aws", "azure", "gcp"]);
    for p in sim.engine.pairs(sim.now) {
        assert_eq!(p.primary, "direct");
        assert_eq!(p.backup, None);
        assert!(p.reason.starts_with("no measurements yet"), "{}", p.reason);
    }
    assert_eq!(sim.engine.paths_for("aws").len(), 3);
    assert!(sim.engine.links(sim.now).is_empty());
}

#[test]
fn direct_is_chosen_when_cheapest() {
    let mut sim = lab();
    sim.start();
    assert_eq!(sim.primary("aws", "gcp"), Via::Direct);
    assert_eq!(sim.primary("azure", "alibaba"), Via::Direct);
    let p = sim.pair("aws", "gcp");
    assert_eq!(p.primary_cost_ms, Some(20.0));
    assert_eq!(
        p.reason,
        "direct: 20.0 ms (rtt 20.0 ms) beats via azure 291.0 ms \
         (aws-azure 150.0 ms + azure-gcp 140.0 ms + 1.0 ms transit)"
    );
}

#[test]
fn lab_long_lossy_direct_goes_via_azure_in_both_directions() {
    let mut sim = lab();
    sim.start();
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    assert_eq!(sim.spec("aws", "alibaba").primary, via("azure"));
    assert_eq!(sim.spec("alibaba", "aws").primary, via("azure"));
    assert_eq!(sim.primary("gcp", "alibaba"), via("azure"));
    let p = sim.pair("aws", "alibaba");
    assert_eq!(p.primary_cost_ms, Some(181.0));
    assert_eq!(p.backup.as_deref(), Some("direct"));
    assert_eq!(p.backup_cost_ms, Some(250.0));
    assert_eq!(
        p.reason,
        "via azure: 181.0 ms (alibaba-azure 30.0 ms + azure-aws 150.0 ms + 1.0 ms transit) \
         beats direct 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms)"
    );
    assert_eq!(p.changes, 0, "the first measured choice is not a change");
}

#[test]
fn only_transit_nodes_carry_traffic() {
    let mut sim = Sim::new(
        &[("a", false), ("b", false), ("x", false), ("y", true)],
        PathConfig::default(),
    );
    sim.link("a", "b", 200.0, 0.0);
    sim.link("a", "x", 10.0, 0.0);
    sim.link("x", "b", 10.0, 0.0);
    sim.link("a", "y", 80.0, 0.0);
    sim.link("y", "b", 80.0, 0.0);
    sim.start();
    assert_eq!(
        sim.primary("a", "b"),
        via("y"),
        "x is much cheaper but may not transit"
    );
    assert_eq!(sim.backup("a", "b"), Some(Via::Direct));

    // y stops being a transit: its path is unusable, so the switch is immediate.
    sim.nodes = vec![
        ("a".into(), false),
        ("b".into(), false),
        ("x".into(), false),
        ("y".into(), false),
    ];
    sim.engine.set_nodes(sim.nodes.clone());
    sim.tick();
    assert_eq!(sim.primary("a", "b"), Via::Direct);
    let p = sim.pair("a", "b");
    assert_eq!(p.changes, 1);
    assert_eq!(
        p.last_change.as_deref(),
        Some("via y -> direct: via y became unusable (y may not transit)")
    );
}

#[test]
fn nine_percent_cheaper_never_switches() {
    let mut sim = triangle(100.0);
    sim.start();
    assert_eq!(sim.primary("a", "b"), Via::Direct);
    sim.link("a", "b", 133.0, 0.0); // via t, 121 ms, is 9.0% cheaper
    sim.run(60);
    assert_eq!(sim.primary("a", "b"), Via::Direct);
    let p = sim.pair("a", "b");
    assert_eq!(p.changes, 0);
    assert_eq!(
        p.reason,
        "direct: 133.0 ms (rtt 133.0 ms); via t 121.0 ms (a-t 60.0 ms + t-b 60.0 ms \
         + 1.0 ms transit) is 9% cheaper, less than the 10% and 5.0 ms needed to switch"
    );
}

#[test]
fn twenty_percent_cheaper_switches_only_after_hold() {
    let mut sim = triangle(100.0);
    sim.start();
    sim.link("a", "b", 152.0, 0.0); // via t, 121 ms, is 20.4% cheaper
    let changed = sim.tick(); // the challenger appears now
    assert!(changed.is_empty(), "{changed:?}");
    sim.run(3);
    assert_eq!(sim.primary("a", "b"), Via::Direct);
    let p = sim.pair("a", "b");
    assert!(
        p.reason
            .ends_with("is 20% cheaper, switching in 2.0 s if it holds"),
        "{}",
        p.reason
    );
    sim.tick();
    assert_eq!(sim.primary("a", "b"), Via::Direct, "held 4 s of 5");
    let changed = sim.tick();
    assert_eq!(sim.primary("a", "b"), via("t"), "held 5 s");
    assert_eq!(changed, ["a", "b"]);
    let p = sim.pair("a", "b");
    assert_eq!(p.changes, 1);
    assert_eq!(p.since_s, 0.0);
    assert_eq!(
        p.last_change.as_deref(),
        Some("direct -> via t: via t was 20% cheaper (121.0 ms vs 152.0 ms) for 5.0 s")
    );
    assert_eq!(sim.backup("a", "b"), Some(Via::Direct));
}

#[test]
fn margin_lost_mid_hold_restarts_the_timer() {
    let mut sim = triangle(100.0);
    sim.start();
    sim.link("a", "b", 152.0, 0.0);
    sim.run(3); // challenger held 2 s
    sim.link("a", "b", 130.0, 0.0); // only 6.9% cheaper now
    sim.tick();
    sim.link("a", "b", 152.0, 0.0); // the timer starts again here
    sim.run(5);
    assert_eq!(
        sim.primary("a", "b"),
        Via::Direct,
        "8 s of 20% but only 4 s in a row"
    );
    sim.tick();
    assert_eq!(sim.primary("a", "b"), via("t"));
    assert_eq!(sim.pair("a", "b").changes, 1);
}

#[test]
fn challenger_timer_restarts_only_for_a_clearly_better_one() {
    let mut sim = Sim::new(
        &[("a", false), ("b", false), ("t1", true), ("t2", true)],
        PathConfig::default(),
    );
    sim.link("a", "b", 200.0, 0.0);
    sim.link("a", "t1", 100.0, 0.0);
    sim.link("t1", "b", 100.0, 0.0);
    sim.link("a", "t2", 100.0, 0.0);
    sim.link("t2", "b", 110.0, 0.0);
    sim.start();
    assert_eq!(sim.primary("a", "b"), Via::Direct);

    sim.link("a", "t1", 80.0, 0.0);
    sim.link("t1", "b", 80.0, 0.0); // via t1: 161 ms, 19.5% cheaper
    sim.run(2);
    sim.link("t2", "b", 59.0, 0.0); // via t2: 160 ms, a hair cheaper than t1
    sim.run(3);
    assert_eq!(sim.primary("a", "b"), Via::Direct);
    sim.tick();
    assert_eq!(sim.primary("a", "b"), via("t1"), "t1 kept its timer");

    // Now t2 gets clearly cheaper than t1: it needs its own full hold.
    sim.link("t2", "b", 20.0, 0.0); // via t2: 121 ms, 25% cheaper than t1
    sim.run(5);
    assert_eq!(sim.primary("a", "b"), via("t1"));
    sim.tick();
    assert_eq!(sim.primary("a", "b"), via("t2"));
    assert_eq!(sim.pair("a", "b").changes, 2);
}

#[test]
fn rtt_jitter_of_20_percent_for_a_minute_changes_at_most_once() {
    for seed in 0..5 {
        let mut sim = lab();
        sim.jitter = Some((StdRng::seed_from_u64(seed), 0.2));
        sim.start();
        let mut pushes = 0;
        for _ in 0..60 {
            pushes += sim.tick().len();
        }
        let changes: u64 = sim.engine.pairs(sim.now).iter().map(|p| p.changes).sum();
        assert!(changes <= 1, "seed {seed}: {changes} changes");
        assert!(pushes <= 4, "seed {seed}: {pushes} pushes");
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"), "seed {seed}");
    }
}

#[test]
fn down_primary_switches_at_once() {
    let mut sim = lab();
    sim.start();
    sim.set_up("azure", "alibaba", false);
    let changed = sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert_eq!(sim.primary("gcp", "alibaba"), Via::Direct);
    assert_eq!(sim.backup("aws", "alibaba"), None, "no other usable path");
    assert_eq!(changed, ["alibaba", "aws", "gcp"]);
    let p = sim.pair("aws", "alibaba");
    assert_eq!(p.changes, 1);
    assert_eq!(
        p.last_change.as_deref(),
        Some("via azure -> direct: via azure became unusable (link alibaba-azure down)")
    );
    assert_eq!(
        p.reason,
        "direct: 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms); no alternative path"
    );
}

#[test]
fn one_side_saying_down_makes_the_link_down() {
    let mut sim = lab();
    sim.start();
    // Only alibaba sees its link to azure fail.
    let mut links = vec![
        sample("azure", 30.0, 0.0, false),
        sample("aws", 220.0, 3.0, true),
        sample("gcp", 210.0, 3.0, true),
    ];
    sim.now += SECOND;
    sim.report_all();
    sim.engine.report(
        "alibaba",
        &LinkReport {
            links: links.clone(),
        },
        sim.now,
    );
    sim.engine.recompute(sim.now);
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    let l = sim.link_view("azure", "alibaba");
    assert!(!l.up && !l.usable);
    assert_eq!(l.reported_by, ["alibaba", "azure"]);

    links[0].up = true;
    sim.engine.report("alibaba", &LinkReport { links }, sim.now);
    sim.engine.recompute(sim.now);
    assert_eq!(
        sim.primary("aws", "alibaba"),
        Via::Direct,
        "hysteresis on the way back"
    );
}

#[test]
fn disabled_primary_switches_at_once_and_no_path_keeps_the_primary() {
    let mut sim = lab();
    sim.start();
    let disabled = LinkOverride {
        disabled: true,
        ..LinkOverride::default()
    };
    sim.engine
        .set_override("azure", "aws", Some(disabled.clone()))
        .expect("override");
    sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert_eq!(
        sim.pair("aws", "azure").reason,
        "no usable path (direct: link aws-azure disabled by operator; \
         no other node may transit); keeping direct"
    );

    // Nothing usable between aws and alibaba either: keep the primary.
    sim.engine
        .set_override("aws", "alibaba", Some(disabled))
        .expect("override");
    let changed = sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert!(
        changed.is_empty(),
        "primary kept, no backup before or after: {changed:?}"
    );
    let p = sim.pair("aws", "alibaba");
    assert_eq!(p.primary_cost_ms, None);
    assert!(p.reason.starts_with("no usable path"), "{}", p.reason);
    assert_eq!(sim.link_view("aws", "alibaba").cost_ms, Some(250.0));
    assert!(!sim.link_view("aws", "alibaba").usable);
}

#[test]
fn backup_is_link_disjoint_and_kept_until_clearly_beaten() {
    let mut sim = lab_with(PathConfig::default(), true);
    sim.start();
    for (a, b) in [("aws", "alibaba"), ("gcp", "alibaba"), ("aws", "gcp")] {
        let primary = sim.primary(a, b);
        let backup = sim.backup(a, b).expect("backup");
        assert_ne!(primary, backup);
        assert!(
            links_of(a, b, &primary).is_disjoint(&links_of(a, b, &backup)),
            "{a}-{b}: {primary} and {backup} share a link"
        );
    }
    // aws-alibaba: via azure 181, direct 250, via gcp 261.
    assert_eq!(sim.backup("aws", "alibaba"), Some(Via::Direct));
    assert_eq!(sim.backup("aws", "azure"), Some(via("gcp")));

    sim.link("aws", "alibaba", 235.0, 3.0); // direct 265: via gcp 1.5% cheaper
    sim.tick();
    assert_eq!(sim.backup("aws", "alibaba"), Some(Via::Direct));
    sim.link("aws", "alibaba", 280.0, 3.0); // direct 310: via gcp 16% cheaper
    sim.tick();
    assert_eq!(
        sim.backup("aws", "alibaba"),
        Some(via("gcp")),
        "no hold for backups"
    );
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
}

#[test]
fn pin_applies_at_once_and_yields_while_unusable() {
    let mut sim = lab();
    sim.start();
    let pin = LinkOverride {
        pin: Some(Via::Direct),
        ..LinkOverride::default()
    };
    sim.engine
        .set_override("alibaba", "aws", Some(pin))
        .expect("override");
    sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert_eq!(sim.backup("aws", "alibaba"), Some(via("azure")));
    let p = sim.pair("aws", "alibaba");
    assert_eq!(
        p.reason,
        "pinned by operator: direct: 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms); \
         via azure 181.0 ms (alibaba-azure 30.0 ms + azure-aws 150.0 ms + 1.0 ms transit) \
         would be 28% cheaper"
    );
    assert_eq!(
        p.last_change.as_deref(),
        Some("via azure -> direct: pinned by operator")
    );

    sim.set_up("aws", "alibaba", false);
    sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    let reason = sim.pair("aws", "alibaba").reason;
    assert!(
        reason.starts_with("pin direct is unusable (link alibaba-aws down); via azure: 181.0 ms"),
        "{reason}"
    );

    sim.set_up("aws", "alibaba", true);
    sim.tick();
    assert_eq!(
        sim.primary("aws", "alibaba"),
        Via::Direct,
        "pin usable again"
    );

    sim.engine
        .set_override("aws", "alibaba", None)
        .expect("clear");
    sim.run(5);
    assert_eq!(
        sim.primary("aws", "alibaba"),
        Via::Direct,
        "unpinned: hysteresis"
    );
    sim.tick();
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    assert_eq!(sim.pair("aws", "alibaba").changes, 4);
}

#[test]
fn pin_through_a_non_transit_is_reported_unusable() {
    let mut sim = lab();
    let pin = LinkOverride {
        pin: Some(via("gcp")),
        ..LinkOverride::default()
    };
    sim.engine
        .set_override("aws", "alibaba", Some(pin))
        .expect("override");
    sim.start();
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    let p = sim.pair("aws", "alibaba");
    assert!(
        p.reason
            .starts_with("pin via gcp is unusable (gcp may not transit); via azure:"),
        "{}",
        p.reason
    );
    assert_eq!(sim.link_view("aws", "alibaba").pin.as_deref(), Some("gcp"));
}

#[test]
fn config_weight_and_override_weight_change_the_choice() {
    let config = PathConfig {
        weights: vec![LinkWeight {
            a: "aws".into(),
            b: "azure".into(),
            weight_ms: 100.0,
        }],
        ..PathConfig::default()
    };
    let mut sim = lab_with(config, false);
    sim.start();
    // via azure now costs 281 ms, more than direct's 250.
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert!(
        sim.pair("aws", "alibaba")
            .reason
            .contains("azure-aws 250.0 ms"),
        "{}",
        sim.pair("aws", "alibaba").reason
    );
    assert_eq!(
        sim.pair("aws", "azure").reason,
        "direct: 250.0 ms (rtt 150.0 ms + weight 100.0 ms); no alternative path"
    );
    let l = sim.link_view("aws", "azure");
    assert_eq!((l.weight_ms, l.cost_ms), (100.0, Some(250.0)));

    let free = LinkOverride {
        weight_ms: Some(0.0),
        ..LinkOverride::default()
    };
    sim.engine
        .set_override("azure", "aws", Some(free))
        .expect("override");
    sim.run(6);
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    let l = sim.link_view("aws", "azure");
    assert_eq!((l.weight_ms, l.cost_ms), (0.0, Some(150.0)));
}

#[test]
fn stale_reports_make_a_link_unusable() {
    let mut sim = Sim::new(
        &[("a", false), ("b", false), ("t", true)],
        PathConfig::default(),
    );
    sim.link("a", "b", 50.0, 0.0);
    sim.link("a", "t", 40.0, 0.0);
    sim.link("t", "b", 40.0, 0.0);
    sim.start();
    assert_eq!(sim.primary("a", "b"), Via::Direct);

    // a and b go quiet; t still reports its links to both.
    sim.silent = ["a".to_string(), "b".to_string()].into();
    sim.run(5);
    assert_eq!(sim.primary("a", "b"), Via::Direct, "5 s old is still fresh");
    sim.tick();
    assert_eq!(
        sim.primary("a", "b"),
        via("t"),
        "6 s old is stale: switch at once"
    );
    assert_eq!(
        sim.pair("a", "b").last_change.as_deref(),
        Some("direct -> via t: direct became unusable (link a-b has no fresh report)")
    );
    let l = sim.link_view("a", "b");
    assert!(!l.usable);
    assert!(l.reported_by.is_empty());
    assert_eq!((l.age_s, l.rtt_ms), (Some(6.0), None));
    assert_eq!(sim.link_view("a", "t").reported_by, ["t"]);
}

#[test]
fn removed_nodes_vanish() {
    let mut sim = lab();
    sim.start();
    sim.nodes.retain(|(n, _)| n != "azure");
    sim.engine.set_nodes(sim.nodes.clone());
    let changed = sim.tick();
    assert_eq!(changed, ["alibaba", "aws", "gcp"]);
    assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
    assert_eq!(
        sim.pair("aws", "alibaba").last_change.as_deref(),
        Some("via azure -> direct: via azure became unusable (azure is not a member)")
    );
    let dests: Vec<String> = sim
        .engine
        .paths_for("aws")
        .into_iter()
        .map(|p| p.dest)
        .collect();
    assert_eq!(dests, ["alibaba", "gcp"]);
    assert!(sim.engine.paths_for("azure").is_empty());
    let now = sim.now;
    assert!(sim
        .engine
        .pairs(now)
        .iter()
        .all(|p| p.a != "azure" && p.b != "azure"));
    assert!(sim
        .engine
        .links(now)
        .iter()
        .all(|l| l.a != "azure" && l.b != "azure"));
    // A late report from the removed node is ignored.
    let report = LinkReport {
        links: vec![sample("aws", 1.0, 0.0, true)],
    };
    sim.engine.report("azure", &report, now);
    assert!(sim.engine.links(now).iter().all(|l| l.b != "azure"));
}

#[test]
fn a_last_change_keeps_the_name_of_a_transit_whose_id_was_reused() {
    let mut sim = lab();
    sim.start();
    let azure = sim.engine.nodes.id("azure").expect("azure is a member");
    sim.nodes.retain(|(n, _)| n != "azure");
    sim.engine.set_nodes(sim.nodes.clone());
    sim.tick();
    let want = "via azure -> direct: via azure became unusable (azure is not a member)";
    assert_eq!(
        sim.pair("aws", "alibaba").last_change.as_deref(),
        Some(want)
    );
    // azure's id is free after that recompute; a newcomer takes it.
    sim.nodes.push(("zz-new".to_string(), false));
    sim.engine.set_nodes(sim.nodes.clone());
    sim.tick();
    assert_eq!(
        sim.pair("aws", "alibaba").last_change.as_deref(),
        Some(want),
        "the record must not name the node that reused azure's id"
    );
    // The newcomer did take azure's id, so a record by id would name it.
    assert_eq!(sim.engine.nodes.id("zz-new"), Some(azure));
}

#[test]
fn a_last_change_is_a_compact_record_and_slots_invert() {
    assert_eq!(std::mem::size_of::<engine::Change>(), 24);
    for hi in 1..300u32 {
        for lo in 0..hi {
            assert_eq!(engine::pair_of_slot(table::slot(lo, hi)), (lo, hi));
        }
    }
    let big = table::slot(91_000, 92_000);
    assert_eq!(engine::pair_of_slot(big), (91_000, 92_000));
}

#[test]
fn recompute_returns_exactly_the_nodes_whose_paths_changed() {
    let mut sim = lab();
    assert_eq!(sim.start(), ["alibaba", "aws", "azure", "gcp"]);
    assert!(sim.tick().is_empty());
    // Direct aws-alibaba was only a backup: just the two ends hear about it.
    sim.set_up("aws", "alibaba", false);
    assert_eq!(sim.tick(), ["alibaba", "aws"]);
    assert!(sim.tick().is_empty());
    // aws-alibaba has no usable path left and keeps its primary; gcp-alibaba
    // switches to direct.
    sim.set_up("azure", "alibaba", false);
    assert_eq!(sim.tick(), ["alibaba", "gcp"]);
    assert!(sim
        .pair("aws", "alibaba")
        .reason
        .starts_with("no usable path"));
    assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    // A new node: everyone gets a path to it.
    sim.nodes.push(("oracle".into(), false));
    sim.engine.set_nodes(sim.nodes.clone());
    assert_eq!(sim.tick(), ["alibaba", "aws", "azure", "gcp", "oracle"]);
}

#[test]
fn link_view_combines_both_sides() {
    let mut sim = Sim::new(&[("a", false), ("b", false)], PathConfig::default());
    let now = sim.now;
    let report = |peer: &str, rtt_ms, loss_pct, up| LinkReport {
        links: vec![
            sample(peer, rtt_ms, loss_pct, up),
            sample("stranger", 1.0, 0.0, true),
        ],
    };
    sim.engine.report("a", &report("b", 100.0, 1.0, true), now);
    sim.engine.report("b", &report("a", 120.0, 2.0, true), now);
    let l = &sim.engine.links(now)[0];
    assert_eq!((l.a.as_str(), l.b.as_str()), ("a", "b"));
    assert_eq!(l.rtt_ms, Some(110.0));
    assert_eq!(l.loss, Some(0.02));
    assert_eq!(l.cost_ms, Some(130.0));
    assert!(l.up && l.usable);
    assert_eq!(sim.engine.links(now).len(), 1, "unknown peers are ignored");

    let later = now + Duration::from_secs(6);
    sim.engine
        .report("a", &report("b", 100.0, 1.0, true), later);
    let l = &sim.engine.links(later)[0];
    assert_eq!(l.reported_by, ["a"]);
    assert_eq!(
        (l.rtt_ms, l.loss, l.age_s),
        (Some(100.0), Some(0.01), Some(0.0))
    );
}

#[test]
fn overrides_are_validated_unordered_and_cleared() {
    let mut engine = PathEngine::new(PathConfig::default());
    let o = LinkOverride {
        disabled: true,
        weight_ms: Some(3.0),
        pin: Some(via("azure")),
    };
    engine
        .set_override("gcp", "aws", Some(o.clone()))
        .expect("valid");
    assert_eq!(engine.override_for("aws", "gcp"), Some(&o));
    let all: Vec<_> = engine.overrides().collect();
    assert_eq!(all, [("aws", "gcp", &o)]);
    assert_eq!(
        engine.links(Instant::now()).len(),
        1,
        "an override alone is listed"
    );

    engine
        .set_override("aws", "gcp", Some(LinkOverride::default()))
        .expect("default");
    assert_eq!(
        engine.override_for("gcp", "aws"),
        None,
        "the default is no override"
    );
    engine.set_override("aws", "gcp", Some(o)).expect("valid");
    engine.set_override("aws", "gcp", None).expect("clear");
    assert_eq!(engine.overrides().count(), 0);

    let err = engine.set_override("aws", "aws", None).expect_err("self");
    assert_eq!(err, OverrideError::SelfLink("aws".into()));
    let through_end = LinkOverride {
        pin: Some(via("gcp")),
        ..LinkOverride::default()
    };
    let err = engine
        .set_override("aws", "gcp", Some(through_end))
        .expect_err("pin via an end");
    assert!(
        err.to_string().contains("pin \"direct\" or a third node"),
        "{err}"
    );
    let negative = LinkOverride {
        weight_ms: Some(-1.0),
        ..LinkOverride::default()
    };
    let err = engine
        .set_override("aws", "gcp", Some(negative))
        .expect_err("negative");
    assert!(err.to_string().contains("weight_ms = -1"), "{err}");
}

#[test]
fn link_override_json_is_stable() {
    let o: LinkOverride = serde_json::from_str(r#"{"pin":{"transit":"azure"}}"#).expect("json");
    assert_eq!(o.pin, Some(via("azure")));
    assert!(!o.disabled);
    let o: LinkOverride =
        serde_json::from_str(r#"{"pin":"direct","disabled":true}"#).expect("json");
    assert_eq!(o.pin, Some(Via::Direct));
    assert_eq!(
        serde_json::to_string(&LinkOverride::default()).expect("json"),
        r#"{"disabled":false}"#
    );
    assert!(serde_json::from_str::<LinkOverride>(r#"{"disable":true}"#).is_err());
}

#[test]
fn config_validation_names_the_field() {
    assert_eq!(PathConfig::default().validate(), Ok(()));
    let bad_ratio = PathConfig {
        switch_ratio: 1.5,
        ..PathConfig::default()
    };
    assert!(bad_ratio
        .validate()
        .expect_err("ratio")
        .to_string()
        .starts_with("switch_ratio = 1.5"));
    let weight = |a: &str, b: &str, weight_ms| LinkWeight {
        a: a.into(),
        b: b.into(),
        weight_ms,
    };
    let cases = [
        (
            vec![weight("aws", "aws", 1.0)],
            "link aws-aws joins a node to itself",
        ),
        (vec![weight("aws", "gcp", f64::NAN)], "weight_ms = NaN"),
        (
            vec![weight("aws", "gcp", 1.0), weight("gcp", "aws", 2.0)],
            "listed twice (1 ms and 2 ms)",
        ),
    ];
    for (weights, message) in cases {
        let config = PathConfig {
            weights,
            ..PathConfig::default()
        };
        let err = config.validate().expect_err(message).to_string();
        assert!(err.contains(message), "{err}");
    }
    let negative = PathConfig {
        loss_penalty_ms: -1.0,
        ..PathConfig::default()
    };
    assert!(negative
        .validate()
        .expect_err("negative")
        .to_string()
        .starts_with("loss_penalty_ms = -1"));
}

#[test]
fn fifty_node_full_mesh_recomputes_quickly() {
    let names: Vec<String> = (0..50).map(|i| format!("n{i:02}")).collect();
    let nodes: Vec<(&str, bool)> = names.iter().map(|n| (n.as_str(), true)).collect();
    let mut sim = Sim::new(&nodes, PathConfig::default());
    let mut rng = StdRng::seed_from_u64(7);
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            sim.link(a, b, rng.gen_range(5.0..300.0), rng.gen_range(0.0..2.0));
        }
    }
    sim.report_all();
    let started = Instant::now();
    let changed = sim.engine.recompute(sim.now);
    let elapsed = started.elapsed();
    assert_eq!(changed.len(), 50);
    assert!(
        elapsed < Duration::from_secs(1),
        "recompute took {elapsed:?}"
    );
    for p in sim.engine.pairs(sim.now) {
        assert!(p.primary_cost_ms.is_some(), "{p:?}");
        assert_eq!(sim.primary(&p.a, &p.b).label(), p.primary);
    }
}

/// The incremental engine decides again only what changed; after any sequence
/// of events it must agree with an engine that decides every pair every time.
#[test]
fn incremental_decisions_agree_with_a_full_recompute() {
    const NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "t1", "t2"];
    let config = PathConfig {
        weights: vec![super::LinkWeight {
            a: "a".into(),
            b: "t1".into(),
            weight_ms: 7.0,
        }],
        ..PathConfig::default()
    };
    let mut checked = 0usize;
    for seed in 0..150u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut inc = PathEngine::new(config.clone());
        let mut full = PathEngine::new(config.clone());
        let mut now = Instant::now();
        let mut members: BTreeMap<&str, bool> = BTreeMap::new();
        for step in 0..120 {
            let name = NAMES[rng.gen_range(0..NAMES.len())];
            let peer = NAMES[rng.gen_range(0..NAMES.len())];
            let random_sample = |rng: &mut StdRng, peer: &str| {
                // Few distinct values, so costs tie, cross thresholds and repeat.
                let rtt = [10.0, 20.0, 21.0, 30.0, 45.0, 60.0, 100.0][rng.gen_range(0..7)];
                let loss = [0.0, 0.0, 0.0, 1.0, 3.0][rng.gen_range(0..5)];
                sample(peer, rtt, loss, rng.gen_bool(0.85))
            };
            let event = rng.gen_range(0..100);
            match event {
                0..=9 => {
                    let transit = name.starts_with('t') || rng.gen_bool(0.1);
                    members.insert(name, transit);
                    inc.upsert_node(name, transit);
                    full.upsert_node(name, transit);
                }
                10..=12 => {
                    members.remove(name);
                    inc.remove_node(name);
                    full.remove_node(name);
                }
                13..=32 => {
                    let mut links: Vec<LinkSample> = Vec::new();
                    for p in NAMES {
                        if p != name && rng.gen_bool(0.8) {
                            links.push(random_sample(&mut rng, p));
                        }
                    }
                    let report = LinkReport { links };
                    inc.report(name, &report, now);
                    full.report(name, &report, now);
                }
                33..=57 => {
                    let changed = vec![random_sample(&mut rng, peer)];
                    inc.report_changes(name, &changed, now);
                    full.report_changes(name, &changed, now);
                }
                58..=62 => {
                    let live = rng.gen_bool(0.5);
                    inc.set_live(name, live, now);
                    full.set_live(name, live, now);
                }
                63..=69 => {
                    let o = match rng.gen_range(0..5) {
                        0 => None,
                        1 => Some(LinkOverride {
                            disabled: true,
                            ..LinkOverride::default()
                        }),
                        2 => Some(LinkOverride {
                            weight_ms: Some(rng.gen_range(0.0..50.0)),
                            ..LinkOverride::default()
                        }),
                        3 => Some(LinkOverride {
                            pin: Some(Via::Direct),
                            ..LinkOverride::default()
                        }),
                        _ => Some(LinkOverride {
                            pin: Some(via(NAMES[rng.gen_range(0..NAMES.len())])),
                            ..LinkOverride::default()
                        }),
                    };
                    let a = inc.set_override(name, peer, o.clone());
                    let b = full.set_override(name, peer, o.clone());
                    assert_eq!(a, b);
                }
                70..=84 => {
                    now += Duration::from_millis(rng.gen_range(0..7_000));
                }
                _ => {
                    let a = inc.recompute(now);
                    let b = full.recompute_from_scratch(now);
                    assert_eq!(a, b, "seed {seed} step {step}: changed nodes differ");
                    for node in members.keys() {
                        assert_eq!(
                            inc.paths_for(node),
                            full.paths_for(node),
                            "seed {seed} step {step}: paths of {node} differ"
                        );
                    }
                    assert_eq!(
                        inc.pairs(now),
                        full.pairs(now),
                        "seed {seed} step {step}: pair views differ"
                    );
                    assert_eq!(inc.links(now), full.links(now));
                    checked += 1;
                    continue;
                }
            }
        }
    }
    assert!(checked > 1_000, "only {checked} comparisons");
}

/// The reason a steady mesh costs nothing: with no new input, a recompute
/// decides no pair, and a link change away from transit nodes decides one.
#[test]
fn a_recompute_decides_only_what_changed() {
    let names: Vec<String> = (0..200).map(|i| format!("n{i:03}")).collect();
    let mut engine = PathEngine::new(PathConfig::default());
    let mut now = Instant::now();
    for (i, n) in names.iter().enumerate() {
        engine.upsert_node(n, i < 2);
        engine.set_live(n, true, now);
    }
    for (i, a) in names.iter().enumerate() {
        let links = names
            .iter()
            .filter(|b| *b != a)
            .map(|b| sample(b, 50.0 + (i % 7) as f64, 0.0, true))
            .collect();
        engine.report(a, &LinkReport { links }, now);
    }
    assert_eq!(engine.recompute(now).len(), 200);
    now += Duration::from_secs(60);
    assert_eq!(engine.pending(), 0);
    assert!(engine.recompute(now).is_empty());
    // Live reporters never go stale, so no timer is waiting either.
    assert_eq!(engine.poll_timeout(), None);
    // A link between two non-transit nodes: one pair to decide.
    engine.report_changes("n100", &[sample("n101", 500.0, 0.0, true)], now);
    assert_eq!(engine.pending(), 1);
    // A jitter below the reporting threshold: nothing.
    engine.report_changes("n100", &[sample("n102", 51.0, 0.0, true)], now);
    assert_eq!(engine.pending(), 1);
    // A link of a transit node: every pair that may cross it.
    engine.report_changes("n000", &[sample("n150", 500.0, 0.0, true)], now);
    assert_eq!(engine.pending(), 1 + 199);
    let changed: Vec<(String, PathSpec)> = engine
        .recompute_paths(now, |_| true)
        .map(|(n, s)| (n.to_string(), s.to_spec()))
        .collect();
    assert!(!changed.is_empty());
    for (node, spec) in &changed {
        let ends = [node.as_str(), spec.dest.as_str()];
        assert!(
            ends.contains(&"n150") || (ends.contains(&"n100") && ends.contains(&"n101")),
            "{node} -> {spec:?} changed, but none of its inputs did"
        );
    }
    assert_eq!(engine.pending(), 0);
}

/// A joining node's pairs wait for it to report its links (an agent's first
/// report of a session comes before its netmap, so it is empty): decided on
/// the direct link its peers measured first, a pair would move through a
/// transit a hold later, when the node's own links arrive; two path changes
/// to send and a last change to keep, for every pair of every node joining.
#[test]
fn a_joining_node_is_decided_once_its_own_links_are_known() {
    let primary = |engine: &PathEngine, from: &str, to: &str| {
        let spec = engine.paths_for(from).into_iter().find(|p| p.dest == to);
        spec.map(|p| (p.primary, p.backup))
    };
    let report = |engine: &mut PathEngine, from: &str, links: &[(&str, f64)], now| {
        let links = links
            .iter()
            .map(|(p, ms)| sample(p, *ms, 0.0, true))
            .collect();
        engine.report(from, &LinkReport { links }, now);
    };
    let mut engine = PathEngine::new(PathConfig::default());
    let mut now = Instant::now();
    for (n, transit) in [("a", false), ("t", true)] {
        engine.upsert_node(n, transit);
        engine.set_live(n, true, now);
    }
    report(&mut engine, "a", &[("t", 10.0)], now);
    report(&mut engine, "t", &[("a", 10.0)], now);
    engine.recompute(now);

    // x joins and sends its empty first report; a measures its link to x.
    engine.upsert_node("x", false);
    engine.set_live("x", true, now);
    report(&mut engine, "x", &[], now);
    engine.report_changes("a", &[sample("x", 200.0, 0.0, true)], now);
    assert!(engine.recompute(now).is_empty(), "decided before x's links");
    now += SECOND;
    engine.report_changes(
        "x",
        &[sample("a", 200.0, 0.0, true), sample("t", 10.0, 0.0, true)],
        now,
    );
    assert_eq!(engine.recompute(now), ["a", "t", "x"]);
    assert_eq!(
        primary(&engine, "a", "x"),
        Some((via("t"), Some(Via::Direct)))
    );
    for _ in 0..10 {
        now += SECOND;
        assert!(engine.recompute(now).is_empty(), "x's pairs moved again");
    }

    // A node whose session ends before it reports a link is decided without it...
    engine.upsert_node("y", false);
    engine.set_live("y", true, now);
    engine.report_changes("a", &[sample("y", 20.0, 0.0, true)], now);
    engine.report_changes("t", &[sample("y", 10.0, 0.0, true)], now);
    assert!(engine.recompute(now).is_empty(), "decided before y's links");
    engine.set_live("y", false, now);
    assert!(engine.recompute(now).contains(&"y".to_string()));
    assert_eq!(
        primary(&engine, "a", "y"),
        Some((Via::Direct, Some(via("t"))))
    );

    // ...and one that reports none is waited for a hold, no longer.
    engine.upsert_node("z", false);
    engine.set_live("z", true, now);
    engine.report_changes("a", &[sample("z", 20.0, 0.0, true)], now);
    engine.report_changes("t", &[sample("z", 10.0, 0.0, true)], now);
    now += PathConfig::default().hold - SECOND;
    assert!(engine.recompute(now).is_empty(), "decided before the hold");
    now += SECOND + Duration::from_millis(1);
    assert!(engine.recompute(now).contains(&"z".to_string()));
    assert_eq!(
        primary(&engine, "a", "z"),
        Some((Via::Direct, Some(via("t"))))
    );
}
