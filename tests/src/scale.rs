//! A generated cluster for `cargo xtask bench --scale`: namespaces of pods, Services and
//! AuthorizationPolicies as Kubernetes-shaped YAML, one file per namespace, as an operator's
//! `kubectl get -o yaml` dump would be.
//!
//! Every pod is on another node (`remote-<n>`), so the proxy under test holds them as remote
//! workloads: what it costs per pod is what a node proxy pays for the rest of the cluster.
//! Addresses come from ranges the virtual cluster never uses (pods 10.128.0.0/10, VIPs from
//! 10.100.0.0) and are never dialled.
use std::fmt::Write as _;

/// How big the generated cluster is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub pods: u32,
    pub services: u32,
    pub policies: u32,
    /// Pods per namespace (the namespace count follows).
    pub pods_per_namespace: u32,
}

impl Size {
    pub fn namespaces(&self) -> u32 {
        self.pods.div_ceil(self.pods_per_namespace)
    }

    /// Spreads `total` over the namespaces: how many namespace `n` gets.
    fn share(&self, total: u32, n: u32) -> u32 {
        let ns = self.namespaces();
        total / ns + u32::from(n < total % ns)
    }
}

/// The namespace's name and its file.
pub fn namespace_name(n: u32) -> String {
    format!("scale-{n:05}")
}

pub fn file_name(n: u32) -> String {
    format!("scale-{n:05}.yaml")
}

fn pod_ip(index: u32) -> String {
    let ip = (10u32 << 24 | 128 << 16) + index + 1;
    std::net::Ipv4Addr::from(ip).to_string()
}

fn vip(index: u32) -> String {
    let ip = (10u32 << 24 | 100 << 16) + index + 1;
    std::net::Ipv4Addr::from(ip).to_string()
}

/// Namespace `n`'s objects, `---`-separated. `generation` changes one label of the first pod,
/// for a one-object change that leaves the rest of the file as it was.
pub fn namespace_file(size: &Size, n: u32, generation: u32) -> String {
    let ns = namespace_name(n);
    let apps = size.share(size.services, n).max(1);
    let first_pod: u32 = (0..n).map(|m| size.share(size.pods, m)).sum();
    let first_vip: u32 = (0..n).map(|m| size.share(size.services, m)).sum();
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
    );
    for p in 0..size.share(size.pods, n) {
        let app = p % apps;
        let ip = pod_ip(first_pod + p);
        let rev = if p == 0 { generation } else { 0 };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: app{app}-{p}\n  namespace: {ns}\n  uid: {ns}-{p}\n  labels: {{app: app{app}, version: v{v}, rev: r{rev}}}\nspec:\n  nodeName: remote-{node}\n  serviceAccountName: sa-app{app}\n  containers:\n  - name: app\n    image: app\n    ports: [{{containerPort: 8080, name: http}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n",
            v = p % 3,
            node = (first_pod + p) % 500,
        );
    }
    for s in 0..size.share(size.services, n) {
        let ip = vip(first_vip + s);
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: app{s}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  selector: {{app: app{s}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
        );
    }
    // Policies that name their callers by pattern (prefix and suffix principals, namespace
    // prefixes, address blocks): the shapes the caller index has to handle at scale.
    for a in 0..size.share(size.policies, n) {
        let app = a % apps;
        let peer = namespace_name((n + 1) % size.namespaces());
        let _ = write!(
            out,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{a}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: app{app}}}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{peer}/sa/*\", \"*/sa/sa-app{app}\"]\n        namespaces: [\"{ns}*\"]\n    - source: {{ipBlocks: [\"10.128.{b}.0/24\"]}}\n    to:\n    - operation: {{methods: [GET], paths: [\"/api/*\"]}}\n",
            b = a % 256,
        );
    }
    out
}

/// Where the generator's addresses are, for the API server and the guard routes: pods in
/// [`POD_RANGE`], Services' VIPs in [`SERVICE_RANGE`] (which also holds the API server's own
/// `kubernetes` Service at its first address, 10.96.0.1, apart from the VIPs at 10.100.0.1+).
pub const POD_RANGE: &str = "10.128.0.0/10";
pub const SERVICE_RANGE: &str = "10.96.0.0/12";

