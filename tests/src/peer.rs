//! Istio's own ztunnel as a node proxy of the virtual cluster (the "peer"): where its binary
//! comes from, the configuration it reads instead of istiod, and the in-pod redirection Istio
//! applies to the pods it serves.
//!
//! It runs as Istio runs it on a node, without istiod or Kubernetes: `PROXY_MODE=shared` with
//! pods handed over by a ZDS server ([`crate::zds`], istio-cni's role), workloads, services and
//! authorization policies from a local file (`LOCAL_XDS_PATH`, `XDS_ADDRESS` empty), and
//! certificates from `ztunnel ca serve` over Istio's CSR API (`CA_ADDRESS`).
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    config::{Labels, PodObject, ServiceObject},
    process::output_with_timeout,
};

/// The peer binary, compressed, beside the checkout: `<checkout>/../shared/peers/`.
pub const PEER_ARCHIVE: &str = "shared/peers/istio-ztunnel.xz";
/// The namespace label that enrols pods (istio-cni's default).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CLUSTER_ID: &str = "Kubernetes";

/// Where the peer binary can come from, in order: `$ZTUNNEL_PEER_BIN`, then the archive beside
/// this checkout (and, for a git worktree, beside the main checkout).
fn archive_candidates() -> Vec<PathBuf> {
    let root = crate::workspace_root();
    let mut v = Vec::new();
    if let Some(parent) = root.parent() {
        v.push(parent.join(PEER_ARCHIVE));
    }
    if let Some(main) = main_checkout(&root) {
        if let Some(parent) = main.parent() {
            let p = parent.join(PEER_ARCHIVE);
            if !v.contains(&p) {
                v.push(p);
            }
        }
    }
    v
}

/// The main checkout of a git worktree (`.git` is then a file naming the worktree's git dir,
/// whose `commondir` leads to the main `.git`).
fn main_checkout(root: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(root.join(".git")).ok()?;
    let gitdir = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
    let common = fs::read_to_string(gitdir.join("commondir")).ok()?;
    let common = gitdir.join(common.trim());
    let common = common.canonicalize().ok()?;
    common.parent().map(Path::to_owned)
}

/// The peer's `ztunnel` binary: `$ZTUNNEL_PEER_BIN` if set, else the archive unpacked (once,
/// re-unpacked when the archive is newer) into `<workspace>/target/peer/istio-ztunnel`. Fails,
/// naming every place it looked, if there is none: a missing peer is a failure, not a skip.
pub fn peer_bin() -> Result<PathBuf> {
    peer_bin_from(std::env::var_os("ZTUNNEL_PEER_BIN").map(PathBuf::from))
}

/// [`peer_bin`] with an explicit binary (e.g. `bench --peer PATH`) taking precedence.
pub fn peer_bin_from(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        if !bin.is_file() {
            bail!(
                "the peer binary {} (ZTUNNEL_PEER_BIN or --peer) does not exist",
                bin.display()
            );
        }
        return Ok(bin);
    }
    let archive = find_archive(&archive_candidates())?;
    let bin = crate::workspace_root().join("target/peer/istio-ztunnel");
    // Tests start clusters in parallel: one unpacks, the others wait for it.
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = UNPACKING.lock().unwrap_or_else(|p| p.into_inner());
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if bin.is_file() && mtime(&bin) >= mtime(&archive) {
        return Ok(bin);
    }
    unpack(&archive, &bin)?;
    Ok(bin)
}

/// The first of `candidates` that exists; the error names every place a peer can come from.
fn find_archive(candidates: &[PathBuf]) -> Result<PathBuf> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "Istio's ztunnel is needed for the interoperability tests and `bench --peer`, and \
             there is none: set ZTUNNEL_PEER_BIN to a ztunnel binary, or put the archive at {}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
}

/// `xz -dc archive > bin`, through a temporary file renamed into place, so concurrent tests
/// never run a half-written binary.
fn unpack(archive: &Path, bin: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = bin.parent().expect("a file path has a parent");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".istio-ztunnel-{}", std::process::id()));
    let out = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(archive)
        .stdout(out)
        .status()
        .context("running xz (cargo xtask setup installs xz-utils)")?;
    if !status.success() {
        let _ = fs::remove_file(&tmp);
        bail!("xz -dc {} failed ({status})", archive.display());
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, bin).with_context(|| format!("renaming to {}", bin.display()))?;
    let version = output_with_timeout(Command::new(bin).arg("version"), Duration::from_secs(10))?;
    if !version.status.success() {
        bail!(
            "{} (from {}) does not run: {}",
            bin.display(),
            archive.display(),
            String::from_utf8_lossy(&version.stderr)
        );
    }
    Ok(())
}

