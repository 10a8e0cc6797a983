//! The proxy's CNI socket (`ztunnel run --cni-socket PATH`).
//!
//! A `SOCK_SEQPACKET` unix socket of mode 0600 (the plugin runs as root, started by the
//! container runtime); connections from any other uid are refused as well. One
//! thread accepts; each connection gets a thread that reads one request, hands it to the main
//! loop (which owns the enroller) and writes the answer back. Pod starts are rare and short,
//! and the plugin blocks the sandbox until it has the answer, so threads are simplest here.
use std::{
    os::{
        fd::OwnedFd,
        unix::fs::{FileTypeExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::protocol::{Reply, Request, SeqPacket, VERSION};

/// How long a connected plugin may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request for the main loop.
pub struct CniCall {
    pub request: Request,
    /// The pod's network namespace (ADD, CHECK).
    pub netns: Option<OwnedFd>,
    pub reply: oneshot::Sender<Reply>,
}

/// The listening socket. Dropping it stops it and removes the file (a restart: the next proxy
/// listens anew; until then the plugin finds nobody and falls back on the node state file).
pub struct CniServer {
    path: PathBuf,
    listener: Arc<SeqPacket>,
}

impl CniServer {
    /// Listens at `path`, replacing a socket left by an earlier proxy (a path that exists and
    /// is not a socket is an error). Plugins that connect wait until [`CniServer::start`].
    pub fn bind(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?,
            Ok(_) => bail!(
                "{} exists and is not a socket; refusing to replace it (--cni-socket)",
                path.display()
            ),
            Err(_) => {}
        }
        let listener = SeqPacket::listen(path)
            .with_context(|| format!("listening on the CNI socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            listener: Arc::new(listener),
        })
    }

    /// Starts answering: requests go to `calls`.
    pub fn start(&self, calls: mpsc::Sender<CniCall>) -> Result<()> {
        let accepting = self.listener.clone();
        std::thread::Builder::new()
            .name("cni-accept".into())
            .spawn(move || accept_loop(&accepting, &calls))
            .context("starting the CNI socket thread")?;
        info!(socket = %self.path.display(), "CNI plugin socket listening");
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        self.listener.shutdown();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &SeqPacket, calls: &mpsc::Sender<CniCall>) {
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if calls.is_closed() || e.raw_os_error() == Some(libc::EINVAL) => {
                debug!(error = %e, "CNI socket closed");
                return;
            }
            Err(e) => {
                warn!(error = %e, "accepting on the CNI socket failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let calls = calls.clone();
        let spawned = std::thread::Builder::new()
            .name("cni-request".into())
            .spawn(move || serve(conn, &calls));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a thread for a CNI request");
        }
    }
}

fn serve(conn: SeqPacket, calls: &mpsc::Sender<CniCall>) {
    let answer = |reply: &Reply| {
        let text = serde_json::to_vec(reply).expect("replies serialise");
        if let Err(e) = conn.send(&text, None) {
            warn!(error = %e, "cannot answer the CNI plugin");
        }
    };
    let fail = |reason: String| {
        warn!(reason = %reason, "CNI request refused");
        answer(&Reply::Failed { reason });
    };
    match conn.peer_uid() {
        Ok(0) => {}
        Ok(uid) => return fail(format!("only root may use the CNI socket, not uid {uid}")),
        Err(e) => return fail(format!("cannot read the caller's credentials: {e}")),
    }
    let _ = conn.set_timeout(REQUEST_TIMEOUT);
    let (bytes, netns) = match conn.recv() {
        Ok((b, _)) if b.is_empty() => return,
        Ok(r) => r,
        Err(e) => return fail(format!("bad request: {e}")),
    };
    let request: Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return fail(format!("the request does not decode: {e}")),
    };
    if request.version != VERSION {
        return fail(format!(
            "protocol version {} is not this proxy's ({VERSION}): install the plugin of this proxy's release (`ztunnel cni install`)",
            request.version
        ));
    }
    let (tx, rx) = oneshot::channel();
    let call = CniCall {
        request,
        netns,
        reply: tx,
    };
    if calls.blocking_send(call).is_err() {
        return fail("the node proxy is shutting down".into());
    }
    match rx.blocking_recv() {
        Ok(reply) => answer(&reply),
        Err(_) => fail("the node proxy is shutting down".into()),
    }
}
