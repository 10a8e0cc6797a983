//! Enrolment: keeping the set of captured pods equal to what the configuration says.
//!
//! Enrolling a pod opens the proxy's listeners inside the pod's netns, registers them for
//! `sk_lookup`, attaches `sk_lookup` to the netns and marks the netns enrolled for outbound
//! capture. Un-enrolling reverses each step, so nothing of the pod stays behind. Pods are never
//! restarted: capture starts and stops underneath running applications.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{error, info, warn};
use ztunnel_common::{
    ListenerKey, AF_INET, AF_INET6, HBONE_PORT, INBOUND_PLAINTEXT_PORT, LISTENER_HBONE,
    LISTENER_INBOUND_PLAINTEXT, OUTBOUND_PORT,
};

use super::Capture;
use crate::{
    identity::SpiffeId,
    netns::{socket_netns_cookie, Netns},
    proxy::{PodContext, Proxy},
    state::{Enrolment, EnrolmentPolicy, Pod, Snapshot},
};

/// Listen backlog of the per-pod listeners.
const BACKLOG: i32 = 1024;

/// What identifies one enrolment of a pod: if any of it changes, the pod is enrolled anew.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EnrolmentKey {
    netns_path: std::path::PathBuf,
    ips: Vec<IpAddr>,
}

struct EnrolledPod {
    workload: String,
    key: EnrolmentKey,
    cookie: u64,
    listener_keys: Vec<ListenerKey>,
    tasks: Vec<JoinHandle<()>>,
    context: Arc<PodContext>,
}

/// The node's enrolment controller.
pub struct Enroller {
    capture: Capture,
    proxy: Arc<Proxy>,
    home: Arc<Netns>,
    node: String,
    policy: EnrolmentPolicy,
    enrolled: HashMap<String, EnrolledPod>,
    /// Last reported reason per pod that should be captured but is not, to log changes only.
    failures: HashMap<String, String>,
    stale_swept: bool,
}

impl Enroller {
    pub fn new(
        capture: Capture,
        proxy: Arc<Proxy>,
        home: Arc<Netns>,
        node: String,
        policy: EnrolmentPolicy,
    ) -> Self {
        Self {
            capture,
            proxy,
            home,
            node,
            policy,
            enrolled: HashMap::new(),
            failures: HashMap::new(),
            stale_swept: false,
        }
    }

    /// Pods that should be captured but could not be (they are retried on every reconcile).
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// Brings capture in line with `snapshot`.
    pub fn reconcile(&mut self, snapshot: &Snapshot) {
        let mut wanted: HashMap<String, Arc<Pod>> = HashMap::new();
        let mut reported: HashSet<String> = HashSet::new();
        for pod in snapshot.pods.values() {
            let id = pin_id(pod);
            match snapshot.enrolment(pod, &self.node, &self.policy) {
                Enrolment::Enrolled => {
                    wanted.insert(id, pod.clone());
                }
                reason if reason.is_misconfiguration() => {
                    self.report_failure(&id, pod, &reason.to_string());
                    reported.insert(id);
                }
                _ => {}
            }
        }

        let gone: Vec<String> = self
            .enrolled
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.unenrol(&id);
        }

        for (id, pod) in &wanted {
            let key = EnrolmentKey {
                netns_path: pod.netns_path.clone().unwrap_or_default(),
                ips: pod.ips.clone(),
            };
            if let Some(current) = self.enrolled.get(id) {
                if current.key == key {
                    continue;
                }
                // The pod was re-created under the same name (new netns or addresses).
                self.unenrol(id);
            }
            match self.enrol(id, pod, key) {
                Ok(()) => {
                    self.failures.remove(id);
                }
                Err(e) => {
                    self.report_failure(id, pod, &format!("{e:#}"));
                    reported.insert(id.clone());
                }
            }
        }
        self.failures.retain(|id, _| reported.contains(id));

