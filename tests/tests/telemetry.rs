//! End-to-end tests of the telemetry operators read: a real Prometheus server (Debian's) scrapes
//! the node proxies of a virtual cluster, and the PromQL that Istio's dashboards and ours use is
//! asked through its HTTP query API.
use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Context as _, Result};
use ztunnel_tests::{
    cluster::prometheus::Prometheus, dashboards, jwt::IdentityProvider, pod, service, wait_until,
    Cluster, PodRef, Proc,
};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const WAIT: Duration = Duration::from_secs(15);
/// How often Prometheus scrapes the proxies in these tests.
const SCRAPE: Duration = Duration::from_millis(500);
/// The range of the rate() queries: longer than the traffic they measure.
const WINDOW: Duration = Duration::from_secs(8);

/// The issuer of the end-user tokens web accepts.
const ISSUER: &str = "auth@shop.example";
/// Where web's Service sends requests (HTTP/1.1 keep-alive; HTTP/2 and gRPC on 8081).
const WEB_PORT: u16 = 8080;
const WEB_H2_PORT: u16 = 8081;

/// shop (ambient): client on node 1; echo and web on node 2, web behind the Service shop/web
/// (port 80); default (not in the mesh): sleep on node 1. Service accounts, `app` labels are
/// named like the pods, `version` is v1.
fn start() -> Result<Cluster> {
    let mesh_pod = |name: &str, node: usize| {
        pod("shop", name)
            .node(node)
            .service_account(name)
            .labels(&[("app", name), ("version", "v1")])
    };
    let c = Cluster::builder()
        .nodes(2)
        .namespace("shop", &[AMBIENT])
        .namespace("default", &[])
        .pod(mesh_pod("client", 1))
        .pod(mesh_pod("echo", 2))
        .pod(mesh_pod("web", 2))
        .pod(pod("default", "sleep").node(1))
        .service(
            service("shop", "web")
                .selector(&[("app", "web")])
                .port(80, WEB_PORT)
                .port(81, WEB_H2_PORT),
        )
        .start()?;
    for (node, p) in [(1, "shop/client"), (2, "shop/echo"), (2, "shop/web")] {
        c.wait_enrolled(node, 0, p, WAIT)?;
    }
    Ok(c)
}

/// web's policies: end-user tokens of [`ISSUER`] are checked (a bad one is answered 401), and
/// only client may call, on `/api/*`, `/status/*`, `/delay/*`, `/bytes/*` and gRPC's
/// `/pkg.Svc/*` (so `/admin` and any plaintext caller get 403); anyone may ask `/healthz`, so
/// that a plaintext caller's connection is decided per request too (with client's rule alone
/// it would be refused at connect: no request of it could be allowed). Every request to web is
/// therefore parsed and decided by node 2's proxy.
fn web_policies(idp: &IdentityProvider) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: web-jwt\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{}'\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web-callers\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/client]\n    to:\n    - operation:\n        paths: [\"/api/*\", \"/status/*\", \"/delay/*\", \"/bytes/*\", \"/pkg.Svc/*\"]\n  - to:\n    - operation:\n        paths: [\"/healthz\"]\n",
        idp.jwks
    )
}

/// Starts web's servers, applies its policies and waits until a request is decided by them.
fn serve_web(c: &Cluster, idp: &IdentityProvider) -> Result<(Proc, Proc)> {
    let web = c.pod("shop", "web");
    let port = WEB_PORT.to_string();
    let mut h1 = web.spawn_probe(&["http-server-ka", "--port", &port, "--name", "web"])?;
    h1.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let port = WEB_H2_PORT.to_string();
    let mut h2 = web.spawn_probe(&["h2-server", "--port", &port, "--name", "web"])?;
    h2.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    c.apply("web.yaml", Some(&web_policies(idp)))?;
    let url = web_url(c, "/admin");
    wait_until(WAIT, "web's policies in force", || {
        let (codes, _) = c.pod("shop", "client").curl(&[], &[&url]).ok()?;
        (codes == [403]).then_some(())
    })?;
    Ok((h1, h2))
}

