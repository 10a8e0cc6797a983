//! Pods as the CNI plugin reported them. For such a pod the plugin's network namespace and
//! addresses are the truth (the runtime just created them); the configuration's (the
//! `status.podIPs` that arrive later, the netns found through cgroups, an annotation) are not
//! used, so a later watch update neither re-enrols nor drops the pod. After a DEL the sandbox
//! is gone: the pod is not enrolled through the configuration either, until an ADD for a new
//! sandbox comes.
use std::{collections::HashMap, net::IpAddr};

use crate::{config::pod_netns::NsId, netns::Netns, state::Pod};

/// A sandbox the plugin handed over with ADD.
#[derive(Debug)]
pub struct CniPod {
    /// `K8S_POD_UID` (empty if the runtime gave none: then the name alone matches).
    pub uid: String,
    pub container_id: String,
    pub netns: Netns,
    pub netns_id: NsId,
    pub ips: Vec<IpAddr>,
    /// Matched a pod of the configuration at least once (so its absence later means it was
    /// deleted).
    pub seen: bool,
}

/// What the CNI said about a pod of the configuration.
pub enum CniView<'a> {
    /// Its sandbox was handed over: enrol it with this netns and these addresses.
    Added(&'a CniPod),
    /// Its sandbox was torn down: do not enrol it.
    Deleted,
    /// Nothing (a pod started before the plugin was installed, or before this proxy
    /// started): the configuration decides.
    Unknown,
}

type Key = (String, String);

#[derive(Debug, Default)]
pub struct CniPods {
    added: HashMap<Key, CniPod>,
    /// UIDs of pods whose sandbox the plugin deleted, by name.
    deleted: HashMap<Key, String>,
}

fn uid_matches(reported: &str, pod: &Pod) -> bool {
    reported.is_empty() || pod.uid.is_empty() || reported == pod.uid
}

impl CniPods {
    /// Records a new sandbox of `namespace/name`, replacing an earlier one of the same name.
    pub fn add(&mut self, namespace: &str, name: &str, pod: CniPod) {
        let key = (namespace.to_owned(), name.to_owned());
        self.deleted.remove(&key);
        self.added.insert(key, pod);
    }

    /// Forgets the sandbox `container_id` of `namespace/name` (a DEL). Returns whether one
    /// was registered. A DEL for another sandbox than the registered one (a late DEL of a
    /// previous sandbox) leaves the registration alone.
    pub fn delete(&mut self, namespace: &str, name: &str, uid: &str, container_id: &str) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        match self.added.get(&key) {
            Some(p) if p.container_id != container_id => false,
            _ => {
                let had = self.added.remove(&key).is_some();
                self.deleted.insert(key, uid.to_owned());
                had
            }
        }
    }

    /// Drops what the plugin said about a failed ADD (the runtime tears that sandbox down).
    pub fn discard(&mut self, namespace: &str, name: &str, container_id: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if self
            .added
            .get(&key)
            .is_some_and(|p| p.container_id == container_id)
        {
            self.added.remove(&key);
        }
    }

    pub fn view(&self, pod: &Pod) -> CniView<'_> {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(p) = self.added.get(&key).filter(|p| uid_matches(&p.uid, pod)) {
            return CniView::Added(p);
        }
        if self
            .deleted
            .get(&key)
            .is_some_and(|uid| uid_matches(uid, pod))
        {
            return CniView::Deleted;
        }
        CniView::Unknown
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&CniPod> {
        self.added.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Keeps the records in line with the configuration: pods that were in it and are gone
    /// (deleted) are forgotten, and so are the tombstones of pods no longer in it.
    pub fn retain_present(&mut self, present: impl Fn(&str, &str, &str) -> bool) {
        self.added
            .retain(|(ns, name), p| !p.seen || present(ns, name, &p.uid));
        self.deleted
            .retain(|(ns, name), uid| present(ns, name, uid));
    }

    pub fn mark_seen(&mut self, namespace: &str, name: &str) {
        if let Some(p) = self.added.get_mut(&(namespace.to_owned(), name.to_owned())) {
            p.seen = true;
        }
    }

    /// Every registered pod's addresses, by address, for telling conflicts.
    pub fn addresses(&self) -> HashMap<IpAddr, Key> {
        let mut out = HashMap::new();
        for (key, p) in &self.added {
            for ip in &p.ips {
                out.insert(*ip, key.clone());
            }
        }
        out
    }
}
