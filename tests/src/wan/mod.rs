//! The lab's userspace WAN emulator. The kernel here has no netem, so the WAN is
//! an L2 switch in its own namespace: one port (a veth end) per site gateway, and
//! for every ordered pair of ports a [`shaper::PairShape`] that applies one-way
//! delay, jitter, loss, rate and MTU, and can be cut or changed while traffic
//! flows.
//!
//! [`shaper`] is the sans-IO core (time and randomness injected); [`switch`] is
//! the driver that moves frames between AF_PACKET sockets.

pub mod shaper;
pub mod switch;

pub use shaper::{Lateness, PairShape, Shaper};
pub use switch::{Switch, SwitchHandle};
