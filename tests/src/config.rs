//! The virtual cluster's configuration directory: Kubernetes-shaped YAML, one object per file,
//! every write atomic (a dotfile in the same directory, then `rename`).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

pub type Labels = BTreeMap<String, String>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Writes `text` to `dir/file` atomically.
pub fn write_atomic(dir: &Path, file: &str, text: &str) -> Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(".tmp-{}-{file}", N.fetch_add(1, Ordering::Relaxed)));
    let dst = dir.join(file);
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dst).with_context(|| format!("renaming to {}", dst.display()))?;
    Ok(dst)
}

pub fn to_yaml(v: &Value) -> String {
    serde_yaml::to_string(v).expect("a JSON value always serialises to YAML")
}

pub fn namespace_yaml(name: &str, labels: &Labels) -> String {
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    }))
}

/// What the configuration says about a pod.
#[derive(Clone, Debug)]
pub struct PodObject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub service_account: String,
    pub labels: Labels,
    pub netns_path: String,
    pub ips: Vec<String>,
    pub container_ports: Vec<u16>,
    /// As the API shows a pod whose sandbox does not exist yet: no addresses in its status
    /// and no netns annotation.
    pub pending: bool,
}

pub fn pod_yaml(p: &PodObject) -> String {
    let ports: Vec<Value> = p
        .container_ports
        .iter()
        .map(|port| json!({"containerPort": port, "name": format!("p{port}")}))
        .collect();
    let (annotations, status) = if p.pending {
        (json!({}), json!({"phase": "Pending"}))
    } else {
        (
            json!({"ztunnel.dev/netns": p.netns_path}),
            json!({
                "phase": "Running",
                "podIP": p.ips.first(),
                "podIPs": p.ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            }),
        )
    };
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "uid": p.uid,
            "labels": p.labels,
            "annotations": annotations,
        },
        "spec": {
            "nodeName": p.node,
            "serviceAccountName": p.service_account,
            "containers": [{"name": "app", "image": "vc-probe", "ports": ports}],
        },
        "status": status,
    }))
}

/// A Service and its cluster IPs.
#[derive(Clone, Debug)]
pub struct ServiceObject {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs`, the primary (`spec.clusterIP`) first.
    pub vips: Vec<String>,
    pub selector: Labels,
    pub ports: Vec<ServicePortObject>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortObject {
    pub port: u16,
    pub target: u16,
    /// `p<port>` (which declares no protocol) unless given.
    pub name: Option<String>,
    pub app_protocol: Option<String>,
}

impl ServicePortObject {
    /// `port` → `target`, named `p<port>`, no `appProtocol`.
    pub fn new(port: u16, target: u16) -> Self {
        Self {
            port,
            target,
            name: None,
            app_protocol: None,
        }
    }
}

pub fn service_yaml(s: &ServiceObject) -> String {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({
                "name": p.name.clone().unwrap_or_else(|| format!("p{}", p.port)),
                "port": p.port,
                "targetPort": p.target,
                "protocol": "TCP",
            });
            if let Some(app) = &p.app_protocol {
                v["appProtocol"] = json!(app);
            }
            v
        })
        .collect();
    to_yaml(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.vips.first(),
            "clusterIPs": s.vips,
            "selector": s.selector,
            "ports": ports,
        },
    }))
}

pub fn namespace_file(name: &str) -> String {
    format!("namespace-{name}.yaml")
}

pub fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

pub fn service_file(namespace: &str, name: &str) -> String {
    format!("service-{namespace}-{name}.yaml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_yaml_has_the_shape_ztunnel_reads() {
        let y = pod_yaml(&PodObject {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "u1".into(),
            node: "node2".into(),
            service_account: "web".into(),
            labels: labels(&[("app", "web")]),
            netns_path: "/run/netns/x".into(),
            ips: vec!["10.2.0.2".into()],
            container_ports: vec![8080],
            pending: false,
        });
        let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(v["kind"].as_str(), Some("Pod"));
        assert_eq!(
            v["metadata"]["annotations"]["ztunnel.dev/netns"].as_str(),
            Some("/run/netns/x")
        );
        assert_eq!(v["spec"]["nodeName"].as_str(), Some("node2"));
        assert_eq!(v["status"]["podIP"].as_str(), Some("10.2.0.2"));
        assert_eq!(v["status"]["podIPs"][0]["ip"].as_str(), Some("10.2.0.2"));
        assert_eq!(
            v["spec"]["containers"][0]["ports"][0]["containerPort"].as_u64(),
            Some(8080)
        );
        let s = service_yaml(&ServiceObject {
            namespace: "shop".into(),
            name: "web".into(),
            vips: vec!["10.96.0.10".into(), "fd10:96::a".into()],
            selector: labels(&[("app", "web")]),
            ports: vec![
                ServicePortObject::new(80, 8080),
                ServicePortObject {
                    name: Some("tcp-db".into()),
                    app_protocol: Some("mysql".into()),
                    ..ServicePortObject::new(3306, 3306)
                },
            ],
        });
        let v: serde_yaml::Value = serde_yaml::from_str(&s).unwrap();
        assert_eq!(v["spec"]["clusterIP"].as_str(), Some("10.96.0.10"));
        assert_eq!(v["spec"]["clusterIPs"][1].as_str(), Some("fd10:96::a"));
        assert_eq!(v["spec"]["ports"][0]["targetPort"].as_u64(), Some(8080));
        assert_eq!(v["spec"]["ports"][0]["name"].as_str(), Some("p80"));
        assert!(v["spec"]["ports"][0]["appProtocol"].is_null());
        assert_eq!(v["spec"]["ports"][1]["name"].as_str(), Some("tcp-db"));
        assert_eq!(v["spec"]["ports"][1]["appProtocol"].as_str(), Some("mysql"));
        assert_eq!(v["spec"]["selector"]["app"].as_str(), Some("web"));
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("ztunnel-tests-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir, "a.yaml", "x: 1\n").unwrap();
        write_atomic(&dir, "a.yaml", "x: 2\n").unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.yaml".to_owned()]);
        assert_eq!(fs::read_to_string(dir.join("a.yaml")).unwrap(), "x: 2\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
