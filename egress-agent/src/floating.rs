//! Floating egress IPs: the candidate that is first by name among those up holds the address
//! on its egress interface and announces it with gratuitous ARP; the others do not hold it.
//! Each candidate decides from its own probes of the candidates before it, so no agreement
//! protocol is needed: while two candidates disagree (a partition) both may hold it for a
//! moment, which breaks nothing, since no gateway keeps per-flow state for a floating IP (the
//! pod's node translates, and any holder sends a reply to the node owning its port's block).

use std::{
    collections::BTreeMap,
    fs, io, mem,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{chain::Chain, netlink::Netlink};

/// A floating egress IP this node is a candidate of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingTarget {
    pub ifindex: u32,
    pub interface: String,
    /// The candidates ahead of this node, by name.
    pub candidates_before: Vec<Ipv4Addr>,
}

/// Whether this node holds the address: it can serve, is not being drained (no flow state
/// lives on a gateway of a floating IP, so a draining one hands over at once), and every
/// candidate before it is out (`is_out`: down, draining, or not heard from yet).
pub fn should_hold(
    target: &FloatingTarget,
    self_serving: bool,
    self_draining: bool,
    is_out: impl Fn(Ipv4Addr) -> bool,
) -> bool {
    self_serving && !self_draining && target.candidates_before.iter().all(|ip| is_out(*ip))
}

/// How often a newly held address is announced (once per probe round).
const ANNOUNCEMENTS: u8 = 3;
/// How often a held address is announced again: a neighbour that missed the first
/// announcements (or heard another holder's, in a partition) learns it within this.
const REANNOUNCE: Duration = Duration::from_secs(5);

/// An address this node holds.
struct Held {
    ifindex: u32,
    interface: String,
    /// Announcements still to send one round after the other.
    left: u8,
    last_announced: Option<Instant>,
}

/// What to change: addresses to release (with their interface) and to take.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub release: Vec<(Ipv4Addr, u32)>,
    pub take: Vec<(Ipv4Addr, u32)>,
}

/// What an earlier run of the agent may have left, released on the first pass unless wanted.
#[derive(Debug, Default)]
pub struct Leftovers<'a> {
    /// Every floating IP this node is a candidate of, on its interface.
    pub known: Option<&'a BTreeMap<Ipv4Addr, FloatingTarget>>,
    /// The addresses marked as the agent's (`FLOATING_ADDRESS_PROTO`), on their interface:
    /// also those of policies deleted while no agent ran.
    pub marked: &'a [(Ipv4Addr, u32)],
}

/// The changes that make `held` (address -> interface) equal `wanted`: an address moves by
/// release and take; `leftovers` not wanted on their interface are released too.
pub fn plan(
    held: &BTreeMap<Ipv4Addr, u32>,
    wanted: &BTreeMap<Ipv4Addr, u32>,
    leftovers: &Leftovers<'_>,
) -> Changes {
    let mut changes = Changes::default();
    for (ip, ifindex) in held {
        if wanted.get(ip) != Some(ifindex) {
            changes.release.push((*ip, *ifindex));
        }
    }
    let known = leftovers
        .known
        .into_iter()
        .flatten()
        .map(|(ip, target)| (*ip, target.ifindex));
    for (ip, ifindex) in known.chain(leftovers.marked.iter().copied()) {
        let left = wanted.get(&ip) != Some(&ifindex) && held.get(&ip) != Some(&ifindex);
        if left && !changes.release.contains(&(ip, ifindex)) {
            changes.release.push((ip, ifindex));
        }
    }
    for (ip, ifindex) in wanted {
        if held.get(ip) != Some(ifindex) {
            changes.take.push((*ip, *ifindex));
        }
    }
    changes
}

/// Adds and removes the floating addresses (netlink), and announces them.
pub struct Holder {
    runtime: tokio::runtime::Runtime,
    netlink: Netlink,
    held: BTreeMap<Ipv4Addr, Held>,
    /// Whether a first pass (which also removes addresses an earlier run left) went through.
    started: bool,
}

