//! The Kubernetes source follows the API: enrolment by namespace label, policies enforced,
//! bad objects skipped, relists after 410, recovery after server errors.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde_json::json;
use tokio::{sync::watch, time::Instant};
use ztunnel::{
    authz::{admit, Admission, InboundCall, Transport, Unknowns},
    config::{
        kubernetes::{self, KubernetesOptions},
        pod_netns::{NsId, PodNetnsFinder},
        WatchHandle,
    },
    identity::SpiffeId,
    kubernetes::ApiAccess,
    metrics::Metrics,
    state::{Enrolment, EnrolmentPolicy, MeshSettings, Snapshot},
};

use crate::{
    apiserver::{ApiServer, Gone, KUBECONFIG_TOKEN},
    support::{namespace, pod, Logs, NetnsProcess, TempDir},
};

const WEB_UID: &str = "0a1b2c3d-0000-4000-8000-00000000a001";
const API_UID: &str = "0a1b2c3d-0000-4000-8000-00000000b002";
const AMBIENT: &str = "istio.io/dataplane-mode";
const WAIT: Duration = Duration::from_secs(15);

struct Source {
    rx: watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    _handle: WatchHandle,
    _dir: TempDir,
}

/// Starts the source for node `n1` against `server`, finding netns below `cgroups`.
async fn start(server: &ApiServer, cgroups: &Path) -> Source {
    let dir = TempDir::new("kubeconfig");
    let client = ApiAccess::Kubeconfig(server.kubeconfig(dir.path()))
        .client()
        .await
        .unwrap();
    let host = NsId::of(Path::new("/proc/self/ns/net")).unwrap();
    let mut opts = KubernetesOptions::new(
        "n1".into(),
        MeshSettings::default(),
        PodNetnsFinder::new(cgroups.to_owned(), host),
    );
    opts.burst_window = Duration::from_millis(50);
    opts.retry_min = Duration::from_millis(20);
    opts.retry_max = Duration::from_millis(200);
    opts.netns_retry = Duration::from_millis(50);
    let metrics = Arc::new(Metrics::default());
    let (rx, handle) = tokio::time::timeout(WAIT, kubernetes::watch(client, opts, metrics.clone()))
        .await
        .expect("first snapshot in time")
        .unwrap();
    Source {
        rx,
        metrics,
        _handle: handle,
        _dir: dir,
    }
}

impl Source {
    /// Creates namespace `name` and waits for it: every change before it has been seen.
    async fn new_namespace(&mut self, server: &ApiServer, name: &str) -> Arc<Snapshot> {
        server.apply(namespace(name, json!({})));
        self.until(&format!("namespace {name}"), |s| {
            s.namespaces.contains_key(name)
        })
        .await
    }

    /// Waits until a published snapshot satisfies `pred`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.rx.borrow_and_update().clone();
            if pred(&s) {
                return s;
            }
            match tokio::time::timeout_at(deadline, self.rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the source stopped while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; last snapshot: generation {}, pods {:?}, namespaces {:?}, policies {}",
                    s.generation,
                    s.pods.keys().collect::<Vec<_>>(),
                    s.namespaces.keys().collect::<Vec<_>>(),
                    s.authorization_policies.len()
                ),
            }
        }
    }
}

fn enrolment(s: &Snapshot, ns: &str, name: &str) -> Enrolment {
    let pod = &s.pods[&(ns.to_owned(), name.to_owned())];
    s.enrolment(pod, "n1", &EnrolmentPolicy::default())
}

