//! The Kubernetes configuration source: watches of the API server, fed through the same parser
//! as the local source ([`super::parse`]) into the same [`Snapshot`], published on the
//! same kind of watch channel.
//!
//! Watched (each a list followed by a watch, relisted after `410 Gone`, retried with backoff
//! after any error): Namespaces; this node's Pods (`spec.nodeName=<node>`) and, separately,
//! the other nodes' Pods; Services; the `istio` ConfigMap of the root namespace; and
//! `security.istio.io/v1` PeerAuthentications, RequestAuthentications and
//! AuthorizationPolicies; `networking.istio.io/v1` VirtualServices and DestinationRules.
//! Terminated pods (`status.phase` Succeeded or Failed) are left out by the API server: their
//! addresses may already belong to new pods.
//!
//! Other nodes' pods are watched because the outbound side needs, for every remote
//! destination, the service account it runs as (HBONE secure naming) and its labels (mesh
//! membership and Service selectors); only the Pod object has them (EndpointSlices carry
//! addresses, not identities). Keeping this node's pods in a watch of their own means a relist
//! of the cluster's pods never delays enrolling a pod here.
//!
//! A bad object is logged (kind, namespace, name, reason) and skipped; if an earlier version of
//! it was good, that version stays in force, so a broken edit of a DENY policy does not lift
//! it. A new object that is bad from the start is not applied (as the local source does not
//! apply a version with a bad file). Unlike the local source, one bad object never holds back
//! the others.
//!
//! Bursts (a relist, a rollout) are coalesced: a snapshot is published at most once per
//! `debounce`. The first snapshot is published only once every watch has listed, so the proxy
//! never acts on half a cluster; a kind the API server does not serve (Istio's CRDs not
//! installed) counts as listed and empty, and is retried.
//!
//! Network namespaces of this node's pods are found from their UIDs ([`super::pod_netns`]);
//! the `ztunnel.dev/netns` annotation is ignored here.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use kube::{
    api::{Api, ApiResource, DynamicObject},
    core::TypeMeta,
    runtime::watcher,
    Client,
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_stream::StreamExt as _;
use tracing::{debug, error, info, warn};

use super::{
    parse::parse_value,
    pod_netns::{NotFound, PodNetns, PodNetnsFinder},
    WatchHandle,
};
use crate::{
    metrics::Metrics,
    model::{Namespace, Origin},
    state::{EnrolmentPolicy, MeshSettings, Objects, Snapshot},
};

/// What the Kubernetes source needs.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// This node's name: its pods are watched apart and get their netns found.
    pub node: String,
    pub settings: MeshSettings,
    /// Changes closer together than this are published as one snapshot.
    pub debounce: Duration,
    /// Wait after a failed list or watch: doubles from `retry_min` up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub netns: PodNetnsFinder,
    /// How often this node's pods whose netns was not found are looked for again.
    pub netns_retry: Duration,
    /// Which pods are captured: only theirs are looked up (a pod outside the mesh needs no
    /// netns, and host-network pods have none of their own).
    pub enrolment: EnrolmentPolicy,
}

impl KubernetesOptions {
    pub fn new(node: String, settings: MeshSettings, netns: PodNetnsFinder) -> Self {
        Self {
            node,
            settings,
            debounce: Duration::from_millis(100),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            netns,
            netns_retry: Duration::from_secs(1),
            enrolment: EnrolmentPolicy::default(),
        }
    }
}

/// One watch: a kind, where, and which objects.
#[derive(Clone, Debug)]
struct WatchSpec {
    resource: ApiResource,
    namespace: Option<String>,
    fields: Option<String>,
    /// What the logs call it ("Pod (this node)").
    label: String,
}

const ISTIO_SECURITY: &str = "security.istio.io";
const ISTIO_NETWORKING: &str = "networking.istio.io";

fn istio_kind(kind: &str, plural: &str) -> ApiResource {
    istio_group_kind(ISTIO_SECURITY, kind, plural)
}

