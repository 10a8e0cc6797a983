//! Network namespaces: the proxy runs in the node's netns but owns sockets inside pods' netns.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life. So to open a
//! listener or an upstream socket "in a pod", the calling thread briefly enters the pod's netns,
//! creates the socket, and returns home. Entering and leaving are two `setns(2)` calls on the
//! current thread only; other threads are unaffected.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

/// An open handle on a network namespace (keeps it alive while held).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the netns at `path` (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::from_file(File::open(path)?, path)
    }

    /// Takes a namespace descriptor received from elsewhere (the CNI plugin); `label` names it
    /// in messages.
    pub fn from_fd(fd: std::os::fd::OwnedFd, label: &Path) -> io::Result<Self> {
        Self::from_file(File::from(fd), label)
    }

    fn from_file(file: File, path: &Path) -> io::Result<Self> {
        // A bind-mounted netns file and /proc/*/ns/net both report "net" through this ioctl;
        // a random regular file does not.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: ioctl on an fd we own, no pointer argument.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a namespace file", path.display()),
            ));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a namespace, but not a network namespace",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// The netns of the calling thread (call it once at start-up, before spawning threads).
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// The namespace's identity (nsfs device and inode).
    pub fn id(&self) -> io::Result<crate::config::pod_netns::NsId> {
        use std::os::unix::fs::MetadataExt as _;
        let m = self.file.metadata()?;
        Ok(crate::config::pod_netns::NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Runs `f` with the calling thread inside this netns, then moves the thread back to `home`.
    ///
    /// `f` must not block or yield: it is meant for creating sockets.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
        enter(self.file.as_fd())?;
        let out = f();
        if let Err(e) = enter(home.file.as_fd()) {
            // A worker thread stuck in a pod's netns would silently create later sockets in
            // the wrong place. Nothing can be trusted after that: stop.
            eprintln!("fatal: cannot return to the node network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The netns cookie of the namespace a socket lives in (stable for the namespace's lifetime;
/// the same value the BPF helper `bpf_get_netns_cookie` returns).
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointer and length for an u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_network_namespaces() {
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(err.to_string().contains("not a namespace file"), "{err}");
        let err = Netns::open(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(err.to_string().contains("not a network namespace"), "{err}");
        assert_eq!(
            Netns::open(Path::new("/nonexistent/netns"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn run_returns_home_and_sockets_report_their_netns_cookie() {
        let home = Netns::current().unwrap();
        let same = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let sock = same
            .run(&home, || std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let here = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            socket_netns_cookie(&sock).unwrap(),
            socket_netns_cookie(&here).unwrap()
        );
    }
}
