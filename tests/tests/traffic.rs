//! End-to-end tests of traffic management on the source side (VirtualService and
//! DestinationRule applied by the caller's node proxy, docs/traffic.md), in Istio's Bookinfo
//! shape: productpage, details, ratings and reviews v1/v2/v3 as small HTTP servers that answer
//! with their name and version, all on node 2; the caller on node 1, so every routed request
//! crosses nodes over HBONE. Rules are files of the configuration directory, rewritten while
//! the proxies run.
use anyhow::{ensure, Result};
use serde_json::Value;
use ztunnel_tests::{pod, service, Cluster, Proc};

mod common;

use common::{mesh_pod, AMBIENT, WAIT};

const NS: &str = "bookinfo";
const PORT: u16 = 9080;

/// A Bookinfo pod `<app>-<version>` on node 2, serving `vc-probe http-server-ka` on 9080.
struct App {
    app: &'static str,
    version: &'static str,
    /// `--fail-every`: every K-th request answered 503 (0: never).
    fail_every: u32,
}

const fn app(app: &'static str, version: &'static str) -> App {
    App {
        app,
        version,
        fail_every: 0,
    }
}

const BOOKINFO: &[App] = &[
    app("productpage", "v1"),
    app("details", "v1"),
    app("ratings", "v1"),
    app("reviews", "v1"),
    app("reviews", "v2"),
    app("reviews", "v3"),
];

/// The cluster with `apps` (and their Services, port `http` 9080) and a `client` mesh pod
/// on node 1; the servers run until the returned handles drop.
fn start(apps: &[App]) -> Result<(Cluster, Vec<Proc>)> {
    let mut b = Cluster::builder()
        .nodes(2)
        .namespace(NS, &[AMBIENT])
        .pod(mesh_pod(NS, "client", 1));
    let mut services: Vec<&str> = Vec::new();
    for a in apps {
        b = b.pod(
            pod(NS, &format!("{}-{}", a.app, a.version))
                .node(2)
                .service_account(&format!("bookinfo-{}", a.app))
                .labels(&[("app", a.app), ("version", a.version)]),
        );
        if !services.contains(&a.app) {
            services.push(a.app);
            b = b.service(
                service(NS, a.app)
                    .selector(&[("app", a.app)])
                    .named_port("http", PORT, PORT),
            );
        }
    }
    let c = b.start()?;
    c.wait_enrolled(1, 0, &format!("{NS}/client"), WAIT)?;
    let mut servers = Vec::new();
    for a in apps {
        let name = format!("{}-{}", a.app, a.version);
        c.wait_enrolled(2, 0, &format!("{NS}/{name}"), WAIT)?;
        let (port, fail) = (PORT.to_string(), a.fail_every.to_string());
        let mut p = c.pod(NS, &name).spawn_probe(&[
            "http-server-ka",
            "--port",
            &port,
            "--name",
            &name,
            "--version",
            a.version,
            "--fail-every",
            &fail,
        ])?;
        p.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
        servers.push(p);
    }
    Ok((c, servers))
}

/// `count` requests from the client to Service `svc` (`vc-probe requests`), with `headers`.
fn requests(c: &Cluster, svc: &str, count: u32, args: &[&str]) -> Result<Value> {
    let addr = format!("{}:{PORT}", c.service_vip(NS, svc));
    let count = count.to_string();
    let mut all = vec!["requests", "--addr", &addr, "--count", &count];
    all.extend_from_slice(args);
    let out = c.pod(NS, "client").probe(&all)?.succeeded()?;
    Ok(out.json)
}

fn n(v: &Value, field: &str, key: &str) -> u64 {
    v[field][key].as_u64().unwrap_or(0)
}

/// A `networking.istio.io/v1` resource.
fn networking(kind: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}"
    )
}

/// Bookinfo's `destination-rule-all.yaml`: a subset per version of each service.
fn destination_rules() -> String {
    let mut out = Vec::new();
    for (svc, versions) in [
        ("productpage", &["v1"][..]),
        ("details", &["v1"]),
        ("ratings", &["v1"]),
        ("reviews", &["v1", "v2", "v3"]),
    ] {
        let mut spec = format!("  host: {svc}\n  subsets:\n");
        for v in versions {
            spec.push_str(&format!("  - name: {v}\n    labels:\n      version: {v}\n"));
        }
        out.push(networking("DestinationRule", svc, &spec));
    }
    out.join("---\n")
}

/// A VirtualService for `svc` with these `http` routes (indented list lines).
fn virtual_service(svc: &str, http: &str) -> String {
    networking(
        "VirtualService",
        svc,
        &format!("  hosts:\n  - {svc}\n  http:\n{http}"),
    )
}

