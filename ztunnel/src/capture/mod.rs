//! Loading, attaching and pinning the capture programs (docs/capture.md), and the per-pod kernel
//! state that enrolment ([`crate::enrolment`]) asks for.
//!
//! The pin directory (default `/sys/fs/bpf/ztunnel`) is laid out as [`ztunnel_common::pins`]
//! says. Links stay attached while pinned, so when the proxy process is gone enrolled pods still have
//! their connects redirected to a listener that no longer exists, and their inbound traffic
//! finds no proxy socket and is dropped: capture fails closed.
pub mod fast_path;
pub mod inventory;
pub mod return_path;

use std::{
    collections::HashSet,
    fs::File,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};
use ztunnel_common::{
    addr_from_words, maps, pins, programs, DeliveryKey, EnrolledNetns, ListenerKey, NodeConn,
    NodeConnKey, OrigDst, OrigDstKey, PodAddr, PodLocalAddrs, NODE_CONN_ESTABLISHED,
};

use crate::netns::Netns;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztunnel-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the capture state lives.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// Pin directory on bpffs; one per node proxy.
    pub bpf_dir: PathBuf,
    /// cgroup v2 directory the connect/sock_ops/getpeername programs attach to: the root in
    /// production (every pod lives below it), a per-node directory in the virtual cluster.
    pub cgroup: PathBuf,
    /// cgroup v2 directory `zt_node_sockops` attaches to: where the node's own processes (the
    /// kubelet) live. Usually the same as `cgroup`.
    pub node_cgroup: PathBuf,
    /// The netns cookie of the node's own network namespace: its sockets' connections to
    /// enrolled pods are recorded (kubelet probes).
    pub node_netns_cookie: u64,
    /// How long to wait for another proxy to release the pin directory (a restart: the old
    /// process hands over at SIGTERM). `None`: refuse at once.
    pub takeover_wait: Option<std::time::Duration>,
    /// The same-netns fast path (sockhash + sk_msg between an app's socket and the proxy's).
    pub fast_path: bool,
}

/// The loaded and attached capture programs of this node proxy.
pub struct Capture {
    bpf_dir: PathBuf,
    ebpf: Ebpf,
    enrolled: BpfHashMap<MapData, u64, EnrolledNetns>,
    listeners: SockHash<MapData, ListenerKey>,
    pod_addresses: BpfHashMap<MapData, PodAddr, u8>,
    local_addrs: BpfHashMap<MapData, u64, PodLocalAddrs>,
    orig_dst: Arc<OrigDstTable>,
    node_connections: Arc<NodeConnections>,
    deliveries: Arc<InboundDeliveries>,
    fast_path: Arc<fast_path::FastPathStats>,
    _cgroup_links: Vec<PinnedLink>,
    /// Exclusive `flock` on the pin directory: one proxy per directory.
    _lock: File,
}

/// Every precondition of [`Capture`] checked, the pin directory locked, nothing pinned yet:
/// a start that fails from here on (a busy port, a configuration that does not load) leaves
/// no kernel state behind. Dropping it removes the pin directory if it was created for it.
pub struct PreparedCapture {
    opts: CaptureOptions,
    cgroup: File,
    node_cgroup: File,
    lock: Option<File>,
    /// The pin directory did not exist: nothing of an earlier run is in it.
    created: bool,
}