/// True if a pod of a namespace with `ns_labels` and its own `pod_labels` is in the ambient
/// mesh, as istio-cni decides it: the namespace says `ambient`, the pod does not opt out.
pub fn in_mesh(ns_labels: Option<&Labels>, pod_labels: &Labels) -> bool {
    let ns = ns_labels
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str);
    let pod = pod_labels.get(DATAPLANE_MODE).map(String::as_str);
    ns == Some("ambient") && pod != Some("none")
}

/// The workload uid the peer's configuration and ZDS use for a pod.
pub fn workload_uid(p: &PodObject) -> String {
    format!("{CLUSTER_ID}//Pod/{}/{}", p.namespace, p.name)
}

/// The hostname of a Service, as the peer names it.
fn hostname(s: &ServiceObject) -> String {
    format!("{}.{}.svc.cluster.local", s.name, s.namespace)
}

/// One workload of the peer's local configuration (their `LocalWorkload`).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkload<'a> {
    uid: String,
    name: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    trust_domain: &'a str,
    cluster_id: &'a str,
    workload_ips: &'a [String],
    protocol: &'a str,
    node: &'a str,
    network: &'a str,
    /// `namespace/hostname` → service port → target port.
    services: BTreeMap<String, BTreeMap<u16, u16>>,
}

/// One Service of the peer's local configuration.
#[derive(serde::Serialize)]
struct LocalService<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: String,
    /// `network/ip`; the default network is empty.
    vips: Vec<String>,
    ports: BTreeMap<u16, u16>,
}

#[derive(serde::Serialize)]
struct LocalConfig<'a> {
    workloads: Vec<LocalWorkload<'a>>,
    services: Vec<LocalService<'a>>,
    policies: &'a [serde_yaml::Value],
}