/// A kind of an Istio API group, watched at `v1` (the API server converts the other served
/// versions, which share one schema).
fn istio_group_kind(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn watch_specs(node: &str, root_namespace: &str) -> Vec<WatchSpec> {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
    let spec = |resource: ApiResource, namespace: Option<&str>, fields: Option<String>| {
        let label = resource.kind.clone();
        WatchSpec {
            resource,
            namespace: namespace.map(str::to_owned),
            fields,
            label,
        }
    };
    let running = "status.phase!=Succeeded,status.phase!=Failed";
    let mut local = spec(
        ApiResource::erase::<Pod>(&()),
        None,
        Some(format!("spec.nodeName={node},{running}")),
    );
    local.label = "Pod (this node)".into();
    let mut remote = spec(
        ApiResource::erase::<Pod>(&()),
        None,
        Some(format!("spec.nodeName!={node},{running}")),
    );
    remote.label = "Pod (other nodes)".into();
    vec![
        // This node's pods first: if a pod shows up in both pod watches while it is being
        // scheduled, the snapshot keeps the first one read.
        local,
        remote,
        spec(ApiResource::erase::<Namespace>(&()), None, None),
        spec(ApiResource::erase::<Service>(&()), None, None),
        spec(
            ApiResource::erase::<ConfigMap>(&()),
            Some(root_namespace),
            Some("metadata.name=istio".into()),
        ),
        spec(
            istio_kind("PeerAuthentication", "peerauthentications"),
            None,
            None,
        ),
        spec(
            istio_kind("RequestAuthentication", "requestauthentications"),
            None,
            None,
        ),
        spec(
            istio_kind("AuthorizationPolicy", "authorizationpolicies"),
            None,
            None,
        ),
        spec(
            istio_group_kind(ISTIO_NETWORKING, "VirtualService", "virtualservices"),
            None,
            None,
        ),
        spec(
            istio_group_kind(ISTIO_NETWORKING, "DestinationRule", "destinationrules"),
            None,
            None,
        ),
    ]
}

/// The index of [`watch_specs`] whose objects are this node's pods.
const LOCAL_PODS: usize = 0;
/// The index of [`watch_specs`] whose objects are the namespaces.
const NAMESPACES: usize = 2;

/// An object's name within its watch.
type Key = (String, String);

/// One object, parsed on its own.
struct Parsed {
    key: Key,
    result: Result<Box<Objects>, String>,
}

/// What a watch task tells the aggregator.
enum Update {
    /// A complete list (first sync or relist): replaces everything the watch had.
    Listed(usize, Vec<Parsed>),
    Applied(usize, Parsed),
    Deleted(usize, Key),
    /// The API server does not serve this kind (404): nothing of it is in force.
    NotServed(usize),
}

/// Starts watching and returns once every watch has listed, with the first snapshot in the
/// channel. Must be called inside a tokio runtime. Waits for as long as that takes (an API
/// server that is down, missing RBAC permissions): the reasons are logged as they happen.
/// Every rejected object counts in `metrics.config_rejected`.
pub async fn watch(
    client: Client,
    opts: KubernetesOptions,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(watch::Receiver<Arc<Snapshot>>, WatchHandle)> {
    let (first_tx, first_rx) = oneshot::channel();
    let task = tokio::spawn(aggregate(client, opts, metrics, first_tx));
    let rx = first_rx
        .await
        .map_err(|_| anyhow::anyhow!("the Kubernetes source stopped before its first snapshot"))?;
    Ok((
        rx,
        WatchHandle {
            task,
            _watcher: None,
        },
    ))
}

/// Everything the watches have delivered.
struct Store {
    specs: Vec<WatchSpec>,
    synced: Vec<bool>,
    objects: Vec<BTreeMap<Key, Objects>>,
    /// The reason each currently rejected object was rejected (to log each reason once).
    rejected: Vec<BTreeMap<Key, String>>,
    metrics: Arc<Metrics>,
}

impl Store {
    fn new(specs: Vec<WatchSpec>, metrics: Arc<Metrics>) -> Self {
        let n = specs.len();
        Self {
            metrics,
            specs,
            synced: vec![false; n],
            objects: (0..n).map(|_| BTreeMap::new()).collect(),
            rejected: vec![BTreeMap::new(); n],
        }
    }

    /// Applies `update`; whether anything may have changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Listed(w, parsed) => {
                let mut fresh = BTreeMap::new();
                let mut rejected = BTreeMap::new();
                let old = std::mem::take(&mut self.objects[w]);
                for p in parsed {
                    match p.result {
                        Ok(objects) => {
                            fresh.insert(p.key, *objects);
                        }
                        Err(reason) => {
                            if let Some(kept) = old.get(&p.key) {
                                let mut copy = Objects::default();
                                copy.extend_from(kept);
                                fresh.insert(p.key.clone(), copy);
                            }
                            rejected.insert(p.key, reason);
                        }
                    }
                }
                for (key, reason) in &rejected {
                    if self.rejected[w].get(key) != Some(reason) {
                        self.report(w, key, reason, fresh.contains_key(key));
                    }
                }
                // A relist that finds what the watch already had changes nothing.
                let unchanged = self.synced[w]
                    && fresh.len() == old.len()
                    && fresh
                        .iter()
                        .all(|(k, o)| old.get(k).is_some_and(|prev| same(prev, o)));
                self.objects[w] = fresh;
                self.rejected[w] = rejected;
                if !self.synced[w] {
                    debug!(watch = %self.specs[w].label, objects = self.objects[w].len(), "listed");
                }
                self.synced[w] = true;
                return !unchanged;
            }
            Update::Applied(w, p) => match p.result {
                Ok(objects) => {
                    self.rejected[w].remove(&p.key);
                    // Most updates (pod status, annotations of no interest) change nothing
                    // the snapshot holds: no new snapshot for them.
                    let old = self.objects[w].insert(p.key.clone(), *objects);
                    return old.is_none_or(|old| !same(&old, &self.objects[w][&p.key]));
                }
                Err(reason) => {
                    if self.rejected[w].get(&p.key) == Some(&reason) {
                        return false;
                    }
                    let kept = self.objects[w].contains_key(&p.key);
                    self.report(w, &p.key, &reason, kept);
                    self.rejected[w].insert(p.key, reason);
                    return false;
                }
            },
            Update::Deleted(w, key) => {
                self.rejected[w].remove(&key);
                return self.objects[w].remove(&key).is_some();
            }
            Update::NotServed(w) => {
                if !self.synced[w] || !self.objects[w].is_empty() {
                    warn!(watch = %self.specs[w].label,
                        api_version = %self.specs[w].resource.api_version,
                        "the API server does not serve this kind (CRD not installed?); none are in force, still watching");
                }
                self.objects[w].clear();
                self.rejected[w].clear();
                self.synced[w] = true;
            }
        }
        true
    }

    /// Logs and counts a rejection (each bad version of an object once).
    fn report(&self, w: usize, key: &Key, reason: &str, kept: bool) {
        self.metrics.config_rejected.inc();
        let spec = &self.specs[w];
        error!(kind = %spec.resource.kind, namespace = %key.0, name = %key.1, reason = %reason,
        "Kubernetes object rejected; {}",
        if kept {
            "its last good version stays in force"
        } else {
            "it is not applied"
        });
    }

    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    fn unsynced(&self) -> Vec<&str> {
        self.specs
            .iter()
            .zip(&self.synced)
            .filter(|(_, s)| !**s)
            .map(|(spec, _)| spec.label.as_str())
            .collect()
    }

    /// Everything, in watch order, then by namespace and name (deterministic conflicts).
    fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for objects in self.objects.iter().flat_map(|w| w.values()) {
            all.extend_from(objects);
        }
        all
    }
}

