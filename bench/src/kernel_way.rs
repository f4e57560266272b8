//! The kernel way of doing egress, as iptables-based tools do it, built with ip and nft
//! commands and no agent: on the pod's node, a fwmark on the pod's traffic to the
//! destination CIDR and a policy-routing table into a VXLAN device towards the gateway; on
//! the gateway, SNAT to its IP with conntrack, and a route sending the pod's replies back
//! through the VXLAN.

use std::{fs, net::Ipv4Addr};

use anyhow::Result;
use egress_tests::{
    Cluster, Node, Pod,
    process::{ip_in, netns_command, run_checked},
};

/// VNI and UDP port of the kernel-way VXLAN (not the agent's 8475).
const VNI: &str = "100";
const PORT: &str = "4789";
const DEVICE: &str = "vxk";
const MARK: &str = "0x64";
const TABLE: &str = "100";
const POD_NODE_TUNNEL_IP: &str = "10.99.0.1";
const GATEWAY_TUNNEL_IP: &str = "10.99.0.2";

/// Steers `pod`'s traffic to `destination` through `gateway`, `SNATed` to the gateway's IP.
pub(crate) fn build(
    cluster: &Cluster,
    pod: &Pod,
    pod_node: &Node,
    gateway: &Node,
    destination: &str,
) -> Result<()> {
    vxlan(&pod_node.netns, pod_node.ip, gateway.ip, POD_NODE_TUNNEL_IP)?;
    vxlan(&gateway.netns, gateway.ip, pod_node.ip, GATEWAY_TUNNEL_IP)?;

    let node = &pod_node.netns;
    ip_in(
        node,
        &[
            "route",
            "add",
            "default",
            "via",
            GATEWAY_TUNNEL_IP,
            "dev",
            DEVICE,
            "table",
            TABLE,
        ],
    )?;
    // The VXLAN's own packets carry the mark too (the outer route lookup uses it): underlay
    // destinations stay in the main table, or the tunnel would route into itself.
    let underlay = format!("{}/24", gateway.ip);
    ip_in(
        node,
        &[
            "rule", "add", "to", &underlay, "lookup", "main", "priority", "99",
        ],
    )?;
    ip_in(
        node,
        &[
            "rule", "add", "fwmark", MARK, "lookup", TABLE, "priority", "100",
        ],
    )?;
    nft(
        cluster,
        node,
        "mark",
        &format!(
            "table ip kernel-egress {{\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority mangle; policy accept;\n\
             \t\tip saddr {} ip daddr {destination} meta mark set {MARK}\n\
             \t}}\n\
             }}\n",
            pod.ip
        ),
    )?;

    let gw = &gateway.netns;
    // Replies, de-NATed by conntrack, go back through the tunnel, not the flat pod route.
    ip_in(
        gw,
        &[
            "route",
            "add",
            &format!("{}/32", pod.ip),
            "via",
            POD_NODE_TUNNEL_IP,
            "dev",
            DEVICE,
        ],
    )?;
    nft(
        cluster,
        gw,
        "snat",
        &format!(
            "table ip kernel-egress {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n\
             \t\tip saddr {} oifname \"eth0\" snat to {}\n\
             \t}}\n\
             }}\n",
            pod.ip, gateway.ip
        ),
    )?;
    Ok(())
}

fn vxlan(netns: &str, local: Ipv4Addr, remote: Ipv4Addr, address: &str) -> Result<()> {
    let (local, remote) = (local.to_string(), remote.to_string());
    ip_in(
        netns,
        &[
            "link", "add", DEVICE, "type", "vxlan", "id", VNI, "local", &local, "remote", &remote,
            "dstport", PORT, "dev", "eth0",
        ],
    )?;
    ip_in(
        netns,
        &["addr", "add", &format!("{address}/30"), "dev", DEVICE],
    )?;
    ip_in(netns, &["link", "set", DEVICE, "up"])?;
    Ok(())
}

fn nft(cluster: &Cluster, netns: &str, name: &str, ruleset: &str) -> Result<()> {
    let path = cluster
        .work_dir()
        .join(format!("nft-kernel-way-{name}.conf"));
    fs::write(&path, ruleset)?;
    run_checked(netns_command(
        netns,
        &["nft", "-f", &path.to_string_lossy()],
    ))?;
    Ok(())
}
