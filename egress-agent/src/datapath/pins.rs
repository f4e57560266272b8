//! Where the agent keeps its pinned state on bpffs, and how it gets there.
//!
//! ```text
//! <bpffs>/v2/maps/<MAP>                    maps, reused across restarts
//! <bpffs>/v2/links/<ifindex>-<hook>-<ifname> TCX links, so programs stay attached
//! ```
//! The `v2` folder is the map-layout version: a future layout change uses a new folder, so
//! a new agent never misreads maps pinned by an old one.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Version of the pinned map layout; bump when a map's type, key or value type changes.
pub(super) const LAYOUT_VERSION: &str = "v2";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/egress-gateway";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum PinError {
    #[error("cannot create pin folder {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot mount bpffs at {path}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot read pin folder {path}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}")]
    Remove { path: PathBuf, source: io::Error },
}

/// The agent's pin folders under one `--bpffs` path.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn versioned(&self) -> PathBuf {
        self.root.join(LAYOUT_VERSION)
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.versioned().join("links")
    }

    /// Creates the folders, root-only, mounting a bpffs at the root when it is not on one.
    pub fn prepare(&self) -> Result<(), PinError> {
        create_private_dir(&self.root)?;
        if !is_bpffs(&self.root) {
            mount_bpffs(&self.root)?;
            set_private(&self.root)?;
        }
        for dir in [self.versioned(), self.maps_dir(), self.links_dir()] {
            create_private_dir(&dir)?;
        }
        Ok(())
    }

    /// Removes pins of other layout versions. Called once this agent's own attachments are
    /// in place: until then the old programs keep traffic flowing; afterwards their links
    /// would only run stale code next to ours. Old maps are never read (their layout may
    /// differ); their state is rebuilt, so connections translated by an older version may
    /// need to reconnect once. Returns the folders removed.
    pub fn remove_other_versions(&self) -> Result<Vec<PathBuf>, PinError> {
        let entries = fs::read_dir(&self.root).map_err(|source| PinError::ReadDir {
            path: self.root.clone(),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_version = name
                .strip_prefix('v')
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if is_version && name != LAYOUT_VERSION && entry.path().is_dir() {
                remove_tree(&entry.path())?;
                fs::remove_dir(entry.path()).map_err(|source| PinError::Remove {
                    path: entry.path(),
                    source,
                })?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Removes every pin: maps go when no program uses them, links detach.
    pub fn remove_all(&self) -> Result<(), PinError> {
        if !self.root.exists() {
            return Ok(());
        }
        remove_tree(&self.root)?;
        // A bpffs the agent mounted itself is unmounted; a failure just leaves it mounted.
        if is_bpffs(&self.root) && !self.root.parent().is_some_and(is_bpffs) {
            let path = CString::new(self.root.as_os_str().as_bytes()).expect("path without NUL");
            // SAFETY: valid C string.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.root);
        Ok(())
    }
}

fn create_private_dir(path: &Path) -> Result<(), PinError> {
    fs::create_dir_all(path).map_err(|source| PinError::CreateDir {
        path: path.into(),
        source,
    })?;
    set_private(path)
}

fn set_private(path: &Path) -> Result<(), PinError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|source| {
        PinError::CreateDir {
            path: path.into(),
            source,
        }
    })
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data, filled by the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let ret = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    ret == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    let target = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let fstype = CString::new("bpf").expect("literal");
    // SAFETY: valid C strings; no data argument.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(PinError::Mount {
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn remove_tree(path: &Path) -> Result<(), PinError> {
    let entries = fs::read_dir(path).map_err(|source| PinError::ReadDir {
        path: path.into(),
        source,
    })?;
    for entry in entries.flatten() {
        let child = entry.path();
        if child.is_dir() {
            remove_tree(&child)?;
            fs::remove_dir(&child).map_err(|source| PinError::Remove {
                path: child.clone(),
                source,
            })?;
        } else {
            fs::remove_file(&child).map_err(|source| PinError::Remove {
                path: child.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_layout_versions_are_removed_and_ours_kept() {
        let root = std::env::temp_dir().join(format!("egress-pins-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        let ours = format!("{LAYOUT_VERSION}/maps");
        for dir in ["v0/maps", ours.as_str(), "v7/links", "notes"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("v0/maps/EGRESS_POLICIES"), b"old layout").unwrap();
        let removed = layout.remove_other_versions().unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!root.join("v0").exists() && !root.join("v7").exists());
        assert!(root.join(&ours).exists() && root.join("notes").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
