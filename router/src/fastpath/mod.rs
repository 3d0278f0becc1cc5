//! The XDP fast path, seen from the daemon: load the program, fill its maps
//! from the config, attach it, read its counters.

mod pins;
mod tables;

pub use pins::PinDir;
pub use tables::{coarse_tick_ns, PolicyTables};

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;

use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{
    ProgramError, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode as AyaXdpMode,
};
use aya::{Ebpf, EbpfError, EbpfLoader};
use router_common::classify::Policy as _;
use router_common::maps::{self as names, Counter, PeerCounters, PeerPolicy, MAX_PEERS};
use router_common::reason::Reason;
use thiserror::Error;

use crate::config::{Config, Prefix, XdpMode};

/// The XDP object built by `router/build.rs`, embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("M2M_ROUTER_EBPF_OBJ"));
const PROGRAM: &str = "m2m_router";
const BASELINE: &str = "xdp_pass_baseline";

#[derive(Debug, Error)]
pub enum FastpathError {
    #[error("loading the XDP object failed")]
    Load {
        #[source]
        source: Box<EbpfError>,
    },
    #[error(
        "the kernel verifier rejected the XDP program ({io_error}).\nVerifier log:\n{verifier_log}"
    )]
    Verifier {
        io_error: io::Error,
        verifier_log: String,
    },
    #[error("loading the XDP program failed")]
    Program {
        #[source]
        source: Box<ProgramError>,
    },
    #[error("interface {iface:?} does not exist (see `ip link`)")]
    NoSuchInterface { iface: String },
    #[error("attaching XDP to {iface} in {mode} mode failed")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
        hint: String,
    },
    #[error("BPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("invalid fast-path policy: {0}")]
    Policy(String),
    #[error("persisted fast path in {}: {problem}", dir.display())]
    Pins { dir: PathBuf, problem: String },
}

/// Walks an error's sources for an OS error code.
fn os_error(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        cur = e.source();
    }
    None
}

fn permission_hint(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    match os_error(err) {
        Some(libc::EPERM) | Some(libc::EACCES) => Some(
            "loading XDP needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); \
             or run with --xdp-mode off"
                .to_owned(),
        ),
        _ => None,
    }
}

impl FastpathError {
    /// What the operator can do about the error, when we know.
    pub fn hint(&self) -> Option<String> {
        match self {
            FastpathError::Load { source } => permission_hint(&**source),
            FastpathError::Program { source } => permission_hint(&**source),
            FastpathError::Attach { hint, .. } if !hint.is_empty() => Some(hint.clone()),
            FastpathError::Map { source, .. } => permission_hint(source),
            _ => None,
        }
    }
}

/// The mode an attachment actually got (DESIGN.md invariant 4: reported,
/// never silently changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic (skb)",
        })
    }
}

/// The loaded XDP program and its maps. Dropping it detaches the program
/// from every interface (aya detaches the links it owns on drop), unless
/// it is persisted: then its links and maps stay pinned (see `pins`).
pub struct Fastpath {
    ebpf: Ebpf,
    tables: PolicyTables,
    /// Which copy of the policy tables the program reads.
    active: usize,
    attached: Vec<(String, AttachedMode)>,
    persisted: Option<Persisted>,
}

struct Persisted {
    pins: PinDir,
    /// `pins::name_hash` of each peer id's name.
    names: Array<MapData, u64>,
}

/// Loads the object, its maps pinned in `pins` (adopting those already
/// there) when given, and the program into the kernel (verifier included).
fn load_object(pins: Option<&PinDir>) -> Result<Ebpf, FastpathError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = pins
        .map(|p| names::ALL.iter().map(|&n| (n, p.map_path(n))).collect())
        .unwrap_or_default();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| FastpathError::Load {
            source: source.into(),
        })?;
    program_mut(&mut ebpf)?
        .load()
        .map_err(|source| match source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => FastpathError::Verifier {
                io_error,
                verifier_log: verifier_log.to_string(),
            },
            source => FastpathError::Program {
                source: source.into(),
            },
        })?;
    Ok(ebpf)
}

