//! TCX and XDP attachments: which program goes on which interface, pinned so they outlive
//! the agent, and swapped atomically for the new program when an agent restarts.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::Hash,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, TcAttachType, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use egress_common::program_names;
use tracing::{debug, info, warn};

use super::{Datapath, DatapathError, PinError, Result, program_mut, xdp_mut};
use crate::chain::Chain;

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of a local pod's host-side interface.
    FromPod,
    /// Egress of a local pod's host-side interface.
    ToPod,
    /// Ingress of the agent's VXLAN device.
    FromTunnel,
    /// Ingress of an interface holding an egress IP.
    FromEgress,
    /// XDP (driver mode) on a gateway candidate's underlay interface.
    ProbeResponder,
}

impl Hook {
    pub(super) const ALL: [Hook; 5] = [
        Hook::FromPod,
        Hook::ToPod,
        Hook::FromTunnel,
        Hook::FromEgress,
        Hook::ProbeResponder,
    ];

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::ToPod => program_names::TO_POD,
            Hook::FromTunnel => program_names::FROM_TUNNEL,
            Hook::FromEgress => program_names::FROM_EGRESS,
            Hook::ProbeResponder => program_names::PROBE_RESPONDER,
        }
    }

    /// An XDP program (the others are TC programs).
    pub(super) fn is_xdp(self) -> bool {
        self == Hook::ProbeResponder
    }

    pub(super) fn attach_type(self) -> TcAttachType {
        match self {
            Hook::ToPod => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }

    pub(super) fn from_program(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|hook| hook.program() == name)
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

/// One program on one interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub ifname: String,
    pub ifindex: u32,
    pub hook: Hook,
}

impl Attachment {
    /// `<ifindex>-<hook>-<ifname>`: bpffs refuses names with a '.', which interface names
    /// may hold (VLANs), so dots become ':', a character interface names cannot have.
    pub(super) fn pin_name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.ifindex,
            self.hook.program(),
            self.ifname.replace('.', ":")
        )
    }

    /// The kernel refused to attach (or re-attach) this program here.
    fn error(&self, source: aya::programs::ProgramError) -> DatapathError {
        DatapathError::Attach {
            hook: self.hook,
            ifname: self.ifname.clone(),
            ifindex: self.ifindex,
            source,
        }
    }

    pub(super) fn from_pin_name(name: &str) -> Option<Self> {
        let mut parts = name.splitn(3, '-');
        let ifindex = parts.next()?.parse().ok()?;
        let hook = Hook::from_program(parts.next()?)?;
        let ifname = parts.next()?.replace(':', ".");
        Some(Self {
            ifname,
            ifindex,
            hook,
        })
    }
}

