//! The routing decisions of `Snapshot::http_route`, `tcp_route` and `destination_policy` as
//! tables, on configurations parsed from YAML as the proxy parses them (here, above both the
//! parser and the snapshot, so that neither layer imports the other for its tests).
use std::time::Duration;

use crate::{
    config::parse_file,
    model::Labels,
    state::{MeshSettings, Objects, Snapshot},
    traffic::{
        virtual_service::{Destination, Source},
        *,
    },
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {clusterIP: 10.96.0.21, selector: {app: ratings}, ports: [{name: http, port: 9080}, {name: http-admin, port: 9090}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {containers: [{name: app, ports: [{containerPort: 9080}]}]}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {containers: [{name: app, ports: [{containerPort: 9080}]}]}
status: {podIP: 10.1.0.6}
"#;

fn snapshot(extra: &str) -> Snapshot {
    let mut objects = Objects::default();
    parse_file(
        std::path::Path::new("t.yaml"),
        &format!("{CLUSTER}---\n{extra}"),
        &mut objects,
    )
    .unwrap();
    Snapshot::build(1, objects, &MeshSettings::default())
}

fn src<'a>(ns: &'a str, labels: &'a Labels) -> Source<'a> {
    Source {
        namespace: ns,
        labels,
    }
}

#[test]
fn virtual_services_are_chosen_by_specificity_then_age_and_conflicts_reported() {
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-new, namespace: bookinfo, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: a-old, namespace: bookinfo, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {hosts: [reviews.bookinfo.svc.cluster.local], http: [{route: [{destination: {host: reviews}}]}]}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: wildcard, namespace: other}
spec: {hosts: ["*.bookinfo.svc.cluster.local"], http: [{route: [{destination: {host: reviews.bookinfo.svc.cluster.local}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: other}
spec: {hosts: [10.96.0.21], exportTo: ["."], http: [{route: [{destination: {host: ratings.bookinfo.svc.cluster.local}}]}]}
"#,
    );
    let reviews = &s.services[&("bookinfo".into(), "reviews".into())];
    let sel = s.virtual_service_for("bookinfo", reviews);
    assert_eq!(sel.chosen.unwrap().name, "a-old");
    let shadowed: Vec<&str> = sel.shadowed.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        shadowed,
        ["b-new", "wildcard"],
        "exact hosts first, then oldest"
    );
    assert!(
        s.problems.iter().any(|p| p.contains("bookinfo/a-old")
            && p.contains("bookinfo/b-new")
            && p.contains("ignored")),
        "{:#?}",
        s.problems
    );
    let ratings = &s.services[&("bookinfo".into(), "ratings".into())];
    assert_eq!(
        s.virtual_service_for("other", ratings).chosen.unwrap().name,
        "private",
        "a VIP as host"
    );
    let from_wildcard = s.virtual_service_for("bookinfo", ratings);
    assert_eq!(
        from_wildcard.chosen.unwrap().name,
        "wildcard",
        "exportTo . hides `private` from bookinfo"
    );
}

#[test]
fn destination_rules_are_looked_up_client_then_service_then_root() {
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc-ns, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: more, namespace: bookinfo, creationTimestamp: "2030-01-01T00:00:00Z"}
spec: {host: reviews, subsets: [{name: v2, labels: {version: v2}}], trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: client-ns, namespace: frontend}
spec: {host: reviews.bookinfo.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh, namespace: istio-system}
spec: {host: "*.svc.cluster.local", trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}}
"#,
    );
    let reviews = s.services[&("bookinfo".into(), "reviews".into())].clone();
    let ratings = s.services[&("bookinfo".into(), "ratings".into())].clone();
    let none = Labels::new();
    assert_eq!(
        s.destination_rule_for(&src("frontend", &none), &reviews)
            .unwrap()
            .name,
        "client-ns"
    );
    let svc_ns = s
        .destination_rule_for(&src("bookinfo", &none), &reviews)
        .unwrap();
    assert_eq!(svc_ns.name, "svc-ns");
    assert!(
        svc_ns.subset("v2").is_some(),
        "rules of one namespace and host are merged"
    );
    assert_eq!(
        svc_ns.policy_for(None, 9080).load_balancer,
        crate::traffic::destination_rule::LoadBalancer::Random
    );
    assert_eq!(
        s.destination_rule_for(&src("bookinfo", &none), &ratings)
            .unwrap()
            .name,
        "mesh",
        "the root namespace last"
    );

    let d = |subset: Option<&str>, port: Option<u16>| Destination {
        host: "reviews".into(),
        fqdn: "reviews.bookinfo.svc.cluster.local".into(),
        subset: subset.map(str::to_owned),
        port,
    };
    let c = s
        .resolve_destination(&src("bookinfo", &none), &d(Some("v2"), None), 9080)
        .unwrap();
    assert_eq!(
        c.name(),
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"
    );
    let eps: Vec<String> = s
        .cluster_endpoints(&c)
        .iter()
        .map(|e| e.pod.name.clone())
        .collect();
    assert_eq!(eps, ["reviews-v2"]);
    assert!(
        matches!(
            s.resolve_destination(&src("frontend", &none), &d(Some("v2"), None), 9080),
            Err(Unroutable::MissingSubset { .. })
        ),
        "the client's namespace rule has no subsets"
    );
    assert!(matches!(
        s.resolve_destination(&src("bookinfo", &none), &d(None, Some(1)), 9080),
        Err(Unroutable::NoPort { .. })
    ));
    let mut unknown = d(None, None);
    unknown.fqdn = "nope.bookinfo.svc.cluster.local".into();
    assert!(matches!(
        s.resolve_destination(&src("bookinfo", &none), &unknown, 9080),
        Err(Unroutable::UnknownHost(_))
    ));
}

#[test]
fn routes_to_unknown_hosts_and_subsets_are_problems() {
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: nowhere}, weight: 50}
    - {destination: {host: reviews, subset: v9}, weight: 50}