        if !self.stale_swept {
            // After a restart, forget what the previous process enrolled and nobody wants now.
            let ids: HashSet<String> = self.enrolled.keys().cloned().collect();
            let cookies: HashSet<u64> = self.enrolled.values().map(|p| p.cookie).collect();
            self.capture.remove_stale(&ids, &cookies);
            self.stale_swept = true;
        }
    }

    fn report_failure(&mut self, id: &str, pod: &Pod, reason: &str) {
        if self.failures.get(id).map(String::as_str) != Some(reason) {
            error!(pod = %pod.workload(), reason, "pod should be captured but is not; will retry");
            self.failures.insert(id.to_owned(), reason.to_owned());
        }
    }

    fn enrol(&mut self, id: &str, pod: &Arc<Pod>, key: EnrolmentKey) -> Result<()> {
        let netns = Netns::open(&key.netns_path)
            .with_context(|| format!("opening the pod netns {}", key.netns_path.display()))?;
        let has_v4 = pod.ips.iter().any(IpAddr::is_ipv4);
        let has_v6 = pod.ips.iter().any(IpAddr::is_ipv6);

        let identity = SpiffeId::new(
            self.proxy.trust_domain(),
            &pod.namespace,
            &pod.service_account,
        )
        .with_context(|| format!("service account {:?} as a SPIFFE id", pod.service_account))?;
        let mut outbound = Vec::new();
        let (mut inbound_v4, mut inbound_v6) = (None, None);
        let (mut hbone_v4, mut hbone_v6) = (None, None);
        netns
            .run(&self.home, || -> Result<()> {
                if has_v4 {
                    let any = Ipv4Addr::UNSPECIFIED;
                    outbound.push(listen(SocketAddr::from((
                        Ipv4Addr::LOCALHOST,
                        OUTBOUND_PORT,
                    )))?);
                    inbound_v4 = Some(listen(SocketAddr::from((any, INBOUND_PLAINTEXT_PORT)))?);
                    hbone_v4 = Some(listen(SocketAddr::from((any, HBONE_PORT)))?);
                }
                if has_v6 {
                    let any = Ipv6Addr::UNSPECIFIED;
                    outbound.push(listen(SocketAddr::from((
                        Ipv6Addr::LOCALHOST,
                        OUTBOUND_PORT,
                    )))?);
                    inbound_v6 = Some(listen(SocketAddr::from((any, INBOUND_PLAINTEXT_PORT)))?);
                    hbone_v6 = Some(listen(SocketAddr::from((any, HBONE_PORT)))?);
                }
                Ok(())
            })
            .context("entering the pod netns")?
            .context("opening the proxy listeners in the pod netns")?;
        let cookie = socket_netns_cookie(&outbound[0]).context("reading the netns cookie")?;

        let mut listeners = Vec::new();
        for ip in &pod.ips {
            let (addr, family, plain, hbone) = match ip {
                IpAddr::V4(v4) => (
                    [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
                    AF_INET,
                    inbound_v4.as_ref(),
                    hbone_v4.as_ref(),
                ),
                IpAddr::V6(v6) => {
                    let o = v6.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    let addr = [w(0), w(4), w(8), w(12)];
                    (addr, AF_INET6, inbound_v6.as_ref(), hbone_v6.as_ref())
                }
            };
            for (kind, sock) in [(LISTENER_INBOUND_PLAINTEXT, plain), (LISTENER_HBONE, hbone)] {
                if let Some(sock) = sock {
                    let key = ListenerKey {
                        addr,
                        family,
                        _pad: 0,
                        kind,
                    };
                    listeners.push((key, sock.as_fd()));
                }
            }
        }
        self.capture.attach_pod(id, &netns, cookie, &listeners)?;
        let listener_keys: Vec<ListenerKey> = listeners.into_iter().map(|(k, _)| k).collect();

        let ctx = Arc::new(PodContext {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            workload: pod.workload(),
            identity,
            ips: pod.ips.clone(),
            netns,
            netns_cookie: cookie,
        });
        let mut tasks = Vec::new();
        for l in outbound {
            let l = TcpListener::from_std(l.into()).context("registering a listener")?;
            tasks.push(tokio::spawn(
                self.proxy.clone().serve_outbound(ctx.clone(), l),
            ));
        }
        for l in [inbound_v4, inbound_v6].into_iter().flatten() {
            let l = TcpListener::from_std(l.into()).context("registering a listener")?;
            tasks.push(tokio::spawn(
                self.proxy.clone().serve_inbound_plaintext(ctx.clone(), l),
            ));
        }
        for l in [hbone_v4, hbone_v6].into_iter().flatten() {
            let l = TcpListener::from_std(l.into()).context("registering a listener")?;
            tasks.push(tokio::spawn(
                self.proxy.clone().serve_inbound_hbone(ctx.clone(), l),
            ));
        }
        self.proxy.add_local_pod(ctx.clone());
        info!(pod = %ctx.workload, netns = %key.netns_path.display(), netns_cookie = cookie,
            ips = ?pod.ips, "pod enrolled");
        self.enrolled.insert(
            id.to_owned(),
            EnrolledPod {
                workload: pod.workload(),
                key,
                cookie,
                listener_keys,
                tasks,
                context: ctx,
            },
        );
        Ok(())
    }

    /// For a restart: stops accepting on every pod's listeners (the kernel drops them from the
    /// listener map as they close) and releases the pin directory, so the next proxy can
    /// adopt it. Pins, links and the enrolled-netns map stay: enrolled pods' new connections
    /// fail closed until the next proxy listens. Connections already proxied go on.
    pub fn hand_over(self) {
        for pod in self.enrolled.into_values() {
            for t in pod.tasks {
                t.abort();
            }
        }
        match self.capture.release() {
            Ok(true) => info!("listeners closed; no pod enrolled, so the pins were removed"),
            Ok(false) => info!("listeners closed and pin directory released for the next proxy"),
            Err(e) => warn!(error = %format!("{e:#}"), "removing the unused pins failed"),
        }
    }

    fn unenrol(&mut self, id: &str) {
        let Some(pod) = self.enrolled.remove(id) else {
            return;
        };
        if let Err(e) = self.capture.detach_pod(id, pod.cookie, &pod.listener_keys) {
            warn!(pod = %pod.workload, error = %format!("{e:#}"), "un-enrolment left state behind");
        }
        self.proxy.remove_local_pod(&pod.context);
        // Aborting the accept loops drops the listeners; connections already proxied go on.
        for t in pod.tasks {
            t.abort();
        }
        info!(pod = %pod.workload, "pod un-enrolled");
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}

/// Name of a pod's pin under `pods/`: `<namespace>_<pod>`. bpffs refuses names with dots
/// (EPERM: they are reserved for the kernel), so the dots a pod name may have become `_`,
/// which no valid Kubernetes name contains; the mapping stays one-to-one.
fn pin_id(pod: &Pod) -> String {
    format!("{}_{}", pod.namespace, pod.name.replace('.', "_"))
}