/// Whether two parses hold the same objects.
fn same(a: &Objects, b: &Objects) -> bool {
    a.namespaces == b.namespaces
        && a.pods == b.pods
        && a.services == b.services
        && a.peer_authentications == b.peer_authentications
        && a.authorization_policies == b.authorization_policies
        && a.request_authentications == b.request_authentications
        && a.virtual_services == b.virtual_services
        && a.destination_rules == b.destination_rules
        && a.other == b.other
}

/// This node's pods' network namespaces, found once and checked before every reuse.
struct NetnsCache {
    finder: PodNetnsFinder,
    policy: EnrolmentPolicy,
    found: HashMap<String, PodNetns>,
    /// Pods whose netns is not known, by UID, with the reason last logged.
    missing: BTreeMap<String, NotFound>,
}

impl NetnsCache {
    /// Whether `pod` could be captured here: on this node, not host-network, in a namespace
    /// labelled for capture and not opted out. Only those are looked up.
    fn wanted(&self, pod: &crate::model::Pod, node: &str, namespaces: &[&Namespace]) -> bool {
        let (ns_key, ns_value) = &self.policy.namespace_label;
        let (opt_key, opt_value) = &self.policy.pod_opt_out_label;
        pod.node_name.as_deref() == Some(node)
            && !pod.host_network
            && pod.labels.get(opt_key) != Some(opt_value)
            && namespaces
                .iter()
                .any(|ns| ns.name == pod.namespace && ns.labels.get(ns_key) == Some(ns_value))
    }

