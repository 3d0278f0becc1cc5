//! A bpf file system of the test's own, for pinned XDP links and maps:
//! mounted on a fresh directory, unmounted (dropping every pin in it) when
//! the guard goes.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    pub fn mount(tag: &str) -> BpfFs {
        let path = PathBuf::from(format!("/tmp/m2m-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the bpffs mount point");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t bpf on {} failed: the kernel needs CONFIG_BPF_SYSCALL and the test root",
            path.display()
        );
        BpfFs { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}