impl Fastpath {
    /// Loads the program into the kernel (verifier included) and fills the
    /// maps. Nothing is attached yet.
    pub fn load(tables: PolicyTables) -> Result<Fastpath, FastpathError> {
        let mut fastpath = Fastpath {
            ebpf: load_object(None)?,
            tables: PolicyTables::default(),
            active: 0,
            attached: Vec::new(),
            persisted: None,
        };
        fastpath.install(tables)?;
        Ok(fastpath)
    }

    /// Like [`Fastpath::load`], with the maps pinned under `root` for this
    /// network namespace. If an earlier run left them there they are
    /// adopted, counters and rate state included, and `config`'s policy
    /// is written into them the way a live change is (the running program
    /// never sees half of it); peers keep the ids they had. Returns whether
    /// it adopted.
    pub fn load_persisted(config: &Config, root: &Path) -> Result<(Fastpath, bool), FastpathError> {
        let pins = PinDir::for_this_netns(root).map_err(|e| FastpathError::Pins {
            dir: root.to_owned(),
            problem: format!("finding this network namespace: {e}"),
        })?;
        pins.create()?;
        for name in pins.drop_changed_maps(EBPF_OBJECT)? {
            tracing::warn!(map = %name, "the new program's map {name} differs from the pinned one: it starts empty");
        }
        let adopted = pins.has_maps();
        let ebpf = load_object(Some(&pins))?;
        let names = pins.peer_names()?;
        // What each id stood for, as far as the new config knows the names.
        let previous = adopted.then(|| {
            let by_hash: HashMap<u64, &str> = config
                .peers
                .iter()
                .map(|p| (pins::name_hash(&p.name), p.name.as_str()))
                .collect();
            let mut previous = PolicyTables::default();
            for id in 0..MAX_PEERS {
                let hash = names.get(&id, 0).unwrap_or(0);
                if let Some(name) = by_hash.get(&hash).filter(|_| hash != 0) {
                    previous.peer_names.resize(id as usize + 1, String::new());
                    previous.peer_names[id as usize] = (*name).to_owned();
                }
            }
            previous
        });
        let tables =
            PolicyTables::build(config, previous.as_ref()).map_err(FastpathError::Policy)?;
        let mut fastpath = Fastpath {
            ebpf,
            tables: PolicyTables::default(),
            active: 0,
            attached: Vec::new(),
            persisted: Some(Persisted { pins, names }),
        };
        match &previous {
            Some(previous) => fastpath.adopt(tables, previous)?,
            None => fastpath.install(tables)?,
        }
        let before = previous.unwrap_or_default();
        fastpath.save_names(&before)?;
        Ok((fastpath, adopted))
    }

    /// Writes `tables` into adopted maps the running program reads: the
    /// spare copy is rewritten whole, then made active, then the other.
    fn adopt(
        &mut self,
        tables: PolicyTables,
        previous: &PolicyTables,
    ) -> Result<(), FastpathError> {
        let mut ports: Array<_, u32> = self.map_mut(names::COAP_PORTS)?;
        for port in 0..names::PORT_COUNT {
            ports
                .set(port, tables.port_kind(port as u16), 0)
                .map_err(|source| map_error(names::COAP_PORTS, source))?;
        }
        self.set_hello_policy(&tables)?;
        let active: Array<_, u32> = self.map(names::ACTIVE_TABLES)?;
        let active = active
            .get(&0, 0)
            .map_err(|source| map_error(names::ACTIVE_TABLES, source))?
            .min(1) as usize;
        let spare = 1 - active;
        self.rewrite_copy(spare, &tables)?;
        self.reset_reassigned_ids(previous, &tables)?;
        let mut flag: Array<_, u32> = self.map_mut(names::ACTIVE_TABLES)?;
        flag.set(0, spare as u32, 0)
            .map_err(|source| map_error(names::ACTIVE_TABLES, source))?;
        self.active = spare;
        self.rewrite_copy(active, &tables)?;
        self.tables = tables;
        Ok(())
    }

