//! `ztunnel route check`, run as an operator would: the real binary against a configuration
//! directory holding Istio's Bookinfo walkthrough, its exit status, its JSON and its text.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// A configuration directory under /tmp, removed on drop (the suite checks nothing is left).
struct ConfigDir(PathBuf);

impl ConfigDir {
    /// `name` tells apart the tests of this binary, which run at once in one process.
    fn new(name: &str, files: &[(&str, &str)]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ztt-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(Self(dir))
    }

    fn write(&self, name: &str, text: &str) -> Result<()> {
        Ok(std::fs::write(self.0.join(name), text)?)
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(name: &str, app: &str, version: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bookinfo, labels: {{app: {app}, version: {version}}}}}\nspec: {{serviceAccountName: bookinfo-{app}, containers: [{{ports: [{{containerPort: 9080}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bookinfo}}\nspec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}\n"
    )
}

fn cluster() -> String {
    let mut y = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}\n".to_owned();
    for (name, app, version, ip) in [
        ("productpage-v1", "productpage", "v1", "10.1.0.2"),
        ("details-v1", "details", "v1", "10.1.0.3"),
        ("reviews-v1", "reviews", "v1", "10.1.0.4"),
        ("reviews-v2", "reviews", "v2", "10.1.0.5"),
        ("reviews-v3", "reviews", "v3", "10.1.0.6"),
        ("ratings-v1", "ratings", "v1", "10.1.0.7"),
    ] {
        y.push_str(&pod(name, app, version, ip));
    }
    for (name, vip) in [
        ("productpage", "10.96.0.10"),
        ("details", "10.96.0.11"),
        ("reviews", "10.96.0.12"),
        ("ratings", "10.96.0.13"),
    ] {
        y.push_str(&service(name, vip));
    }
    y
}

/// Istio's destination-rule-all.yaml (the parts used) and virtual-service-reviews-test-v2 /
/// virtual-service-ratings-test-delay, as a user applies them.
const RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: canary
    match: [{uri: {prefix: /canary}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v3}, weight: 20}
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: ratings, namespace: bookinfo}
spec:
  hosts: [ratings]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percentage: {value: 100.0}, fixedDelay: 7s}}
    route: [{destination: {host: ratings, subset: v1}}]
  - route: [{destination: {host: ratings, subset: v1}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: details, namespace: bookinfo}
spec:
  hosts: [details.bookinfo.svc.cluster.local]
  http:
  - match: [{uri: {regex: "/details/[0-9]+"}, method: {exact: GET}}]
    timeout: 3s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "gateway-error,connect-failure,reset"}
    route: [{destination: {host: details}}]
"#;