"#,
    );
    assert!(
        s.problems
            .iter()
            .any(|p| p.contains("nowhere.bookinfo.svc.cluster.local is not a known Service")),
        "{:#?}",
        s.problems
    );
    assert!(
        s.problems.iter().any(|p| p.contains("subset v9")),
        "{:#?}",
        s.problems
    );
}

const BOOKINFO_RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: shift
    match: [{uri: {prefix: /shift}}]
    rewrite: {uri: /reviews}
    timeout: 3s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,connect-failure"}
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  http:
  - match: [{headers: {end-user: {exact: jason}}, port: 9080}]
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 100}}
      abort: {httpStatus: 500, percentage: {value: 50}}
    route: [{destination: {host: ratings}}]
"#;

fn get(
    s: &Snapshot,
    service: &str,
    port: u16,
    path: &str,
    headers: &[(&'static str, &str)],
) -> HttpDecision {
    let svc = s.services[&("bookinfo".to_owned(), service.to_owned())].clone();
    let labels = Labels::new();
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(*k, v.parse().unwrap());
    }
    s.http_route(&HttpRouteRequest {
        source: SourceWorkload {
            namespace: "bookinfo",
            labels: &labels,
        },
        service: &svc,
        port,
        method: &http::Method::GET,
        path,
        authority: "reviews:9080",
        headers: &map,
    })
}

fn routed(d: HttpDecision) -> RouteAction {
    match d {
        HttpDecision::Routed(a) => *a,
        other => panic!("not routed: {other:?}"),
    }
}

/// Istio's Bookinfo walkthrough, as decisions.
#[test]
fn bookinfo_walkthrough_decides_as_istio() {
    let s = snapshot(BOOKINFO_RULES);
    assert!(s.problems.is_empty(), "{:#?}", s.problems);
    let subsets = |a: &RouteAction| -> Vec<(String, u32)> {
        a.destinations
            .iter()
            .map(|d| {
                let c = d.target.as_ref().unwrap();
                (c.subset_name().unwrap_or("-").to_owned(), d.weight)
            })
            .collect()
    };

    let jason = routed(get(&s, "reviews", 9080, "/", &[("end-user", "jason")]));
    assert_eq!(jason.virtual_service.to_string(), "bookinfo/reviews");
    assert_eq!(
        (jason.route.index, jason.route.name.as_deref()),
        (0, Some("jason"))
    );
    assert_eq!(subsets(&jason), [("v2".to_owned(), 100)]);
    let v2 = jason.destinations[0].target.as_ref().unwrap();
    assert_eq!(v2.policy.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(v2.policy.connection_pool.max_connections, 1, "inherited");
    let eps: Vec<_> = s
        .cluster_endpoints(v2)
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(eps, ["10.1.0.6:9080"]);
    assert_eq!(
        jason.retries,
        RetryPolicy::default(),
        "Istio's default retries"
    );
    assert_eq!(jason.timeout, None);

    let other = routed(get(&s, "reviews", 9080, "/", &[("end-user", "mary")]));
    assert_eq!(other.route.index, 2);
    assert_eq!(subsets(&other), [("v1".to_owned(), 100)]);

    let shift = routed(get(&s, "reviews", 9080, "/shift/1?x=y", &[]));
    assert_eq!(
        subsets(&shift),
        [("v1".to_owned(), 80), ("v2".to_owned(), 20)]
    );
    assert_eq!(
        shift.rewrite.as_ref().and_then(|r| r.path.as_deref()),
        Some("/reviews/1?x=y"),
        "the matched prefix is replaced, the query kept"
    );
    assert_eq!(shift.timeout, Some(Duration::from_secs(3)));
    assert_eq!(shift.retries.attempts, 3);
    assert_eq!(shift.retries.per_try_timeout, Some(Duration::from_secs(1)));
    assert_eq!(
        shift.retries.retry_on,
        [RetryOn::FiveXx, RetryOn::ConnectFailure]
    );

    let slow = routed(get(
        &s,
        "ratings",
        9080,
        "/ratings/0",
        &[("end-user", "jason")],
    ));
    let delay = slow.fault.delay.unwrap();
    assert_eq!(delay.duration, Duration::from_secs(7));
    assert_eq!(delay.percentage, Share::ALL);
    let abort = slow.fault.abort.unwrap();
    assert_eq!(abort.status, Abort::Http(500));
    assert_eq!(abort.percentage.percent(), 50.0);
    let ratings = slow.destinations[0].target.as_ref().unwrap();
    assert_eq!(ratings.port, 9080, "the port the request was sent to");
    assert!(ratings.subset.is_none() && ratings.destination_rule.is_none());

    assert!(
        matches!(
            get(&s, "ratings", 9080, "/", &[]),
            HttpDecision::NoRoute { .. }
        ),
        "a VirtualService without a catch-all route: 404"
    );
    assert!(
        matches!(
            get(&s, "ratings", 9090, "/", &[("end-user", "jason")]),
            HttpDecision::NoRoute { .. }
        ),
        "the match names port 9080"
    );
}

#[test]
fn source_labels_namespaces_and_tcp_routes_select_clients() {
    let s = snapshot(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}}, {sourceNamespace: canary}]
    route: [{destination: {host: reviews, port: {number: 9080}}}]
  tcp:
  - match: [{port: 9080}]
    route:
    - {destination: {host: reviews}, weight: 1}
    - {destination: {host: nowhere}, weight: 3}
"#,
    );
    let svc = s.services[&("bookinfo".to_owned(), "reviews".to_owned())].clone();
    let pp: Labels = [("app".to_owned(), "productpage".to_owned())].into();
    let none = Labels::new();
    let ask = |ns: &str, labels: &Labels| {
        s.http_route(&HttpRouteRequest {
            source: SourceWorkload {
                namespace: ns,
                labels,
            },
            service: &svc,
            port: 9080,
            method: &http::Method::GET,
            path: "/",
            authority: "reviews",
            headers: &http::HeaderMap::new(),
        })
    };
    assert!(matches!(ask("bookinfo", &pp), HttpDecision::Routed(_)));
    assert!(matches!(ask("canary", &none), HttpDecision::Routed(_)));
    assert!(matches!(
        ask("bookinfo", &none),
        HttpDecision::NoRoute { .. }
    ));

    let source = SourceWorkload {
        namespace: "bookinfo",
        labels: &none,
    };
    match s.tcp_route(source, &svc, "10.96.0.20:9080".parse().unwrap()) {
        TcpDecision::Routed { destinations, .. } => {
            assert_eq!(destinations.len(), 2);
            assert!(destinations[0].target.is_ok());
            assert!(matches!(
                destinations[1].target,
                Err(Unroutable::UnknownHost(_))
            ));
            assert_eq!(destinations[1].weight, 3, "weights are relative");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.tcp_route(source, &svc, "10.96.0.20:9081".parse().unwrap()),
        TcpDecision::NoRoute { .. }
    ));
    assert!(
        s.problems.iter().any(|p| p.contains("nowhere")),
        "{:#?}",
        s.problems
    );
}

#[test]
fn destination_policy_applies_without_a_virtual_service() {
    let s = snapshot(BOOKINFO_RULES);
    let svc = s.services[&("bookinfo".to_owned(), "reviews".to_owned())].clone();
    let none = Labels::new();
    let source = SourceWorkload {
        namespace: "bookinfo",
        labels: &none,
    };
    let p = s.destination_policy(source, &svc, None, 9080);
    assert_eq!(p.connection_pool.max_connections, 1);
    assert_eq!(
        p.load_balancer,
        LoadBalancer::LeastRequest,
        "Istio's default"
    );
    let v2 = s.destination_policy(source, &svc, Some("v2"), 9080);
    assert_eq!(v2.load_balancer, LoadBalancer::RoundRobin);
    let ratings = s.services[&("bookinfo".to_owned(), "ratings".to_owned())].clone();
    assert_eq!(
        s.destination_policy(source, &ratings, None, 9080),
        TrafficPolicy::default()
    );
}