/// A kubelet-shaped cgroup directory (cgroupfs driver) for pod `uid` holding `pid`. The
/// directory tree is plain files: the finder only reads `cgroup.procs`.
fn kubelet_cgroup(root: &Path, uid: &str, pid: u32) {
    let dir = root.join(format!("kubepods/besteffort/pod{uid}/0123abcd"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
}

fn two_pods(server: &ApiServer) {
    server.register_defaults();
    server.apply(namespace("shop", json!({})));
    server.apply(pod(
        "shop",
        "web",
        WEB_UID,
        "n1",
        "10.1.0.2",
        "web",
        json!({"app": "web"}),
    ));
    server.apply(pod(
        "shop",
        "api",
        API_UID,
        "n2",
        "10.2.0.2",
        "api",
        json!({"app": "api"}),
    ));
}

/// A mesh call from `shop/api` (on the other node) to `shop/web:8080`.
fn call_from_api(s: &Snapshot) -> Admission {
    let web = &s.pods[&("shop".to_owned(), "web".to_owned())];
    let api_id = SpiffeId::new("cluster.local", "shop", "api").unwrap();
    let src: IpAddr = "10.2.0.2".parse().unwrap();
    let dst = SocketAddr::new("10.1.0.2".parse().unwrap(), 8080);
    let call = InboundCall::new(Transport::Mesh, Some(&api_id), Some(src), dst);
    admit(s, web, &call, Unknowns::Conservative)
}

#[tokio::test]
async fn labelled_namespace_enrols_its_pods_and_policies_are_enforced() {
    let server = ApiServer::start().await;
    two_pods(&server);
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;

    let s = source.until("the pods", |s| s.pods.len() == 2).await;
    let web = &s.pods[&("shop".into(), "web".into())];
    assert_eq!(web.netns_path, None, "no process of the pod exists yet");
    assert_eq!(
        enrolment(&s, "shop", "web"),
        Enrolment::NamespaceNotLabelled
    );
    // The other node's pod is known with what the outbound side needs: identity, address.
    let api = &s.pods[&("shop".into(), "api".into())];
    assert_eq!(api.node_name.as_deref(), Some("n2"));
    assert_eq!(api.service_account, "api");
    assert_eq!(
        s.pod_by_ip("10.2.0.2".parse().unwrap()).unwrap().name,
        "api"
    );
    assert_eq!(
        api.origin.to_string(),
        "k8s:Pod/shop/api",
        "objects name their API origin"
    );

    // The pod's sandbox starts. Its namespace is not in the mesh, so its netns is not
    // looked for (nothing would use it).
    let sandbox = NetnsProcess::start();
    kubelet_cgroup(cgroups.path(), WEB_UID, sandbox.pid());
    let s = source.new_namespace(&server, "later").await;
    let web = &s.pods[&("shop".into(), "web".into())];
    assert_eq!(web.netns_path, None);
    assert_eq!(
        enrolment(&s, "shop", "web"),
        Enrolment::NamespaceNotLabelled
    );

    // Labelling the namespace finds the netns and enrols the pod on this node, without any
    // change of the pod; the remote one joins the mesh.
    server.apply(namespace("shop", json!({AMBIENT: "ambient"})));
    let s = source
        .until("shop enrolled", |s| {
            enrolment(s, "shop", "web") == Enrolment::Enrolled
        })
        .await;
    let web = &s.pods[&("shop".into(), "web".into())];
    assert_eq!(
        web.netns_path.as_deref(),
        Some(sandbox.netns_path().as_path())
    );
    let api = &s.pods[&("shop".into(), "api".into())];
    assert!(s.in_mesh(api, &EnrolmentPolicy::default()));
    assert_eq!(
        enrolment(&s, "shop", "api"),
        Enrolment::OtherNode("n2".into())
    );
    assert!(
        matches!(call_from_api(&s), Admission::Allowed(_)),
        "no policy yet"
    );

    // A DENY policy for api's identity is enforced once it arrives.
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-api", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/api"]}}]}]}
    }));
    let s = source
        .until("the policy", |s| s.authorization_policies.len() == 1)
        .await;
    match call_from_api(&s) {
        Admission::Denied(d) => assert_eq!(d.policy.as_deref(), Some("shop/deny-api")),
        other => panic!("expected a denial, got {other:?}"),
    }

    // Opting the pod out and deleting the policy both apply.
    server.apply(pod(
        "shop",
        "web",
        WEB_UID,
        "n1",
        "10.1.0.2",
        "web",
        json!({"app": "web", AMBIENT: "none"}),
    ));
    assert!(server.delete("AuthorizationPolicy", "shop", "deny-api"));
    let s = source
        .until("opt-out and policy removal", |s| {
            enrolment(s, "shop", "web") == Enrolment::OptedOut
                && s.authorization_policies.is_empty()
        })
        .await;
    assert!(matches!(call_from_api(&s), Admission::Allowed(_)));
}