    /// Sets `netns_path` of this node's pods in `objects` (namespaces in `namespaces`);
    /// returns whether any pod's path differs from what the previous call found.
    fn assign(&mut self, objects: &mut Objects, node: &str, namespaces: &[&Namespace]) -> bool {
        let mut index = None;
        let mut found = HashMap::new();
        let mut missing = BTreeMap::new();
        for pod in objects.pods.iter_mut() {
            if !self.wanted(pod, node, namespaces) {
                continue;
            }
            let cached = self
                .found
                .get(&pod.uid)
                .filter(|c| c.still_valid())
                .cloned();
            let result = cached.ok_or(()).or_else(|()| {
                let index = index.get_or_insert_with(|| self.finder.pod_cgroups());
                self.finder.find(index, &pod.uid)
            });
            match result {
                Ok(netns) => {
                    if pod.netns_path.as_ref() != Some(&netns.path) {
                        Arc::make_mut(pod).netns_path = Some(netns.path.clone());
                    }
                    found.insert(pod.uid.clone(), netns);
                }
                Err(why) => {
                    if self.missing.get(&pod.uid) != Some(&why) {
                        info!(pod = %pod.workload(), uid = %pod.uid, reason = %why,
                            cgroup_root = %self.finder.cgroup_root().display(),
                            "pod network namespace not found yet; looking again");
                    }
                    missing.insert(pod.uid.clone(), why);
                }
            }
        }
        let changed = found.len() != self.found.len()
            || found
                .iter()
                .any(|(uid, n)| self.found.get(uid).map(|o| &o.path) != Some(&n.path));
        self.found = found;
        self.missing = missing;
        changed
    }
}