/// A route's `route:` to one subset, inside a list item that has a `match`.
fn to(svc: &str, subset: &str) -> String {
    format!("    route:\n    - destination:\n        host: {svc}\n        subset: {subset}\n")
}

/// A list item that only routes to one subset.
fn only(svc: &str, subset: &str) -> String {
    format!("  - {}", &to(svc, subset)[4..])
}

const JASON: &[&str] = &["--header", "end-user: jason"];

/// The walkthrough: all to v1, jason to reviews v2, an 80/20 shift, rules changed live; each
/// routed request is logged and counted by the client's node proxy with the subset's version,
/// and reached its endpoint over HBONE.
#[test]
fn bookinfo_request_routing() -> Result<()> {
    let (c, _servers) = start(BOOKINFO)?;
    // Without rules the client's connections (not its requests) go round-robin over
    // reviews' three pods.
    let plain = requests(&c, "reviews", 30, &["--concurrency", "6"])?;
    ensure!(
        ["v1", "v2", "v3"]
            .iter()
            .all(|v| n(&plain, "versions", v) >= 5),
        "{plain}"
    );

    c.apply("destination-rule-all.yaml", Some(&destination_rules()))?;
    let all_v1: Vec<String> = ["productpage", "details", "ratings", "reviews"]
        .iter()
        .map(|s| virtual_service(s, &only(s, "v1")))
        .collect();
    c.apply("virtual-service-all-v1.yaml", Some(&all_v1.join("---\n")))?;
    for svc in ["reviews", "ratings", "details", "productpage"] {
        let r = requests(&c, svc, 20, &[])?;
        ensure!(n(&r, "statuses", "200") == 20, "{svc}: {r}");
        ensure!(n(&r, "versions", "v1") == 20, "{svc} all to v1: {r}");
    }

    // jason → v2, everyone else → v1: the same file rewritten, no restart.
    let reviews_jason = virtual_service(
        "reviews",
        &format!(
            "  - match:\n    - headers:\n        end-user:\n          exact: jason\n{}{}",
            to("reviews", "v2"),
            only("reviews", "v1")
        ),
    );
    let mut files = all_v1.clone();
    files[3] = reviews_jason;
    c.apply("virtual-service-all-v1.yaml", Some(&files.join("---\n")))?;
    let mark = c.log_mark(1);
    let jason = requests(&c, "reviews", 10, JASON)?;
    ensure!(n(&jason, "versions", "v2") == 10, "jason to v2: {jason}");
    let others = requests(&c, "reviews", 10, &["--header", "end-user: bob"])?;
    ensure!(n(&others, "versions", "v1") == 10, "others to v1: {others}");
    let line = c.wait_for_log_since(1, mark, WAIT, |l| {
        l["message"] == "http request" && l["upstream_subset"] == "v2"
    })?;
    ensure!(
        line["reporter"] == "source"
            && line["virtual_service"] == "bookinfo/reviews"
            && line["route"] == "0"
            && line["response_code"] == 200
            && line["response_flags"] == "-"
            && line["upstream_workload"] == "bookinfo/reviews-v2",
        "{line}"
    );
    // Carried over HBONE to the v2 pod, whose proxy saw the client's own identity.
    let reviews_v2 = c.pod(NS, "reviews-v2").ip().to_string();
    let inbound = c.wait_for_connection(2, 0, WAIT, |l| {
        l["direction"] == "inbound"
            && l["dst_workload"] == "bookinfo/reviews-v2"
            && l["hbone"] == true
    })?;
    ensure!(
        inbound["src_identity"] == "spiffe://cluster.local/ns/bookinfo/sa/client",
        "{inbound} (reviews-v2 at {reviews_v2})"
    );

    // 80/20 between v1 and v3, over 500 requests.
    let shift = virtual_service(
        "reviews",
        "  - route:\n    - destination:\n        host: reviews\n        subset: v1\n      weight: 80\n    - destination:\n        host: reviews\n        subset: v3\n      weight: 20\n",
    );
    files[3] = shift;
    c.apply("virtual-service-all-v1.yaml", Some(&files.join("---\n")))?;
    let split = requests(&c, "reviews", 500, &["--concurrency", "4"])?;
    let v1 = n(&split, "versions", "v1");
    ensure!(
        (375..=425).contains(&v1) && v1 + n(&split, "versions", "v3") == 500,
        "80/20 within ±5 points: {split}"
    );
    // Counted by the source's proxy, with the subset's version.
    let scrape = c.node(1).scrape()?;
    let v3 = scrape.sum(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("destination_service_name", "reviews"),
            ("destination_version", "v3"),
        ],
    );
    ensure!(v3 >= 75.0, "v3 requests counted at the source: {v3}");

    // Opaque traffic: a `tcp` route sends every connection to reviews' port 9000 to v3.
    let _echo: Vec<Proc> = ["reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .map(|p| c.pod(NS, p).tcp_echo(9000))
        .collect::<Result<_>>()?;
    let mark = c.log_mark(1);
    c.set_service(
        service(NS, "reviews-tcp")
            .selector(&[("app", "reviews")])
            .named_port("tcp", 9000, 9000),
    )?;
    c.wait_for_log_since(1, mark, WAIT, |l| l["message"] == "configuration applied")?;
    c.apply(
        "reviews-tcp.yaml",
        Some(&format!(
            "{}---\n{}",
            networking(
                "DestinationRule",
                "reviews-tcp",
                "  host: reviews-tcp\n  subsets:\n  - name: v3\n    labels:\n      version: v3\n",
            ),
            networking(
                "VirtualService",
                "reviews-tcp",
                "  hosts:\n  - reviews-tcp\n  tcp:\n  - route:\n    - destination:\n        host: reviews-tcp\n        subset: v3\n",
            )
        )),
    )?;
    let tcp = format!("{}:9000", c.service_vip(NS, "reviews-tcp"));
    let v3_addr = format!("{}:9000", c.pod(NS, "reviews-v3").ip());
    for _ in 0..3 {
        let mark = c.log_mark(1);
        let out = c
            .pod(NS, "client")
            .probe(&["connect", "--addr", &tcp, "--send", "hello"])?
            .succeeded()?;
        ensure!(out.json["received"] == "hello", "{}", out.stdout);
        let line = c.wait_for_connection(1, mark, WAIT, |l| {
            l["direction"] == "outbound" && l["dst_service"] == "bookinfo/reviews-tcp"
        })?;
        ensure!(
            line["upstream"] == v3_addr.as_str(),
            "tcp route to v3: {line}"
        );
    }
    Ok(())
}

