//! A disk that is slow or fails on demand: a small in-memory filesystem
//! served through FUSE by the test process, whose writes and fsyncs fail
//! with EIO, or whose fsyncs wait, when a test says so. The router under
//! test runs as another process and cannot tell it from a real disk; the
//! test holds the knobs. Privileged: mounting needs root and /dev/fuse.
//!
//! Only what a spool needs: directories, regular files (read, write at an
//! offset, truncate, rename, unlink) and fsync. Attributes are never cached
//! by the kernel (TTL 0), so a size the test changes is seen at once.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// What the test controls.
#[derive(Default)]
pub struct Faults {
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    /// While true, fsyncs wait (`held` counts them).
    holding: Mutex<bool>,
    released: Condvar,
    held: AtomicU64,
    /// fsyncs answered, successfully or not.
    pub syncs: AtomicU64,
}

impl Faults {
    /// Every write fails with EIO until this is called with false.
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Every fsync fails with EIO until this is called with false.
    pub fn fail_syncs(&self, on: bool) {
        self.fail_syncs.store(on, Ordering::SeqCst);
    }

    /// From now on, fsyncs wait until [`Faults::release_syncs`].
    pub fn hold_syncs(&self) {
        *self.holding.lock().unwrap() = true;
    }

    pub fn release_syncs(&self) {
        *self.holding.lock().unwrap() = false;
        self.released.notify_all();
    }

    /// fsyncs waiting now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Waits until an fsync is being held, panicking after `within`.
    pub fn wait_for_held_sync(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.held() == 0 {
            assert!(
                Instant::now() < deadline,
                "no fsync reached the held disk within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn sync(&self) -> Result<(), Errno> {
        let mut holding = self.holding.lock().unwrap();
        if *holding {
            self.held.fetch_add(1, Ordering::SeqCst);
            while *holding {
                holding = self.released.wait(holding).unwrap();
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        drop(holding);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(Errno::EIO);
        }
        Ok(())
    }
}

/// The mounted filesystem; unmounted (lazily) when dropped.
pub struct FaultFs {
    path: PathBuf,
    pub faults: Arc<Faults>,
    session: Option<BackgroundSession>,
}

impl FaultFs {
    /// Mounts an empty filesystem at a fresh directory named after `tag`.
    pub fn mount(tag: &str) -> FaultFs {
        crate::require_root();
        assert!(
            Path::new("/dev/fuse").exists(),
            "the fault-injecting filesystem needs /dev/fuse (modprobe fuse)"
        );
        let path = std::env::temp_dir().join(format!("m2m-faultfs-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&path);
        let faults = Arc::new(Faults::default());
        let tree = Tree::new();
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("m2m-faultfs".into()), MountOption::RW];
        let session = fuser::spawn_mount(
            Fs {
                tree: Mutex::new(tree),
                faults: faults.clone(),
            },
            &path,
            &config,
        )
        .unwrap_or_else(|e| panic!("mounting the FUSE filesystem at {}: {e}", path.display()));
        FaultFs {
            path,
            faults,
            session: Some(session),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // A held fsync would keep a file busy: let everything finish.
        self.faults.release_syncs();
        drop(self.session.take());
        let _ = std::fs::remove_dir(&self.path);
    }
}

enum Node {
    Dir(BTreeMap<OsString, u64>),
    File(Vec<u8>),
}

struct Tree {
    nodes: HashMap<u64, Node>,
    next: u64,
}

const TTL: Duration = Duration::ZERO;

impl Tree {
    fn new() -> Tree {
        let mut nodes = HashMap::new();
        nodes.insert(INodeNo::ROOT.0, Node::Dir(BTreeMap::new()));
        Tree {
            nodes,
            next: INodeNo::ROOT.0 + 1,
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match self.nodes.get(&ino)? {
            Node::Dir(_) => (FileType::Directory, 0, 0o755, 2),
            Node::File(data) => (FileType::RegularFile, data.len() as u64, 0o644, 1),
        };
        let now = SystemTime::now();
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(entries)) => Ok(entries),
            Some(Node::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(data)) => Ok(data),
            Some(Node::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        let ino = self.next;
        let entries = self.dir(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_owned(), ino);
        self.nodes.insert(ino, node);
        self.next += 1;
        Ok(ino)
    }
}

struct Fs {
    tree: Mutex<Tree>,
    faults: Arc<Faults>,
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut tree = self.tree.lock().unwrap();
        let found = tree.dir(parent.0).map(|e| e.get(name).copied());
        match found {
            Ok(Some(ino)) => reply.entry(&TTL, &tree.attr(ino).unwrap(), Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.lock().unwrap().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut tree = self.tree.lock().unwrap();
        if let Some(size) = size {
            match tree.file(ino.0) {
                Ok(data) => data.resize(size as usize, 0),
                Err(e) => return reply.error(e),
            }
        }
        match tree.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let mut tree = self.tree.lock().unwrap();
        match tree.add(parent.0, name, Node::Dir(BTreeMap::new())) {
            Ok(ino) => reply.entry(&TTL, &tree.attr(ino).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut tree = self.tree.lock().unwrap();
        match tree.add(parent.0, name, Node::File(Vec::new())) {
            Ok(ino) => reply.created(
                &TTL,
                &tree.attr(ino).unwrap(),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut tree = self.tree.lock().unwrap();
        match tree.dir(parent.0).map(|e| e.remove(name)) {
            Ok(Some(ino)) => {
                tree.nodes.remove(&ino);
                reply.ok();
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree.lock().unwrap();
        let ino = match tree.dir(parent.0).map(|e| e.remove(name)) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(e),
        };
        match tree
            .dir(newparent.0)
            .map(|e| e.insert(newname.to_owned(), ino))
        {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    tree.nodes.remove(&old);
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut tree = self.tree.lock().unwrap();
        match tree.file(ino.0) {
            Ok(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.faults.fail_writes.load(Ordering::SeqCst) {
            return reply.error(Errno::EIO);
        }
        let mut tree = self.tree.lock().unwrap();
        match tree.file(ino.0) {
            Ok(data) => {
                let end = offset as usize + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[offset as usize..end].copy_from_slice(bytes);
                reply.written(bytes.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Answered from a thread of its own, so that a held fsync does not
        // hold the other requests (the session has one thread).
        let faults = self.faults.clone();
        std::thread::spawn(move || match faults.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut tree = self.tree.lock().unwrap();
        let entries: Vec<(u64, FileType, OsString)> = match tree.dir(ino.0) {
            Ok(entries) => entries
                .iter()
                .map(|(n, i)| (*i, n.clone()))
                .collect::<Vec<_>>(),
            Err(e) => return reply.error(e),
        }
        .into_iter()
        .map(|(i, n)| {
            let kind = match tree.nodes.get(&i) {
                Some(Node::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (i, kind, n)
        })
        .collect();
        let dots = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        for (i, (child, kind, name)) in dots
            .into_iter()
            .chain(entries)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}