/// `http://<web's VIP>:80<path>`.
fn web_url(c: &Cluster, path: &str) -> String {
    format!("http://{}:80{path}", c.service_vip("shop", "web"))
}

/// What one round of [`drive`] sends, by status: the numbers the PromQL must give back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Mix {
    fast_200: u32,
    slow_200: u32,
    denied_403: u32,
    jwt_401: u32,
    error_503: u32,
    plaintext_403: u32,
}

impl Mix {
    /// One request of each kind: makes every series before the measured rounds.
    const ONE_EACH: Mix = Mix {
        fast_200: 1,
        slow_200: 1,
        denied_403: 1,
        jwt_401: 1,
        error_503: 1,
        plaintext_403: 1,
    };
    /// A measured round: 20 requests from client (4 of them 300 ms long, 1 a 503), 2 from
    /// the plaintext sleep.
    const ROUND: Mix = Mix {
        fast_200: 12,
        slow_200: 4,
        denied_403: 2,
        jwt_401: 1,
        error_503: 1,
        plaintext_403: 2,
    };

    fn times(self, n: u32) -> Mix {
        Mix {
            fast_200: self.fast_200 * n,
            slow_200: self.slow_200 * n,
            denied_403: self.denied_403 * n,
            jwt_401: self.jwt_401 * n,
            error_503: self.error_503 * n,
            plaintext_403: self.plaintext_403 * n,
        }
    }

    fn plus(self, o: Mix) -> Mix {
        Mix {
            fast_200: self.fast_200 + o.fast_200,
            slow_200: self.slow_200 + o.slow_200,
            denied_403: self.denied_403 + o.denied_403,
            jwt_401: self.jwt_401 + o.jwt_401,
            error_503: self.error_503 + o.error_503,
            plaintext_403: self.plaintext_403 + o.plaintext_403,
        }
    }

    /// Requests by response code.
    fn by_code(self) -> BTreeMap<&'static str, f64> {
        BTreeMap::from([
            ("200", f64::from(self.fast_200 + self.slow_200)),
            ("403", f64::from(self.denied_403 + self.plaintext_403)),
            ("401", f64::from(self.jwt_401)),
            ("503", f64::from(self.error_503)),
        ])
    }

    fn total(self) -> f64 {
        self.by_code().values().sum()
    }
}