    /// Empties copy `copy`'s tries, whatever an earlier run left there,
    /// then writes `tables` into it.
    fn rewrite_copy(&mut self, copy: usize, tables: &PolicyTables) -> Result<(), FastpathError> {
        self.clear_trie::<[u8; 4]>(names::PEERS_V4[copy])?;
        self.clear_trie::<[u8; 16]>(names::PEERS_V6[copy])?;
        self.write_changes(copy, &PolicyTables::default(), tables)
    }

    fn clear_trie<K: aya::Pod>(&mut self, name: &'static str) -> Result<(), FastpathError> {
        let mut trie: LpmTrie<_, K, PeerPolicy> = self.map_mut(name)?;
        let keys: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
        for key in keys {
            trie.remove(&key)
                .map_err(|source| map_error(name, source))?;
        }
        Ok(())
    }

    /// Records which name each id has now, where it changed since `before`.
    fn save_names(&mut self, before: &PolicyTables) -> Result<(), FastpathError> {
        let Some(persisted) = &mut self.persisted else {
            return Ok(());
        };
        let after = &self.tables.peer_names;
        let len = after.len().max(before.peer_names.len());
        for id in 1..len {
            let name = |t: &[String]| t.get(id).map_or(0, |n| pins::name_hash(n));
            let now = name(after);
            if now != name(&before.peer_names) {
                persisted
                    .names
                    .set(id as u32, now, 0)
                    .map_err(|source| FastpathError::Map {
                        map: "peer_name_hashes",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Whether the program and its maps outlive the daemon.
    pub fn persisted(&self) -> Option<&Path> {
        self.persisted.as_ref().map(|p| p.pins.path())
    }

    fn set_hello_policy(&mut self, tables: &PolicyTables) -> Result<(), FastpathError> {
        let mut hello: Array<_, PeerPolicy> = self.map_mut(names::HELLO_POLICY)?;
        hello
            .set(0, tables.hello_policy, 0)
            .map_err(|source| map_error(names::HELLO_POLICY, source))
    }

    /// Writes the tables into both copies of the freshly created maps.
    fn install(&mut self, tables: PolicyTables) -> Result<(), FastpathError> {
        let mut ports: Array<_, u32> = self.map_mut(names::COAP_PORTS)?;
        for &port in tables.coap_ports.iter().chain(&tables.coaps_ports) {
            ports
                .set(u32::from(port), tables.port_kind(port), 0)
                .map_err(|source| map_error(names::COAP_PORTS, source))?;
        }
        self.set_hello_policy(&tables)?;
        let empty = PolicyTables::default();
        for copy in 0..2 {
            self.write_changes(copy, &empty, &tables)?;
        }
        self.tables = tables;
        Ok(())
    }

    /// Replaces the policy, live. The change goes into the spare copy of the
    /// tables, then one map update makes it the active copy, so every packet
    /// sees either the old policy or the new one (`maps::ACTIVE_TABLES`).
    /// If writing the spare copy fails, it is rolled back and the active
    /// copy, never touched, keeps working.
    pub fn apply(&mut self, new: PolicyTables) -> Result<(), FastpathError> {
        if new.coap_ports != self.tables.coap_ports {
            return Err(FastpathError::Policy(
                "the CoAP ports (from [coap] listen) change only with a restart".into(),
            ));
        }
        let spare = 1 - self.active;
        let current = self.tables.clone();
        if let Err(err) = self.write_changes(spare, &current, &new) {
            if let Err(undo) = self.write_changes(spare, &new, &current) {
                tracing::error!(error = %undo, "rolling back the spare policy copy failed");
            }
            return Err(err);
        }
        self.reset_reassigned_ids(&current, &new)?;
        let mut active: Array<_, u32> = self.map_mut(names::ACTIVE_TABLES)?;
        active
            .set(0, spare as u32, 0)
            .map_err(|source| map_error(names::ACTIVE_TABLES, source))?;
        self.active = spare;
        // Bring the now-spare copy up to date for the next change.
        if let Err(err) = self.write_changes(1 - spare, &current, &new) {
            tracing::error!(error = %err, "updating the spare policy copy failed");
        }
        self.tables = new;
        self.save_names(&current)
    }

    /// Makes copy `copy` of the tables go from `from` to `to`.
    fn write_changes(
        &mut self,
        copy: usize,
        from: &PolicyTables,
        to: &PolicyTables,
    ) -> Result<(), FastpathError> {
        let before: HashMap<Prefix, PeerPolicy> = from.prefixes.iter().copied().collect();
        let after: HashMap<Prefix, PeerPolicy> = to.prefixes.iter().copied().collect();
        for prefix in before.keys().filter(|p| !after.contains_key(p)) {
            self.remove_prefix(copy, prefix)?;
        }
        for (prefix, policy) in &after {
            if before.get(prefix) != Some(policy) {
                self.insert_prefix(copy, prefix, policy)?;
            }
        }
        let mut default: Array<_, PeerPolicy> = self.map_mut(names::DEFAULT_POLICY)?;
        default
            .set(copy as u32, to.default_policy, 0)
            .map_err(|source| map_error(names::DEFAULT_POLICY, source))
    }

    fn insert_prefix(
        &mut self,
        copy: usize,
        prefix: &Prefix,
        policy: &PeerPolicy,
    ) -> Result<(), FastpathError> {
        let len = u32::from(prefix.len);
        match prefix.addr {
            IpAddr::V4(a) => {
                let name = names::PEERS_V4[copy];
                let mut trie: LpmTrie<_, [u8; 4], PeerPolicy> = self.map_mut(name)?;
                trie.insert(&Key::new(len, a.octets()), policy, 0)
                    .map_err(|source| map_error(name, source))
            }
            IpAddr::V6(a) => {
                let name = names::PEERS_V6[copy];
                let mut trie: LpmTrie<_, [u8; 16], PeerPolicy> = self.map_mut(name)?;
                trie.insert(&Key::new(len, a.octets()), policy, 0)
                    .map_err(|source| map_error(name, source))
            }
        }
    }

    /// Removes a prefix; one that is not there (a rollback of a partial
    /// write) is fine.
    fn remove_prefix(&mut self, copy: usize, prefix: &Prefix) -> Result<(), FastpathError> {
        let len = u32::from(prefix.len);
        let (name, result) = match prefix.addr {
            IpAddr::V4(a) => {
                let name = names::PEERS_V4[copy];
                let mut trie: LpmTrie<_, [u8; 4], PeerPolicy> = self.map_mut(name)?;
                (name, trie.remove(&Key::new(len, a.octets())))
            }
            IpAddr::V6(a) => {
                let name = names::PEERS_V6[copy];
                let mut trie: LpmTrie<_, [u8; 16], PeerPolicy> = self.map_mut(name)?;
                (name, trie.remove(&Key::new(len, a.octets())))
            }
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_error(name, source)),
        }
    }

    /// A peer id that now names another peer starts with a full token
    /// bucket and zero counters.
    fn reset_reassigned_ids(
        &mut self,
        old: &PolicyTables,
        new: &PolicyTables,
    ) -> Result<(), FastpathError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| FastpathError::Policy(format!("counting CPUs: {e}")))?;
        for (id, name) in new.peer_names.iter().enumerate().skip(1) {
            if name.is_empty() || old.peer_names.get(id) == Some(name) {
                continue;
            }
            let mut rate: Array<_, u64> = self.map_mut(names::PEER_RATE)?;
            rate.set(id as u32, 0, 0)
                .map_err(|source| map_error(names::PEER_RATE, source))?;
            let mut stats: PerCpuArray<_, PeerCounters> = self.map_mut(names::PEER_STATS)?;
            let zeros = PerCpuValues::try_from(vec![PeerCounters::default(); cpus])
                .map_err(|e| FastpathError::Policy(format!("per-CPU values: {e}")))?;
            stats
                .set(id as u32, zeros, 0)
                .map_err(|source| map_error(names::PEER_STATS, source))?;
        }
        Ok(())
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, FastpathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("the XDP object defines map {name}"));
        T::try_from(map).map_err(|source| map_error(name, source))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, FastpathError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .unwrap_or_else(|| panic!("the XDP object defines map {name}"));
        T::try_from(map).map_err(|source| map_error(name, source))
    }

    pub fn tables(&self) -> &PolicyTables {
        &self.tables
    }

    /// Attaches to `iface`. `Auto` tries native first, then generic. When
    /// persisted, a link an earlier run pinned for `iface` is adopted: the
    /// new program replaces the old one in it atomically (bpf_link_update),
    /// so no packet goes unfiltered; it keeps the mode it was attached in.
    /// Returns the mode, and whether the link was adopted.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: XdpMode,
    ) -> Result<(AttachedMode, bool), FastpathError> {
        if let Some((path, got)) = self.persisted.as_ref().and_then(|p| p.pins.link(iface)) {
            match self.adopt_link(&path) {
                Ok(()) => {
                    self.attached.push((iface.to_owned(), got));
                    return Ok((got, true));
                }
                Err(err) => {
                    // The interface went away and came back, or the link
                    // was detached some other way: start afresh.
                    tracing::warn!(iface, error = %err, "the pinned XDP link is stale: attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let (got, link) = match mode {
            XdpMode::Native => self.attach_as(iface, AttachedMode::Native, mode)?,
            XdpMode::Skb => self.attach_as(iface, AttachedMode::Generic, mode)?,
            XdpMode::Auto => match self.attach_as(iface, AttachedMode::Native, mode) {
                Ok(attached) => attached,
                Err(FastpathError::Attach { source, .. }) => {
                    tracing::info!(
                        iface,
                        error = %source,
                        "native XDP not available, trying generic (skb) mode"
                    );
                    self.attach_as(iface, AttachedMode::Generic, mode)?
                }
                Err(other) => return Err(other),
            },
            XdpMode::Off => unreachable!("the daemon does not load XDP in mode off"),
        };
        if let Some(persisted) = &self.persisted {
            let path = persisted.pins.link_path(iface, got);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| FastpathError::Pins {
                    dir: persisted.pins.path().to_owned(),
                    problem: format!("creating {}: {e}", dir.display()),
                })?;
            }
            let program = program_mut(&mut self.ebpf)?;
            let link = program.take_link(link).map_err(program_error)?;
            let pin_error = |problem: String| FastpathError::Pins {
                dir: persisted.pins.path().to_owned(),
                problem,
            };
            let link = FdLink::try_from(link).map_err(|_| {
                pin_error(format!(
                    "{iface} was attached through netlink, which cannot be pinned \
                     (persist needs BPF links for XDP, Linux 5.9+)"
                ))
            })?;
            link.pin(&path)
                .map_err(|e| pin_error(format!("pinning the link of {iface}: {}", chain(&e))))?;
        }
        self.attached.push((iface.to_owned(), got));
        Ok((got, false))
    }

    /// Puts this program into the pinned link at `path`.
    fn adopt_link(&mut self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let link = FdLink::from(PinnedLink::from_pin(path)?);
        let link = XdpLink::try_from(link)?;
        let program = program_mut(&mut self.ebpf)?;
        let id = program.attach_to_link(link)?;
        // The pin holds the link; this process's handle to it may go.
        drop(program.take_link(id)?);
        Ok(())
    }

    fn attach_as(
        &mut self,
        iface: &str,
        want: AttachedMode,
        requested: XdpMode,
    ) -> Result<(AttachedMode, XdpLinkId), FastpathError> {
        let (flags, mode_name) = match want {
            AttachedMode::Native => (AyaXdpMode::Driver, "native"),
            AttachedMode::Generic => (AyaXdpMode::Skb, "generic (skb)"),
        };
        let program = program_mut(&mut self.ebpf)?;
        match program.attach(iface, flags) {
            Ok(link) => Ok((want, link)),
            Err(ProgramError::UnknownInterface { .. }) => Err(FastpathError::NoSuchInterface {
                iface: iface.to_owned(),
            }),
            Err(source) => {
                let hint = match os_error(&source) {
                    Some(libc::EBUSY) | Some(libc::EEXIST) => format!(
                        "another XDP program is attached to {iface} (see `ip link show {iface}`)"
                    ),
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        "attaching XDP needs root (or CAP_NET_ADMIN)".to_owned()
                    }
                    _ if requested == XdpMode::Native => {
                        format!("the driver of {iface} may lack native XDP; try --xdp-mode skb")
                    }
                    _ => String::new(),
                };
                Err(FastpathError::Attach {
                    iface: iface.to_owned(),
                    mode: mode_name,
                    source: source.into(),
                    hint,
                })
            }
        }
    }

