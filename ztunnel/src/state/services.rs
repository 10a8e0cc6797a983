//! Services as the outbound side routes them: by cluster IP, and to the endpoints their
//! selectors and target ports give; and the protocol a pod's port is declared to speak by
//! the Services that target it.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::Snapshot;
use crate::model::{AppProtocol, Pod, Service, ServicePort, TargetPort};

/// One endpoint of a service port: a pod and the address to dial.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub pod: Arc<Pod>,
    pub addr: SocketAddr,
}

impl Snapshot {
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service_port<'a>(&self, svc: &'a Service, port: u16) -> Option<&'a ServicePort> {
        svc.ports.iter().find(|p| p.port == port)
    }

    /// The Services (of `pod`'s namespace, by name) whose selector matches `pod` and one of
    /// whose ports leads to its `target` port: what a request to that port may have been
    /// addressed to.
    pub fn services_of(&self, pod: &Pod, target: u16) -> Vec<Arc<Service>> {
        self.services
            .range((pod.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == pod.namespace)
            .map(|(_, s)| s)
            .filter(|s| {
                !s.selector.is_empty()
                    && s.selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                    && s.ports.iter().any(|p| target_of(pod, p) == Some(target))
            })
            .cloned()
            .collect()
    }

    /// The protocol `pod`'s `port` is declared to speak: what the Service ports that lead to
    /// it declare ([`ServicePort::protocol`]; ports that declare nothing are not counted).
    /// `None` when none declares one, and when one declares HTTP and another something opaque:
    /// the port is then sniffed, which tells HTTP from anything else either way.
    pub fn declared_protocol(&self, pod: &Pod, port: u16) -> Option<AppProtocol> {
        let mut declared: Option<AppProtocol> = None;
        for svc in self.services_of(pod, port) {
            let leading = svc
                .ports
                .iter()
                .filter(|sp| target_of(pod, sp) == Some(port));
            for p in leading.filter_map(ServicePort::protocol) {
                match declared {
                    None => declared = Some(p),
                    Some(d) if d.is_http() != p.is_http() => return None,
                    Some(_) => {}
                }
            }
        }
        declared
    }

    /// Endpoints of `svc`'s `port`: every addressed pod of the service's namespace whose labels
    /// match the selector, at the resolved target port. Pods without a matching named port are
    /// skipped, as Kubernetes does.
    pub fn endpoints(&self, svc: &Service, port: u16) -> Vec<Endpoint> {
        let Some(sp) = self.service_port(svc, port) else {
            return Vec::new();
        };
        if svc.selector.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for pod in self
            .pods
            .range((svc.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == svc.namespace)
            .map(|(_, p)| p)
        {
            if !svc
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
            {
                continue;
            }
            let Some(target) = target_of(pod, sp) else {
                continue;
            };
            for ip in &pod.ips {
                // Only addresses the pod really owns: a pod that lost an IP conflict is not a
                // reachable endpoint at that address.
                if self
                    .pod_by_ip
                    .get(ip)
                    .is_some_and(|owner| Arc::ptr_eq(owner, pod))
                {
                    out.push(Endpoint {
                        pod: pod.clone(),
                        addr: SocketAddr::new(*ip, target),
                    });
                }
            }
        }
        out
    }
}

/// The port of `pod` a Service port leads to: its number, or the pod's container port of its
/// name (`None` if the pod has none of that name).
fn target_of(pod: &Pod, sp: &ServicePort) -> Option<u16> {
    match &sp.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => pod
            .container_ports
            .iter()
            .find(|c| c.name.as_deref() == Some(name.as_str()))
            .map(|c| c.port),
    }
}