/// Faults for jason on ratings: a 7 s delay a client with a 3 s timeout gives up on while
/// everyone else is answered at once; then an abort with 500; and the destination's L7
/// authorization still decides routed requests.
#[test]
fn bookinfo_faults_and_authorization() -> Result<()> {
    let (c, _servers) = start(&[app("ratings", "v1"), app("reviews", "v2")])?;
    c.apply("destination-rule-all.yaml", Some(&destination_rules()))?;
    let fault = |what: &str| {
        virtual_service(
            "ratings",
            &format!(
                "  - match:\n    - headers:\n        end-user:\n          exact: jason\n    fault:\n{what}{}{}",
                to("ratings", "v1"),
                only("ratings", "v1")
            ),
        )
    };
    c.apply(
        "ratings.yaml",
        Some(&fault(
            "      delay:\n        percentage:\n          value: 100.0\n        fixedDelay: 7s\n",
        )),
    )?;
    let fast = requests(&c, "ratings", 5, &[])?;
    ensure!(
        n(&fast, "statuses", "200") == 5 && fast["max_ms"].as_u64() < Some(1000),
        "others are not delayed: {fast}"
    );
    let mut slow = vec!["--timeout-ms", "3000"];
    slow.extend_from_slice(JASON);
    let delayed = requests(&c, "ratings", 1, &slow)?;
    ensure!(
        delayed["timeouts"] == 1 && delayed["max_ms"].as_u64() >= Some(2900),
        "jason's request outlasts a 3 s timeout: {delayed}"
    );

    let mark = c.log_mark(1);
    c.apply(
        "ratings.yaml",
        Some(&fault(
            "      abort:\n        percentage:\n          value: 100.0\n        httpStatus: 500\n",
        )),
    )?;
    let aborted = requests(&c, "ratings", 5, JASON)?;
    ensure!(n(&aborted, "statuses", "500") == 5, "{aborted}");
    ensure!(
        n(&requests(&c, "ratings", 5, &[])?, "statuses", "200") == 5,
        "others are not aborted"
    );
    let line = c.wait_for_log_since(1, mark, WAIT, |l| {
        l["message"] == "http request" && l["response_flags"] == "FI"
    })?;
    ensure!(line["response_code"] == 500, "{line}");

    // A route chooses the endpoint, the destination's policy still decides: reviews-v2
    // refuses /admin to the client (L7, on node 2).
    c.apply(
        "reviews.yaml",
        Some(&virtual_service("reviews", &only("reviews", "v2"))),
    )?;
    c.apply(
        "deny-admin.yaml",
        Some(&common::istio(
            "AuthorizationPolicy",
            NS,
            "deny-admin",
            "  selector:\n    matchLabels:\n      app: reviews\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin\"]\n",
        )),
    )?;
    let mark = c.log_mark(2);
    let denied = requests(&c, "reviews", 2, &["--path", "/admin"])?;
    ensure!(n(&denied, "statuses", "403") == 2, "{denied}");
    ensure!(
        n(&requests(&c, "reviews", 2, &[])?, "statuses", "200") == 2,
        "other paths allowed"
    );
    let d = c.wait_for_log_since(2, mark, WAIT, |l| {
        l["message"] == "http request" && l["response_code"] == 403
    })?;
    ensure!(
        d["reporter"] == "destination" && d["authz_policy"] == "bookinfo/deny-admin",
        "{d}"
    );
    Ok(())
}