impl PreparedCapture {
    /// Checks the bpffs, both cgroup v2 directories and the embedded eBPF object, then takes
    /// the pin directory (waiting up to `takeover_wait` for a proxy that is handing over).
    pub fn new(opts: &CaptureOptions) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this ztunnel binary was built without its eBPF object (AYA_BUILD_SKIP)");
        }
        let bpf_dir = &opts.bpf_dir;
        let parent = bpf_dir.parent().unwrap_or(Path::new("/"));
        if fs_magic(parent).with_context(|| format!("checking {}", parent.display()))?
            != BPF_FS_MAGIC
        {
            bail!(
                "{} is not on a BPF filesystem (bpffs); mount it with `mount -t bpf bpf /sys/fs/bpf`, \
                 or choose another --bpf-dir",
                parent.display()
            );
        }
        let cgroup = open_cgroup2(&opts.cgroup, "--cgroup")?;
        let node_cgroup = open_cgroup2(&opts.node_cgroup, "--node-cgroup")?;
        let created = !bpf_dir.exists();
        std::fs::create_dir_all(bpf_dir.join(pins::PODS_DIR))
            .with_context(|| format!("creating {}", bpf_dir.display()))?;
        let mut prepared = Self {
            opts: opts.clone(),
            cgroup,
            node_cgroup,
            lock: None,
            created,
        };
        prepared.lock = Some(lock_dir(bpf_dir, opts.takeover_wait)?);
        Ok(prepared)
    }

    /// Loads the programs (re-using pinned maps of a previous run), attaches them and pins
    /// everything. If this fails in a pin directory this start created, the directory is
    /// removed again; one that held a previous run's pins keeps them (capture stays closed).
    pub fn install(mut self) -> Result<Capture> {
        let lock = self.lock.take().expect("locked in new()");
        match Capture::install(&self.opts, &self.cgroup, &self.node_cgroup, lock) {
            Ok(capture) => {
                self.created = false; // the directory now belongs to the capture
                Ok(capture)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for PreparedCapture {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = std::fs::remove_dir_all(&self.opts.bpf_dir) {
                warn!(dir = %self.opts.bpf_dir.display(), error = %e,
                    "cannot remove the pin directory of a failed start");
            }
        }
    }
}

/// Opens `dir` after checking it is a cgroup v2 directory (on hybrid hosts `/sys/fs/cgroup`
/// is the v1 tmpfs: the unified hierarchy is `/sys/fs/cgroup/unified`).
fn open_cgroup2(dir: &Path, flag: &str) -> Result<File> {
    let magic = fs_magic(dir).with_context(|| format!("checking {flag} {}", dir.display()))?;
    if magic != CGROUP2_SUPER_MAGIC {
        let hint = match cgroup2_root() {
            Ok(root) => format!(
                " (the cgroup v2 hierarchy of this machine is {})",
                root.display()
            ),
            Err(_) => String::new(),
        };
        bail!(
            "{flag} {} is not a cgroup v2 directory{hint}",
            dir.display()
        );
    }
    File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))
}

