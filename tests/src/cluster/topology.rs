//! The network of a cluster: namespaces, the underlay bridge, nodes, the destination, and
//! what tests change in it (second interfaces, links, addresses).

use std::{fs, net::Ipv4Addr};

use anyhow::Result;

use super::{Cluster, ROUTER_IP, SECONDARY_ROUTER_IP, lock};
use crate::{
    peer,
    process::{ip, ip_in, netns_command, run_checked, sysctl_in},
};

impl Cluster {
    pub(super) fn create_netns(&self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        lock(&self.resources).namespaces.push(name.to_string());
        ip_in(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    pub(super) fn build_underlay(&mut self) -> Result<()> {
        let ul = self.underlay.clone();
        self.create_netns(&ul)?;
        sysctl_in(
            &ul,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        ip_in(&ul, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(
            &ul,
            &["addr", "add", &format!("{ROUTER_IP}/24"), "dev", "br0"],
        )?;
        ip_in(&ul, &["link", "set", "br0", "up"])?;
        Ok(())
    }

    pub(super) fn build_node(&mut self, index: usize) -> Result<()> {
        let node = self.nodes[index].clone();
        let ns = &node.netns;
        self.create_netns(ns)?;
        // rp_filter off: the egress datapath legitimately sees asymmetric paths.
        sysctl_in(
            ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let router_port = format!("{}n{}", self.if_prefix, node.number);
        ip_in(
            ns,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &router_port,
                "netns",
                &self.underlay,
            ],
        )?;
        ip_in(
            ns,
            &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
        )?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &self.underlay,
            &["link", "set", &router_port, "master", "br0", "up"],
        )?;
        self.set_router_port_napi(&router_port, true)?;
        ip_in(
            ns,
            &["route", "add", "default", "via", &ROUTER_IP.to_string()],
        )?;
        // What a plain CNI does: pods leaving the pod network are masqueraded to the node IP.
        let ruleset = "table ip cni-nat {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname \"eth0\" masquerade\n\
             \t}\n\
             }\n";
        let ruleset_path = self.work_dir.join(format!("nft-{}.conf", node.name));
        fs::write(&ruleset_path, ruleset)?;
        run_checked(netns_command(
            ns,
            &["nft", "-f", &ruleset_path.to_string_lossy()],
        ))?;
        Ok(())
    }

    /// Flat routed pod network: each node and the router route every other pod CIDR to its node.
    pub(super) fn build_pod_routes(&self) -> Result<()> {
        for target in &self.nodes {
            let via = target.ip.to_string();
            ip_in(
                &self.underlay,
                &["route", "add", &target.pod_cidr, "via", &via],
            )?;
            for node in self.nodes.iter().filter(|node| node.name != target.name) {
                ip_in(
                    &node.netns,
                    &["route", "add", &target.pod_cidr, "via", &via],
                )?;
            }
        }
        Ok(())
    }

    pub(super) fn build_destination(&self) -> Result<()> {
        let dst = &self.destination;
        self.create_netns(dst)?;
        let router_port = format!("{}dst", self.if_prefix);
        ip_in(
            &self.underlay,
            &[
                "link",
                "add",
                &router_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                dst,
            ],
        )?;
        ip_in(
            &self.underlay,
            &["addr", "add", "198.51.100.1/24", "dev", &router_port],
        )?;
        ip_in(&self.underlay, &["link", "set", &router_port, "up"])?;
        ip_in(
            dst,
            &[
                "addr",
                "add",
                &format!("{}/24", peer::DESTINATION_IP),
                "dev",
                "eth0",
            ],
        )?;
        ip_in(dst, &["link", "set", "eth0", "up"])?;
        ip_in(dst, &["route", "add", "default", "via", "198.51.100.1"])?;
        Ok(())
    }

    /// Gives a node eth1 on the second network 192.0.2.0/24 (address 192.0.2.1N, N the node's
    /// number; the router is 192.0.2.1), via the router.
    pub fn add_secondary_interface(&mut self, node: &str) -> Result<Ipv4Addr> {
        let index = self.node_index(node)?;
        if let Some(existing) = self.nodes[index].secondary_ip {
            return Ok(existing);
        }
        let address = Ipv4Addr::new(192, 0, 2, 10 + self.nodes[index].number);
        self.add_secondary_link(&self.nodes[index].name.clone(), "eth1")?;
        let node = &self.nodes[index];
        ip_in(
            &node.netns,
            &["addr", "add", &format!("{address}/24"), "dev", "eth1"],
        )?;
        // Source routing, as operators set up for a second NIC: traffic from eth1's subnet
        // (including egress IPs added there) leaves through eth1's own router.
        ip_in(
            &node.netns,
            &["rule", "add", "from", "192.0.2.0/24", "table", "100"],
        )?;
        self.nodes[index].secondary_ip = Some(address);
        Ok(address)
    }

    /// Adds another interface (`eth1`, `eth2`, ...) on the second network 192.0.2.0/24, without
    /// an address, with a route through the router in table 100 (used for sources of that
    /// network). Addresses are added with `add_address` or moved with `move_address`.
    pub fn add_secondary_link(&mut self, node: &str, interface: &str) -> Result<()> {
        let index = self.node_index(node)?;
        if !self.secondary_bridge {
            ip_in(&self.underlay, &["link", "add", "br1", "type", "bridge"])?;
            ip_in(
                &self.underlay,
                &[
                    "addr",
                    "add",
                    &format!("{SECONDARY_ROUTER_IP}/24"),
                    "dev",
                    "br1",
                ],
            )?;
            ip_in(&self.underlay, &["link", "set", "br1", "up"])?;
            self.secondary_bridge = true;
        }
        let node = &self.nodes[index];
        let suffix = interface.trim_start_matches("eth");
        let router_port = format!("{}s{}{suffix}", self.if_prefix, node.number);
        ip_in(
            &node.netns,
            &[
                "link",
                "add",
                interface,
                "type",
                "veth",
                "peer",
                "name",
                &router_port,
                "netns",
                &self.underlay,
            ],
        )?;
        // Several interfaces on one network: each answers ARP only for its own addresses
        // (as multi-homed hosts are configured), or the router may send an egress IP's
        // traffic to an interface that no longer holds it.
        sysctl_in(
            &node.netns,
            &[&format!("net.ipv4.conf.{interface}.arp_ignore=1")],
        )?;
        ip_in(&node.netns, &["link", "set", interface, "up"])?;
        ip_in(
            &self.underlay,
            &["link", "set", &router_port, "master", "br1", "up"],
        )?;
        Self::add_secondary_route(&node.netns, interface)?;
        Ok(())
    }

    /// `default via 192.0.2.1 dev <interface> table 100` (what a network manager restores
    /// when the link comes back up); eth1's has the lowest metric, so it is preferred unless
    /// a lookup asks for another interface.
    pub(super) fn add_secondary_route(netns: &str, interface: &str) -> Result<()> {
        let metric = format!(
            "{}",
            100 + interface
                .trim_start_matches("eth")
                .parse::<u32>()
                .unwrap_or(50)
        );
        ip_in(
            netns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &SECONDARY_ROUTER_IP.to_string(),
                "dev",
                interface,
                "table",
                "100",
                "metric",
                &metric,
                "onlink",
            ],
        )?;
        Ok(())
    }

    /// A veth sends what XDP redirects out of it (the probe responder's answers) to its
    /// peer's NAPI, which a veth has only with GRO on (or an XDP program of its own);
    /// without it the kernel drops the frame, as a NIC driver without XDP transmit would. A
    /// physical underlay has no such peer, so the router's ports have it on.
    fn set_router_port_napi(&self, router_port: &str, on: bool) -> Result<()> {
        run_checked(netns_command(
            &self.underlay,
            &[
                "ethtool",
                "-K",
                router_port,
                "gro",
                if on { "on" } else { "off" },
            ],
        ))?;
        Ok(())
    }

    /// Makes the underlay drop (`false`) or carry (`true`) what XDP on the node's eth0
    /// sends back: the probe responder's answers are lost, everything else flows.
    pub fn set_xdp_tx_delivered(&self, node: &str, delivered: bool) -> Result<()> {
        let node = self.node(node)?;
        let router_port = format!("{}n{}", self.if_prefix, node.number);
        self.set_router_port_napi(&router_port, delivered)
    }

    /// `ip link set <interface> up|down` on a node. Bringing a second-network interface back
    /// up restores its table-100 route, which the kernel removed when it went down.
    pub fn set_link(&self, node: &str, interface: &str, up: bool) -> Result<()> {
        let node = self.node(node)?;
        let state = if up { "up" } else { "down" };
        ip_in(&node.netns, &["link", "set", interface, state])?;
        if up && interface != "eth0" && self.secondary_bridge {
            Self::add_secondary_route(&node.netns, interface)?;
        }
        Ok(())
    }

    /// Moves an address from one interface of a node to another and makes the router forget
    /// where it was (what the gratuitous ARP of a real move does).
    pub fn move_address(&self, node: &str, cidr: &str, from: &str, to: &str) -> Result<()> {
        self.remove_address(node, from, cidr)?;
        self.add_address(node, to, cidr)?;
        let address = cidr.split('/').next().unwrap_or(cidr);
        let _ = ip_in(&self.underlay, &["neigh", "flush", "to", address]);
        Ok(())
    }

    /// Adds an address (`192.0.2.200/24`) to an interface of a node, e.g. for a policy's egressIP.
    pub fn add_address(&self, node: &str, interface: &str, cidr: &str) -> Result<()> {
        let node = self.node(node)?;
        ip_in(&node.netns, &["addr", "add", cidr, "dev", interface])?;
        Ok(())
    }

    pub fn remove_address(&self, node: &str, interface: &str, cidr: &str) -> Result<()> {
        let node = self.node(node)?;
        ip_in(&node.netns, &["addr", "del", cidr, "dev", interface])?;
        Ok(())
    }
}
