//! A persisted fast path (`[fastpath] persist`): the XDP links and maps
//! pinned in a bpf file system, so that they outlive the daemon and the
//! next one adopts them. A pinned link keeps its program attached with no
//! process holding it (bpf(2), BPF_OBJ_PIN); a pinned map keeps its
//! contents: policy, rate state, counters.
//!
//! Layout, one directory per network namespace (interface names and map
//! names are only unique within one):
//!
//! ```text
//! <pin_dir>/netns-<inode>/maps/<MAP>            every map of the object
//! <pin_dir>/netns-<inode>/peer_name_hashes      which peer each id was
//! <pin_dir>/netns-<inode>/links/<iface>/<mode>  one link per interface
//! ```
//!
//! bpffs refuses names with a dot (they are kept for its own files), so a
//! `.` in an interface name (`eth0.100`) is written `%2e`, and `%` `%25`.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapInfo};
use router_common::maps::{self as names, MAX_PEERS};

use super::{AttachedMode, FastpathError};

/// statfs(2) f_type of a bpf file system (linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// The directory of the calling process's network namespace under
    /// `root` (not created yet).
    pub fn for_this_netns(root: &Path) -> io::Result<PinDir> {
        let netns = fs::metadata("/proc/self/ns/net")?.ino();
        Ok(PinDir {
            dir: root.join(format!("netns-{netns}")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directories, on a bpf file system or not at all.
    pub fn create(&self) -> Result<(), FastpathError> {
        let not_bpffs = |what: String| FastpathError::Pins {
            dir: self.dir.clone(),
            problem: what,
        };
        // Checked before creating anything: directories made on another
        // file system would pin nothing.
        let mut existing = self.dir.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        if !on_bpffs(existing) {
            return Err(not_bpffs(format!(
                "{} is not on a bpf file system (mount one: `mount -t bpf bpf /sys/fs/bpf`, \
                 or set [fastpath] pin_dir)",
                existing.display()
            )));
        }
        for sub in ["maps", "links"] {
            fs::create_dir_all(self.dir.join(sub))
                .map_err(|e| not_bpffs(format!("creating {sub}: {e}")))?;
        }
        Ok(())
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// Whether an earlier run left its maps here.
    pub fn has_maps(&self) -> bool {
        self.map_path(names::ACTIVE_TABLES).exists()
    }

    /// Unpins every pinned map whose type, key, value or size differs from
    /// the object's (a newer program with a changed map): the new program
    /// gets a fresh one, the old keeps its own until the link is updated.
    /// Returns the names dropped.
    pub fn drop_changed_maps(&self, object: &[u8]) -> Result<Vec<String>, FastpathError> {
        let object = aya_obj::Object::parse(object).map_err(|e| FastpathError::Pins {
            dir: self.dir.clone(),
            problem: format!("reading the XDP object's maps: {e}"),
        })?;
        let mut dropped = Vec::new();
        for name in names::ALL {
            let path = self.map_path(name);
            let (Some(want), Ok(have)) = (object.maps.get(name), MapInfo::from_pin(&path)) else {
                continue;
            };
            let fits = have.map_type().map(|t| t as u32).ok() == Some(want.map_type())
                && have.key_size() == want.key_size()
                && have.value_size() == want.value_size()
                && have.max_entries() == want.max_entries();
            if !fits {
                fs::remove_file(&path).map_err(|e| self.error(&path, e))?;
                dropped.push(name.to_owned());
            }
        }
        Ok(dropped)
    }

    /// The map of which peer name each id stood for (hashes; see
    /// [`name_hash`]), opened or created. Only the daemon reads it: a peer
    /// id that now names another peer must start with zero counters.
    pub fn peer_names(&self) -> Result<Array<MapData, u64>, FastpathError> {
        let path = self.dir.join("peer_name_hashes");
        let map_error = |source| FastpathError::Map {
            map: "peer_name_hashes",
            source,
        };
        if !path.exists() {
            let map = Array::<MapData, u64>::create(MAX_PEERS, 0).map_err(map_error)?;
            map.pin(&path).map_err(|e| FastpathError::Pins {
                dir: self.dir.clone(),
                problem: format!("pinning peer_name_hashes: {}", super::chain(&e)),
            })?;
        }
        let data = MapData::from_pin(&path).map_err(map_error)?;
        Array::try_from(aya::maps::Map::Array(data)).map_err(map_error)
    }

    fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link_path(&self, iface: &str, mode: AttachedMode) -> PathBuf {
        self.links().join(escape(iface)).join(mode_name(mode))
    }

    /// The pinned link of `iface`, and the mode it was attached in.
    pub fn link(&self, iface: &str) -> Option<(PathBuf, AttachedMode)> {
        [AttachedMode::Native, AttachedMode::Generic]
            .into_iter()
            .map(|mode| (self.link_path(iface, mode), mode))
            .find(|(path, _)| path.exists())
    }

    /// Interfaces with a pinned link, and their modes.
    pub fn interfaces(&self) -> Vec<(String, AttachedMode)> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        let mut found: Vec<(String, AttachedMode)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let iface = unescape(e.file_name().to_str()?);
                let (_, mode) = self.link(&iface)?;
                Some((iface, mode))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Detaches `iface`'s persisted program (every interface's with
    /// `None`) by unpinning its link; once no link is left, the maps go
    /// too. Returns the interfaces detached.
    pub fn detach(&self, iface: Option<&str>) -> io::Result<Vec<(String, AttachedMode)>> {
        let mut detached = Vec::new();
        for (name, mode) in self.interfaces() {
            if iface.is_none_or(|i| i == name) {
                let path = self.link_path(&name, mode);
                fs::remove_file(&path).map_err(|e| self.error_io(&path, e))?;
                let _ = fs::remove_dir(self.links().join(escape(&name)));
                detached.push((name, mode));
            }
        }
        if self.interfaces().is_empty() && self.dir.exists() {
            // Unpinning a map frees it once no program uses it.
            fs::remove_dir_all(&self.dir).map_err(|e| self.error_io(&self.dir, e))?;
        }
        Ok(detached)
    }

    fn error(&self, path: &Path, e: io::Error) -> FastpathError {
        FastpathError::Pins {
            dir: self.dir.clone(),
            problem: format!("{}: {e}", path.display()),
        }
    }

    fn error_io(&self, path: &Path, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}

fn escape(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

fn unescape(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

pub fn mode_name(mode: AttachedMode) -> &'static str {
    match mode {
        AttachedMode::Native => "native",
        AttachedMode::Generic => "generic",
    }
}

fn on_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes one struct statfs we own; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// What `peer_name_hashes` holds for a peer name: FNV-1a, never 0 (0 is
/// "no peer").
pub fn name_hash(name: &str) -> u64 {
    if name.is_empty() {
        return 0;
    }
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    h.max(1)
}
