//! The netlink driver: brings the TUN interface up with its address and MTU and
//! keeps one route per allowed prefix, through rtnetlink (never by running `ip`).

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::IpAddr;

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(anyhow!(e)).context(format!("looking up link {name}")),
        }
    }

    /// Sets the MTU and brings the link up; the address comes with the netmap.
    pub async fn configure(&self, index: u32, mtu: u16) -> Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .txqueuelen(1000)
                    .build(),
            )
            .execute()
            .await
            .context("setting the MTU")?;
        // Like the kernel's WireGuard: no IPv6 link-local address, so the kernel
        // sends no router solicitations or MLD reports into the tunnel. Best effort:
        // a kernel without IPv6 refuses it and that is fine.
        let no_ll = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
            .build();
        if let Err(e) = self.handle.link().set(no_ll).execute().await {
            tracing::debug!(error = %e, "could not disable IPv6 link-local addressing");
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .context("bringing the link up")?;
        Ok(())
    }

    pub async fn add_address(&self, index: u32, address: IpNet) -> Result<()> {
        self.handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding address {address}"))
    }

    /// Removes an address (the overlay address changed); absent is fine.
    pub async fn del_address(&self, index: u32, address: IpNet) -> Result<()> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await.context("listing addresses")? {
            let matches = msg.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(ip) if *ip == address.addr())
            });
            if matches {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .with_context(|| format!("removing address {address}"))?;
            }
        }
        Ok(())
    }

    pub async fn del_route(&self, index: u32, net: IpNet) -> Result<()> {
        match self.handle.route().del(route(index, net)).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(anyhow!(e)).context(format!("removing route {net}")),
        }
    }

    pub async fn add_route(&self, index: u32, net: IpNet) -> Result<()> {
        let msg = route(index, net);
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route {net}"))
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(anyhow!(e)).context("deleting the interface"),
        }
    }
}

fn route(index: u32, net: IpNet) -> rtnetlink::packet_route::route::RouteMessage {
    let net = net.trunc();
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.addr(), net.prefix_len())
        .map(|b| b.output_interface(index).build())
        .unwrap_or_default()
}
