//! Enrolment, the node's reconciler: keeps the set of captured pods equal to what the
//! configuration (and the CNI plugin) says. It stands above both capture (the kernel state)
//! and the proxy (the listeners it serves), and is the only place that drives them together.
//!
//! Enrolling a pod opens the proxy's listeners inside the pod's netns, registers them for
//! `sk_lookup`, attaches `sk_lookup` to the netns and marks the netns enrolled for outbound
//! capture. Un-enrolling reverses each step, so nothing of the pod stays behind. Pods are never
//! restarted: capture starts and stops underneath running applications.
//!
//! A pod's network namespace and addresses come from the CNI plugin when it reported the pod
//! ([`crate::cni::registry`]), else from the configuration (the annotation of the directory
//! source, or the netns found through cgroups and `status.podIPs` in a cluster).
pub mod cni;

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
    ListenerKey, HBONE_PORT, INBOUND_PLAINTEXT_PORT, LISTENER_HBONE, LISTENER_INBOUND_PLAINTEXT,
    OUTBOUND_PORT,
};

use crate::{
    capture::Capture,
    cni::registry::{CniPod, CniPods, CniView},
    config::pod_netns::NsId,
    identity::SpiffeId,
    model::Pod,
    netns::{socket_netns_cookie, Netns},
    proxy::{Listener, PodContext, Proxy},
    socket::listen,
    state::{Enrolment, EnrolmentPolicy, Snapshot},
};

/// Where an enrolment's network namespace comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NetnsSource {
    /// A path of the configuration (annotation, or found through the pod's cgroup).
    Path(std::path::PathBuf),
    /// The descriptor the CNI plugin passed for this sandbox.
    Cni,
}

/// What identifies one enrolment of a pod: if any of it changes, the pod is enrolled anew.
/// The namespace is compared by identity, not by how it was reached: the configuration
/// reporting the netns and addresses the CNI plugin already gave changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EnrolmentKey {
    netns: NsId,
    ips: Vec<IpAddr>,
}

/// Whether a pod is enrolled here, for the CNI plugin's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodStatus {
    /// Captured, in this network namespace.
    Enrolled {
        netns: NsId,
    },
    /// It should be captured but is not, for this reason (retried).
    Failing(String),
    NotEnrolled,
}

