//! The plugin ↔ proxy protocol: one JSON [`Request`] per `SOCK_SEQPACKET` datagram, the pod's
//! network namespace as an `SCM_RIGHTS` descriptor with an ADD, one JSON [`Reply`] back.
//!
//! A descriptor, not the `CNI_NETNS` path: the proxy may run in a container whose mount
//! namespace does not have the runtime's netns bind mounts, and a descriptor cannot be swapped
//! for another namespace between the plugin's check and the proxy's use.
use std::{
    ffi::OsStr,
    io,
    mem::{size_of, zeroed},
    net::IpAddr,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Version of this protocol; a proxy refuses requests of another.
pub const VERSION: u32 = 1;
/// The largest message either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// What the plugin tells the proxy about a pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID` of `CNI_ARGS` (the UID is empty
    /// if the runtime did not pass it).
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS` as the runtime gave it, for messages (the proxy uses the descriptor).
    pub netns: String,
    /// The pod's addresses, from the previous plugin's result (ADD and CHECK).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The proxy's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// ADD, CHECK: the pod is captured (listeners open, `sk_lookup` attached, its netns in
    /// the enrolled map).
    Enrolled,
    /// ADD, CHECK: the configuration says this pod is not captured.
    NotCaptured { reason: String },
    /// DEL: nothing of the sandbox is enrolled any more.
    Removed,
    /// The pod must not start (ADD), or is not as it should be (CHECK).
    Failed { reason: String },
}

/// A `SOCK_SEQPACKET` unix socket (blocking, close-on-exec).
#[derive(Debug)]
pub struct SeqPacket(OwnedFd);

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = OsStr::as_bytes(path.as_os_str());
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be a unix socket path (at most {} bytes, no NUL)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    Ok((addr, len))
}

impl SeqPacket {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor is owned right away.
        let fd = cvt(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Connects to the listener at `path`; `timeout` also bounds every later send and receive.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let s = Self::new()?;
        s.set_timeout(timeout)?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: a valid sockaddr_un of `len` bytes.
        cvt(unsafe {
            libc::connect(
                s.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        Ok(s)
    }

    /// Binds and listens at `path` (which must not exist).
    pub fn listen(path: &Path) -> io::Result<Self> {
        let s = Self::new()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: a valid sockaddr_un of `len` bytes.
        cvt(unsafe {
            libc::bind(
                s.0.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        // SAFETY: plain syscall on our socket.
        cvt(unsafe { libc::listen(s.0.as_raw_fd(), 128) })?;
        Ok(s)
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Self> {
        // SAFETY: no address is asked for.
        let fd = cvt(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Bounds every send and receive on this socket.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: a valid timeval of the size passed.
            cvt(unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            })?;
        }
        Ok(())
    }

    /// The uid of the process at the other end (`SO_PEERCRED`).
    pub fn peer_uid(&self) -> io::Result<u32> {
        // SAFETY: ucred is plain data.
        let mut cred: libc::ucred = unsafe { zeroed() };
        let mut len = size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: valid out-pointer and length.
        cvt(unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok(cred.uid)
    }

    /// Sends one message, with `fd` attached if given.
    pub fn send(&self, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // Room for one descriptor, aligned as cmsghdr needs.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; the pointers set below outlive the call.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if let Some(fd) = fd {
            // SAFETY: the control buffer is large enough for one SCM_RIGHTS descriptor.
            unsafe {
                let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
                hdr.msg_control = control.as_mut_ptr().cast();
                hdr.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
            }
        }
        // SAFETY: a valid msghdr.
        let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::other("short send on a SOCK_SEQPACKET socket"));
        }
        Ok(())
    }

    /// Receives one message and the descriptor sent with it, if any. Empty: the peer closed.
    pub fn recv(&self) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data; the pointers set below outlive the call.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: a valid msghdr.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // Every descriptor received is owned (and closed on error) before anything is checked.
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let count =
                        ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
            }
        }
        if hdr.msg_flags & libc::MSG_TRUNC != 0 || n as usize > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message larger than {MAX_MESSAGE} bytes"),
            ));
        }
        if hdr.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more than one descriptor attached to a message",
            ));
        }
        buf.truncate(n as usize);
        Ok((buf, fds.pop()))
    }

    /// Wakes a thread blocked in [`SeqPacket::accept`] (it then fails) and refuses new
    /// connections.
    pub fn shutdown(&self) {
        // SAFETY: plain syscall on our socket.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn messages_and_descriptors_cross_the_socket() {
        let dir = std::env::temp_dir().join(format!("ztunnel-cni-proto-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = SeqPacket::listen(&path).unwrap();
        let client = SeqPacket::connect(&path, Duration::from_secs(5)).unwrap();
        let server = listener.accept().unwrap();
        assert_eq!(server.peer_uid().unwrap(), unsafe { libc::geteuid() });

        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        client.send(b"hello", Some(netns.as_fd())).unwrap();
        let (msg, fd) = server.recv().unwrap();
        assert_eq!(msg, b"hello");
        let fd = fd.expect("the descriptor travels with the message");
        let mine = std::fs::metadata("/proc/self/ns/net").unwrap();
        let got = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!((mine.dev(), mine.ino()), (got.dev(), got.ino()));

        server.send(b"reply", None).unwrap();
        let (reply, fd) = client.recv().unwrap();
        assert_eq!(reply, b"reply");
        assert!(fd.is_none());

        let big = vec![b'x'; MAX_MESSAGE + 10];
        client.send(&big, None).unwrap();
        let err = server.recv().unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");

        drop(client);
        assert_eq!(server.recv().unwrap().0, b"", "EOF once the peer closed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_and_replies_have_a_fixed_shape() {
        let r: Request = serde_json::from_str(
            r#"{"version":1,"command":"ADD","namespace":"shop","name":"web","uid":"u",
                "container_id":"c","netns":"/var/run/netns/x","ips":["10.1.0.2","fd00::2"]}"#,
        )
        .unwrap();
        assert_eq!(r.command, Command::Add);
        assert_eq!(r.ips.len(), 2);
        assert!(serde_json::from_str::<Request>(
            r#"{"version":1,"command":"ADD","namespace":"a","name":"b","uid":"","container_id":"c","netns":"n","extra":1}"#
        )
        .is_err());
        assert_eq!(
            serde_json::to_string(&Reply::NotCaptured { reason: "r".into() }).unwrap(),
            r#"{"result":"not_captured","reason":"r"}"#
        );
        assert_eq!(
            serde_json::from_str::<Reply>(r#"{"result":"enrolled"}"#).unwrap(),
            Reply::Enrolled
        );
    }

    #[test]
    fn overlong_socket_paths_are_refused_clearly() {
        let long = Path::new("/tmp").join("x".repeat(200));
        let err = SeqPacket::connect(&long, Duration::from_secs(1)).unwrap_err();
        assert!(
            err.to_string().contains("cannot be a unix socket path"),
            "{err}"
        );
    }
}
