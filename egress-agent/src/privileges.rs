//! Least privilege: the agent needs root powers to load programs, mount bpffs and create
//! its tunnel, but only `CAP_BPF`, `CAP_NET_ADMIN` (map updates, TCX attachments for new
//! pods, netlink) and `CAP_NET_RAW` (the gratuitous ARP of a floating egress IP it takes)
//! afterwards. And whoever can write its inputs controls egress, so those must
//! be root's alone.

use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use caps::{CapSet, Capability, CapsHashSet};
use thiserror::Error;

/// What the agent keeps after start-up.
pub const KEPT: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
];

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("cannot inspect {path}")]
    Stat {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is open to other users (owner uid {uid}, mode {mode:04o}): whoever can write \
         it controls which traffic leaves with which IP; make it root's alone \
         (chown root {path} && chmod 0700 {path})"
    )]
    NotPrivate { path: String, uid: u32, mode: u32 },
    #[error("cannot drop capabilities")]
    Caps(#[from] caps::errors::CapsError),
}

/// Refuses a folder that is not owned by root or that group or others may access.
pub fn check_private_dir(path: &Path) -> Result<(), PrivilegeError> {
    let metadata = fs::metadata(path).map_err(|source| PrivilegeError::Stat {
        path: path.display().to_string(),
        source,
    })?;
    let mode = metadata.mode() & 0o7777;
    if metadata.uid() != 0 || mode & 0o077 != 0 {
        return Err(PrivilegeError::NotPrivate {
            path: path.display().to_string(),
            uid: metadata.uid(),
            mode,
        });
    }
    Ok(())
}

/// Drops every capability but `KEPT` from the effective, permitted and inheritable sets,
/// and from the bounding set when the agent may change it (`CAP_SETPCAP`, which a `DaemonSet`
/// usually does not grant), so nothing it runs regains them.
pub fn drop_capabilities() -> Result<Vec<Capability>, PrivilegeError> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for capability in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&capability) {
                caps::drop(None, CapSet::Bounding, capability)?;
            }
        }
    }
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    let mut kept: Vec<Capability> = kept.into_iter().collect();
    kept.sort_by_key(caps::Capability::index);
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn folders_open_to_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("egress-priv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let result = check_private_dir(&dir);
        // Only root owns it as root; as another user the owner check refuses too.
        let error = result.unwrap_err().to_string();
        assert!(error.contains("open to other users"), "{error}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        // SAFETY: no arguments.
        if unsafe { libc::geteuid() } == 0 {
            check_private_dir(&dir).unwrap();
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
