//! This node's interfaces, addresses and routes, and the agent's VXLAN device, through
//! rtnetlink.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::{AddressAttribute, AddressProtocol},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo},
    route::{RouteAddress, RouteAttribute, RouteHeader},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkVxlan, RouteMessageBuilder};
use thiserror::Error;

/// `IFA_PROTO` of the floating egress IPs the agent adds (the address's `proto` in recent
/// iproute2): how a restarted agent finds one an earlier run left, also when its policy is
/// gone.
pub const FLOATING_ADDRESS_PROTO: u8 = 0xE6;

/// VXLAN and outer IPv4/UDP/Ethernet headers the tunnel adds.
pub const TUNNEL_OVERHEAD: u32 = 50;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what}")]
    Request {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("interface {0} exists but is not a VXLAN device; pick another --tunnel-device")]
    NotVxlan(String),
    #[error("tunnel device {0} vanished right after it was created")]
    TunnelMissing(String),
}

type Result<T, E = NetlinkError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Administratively up and with carrier: packets sent through it can leave.
    pub up: bool,
    pub kind: Option<String>,
    pub ipv4: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub oif: Option<u32>,
}

/// A snapshot of the node's IPv4 networking.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub links: Vec<Link>,
    /// Routes of the main table.
    pub routes: Vec<Route>,
}

impl Snapshot {
    /// Interface the main table routes `ip` through (longest prefix match), as the kernel
    /// would for a pod's address on a routed CNI.
    pub fn route_lookup(&self, ip: Ipv4Addr) -> Option<u32> {
        self.routes
            .iter()
            .filter(|route| route.destination.contains(&ip))
            .filter_map(|route| Some((route.destination.prefix_len(), route.oif?)))
            .max_by_key(|(prefix, _)| *prefix)
            .map(|(_, oif)| oif)
    }

    pub fn default_route_ifindex(&self) -> Option<u32> {
        self.routes
            .iter()
            .find(|route| route.destination.prefix_len() == 0)
            .and_then(|route| route.oif)
    }

    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|link| link.index == index)
    }
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a route-netlink connection, served by a task on the current runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        let request = |what| move |source| NetlinkError::Request { what, source };
        let mut links = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(message) = stream.try_next().await.map_err(request("link dump"))? {
            let mut link = Link {
                index: message.header.index,
                name: String::new(),
                mtu: 0,
                up: message
                    .header
                    .flags
                    .contains(LinkFlags::Up | LinkFlags::Running),
                kind: None,
                ipv4: Vec::new(),
            };
            for attribute in message.attributes {
                match attribute {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(kind) = info {
                                link.kind = Some(kind_name(&kind));
                            }
                        }
                    }
                    _ => {}
                }
            }
            links.push(link);
        }
        let mut stream = self.handle.address().get().execute();
        while let Some(message) = stream.try_next().await.map_err(request("address dump"))? {
            let index = message.header.index;
            let Some(link) = links.iter_mut().find(|link| link.index == index) else {
                continue;
            };
            for attribute in message.attributes {
                if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attribute {
                    link.ipv4.push(ip);
                }
            }
        }
        let mut routes = Vec::new();
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(filter).execute();
        while let Some(message) = stream.try_next().await.map_err(request("route dump"))? {
            let mut table = u32::from(message.header.table);
            let mut destination = Ipv4Addr::UNSPECIFIED;
            let mut oif = None;
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = *ip,
                    RouteAttribute::Oif(index) => oif = Some(*index),
                    RouteAttribute::Table(id) => table = *id,
                    _ => {}
                }
            }
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            if let Ok(destination) =
                Ipv4Net::new(destination, message.header.destination_prefix_length)
            {
                routes.push(Route { destination, oif });
            }
        }
        Ok(Snapshot { links, routes })
    }

    /// Creates the agent's VXLAN device in external (`collect_md`) mode if it is missing, and
    /// returns its interface index. An existing VXLAN device of that name is adopted.
    pub async fn ensure_tunnel(&self, name: &str, port: u16, mtu: u32) -> Result<u32> {
        let snapshot = self.snapshot().await?;
        if let Some(link) = snapshot.links.iter().find(|link| link.name == name) {
            if link.kind.as_deref() != Some("vxlan") {
                return Err(NetlinkError::NotVxlan(name.into()));
            }
            self.set_up(link.index).await?;
            return Ok(link.index);
        }
        let message = LinkMessageBuilder::<LinkVxlan>::new(name)
            .port(port)
            .collect_metadata(true)
            .learning(false)
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "create tunnel device",
                source,
            })?;
        let snapshot = self.snapshot().await?;
        snapshot
            .links
            .iter()
            .find(|link| link.name == name)
            .map(|link| link.index)
            .ok_or_else(|| NetlinkError::TunnelMissing(name.into()))
    }

    async fn set_up(&self, index: u32) -> Result<()> {
        let message = rtnetlink::LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "set tunnel device up",
                source,
            })
    }

    /// Adds `ip`/32 to interface `index` (a floating egress IP this node now holds);
    /// already there is fine.
    pub async fn add_address(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let mut request = self.handle.address().add(index, ip.into(), 32).replace();
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::Other(
                FLOATING_ADDRESS_PROTO,
            )));
        request
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "add a floating egress IP",
                source,
            })
    }

    /// The addresses marked `FLOATING_ADDRESS_PROTO`, with their interface: floating
    /// egress IPs a run of the agent added.
    pub async fn floating_addresses(&self) -> Result<Vec<(Ipv4Addr, u32)>> {
        let mut stream = self.handle.address().get().execute();
        let mut found = Vec::new();
        while let Some(message) =
            stream
                .try_next()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: "address dump",
                    source,
                })?
        {
            let ours = message.attributes.iter().any(|attribute| {
                matches!(attribute, AddressAttribute::Protocol(protocol)
                    if u8::from(*protocol) == FLOATING_ADDRESS_PROTO)
            });
            let local = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
            if let (true, Some(ip)) = (ours, local) {
                found.push((ip, message.header.index));
            }
        }
        Ok(found)
    }

    /// Removes `ip` from interface `index`; not there is fine.
    pub async fn remove_address(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(ip.into())
            .execute();
        let request = |what| move |source| NetlinkError::Request { what, source };
        while let Some(message) = stream.try_next().await.map_err(request("address dump"))? {
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(request("remove a floating egress IP"))?;
        }
        Ok(())
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "delete tunnel device",
                source,
            })
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(destination: &str, oif: u32) -> Route {
        Route {
            destination: destination.parse().unwrap(),
            oif: Some(oif),
        }
    }

    #[test]
    fn route_lookup_takes_the_longest_prefix() {
        let snapshot = Snapshot {
            links: vec![],
            routes: vec![
                route("0.0.0.0/0", 2),
                route("10.244.1.0/24", 3),
                route("10.244.1.10/32", 7),
            ],
        };
        assert_eq!(
            snapshot.route_lookup("10.244.1.10".parse().unwrap()),
            Some(7)
        );
        assert_eq!(
            snapshot.route_lookup("10.244.1.11".parse().unwrap()),
            Some(3)
        );
        assert_eq!(snapshot.route_lookup("8.8.8.8".parse().unwrap()), Some(2));
        assert_eq!(snapshot.default_route_ifindex(), Some(2));
    }
}