impl Holder {
    pub fn new() -> anyhow::Result<Holder> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let netlink = runtime.block_on(async { Netlink::connect() })?;
        Ok(Holder {
            runtime,
            netlink,
            held: BTreeMap::new(),
            started: false,
        })
    }

    /// Makes this node hold exactly the addresses of `wanted` (ip -> ifindex, interface) among
    /// `known` (every floating IP this node is a candidate of). A failed release is retried
    /// at the next call.
    pub fn apply(
        &mut self,
        wanted: &BTreeMap<Ipv4Addr, (u32, String)>,
        known: &BTreeMap<Ipv4Addr, FloatingTarget>,
    ) {
        let held: BTreeMap<Ipv4Addr, u32> = self
            .held
            .iter()
            .map(|(ip, held)| (*ip, held.ifindex))
            .collect();
        let wanted_ifindex = wanted
            .iter()
            .map(|(ip, (ifindex, _))| (*ip, *ifindex))
            .collect();
        // Until the first sweep went through whole (each failure is retried next round).
        let mut swept = true;
        let marked = if self.started {
            Vec::new()
        } else {
            self.runtime
                .block_on(self.netlink.floating_addresses())
                .unwrap_or_else(|error| {
                    swept = false;
                    tracing::debug!(error = %Chain(&error), "cannot look for floating egress IPs an earlier run left");
                    Vec::new()
                })
        };
        let leftovers = Leftovers {
            known: (!self.started).then_some(known),
            marked: &marked,
        };
        let changes = plan(&held, &wanted_ifindex, &leftovers);
        for (ip, ifindex) in changes.release {
            match self
                .runtime
                .block_on(self.netlink.remove_address(ifindex, ip))
            {
                Ok(()) => {
                    if self.held.remove(&ip).is_some() {
                        info!(egress_ip = %ip, ifindex, "floating egress IP released");
                    }
                }
                Err(error) => {
                    swept = false;
                    warn!(egress_ip = %ip, error = %Chain(&error), "cannot release the floating egress IP");
                }
            }
        }
        for (ip, ifindex) in changes.take {
            let interface = wanted
                .get(&ip)
                .map_or_else(String::new, |(_, name)| name.clone());
            if self.held.contains_key(&ip) {
                // Still on its old interface: released first (failed above), retried later.
                continue;
            }
            match self.runtime.block_on(self.netlink.add_address(ifindex, ip)) {
                Ok(()) => {
                    info!(egress_ip = %ip, interface, "floating egress IP taken");
                    let held = Held {
                        ifindex,
                        interface,
                        left: ANNOUNCEMENTS,
                        last_announced: None,
                    };
                    self.held.insert(ip, held);
                }
                Err(error) => {
                    warn!(egress_ip = %ip, error = %Chain(&error), "cannot take the floating egress IP");
                }
            }
        }
        for (ip, held) in &mut self.held {
            let due = held.left > 0
                || held
                    .last_announced
                    .is_none_or(|at| at.elapsed() >= REANNOUNCE);
            if !due {
                continue;
            }
            held.left = held.left.saturating_sub(1);
            held.last_announced = Some(Instant::now());
            if let Err(error) = gratuitous_arp(&held.interface, held.ifindex, *ip) {
                warn!(egress_ip = %ip, error = %error, "cannot announce the floating egress IP");
            }
        }
        self.started = self.started || swept;
    }
}

/// The ARP payload of a gratuitous ARP request for `ip` from `mac`: who-has `ip` tell `ip`,
/// which updates every neighbour's entry for it (as `arping -U` sends it).
pub fn gratuitous_arp_payload(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut payload = [0u8; 28];
    payload[0..2].copy_from_slice(&1_u16.to_be_bytes()); // Ethernet
    payload[2..4].copy_from_slice(&0x0800_u16.to_be_bytes()); // IPv4
    payload[4] = 6;
    payload[5] = 4;
    payload[6..8].copy_from_slice(&1_u16.to_be_bytes()); // request
    payload[8..14].copy_from_slice(&mac);
    payload[14..18].copy_from_slice(&ip.octets());
    // Target hardware address zero, target protocol address the IP itself.
    payload[24..28].copy_from_slice(&ip.octets());
    payload
}

fn interface_mac(interface: &str) -> io::Result<[u8; 6]> {
    let text = fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .ok_or_else(|| io::Error::other("short MAC address"))?;
        *byte = u8::from_str_radix(part, 16).map_err(io::Error::other)?;
    }
    Ok(mac)
}

