//! The proxy's answers to the CNI plugin ([`crate::cni`]), decided on the main loop (which
//! owns the enroller and the configuration).
//!
//! * ADD: the sandbox is registered ([`crate::cni::registry`]) and the enroller reconciles; the
//!   answer is "enrolled" once its listeners are open, `sk_lookup` is attached and its netns is
//!   in the enrolled map, "not captured" when the configuration says so (namespace not
//!   labelled, pod opted out), and a failure otherwise. A pod (or its namespace) the
//!   configuration does not have yet — the API watch may lag the kubelet by a few ms — is
//!   waited for, at most `--cni-pod-wait`, re-checked on every new snapshot; then the ADD
//!   fails and the runtime retries the sandbox.
//! * DEL: the sandbox is forgotten and the pod un-enrolled.
//! * CHECK: whether the pod is captured if and only if the configuration says so.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use super::{Enroller, PodStatus};
use crate::{
    cni::{
        node_state::NodeState,
        protocol::{Command, Reply, Request},
        registry::CniPod,
        server::CniCall,
    },
    netns::Netns,
    state::{Enrolment, EnrolmentPolicy, Snapshot},
};

/// An ADD waiting for its pod to appear in the configuration.
struct Pending {
    request: Request,
    reply: tokio::sync::oneshot::Sender<Reply>,
    deadline: Instant,
    waiting_for: String,
}

/// The main loop's side of the CNI socket.
pub struct CniDispatch {
    calls: Option<mpsc::Receiver<CniCall>>,
    pending: Vec<Pending>,
    pod_wait: Duration,
    state_file: Option<PathBuf>,
    written: Option<NodeState>,
}

/// What [`CniDispatch::next`] found.
pub enum CniEvent {
    Call(CniCall),
    Expired,
}

/// An evaluation: answer now, or keep waiting (why).
enum Answer {
    Now(Reply),
    Wait(String),
}

impl CniDispatch {
    /// Without `calls` (no `--cni-socket`) it never yields a call.
    pub fn new(
        calls: Option<mpsc::Receiver<CniCall>>,
        pod_wait: Duration,
        state_file: Option<PathBuf>,
    ) -> Self {
        Self {
            calls,
            pending: Vec::new(),
            pod_wait,
            state_file,
            written: None,
        }
    }

    /// The next thing to do: a call from the plugin, or waiting ADDs whose time is up.
    pub async fn next(&mut self) -> CniEvent {
        let deadline = self.pending.iter().map(|p| p.deadline).min();
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let call = async {
            match &mut self.calls {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(call) = call => CniEvent::Call(call),
            () = expired => CniEvent::Expired,
        }
    }

    /// Answers (or parks) one call.
    pub fn handle(&mut self, call: CniCall, enroller: &mut Enroller, snapshot: &Snapshot) {
        let CniCall {
            request,
            netns,
            reply,
        } = call;
        let workload = format!("{}/{}", request.namespace, request.name);
        let answer = match request.command {
            Command::Add => match register(&request, netns, enroller) {
                Err(reason) => Answer::Now(Reply::Failed { reason }),
                Ok(()) => evaluate_add(&request, enroller, snapshot),
            },
            Command::Del => {
                self.pending.retain(|p| {
                    !(p.request.namespace == request.namespace && p.request.name == request.name)
                });
                let had = enroller.cni_pods().delete(
                    &request.namespace,
                    &request.name,
                    &request.uid,
                    &request.container_id,
                );
                enroller.reconcile(snapshot);
                info!(pod = %workload, container_id = %request.container_id, registered = had,
                    "CNI DEL: sandbox removed");
                Answer::Now(Reply::Removed)
            }
            Command::Check => Answer::Now(evaluate_check(&request, enroller, snapshot)),
        };
        match answer {
            Answer::Now(r) => self.answer(&request, reply, r, enroller),
            Answer::Wait(why) => {
                info!(pod = %workload, waiting_for = %why, wait_s = self.pod_wait.as_secs(),
                    "CNI ADD: waiting for the pod in the configuration");
                self.pending.push(Pending {
                    request,
                    reply,
                    deadline: Instant::now() + self.pod_wait,
                    waiting_for: why,
                });
            }
        }
    }

    /// After every new snapshot (the enroller has reconciled): answers the ADDs that were
    /// waiting for it, and rewrites the node state file if the captured namespaces changed.
    pub fn after_snapshot(&mut self, enroller: &mut Enroller, snapshot: &Snapshot) {
        for p in std::mem::take(&mut self.pending) {
            match evaluate_add(&p.request, enroller, snapshot) {
                Answer::Now(r) => self.answer(&p.request, p.reply, r, enroller),
                Answer::Wait(why) => self.pending.push(Pending {
                    waiting_for: why,
                    ..p
                }),
            }
        }
        self.write_state(enroller.node(), enroller.policy(), snapshot);
    }

    /// Fails the ADDs whose wait is over.
    pub fn expire(&mut self, enroller: &mut Enroller) {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.deadline <= now);
        self.pending = keep;
        for p in due {
            let reason = format!(
                "{} after waiting {:?}; the kubelet will retry the sandbox",
                p.waiting_for, self.pod_wait
            );
            self.answer(&p.request, p.reply, Reply::Failed { reason }, enroller);
        }
    }

