//! `policy-bench` (run by `cargo xtask bench`): how long the proxy's authorization decision
//! takes, and what it allocates, as the number of policies grows.
//!
//! It runs `authz::admit` — the function the proxy calls for every connection and request —
//! on snapshots built from the same YAML the proxy reads: one workload with 1, 100 and 10 000
//! applicable ALLOW policies (the matching one last, the worst case), and one with a single
//! applicable policy among 10 000 policies of other namespaces (the namespace index at work).
//! The applicable policies name their callers by exact principal (the principal index at
//! work) or, in the "principal patterns" cases, by pattern (every rule is looked at).
//! Each case is measured at L4 (a connection from an mTLS peer) and at L7 (an HTTP request),
//! and reported against the 1-policy case of the same run. Last, the cost of Istio's request
//! metrics: the L7 1-policy decision with and without recording the request as the proxy does
//! ([`ConnectionRequests::record`]), as a ratio of the same run.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use serde_json::{json, Value};
use ztunnel::{
    authz::{admit, Admission, HttpRequest, InboundCall, Transport, Unknowns},
    config::parse_file,
    identity::SpiffeId,
    metrics::{
        requests::{
            ConnectionRequests, DestinationService, Peer, RequestOutcome, RequestProtocol,
            RequestSizes, ResponseFlags,
        },
        Metrics, Reporter, SecurityPolicy,
    },
    state::{MeshSettings, Objects, Snapshot},
};

/// Counts allocations, to report them per decision.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The YAML of a case: `applicable` ALLOW policies on bench/webapp (rule `i` allows
/// client-`i`, by exact principal or, without `exact`, by a `*/sa/client-i` pattern; with
/// `l7`, for GET on /api/* only), and `unrelated` in other namespaces.
fn config(applicable: usize, unrelated: usize, exact: bool, l7: bool) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: webapp, namespace: bench, labels: {app: webapp}}\nspec: {serviceAccountName: webapp}\nstatus: {podIP: 10.2.0.2}\n",
    );
    let to = if l7 {
        "\n    to: [{operation: {methods: [GET], paths: [\"/api/*\"]}}]"
    } else {
        ""
    };
    let domain = if exact { "cluster.local" } else { "*" };
    for i in 0..applicable {
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{i:05}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: webapp}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{domain}/ns/bench/sa/client-{i}\"]}}}}]{to}\n"
        ));
    }
    for i in 0..unrelated {
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: other-{i}}}\nspec:\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/x/sa/y\"]}}}}]\n"
        ));
    }
    y
}

#[derive(Clone, Copy)]
struct Measured {
    p50_ns: u64,
    p99_ns: u64,
    /// The first decision, which compiles the policy set.
    first_ns: u64,
    allocations: f64,
    allowed: bool,
}

/// The request metrics of one connection, and a request's outcome, as the proxy records them.
struct Recording {
    requests: ConnectionRequests,
    service: DestinationService,
    outcome: RequestOutcome,
}

impl Recording {
    fn new() -> Self {
        let client = SpiffeId::new("cluster.local", "bench", "client-0").expect("id");
        let webapp = SpiffeId::new("cluster.local", "bench", "webapp").expect("id");
        Self {
            requests: ConnectionRequests::new(
                std::sync::Arc::new(Metrics::default()),
                Reporter::Destination,
                Peer::of_workload("bench", "client", Some(&client.to_string())),
                Peer::of_workload("bench", "webapp", Some(&webapp.to_string())),
                SecurityPolicy::MutualTls,
            ),
            service: DestinationService::new("webapp", "bench", "cluster.local"),
            outcome: RequestOutcome {
                protocol: RequestProtocol::Http,
                response_code: 200,
                grpc_status: None,
                flags: ResponseFlags::None,
            },
        }
    }

    fn record(&self, started: Instant) {
        let sizes = RequestSizes {
            request: 0,
            response: 1_234,
        };
        self.requests
            .record(&self.service, self.outcome, started.elapsed(), sizes);
    }
}

fn measure(applicable: usize, unrelated: usize, exact: bool, l7: bool) -> Measured {
    measure_with(applicable, unrelated, exact, l7, None)
}

/// [`measure`], each decision followed by `recording`'s request metrics if there is one.
fn measure_with(
    applicable: usize,
    unrelated: usize,
    exact: bool,
    l7: bool,
    recording: Option<&Recording>,
) -> Measured {
    let mut objects = Objects::default();
    parse_file(
        Path::new("bench.yaml"),
        &config(applicable, unrelated, exact, l7),
        &mut objects,
    )
    .expect("bench config parses");
    let snapshot = Snapshot::build(1, objects, &MeshSettings::default());
    let pod = snapshot
        .pods
        .get(&("bench".to_owned(), "webapp".to_owned()))
        .expect("webapp")
        .clone();
    // The caller the last policy allows: every rule is looked at.
    let peer = SpiffeId::new(
        "cluster.local",
        "bench",
        &format!("client-{}", applicable.saturating_sub(1)),
    )
    .expect("id");
    let mut call = InboundCall::new(
        Transport::Mesh,
        Some(&peer),
        Some("10.1.0.3".parse().expect("ip")),
        "10.2.0.2:8080".parse().expect("addr"),
    );
    if l7 {
        call.attributes.http = Some(HttpRequest {
            method: "GET".into(),
            path: "/api/items".into(),
            host: "webapp.bench:8080".into(),
            headers: vec![("user-agent".into(), "bench".into())],
            auth: None,
        });
    }
    let unknowns = if l7 {
        Unknowns::Conservative
    } else {
        Unknowns::Defer
    };
    // The first decision compiles the workload's policy set (cached on the snapshot).
    let t = Instant::now();
    std::hint::black_box(admit(&snapshot, &pod, &call, unknowns));
    let first_ns = t.elapsed().as_nanos() as u64;
    for _ in 0..1_000 {
        std::hint::black_box(admit(&snapshot, &pod, &call, unknowns));
        if let Some(r) = recording {
            r.record(t);
        }
    }
    // Enough decisions for a stable p99, bounded in time for the slow cases.
    let (max, budget) = (200_000, std::time::Duration::from_secs(2));
    let mut samples = Vec::with_capacity(max);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut allowed = false;
    let started = Instant::now();
    while samples.len() < max && (samples.len() < 200 || started.elapsed() < budget) {
        let t = Instant::now();
        let a = std::hint::black_box(admit(&snapshot, &pod, &call, unknowns));
        if let Some(r) = recording {
            r.record(t);
        }
        samples.push(t.elapsed().as_nanos() as u64);
        allowed = matches!(a, Admission::Allowed(_));
    }
    let allocations = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / samples.len() as f64;
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    Measured {
        p50_ns: at(0.50),
        p99_ns: at(0.99),
        first_ns,
        allocations,
        allowed,
    }
}

