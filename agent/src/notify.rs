//! systemd service notification (`Type=notify`): sends a state such as `READY=1`
//! or `STOPPING=1` to `$NOTIFY_SOCKET` when set; does nothing otherwise.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let Ok(addr) = addr else { return };
    if let Ok(sock) = UnixDatagram::unbound() {
        if let Err(e) = sock.send_to_addr(state.as_bytes(), &addr) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}