/// Broadcasts a gratuitous ARP for `ip` out of `interface` (needs `CAP_NET_RAW`).
fn gratuitous_arp(interface: &str, ifindex: u32, ip: Ipv4Addr) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let payload = gratuitous_arp_payload(interface_mac(interface)?, ip);
    // SAFETY: a plain socket call; the descriptor is closed below.
    let socket = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_ll is valid; the fields the kernel reads are set below.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = ETH_P_ARP.to_be();
    address.sll_ifindex = i32::try_from(ifindex).unwrap_or(0);
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: payload and address are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            socket,
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const address).cast(),
            u32::try_from(mem::size_of::<libc::sockaddr_ll>()).unwrap_or(0),
        )
    };
    let result = if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closes the descriptor opened above.
    unsafe { libc::close(socket) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);

    #[test]
    fn the_first_candidate_up_holds_the_address() {
        let first = FloatingTarget {
            ifindex: 3,
            interface: "eth1".into(),
            candidates_before: vec![],
        };
        assert!(should_hold(&first, true, false, |_| false));
        assert!(
            !should_hold(&first, false, false, |_| false),
            "cannot serve"
        );
        assert!(!should_hold(&first, true, true, |_| false), "drained");
        let second = FloatingTarget {
            candidates_before: vec![A],
            ..first
        };
        assert!(!should_hold(&second, true, false, |_| false));
        assert!(should_hold(&second, true, false, |ip| ip == A));
    }

    fn target(ifindex: u32) -> FloatingTarget {
        FloatingTarget {
            ifindex,
            interface: "eth1".into(),
            candidates_before: vec![],
        }
    }

    #[test]
    fn plans_release_what_is_not_wanted_and_move_by_release_and_take() {
        const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
        const C: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 101);
        let known = BTreeMap::from([(B, target(3)), (C, target(3))]);
        // First pass: a known address not wanted is released even if this run never took it.
        let first_pass = Leftovers {
            known: Some(&known),
            marked: &[],
        };
        let first = plan(&BTreeMap::new(), &BTreeMap::from([(B, 3)]), &first_pass);
        assert_eq!(first.release, [(C, 3)]);
        assert_eq!(first.take, [(B, 3)]);
        // Later: only what is held and not wanted.
        let later = plan(
            &BTreeMap::from([(B, 3)]),
            &BTreeMap::new(),
            &Leftovers::default(),
        );
        assert_eq!(later.release, [(B, 3)]);
        assert!(later.take.is_empty());
        // Moved to another interface.
        let moved = plan(
            &BTreeMap::from([(B, 3)]),
            &BTreeMap::from([(B, 4)]),
            &Leftovers::default(),
        );
        assert_eq!((moved.release, moved.take), (vec![(B, 3)], vec![(B, 4)]));
        // Nothing to do.
        let steady = plan(
            &BTreeMap::from([(B, 3)]),
            &BTreeMap::from([(B, 3)]),
            &Leftovers::default(),
        );
        assert_eq!(steady, Changes::default());
    }

    /// An address marked as the agent's whose policy went while no agent ran is released on
    /// the first pass; a marked one still wanted there stays.
    #[test]
    fn marked_addresses_nobody_wants_are_released_on_the_first_pass() {
        const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
        const GONE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 150);
        let marked = [(B, 3), (GONE, 3), (B, 5)];
        let first_pass = Leftovers {
            known: None,
            marked: &marked,
        };
        let changes = plan(&BTreeMap::new(), &BTreeMap::from([(B, 3)]), &first_pass);
        assert_eq!(changes.release, [(GONE, 3), (B, 5)]);
        assert_eq!(changes.take, [(B, 3)], "taken again (and announced)");
    }

    #[test]
    fn gratuitous_arp_asks_for_its_own_address() {
        let payload = gratuitous_arp_payload([2, 0, 0, 0, 0, 1], A);
        assert_eq!(&payload[6..8], &[0, 1], "a request");
        assert_eq!(&payload[14..18], &A.octets(), "sender");
        assert_eq!(&payload[24..28], &A.octets(), "target");
        assert_eq!(&payload[18..24], &[0; 6]);
    }
}