    /// Writes the node state file (the plugin's fallback) if what it says changed.
    pub fn write_state(&mut self, node: &str, policy: &EnrolmentPolicy, snapshot: &Snapshot) {
        let Some(path) = &self.state_file else {
            return;
        };
        let state = NodeState::of(snapshot, node, policy);
        if self.written.as_ref() == Some(&state) {
            return;
        }
        match state.write(path) {
            Ok(()) => self.written = Some(state),
            Err(e) => warn!(error = %format!("{e:#}"), "cannot write the CNI node state file"),
        }
    }

    fn answer(
        &self,
        request: &Request,
        reply: tokio::sync::oneshot::Sender<Reply>,
        r: Reply,
        enroller: &mut Enroller,
    ) {
        let workload = format!("{}/{}", request.namespace, request.name);
        match &r {
            Reply::Failed { reason } => {
                warn!(pod = %workload, command = ?request.command, container_id = %request.container_id,
                    reason = %reason, "CNI request failed: the pod does not start");
                if request.command == Command::Add {
                    enroller.cni_pods().discard(
                        &request.namespace,
                        &request.name,
                        &request.container_id,
                    );
                }
            }
            Reply::NotCaptured { reason } => {
                info!(pod = %workload, command = ?request.command, reason = %reason, "CNI: pod not captured")
            }
            Reply::Enrolled => {
                info!(pod = %workload, command = ?request.command, container_id = %request.container_id,
                    "CNI: pod captured before it starts")
            }
            Reply::Removed => {}
        }
        // The plugin may have given up (its own timeout); nothing to do then.
        let _ = reply.send(r);
    }
}

/// Registers the sandbox of an ADD after checking what the plugin sent.
fn register(
    request: &Request,
    netns: Option<std::os::fd::OwnedFd>,
    enroller: &mut Enroller,
) -> Result<(), String> {
    let Some(fd) = netns else {
        return Err("the ADD carried no network namespace descriptor".into());
    };
    let netns = Netns::from_fd(fd, Path::new(&request.netns))
        .map_err(|e| format!("CNI_NETNS {}: {e}", request.netns))?;
    let id = netns
        .id()
        .map_err(|e| format!("CNI_NETNS {}: {e}", request.netns))?;
    if enroller.home_netns_id().is_ok_and(|home| home == id) {
        return Err(format!(
            "CNI_NETNS {} is the node's own network namespace: host-network pods are never captured",
            request.netns
        ));
    }
    if request.ips.is_empty() {
        return Err("the ADD carried no pod address".into());
    }
    if let Some(ip) = request.ips.iter().find(|ip| unusable(ip)) {
        return Err(format!("{ip} cannot be a pod address"));
    }
    enroller.cni_pods().add(
        &request.namespace,
        &request.name,
        CniPod {
            uid: request.uid.clone(),
            container_id: request.container_id.clone(),
            netns,
            netns_id: id,
            ips: request.ips.clone(),
            seen: false,
        },
    );
    Ok(())
}

