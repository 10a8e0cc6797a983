//! Configuration files of the cluster's daemons (containerd, kubelet, CNI).
use super::layout::{
    self, Node, CLUSTER_DOMAIN, DNS_SERVICE_IP, POD_CIDR, SERVICE_CIDR, UNDERLAY_CIDR,
};
use crate::image::PAUSE_IMAGE;

/// containerd 1.6 for one node: its own root, state, sockets and runc root; the CRI plugin with
/// the cgroupfs driver (no systemd here) and the settings this host needs
/// (`restrict_oom_score_adj`: root lacks CAP_SYS_RESOURCE, and runc fails every sandbox
/// otherwise). No plugin writes outside the node's directory.
pub fn containerd(node: Node) -> String {
    let d = node.dir();
    let d = d.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
        bin = node.cni_bin_dir().display(),
        conf = node.cni_conf_dir().display(),
    )
}

/// The node's pod network: a bridge with the node's pod /24, the node as gateway for the
/// cluster's ranges only (no default route: nothing from a pod can leave the machine), no NAT.
pub fn cni_conflist(node: Node) -> String {
    let data = node.dir().join("cni/ipam");
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "ztk",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{data}",
        "ranges": [[{{"subnet": "{subnet}", "gateway": "{gw}"}}]],
        "routes": [{{"dst": "{POD_CIDR}"}}, {{"dst": "{SERVICE_CIDR}"}}, {{"dst": "{UNDERLAY_CIDR}"}}]
      }}
    }}
  ]
}}
"#,
        data = data.display(),
        subnet = node.pod_subnet(),
        gw = node.pod_gateway(),
    )
}

pub fn kubelet(node: Node) -> String {
    let d = node.dir();
    let pki = layout::pki_dir();
    let name = node.name();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{sock}
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {pki}/ca.crt}}
# Only holders of a certificate of the cluster CA get past authentication (the API server,
# the administrator); the kubelet needs no SubjectAccessReview rights for that.
authorization: {{mode: AlwaysAllow}}
tlsCertFile: {pki}/{name}-serving.crt
tlsPrivateKeyFile: {pki}/{name}-serving.key
cgroupDriver: cgroupfs
cgroupRoot: {cgroot}
cgroupsPerQOS: true
failSwapOn: false
makeIPTablesUtilChains: false
podLogsDir: {d}/pod-logs
volumePluginDir: {d}/kubelet/volume-plugins
clusterDNS: [{DNS_SERVICE_IP}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {run}/resolv.conf
serializeImagePulls: false
maxPods: 60
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
"#,
        sock = node.containerd_socket().display(),
        ip = node.ip(),
        pki = pki.display(),
        cgroot = node.cgroup_root(),
        d = d.display(),
        run = layout::run_dir().display(),
    )
}
