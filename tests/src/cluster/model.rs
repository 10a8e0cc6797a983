//! The cluster's configuration: the pods, Services and Namespaces declared by a test, and the
//! Kubernetes-shaped objects the proxies read from the configuration directory, changed at run
//! time.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{anyhow, Context as _, Result};

use super::{remove_if_exists, Cluster};
use crate::config::{self, labels, Labels, PodObject, ServiceObject, ServicePortObject};

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) node: usize,
    pub(super) service_account: Option<String>,
    pub(super) labels: Labels,
    pub(super) netns_annotation: Option<String>,
    pub(super) reported_ips: Option<Vec<String>>,
    pub(super) container_ports: Vec<u16>,
    pub(super) listed: bool,
    pub(super) pending: bool,
}

/// Declares pod `namespace/name` (on node 1 unless [`PodSpec::node`] says otherwise).
pub fn pod(namespace: &str, name: &str) -> PodSpec {
    PodSpec {
        namespace: namespace.into(),
        name: name.into(),
        node: 1,
        service_account: None,
        labels: Labels::new(),
        netns_annotation: None,
        reported_ips: None,
        container_ports: Vec::new(),
        listed: true,
        pending: false,
    }
}

impl PodSpec {
    /// Node index, from 1.
    pub fn node(mut self, i: usize) -> Self {
        self.node = i;
        self
    }
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = Some(sa.into());
        self
    }
    pub fn labels(mut self, l: &[(&str, &str)]) -> Self {
        self.labels.extend(labels(l));
        self
    }
    /// Overrides the `ztunnel.dev/netns` annotation (the netns is still created).
    pub fn netns_annotation(mut self, path: &str) -> Self {
        self.netns_annotation = Some(path.into());
        self
    }
    /// Overrides the IPs in the pod's status (its netns keeps its real address).
    pub fn reported_ips(mut self, ips: &[&str]) -> Self {
        self.reported_ips = Some(ips.iter().map(|s| (*s).to_owned()).collect());
        self
    }
    pub fn container_port(mut self, port: u16) -> Self {
        self.container_ports.push(port);
        self
    }
    /// Creates the pod's netns and cgroup but leaves it out of the configuration
    /// (see [`Cluster::add_pod`]).
    pub fn unlisted(mut self) -> Self {
        self.listed = false;
        self
    }
    /// Lists the pod as the API shows it before its sandbox exists: no addresses, no netns
    /// (see [`Cluster::report_pod_running`]).
    pub fn pending(mut self) -> Self {
        self.pending = true;
        self
    }
}

/// A Service to create; the `n`-th gets one cluster IP per family of the cluster
/// (`10.96.0.<10+n>`, `fd10:96::<10+n>`) unless [`ServiceSpec::vip`] is given.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) selector: Labels,
    pub(super) ports: Vec<ServicePortObject>,
    pub(super) vips: Option<Vec<String>>,
}

pub fn service(namespace: &str, name: &str) -> ServiceSpec {
    ServiceSpec {
        namespace: namespace.into(),
        name: name.into(),
        selector: Labels::new(),
        ports: Vec::new(),
        vips: None,
    }
}

impl ServiceSpec {
    pub fn selector(mut self, l: &[(&str, &str)]) -> Self {
        self.selector.extend(labels(l));
        self
    }
    /// Service port → target (container) port, named `p<port>` (no protocol declared).
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.push(ServicePortObject::new(port, target));
        self
    }
    /// Service port → target port with this name (`tcp-db`, `http-web`: a declared protocol).
    pub fn named_port(mut self, name: &str, port: u16, target: u16) -> Self {
        self.ports.push(ServicePortObject {
            name: Some(name.into()),
            ..ServicePortObject::new(port, target)
        });
        self
    }
    /// Service port → target port declaring `appProtocol: <app_protocol>`.
    pub fn app_protocol_port(mut self, app_protocol: &str, port: u16, target: u16) -> Self {
        self.ports.push(ServicePortObject {
            app_protocol: Some(app_protocol.into()),
            ..ServicePortObject::new(port, target)
        });
        self
    }
    /// This one cluster IP instead of the plan's.
    pub fn vip(mut self, vip: &str) -> Self {
        self.vips = Some(vec![vip.into()]);
        self
    }
}

#[derive(Default)]
pub(super) struct Model {
    pub(super) namespaces: BTreeMap<String, Labels>,
    pub(super) pods: BTreeMap<(String, String), PodObject>,
    pub(super) services: BTreeMap<(String, String), ServiceObject>,
}

impl Cluster {
    // ---- configuration at run time -----------------------------------------------------------

    /// Writes (creates or replaces) the Namespace object with exactly these labels.
    pub fn set_namespace_labels(&self, namespace: &str, l: &[(&str, &str)]) -> Result<()> {
        self.set_namespace_labels_map(namespace, labels(l))
    }

