//! A small disk for fault tests: a tmpfs of a given size, which fills up
//! when a test wants it to and grows (remount) when it should have room
//! again.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// A tmpfs mounted on a fresh directory; unmounted and removed on drop.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` bytes. Needs root.
    pub fn mount(tag: &str, size: usize) -> SmallDisk {
        let dir = crate::unique_temp_path(tag, "");
        let _ = std::fs::create_dir_all(&dir);
        let disk = SmallDisk(dir);
        disk.mount_with(0, size);
        disk
    }

    /// Changes the size in place (files are kept): room returns, or runs out.
    pub fn resize(&self, size: usize) {
        self.mount_with(libc::MS_REMOUNT, size);
    }

    fn mount_with(&self, flags: libc::c_ulong, size: usize) {
        let target = CString::new(self.0.to_str().unwrap()).unwrap();
        let options = CString::new(format!("size={size}")).unwrap();
        // SAFETY: every pointer is a valid NUL-terminated string.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let target = CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}