async fn aggregate(
    client: Client,
    opts: KubernetesOptions,
    metrics: Arc<Metrics>,
    first: oneshot::Sender<watch::Receiver<Arc<Snapshot>>>,
) {
    let specs = watch_specs(&opts.node, &opts.settings.root_namespace);
    let (tx, mut updates) = mpsc::unbounded_channel();
    let mut watches = JoinSet::new();
    for (i, spec) in specs.iter().enumerate() {
        watches.spawn(run_watch(
            client.clone(),
            spec.clone(),
            i,
            tx.clone(),
            (opts.retry_min, opts.retry_max),
        ));
    }
    drop(tx);
    let mut store = Store::new(specs, metrics);
    let mut netns = NetnsCache {
        finder: opts.netns.clone(),
        policy: opts.enrolment.clone(),
        found: HashMap::new(),
        missing: BTreeMap::new(),
    };
    let mut publisher: Option<watch::Sender<Arc<Snapshot>>> = None;
    let mut first = Some(first);
    let mut generation = 0;
    let mut problems = BTreeSet::new();
    // When the next snapshot is due (a change is pending).
    let mut due: Option<Instant> = None;
    let mut netns_retry = tokio::time::interval(opts.netns_retry);
    let mut waiting_log = tokio::time::interval(Duration::from_secs(10));
    waiting_log.tick().await;
    loop {
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else { return }; // every watch task ended: aborted
                let was_synced = store.all_synced();
                if store.apply(update) {
                    let now = Instant::now();
                    // The first complete view goes out at once; later changes are coalesced.
                    let at = if !was_synced && store.all_synced() { now } else { now + opts.debounce };
                    due = Some(due.map_or(at, |d| d.min(at)));
                }
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() && store.all_synced() => {
                due = None;
                let mut objects = store.objects();
                let namespaces = objects.namespaces.clone();
                let namespaces: Vec<&Namespace> = namespaces.iter().map(|n| &**n).collect();
                netns.assign(&mut objects, &opts.node, &namespaces);
                generation += 1;
                // Indexing a cluster-sized snapshot takes a while: not on a worker of the proxy.
                let settings = opts.settings.clone();
                let snapshot = match tokio::task::spawn_blocking(move || {
                    Snapshot::build(generation, objects, &settings)
                })
                .await
                {
                    Ok(snapshot) => snapshot,
                    Err(e) => {
                        error!(error = %e, "indexing the configuration failed; the last good configuration stays in force");
                        return;
                    }
                };
                log_snapshot(&snapshot, &mut problems);
                match &publisher {
                    Some(tx) => {
                        if !super::publish(tx, snapshot) {
                            return; // nobody listens any more
                        }
                    }
                    None => {
                        let (tx, rx) = watch::channel(Arc::new(snapshot));
                        if let Some(first) = first.take() {
                            let _ = first.send(rx);
                        }
                        publisher = Some(tx);
                    }
                }
            }
            _ = netns_retry.tick(), if publisher.is_some() && due.is_none() && !netns.missing.is_empty() => {
                // Only a pod whose netns turned up (or changed) is worth a new snapshot.
                let mut local = Objects::default();
                for objects in store.objects[LOCAL_PODS].values() {
                    local.extend_from(objects);
                }
                let namespaces: Vec<&Namespace> = store.objects[NAMESPACES]
                    .values()
                    .flat_map(|o| &o.namespaces)
                    .map(|n| &**n)
                    .collect();
                if netns.assign(&mut local, &opts.node, &namespaces) {
                    due = Some(Instant::now());
                }
            }
            _ = waiting_log.tick(), if publisher.is_none() => {
                warn!(waiting_for = ?store.unsynced(), "Kubernetes source: still waiting for the first complete list");
            }
        }
    }
}

fn log_snapshot(snapshot: &Snapshot, seen: &mut BTreeSet<String>) {
    let summary = |first: bool| {
        let fields = (
            snapshot.generation,
            snapshot.pods.len(),
            snapshot.services.len(),
            snapshot.namespaces.len(),
        );
        if first {
            info!(
                generation = fields.0,
                pods = fields.1,
                services = fields.2,
                namespaces = fields.3,
                peer_authentications = snapshot.peer_authentications.len(),
                authorization_policies = snapshot.authorization_policies.len(),
                request_authentications = snapshot.request_authentications.len(),
                "configuration loaded from Kubernetes"
            );
        } else {
            debug!(
                generation = fields.0,
                pods = fields.1,
                services = fields.2,
                namespaces = fields.3,
                "configuration updated from Kubernetes"
            );
        }
    };
    summary(snapshot.generation == 1);
    // A cluster changes all the time: report each problem when it appears, not every snapshot.
    let now: BTreeSet<String> = snapshot.problems.iter().cloned().collect();
    for problem in now.difference(seen) {
        warn!(problem = %problem, "configuration problem");
    }
    *seen = now;
}