fn unusable(ip: &IpAddr) -> bool {
    ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()
}

/// Whether the configuration knows the pod of `request` (same UID).
fn pod_of<'a>(request: &Request, snapshot: &'a Snapshot) -> Result<&'a crate::model::Pod, String> {
    let workload = format!("{}/{}", request.namespace, request.name);
    match snapshot
        .pods
        .get(&(request.namespace.clone(), request.name.clone()))
    {
        None => Err(format!("pod {workload} is not in the configuration")),
        Some(p) if !request.uid.is_empty() && !p.uid.is_empty() && p.uid != request.uid => {
            Err(format!(
                "the configuration has pod {workload} with UID {}, not {} (an older pod of that name)",
                p.uid, request.uid
            ))
        }
        Some(p) => Ok(p),
    }
}

fn evaluate_add(request: &Request, enroller: &mut Enroller, snapshot: &Snapshot) -> Answer {
    let pod = match pod_of(request, snapshot) {
        Ok(p) => p,
        Err(why) => return Answer::Wait(why),
    };
    match snapshot.membership(pod, enroller.node(), enroller.policy()) {
        Ok(()) => {}
        Err(Enrolment::NamespaceUnknown) => {
            return Answer::Wait(format!(
                "namespace {} is not in the configuration",
                pod.namespace
            ))
        }
        Err(Enrolment::OtherNode(node)) => {
            return Answer::Now(Reply::Failed {
                reason: format!(
                    "the configuration places pod {} on node {node:?}, not on {:?}",
                    pod.workload(),
                    enroller.node()
                ),
            })
        }
        Err(why) => {
            return Answer::Now(Reply::NotCaptured {
                reason: why.to_string(),
            })
        }
    }
    enroller.reconcile(snapshot);
    let sandbox = enroller
        .cni_pods()
        .get(&request.namespace, &request.name)
        .map(|p| p.netns_id);
    match enroller.status(pod) {
        PodStatus::Enrolled { netns } if Some(netns) == sandbox => Answer::Now(Reply::Enrolled),
        PodStatus::Enrolled { .. } => Answer::Now(Reply::Failed {
            reason: "the pod is enrolled in another network namespace than this sandbox's".into(),
        }),
        PodStatus::Failing(reason) => Answer::Now(Reply::Failed { reason }),
        PodStatus::NotEnrolled => Answer::Now(Reply::Failed {
            reason: "the pod was not enrolled".into(),
        }),
    }
}

fn evaluate_check(request: &Request, enroller: &Enroller, snapshot: &Snapshot) -> Reply {
    let pod = match pod_of(request, snapshot) {
        Ok(p) => p,
        Err(reason) => return Reply::Failed { reason },
    };
    match (
        snapshot.membership(pod, enroller.node(), enroller.policy()),
        enroller.status(pod),
    ) {
        (Ok(()), PodStatus::Enrolled { .. }) => Reply::Enrolled,
        (Ok(()), PodStatus::Failing(reason)) => Reply::Failed {
            reason: format!("it should be captured but is not: {reason}"),
        },
        (Ok(()), PodStatus::NotEnrolled) => Reply::Failed {
            reason: "it should be captured but is not enrolled".into(),
        },
        (Err(why), PodStatus::Enrolled { .. }) => Reply::Failed {
            reason: format!("it is enrolled but should not be: {why}"),
        },
        (Err(why), _) => Reply::NotCaptured {
            reason: why.to_string(),
        },
    }
}
