//! Test kit for m2m-router's integration tests and benchmarks.
//!
//! - [`bpffs`]: a bpf file system of the test's own, for pinned XDP state;
//! - [`netns`]: network namespaces joined by a veth pair, removed on drop,
//!   and a way to run code inside one;
//! - [`dtls`], [`certs`]: a DTLS client with a PSK or a certificate, and a
//!   test PKI that issues certificates;
//! - [`frames`]: the differential corpus of Ethernet frames;
//! - [`libcoap`]: libcoap's example server and a long-running client;
//! - [`packet`]: an Ethernet/VLAN/IPv4/IPv6/UDP/CoAP frame builder;
//! - [`disk`]: a small tmpfs that fills up and gets room back on demand;
//! - [`faultfs`]: a FUSE filesystem whose writes and fsyncs fail or wait
//!   on demand;
//! - [`verdict`]: the XDP program's verdict for a frame beside the reference's;
//! - [`require_root`]: privileged tests fail loudly, never skip.

pub mod bpffs;
pub mod certs;
pub mod daemon;
pub mod disk;
pub mod dtls;
pub mod faultfs;
pub mod frames;
pub mod libcoap;
pub mod mqtt;
pub mod netns;
pub mod packet;
pub mod verdict;

/// Fails the calling test with the reason when it cannot run here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test loads XDP programs and creates network namespaces: it must run as root \
             (use `cargo xtask test` as root); it does not skip itself"
        );
    }
}

/// The Python interpreter with aiocoap 0.4.17 (PyPI) that `cargo xtask
/// test` installs and names in `M2M_TEST_PYTHON`; fails the calling test
/// with the reason when there is none.
pub fn aiocoap_python() -> String {
    let python = std::env::var("M2M_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "M2M_TEST_PYTHON is not set: this test runs aiocoap (PyPI) as the device; \
             `cargo xtask test` installs it into a venv and sets the variable"
        )
    });
    let ok = std::process::Command::new(&python)
        .args(["-c", "import aiocoap"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{python} cannot import aiocoap (M2M_TEST_PYTHON)");
    python
}

/// A file of the test kit's own, e.g. `peers/aiocoap_transfer.py`.
pub fn kit_file(name: &str) -> String {
    format!("{}/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A tiny deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `<tmp>/m2m-<tag>-<pid>-<n><suffix>`: a name no other test of any
/// process uses, even when tests running in parallel pass the same tag.
pub fn unique_temp_path(tag: &str, suffix: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("m2m-{tag}-{}-{n}{suffix}", std::process::id()))
}

/// A file removed when the test ends (pass or fail).
pub struct TempPath(pub std::path::PathBuf);

impl TempPath {
    /// A [`unique_temp_path`] ending `.<ext>`, written with `contents`.
    pub fn with_contents(tag: &str, ext: &str, contents: impl AsRef<[u8]>) -> TempPath {
        let path = unique_temp_path(tag, &format!(".{ext}"));
        std::fs::write(&path, contents).expect("write a temporary file");
        TempPath(path)
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("temporary paths are UTF-8")
    }
}

impl std::ops::Deref for TempPath {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