/// Only this node's pods that could be captured are looked up: not host-network pods (they
/// have no netns of their own; issue 13 saw the CA pod looked up forever), not pods outside
/// the mesh, not opted-out pods.
#[test]
fn only_pods_that_could_be_captured_are_looked_up_for_a_netns() {
    const HOST_UID: &str = "0a1b2c3d-0000-4000-8000-00000000c003";
    const PLAIN_UID: &str = "0a1b2c3d-0000-4000-8000-00000000d004";
    const OUT_UID: &str = "0a1b2c3d-0000-4000-8000-00000000e005";
    let logs = Logs::default();
    let _guard = logs.capture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cgroups = TempDir::new("cgroups");
    let sandbox = NetnsProcess::start();
    rt.block_on(async {
        let server = ApiServer::start().await;
        server.register_defaults();
        server.apply(namespace("shop", json!({AMBIENT: "ambient"})));
        server.apply(namespace("plain", json!({})));
        let mut host = pod("shop", "ca", HOST_UID, "n1", "10.255.0.1", "ca", json!({}));
        host["spec"]["hostNetwork"] = json!(true);
        server.apply(host);
        server.apply(pod(
            "plain",
            "app",
            PLAIN_UID,
            "n1",
            "10.1.0.7",
            "app",
            json!({}),
        ));
        server.apply(pod(
            "shop",
            "out",
            OUT_UID,
            "n1",
            "10.1.0.8",
            "out",
            json!({AMBIENT: "none"}),
        ));
        // web is in the mesh and its sandbox has not started: looked for, and reported once.
        server.apply(pod(
            "shop",
            "web",
            WEB_UID,
            "n1",
            "10.1.0.2",
            "web",
            json!({}),
        ));
        // The host-network pod's processes are the node's: a kubelet cgroup holding one of ours.
        kubelet_cgroup(cgroups.path(), HOST_UID, std::process::id());
        kubelet_cgroup(cgroups.path(), PLAIN_UID, sandbox.pid());
        kubelet_cgroup(cgroups.path(), OUT_UID, sandbox.pid());
        let mut source = start(&server, cgroups.path()).await;
        let s = source.until("the pods", |s| s.pods.len() == 4).await;
        // Several retry rounds of the netns lookup (every 50 ms here).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let s2 = source.new_namespace(&server, "later").await;
        for s in [&s, &s2] {
            for name in [
                ("shop", "ca"),
                ("plain", "app"),
                ("shop", "out"),
                ("shop", "web"),
            ] {
                let p = &s.pods[&(name.0.to_owned(), name.1.to_owned())];
                assert_eq!(p.netns_path, None, "{name:?}");
            }
        }
    });
    let text = logs.text();
    let lookups: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pod network namespace not found yet"))
        .collect();
    assert_eq!(
        lookups.len(),
        1,
        "only shop/web is looked for, once: {lookups:#?}"
    );
    assert!(lookups[0].contains("shop/web"), "{lookups:#?}");
}

#[test]
fn bad_objects_are_reported_and_skipped_keeping_their_last_good_version() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let server = ApiServer::start().await;
        two_pods(&server);
        let deny = |action: &str| {
            json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-api", "namespace": "shop"},
                "spec": {"action": action, "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}
            })
        };
        server.apply(deny("DENY"));
        // Bad from the start: never applied, and it does not hold back the rest.
        server.apply(json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICTLY"}}
        }));
        let cgroups = TempDir::new("cgroups");
        let mut source = start(&server, cgroups.path()).await;
        let s = source.until("the policy", |s| s.authorization_policies.len() == 1).await;
        assert!(s.peer_authentications.is_empty());
        assert_eq!(s.pods.len(), 2);
        assert!(matches!(call_from_api(&s), Admission::Denied(_)));

        // A broken edit of the DENY policy keeps the last good version in force.
        server.apply(deny("DENYY"));
        let s = source.new_namespace(&server, "later").await;
        assert_eq!(s.authorization_policies.len(), 1);
        assert!(matches!(call_from_api(&s), Admission::Denied(_)), "the last good DENY stays");

        // Fixing it applies the fix.
        server.apply(deny("AUDIT"));
        let s = source.until("the fixed policy", |s| matches!(call_from_api(s), Admission::Allowed(_))).await;
        assert_eq!(s.authorization_policies.len(), 1);
    });
    let text = logs.text();
    let rejected: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Kubernetes object rejected"))
        .collect();
    assert_eq!(
        rejected.len(),
        2,
        "each bad version reported once: {rejected:#?}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("kind=PeerAuthentication")
                && l.contains("namespace=shop")
                && l.contains("name=strict")
                && l.contains("STRICTLY")
                && l.contains("it is not applied")),
        "{rejected:#?}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("kind=AuthorizationPolicy")
                && l.contains("name=deny-api")
                && l.contains("DENYY")
                && l.contains("last good version stays in force")),
        "{rejected:#?}"
    );
}