struct EnrolledPod {
    workload: String,
    key: EnrolmentKey,
    /// Duplicates of the listening sockets, to stop them listening at once on un-enrolment
    /// (the tasks that own them are dropped a moment later).
    listening: Vec<socket2::Socket>,
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
    /// Sandboxes the CNI plugin reported.
    cni: CniPods,
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
            cni: CniPods::default(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn policy(&self) -> &EnrolmentPolicy {
        &self.policy
    }

    /// The node's own network namespace (no pod may be enrolled in it).
    pub fn home_netns_id(&self) -> std::io::Result<NsId> {
        self.home.id()
    }

    /// Sandboxes the CNI plugin reported (its ADDs and DELs change them; the next reconcile
    /// applies them).
    pub fn cni_pods(&mut self) -> &mut CniPods {
        &mut self.cni
    }

    /// Whether `pod` is enrolled here.
    pub fn status(&self, pod: &Pod) -> PodStatus {
        let id = pin_id(pod);
        if let Some(e) = self.enrolled.get(&id) {
            return PodStatus::Enrolled { netns: e.key.netns };
        }
        match self.failures.get(&id) {
            Some(reason) => PodStatus::Failing(reason.clone()),
            None => PodStatus::NotEnrolled,
        }
    }

    /// Pods that should be captured but could not be (they are retried on every reconcile).
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// Brings capture in line with `snapshot` (and with what the CNI plugin reported).
    pub fn reconcile(&mut self, snapshot: &Snapshot) {
        let mut wanted: HashMap<String, (Arc<Pod>, EnrolmentKey, NetnsSource)> = HashMap::new();
        let mut reported: HashSet<String> = HashSet::new();
        // An address the CNI just assigned to a new sandbox is that pod's, whatever an older
        // pod of the configuration still claims.
        let cni_addresses = self.cni.addresses();
        // Most pods of a cluster run on other nodes and were never reported by the CNI plugin
        // here: nothing to do for them, decided without allocating (this loop runs over the
        // whole cluster on every change).
        let cni_known = self.cni.names();
        for pod in snapshot.pods.values() {
            let reported_here = || {
                cni_known
                    .get(pod.namespace.as_str())
                    .is_some_and(|names| names.contains(pod.name.as_str()))
            };
            if pod.node_name.as_deref() != Some(self.node.as_str()) && !reported_here() {
                continue;
            }
            let id = pin_id(pod);
            let decision = match self.cni.view(pod) {
                CniView::Added(cni) => snapshot
                    .membership(pod, &self.node, &self.policy)
                    .map(|()| {
                        let key = EnrolmentKey {
                            netns: cni.netns_id,
                            ips: cni.ips.clone(),
                        };
                        (key, NetnsSource::Cni)
                    })
                    .map_err(|e| e.to_string()),
                // The sandbox is gone: whatever the configuration still says about it.
                CniView::Deleted => continue,
                CniView::Unknown => match snapshot.enrolment(pod, &self.node, &self.policy) {
                    Enrolment::Enrolled => {
                        let path = pod.netns_path.clone().unwrap_or_default();
                        let owner = pod.ips.iter().find_map(|ip| {
                            cni_addresses
                                .get(ip)
                                .filter(|k| **k != (pod.namespace.clone(), pod.name.clone()))
                        });
                        match (owner, NsId::of(&path)) {
                            (Some((ns, name)), _) => {
                                Err(Enrolment::DuplicateIp(format!("{ns}/{name}")).to_string())
                            }
                            (None, Err(e)) => {
                                Err(format!("opening the pod netns {}: {e}", path.display()))
                            }
                            (None, Ok(netns)) => {
                                let key = EnrolmentKey {
                                    netns,
                                    ips: pod.ips.clone(),
                                };
                                Ok((key, NetnsSource::Path(path)))
                            }
                        }
                    }
                    other if other.is_misconfiguration() => Err(other.to_string()),
                    _ => {
                        self.cni.mark_seen(&pod.namespace, &pod.name);
                        continue;
                    }
                },
            };
            let decision = match decision {
                Ok(ok) => Ok(ok),
                Err(reason) => {
                    let reportable = snapshot.membership(pod, &self.node, &self.policy).is_ok()
                        || reason == Enrolment::NamespaceUnknown.to_string();
                    Err((reason, reportable))
                }
            };
            self.cni.mark_seen(&pod.namespace, &pod.name);
            match decision {
                Ok((key, source)) => {
                    wanted.insert(id, (pod.clone(), key, source));
                }
                Err((reason, true)) => {
                    self.report_failure(&id, pod, &reason);
                    reported.insert(id);
                }
                Err((_, false)) => {}
            }
        }
        // Sandboxes of pods deleted from the configuration are forgotten.
        self.cni.retain_present(|ns, name, uid| {
            snapshot
                .pods
                .get(&(ns.to_owned(), name.to_owned()))
                .is_some_and(|p| uid.is_empty() || p.uid.is_empty() || p.uid == uid)
        });

        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(id, e)| wanted.get(*id).is_none_or(|(_, key, _)| *key != e.key))
            .map(|(id, _)| id.clone())
            .collect();
        // Un-enrol first: a re-created pod (new netns or addresses) and a pod whose address
        // passed to another must release their listener entries before anything takes them.
        for id in gone {
            self.unenrol(&id);
        }

        for (id, (pod, key, source)) in &wanted {
            if self.enrolled.contains_key(id) {
                continue;
            }
            let netns = match source {
                NetnsSource::Path(path) => Netns::open(path)
                    .with_context(|| format!("opening the pod netns {}", path.display())),
                NetnsSource::Cni => self
                    .cni
                    .get(&pod.namespace, &pod.name)
                    .map(|c: &CniPod| c.netns.try_clone())
                    .transpose()
                    .context("duplicating the CNI netns descriptor")
                    .and_then(|n| n.ok_or_else(|| anyhow::anyhow!("the CNI sandbox is gone"))),
            };
            let opened = netns.and_then(|netns| {
                // The path may lead elsewhere by now (a process exited, its PID reused).
                if netns.id()? != key.netns {
                    anyhow::bail!("{} changed namespace meanwhile", netns.path().display());
                }
                Ok(netns)
            });
            match opened.and_then(|netns| self.enrol(id, pod, key.clone(), source, netns)) {
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
            let listeners: HashSet<ListenerKey> = self
                .enrolled
                .values()
                .flat_map(|p| p.listener_keys.iter().copied())
                .collect();
            self.capture.remove_stale(&ids, &cookies, &listeners);
            self.stale_swept = true;
        }
    }

    fn report_failure(&mut self, id: &str, pod: &Pod, reason: &str) {
        if self.failures.get(id).map(String::as_str) != Some(reason) {
            error!(pod = %pod.workload(), reason, "pod should be captured but is not; will retry");
            self.failures.insert(id.to_owned(), reason.to_owned());
        }
    }

    fn enrol(
        &mut self,
        id: &str,
        pod: &Arc<Pod>,
        key: EnrolmentKey,
        source: &NetnsSource,
        netns: Netns,
    ) -> Result<()> {
        let ips = key.ips.clone();
        let has_v4 = ips.iter().any(IpAddr::is_ipv4);
        let has_v6 = ips.iter().any(IpAddr::is_ipv6);

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
        for ip in &ips {
            let (plain, hbone) = match ip {
                IpAddr::V4(_) => (inbound_v4.as_ref(), hbone_v4.as_ref()),
                IpAddr::V6(_) => (inbound_v6.as_ref(), hbone_v6.as_ref()),
            };
            for (kind, sock) in [(LISTENER_INBOUND_PLAINTEXT, plain), (LISTENER_HBONE, hbone)] {
                if let Some(sock) = sock {
                    listeners.push((ListenerKey::new(*ip, kind), sock.as_fd()));
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
            ips: ips.clone(),
            netns: Arc::new(netns),
            netns_cookie: cookie,
        });
        let mut tasks = Vec::new();
        let listening = outbound
            .iter()
            .chain(inbound_v4.iter())
            .chain(inbound_v6.iter())
            .chain(hbone_v4.iter())
            .chain(hbone_v6.iter())
            .map(socket2::Socket::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .context("duplicating the listeners")?;
        let sockets = (outbound.into_iter().map(|l| (Listener::Outbound, l)))
            .chain(
                [inbound_v4, inbound_v6]
                    .into_iter()
                    .flatten()
                    .map(|l| (Listener::InboundPlaintext, l)),
            )
            .chain(
                [hbone_v4, hbone_v6]
                    .into_iter()
                    .flatten()
                    .map(|l| (Listener::Hbone, l)),
            );
        for (kind, l) in sockets {
            let l = TcpListener::from_std(l.into()).context("registering a listener")?;
            tasks.push(tokio::spawn(self.proxy.clone().serve(ctx.clone(), kind, l)));
        }
        self.proxy.add_local_pod(ctx.clone());
        let source = match source {
            NetnsSource::Path(_) => "configuration",
            NetnsSource::Cni => "cni",
        };
        info!(pod = %ctx.workload, netns = %ctx.netns.path().display(), netns_cookie = cookie,
            ips = ?ips, source, "pod enrolled");
        self.enrolled.insert(
            id.to_owned(),
            EnrolledPod {
                workload: pod.workload(),
                key,
                listening,
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
            stop_listening(&pod);
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
        stop_listening(&pod);
        info!(pod = %pod.workload, "pod un-enrolled");
    }
}

/// Ends a pod's accept loops and closes its listening sockets now, not when the runtime gets
/// to drop the aborted tasks: a new enrolment of the same netns binds the same ports right
/// away. Connections already proxied go on.
fn stop_listening(pod: &EnrolledPod) {
    for t in &pod.tasks {
        t.abort();
    }
    for l in &pod.listening {
        // shutdown(2) on a listening TCP socket stops it listening and releases its port
        // (the aborted task drops its descriptor later).
        let _ = l.shutdown(std::net::Shutdown::Both);
    }
}

/// Name of a pod's pin under `pods/`: `<namespace>_<pod>`. bpffs refuses names with dots
/// (EPERM: they are reserved for the kernel), so the dots a pod name may have become `_`,
/// which no valid Kubernetes name contains; the mapping stays one-to-one.
fn pin_id(pod: &Pod) -> String {
    format!("{}_{}", pod.namespace, pod.name.replace('.', "_"))
}
