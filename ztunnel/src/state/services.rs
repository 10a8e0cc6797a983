//! Services as the outbound side routes them: by cluster IP, and to the endpoints their
//! selectors and target ports give.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::Snapshot;
use crate::model::{Pod, Service, ServicePort, TargetPort};

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