/// `ztunnel_config_rejected_total` counts the objects the Kubernetes source rejects, as it
/// counts the directory source's rejected versions (it stayed at 0 under `--kubernetes`).
#[tokio::test]
async fn rejected_objects_count_in_the_config_rejected_metric() {
    let server = ApiServer::start().await;
    two_pods(&server);
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICTLY"}}
    }));
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    let scraped = |metrics: &Metrics| {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("ztunnel_config_rejected_total "))
            .map(str::to_owned)
    };
    assert_eq!(
        scraped(&source.metrics).as_deref(),
        Some("1"),
        "the bad PeerAuthentication"
    );

    // A second bad version of the same object counts again; a good one does not.
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICTEST"}}
    }));
    source.new_namespace(&server, "later").await;
    assert_eq!(scraped(&source.metrics).as_deref(), Some("2"));
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}}
    }));
    source
        .until("the fixed policy", |s| s.peer_authentications.len() == 1)
        .await;
    assert_eq!(scraped(&source.metrics).as_deref(), Some("2"));
}

async fn relist_after_gone(gone: Gone) {
    let server = ApiServer::start().await;
    two_pods(&server);
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    source.until("the pods", |s| s.pods.len() == 2).await;
    let pod_lists = server.lists_of("/api/v1/pods");
    // While every watch is down and history is compacted, api goes and db comes.
    server.compact_and_change(gone, |c| {
        assert!(c.delete("Pod", "shop", "api"));
        c.apply(pod(
            "shop",
            "db",
            "0a1b2c3d-0000-4000-8000-00000000c003",
            "n2",
            "10.2.0.3",
            "db",
            json!({}),
        ));
        c.apply(namespace("shop", json!({AMBIENT: "ambient"})));
    });
    let s = source
        .until("the relisted state", |s| {
            s.pods.contains_key(&("shop".into(), "db".into()))
                && !s.pods.contains_key(&("shop".into(), "api".into()))
                && s.namespaces["shop"].labels.get(AMBIENT).map(String::as_str) == Some("ambient")
        })
        .await;
    assert_eq!(s.pods.len(), 2);
    assert!(
        s.pod_by_ip("10.2.0.2".parse().unwrap()).is_none(),
        "the deleted pod's address is gone"
    );
    let relists = server.lists_of("/api/v1/pods");
    assert!(
        relists > pod_lists,
        "the pods were listed again ({pod_lists} → {relists})"
    );

    // And watching resumes after the relist.
    let s = source.new_namespace(&server, "after").await;

    // A relist that finds nothing new publishes nothing.
    let lists = server.lists_of("/api/v1/pods");
    server.compact_and_change(gone, |_| {});
    let deadline = Instant::now() + WAIT;
    while server.lists_of("/api/v1/pods") < lists + 2 {
        assert!(Instant::now() < deadline, "both pod watches list again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Time for the lists to arrive and for a (wrong) snapshot to be published after them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quiet = source.new_namespace(&server, "quiet").await;
    assert_eq!(
        quiet.generation,
        s.generation + 1,
        "only the new namespace made a snapshot"
    );
}

#[tokio::test]
async fn relists_after_410_gone_as_a_watch_event_and_converges() {
    relist_after_gone(Gone::Event).await;
}

#[tokio::test]
async fn relists_after_410_gone_as_an_http_status_and_converges() {
    relist_after_gone(Gone::Http).await;
}

#[tokio::test]
async fn server_errors_and_broken_watches_are_retried_until_it_recovers() {
    let server = ApiServer::start().await;
    two_pods(&server);
    // The first requests all fail: the first snapshot waits for a complete list.
    server.fail_next(&[500; 12]);
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    assert_eq!(server.pending_failures(), 0);
    source.until("the pods", |s| s.pods.len() == 2).await;

    // Broken connections, then errors on the re-watches; a change made meanwhile arrives.
    server.fail_next(&[500, 503, 500, 500, 500, 500, 500, 500]);
    server.end_watches(true);
    server.apply(namespace("shop", json!({AMBIENT: "ambient"})));
    source
        .until("the change after the errors", |s| {
            s.namespaces["shop"].labels.contains_key(AMBIENT)
        })
        .await;
    assert_eq!(server.pending_failures(), 0);

    // Cleanly ended watches resume from where they were.
    server.end_watches(false);
    source.new_namespace(&server, "next").await;
}

#[tokio::test]
async fn missing_istio_crds_do_not_block_the_source_and_are_picked_up_later() {
    let server = ApiServer::start().await;
    server.register("api/v1", "namespaces", "Namespace", false);
    server.register("api/v1", "pods", "Pod", true);
    server.register("api/v1", "services", "Service", true);
    server.register("api/v1", "configmaps", "ConfigMap", true);
    server.apply(namespace("shop", json!({})));
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    let s = source
        .until("the namespace", |s| s.namespaces.contains_key("shop"))
        .await;
    assert!(s.authorization_policies.is_empty());

    server.register_istio();
    server.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}}
    }));
    source
        .until("the PeerAuthentication", |s| {
            s.peer_authentications.len() == 1
        })
        .await;
}