/// The peer's `LOCAL_XDS_PATH` file: every pod of the cluster as a workload (`protocol: HBONE`
/// for mesh pods, whichever node proxy serves them, so its proxy tunnels to ours and ours to
/// it), every Service, and the given authorization policies (in its local format: `name`,
/// `namespace`, `scope`, `action`, `rules: [[[match]]]`, `dryRun`; string matches are YAML
/// tags, `!Exact cluster.local/ns/a/sa/b`, which is why they are YAML values and not JSON).
pub fn local_config(
    pods: &[(PodObject, bool)],
    services: &[ServiceObject],
    policies: &[serde_yaml::Value],
) -> String {
    let ports = |s: &ServiceObject| {
        s.ports
            .iter()
            .map(|p| (p.port, p.target))
            .collect::<BTreeMap<u16, u16>>()
    };
    // A pending pod has no sandbox yet, so no address: not a workload the peer can reach.
    let workloads = pods
        .iter()
        .filter(|(p, _)| !p.pending)
        .map(|(p, mesh)| LocalWorkload {
            uid: workload_uid(p),
            name: &p.name,
            namespace: &p.namespace,
            service_account: &p.service_account,
            trust_domain: TRUST_DOMAIN,
            cluster_id: CLUSTER_ID,
            workload_ips: &p.ips,
            protocol: if *mesh { "HBONE" } else { "TCP" },
            node: &p.node,
            network: "",
            services: services
                .iter()
                .filter(|s| {
                    s.namespace == p.namespace
                        && !s.selector.is_empty()
                        && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .map(|s| (format!("{}/{}", s.namespace, hostname(s)), ports(s)))
                .collect(),
        })
        .collect();
    let services = services
        .iter()
        .map(|s| LocalService {
            name: &s.name,
            namespace: &s.namespace,
            hostname: hostname(s),
            vips: s.vips.iter().map(|v| format!("/{v}")).collect(),
            ports: ports(s),
        })
        .collect();
    serde_yaml::to_string(&LocalConfig {
        workloads,
        services,
        policies,
    })
    .expect("the local configuration always serialises")
}

/// Istio's in-pod redirection (their `scripts/ztunnel-redirect-inpod.sh`, as istio-cni applies
/// it inside each enrolled pod's netns), as `iptables-restore --noflush` input: outbound TCP to
/// the pod's 15001, inbound TCP other than HBONE to 15006, DNS to 15053, and the connmark that
/// sends replies of ztunnel's own (mark 0x539) connections back through it.
pub const INPOD_RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
COMMIT
";

/// The routing half of the in-pod redirection (`ip` arguments, in order).
pub const INPOD_ROUTES: [&[&str]; 2] = [
    &[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ],
    &[
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ],
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{labels, ServicePortObject};

    #[test]
    fn a_missing_peer_names_every_place_it_was_looked_for() {
        let err = find_archive(&[
            PathBuf::from("/nowhere/a.xz"),
            PathBuf::from("/nowhere/b.xz"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("ZTUNNEL_PEER_BIN"), "{err}");
        assert!(err.contains("/nowhere/a.xz or /nowhere/b.xz"), "{err}");
        let err = peer_bin_from(Some(PathBuf::from("/nowhere/ztunnel"))).unwrap_err();
        assert!(err.to_string().contains("/nowhere/ztunnel"), "{err}");
    }

    #[test]
    fn a_worktree_finds_its_main_checkout() {
        let dir = std::env::temp_dir().join(format!("ztt-peer-unit-{}", std::process::id()));
        let (main, wt) = (dir.join("main"), dir.join("wt/peer"));
        fs::create_dir_all(main.join(".git/worktrees/peer")).unwrap();
        fs::create_dir_all(&wt).unwrap();
        let gitdir = main.join(".git/worktrees/peer");
        fs::write(wt.join(".git"), format!("gitdir: {}\n", gitdir.display())).unwrap();
        fs::write(gitdir.join("commondir"), "../..\n").unwrap();
        assert_eq!(main_checkout(&wt), Some(main.canonicalize().unwrap()));
        assert_eq!(
            main_checkout(&main),
            None,
            "a main checkout has a .git directory"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn enrolment_follows_istio_cni() {
        let ambient = labels(&[(DATAPLANE_MODE, "ambient")]);
        assert!(in_mesh(Some(&ambient), &Labels::new()));
        assert!(!in_mesh(
            Some(&ambient),
            &labels(&[(DATAPLANE_MODE, "none")])
        ));
        assert!(!in_mesh(None, &Labels::new()));
        assert!(!in_mesh(Some(&Labels::new()), &ambient));
    }

    #[test]
    fn local_config_has_the_shape_the_peer_reads() {
        let pod = PodObject {
            namespace: "shop".into(),
            name: "web".into(),
            uid: "x".into(),
            node: "node2".into(),
            service_account: "web-sa".into(),
            labels: labels(&[("app", "web")]),
            netns_path: "/run/netns/x".into(),
            ips: vec!["10.2.0.2".into()],
            container_ports: vec![],
            pending: false,
        };
        let svc = ServiceObject {
            namespace: "shop".into(),
            name: "web".into(),
            vips: vec!["10.96.0.10".into()],
            selector: labels(&[("app", "web")]),
            ports: vec![ServicePortObject::new(80, 8080)],
        };
        let policy: serde_yaml::Value = serde_yaml::from_str(
            "{name: p, namespace: shop, scope: Namespace, action: Allow, dryRun: false,
              rules: [[[{principals: [!Exact cluster.local/ns/a/sa/b]}]]]}",
        )
        .unwrap();
        let text = local_config(&[(pod, true)], &[svc], &[policy]);
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let w = &v["workloads"][0];
        assert_eq!(w["uid"].as_str(), Some("Kubernetes//Pod/shop/web"));
        assert_eq!(w["serviceAccount"].as_str(), Some("web-sa"));
        assert_eq!(w["protocol"].as_str(), Some("HBONE"));
        assert_eq!(w["node"].as_str(), Some("node2"));
        assert_eq!(w["workloadIps"][0].as_str(), Some("10.2.0.2"));
        // Ports are integer keys, as their `HashMap<u16, u16>` wants them.
        let ports = &w["services"]["shop/web.shop.svc.cluster.local"];
        assert_eq!(
            ports
                .get(serde_yaml::Value::from(80))
                .and_then(|p| p.as_u64()),
            Some(8080),
            "{text}"
        );
        assert_eq!(v["services"][0]["vips"][0].as_str(), Some("/10.96.0.10"));
        assert_eq!(v["policies"][0]["action"].as_str(), Some("Allow"));
        assert!(
            text.contains("- !Exact cluster.local/ns/a/sa/b"),
            "string matches stay tagged: {text}"
        );
    }
}
