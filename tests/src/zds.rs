//! A ZDS server: the istio-cni node agent's side of Istio's "ztunnel discovery service", which
//! tells a node's ztunnel (in `PROXY_MODE=shared`) which pods it serves and hands it each pod's
//! network namespace.
//!
//! The protocol (github.com/istio/ztunnel `proto/zds.proto`, package `istio.workload.zds`) runs
//! over a unix `SOCK_SEQPACKET` socket, one protobuf message per packet. The ztunnel connects and
//! sends `ZdsHello{version: V1}`; the agent then sends one `WorkloadRequest{add}` per pod with the
//! pod's netns descriptor attached (`SCM_RIGHTS`) and waits for each `WorkloadResponse{ack}`
//! (an empty `error` is success), then `WorkloadRequest{snapshot_sent}` (acked too), and from
//! then on `add` and `del` as pods come and go. The connection stays open; a ztunnel that
//! restarts connects again and gets a fresh snapshot.
//!
//! The messages are written by hand with `prost` (no `protoc`), with the proto's field numbers.
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use prost::Message as _;

/// `istio.workload.zds.Version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

/// `ZdsHello`: the first message, from ztunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// `WorkloadInfo`: who the pod is (field 4, the trust domain, is reserved).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// `AddWorkload`, sent with the pod's netns descriptor.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// `KeepWorkload` (only before the snapshot is complete; not sent by this server).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// `DelWorkload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// `SnapshotSent`: every existing pod has been sent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// `WorkloadRequest`, agent → ztunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "Request", tags = "1, 5, 2, 3")]
    pub payload: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
}

/// `Ack`: an empty error is success.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// `WorkloadResponse`, ztunnel → agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Ack(Ack),
}

/// A pod the ztunnel should serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZdsPod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Its network namespace file (e.g. `/run/netns/x`), opened for each `add`.
    pub netns: PathBuf,
}

/// How long the ztunnel may take to answer (hello, acks) before the connection is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Every packet this protocol carries is small; a larger one is not a ztunnel talking.
const MAX_PACKET: usize = 64 * 1024;

#[derive(Default)]
struct State {
    /// The pods the ztunnel should have, by uid.
    desired: BTreeMap<String, ZdsPod>,
    /// What happened, in order (`hello`, `add <uid>`, `ack <uid>`, `nack <uid>: <error>`, ...),
    /// for tests and failure messages.
    events: Vec<String>,
    /// Connections that completed their snapshot.
    snapshots: usize,
}

/// The server: a listening socket and a thread serving one ztunnel connection at a time.
/// Dropping it stops the thread and removes the socket file.
pub struct ZdsServer {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl ZdsServer {
    /// Listens on a new `SOCK_SEQPACKET` socket at `path` (ztunnel's `INPOD_UDS`).
    pub fn bind(path: &Path) -> Result<Self> {
        let listener = seqpacket_listener(path)
            .with_context(|| format!("listening on the ZDS socket {}", path.display()))?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("zds-server".into())
            .spawn(move || serve(listener, s, st))
            .context("spawning the ZDS server thread")?;
        Ok(Self {
            path: path.to_owned(),
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the set of pods the ztunnel should serve; a connected ztunnel gets the
    /// difference as `add`/`del` messages, one that connects later gets it as its snapshot.
    pub fn set_pods(&self, pods: Vec<ZdsPod>) {
        lock(&self.state).desired = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
    }

    /// What happened so far, in order.
    pub fn events(&self) -> Vec<String> {
        lock(&self.state).events.clone()
    }

    /// Connections that got a complete snapshot (all acked).
    pub fn snapshots(&self) -> usize {
        lock(&self.state).snapshots
    }
}

impl Drop for ZdsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn seqpacket_listener(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un of the given length.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
    Ok(fd)
}

/// Waits until `fd` has one of `events` (or hang-up/error), for at most `timeout`.
fn poll(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let n = cvt(unsafe { libc::poll(&mut p, 1, ms) })?;
    Ok(if n == 0 { 0 } else { p.revents })
}

fn serve(listener: OwnedFd, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match poll(
            listener.as_raw_fd(),
            libc::POLLIN,
            Duration::from_millis(100),
        ) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                lock(&state).events.push(format!("poll failed: {e}"));
                return;
            }
        }
        // SAFETY: accept4 on our listening socket; the result is owned right away.
        let conn = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from accept4.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        lock(&state).events.push("connected".into());
        let outcome = Connection {
            fd: conn,
            state: &state,
            stop: &stop,
        }
        .run();
        let note = match outcome {
            Ok(()) => "disconnected".to_owned(),
            Err(e) => format!("connection ended: {e:#}"),
        };
        lock(&state).events.push(note);
    }
}

/// One connected ztunnel.
struct Connection<'a> {
    fd: OwnedFd,
    state: &'a Mutex<State>,
    stop: &'a AtomicBool,
}

