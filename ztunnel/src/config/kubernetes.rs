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
//! The first snapshot is published only once every watch has listed, so the proxy never acts
//! on half a cluster; a kind the API server does not serve (Istio's CRDs not installed) counts
//! as listed and empty, and is retried. It is built whole; every later one is the snapshot
//! before with a [`Delta`] applied ([`Snapshot::apply_delta`]): the objects each event changed,
//! each taken once with the version the last snapshot has, so a change costs what it touches,
//! not a rebuild of the cluster. A delta only a full build can apply (a name or address
//! claimed twice) falls back to one, as in the directory source.
//!
//! When: a change after a quiet spell is published at once. Changes within `burst_window` of
//! the last snapshot's start (a rollout, a relist) wait for the window's end and go out
//! together, and changes arriving while a snapshot is being made wait for it: at most one
//! snapshot per window, none held back longer than that.
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
    state::{Delta, EnrolmentPolicy, MeshSettings, Objects, Snapshot},
};

/// What the Kubernetes source needs.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// This node's name: its pods are watched apart and get their netns found.
    pub node: String,
    pub settings: MeshSettings,
    /// A change after a quiet spell is published at once; changes arriving within this time
    /// of the last snapshot's start (a burst: a rollout, a relist) wait for its end and go
    /// out as one snapshot. Changes that arrive while a snapshot is being made are gathered
    /// for the next one.
    pub burst_window: Duration,
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
            burst_window: Duration::from_millis(100),
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

/// Everything the watches have delivered, and what changed since the last snapshot.
struct Store {
    specs: Vec<WatchSpec>,
    synced: Vec<bool>,
    /// Each watch's objects, exactly as the last snapshot holds them once published (this
    /// node's pods with the netns path discovery found): a [`Delta`] taken from here applies to
    /// that snapshot.
    objects: Vec<BTreeMap<Key, Objects>>,
    /// The objects changed since the last snapshot, each with its version in that snapshot
    /// (`None`: it had none). Kept per key, so an object changed twice between two snapshots
    /// is one removal and one addition.
    changed: Vec<BTreeMap<Key, Option<Objects>>>,
    /// The reason each currently rejected object was rejected (to log each reason once).
    rejected: Vec<BTreeMap<Key, String>>,
    metrics: Arc<Metrics>,
}

/// A copy sharing every object.
fn share(objects: &Objects) -> Objects {
    let mut copy = Objects::default();
    copy.extend_from(objects);
    copy
}

/// Keeps the netns path discovery gave `old`'s pods on `new`'s (a fresh parse has none): a
/// pod update that changes nothing else is then no change. The path is checked again before
/// the next snapshot.
fn keep_netns(old: &Objects, new: &mut Objects) {
    for pod in &mut new.pods {
        let found = old
            .pods
            .iter()
            .find(|o| o.uid == pod.uid && o.netns_path.is_some());
        if let Some(o) = found {
            Arc::make_mut(pod).netns_path = o.netns_path.clone();
        }
    }
}

impl Store {
    fn new(specs: Vec<WatchSpec>, metrics: Arc<Metrics>) -> Self {
        let n = specs.len();
        Self {
            metrics,
            specs,
            synced: vec![false; n],
            objects: (0..n).map(|_| BTreeMap::new()).collect(),
            changed: (0..n).map(|_| BTreeMap::new()).collect(),
            rejected: vec![BTreeMap::new(); n],
        }
    }

    /// Records that `key` of watch `w` changed, `before` being its version until now (only
    /// the first change since the last snapshot counts: that is the version the snapshot has).
    fn changed(&mut self, w: usize, key: Key, before: Option<Objects>) {
        self.changed[w].entry(key).or_insert(before);
    }