/// Resilience: retries hide a 50 %-failing endpoint, outlier detection ejects an endpoint
/// that keeps failing and restores it after baseEjectionTime, and a full connection pool
/// answers 503 `x-envoy-overloaded`.
#[test]
fn retries_outlier_detection_and_circuit_breaking() -> Result<()> {
    let apps = [
        App {
            fail_every: 2,
            ..app("ratings", "v1")
        },
        app("reviews", "v1"),
        App {
            fail_every: 1,
            ..app("reviews", "v2")
        },
        app("details", "v1"),
    ];
    let (c, _servers) = start(&apps)?;

    // Without rules, half of ratings' answers are 503; with retries, (almost) none.
    let plain = requests(&c, "ratings", 40, &[])?;
    ensure!(n(&plain, "statuses", "503") >= 15, "{plain}");
    c.apply(
        "ratings.yaml",
        Some(&virtual_service(
            "ratings",
            "  - route:\n    - destination:\n        host: ratings\n    retries:\n      attempts: 3\n      retryOn: 5xx\n",
        )),
    )?;
    let before = c
        .node(1)
        .scrape()?
        .sum("ztunnel_traffic_events_total", &[("reason", "retry")]);
    let retried = requests(&c, "ratings", 200, &[])?;
    ensure!(
        n(&retried, "statuses", "200") >= 198,
        "≥ 99 % success: {retried}"
    );
    let retries = c
        .node(1)
        .scrape()?
        .sum("ztunnel_traffic_events_total", &[("reason", "retry")])
        - before;
    ensure!(retries >= 50.0, "retries counted: {retries}");

    // reviews-v2 always fails: after two 5xx in a row it is ejected for baseEjectionTime.
    c.apply(
        "reviews.yaml",
        Some(&format!(
            "{}---\n{}",
            networking(
                "DestinationRule",
                "reviews",
                "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      consecutive5xxErrors: 2\n      interval: 1s\n      baseEjectionTime: 3s\n      maxEjectionPercent: 100\n",
            ),
            virtual_service(
                "reviews",
                "  - route:\n    - destination:\n        host: reviews\n    retries:\n      attempts: 0\n",
            )
        )),
    )?;
    let mark = c.log_mark(1);
    let ejecting = requests(&c, "reviews", 20, &[])?;
    let failed = n(&ejecting, "statuses", "503");
    ensure!(
        (1..=2).contains(&failed) && n(&ejecting, "servers", "reviews-v1") >= 18,
        "ejected after two failures: {ejecting}"
    );
    c.wait_for_log_since(1, mark, WAIT, |l| {
        l["message"] == "outlier detection ejected an endpoint"
    })?;
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let restored = requests(&c, "reviews", 6, &[])?;
    ensure!(
        n(&restored, "servers", "reviews-v2") >= 1,
        "back after baseEjectionTime: {restored}"
    );

    // One connection allowed to details, one request may wait for it: with three callers
    // at once, the pool overflows.
    c.apply(
        "details.yaml",
        Some(&networking(
            "DestinationRule",
            "details",
            "  host: details\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n",
        )),
    )?;
    let overflow = requests(
        &c,
        "details",
        15,
        &["--concurrency", "3", "--path", "/delay/200"],
    )?;
    ensure!(
        overflow["overloaded"].as_u64() >= Some(1) && n(&overflow, "statuses", "200") >= 5,
        "{overflow}"
    );
    let overflows = c
        .node(1)
        .scrape()?
        .sum("ztunnel_traffic_events_total", &[("reason", "overflow")]);
    ensure!(overflows >= 1.0, "overflows counted: {overflows}");
    Ok(())
}
