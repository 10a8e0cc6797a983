//! `ztunnel policy check`, run as an operator would: the real binary against a configuration
//! directory, its exit status and its JSON.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

/// A configuration directory under /tmp, removed on drop (the suite checks nothing is left).
struct ConfigDir(PathBuf);

impl ConfigDir {
    fn new(yaml: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ztt-policy-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("config.yaml"), yaml)?;
        Ok(Self(dir))
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istioinaction, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: webapp, namespace: istioinaction, labels: {app: webapp}}
spec: {serviceAccountName: webapp, containers: [{ports: [{containerPort: 8080}]}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: catalog, namespace: istioinaction, labels: {app: catalog}}
spec: {serviceAccountName: catalog, containers: [{ports: [{containerPort: 3000}]}]}
status: {podIP: 10.2.0.3}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: catalog-viewer, namespace: istioinaction}
spec:
  selector: {matchLabels: {app: catalog}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/istioinaction/sa/webapp"]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

fn check(dir: &ConfigDir, args: &[&str]) -> Result<(i32, Value, String)> {
    let out = Command::new(ztunnel_tests::ztunnel_bin())
        .args(["policy", "check", "--output", "json", "--config-dir"])
        .arg(&dir.0)
        .args(args)
        .output()
        .context("running ztunnel policy check")?;
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok((out.status.code().unwrap_or(-1), json, stderr))
}

#[test]
fn policy_check_answers_with_exit_status_and_json() -> Result<()> {
    let dir = ConfigDir::new(CONFIG)?;
    let to = ["--to", "istioinaction/catalog"];

    let (code, j, err) = check(
        &dir,
        &[
            &to[..],
            &["--from", "istioinaction/webapp", "--method", "GET"],
        ]
        .concat(),
    )?;
    assert_eq!(code, 0, "{j} {err}");
    assert_eq!(j["decision"], "ALLOW");
    assert_eq!(j["status"], 200);
    assert_eq!(j["policy"], "istioinaction/catalog-viewer");
    assert_eq!(j["rule"], 0);
    assert_eq!(j["audit"], false);
    assert_eq!(j["destination"], "10.2.0.3:3000");

    let (code, j, _) = check(
        &dir,
        &[
            &to[..],
            &["--from", "istioinaction/webapp", "--method", "DELETE"],
        ]
        .concat(),
    )?;
    assert_eq!(
        (code, j["decision"].as_str(), j["status"].as_u64()),
        (1, Some("DENY"), Some(403))
    );
    assert!(j["policy"].is_null() && j["reason"].as_str().is_some_and(|r| r.contains("none")));

    // Plaintext under the mesh-wide STRICT: refused before any authorization policy.
    let (code, j, _) = check(
        &dir,
        &[&to[..], &["--from-plaintext", "--from-ip", "10.9.0.1"]].concat(),
    )?;
    assert_eq!(code, 1, "{j}");
    assert_eq!(j["policy"], "istio-system/default");
    assert!(
        j["reason"].as_str().is_some_and(|r| r.contains("STRICT")),
        "{j}"
    );

    // Bad input and bad configuration: 2, with a message.
    let (code, _, err) = check(&dir, &["--to", "istioinaction/ghost", "--from-plaintext"])?;
    assert_eq!(code, 2);
    assert!(err.contains("no pod istioinaction/ghost"), "{err}");
    let (code, _, _) = check(&dir, &to)?;
    assert_eq!(code, 2, "a caller is required");
    std::fs::write(dir.0.join("bad.yaml"), "kind: [")?;
    let (code, _, err) = check(&dir, &[&to[..], &["--from-plaintext"]].concat())?;
    assert_eq!(code, 2);
    assert!(err.contains("bad.yaml"), "{err}");
    Ok(())
}