/// Sends `mix` to web: client's requests through its Service over keep-alive connections
/// (the slow ones in parallel), sleep's in plaintext to the pod. Fails unless every status is the one
/// expected.
fn drive(c: &Cluster, idp: &IdentityProvider, mix: Mix) -> Result<()> {
    let client = c.pod("shop", "client");
    let urls = |path: &str, n: u32| vec![web_url(c, path); n as usize];
    // Outside the mesh nothing resolves Service VIPs (no kube-proxy here): the pod itself.
    let direct = format!("http://{}:{WEB_PORT}/api/items", c.pod("shop", "web").ip());
    let bad_token = format!("Authorization: Bearer {}", idp.token("mallory", "x", -600));
    let parallel = ["--parallel", "--parallel-max", "8"];
    let cases: [(&PodRef<'_>, Vec<String>, Vec<&str>, u16); 6] = [
        (&client, urls("/api/items", mix.fast_200), vec![], 200),
        (
            &client,
            urls("/delay/300", mix.slow_200),
            parallel.to_vec(),
            200,
        ),
        (&client, urls("/admin", mix.denied_403), vec![], 403),
        (
            &client,
            urls("/api/items", mix.jwt_401),
            vec!["-H", &bad_token],
            401,
        ),
        (&client, urls("/status/503", mix.error_503), vec![], 503),
        (
            &c.pod("default", "sleep"),
            vec![direct; mix.plaintext_403 as usize],
            vec![],
            403,
        ),
    ];
    for (from, urls, options, expected) in &cases {
        if urls.is_empty() {
            continue;
        }
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let (codes, text) = from.curl(options, &urls)?;
        ensure!(
            codes.len() == urls.len() && codes.iter().all(|c| c == expected),
            "{} × {}: expected {expected}, got {codes:?}: {text}",
            urls.len(),
            urls[0]
        );
    }
    Ok(())
}

/// Waits until node 2's own counters hold `mix` (a request is counted when its response ends).
fn wait_counted(c: &Cluster, mix: Mix) -> Result<()> {
    let last = std::cell::RefCell::new(0.0);
    wait_until(WAIT, "the requests in node 2's counters", || {
        let s = c.node(2).scrape().ok()?;
        let n = s.sum(
            "istio_requests_total",
            &[("reporter", "destination"), ("destination_workload", "web")],
        );
        *last.borrow_mut() = n;
        (n == mix.total()).then_some(())
    })
    .with_context(|| format!("counted {} of {}", last.borrow(), mix.total()))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `streams` connections from client to echo, each sending `bytes` and reading them back.
fn transfer(c: &Cluster, echo: &str, bytes: u64, streams: u64) -> Result<()> {
    let out = c.pod("shop", "client").probe(&[
        "transfer",
        "--addr",
        echo,
        "--bytes",
        &bytes.to_string(),
        "--streams",
        &streams.to_string(),
    ])?;
    ensure!(out.code == Some(0), "transfer failed: {out:?}");
    Ok(())
}

#[test]
fn prometheus_reads_the_tcp_metrics_of_both_reporters() -> Result<()> {
    let c = start()?;
    let _echo = c.pod("shop", "echo").tcp_echo(9000)?;
    let echo = format!("{}:9000", c.pod("shop", "echo").ip());
    let prom = c.start_prometheus(SCRAPE)?;

    // A first connection makes the series; Prometheus sees it before the measured traffic,
    // so rate() has a sample to start from (a counter's first sample is not an increase).
    transfer(&c, &echo, 1000, 1)?;
    let tcp = |reporter: &str, metric: &str| {
        format!(
            "sum(istio_tcp_{metric}_bytes_total{{reporter=\"{reporter}\",source_workload=\"client\",\
             destination_workload=\"echo\",destination_workload_namespace=\"shop\"}})"
        )
    };
    wait_until(WAIT, "the first connection in Prometheus", || {
        let counted = |reporter, metric| prom.value(&tcp(reporter, metric)).ok() == Some(1000.0);
        (counted("destination", "received") && counted("source", "sent")).then_some(())
    })?;
    // Samples of the series before the traffic, over a whole window.
    std::thread::sleep(WINDOW);
    // The measured traffic: 4 connections of 25 000 bytes each way.
    transfer(&c, &echo, 25_000, 4)?;
    wait_until(
        WAIT,
        "the measured traffic in the proxies' counters",
        || {
            let s = c.node(2).scrape().ok()?;
            let v = s.sum(
                "istio_tcp_received_bytes_total",
                &[
                    ("reporter", "destination"),
                    ("destination_workload", "echo"),
                ],
            );
            (v == 101_000.0).then_some(())
        },
    )?;
    wait_until(WAIT, "the measured traffic in node 1's counters", || {
        let s = c.node(1).scrape().ok()?;
        let v = s.sum(
            "istio_tcp_sent_bytes_total",
            &[("reporter", "source"), ("destination_workload", "echo")],
        );
        (v == 101_000.0).then_some(())
    })?;
    prom.wait_scraped()?;

    // The counters as Prometheus stored them: exact, from both proxies.
    for reporter in ["source", "destination"] {
        for metric in ["received", "sent"] {
            let v = prom.value(&tcp(reporter, metric))?;
            ensure!(v == 101_000.0, "{reporter} {metric}: {v}");
        }
    }
    // Istio's dashboards' TCP panels: bytes per second over a window that holds the measured
    // traffic (and the first connection's sample before it, which is not an increase).
    // rate() extrapolates the samples it has to the window's edges, by at most 1.1 scrape
    // interval each, so rate × window lies in [1, window / (window − 2.2 intervals)] × bytes.
    let window = WINDOW.as_secs_f64();
    let most = window / (window - 2.2 * SCRAPE.as_secs_f64());
    for (reporter, metric) in [("destination", "received"), ("source", "sent")] {
        let expr = format!(
            "sum(rate(istio_tcp_{metric}_bytes_total{{reporter=\"{reporter}\",\
             destination_workload=\"echo\"}}[{window}s]))"
        );
        let bytes = prom.value(&expr)? * window;
        ensure!(
            (100_000.0..=100_000.0 * most).contains(&bytes),
            "{expr} × {window}s = {bytes}, expected 100 000 (× at most {most:.2})"
        );
    }
    // The connections of the window: opened and closed, four each, by the destination.
    let opened = prom.value(&format!(
        "sum(increase(istio_tcp_connections_opened_total{{reporter=\"destination\",\
         destination_workload=\"echo\"}}[{window}s]))"
    ))?;
    ensure!((4.0..=4.0 * most).contains(&opened), "opened: {opened}");
    let up = prom.query("up{job=\"ztunnel\"} == 1")?;
    ensure!(up.len() == 2, "both node proxies are up: {up:?}");
    let nodes: Vec<&str> = up.iter().map(|s| s.label("node")).collect();
    ensure!(
        nodes.contains(&"node1") && nodes.contains(&"node2"),
        "{nodes:?}"
    );
    drop(prom);
    // Its process and its address are gone with the handle.
    let addrs = c.underlay_exec(&["ip", "-brief", "addr", "show", "br0"], WAIT)?;
    ensure!(
        !String::from_utf8_lossy(&addrs.stdout).contains("10.255.0.254"),
        "the monitoring address stayed"
    );
    Ok(())
}

/// A rate() window that starts after `clean_since` (Unix seconds): only what came after it
/// counts, and the samples fill the window (every series existed before it began).
struct Window {
    seconds: f64,
    /// rate() extrapolates the samples it has to the window's edges, by at most 1.1 scrape
    /// interval at each: rate × window lies in [1, most] × what happened in the window.
    most: f64,
}

impl Window {
    fn since(clean_since: f64) -> Result<Self> {
        let seconds = (unix_now() - clean_since).floor() - 1.0;
        let scrape = SCRAPE.as_secs_f64();
        ensure!(
            seconds > 4.0 * scrape,
            "a window of {seconds} s is too short for {scrape} s scrapes"
        );
        Ok(Self {
            seconds,
            most: seconds / (seconds - 2.2 * scrape),
        })
    }

    fn range(&self) -> String {
        format!("{}s", self.seconds)
    }

    /// `rate(expr) × window` is `n` (within the extrapolation's slack).
    fn check(&self, what: &str, rate: f64, n: f64) -> Result<()> {
        let got = rate * self.seconds;
        ensure!(
            got >= n * 0.999 && got <= n * self.most + 1e-9,
            "{what}: rate × {}s = {got}, expected {n} (× at most {:.3})",
            self.seconds,
            self.most
        );
        Ok(())
    }
}

/// The value of a series with `label` = `value` among `series` (0 if there is none).
fn value_where(
    series: &[ztunnel_tests::cluster::prometheus::Series],
    label: &str,
    value: &str,
) -> f64 {
    series
        .iter()
        .find(|s| s.label(label) == value)
        .map_or(0.0, |s| s.value)
}

#[test]
fn prometheus_answers_istios_request_promql_and_every_dashboard_query() -> Result<()> {
    let c = start()?;
    // The eBPF panels need the kernel's run statistics.
    c.stop_proxy(2)?;
    c.start_proxy_with(2, &["--bpf-stats"])?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let idp = IdentityProvider::new(ISSUER);
    let _web = serve_web(&c, &idp)?;
    let _echo = c.pod("shop", "echo").tcp_echo(9000)?;
    let echo = format!("{}:9000", c.pod("shop", "echo").ip());
    let prom = c.start_prometheus(SCRAPE)?;

    // Every series first (a counter's first sample is not an increase), seen by Prometheus,
    // then a whole window of samples before the measured traffic.
    let warm = Mix::ONE_EACH;
    let before = {
        // The request that checked the policies were in force is one more 403.
        let mut m = warm;
        m.denied_403 += 1;
        m
    };
    drive(&c, &idp, warm)?;
    transfer(&c, &echo, 1000, 1)?;
    wait_counted(&c, before)?;
    prom.wait_scraped()?;
    let clean_since = unix_now();
    std::thread::sleep(WINDOW);

    const ROUNDS: u32 = 3;
    let measured = Mix::ROUND.times(ROUNDS);
    for _ in 0..ROUNDS {
        drive(&c, &idp, Mix::ROUND)?;
    }
    transfer(&c, &echo, 10_000, 2)?;
    let all = before.plus(measured);
    wait_counted(&c, all)?;
    prom.wait_scraped()?;
    let w = Window::since(clean_since)?;
    let r = w.range();
    let web = r#"reporter="destination",destination_workload_namespace="shop",destination_workload="web""#;

    // The counters as stored: exact, by response code.
    let stored = prom.query(&format!(
        "sum by (response_code) (istio_requests_total{{{web}}})"
    ))?;
    for (code, n) in all.by_code() {
        let got = value_where(&stored, "response_code", code);
        ensure!(
            got == n,
            "istio_requests_total code {code}: {got}, expected {n}"
        );
    }
    // Istio's dashboards: request rate by response code.
    let rates = prom.query(&format!(
        "sum by (response_code) (rate(istio_requests_total{{{web}}}[{r}]))"
    ))?;
    for (code, n) in measured.by_code() {
        w.check(
            &format!("rate of {code}"),
            value_where(&rates, "response_code", code),
            n,
        )?;
    }
    // Success rate: what was not answered 5xx (a 403 or 401 is the policy working).
    let success = prom.value(&format!(
        "sum(rate(istio_requests_total{{{web},response_code!~\"5..\"}}[{r}])) / sum(rate(istio_requests_total{{{web}}}[{r}]))"
    ))?;
    let expected = 1.0 - f64::from(measured.error_503) / measured.total();
    ensure!(
        (success - expected).abs() < 0.02,
        "success rate {success}, expected {expected}"
    );
    // Latency percentiles. The slow fifth of client's requests (300 ms) sits in Istio's
    // (250, 500] ms bucket, every other request far below it; histogram_quantile interpolates
    // inside a bucket, so p90 and p99 fall at known points of it.
    let quantile = |q: f64| {
        prom.value(&format!(
            "histogram_quantile({q}, sum by (le) (rate(istio_request_duration_milliseconds_bucket{{{web}}}[{r}])))"
        ))
    };
    let slow = f64::from(measured.slow_200) / measured.total();
    let inside = |q: f64| 250.0 + 250.0 * (q - (1.0 - slow)) / slow;
    let (p50, p90, p99) = (quantile(0.5)?, quantile(0.9)?, quantile(0.99)?);
    ensure!(p50 <= 50.0, "p50 {p50} ms: most requests are fast");
    for (q, got) in [(0.9, p90), (0.99, p99)] {
        let want = inside(q);
        ensure!(
            (got - want).abs() <= 25.0,
            "p{} {got} ms, expected about {want} ms",
            q * 100.0
        );
    }
    // Response bodies: the proxy's own answers have known sizes.
    for (code, body, n) in [
        ("403", "RBAC: access denied", all.denied_403),
        ("401", "Jwt verification fails", all.jwt_401),
    ] {
        let sum = prom.value(&format!(
            "sum(istio_response_bytes_sum{{{web},source_workload=\"client\",response_code=\"{code}\"}})"
        ))?;
        let want = (body.len() as u32 * n) as f64;
        ensure!(sum == want, "{code}: response bytes {sum}, expected {want}");
    }
    // TCP bytes, from the same PromQL panels as before (the echo traffic).
    let tcp = prom.value(&format!(
        "sum(rate(istio_tcp_received_bytes_total{{reporter=\"destination\",destination_workload=\"echo\"}}[{r}]))"
    ))?;
    w.check("echo's TCP bytes", tcp, 20_000.0)?;
    // JWT rejections and policy denials, as the node dashboard reads them.
    let jwt = prom.value(&format!("sum(rate(ztunnel_jwt_failures_total[{r}]))"))?;
    w.check("refused tokens", jwt, f64::from(measured.jwt_401))?;

    // One series in full: Istio's labels, from the workloads' labels and identities.
    let series = prom.query(&format!(
        "istio_requests_total{{{web},source_workload=\"client\",response_code=\"200\"}}"
    ))?;
    ensure!(
        series.len() == 1,
        "one series of client's 200s: {series:#?}"
    );
    let want = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/web",
        ),
        ("destination_app", "web"),
        ("destination_version", "v1"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "shop"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v1"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    for (k, v) in want {
        ensure!(
            series[0].label(k) == v,
            "{k}: {:?}, expected {v:?} in {:#?}",
            series[0].label(k),
            series[0].labels
        );
    }
    // The plaintext caller: known by its address, without a principal or mutual TLS.
    let plain = prom.query(&format!(
        "istio_requests_total{{{web},source_workload=\"sleep\"}}"
    ))?;
    ensure!(plain.len() == 1, "{plain:#?}");
    for (k, v) in [
        ("source_workload_namespace", "default"),
        ("source_principal", "unknown"),
        ("connection_security_policy", "none"),
        ("response_code", "403"),
    ] {
        ensure!(
            plain[0].label(k) == v,
            "sleep's {k}: {:#?}",
            plain[0].labels
        );
    }

    // Every query of every dashboard returns data, with this cluster's names.
    dashboards_return_data(&prom, &r)
}

/// Each dashboard query, its variables set to the workload web and every node proxy, returns
/// at least one series with a number (not NaN) in it.
fn dashboards_return_data(prom: &Prometheus<'_>, range: &str) -> Result<()> {
    let values = [
        ("instance", ".*"),
        ("namespace", "shop"),
        ("workload", "web"),
        ("reporter", "destination"),
        ("__rate_interval", range),
        ("__interval", "1s"),
        ("__range", range),
    ];
    let mut empty = Vec::new();
    let mut n = 0;
    for d in dashboards::dashboards()? {
        for q in &d.queries {
            let expr = dashboards::expand(&q.expr, &values)?;
            let result = prom.query(&expr)?;
            n += 1;
            if !result.iter().any(|s| s.value.is_finite()) {
                empty.push(format!("{}: {expr} → {result:?}", q.name()));
            }
        }
    }
    ensure!(
        empty.is_empty(),
        "{} of {n} dashboard queries returned no data:\n{}",
        empty.len(),
        empty.join("\n")
    );
    Ok(())
}

/// One gRPC call to web's HTTP/2 port, answered with `grpc-status: <status>`.
fn grpc_call(c: &Cluster, status: u8) -> Result<()> {
    let url = format!("http://{}:81/pkg.Svc/Get", c.service_vip("shop", "web"));
    let status = format!("x-grpc-status: {status}");
    let (codes, text) = c.pod("shop", "client").curl(
        &[
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            &status,
            "--data-binary",
            "",
        ],
        &[&url],
    )?;
    ensure!(codes == [200], "gRPC call: {text}");
    Ok(())
}

#[test]
fn request_series_stay_bounded_under_load() -> Result<()> {
    let c = start()?;
    let idp = IdentityProvider::new(ISSUER);
    let _web = serve_web(&c, &idp)?;
    // Every kind of request once (and the policy check's 403): all the series there will be.
    drive(&c, &idp, Mix::ONE_EACH)?;
    grpc_call(&c, 5)?;
    let mut seen = Mix::ONE_EACH;
    seen.denied_403 += 1;
    let total = seen.total() + 1.0;
    let counted = |s: &ztunnel_tests::metrics::Scrape| {
        s.sum("istio_requests_total", &[("destination_workload", "web")])
    };
    wait_until(WAIT, "the first requests counted", || {
        (counted(&c.node(2).scrape().ok()?) == total).then_some(())
    })?;
    let before = c.node(2).scrape()?;
    let requests =
        |s: &ztunnel_tests::metrics::Scrape| s.matching("istio_requests_total", &[]).count();
    // Client's four statuses, sleep's 403, and the gRPC call: one series each.
    ensure!(
        requests(&before) == 6,
        "{:#?}",
        before
            .matching("istio_requests_total", &[])
            .collect::<Vec<_>>()
    );
    let grpc = before
        .matching("istio_requests_total", &[("request_protocol", "grpc")])
        .collect::<Vec<_>>();
    ensure!(
        grpc.len() == 1
            && grpc[0].labels["grpc_response_status"] == "5"
            && grpc[0].labels["response_code"] == "200",
        "{grpc:#?}"
    );

    // Load: 2 000 allowed requests, every one with its own path, query and Host, over four
    // keep-alive connections, and 40 more on connections of their own.
    const PER_CONNECTION: usize = 500;
    let vip = c.service_vip("shop", "web");
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (c, vip) = (&c, &vip);
                s.spawn(move || -> Result<()> {
                    let urls: Vec<String> = (0..PER_CONNECTION)
                        .map(|i| format!("http://{vip}:80/api/items/{w}-{i}?q={}", i * 7919 + w))
                        .collect();
                    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                    let host = format!("Host: tenant-{w}.example");
                    let agent = format!("User-Agent: load-{w}");
                    let (codes, text) = c
                        .pod("shop", "client")
                        .curl(&["-H", &host, "-H", &agent], &urls)?;
                    ensure!(
                        codes.len() == PER_CONNECTION && codes.iter().all(|c| *c == 200),
                        "worker {w}: {}",
                        text.lines().find(|l| !l.starts_with("200")).unwrap_or("")
                    );
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a load worker panicked"))??;
        }
        Ok(())
    })?;
    for i in 0..40 {
        let (codes, text) = c
            .pod("shop", "client")
            .curl(&[], &[&format!("http://{vip}:80/api/one/{i}")])?;
        ensure!(codes == [200], "{text}");
    }
    let load = (4 * PER_CONNECTION + 40) as f64;
    wait_until(WAIT, "the load counted", || {
        (counted(&c.node(2).scrape().ok()?) == total + load).then_some(())
    })?;
    let after = c.node(2).scrape()?;
    // Not one series more, of any metric: no path, host, agent or connection is a label.
    let names = |s: &ztunnel_tests::metrics::Scrape| {
        s.samples
            .iter()
            .map(|x| {
                let labels: Vec<String> =
                    x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{}{{{}}}", x.name, labels.join(","))
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let (b, a) = (names(&before), names(&after));
    let new: Vec<&String> = a.difference(&b).collect();
    eprintln!(
        "series on node 2: {} before the load, {} after {load} requests; istio_requests_total: {}",
        b.len(),
        a.len(),
        requests(&after)
    );
    ensure!(new.is_empty(), "the load made new series: {new:#?}");
    Ok(())
}

#[test]
fn every_parsed_request_is_logged_with_its_decision_and_can_be_sampled() -> Result<()> {
    let c = start()?;
    let idp = IdentityProvider::new(ISSUER);
    let _web = serve_web(&c, &idp)?;
    let requests = |mark| -> Vec<serde_json::Value> {
        c.logs_since(2, mark)
            .into_iter()
            .filter(|l| l["message"] == "http request")
            .collect()
    };
    let mark = c.log_mark(2);
    drive(&c, &idp, Mix::ONE_EACH)?;
    // A token in the query string (`access_token`, where RequestAuthentication looks by
    // default) is refused, and neither it nor the query string is logged.
    let secret = "s3cr3t-query-value";
    let (codes, _) = c.pod("shop", "client").curl(
        &[],
        &[&web_url(&c, &format!("/api/items?access_token={secret}"))],
    )?;
    ensure!(codes == [401], "{codes:?}");
    let lines = wait_until(WAIT, "one line per request", || {
        let l = requests(mark);
        (l.len() == 7).then_some(l)
    })
    .with_context(|| format!("{:#?}", requests(mark)))?;
    ensure!(
        !c.log_text(2).contains(secret),
        "the query string was logged"
    );
    let vip = c.service_vip("shop", "web");
    let ok = lines
        .iter()
        .find(|l| l["path"] == "/api/items" && l["response_code"] == 200)
        .context("the 200 line")?;
    let web = c.pod("shop", "web");
    for (k, v) in [
        ("direction", serde_json::json!("inbound")),
        ("reporter", serde_json::json!("destination")),
        ("method", serde_json::json!("GET")),
        ("authority", serde_json::json!(vip)),
        ("protocol", serde_json::json!("HTTP/1.1")),
        (
            "upstream",
            serde_json::json!(format!("{}:{WEB_PORT}", web.ip())),
        ),
        ("src_workload", serde_json::json!("shop/client")),
        (
            "src_identity",
            serde_json::json!("spiffe://cluster.local/ns/shop/sa/client"),
        ),
        ("dst_workload", serde_json::json!("shop/web")),
        (
            "dst_identity",
            serde_json::json!("spiffe://cluster.local/ns/shop/sa/web"),
        ),
        (
            "dst_service",
            serde_json::json!("web.shop.svc.cluster.local"),
        ),
        ("authz_decision", serde_json::json!("allowed")),
        ("authz_policy", serde_json::json!("shop/web-callers")),
        ("response_flags", serde_json::json!("-")),
        ("request_bytes", serde_json::json!(0)),
        (
            "response_bytes",
            serde_json::json!(r#"{"server":"web"}"#.len()),
        ),
    ] {
        ensure!(ok[k] == v, "{k}: {} in {ok}", ok[k]);
    }
    ensure!(ok["duration_ms"].is_u64(), "{ok}");
    let denied = lines
        .iter()
        .find(|l| l["path"] == "/admin")
        .context("the 403 line")?;
    ensure!(
        denied["response_code"] == 403
            && denied["authz_decision"] == "denied"
            && denied["response_bytes"] == 19
            && denied.get("upstream").is_none(),
        "{denied}"
    );
    let unauthenticated = lines
        .iter()
        .find(|l| l["response_code"] == 401)
        .context("the 401 line")?;
    ensure!(
        unauthenticated["authz_decision"] == "unauthenticated"
            && unauthenticated.get("request_principal").is_none(),
        "{unauthenticated}"
    );
    let plaintext = lines
        .iter()
        .find(|l| l["src_workload"] == "default/sleep")
        .context("sleep's line")?;
    ensure!(
        plaintext.get("src_identity").is_none() && plaintext["response_code"] == 403,
        "{plaintext}"
    );
    // A valid token's principal is the request principal.
    let token = format!("Authorization: Bearer {}", idp.token("alice", "users", 600));
    let mark = c.log_mark(2);
    let (codes, _) = c
        .pod("shop", "client")
        .curl(&["-H", &token], &[&web_url(&c, "/api/me")])?;
    ensure!(codes == [200]);
    let line = wait_until(WAIT, "the request with a token", || {
        requests(mark).into_iter().next()
    })?;
    ensure!(
        line["request_principal"] == format!("{ISSUER}/alice"),
        "{line}"
    );

    // Sampled: a quarter of what succeeded, every refusal.
    c.stop_proxy(2)?;
    c.start_proxy_with(2, &["--access-log-sample", "0.25"])?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let mark = c.log_mark(2);
    let mix = Mix {
        fast_200: 8,
        denied_403: 2,
        ..Mix::default()
    };
    drive(&c, &idp, mix)?;
    wait_until(WAIT, "the refusals logged", || {
        (requests(mark)
            .iter()
            .filter(|l| l["response_code"] == 403)
            .count()
            == 2)
            .then_some(())
    })?;
    let counted = wait_until(WAIT, "the requests counted", || {
        let s = c.node(2).scrape().ok()?;
        let n = s.sum("istio_requests_total", &[("destination_workload", "web")]);
        (n == 10.0).then_some(n)
    })?;
    let logged = requests(mark);
    let ok_lines = logged.iter().filter(|l| l["response_code"] == 200).count();
    ensure!(
        ok_lines == 2,
        "{ok_lines} of 8 successes logged at 0.25 (counted {counted})"
    );

    // Off: no request line, the metrics still count.
    c.stop_proxy(2)?;
    c.start_proxy_with(2, &["--access-log", "off"])?;
    c.wait_enrolled(2, 0, "shop/web", WAIT)?;
    let mark = c.log_mark(2);
    drive(&c, &idp, mix)?;
    wait_until(WAIT, "the requests counted", || {
        let s = c.node(2).scrape().ok()?;
        let n = s.sum("istio_requests_total", &[("destination_workload", "web")]);
        (n == 10.0).then_some(())
    })?;
    ensure!(requests(mark).is_empty(), "{:#?}", requests(mark));
    Ok(())
}