fn route_check(dir: &ConfigDir, output: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(ztunnel_tests::ztunnel_bin())
        .args(["route", "check", "--output", output, "--config-dir"])
        .arg(&dir.0)
        .args(["--from", "bookinfo/productpage-v1"])
        .args(args)
        .output()
        .context("running ztunnel route check")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn json(dir: &ConfigDir, args: &[&str]) -> Result<(i32, Value, String)> {
    let (code, out, err) = route_check(dir, "json", args)?;
    Ok((code, serde_json::from_str(&out).unwrap_or(Value::Null), err))
}

fn endpoints(d: &Value) -> Vec<String> {
    d["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["address"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn route_check_answers_the_bookinfo_walkthrough() -> Result<()> {
    let dir = ConfigDir::new(
        "route-walkthrough",
        &[("cluster.yaml", &cluster()), ("rules.yaml", RULES)],
    )?;
    let jason = ["--header", "end-user: jason"];

    // Everyone else goes to reviews v1.
    let (code, j, err) = json(&dir, &["--to", "reviews:9080", "--path", "/reviews/0"])?;
    assert_eq!(code, 0, "{j} {err}");
    assert_eq!(j["outcome"], "routed");
    assert_eq!(j["virtual_service"], "bookinfo/reviews");
    assert_eq!(j["route"]["index"], 2);
    let d = &j["destinations"][0];
    assert_eq!(d["host"], "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        (
            d["subset"].as_str(),
            d["port"].as_u64(),
            d["weight"].as_u64()
        ),
        (Some("v1"), Some(9080), Some(100))
    );
    assert_eq!(endpoints(d), ["10.1.0.4:9080"]);
    assert_eq!(d["subset_labels"]["version"], "v1");
    assert_eq!(d["destination_rule"], "bookinfo/reviews");
    assert!(j["fault"].is_null() && j["timeout"].is_null(), "{j}");
    assert_eq!(j["retries"]["attempts"], 2, "Istio's default retries: {j}");

    // end-user: jason goes to v2.
    let (code, j, _) = json(&dir, &[&["--to", "reviews:9080"][..], &jason].concat())?;
    assert_eq!(code, 0);
    assert_eq!(j["route"]["index"], 0);
    assert_eq!(j["destinations"][0]["subset"], "v2");
    assert_eq!(endpoints(&j["destinations"][0]), ["10.1.0.5:9080"]);

    // The weighted shift: both candidates with their share.
    let (_, j, _) = json(
        &dir,
        &["--to", "reviews.bookinfo:9080", "--path", "/canary"],
    )?;
    assert_eq!(j["route"]["name"], "canary");
    let shares: Vec<(String, u64)> = j["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["subset"].as_str().unwrap().to_owned(),
                d["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shares, [("v1".to_owned(), 80), ("v3".to_owned(), 20)]);

    // The 7 s delay for jason on ratings, and the DestinationRule's circuit breaker.
    let (code, j, _) = json(&dir, &[&["--to", "10.96.0.13:9080"][..], &jason].concat())?;
    assert_eq!(code, 0);
    assert_eq!(j["virtual_service"], "bookinfo/ratings");
    assert_eq!(j["fault"]["delay"]["fixed_delay"], "7s");
    assert_eq!(j["fault"]["delay"]["percentage"], 100.0);
    assert!(j["fault"]["abort"].is_null());
    let policy = &j["destinations"][0]["policy"];
    assert!(
        policy["connection_pool"][0]
            .as_str()
            .unwrap()
            .contains("maxConnections 1"),
        "{j}"
    );
    assert!(
        policy["outlier_detection"]
            .as_str()
            .unwrap()
            .contains("consecutive5xxErrors 1"),
        "{j}"
    );
    let (_, j, _) = json(&dir, &["--to", "ratings:9080"])?;
    assert!(j["fault"].is_null(), "others are not delayed: {j}");

    // The abort for jason, after the rule is replaced (virtual-service-ratings-test-abort).
    dir.write(
        "rules.yaml",
        &RULES.replace(
            "fault: {delay: {percentage: {value: 100.0}, fixedDelay: 7s}}",
            "fault: {abort: {percentage: {value: 100.0}, httpStatus: 500}}",
        ),
    )?;
    let (code, j, _) = json(&dir, &[&["--to", "ratings:9080"][..], &jason].concat())?;
    assert_eq!(code, 0);
    assert_eq!(j["fault"]["abort"]["http_status"], 500);
    assert!(j["fault"]["delay"].is_null());
    dir.write("rules.yaml", RULES)?;

    // Timeouts and retries, and no route: a VirtualService without a catch-all answers 404.
    let (code, j, _) = json(&dir, &["--to", "details:9080", "--path", "/details/12"])?;
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["timeout"], "3s");
    assert_eq!(j["retries"]["attempts"], 3);
    assert_eq!(j["retries"]["per_try_timeout"], "1s");
    assert_eq!(
        j["retries"]["retry_on"],
        serde_json::json!(["gateway-error", "connect-failure", "reset"])
    );
    let (code, j, _) = json(&dir, &["--to", "details:9080", "--path", "/details/12x"])?;
    assert_eq!(
        (code, j["outcome"].as_str(), j["status"].as_u64()),
        (1, Some("no_route"), Some(404)),
        "the regex matches the whole path: {j}"
    );
    let (code, j, _) = json(
        &dir,
        &[
            "--to",
            "details:9080",
            "--method",
            "POST",
            "--path",
            "/details/1",
        ],
    )?;
    assert_eq!((code, j["outcome"].as_str()), (1, Some("no_route")));

    // A Service without a VirtualService: plain, with its endpoints.
    let (code, j, _) = json(&dir, &["--to", "productpage:9080"])?;
    assert_eq!(code, 0);
    assert_eq!(j["outcome"], "no_virtual_service");
    assert!(j["virtual_service"].is_null());
    assert_eq!(endpoints(&j["destinations"][0]), ["10.1.0.2:9080"]);

    // The text form says the same.
    let (code, text, _) = route_check(
        &dir,
        "text",
        &[&["--to", "ratings:9080"][..], &jason].concat(),
    )?;
    assert_eq!(code, 0);
    for want in [
        "HTTP to bookinfo/ratings:9080 (VirtualService bookinfo/ratings): routed",
        "destination: ratings.bookinfo.svc.cluster.local:9080 subset v1 weight 100 (100.0%)",
        "endpoint 10.1.0.7:9080 bookinfo/ratings-v1",
        "fault: delay 7s for 100% of requests",
        "DestinationRule bookinfo/ratings",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    Ok(())
}

#[test]
fn route_check_reports_conflicts_bad_rules_and_bad_input() -> Result<()> {
    let dir = ConfigDir::new(
        "route-problems",
        &[("cluster.yaml", &cluster()), ("rules.yaml", RULES)],
    )?;
    // A second, newer VirtualService for reviews: the older one keeps routing, the newer is
    // named as ignored, and the configuration check warns.
    dir.write(
        "newer.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews-v3, namespace: bookinfo, creationTimestamp: \"2025-01-01T00:00:00Z\"}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v3}}]}]}\n",
    )?;
    let (code, j, err) = json(&dir, &["--to", "reviews:9080"])?;
    assert_eq!(code, 0);
    assert_eq!(j["virtual_service"], "bookinfo/reviews");
    assert_eq!(
        j["ignored_virtual_services"],
        serde_json::json!(["bookinfo/reviews-v3"])
    );
    assert!(
        err.contains("warning:")
            && err.contains("bookinfo/reviews-v3")
            && err.contains("newer.yaml"),
        "{err}"
    );
    let (_, text, _) = route_check(&dir, "text", &["--to", "reviews:9080"])?;
    assert!(
        text.contains("conflict: VirtualService bookinfo/reviews-v3"),
        "{text}"
    );

    // A subset no DestinationRule defines: its requests are answered 503 (exit 1), and the
    // configuration check names the file.
    dir.write(
        "newer.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: productpage, namespace: bookinfo}\nspec: {hosts: [productpage], http: [{route: [{destination: {host: productpage, subset: v9}}]}]}\n",
    )?;
    let (code, j, err) = json(&dir, &["--to", "productpage:9080"])?;
    assert_eq!(
        (code, j["outcome"].as_str()),
        (1, Some("unroutable")),
        "{j}"
    );
    assert!(
        j["destinations"][0]["error"]
            .as_str()
            .unwrap()
            .contains("subset v9"),
        "{j}"
    );
    assert!(
        err.contains("subset v9") && err.contains("newer.yaml"),
        "{err}"
    );

    // An invalid regex (look-around, which RE2 refuses): the directory is refused, file:line.
    dir.write(
        "newer.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  hosts: [productpage]\n  http:\n  - match: [{uri: {regex: \"/(?!admin).*\"}}]\n    route: [{destination: {host: productpage}}]\n",
    )?;
    let (code, _, err) = json(&dir, &["--to", "productpage:9080"])?;
    assert_eq!(code, 2);
    assert!(err.contains("newer.yaml:"), "{err}");
    assert!(err.to_lowercase().contains("regex"), "{err}");
    std::fs::remove_file(dir.0.join("newer.yaml"))?;

    // Bad input: 2, with a message.
    let (code, _, err) = json(&dir, &["--to", "nowhere:9080"])?;
    assert_eq!(code, 2);
    assert!(err.contains("nowhere"), "{err}");
    let (code, _, err) = json(&dir, &["--to", "reviews"])?;
    assert_eq!(code, 2);
    assert!(err.contains("host:port"), "{err}");
    let (code, _, err) = json(&dir, &["--to", "reviews:9999"])?;
    assert_eq!(code, 2);
    assert!(err.contains("no port 9999"), "{err}");
    let (code, _, err) = json(&dir, &["--to", "reviews:9080", "--header", "no colon"])?;
    assert_eq!(code, 2);
    assert!(err.contains("name: value"), "{err}");
    Ok(())
}