    /// Applies `update`; whether anything may have changed.
    fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Listed(w, parsed) => {
                let mut fresh = BTreeMap::new();
                let mut rejected = BTreeMap::new();
                let mut old = std::mem::take(&mut self.objects[w]);
                for p in parsed {
                    match p.result {
                        Ok(mut objects) => {
                            if let Some(before) = old.get(&p.key) {
                                keep_netns(before, &mut objects);
                            }
                            fresh.insert(p.key, *objects);
                        }
                        Err(reason) => {
                            if let Some(kept) = old.get(&p.key) {
                                fresh.insert(p.key.clone(), share(kept));
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
                let mut any = !self.synced[w];
                for (key, now) in &fresh {
                    match old.remove(key) {
                        Some(before) if same(&before, now) => {}
                        before => {
                            self.changed(w, key.clone(), before);
                            any = true;
                        }
                    }
                }
                for (key, gone) in old {
                    self.changed(w, key, Some(gone));
                    any = true;
                }
                self.objects[w] = fresh;
                self.rejected[w] = rejected;
                if !self.synced[w] {
                    debug!(watch = %self.specs[w].label, objects = self.objects[w].len(), "listed");
                }
                self.synced[w] = true;
                any
            }
            Update::Applied(w, p) => match p.result {
                Ok(mut objects) => {
                    self.rejected[w].remove(&p.key);
                    if let Some(before) = self.objects[w].get(&p.key) {
                        keep_netns(before, &mut objects);
                    }
                    // Most updates (pod status, annotations of no interest) change nothing
                    // the snapshot holds: no new snapshot for them.
                    let old = self.objects[w].insert(p.key.clone(), *objects);
                    let changed = old
                        .as_ref()
                        .is_none_or(|old| !same(old, &self.objects[w][&p.key]));
                    if changed {
                        self.changed(w, p.key, old);
                    }
                    changed
                }
                Err(reason) => {
                    if self.rejected[w].get(&p.key) == Some(&reason) {
                        return false;
                    }
                    let kept = self.objects[w].contains_key(&p.key);
                    self.report(w, &p.key, &reason, kept);
                    self.rejected[w].insert(p.key, reason);
                    false
                }
            },
            Update::Deleted(w, key) => {
                self.rejected[w].remove(&key);
                match self.objects[w].remove(&key) {
                    Some(old) => {
                        self.changed(w, key, Some(old));
                        true
                    }
                    None => false,
                }
            }
            Update::NotServed(w) => {
                // Retried with backoff: only the first refusal (or one after the kind was
                // served) changes anything, later ones publish no snapshot.
                let changed = !self.synced[w] || !self.objects[w].is_empty();
                if changed {
                    warn!(watch = %self.specs[w].label,
                        api_version = %self.specs[w].resource.api_version,
                        "the API server does not serve this kind (CRD not installed?); none are in force, still watching");
                }
                for (key, old) in std::mem::take(&mut self.objects[w]) {
                    self.changed(w, key, Some(old));
                }
                self.rejected[w].clear();
                self.synced[w] = true;
                changed
            }
        }
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

    /// What changed since the last snapshot, as a [`Delta`] to it; forgets the changes.
    fn take_delta(&mut self) -> Delta {
        let mut delta = Delta::default();
        for (changed, objects) in self.changed.iter_mut().zip(&mut self.objects) {
            for (key, before) in std::mem::take(changed) {
                match (before, objects.get_mut(&key)) {
                    (Some(before), Some(now)) => delta.record(&before, now),
                    (None, Some(now)) => delta.added.extend_from(now),
                    (Some(before), None) => delta.removed.extend_from(&before),
                    (None, None) => {}
                }
            }
        }
        delta
    }

    /// Gives this node's pods the netns path discovery finds for them now (none for a pod not
    /// captured here or not found); whether any pod's path changed.
    fn assign_netns(&mut self, netns: &mut NetnsCache, node: &str) -> bool {
        let namespaces: Vec<Arc<Namespace>> = self.objects[NAMESPACES]
            .values()
            .flat_map(|o| o.namespaces.iter().cloned())
            .collect();
        let namespaces: Vec<&Namespace> = namespaces.iter().map(|n| &**n).collect();
        let mut lookup = netns.lookup();
        let mut any = false;
        for (key, objects) in &mut self.objects[LOCAL_PODS] {
            let mut before = None;
            for i in 0..objects.pods.len() {
                let path = lookup.path(&objects.pods[i], node, &namespaces);
                if objects.pods[i].netns_path != path {
                    before.get_or_insert_with(|| share(objects));
                    Arc::make_mut(&mut objects.pods[i]).netns_path = path;
                }
            }
            if let Some(before) = before {
                self.changed[LOCAL_PODS]
                    .entry(key.clone())
                    .or_insert(Some(before));
                any = true;
            }
        }
        lookup.finish();
        any
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

/// One pass over this node's pods: what it finds replaces what the cache knew.
struct NetnsLookup<'a> {
    cache: &'a mut NetnsCache,
    /// The kubelet's pod cgroups, indexed once per pass and only if a pod needs looking up.
    index: Option<HashMap<String, PathBuf>>,
    found: HashMap<String, PodNetns>,
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

    fn lookup(&mut self) -> NetnsLookup<'_> {
        NetnsLookup {
            cache: self,
            index: None,
            found: HashMap::new(),
            missing: BTreeMap::new(),
        }
    }
}

impl NetnsLookup<'_> {
    /// The netns path `pod` should carry now: none if it is not captured here or its
    /// namespace is not found (yet).
    fn path(
        &mut self,
        pod: &crate::model::Pod,
        node: &str,
        namespaces: &[&Namespace],
    ) -> Option<PathBuf> {
        if !self.cache.wanted(pod, node, namespaces) {
            return None;
        }
        let cache = &mut *self.cache;
        let cached = cache
            .found
            .get(&pod.uid)
            .filter(|c| c.still_valid())
            .cloned();
        let result = cached.ok_or(()).or_else(|()| {
            let index = self.index.get_or_insert_with(|| cache.finder.pod_cgroups());
            cache.finder.find(index, &pod.uid)
        });
        match result {
            Ok(netns) => {
                let path = netns.path.clone();
                self.found.insert(pod.uid.clone(), netns);
                Some(path)
            }
            Err(why) => {
                if cache.missing.get(&pod.uid) != Some(&why) {
                    info!(pod = %pod.workload(), uid = %pod.uid, reason = %why,
                        cgroup_root = %cache.finder.cgroup_root().display(),
                        "pod network namespace not found yet; looking again");
                }
                self.missing.insert(pod.uid.clone(), why);
                None
            }
        }
    }

    fn finish(self) {
        self.cache.found = self.found;
        self.cache.missing = self.missing;
    }
}

/// How a snapshot was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    /// The changes applied to the snapshot before ([`Snapshot::apply_delta`]).
    Delta,
    /// Built whole: the first one, or a change only a full build can apply (a conflict).
    Full,
}

/// The snapshot after `before` with `delta` (`objects` being everything, the delta applied).
fn next_snapshot(
    before: Option<&Snapshot>,
    generation: u64,
    objects: Objects,
    delta: &Delta,
    settings: &MeshSettings,
) -> (Snapshot, Made) {
    let objects = match before {
        Some(before) => match before.apply_delta(generation, objects, delta, settings) {
            Ok(snapshot) => return (snapshot, Made::Delta),
            Err(objects) => *objects,
        },
        None => objects,
    };
    (Snapshot::build(generation, objects, settings), Made::Full)
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
    // Something changed since the last snapshot.
    let mut pending = false;
    // When the last snapshot was started: the next one waits for the end of its burst window.
    let mut last_started: Option<Instant> = None;
    let mut netns_retry = tokio::time::interval(opts.netns_retry);
    let mut waiting_log = tokio::time::interval(Duration::from_secs(10));
    waiting_log.tick().await;
    loop {
        // Nothing before every watch has listed; then at once when idle, else at the end of
        // the window the last snapshot opened.
        let due = (pending && store.all_synced()).then(|| {
            let now = Instant::now();
            last_started.map_or(now, |t| now.max(t + opts.burst_window))
        });
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else { return }; // every watch task ended: aborted
                pending |= store.apply(update);
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                // What is already queued goes into this snapshot too.
                while let Ok(update) = updates.try_recv() {
                    store.apply(update);
                }
                pending = false;
                last_started = Some(Instant::now());
                store.assign_netns(&mut netns, &opts.node);
                let delta = store.take_delta();
                let objects = store.objects();
                let before = publisher.as_ref().map(|tx| tx.borrow().clone());
                generation += 1;
                // Indexing a cluster-sized snapshot takes a while: not on a worker of the proxy.
                let settings = opts.settings.clone();
                let made = tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    let (snapshot, made) =
                        next_snapshot(before.as_deref(), generation, objects, &delta, &settings);
                    drop(before);
                    (snapshot, made, started.elapsed())
                })
                .await;
                let (snapshot, made, took) = match made {
                    Ok(made) => made,
                    Err(e) => {
                        error!(error = %e, "indexing the configuration failed; the last good configuration stays in force");
                        return;
                    }
                };
                log_snapshot(&snapshot, made, took, &mut problems);
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
            _ = netns_retry.tick(), if publisher.is_some() && !pending && !netns.missing.is_empty() => {
                // Only a pod whose netns turned up (or changed) is worth a new snapshot.
                pending = store.assign_netns(&mut netns, &opts.node);
            }
            _ = waiting_log.tick(), if publisher.is_none() => {
                warn!(waiting_for = ?store.unsynced(), "Kubernetes source: still waiting for the first complete list");
            }
        }
    }
}