#[tokio::test]
async fn bursts_are_published_as_few_snapshots_and_mesh_config_is_read() {
    let server = ApiServer::start().await;
    two_pods(&server);
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    let before = source
        .until("the pods", |s| s.pods.len() == 2)
        .await
        .generation;
    for i in 0..100 {
        server.apply(pod(
            "shop",
            &format!("p{i}"),
            &format!("0a1b2c3d-0000-4000-8000-{i:012}"),
            "n2",
            &format!("10.3.{}.{}", i / 200, i % 200 + 1),
            "default",
            json!({}),
        ));
    }
    let s = source.until("the burst", |s| s.pods.len() == 102).await;
    assert!(
        s.generation - before <= 5,
        "100 changes took {} snapshots",
        s.generation - before
    );

    // A status change the snapshot does not hold publishes nothing.
    let mut p0 = pod(
        "shop",
        "p0",
        "0a1b2c3d-0000-4000-8000-000000000000",
        "n2",
        "10.3.0.1",
        "default",
        json!({}),
    );
    p0["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    server.apply(p0);
    let quiet = tokio::time::timeout(Duration::from_millis(500), source.rx.changed()).await;
    assert!(quiet.is_err(), "no new snapshot for an unread field");

    // The mesh configuration comes from the root namespace's `istio` ConfigMap.
    server.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "extensionProviders:\n- name: authz\n  envoyExtAuthzHttp: {service: authz.shop.svc.cluster.local, port: 9000}\n"}
    }));
    server.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "shop"},
        "data": {"mesh": "not: [valid"}
    }));
    let s = source
        .until("the mesh config", |s| {
            s.mesh_config.http_providers.contains_key("authz")
        })
        .await;
    assert!(
        s.problems.is_empty(),
        "another namespace's ConfigMap is not watched: {:?}",
        s.problems
    );
}

#[tokio::test]
async fn the_api_is_reached_over_tls_with_the_kubeconfig_ca_and_token() {
    let server = ApiServer::start_tls().await;
    two_pods(&server);
    let cgroups = TempDir::new("cgroups");
    let mut source = start(&server, cgroups.path()).await;
    source.until("the pods", |s| s.pods.len() == 2).await;
    let auth = server.authorizations();
    assert!(!auth.is_empty());
    assert!(
        auth.iter()
            .all(|a| *a == format!("Bearer {KUBECONFIG_TOKEN}")),
        "{auth:?}"
    );
}