fn main() {
    // (name, applicable, unrelated, exact principals)
    let cases = [
        ("1 applicable", 1, 0, true),
        ("100 applicable", 100, 0, true),
        ("10000 applicable", 10_000, 0, true),
        ("1 applicable + 10000 other namespaces", 1, 10_000, true),
        ("100 applicable, principal patterns", 100, 0, false),
        ("10000 applicable, principal patterns", 10_000, 0, false),
    ];
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    println!("\x1b[1mAuthorization decisions: authz::admit, the proxy's own code\x1b[0m");
    println!(
        "   {:<40} {:>5} {:>10} {:>10} {:>9} {:>9} {:>8} {:>11}",
        "case", "layer", "p50 (ns)", "p99 (ns)", "p50/base", "p99/base", "allocs", "first (us)"
    );
    for l7 in [false, true] {
        let layer = if l7 { "L7" } else { "L4" };
        let base = measure(1, 0, true, l7);
        for (name, applicable, unrelated, exact) in cases {
            let m = if (applicable, unrelated) == (1, 0) {
                base
            } else {
                measure(applicable, unrelated, exact, l7)
            };
            if !m.allowed {
                problems.push(format!("{name} {layer}: the matching policy did not allow"));
            }
            let r50 = m.p50_ns as f64 / base.p50_ns.max(1) as f64;
            let r99 = m.p99_ns as f64 / base.p99_ns.max(1) as f64;
            println!(
                "   {name:<40} {layer:>5} {:>10} {:>10} {r50:>9.2} {r99:>9.2} {:>8.1} {:>11.1}",
                m.p50_ns,
                m.p99_ns,
                m.allocations,
                m.first_ns as f64 / 1000.0
            );
            rows.push(json!({
                "case": name, "layer": layer, "applicable": applicable, "unrelated": unrelated,
                "exact_principals": exact,
                "p50_ns": m.p50_ns, "p99_ns": m.p99_ns, "p50_over_base": r50,
                "p99_over_base": r99, "allocations_per_decision": m.allocations,
                "first_decision_ns": m.first_ns,
            }));
        }
    }
    let l4_10k = rows
        .iter()
        .find(|r| r["layer"] == "L4" && r["applicable"] == 10_000 && r["exact_principals"] == true)
        .and_then(|r| r["p99_ns"].as_u64())
        .unwrap_or(0);
    println!(
        "\n   target: L4 p99 ≤ 2000 ns with 10 000 applicable policies; measured {l4_10k} ns ({})",
        if l4_10k <= 2000 { "met" } else { "NOT met" }
    );
    // Istio's request metrics, per request: the same decision, then recorded.
    let (plain, recorded) = (
        measure(1, 0, true, true),
        measure_with(1, 0, true, true, Some(&Recording::new())),
    );
    let metrics_ratio = recorded.p50_ns as f64 / plain.p50_ns.max(1) as f64;
    println!(
        "\n   L7 decision with request metrics: p50 {} ns (without: {} ns, ratio {metrics_ratio:.2}), \
         p99 {} ns (without: {} ns), {:.1} allocations per request (without: {:.1})",
        recorded.p50_ns,
        plain.p50_ns,
        recorded.p99_ns,
        plain.p99_ns,
        recorded.allocations,
        plain.allocations
    );
    let request_metrics = json!({
        "p50_ns": recorded.p50_ns, "p99_ns": recorded.p99_ns,
        "p50_ns_without": plain.p50_ns, "p99_ns_without": plain.p99_ns,
        "p50_over_without": metrics_ratio,
        "allocations": recorded.allocations, "allocations_without": plain.allocations,
    });
    let out: Value = json!({
        "rows": rows, "target_l4_p99_ns_10k": 2000, "l4_p99_ns_10k": l4_10k,
        "request_metrics": request_metrics,
        "problems": problems,
        "git_head": std::process::Command::new("git").args(["log", "-1", "--format=%h %s"])
            .output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
    });
    let dir = Path::new("target/bench");
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join("policy-latest.json");
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    ) {
        Ok(()) => println!("   wrote {}", path.display()),
        Err(e) => problems.push(format!("writing {}: {e}", path.display())),
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("problem: {p}");
        }
        std::process::exit(1);
    }
}