impl Datapath {
    /// Attaches exactly the wanted programs: new attachments are made and pinned, pinned
    /// ones from an earlier agent get this agent's program (atomically, through the link),
    /// and attachments no longer wanted are removed. Errors for one interface do not stop
    /// the others. The probe responder is optional: where its XDP attachment is refused
    /// (a driver without XDP, another XDP program there), the TC program answers the probes;
    /// that is said once and not retried while the interface stays.
    pub fn sync_attachments(&mut self, desired: &BTreeSet<Attachment>) -> Vec<DatapathError> {
        let mut errors = Vec::new();
        let pinned = match self.pinned_attachments() {
            Ok(pinned) => pinned,
            Err(error) => return vec![error],
        };
        for (attachment, path) in &pinned {
            if !desired.contains(attachment) {
                debug!(ifname = attachment.ifname, hook = %attachment.hook, "detaching");
                if let Err(source) = fs::remove_file(path) {
                    errors.push(DatapathError::Link {
                        path: path.clone(),
                        message: source.to_string(),
                    });
                }
                self.refreshed.remove(attachment);
            }
        }
        self.xdp_refused.retain(|refused| desired.contains(refused));
        for attachment in desired {
            if self.refreshed.contains(attachment) || self.xdp_refused.contains(attachment) {
                continue;
            }
            let result = match pinned.get(attachment) {
                Some(path) => self.replace_program(attachment, path).or_else(|error| {
                    if !attachment.hook.is_xdp() {
                        return Err(error);
                    }
                    // An older responder left in place would answer on its own: start
                    // afresh (or leave the probes to the TC program).
                    let _ = fs::remove_file(path);
                    self.attach(attachment)
                }),
                None => self.attach(attachment),
            };
            match result {
                Ok(()) => {
                    self.refreshed.insert(attachment.clone());
                }
                Err(error) if attachment.hook.is_xdp() => {
                    warn!(
                        ifname = attachment.ifname,
                        error = %Chain(&error),
                        "the XDP probe responder cannot be attached; the TC program answers \
                         this gateway's health probes instead (at a higher cost per probe)"
                    );
                    self.xdp_refused.insert(attachment.clone());
                }
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    fn pinned_attachments(&self) -> Result<BTreeMap<Attachment, PathBuf>> {
        let dir = self.pins.links_dir();
        let entries = fs::read_dir(&dir).map_err(|source| PinError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                Attachment::from_pin_name(name.to_str()?).map(|a| (a, entry.path()))
            })
            .collect())
    }

    fn attach(&mut self, attachment: &Attachment) -> Result<()> {
        let path = self.pins.links_dir().join(attachment.pin_name());
        let attach_err = |source| attachment.error(source);
        let link = if attachment.hook.is_xdp() {
            // Driver mode only: generic (skb) XDP would cost every packet of the node more
            // than the probes it saves. No bpf_link (a kernel before 5.9) cannot be pinned.
            let program = xdp_mut(&mut self.ebpf, attachment.hook.program())?;
            let link_id = program
                .attach_to_if_index(attachment.ifindex, XdpMode::Driver)
                .map_err(attach_err)?;
            let link = program.take_link(link_id).map_err(attach_err)?;
            FdLink::try_from(link).map_err(|error| link_error(&path, error))?
        } else {
            self.attach_tc(attachment, &path)?
        };
        link.pin(&path).map_err(|error| link_error(&path, error))?;
        info!(ifname = attachment.ifname, hook = %attachment.hook, "attached");
        Ok(())
    }

    fn attach_tc(&mut self, attachment: &Attachment, path: &Path) -> Result<FdLink> {
        let program = program_mut(&mut self.ebpf, attachment.hook.program())?;
        let attach_err = |source| attachment.error(source);
        let link_id = program
            .attach_with_options(
                &attachment.ifname,
                attachment.hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        FdLink::try_from(link).map_err(|error| link_error(path, error))
    }

    fn replace_program(&mut self, attachment: &Attachment, path: &PathBuf) -> Result<()> {
        let link =
            FdLink::from(PinnedLink::from_pin(path).map_err(|error| link_error(path, error))?);
        let attach_err = |source| attachment.error(source);
        // The pin keeps the link alive; our descriptor can go.
        if attachment.hook.is_xdp() {
            let link = XdpLink::try_from(link).map_err(|error| link_error(path, error))?;
            let program = xdp_mut(&mut self.ebpf, attachment.hook.program())?;
            let link_id = program.attach_to_link(link).map_err(attach_err)?;
            drop(program.take_link(link_id));
        } else {
            let link =
                SchedClassifierLink::try_from(link).map_err(|error| link_error(path, error))?;
            let program = program_mut(&mut self.ebpf, attachment.hook.program())?;
            let link_id = program.attach_to_link(link).map_err(attach_err)?;
            drop(program.take_link(link_id));
        }
        debug!(ifname = attachment.ifname, hook = %attachment.hook, "adopted pinned link");
        Ok(())
    }
}

fn link_error(path: &std::path::Path, error: impl std::error::Error) -> DatapathError {
    // Keep the OS error: aya's Display stops at the syscall name.
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    DatapathError::Link {
        path: path.into(),
        message,
    }
}

#[cfg(test)]
mod pin_name_tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_without_dots() {
        let attachment = Attachment {
            ifname: "eth0.100".into(),
            ifindex: 7,
            hook: Hook::FromEgress,
        };
        let name = attachment.pin_name();
        assert!(!name.contains('.'), "bpffs refuses {name}");
        assert_eq!(Attachment::from_pin_name(&name), Some(attachment));
        assert_eq!(Attachment::from_pin_name("junk"), None);
    }
}