impl Connection<'_> {
    fn event(&self, e: String) {
        lock(self.state).events.push(e);
    }

    fn run(&self) -> Result<()> {
        let hello =
            ZdsHello::decode(self.recv(REPLY_TIMEOUT)?.as_slice()).context("decoding ZdsHello")?;
        if hello.version != Version::V1 as i32 {
            bail!("ZdsHello has version {}, not V1", hello.version);
        }
        self.event("hello".into());
        // The snapshot: every pod, then SnapshotSent.
        let mut sent: BTreeMap<String, ZdsPod> = BTreeMap::new();
        let desired = lock(self.state).desired.clone();
        for pod in desired.values() {
            self.add(pod)?;
            sent.insert(pod.uid.clone(), pod.clone());
        }
        self.request(Request::SnapshotSent(SnapshotSent {}), None)?;
        self.event("snapshot acked".into());
        lock(self.state).snapshots += 1;
        // Then changes, until the ztunnel goes away or the server stops.
        while !self.stop.load(Ordering::Relaxed) {
            let desired = lock(self.state).desired.clone();
            for uid in sent.keys().cloned().collect::<Vec<_>>() {
                if desired.get(&uid) != sent.get(&uid) {
                    self.request(Request::Del(DelWorkload { uid: uid.clone() }), None)?;
                    self.event(format!("del acked {uid}"));
                    sent.remove(&uid);
                }
            }
            for pod in desired.values() {
                if !sent.contains_key(&pod.uid) {
                    self.add(pod)?;
                    sent.insert(pod.uid.clone(), pod.clone());
                }
            }
            let revents = poll(self.fd.as_raw_fd(), libc::POLLIN, Duration::from_millis(50))?;
            if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(());
            }
            if revents & libc::POLLIN != 0 {
                // Nothing is due from the ztunnel between requests: EOF or a stray message.
                let packet = self.recv(REPLY_TIMEOUT)?;
                self.event(format!("unexpected message of {} bytes", packet.len()));
            }
        }
        Ok(())
    }

    fn add(&self, pod: &ZdsPod) -> Result<()> {
        let netns = File::open(&pod.netns)
            .with_context(|| format!("opening the netns {}", pod.netns.display()))?;
        let add = AddWorkload {
            uid: pod.uid.clone(),
            workload_info: Some(WorkloadInfo {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
            }),
        };
        match self.request(Request::Add(add), Some(netns.as_raw_fd())) {
            Ok(()) => {
                self.event(format!("add acked {}", pod.uid));
                Ok(())
            }
            // A pod ztunnel could not set up is reported and not retried, as istio-cni does
            // not; the connection goes on.
            Err(e) if e.downcast_ref::<Nack>().is_some() => {
                self.event(format!("add refused {}: {e}", pod.uid));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sends one request (with a descriptor) and waits for its ack.
    fn request(&self, payload: Request, fd: Option<RawFd>) -> Result<()> {
        let message = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        self.send(&message, fd)?;
        let reply = WorkloadResponse::decode(self.recv(REPLY_TIMEOUT)?.as_slice())
            .context("decoding WorkloadResponse")?;
        match reply.payload {
            Some(Response::Ack(Ack { error })) if error.is_empty() => Ok(()),
            Some(Response::Ack(Ack { error })) => Err(Nack(error).into()),
            None => bail!("a WorkloadResponse without payload"),
        }
    }

    fn send(&self, data: &[u8], fd: Option<RawFd>) -> Result<()> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // Room for one cmsghdr with one descriptor, aligned as cmsg(3) wants.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; zeroed is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
            let (space, len) = unsafe {
                (
                    libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32),
                    libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32),
                )
            };
            assert!(space as usize <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as usize;
            // SAFETY: the control buffer is large enough for one header and one fd (checked
            // above), so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = len as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            }
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            // SAFETY: `msg` points at live buffers for the duration of the call.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock || Instant::now() >= deadline {
                return Err(anyhow!(e).context("sending to ztunnel"));
            }
            poll(
                self.fd.as_raw_fd(),
                libc::POLLOUT,
                Duration::from_millis(100),
            )?;
        }
    }

    /// One packet; fails on EOF, on timeout and on truncation.
    fn recv(&self, timeout: Duration) -> Result<Vec<u8>> {
        let revents = poll(self.fd.as_raw_fd(), libc::POLLIN, timeout)?;
        if revents == 0 {
            bail!("ztunnel sent nothing for {timeout:?}");
        }
        let mut buf = vec![0u8; MAX_PACKET];
        // SAFETY: recv(2) into our own buffer of that length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(anyhow!(io::Error::last_os_error()).context("receiving from ztunnel"));
        }
        let n = n as usize;
        if n == 0 {
            bail!("ztunnel closed the connection");
        }
        if n > buf.len() {
            bail!("a packet of {n} bytes, larger than any ZDS message");
        }
        buf.truncate(n);
        Ok(buf)
    }
}