/// Where an object of the API came from, for messages: `k8s:Pod/shop/web`.
fn origin(kind: &str, namespace: Option<&str>, name: &str) -> Origin {
    let file = match namespace {
        Some(ns) => format!("k8s:{kind}/{ns}/{name}"),
        None => format!("k8s:{kind}/{name}"),
    };
    Origin {
        file: PathBuf::from(file),
        line: 0,
    }
}

/// Parses one object with the local source's parser.
fn parse(mut obj: DynamicObject, resource: &ApiResource) -> Parsed {
    let namespace = obj.metadata.namespace.clone();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let key = (namespace.clone().unwrap_or_default(), name.clone());
    // List items and watch events may omit these; the parser dispatches on them.
    obj.types = Some(TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    });
    obj.metadata.managed_fields = None; // bulky, and never read
    let origin = origin(&resource.kind, namespace.as_deref(), &name);
    let result = serde_yaml::to_value(&obj)
        .map_err(|e| format!("cannot convert the object: {e}"))
        .and_then(|value| {
            let mut objects = Objects::default();
            parse_value(value, &origin, &mut objects)?;
            // Only discovery says where a pod's netns is (see the module comment).
            for pod in &mut objects.pods {
                Arc::make_mut(pod).netns_path = None;
            }
            Ok(Box::new(objects))
        });
    Parsed { key, result }
}

