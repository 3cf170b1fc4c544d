//! Ready-made topologies. [`AgentPair`]: two namespaces on one underlay segment, each
//! running an agent that knows the other, each with a VPC subnet behind it.

use crate::agent::{Agent, AgentSpec, Keypair, PeerSpec};
use crate::netns::{Netns, Veth};
use crate::TestEnv;
use anyhow::Result;

/// Underlay address of side A.
pub const A_UNDERLAY: &str = "192.0.2.1";
/// Underlay address of side B.
pub const B_UNDERLAY: &str = "192.0.2.2";
/// Overlay address of side A.
pub const A_OVERLAY: &str = "100.96.0.1";
/// Overlay address of side B.
pub const B_OVERLAY: &str = "100.96.0.2";
/// VPC address behind A (on `lo` in A's namespace).
pub const A_VPC: &str = "10.10.0.1";
/// VPC address behind B.
pub const B_VPC: &str = "10.20.0.1";
/// Name of the underlay veth on both sides.
pub const UNDERLAY_IF: &str = "ul0";

/// Two agents wired back to back: A (192.0.2.1, 100.96.0.1, VPC 10.10/16) and
/// B (192.0.2.2, 100.96.0.2, VPC 10.20/16), each with the other's endpoint.
///
/// Field order is drop order: agents stop before their namespaces go away.
pub struct AgentPair {
    /// Agent A.
    pub a: Agent,
    /// Agent B.
    pub b: Agent,
    /// The underlay link (end A is in `a_ns`).
    pub link: Veth,
    /// A's namespace.
    pub a_ns: Netns,
    /// B's namespace.
    pub b_ns: Netns,
}

impl AgentPair {
    /// Builds and starts the pair with default specs.
    pub fn start(env: &TestEnv) -> Result<Self> {
        Self::start_with(env, |_, _| {})
    }

    /// Builds the pair, lets `customize` edit both specs (A's, B's), then starts both agents.
    pub fn start_with(
        env: &TestEnv,
        customize: impl FnOnce(&mut AgentSpec, &mut AgentSpec),
    ) -> Result<Self> {
        let a_ns = env.netns("a")?;
        let b_ns = env.netns("b")?;
        let link = Veth::connect(
            &a_ns,
            &format!("{A_UNDERLAY}/24"),
            &b_ns,
            &format!("{B_UNDERLAY}/24"),
            UNDERLAY_IF,
        )?;
        a_ns.add_local_address(&format!("{A_VPC}/32"))?;
        b_ns.add_local_address(&format!("{B_VPC}/32"))?;
        let a_keys = Keypair::generate()?;
        let b_keys = Keypair::generate()?;
        let mut a_spec = AgentSpec::new(&format!("{A_OVERLAY}/32")).peer(
            PeerSpec::new(
                "b",
                &b_keys.public,
                &[&format!("{B_OVERLAY}/32"), "10.20.0.0/16"],
            )
            .endpoint(&format!("{B_UNDERLAY}:51820")),
        );
        let mut b_spec = AgentSpec::new(&format!("{B_OVERLAY}/32")).peer(
            PeerSpec::new(
                "a",
                &a_keys.public,
                &[&format!("{A_OVERLAY}/32"), "10.10.0.0/16"],
            )
            .endpoint(&format!("{A_UNDERLAY}:51820")),
        );
        customize(&mut a_spec, &mut b_spec);
        let mut a = Agent::new(env, &a_ns, "a", a_keys, a_spec)?;
        let mut b = Agent::new(env, &b_ns, "b", b_keys, b_spec)?;
        a.start()?;
        b.start()?;
        Ok(Self {
            a,
            b,
            link,
            a_ns,
            b_ns,
        })
    }
}