    pub(super) fn set_namespace_labels_map(&self, namespace: &str, l: Labels) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::namespace_file(namespace),
            &config::namespace_yaml(namespace, &l),
        )?;
        self.model().namespaces.insert(namespace.to_owned(), l);
        Ok(())
    }

    /// Deletes the Namespace object.
    pub fn remove_namespace(&self, namespace: &str) -> Result<()> {
        self.model().namespaces.remove(namespace);
        remove_if_exists(&self.config_dir.join(config::namespace_file(namespace)))
    }

    /// Replaces the pod's labels in the configuration.
    pub fn set_pod_labels(&self, namespace: &str, name: &str, l: &[(&str, &str)]) -> Result<()> {
        self.update_pod(namespace, name, |p| p.labels = labels(l))
    }

    /// Replaces the pod's service account (its identity) in the configuration.
    pub fn set_pod_service_account(&self, namespace: &str, name: &str, sa: &str) -> Result<()> {
        self.update_pod(namespace, name, |p| p.service_account = sa.to_owned())
    }

    /// Changes the pod's object with `f` and writes it.
    fn update_pod(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut PodObject),
    ) -> Result<()> {
        let object = {
            let mut m = self.model();
            let p = m
                .pods
                .get_mut(&(namespace.to_owned(), name.to_owned()))
                .ok_or_else(|| anyhow!("pod {namespace}/{name} was not declared"))?;
            f(p);
            p.clone()
        };
        self.write_pod(&object)
    }

    /// Writes the pod's object to the configuration (e.g. a pod declared `unlisted`).
    pub fn add_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let object = self
            .model()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| anyhow!("pod {namespace}/{name} was not declared"))?;
        self.write_pod(&object)
    }

    /// Writes a [`PodSpec::pending`] pod as the API shows it once its sandbox runs: with its
    /// addresses and netns.
    pub fn report_pod_running(&self, namespace: &str, name: &str) -> Result<()> {
        self.update_pod(namespace, name, |p| p.pending = false)
    }

    /// Deletes the pod's object from the configuration (its netns and processes stay).
    pub fn remove_pod(&self, namespace: &str, name: &str) -> Result<()> {
        remove_if_exists(&self.config_dir.join(config::pod_file(namespace, name)))
    }

    fn write_pod(&self, p: &PodObject) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::pod_file(&p.namespace, &p.name),
            &config::pod_yaml(p),
        )
        .map(drop)
    }

    pub(super) fn put_service(&self, s: ServiceObject) -> Result<()> {
        config::write_atomic(
            &self.config_dir,
            &config::service_file(&s.namespace, &s.name),
            &config::service_yaml(&s),
        )?;
        self.model()
            .services
            .insert((s.namespace.clone(), s.name.clone()), s);
        Ok(())
    }

    /// Adds or replaces a Service at run time; returns its primary VIP.
    pub fn set_service(&self, s: ServiceSpec) -> Result<String> {
        let vips = match &s.vips {
            Some(v) => v.clone(),
            None => {
                let m = self.model();
                let key = (s.namespace.clone(), s.name.clone());
                match m.services.get(&key) {
                    Some(existing) => existing.vips.clone(),
                    None => self.planned_vips(m.services.len()),
                }
            }
        };
        let primary = vips[0].clone();
        self.put_service(ServiceObject {
            namespace: s.namespace,
            name: s.name,
            vips,
            selector: s.selector,
            ports: s.ports,
        })?;
        Ok(primary)
    }

    /// Writes any text as `file` in the configuration directory (atomically).
    pub fn write_raw(&self, file: &str, text: &str) -> Result<PathBuf> {
        config::write_atomic(&self.config_dir, file, text)
    }

    pub fn remove_raw(&self, file: &str) -> Result<()> {
        remove_if_exists(&self.config_dir.join(file))
    }

    /// Writes (or, with `None`, removes) a configuration file and waits until every running
    /// proxy of ours has applied the new configuration (a peer reads its own file at start).
    pub fn apply(&self, file: &str, text: Option<&str>) -> Result<()> {
        let nodes: Vec<usize> = (1..=self.node_count())
            .filter(|i| !self.is_peer(*i) && self.proxy_running(*i))
            .collect();
        let marks: Vec<usize> = nodes.iter().map(|i| self.log_mark(*i)).collect();
        match text {
            Some(text) => {
                self.write_raw(file, text)?;
            }
            None => self.remove_raw(file)?,
        }
        for (node, mark) in nodes.into_iter().zip(marks) {
            self.wait_for_log_since(node, mark, Duration::from_secs(15), |l| {
                l["message"] == "configuration applied"
            })
            .with_context(|| format!("node {node} did not apply {file}"))?;
        }
        Ok(())
    }
}