/// A non-empty `Ack.error`.
#[derive(Debug)]
struct Nack(String);

impl std::fmt::Display for Nack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ztunnel refused: {}", self.0)
    }
}

impl std::error::Error for Nack {}

#[cfg(test)]
mod tests {
    use super::*;

    /// ztunnel's side, minimal: a SOCK_SEQPACKET client that receives one packet and the
    /// descriptors attached to it.
    struct Client(OwnedFd);

    impl Client {
        fn connect(path: &Path) -> Self {
            use std::os::unix::ffi::OsStrExt as _;
            // SAFETY: socket/connect on a fresh descriptor with a valid sockaddr_un.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
                for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
                    *d = *s as libc::c_char;
                }
                let rc = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                Self(OwnedFd::from_raw_fd(fd))
            }
        }

        fn send(&self, data: &[u8]) {
            // SAFETY: send(2) of our own buffer.
            let n = unsafe { libc::send(self.0.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
            assert_eq!(n, data.len() as isize);
        }

        fn recv(&self) -> (WorkloadRequest, Option<OwnedFd>) {
            assert_ne!(
                poll(self.0.as_raw_fd(), libc::POLLIN, Duration::from_secs(5)).unwrap(),
                0,
                "the server sent nothing"
            );
            let mut buf = [0u8; 1024];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut control = [0u64; 8];
            // SAFETY: recvmsg into live buffers; the descriptor, if any, is owned right away.
            unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                let n = libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
                assert!(n > 0, "{}", io::Error::last_os_error());
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                let fd = (!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS).then(|| {
                    OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    ))
                });
                (WorkloadRequest::decode(&buf[..n as usize]).unwrap(), fd)
            }
        }

        fn ack(&self, error: &str) {
            let ack = WorkloadResponse {
                payload: Some(Response::Ack(Ack {
                    error: error.into(),
                })),
            };
            self.send(&ack.encode_to_vec());
        }
    }

    fn is_netns(fd: &OwnedFd) -> bool {
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: ioctl without a pointer argument on a descriptor we own.
        unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) == libc::CLONE_NEWNET }
    }

    fn pod(uid: &str) -> ZdsPod {
        ZdsPod {
            uid: uid.into(),
            name: format!("{uid}-name"),
            namespace: "shop".into(),
            service_account: "sa".into(),
            netns: "/proc/self/ns/net".into(),
        }
    }

    /// The whole exchange over a real socket: snapshot with a netns descriptor per pod, then a
    /// removal, then a reconnect that gets a fresh snapshot.
    #[test]
    fn snapshot_then_changes_with_a_netns_per_add() {
        let path = std::env::temp_dir().join(format!("ztt-zds-unit-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let server = ZdsServer::bind(&path).unwrap();
        server.set_pods(vec![pod("a"), pod("b")]);
        let client = Client::connect(&path);
        client.send(
            &ZdsHello {
                version: Version::V1 as i32,
            }
            .encode_to_vec(),
        );
        for uid in ["a", "b"] {
            let (req, fd) = client.recv();
            match req.payload {
                Some(Request::Add(add)) => {
                    assert_eq!(add.uid, uid);
                    assert_eq!(add.workload_info.unwrap().name, format!("{uid}-name"));
                }
                other => panic!("expected an add, got {other:?}"),
            }
            assert!(fd.as_ref().is_some_and(is_netns), "the add carries a netns");
            client.ack(if uid == "b" { "no room" } else { "" });
        }
        let (req, fd) = client.recv();
        assert_eq!(req.payload, Some(Request::SnapshotSent(SnapshotSent {})));
        assert!(fd.is_none());
        client.ack("");
        server.set_pods(vec![pod("b")]);
        let (req, fd) = client.recv();
        assert_eq!(
            req.payload,
            Some(Request::Del(DelWorkload { uid: "a".into() }))
        );
        assert!(fd.is_none());
        client.ack("");
        drop(client);
        let client = Client::connect(&path);
        client.send(
            &ZdsHello {
                version: Version::V1 as i32,
            }
            .encode_to_vec(),
        );
        let (req, _) = client.recv();
        assert!(matches!(req.payload, Some(Request::Add(a)) if a.uid == "b"));
        client.ack("");
        let (req, _) = client.recv();
        assert_eq!(req.payload, Some(Request::SnapshotSent(SnapshotSent {})));
        client.ack("");
        crate::wait_until(Duration::from_secs(5), "two snapshots", || {
            (server.snapshots() == 2).then_some(())
        })
        .unwrap();
        let events = server.events();
        assert!(events.contains(&"add acked a".to_owned()), "{events:?}");
        assert!(
            events.iter().any(|e| e.starts_with("add refused b")),
            "{events:?}"
        );
        assert!(events.contains(&"del acked a".to_owned()), "{events:?}");
    }

    /// The hand-written messages encode with zds.proto's field numbers and wire types.
    #[test]
    fn wire_format_matches_zds_proto() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);
        let snapshot = WorkloadRequest {
            payload: Some(Request::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snapshot.encode_to_vec(), [0x1a, 0x00]);
        let add = WorkloadRequest {
            payload: Some(Request::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        assert_eq!(
            add.encode_to_vec(),
            [0x0a, 14, 0x0a, 1, b'u', 0x12, 9, 0x0a, 1, b'n', 0x12, 1, b's', 0x1a, 1, b'a']
        );
        let del = WorkloadRequest {
            payload: Some(Request::Del(DelWorkload { uid: "u".into() })),
        };
        assert_eq!(del.encode_to_vec(), [0x12, 3, 0x12, 1, b'u']);
        let keep = WorkloadRequest {
            payload: Some(Request::Keep(KeepWorkload { uid: "u".into() })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 3, 0x0a, 1, b'u']);
        // An ack with an empty error is an empty Ack message in field 1.
        let ack = WorkloadResponse::decode([0x0a, 0x00].as_slice()).unwrap();
        assert_eq!(
            ack.payload,
            Some(Response::Ack(Ack {
                error: String::new()
            }))
        );
        let nack = WorkloadResponse::decode([0x0a, 3, 0x0a, 1, b'x'].as_slice()).unwrap();
        assert_eq!(nack.payload, Some(Response::Ack(Ack { error: "x".into() })));
    }
}