fn log_snapshot(snapshot: &Snapshot, made: Made, took: Duration, seen: &mut BTreeSet<String>) {
    let index_ms = took.as_secs_f64() * 1e3;
    let counts = (
        snapshot.generation,
        snapshot.pods.len(),
        snapshot.services.len(),
        snapshot.namespaces.len(),
    );
    if snapshot.generation == 1 {
        info!(
            generation = counts.0,
            pods = counts.1,
            services = counts.2,
            namespaces = counts.3,
            peer_authentications = snapshot.peer_authentications.len(),
            authorization_policies = snapshot.authorization_policies.len(),
            request_authentications = snapshot.request_authentications.len(),
            index_ms,
            "configuration loaded from Kubernetes"
        );
    } else {
        debug!(
            generation = counts.0,
            pods = counts.1,
            services = counts.2,
            namespaces = counts.3,
            made = ?made,
            index_ms,
            "configuration updated from Kubernetes"
        );
    }
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

    /// An in-process event stream: random watch events (objects added, edited, broken,
    /// deleted; relists; a kind not served) go through the aggregator's store, and every
    /// snapshot it makes from them (a delta applied to the one before, or the full-build
    /// fall-back) must answer every lookup as a full build of what the events say is in force:
    /// each object's last good version, for as long as it exists.
    #[test]
    fn snapshots_from_watch_events_answer_as_full_builds() {
        let mut ways = BTreeMap::<&str, usize>::new();
        for seed in 0..24 {
            event_stream(seed, 120, &mut ways);
        }
        eprintln!("{ways:?}");
        // Both ways, and the paths that matter, must be exercised for this to mean anything.
        assert!(
            ways["delta"] > 500 && ways["full"] > 100 && ways["no change"] > 100,
            "{ways:?}: the generator no longer exercises both ways"
        );
    }

    const NODE: &str = "n1";

    /// A random object of watch `w` (by [`watch_specs`]' order), good or not.
    fn random_object(rng: &mut fastrand::Rng, w: usize) -> Option<serde_json::Value> {
        use serde_json::json;
        let nsi = rng.usize(..4);
        let ns = ["istio-system", "a", "b", "c"][nsi];
        let bad = rng.u8(..10) == 0;
        let app = ["web", "db"][rng.usize(..2)];
        Some(match w {
            0 | 1 => {
                let n = rng.u8(..12);
                // Now and then two pods claim one address (a conflict).
                let ip = if rng.u8(..15) == 0 {
                    format!("10.1.0.{}", rng.u8(1..4))
                } else {
                    format!("10.2.{nsi}.{}", w * 12 + usize::from(n) + 1)
                };
                let node = if w == 0 {
                    NODE.to_owned()
                } else {
                    format!("n{}", rng.u8(2..4))
                };
                json!({"metadata": {"name": format!("{}{n}", ["p", "r"][w]), "namespace": ns, "uid": format!("uid-{w}-{ns}-{n}"),
                                    "labels": {"app": app, "v": rng.u8(..2).to_string()}},
                       "spec": {"nodeName": node, "serviceAccountName": app, "containers": []},
                       "status": {"phase": "Running", "podIP": if bad { "10.1.0.x".to_owned() } else { ip }}})
            }
            2 => {
                let labels = if rng.bool() {
                    json!({"istio.io/dataplane-mode": "ambient"})
                } else {
                    json!({})
                };
                json!({"metadata": {"name": ns, "labels": labels}})
            }
            3 => {
                let n = rng.u8(..6);
                let vip = if rng.u8(..15) == 0 {
                    format!("10.96.0.{}", rng.u8(1..3))
                } else {
                    format!("10.96.{}.{}", nsi + 1, n + 1)
                };
                json!({"metadata": {"name": format!("s{n}"), "namespace": ns},
                       "spec": {"clusterIP": if bad { "x".to_owned() } else { vip.clone() },
                                "clusterIPs": [if bad { "x".to_owned() } else { vip }],
                                "selector": {"app": app}, "ports": [{"port": 80 + u16::from(rng.u8(..2))}]}})
            }
            4 => {
                let mesh = if bad {
                    "not: [valid"
                } else {
                    "extensionProviders: []\n"
                };
                json!({"metadata": {"name": "istio", "namespace": "istio-system"}, "data": {"mesh": mesh}})
            }
            5 => json!({"metadata": {"name": format!("pa{}", rng.u8(..3)), "namespace": ns},
                        "spec": {"mtls": {"mode": if bad { "SOMETIMES" } else { ["STRICT", "PERMISSIVE"][rng.usize(..2)] }}}}),
            7 => json!({"metadata": {"name": format!("ap{}", rng.u8(..4)), "namespace": ns},
                        "spec": {"selector": {"matchLabels": {"app": app}},
                                 "action": if bad { "MAYBE" } else { ["ALLOW", "DENY"][rng.usize(..2)] },
                                 "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/*")]}}]}]}}),
            _ => return None,
        })
    }

    fn event_stream(seed: u64, steps: usize, ways: &mut BTreeMap<&'static str, usize>) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let settings = MeshSettings::default();
        let specs = watch_specs(NODE, &settings.root_namespace);
        let watched: Vec<usize> = (0..specs.len())
            .filter(|w| random_object(&mut fastrand::Rng::new(), *w).is_some())
            .collect();
        let mut store = Store::new(specs.clone(), Arc::new(Metrics::default()));
        let tmp = std::env::temp_dir().join(format!("ztunnel-no-cgroups-{}", std::process::id()));
        let host =
            crate::config::pod_netns::NsId::of(std::path::Path::new("/proc/self/ns/net")).unwrap();
        let mut netns = NetnsCache {
            finder: PodNetnsFinder::new(tmp, host),
            policy: EnrolmentPolicy::default(),
            found: HashMap::new(),
            missing: BTreeMap::new(),
        };
        // What is in force, by the events: each object's last good version.
        let mut truth: Vec<BTreeMap<Key, serde_json::Value>> = vec![BTreeMap::new(); specs.len()];
        let object = |w: usize, value: serde_json::Value| -> DynamicObject {
            serde_json::from_value(value).unwrap_or_else(|e| panic!("watch {w}: {e}"))
        };
        let good = |w: usize, value: &serde_json::Value| {
            parse(object(w, value.clone()), &specs[w].resource)
                .result
                .is_ok()
        };
        // Every watch lists first (some kinds not served).
        for w in 0..specs.len() {
            if !watched.contains(&w) || rng.u8(..8) == 0 {
                store.apply(Update::NotServed(w));
                continue;
            }
            let mut listed = Vec::new();
            // Every Namespace at first (pods without theirs are a problem only a full build
            // handles), then a few objects.
            let count = if w == NAMESPACES { 12 } else { rng.usize(..6) };
            for _ in 0..count {
                let v = random_object(&mut rng, w).unwrap();
                let p = parse(object(w, v.clone()), &specs[w].resource);
                // A key listed twice: the later version is the one listed.
                match p.result.is_ok() {
                    true => truth[w].insert(p.key.clone(), v),
                    false => truth[w].remove(&p.key),
                };
                listed.retain(|l: &Parsed| l.key != p.key);
                listed.push(p);
            }
            store.apply(Update::Listed(w, listed));
        }
        let mut before: Option<Snapshot> = None;
        for step in 0..steps {
            for _ in 0..rng.usize(1..4) {
                let w = watched[rng.usize(..watched.len())];
                match rng.u8(..20) {
                    0..=12 => {
                        let v = random_object(&mut rng, w).unwrap();
                        let p = parse(object(w, v.clone()), &specs[w].resource);
                        if good(w, &v) {
                            truth[w].insert(p.key.clone(), v);
                        }
                        store.apply(Update::Applied(w, p));
                    }
                    13..=16 => {
                        let keys: Vec<Key> = store.objects[w].keys().cloned().collect();
                        let rare = w == NAMESPACES && rng.u8(..4) > 0;
                        if let Some(key) =
                            keys.get(rng.usize(..keys.len().max(1))).filter(|_| !rare)
                        {
                            truth[w].remove(key);
                            store.apply(Update::Deleted(w, key.clone()));
                        }
                    }
                    17 | 18 => {
                        // A relist (after 410): some objects gone, some changed, some new.
                        let mut listed: Vec<Parsed> = Vec::new();
                        let mut now = BTreeMap::new();
                        for (key, v) in &truth[w] {
                            if rng.u8(..4) > 0 {
                                now.insert(key.clone(), v.clone());
                            }
                        }
                        for _ in 0..rng.usize(..3) {
                            let v = random_object(&mut rng, w).unwrap();
                            let key = key_of(&object(w, v.clone()));
                            if good(w, &v) {
                                now.insert(key, v);
                            } else if truth[w].contains_key(&key) {
                                // Bad in the list: the last good version stays.
                                now.insert(key.clone(), truth[w][&key].clone());
                                listed.push(parse(object(w, v), &specs[w].resource));
                            }
                        }
                        for v in now.values() {
                            let p = parse(object(w, v.clone()), &specs[w].resource);
                            if !listed.iter().any(|l| l.key == p.key) {
                                listed.push(p);
                            }
                        }
                        truth[w] = now;
                        store.apply(Update::Listed(w, listed));
                    }
                    _ => {
                        truth[w].clear();
                        store.apply(Update::NotServed(w));
                    }
                }
            }
            // One snapshot, as the aggregator makes it.
            let generation = step as u64 + 1;
            store.assign_netns(&mut netns, NODE);
            let delta = store.take_delta();
            if before.is_some() && delta.is_empty() {
                *ways.entry("no change").or_default() += 1;
            }
            let (applied, made) = next_snapshot(
                before.as_ref(),
                generation,
                store.objects(),
                &delta,
                &settings,
            );
            if before.is_some() {
                *ways
                    .entry(if made == Made::Delta { "delta" } else { "full" })
                    .or_default() += 1;
            }
            let mut expected = Objects::default();
            for (w, objects) in truth.iter().enumerate() {
                for v in objects.values() {
                    let parsed = parse(object(w, v.clone()), &specs[w].resource);
                    expected.extend_from(&parsed.result.unwrap());
                }
            }
            let built = Snapshot::build(generation, expected, &settings);
            crate::state::apply_tests::assert_same(
                &applied,
                &built,
                &format!("seed {seed} step {step}"),
            );
            before = Some(applied);
        }
    }
}