fn key_of(obj: &DynamicObject) -> Key {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// The HTTP status of an API error, if the error is one.
fn api_status(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// Runs one watch forever: list, watch, and on errors back off and resume (from the last
/// resource version, or with a fresh list when the server says it is gone).
async fn run_watch(
    client: Client,
    spec: WatchSpec,
    index: usize,
    updates: mpsc::UnboundedSender<Update>,
    (retry_min, retry_max): (Duration, Duration),
) {
    let mut delay = retry_min;
    // The last error logged: an error that repeats while the backoff runs is logged once.
    let mut last_error = String::new();
    loop {
        let api: Api<DynamicObject> = match &spec.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &spec.resource),
            None => Api::all_with(client.clone(), &spec.resource),
        };
        let mut config = watcher::Config::default();
        if let Some(fields) = &spec.fields {
            config = config.fields(fields);
        }
        let mut stream = Box::pin(watcher::watcher(api, config));
        let mut listing: Option<Vec<Parsed>> = None;
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    listing
                        .get_or_insert_with(Vec::new)
                        .push(parse(obj, &spec.resource));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    delay = retry_min;
                    last_error.clear();
                    Some(Update::Listed(index, listing.take().unwrap_or_default()))
                }
                Ok(watcher::Event::Apply(obj)) => {
                    delay = retry_min;
                    last_error.clear();
                    Some(Update::Applied(index, parse(obj, &spec.resource)))
                }
                Ok(watcher::Event::Delete(obj)) => Some(Update::Deleted(index, key_of(&obj))),
                Err(e) => {
                    let status = api_status(&e);
                    let text = e.to_string();
                    if text != last_error {
                        warn!(watch = %spec.label, error = %text, retry_in = ?delay,
                            "Kubernetes watch failed; retrying (repeats of this error are logged at debug level)");
                        last_error = text;
                    } else {
                        debug!(watch = %spec.label, error = %text, retry_in = ?delay,
                            "Kubernetes watch failed again; retrying");
                    }
                    let not_served =
                        status == Some(404) && matches!(e, watcher::Error::InitialListFailed(_));
                    if not_served && updates.send(Update::NotServed(index)).is_err() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(retry_max);
                    // A watch refused outright with 410 would be retried from the same, expired
                    // resource version forever: start over with a list.
                    if status == Some(410) && matches!(e, watcher::Error::WatchStartFailed(_)) {
                        break;
                    }
                    None
                }
            };
            if let Some(update) = update {
                if updates.send(update).is_err() {
                    return; // the aggregator is gone
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Pod, Service};

    use super::*;
    use crate::model::AppProtocol;

    /// A Service as the API server sends it declares its ports' protocols as a file does.
    #[test]
    fn service_ports_declare_protocols_from_the_api_as_from_files() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop", "uid": "u1"},
            "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "db"}, "ports": [
                {"name": "tcp-mysql", "port": 3307, "targetPort": 3306, "protocol": "TCP"},
                {"name": "web", "port": 80, "appProtocol": "kubernetes.io/h2c"},
                {"name": "p81", "port": 81},
            ]},
        }))
        .unwrap();
        let parsed = parse(obj, &ApiResource::erase::<Service>(&()));
        let objects = parsed.result.unwrap();
        let declared: Vec<_> = objects.services[0]
            .ports
            .iter()
            .map(|p| p.protocol())
            .collect();
        assert_eq!(
            declared,
            [Some(AppProtocol::Tcp), Some(AppProtocol::Http2), None]
        );
    }

    /// The traffic rules are watched, and an object from the API server is read as the same
    /// YAML in a file: a good one is kept, a bad one refused with its name and reason (the
    /// aggregator then keeps its last good version).
    #[test]
    fn traffic_rules_from_the_api_parse_as_files_do() {
        let specs = watch_specs("node1", "istio-system");
        let kinds: Vec<(&str, &str)> = specs
            .iter()
            .map(|s| (s.resource.api_version.as_str(), s.resource.plural.as_str()))
            .collect();
        assert!(kinds.contains(&("networking.istio.io/v1", "virtualservices")));
        assert!(kinds.contains(&("networking.istio.io/v1", "destinationrules")));
        let resource = |kind: &str| {
            specs
                .iter()
                .find(|s| s.resource.kind == kind)
                .unwrap()
                .resource
                .clone()
        };
        let vs: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "bookinfo", "uid": "u1",
                         "creationTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"hosts": ["reviews"], "http": [{
                "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                "route": [{"destination": {"host": "reviews", "subset": "v2"}}]}]},
        }))
        .unwrap();
        let parsed = parse(vs, &resource("VirtualService"));
        let objects = parsed.result.unwrap();
        assert_eq!(objects.virtual_services[0].id(), "bookinfo/reviews");
        assert!(objects.virtual_services[0].created.is_some());

        let dr: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                     "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBN"}}},
        }))
        .unwrap();
        let err = parse(dr, &resource("DestinationRule")).result.unwrap_err();
        assert!(
            err.contains("DestinationRule bookinfo/reviews") && err.contains("ROUND_ROBN"),
            "{err}"
        );
    }

    /// A dual-stack Pod and Service from the API keep every address, the primary first.
    #[test]
    fn dual_stack_pods_and_services_from_the_api_keep_both_families() {
        let pod: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u2"},
            "spec": {"nodeName": "node1", "serviceAccountName": "web", "containers": []},
            "status": {"podIP": "fd10:1::2", "podIPs": [{"ip": "fd10:1::2"}, {"ip": "10.1.0.2"}]},
        }))
        .unwrap();
        let objects = parse(pod, &ApiResource::erase::<Pod>(&())).result.unwrap();
        let ips: Vec<String> = objects.pods[0]
            .ips
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(ips, ["fd10:1::2", "10.1.0.2"]);
        let svc: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u3"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd10:96::a"],
                     "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                     "selector": {"app": "web"}, "ports": [{"port": 80}]},
        }))
        .unwrap();
        let objects = parse(svc, &ApiResource::erase::<Service>(&()))
            .result
            .unwrap();
        let vips: Vec<String> = objects.services[0]
            .vips
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        assert_eq!(vips, ["10.96.0.10", "fd10:96::a"]);
    }
}
