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

    use serde::Deserialize as _;
}