    /// Interfaces attached so far, with the mode each got.
    pub fn attached(&self) -> &[(String, AttachedMode)] {
        &self.attached
    }

    /// Runs the program once or `repeat` times on `frame` with
    /// BPF_PROG_TEST_RUN (kernel 4.12+; XDP frames need at least 14 bytes).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRunResult, FastpathError> {
        self.run_program(PROGRAM, frame, repeat)
    }

    /// Like [`Fastpath::test_run`], for the empty XDP_PASS program the object
    /// carries as a benchmark baseline (loaded on first use).
    pub fn test_run_baseline(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, FastpathError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(BASELINE)
            .expect("the object defines the baseline")
            .try_into()
            .map_err(program_error)?;
        if program.fd().is_err() {
            program.load().map_err(program_error)?;
        }
        self.run_program(BASELINE, frame, repeat)
    }

    fn run_program(
        &self,
        name: &str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, FastpathError> {
        let program: &Xdp = self
            .ebpf
            .program(name)
            .expect("the object defines the program")
            .try_into()
            .map_err(program_error)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        program.test_run(opts).map_err(program_error)
    }

    /// Verdict counters summed over all CPUs, by reason.
    pub fn verdicts(&self) -> Result<BTreeMap<u32, (Reason, Counter)>, FastpathError> {
        let array: PerCpuArray<_, Counter> = self.map(names::VERDICTS)?;
        let mut out = BTreeMap::new();
        for &reason in Reason::ALL {
            let per_cpu = array
                .get(&(reason as u32), 0)
                .map_err(|source| map_error(names::VERDICTS, source))?;
            let mut sum = Counter::default();
            per_cpu.iter().for_each(|c| sum.merge(c));
            out.insert(reason as u32, (reason, sum));
        }
        Ok(out)
    }

    /// One peer's policy counters summed over all CPUs (id 0: unknown sources).
    pub fn peer_counters(&self, peer_id: u32) -> Result<PeerCounters, FastpathError> {
        let mut sum = PeerCounters::default();
        self.peer_counters_per_cpu(peer_id)?
            .iter()
            .for_each(|c| sum.merge(c));
        Ok(sum)
    }

    /// One peer's policy counters, one entry per possible CPU.
    pub fn peer_counters_per_cpu(&self, peer_id: u32) -> Result<Vec<PeerCounters>, FastpathError> {
        let array: PerCpuArray<_, PeerCounters> = self.map(names::PEER_STATS)?;
        let per_cpu = array
            .get(&peer_id, 0)
            .map_err(|source| map_error(names::PEER_STATS, source))?;
        Ok(per_cpu.to_vec())
    }
}

/// An error and its sources, one line (aya's pin errors keep the OS error
/// in a source).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        text.push_str(&format!(": {e}"));
        cur = e.source();
    }
    text
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, FastpathError> {
    ebpf.program_mut(PROGRAM)
        .expect("the object defines the program")
        .try_into()
        .map_err(program_error)
}

fn program_error(source: ProgramError) -> FastpathError {
    FastpathError::Program {
        source: source.into(),
    }
}

fn map_error(map: &'static str, source: MapError) -> FastpathError {
    FastpathError::Map { map, source }
}