/// The objects of namespace `n` as writes to an API server, in three steps: its Namespace;
/// its Services and AuthorizationPolicies; its Pods, each created and then given its status
/// (`status.podIP` can only be set through the status subresource). Each inner `Vec` is one
/// chain, sent in order.
pub fn namespace_writes(size: &Size, n: u32) -> [Vec<Vec<crate::api_server::Write>>; 3] {
    use crate::api_server::Write;
    use serde::Deserialize as _;
    let text = namespace_file(size, n, 0);
    let ns = namespace_name(n);
    let mut steps: [Vec<Vec<Write>>; 3] = Default::default();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).expect("the generator writes YAML");
        let mut v: serde_json::Value = serde_json::to_value(v).expect("YAML as JSON");
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match kind.as_str() {
            "Namespace" => steps[0].push(vec![Write::post("/api/v1/namespaces".into(), v)]),
            "Service" => steps[1].push(vec![Write::post(
                format!("/api/v1/namespaces/{ns}/services"),
                v,
            )]),
            "AuthorizationPolicy" => steps[1].push(vec![Write::post(
                format!("/apis/security.istio.io/v1/namespaces/{ns}/authorizationpolicies"),
                v,
            )]),
            "Pod" => {
                let obj = v.as_object_mut().expect("an object");
                let status = obj.remove("status").unwrap_or_default();
                if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                    meta.remove("uid"); // the API server assigns it
                }
                steps[2].push(vec![
                    Write::post(format!("/api/v1/namespaces/{ns}/pods"), v),
                    Write::merge_patch(
                        format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                        serde_json::json!({ "status": status }),
                    ),
                ]);
            }
            other => panic!("the generator wrote a {other}"),
        }
    }
    steps
}

/// The one-object change `k` as a write: the first pod of namespace `k % namespaces` gets
/// label `rev: r<k>`, as [`namespace_file`] with generation `k` changes it.
pub fn change_write(size: &Size, k: u32) -> crate::api_server::Write {
    let n = k % size.namespaces();
    let ns = namespace_name(n);
    // Pod 0 of a namespace is of app 0.
    crate::api_server::Write::merge_patch(
        format!("/api/v1/namespaces/{ns}/pods/app0-0"),
        serde_json::json!({"metadata": {"labels": {"rev": format!("r{k}")}}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_add_up_and_every_file_parses_as_yaml() {
        let size = Size {
            pods: 1_001,
            services: 203,
            policies: 97,
            pods_per_namespace: 100,
        };
        assert_eq!(size.namespaces(), 11);
        let sum = |total| {
            (0..size.namespaces())
                .map(|n| size.share(total, n))
                .sum::<u32>()
        };
        assert_eq!(
            (sum(size.pods), sum(size.services), sum(size.policies)),
            (1_001, 203, 97)
        );
        let mut kinds = std::collections::BTreeMap::<String, u32>::new();
        let mut ips = std::collections::BTreeSet::new();
        for n in 0..size.namespaces() {
            let text = namespace_file(&size, n, 0);
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                *kinds.entry(v["kind"].as_str().unwrap().into()).or_default() += 1;
                if let Some(ip) = v["status"]["podIP"].as_str() {
                    assert!(ips.insert(ip.to_owned()), "{ip} twice");
                }
            }
        }
        assert_eq!(kinds["Pod"], 1_001);
        assert_eq!(kinds["Service"], 203);
        assert_eq!(kinds["AuthorizationPolicy"], 97);
        assert_eq!(kinds["Namespace"], 11);
        assert_ne!(namespace_file(&size, 3, 1), namespace_file(&size, 3, 2));
    }

    /// The writes to an API server carry every object of the file, pods with their status
    /// sent apart, and the change names a pod the file has.
    #[test]
    fn the_api_writes_carry_every_object_and_the_change_names_a_generated_pod() {
        let size = Size {
            pods: 1_001,
            services: 203,
            policies: 97,
            pods_per_namespace: 100,
        };
        let [ns, others, pods] = namespace_writes(&size, 3);
        assert_eq!(ns.len(), 1);
        assert_eq!(
            others.len(),
            (size.share(203, 3) + size.share(97, 3)) as usize
        );
        assert_eq!(pods.len(), size.share(1_001, 3) as usize);
        let pod = &pods[0];
        assert_eq!(pod[0].path, "/api/v1/namespaces/scale-00003/pods");
        assert!(pod[0].body.get("status").is_none());
        assert!(pod[0].body["spec"]["nodeName"]
            .as_str()
            .unwrap()
            .starts_with("remote-"));
        assert_eq!(
            pod[1].path,
            format!(
                "/api/v1/namespaces/scale-00003/pods/{}/status",
                pod[0].body["metadata"]["name"].as_str().unwrap()
            )
        );
        assert!(pod[1].body["status"]["podIP"]
            .as_str()
            .unwrap()
            .starts_with("10.1"));
        let change = change_write(&size, 3);
        assert_eq!(
            change.path,
            format!(
                "/api/v1/namespaces/scale-00003/pods/{}",
                pod[0].body["metadata"]["name"].as_str().unwrap()
            )
        );
        assert_eq!(change.body["metadata"]["labels"]["rev"], "r3");
    }

    use serde::Deserialize as _;
}
