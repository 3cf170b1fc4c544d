//! `skymesh-controller`: enrollment, IPAM, path computation, REST API and the AI
//! gateway. Not implemented yet: agents run in static mode until it lands.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-V") => {
            println!("skymesh-controller {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "skymesh-controller {}: the controller is not implemented yet; run agents in static mode (see README)",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::FAILURE
        }
    }
}