impl Capture {
    fn install(
        opts: &CaptureOptions,
        cgroup: &File,
        node_cgroup: &File,
        lock: File,
    ) -> Result<Self> {
        let bpf_dir = &opts.bpf_dir;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpf_dir)
            .override_global(
                ztunnel_common::NODE_NETNS_COOKIE_GLOBAL,
                &opts.node_netns_cookie,
                true,
            )
            .load(EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF programs (if maps pinned in {} come from an incompatible \
                     version, remove them with `ztunnel bpf uninstall`)",
                    bpf_dir.display()
                )
            })?;

        let mut cgroup_links = Vec::new();
        // These attachments are bpf_links, which always coexist with other programs on the
        // cgroup (a CNI's included) as if BPF_F_ALLOW_MULTI were set; `link_create` itself
        // rejects that flag with EINVAL, so no flag is passed.
        const CGROUP_LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
        for pins::CgroupProgram {
            program: pins::Program { name, pin },
            link: link_pin,
        } in pins::CGROUP_PROGRAMS
            .into_iter()
            .chain([pins::NODE_SOCK_OPS])
        {
            let (target, target_path) = if name == programs::NODE_SOCK_OPS {
                (node_cgroup, &opts.node_cgroup)
            } else {
                (cgroup, &opts.cgroup)
            };
            let program = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
            let link: FdLink = if name == programs::SOCK_OPS || name == programs::NODE_SOCK_OPS {
                let p: &mut SockOps = program.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
                repin_program(|path| p.pin(path), &bpf_dir.join(pin))?;
                let id = p
                    .attach(target, CGROUP_LINK_MODE)
                    .with_context(|| format!("attaching {name} to {}", target_path.display()))?;
                p.take_link(id)?.try_into()?
            } else {
                let p: &mut CgroupSockAddr = program.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
                repin_program(|path| p.pin(path), &bpf_dir.join(pin))?;
                let id = p
                    .attach(target, CGROUP_LINK_MODE)
                    .with_context(|| format!("attaching {name} to {}", target_path.display()))?;
                p.take_link(id)?.try_into()?
            };
            // The new link is attached before the old one (from a previous run) is unpinned, so
            // there is no instant without capture. Both redirect to the same listener, and the
            // second program skips what the first already redirected (it is loopback by then).
            let path = bpf_dir.join(link_pin);
            remove_pin(&path)?;
            cgroup_links.push(
                link.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?,
            );
        }
        {
            let p: &mut SkLookup = ebpf
                .program_mut(programs::SK_LOOKUP)
                .ok_or_else(|| anyhow!("program {} missing", programs::SK_LOOKUP))?
                .try_into()?;
            p.load().context("loading the sk_lookup program")?;
            repin_program(|path| p.pin(path), &bpf_dir.join(pins::SK_LOOKUP.pin))?;
        }

        let fast_path = Arc::new(fast_path::install(
            &mut ebpf,
            bpf_dir,
            opts.fast_path,
            (cgroup, &opts.cgroup),
        )?);

        let enrolled = BpfHashMap::try_from(take_map(&mut ebpf, maps::ENROLLED_NETNS)?)?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, maps::POD_LISTENERS)?)?;
        let pod_addresses = BpfHashMap::try_from(take_map(&mut ebpf, maps::POD_ADDRESSES)?)?;
        let local_addrs = BpfHashMap::try_from(take_map(&mut ebpf, maps::POD_LOCAL_ADDRS)?)?;
        let orig_dst = Arc::new(OrigDstTable(Mutex::new(BpfHashMap::try_from(take_map(
            &mut ebpf,
            maps::ORIG_DST_BY_PEER,
        )?)?)));
        let node_connections = Arc::new(NodeConnections(Mutex::new(BpfHashMap::try_from(
            take_map(&mut ebpf, maps::NODE_CONNECTIONS)?,
        )?)));
        let mut deliveries: BpfHashMap<MapData, DeliveryKey, u8> =
            BpfHashMap::try_from(take_map(&mut ebpf, maps::INBOUND_DELIVERIES)?)?;
        // Entries of a previous process that died while connecting: that process and its
        // sockets are gone (this one holds the pin directory now).
        let stale: Vec<DeliveryKey> = deliveries.keys().filter_map(|k| k.ok()).collect();
        for key in &stale {
            let _ = deliveries.remove(key);
        }
        let deliveries = Arc::new(InboundDeliveries(Mutex::new(deliveries)));
        info!(bpf_dir = %bpf_dir.display(), cgroup = %opts.cgroup.display(),
            node_cgroup = %opts.node_cgroup.display(), "capture programs attached");
        Ok(Self {
            bpf_dir: bpf_dir.clone(),
            ebpf,
            enrolled,
            listeners,
            pod_addresses,
            local_addrs,
            orig_dst,
            node_connections,
            deliveries,
            fast_path,
            _cgroup_links: cgroup_links,
            _lock: lock,
        })
    }

    /// The node's own connections to enrolled pods, shared with the inbound proxy.
    pub fn node_connections(&self) -> Arc<NodeConnections> {
        self.node_connections.clone()
    }

    /// The fast path's counters (zero while it is off).
    pub fn fast_path_stats(&self) -> Arc<fast_path::FastPathStats> {
        self.fast_path.clone()
    }

    /// The proxy's deliveries in progress, which `zt_sk_lookup` lets through.
    pub fn inbound_deliveries(&self) -> Arc<InboundDeliveries> {
        self.deliveries.clone()
    }

    pub fn bpf_dir(&self) -> &Path {
        &self.bpf_dir
    }

    /// Gives up the pin directory at shutdown. While a pod is enrolled the pins stay (its new
    /// connections fail closed until a proxy listens again); with none enrolled nothing depends
    /// on them, so they are removed (the directory stays, for a proxy waiting to take over): a
    /// proxy uninstalled after its namespaces were unlabelled leaves no program, link or map.
    /// Returns whether the pins were removed.
    pub fn release(self) -> Result<bool> {
        if self.enrolled.keys().next().is_some() {
            return Ok(false);
        }
        for entry in std::fs::read_dir(&self.bpf_dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(true)
    }

    /// Lookup of original destinations, shared with the outbound proxy.
    pub fn orig_dst_table(&self) -> Arc<OrigDstTable> {
        self.orig_dst.clone()
    }

    /// Starts capturing a pod: its listeners go into the SOCKHASH, `sk_lookup` is attached to
    /// its netns (and pinned as `pods/<id>`), then its netns cookie is marked enrolled. The
    /// order matters: outbound capture is switched on last, once the proxy can take the traffic.
    pub fn attach_pod(
        &mut self,
        id: &str,
        netns: &Netns,
        cookie: u64,
        listeners: &[(ListenerKey, BorrowedFd<'_>)],
    ) -> Result<()> {
        for (key, fd) in listeners {
            self.listeners.insert(key, *fd, 0).with_context(|| {
                format!("adding the listener of {id} to {}", maps::POD_LISTENERS)
            })?;
            self.pod_addresses
                .insert(PodAddr::from(key), 1, 0)
                .with_context(|| {
                    format!("adding the address of {id} to {}", maps::POD_ADDRESSES)
                })?;
        }
        let path = self.pod_pin(id);
        let p: &mut SkLookup = self
            .ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or_else(|| anyhow!("program {} missing", programs::SK_LOOKUP))?
            .try_into()?;
        let link_id = p
            .attach(netns)
            .with_context(|| format!("attaching sk_lookup to {}", netns.path().display()))?;
        let link: FdLink = p.take_link(link_id)?.into();
        // A link pinned by a previous run for the same pod is replaced (after the new one is
        // attached, so inbound capture never lapses).
        remove_pin(&path)?;
        drop(
            link.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?,
        );
        let local = PodLocalAddrs::of(
            listeners
                .iter()
                .filter_map(|(k, _)| addr_from_words(k.family, &k.addr)),
        );
        self.local_addrs.insert(cookie, local, 0).with_context(|| {
            format!("adding the addresses of {id} to {}", maps::POD_LOCAL_ADDRS)
        })?;
        self.enrolled
            .insert(cookie, EnrolledNetns::default(), 0)
            .with_context(|| format!("adding {id} to {}", maps::ENROLLED_NETNS))?;
        Ok(())
    }

    /// Stops capturing a pod; the reverse of [`Capture::attach_pod`], outbound capture first.
    pub fn detach_pod(&mut self, id: &str, cookie: u64, keys: &[ListenerKey]) -> Result<()> {
        let mut first_error = None;
        if let Err(e) = self.enrolled.remove(&cookie) {
            first_error.get_or_insert(
                anyhow!(e).context(format!("removing {id} from {}", maps::ENROLLED_NETNS)),
            );
        }
        if let Err(e) = absent_ok(self.local_addrs.remove(&cookie)) {
            first_error.get_or_insert(
                anyhow!(e).context(format!("removing {id} from {}", maps::POD_LOCAL_ADDRS)),
            );
        }
        if let Err(e) = remove_pin(&self.pod_pin(id)) {
            first_error.get_or_insert(e);
        }
        for key in keys {
            if let Err(e) = absent_ok(self.pod_addresses.remove(&PodAddr::from(key))) {
                first_error
                    .get_or_insert(anyhow!(e).context(format!("removing an address of {id}")));
            }
            // Entries vanish by themselves when the listener closes; remove them now anyway so
            // the map never points at a socket the pod no longer owns.
            if let Err(e) = absent_ok(self.listeners.remove(key)) {
                first_error
                    .get_or_insert(anyhow!(e).context(format!("removing a listener of {id}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes enrolment state left by a previous run for pods that are not enrolled now.
    pub fn remove_stale(
        &mut self,
        live_ids: &HashSet<String>,
        live_cookies: &HashSet<u64>,
        live_listeners: &HashSet<ListenerKey>,
    ) {
        let live_addrs: HashSet<PodAddr> = live_listeners.iter().map(PodAddr::from).collect();
        let stale: Vec<PodAddr> = self
            .pod_addresses
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live_addrs.contains(k))
            .collect();
        for addr in stale {
            let _ = self.pod_addresses.remove(&addr);
        }
        for cookie in remove_netns_but(&mut self.enrolled, live_cookies) {
            debug!(cookie, "removed stale enrolled netns");
        }
        remove_netns_but(&mut self.local_addrs, live_cookies);
        let Ok(entries) = std::fs::read_dir(self.bpf_dir.join(pins::PODS_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live_ids.contains(&name) {
                info!(pin = %entry.path().display(), "removing stale sk_lookup link of a pod no longer enrolled");
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    warn!(pin = %entry.path().display(), error = %e, "cannot remove stale pin");
                }
            }
        }
    }

    fn pod_pin(&self, id: &str) -> PathBuf {
        self.bpf_dir.join(pins::PODS_DIR).join(id)
    }
}

/// Removes the entries of a netns-cookie map whose netns is not in `live`; returns their keys.
fn remove_netns_but<V: aya::Pod>(
    map: &mut BpfHashMap<MapData, u64, V>,
    live: &HashSet<u64>,
) -> Vec<u64> {
    let stale: Vec<u64> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !live.contains(k))
        .collect();
    for cookie in &stale {
        let _ = map.remove(cookie);
    }
    stale
}

/// Original destinations recorded by `zt_sockops`, keyed by the accepted peer.
pub struct OrigDstTable(Mutex<BpfHashMap<MapData, OrigDstKey, OrigDst>>);

impl OrigDstTable {
    /// Returns and forgets the original destination of the connection from `key`.
    pub fn take(&self, key: &OrigDstKey) -> Option<OrigDst> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dst = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(dst)
    }
}

/// A map removal that found nothing to remove succeeded.
fn absent_ok(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Connections the node's own sockets made to enrolled pods, recorded by `zt_node_sockops`.
pub struct NodeConnections(Mutex<BpfHashMap<MapData, NodeConnKey, NodeConn>>);

impl NodeConnections {
    /// Whether the connection the pod accepted from `peer` at `local` is one a socket of the
    /// node's own network namespace made and completed (see `zt_node_sockops`). The record is
    /// consumed: one record admits one connection.
    pub fn take_established(
        &self,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> bool {
        let Some(key) = NodeConnKey::new(peer, local) else {
            return false;
        };
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(conn) = map.get(&key, 0) else {
            return false;
        };
        let _ = map.remove(&key);
        conn.state == NODE_CONN_ESTABLISHED
    }
}

/// The proxy's connections to applications that carry the caller's address, while they
/// connect: `zt_sk_lookup` passes exactly these 4-tuples to the application instead of
/// steering them back to the proxy's own listener.
pub struct InboundDeliveries(Mutex<BpfHashMap<MapData, DeliveryKey, u8>>);

impl InboundDeliveries {
    /// Registers the delivery `key`; it is let through until the returned entry is dropped
    /// (after the handshake: later packets find the established socket before any lookup).
    pub fn register(self: &Arc<Self>, key: DeliveryKey) -> io::Result<Delivery> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(key, 1, 0).map_err(io::Error::other)?;
        Ok(Delivery {
            table: self.clone(),
            key,
        })
    }
}

/// One registered delivery; dropping it removes the entry.
pub struct Delivery {
    table: Arc<InboundDeliveries>,
    key: DeliveryKey,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = absent_ok(map.remove(&self.key)) {
            warn!(error = %e, "cannot remove an inbound delivery entry");
        }
    }
}

/// Removes every pin (programs, links, maps, pod links) of a node proxy, which detaches capture.
/// Refuses while a proxy holds the directory.
pub fn uninstall(bpf_dir: &Path) -> Result<()> {
    if !bpf_dir.exists() {
        return Ok(());
    }
    let _lock = lock_dir(bpf_dir, None)?;
    std::fs::remove_dir_all(bpf_dir).with_context(|| format!("removing {}", bpf_dir.display()))
}

/// The cgroup v2 mount point of this machine (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| anyhow!("no cgroup v2 filesystem is mounted"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

fn lock_dir(dir: &Path, wait: Option<std::time::Duration>) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    let mut waiting = false;
    // SAFETY: flock on an fd we own.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        let busy = e.raw_os_error() == Some(libc::EWOULDBLOCK);
        if busy && deadline.is_some_and(|d| std::time::Instant::now() < d) {
            if !waiting {
                info!(dir = %dir.display(), "waiting for the running proxy to hand over the pin directory");
                waiting = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        if busy {
            bail!(
                "another ztunnel is already using the pin directory {} (one proxy per directory; \
                 give each node its own --bpf-dir)",
                dir.display()
            );
        }
        return Err(e).with_context(|| format!("locking {}", dir.display()));
    }
    Ok(f)
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Pins a program for operators (`bpftool prog show pinned …`), replacing an older pin.
fn repin_program(
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
    path: &Path,
) -> Result<()> {
    remove_pin(path)?;
    pin(path).with_context(|| format!("pinning {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel side names its maps and programs with literals (`#[map(name = …)]`, function
    /// names); each must be one `common` declares, or loading fails at run time.
    #[test]
    fn the_ebpf_object_defines_every_map_and_program_common_declares() {
        assert!(
            !EBPF_OBJECT.is_empty(),
            "built without the eBPF object (AYA_BUILD_SKIP)"
        );
        let object = aya_obj::Object::parse(EBPF_OBJECT).expect("the eBPF object parses");
        let mut found: Vec<&str> = object.maps.keys().map(String::as_str).collect();
        found.sort();
        for map in maps::ALL {
            assert!(
                found.contains(&map),
                "map {map} missing; the object has {found:?}"
            );
        }
        let mut found: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        found.sort();
        for program in programs::ALL {
            assert!(
                found.contains(&program),
                "program {program} missing; the object has {found:?}"
            );
        }
    }

    /// build.rs strips the DWARF from the embedded object and keeps the BTF the loader needs.
    #[test]
    fn the_embedded_ebpf_object_has_btf_and_no_dwarf() {
        use object::{Object as _, ObjectSection as _};
        let file = object::File::parse(EBPF_OBJECT).expect("the eBPF object is an ELF file");
        let names: Vec<&str> = file.sections().filter_map(|s| s.name().ok()).collect();
        for kept in [".BTF", ".BTF.ext", ".rel.BTF.ext", "maps", "sockops"] {
            assert!(names.contains(&kept), "{kept} missing; sections: {names:?}");
        }
        let dwarf: Vec<&&str> = names.iter().filter(|n| n.contains(".debug_")).collect();
        assert!(dwarf.is_empty(), "DWARF left in the object: {dwarf:?}");
        assert!(
            EBPF_OBJECT.len() < 96 * 1024,
            "the object is {} bytes",
            EBPF_OBJECT.len()
        );
    }
}
