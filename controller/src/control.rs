//! The control channel, controller side: a QUIC endpoint with rustls where agents
//! enroll (server-authenticated TLS, a join token) and then connect with mutual
//! TLS to register and receive their netmap and its updates.
//!
//! Until a connection has authenticated (a client certificate of a live node,
//! or an enrollment request read whole) it is held under [`PRE_AUTH`]: at most
//! 256 at once, at the cap the one that has waited longest makes room (so a
//! flood of silent connections cannot lock an agent out), 10 s from its arrival
//! to its handshake, its stream and its first frame, which may be
//! [`MAX_ENROLL_FRAME`](skymesh_wire::control::MAX_ENROLL_FRAME) bytes for an enrollment. The QUIC receive
//! windows are sized for what agents send (a registration within the prefix
//! cap, link reports), not for the netmaps the controller sends.
//!
//! Once authenticated, a node has one session (a newer connection closes its
//! older one before anything is read from it), at most twice
//! as many sessions as enrolled nodes are open in all, and every frame an agent
//! sends is bounded by what it needs: its registration by the configured prefix
//! cap ([`max_register_frame`](skymesh_wire::control::max_register_frame)), a link report by the enrolled nodes
//! ([`max_links_frame`](skymesh_wire::control::max_links_frame)). A larger header is refused at once.
//!
//! The hub is one task that owns the fabric (`crate::fabric::Fabric`): it follows the store's node
//! records through a watch (so a change made by any controller replica reaches
//! every agent) and fans the resulting messages out to the sessions. Each
//! session is a task per agent connection that writes the hub's frames to the
//! agent's stream.
//!
//! Files: `server.rs` the QUIC endpoint and the sessions, `hub.rs` the netmap
//! hub, `outbox.rs` what waits for one agent, `sessions.rs` the session cap.

mod hub;
mod outbox;
mod server;
mod sessions;

pub use hub::{Hub, PathsQuery, PathsSnapshot, SessionId};
pub use server::{bind, large_writes, serve, server_config, Control, PRE_AUTH};
