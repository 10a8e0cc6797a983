//! The `ztunnel` command line: the daemon (`run`, carried out by [`crate::app`]) and the
//! operator's commands (`policy check`, `route check`, `bpf status|uninstall`, `ca init|serve`).
mod bpf;
mod cni;
pub mod config;
mod policy;
mod route;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

pub use self::{
    bpf::status as bpf_status, cni::command as cni_command, policy::check as policy_check,
    route::check as route_check,
};
use crate::{
    cni as cni_plugin,
    hbone::{Keepalive, PoolLimits, ServerLimits},
    identity::{istio_ca, CaFiles, SpiffeId},
    kubernetes::ApiAccess,
    logging::{self, LogFormat},
    ports,
    state::EnrolmentPolicy,
};

/// The snapshot `policy check` and `route check` decide over: the configuration directory
/// as the proxy would load it, its problems printed as warnings. `Err`: it does not load.
fn check_snapshot(
    config_dir: &std::path::Path,
    root_namespace: &str,
) -> Result<crate::state::Snapshot, String> {
    let objects = crate::config::load_dir(config_dir)
        .map_err(|e| format!("{} is not a valid configuration: {e}", config_dir.display()))?;
    let settings = crate::state::MeshSettings {
        root_namespace: root_namespace.to_owned(),
    };
    let snapshot = crate::state::Snapshot::build(1, objects, &settings);
    for problem in &snapshot.problems {
        eprintln!("warning: {problem}");
    }
    Ok(snapshot)
}

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-accelerated node proxy for ambient meshes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node proxy.
    Run(Box<RunArgs>),
    /// Inspect or remove the pinned BPF state.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
    /// Manage the embedded certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Ask the policies of a configuration directory.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Ask the VirtualServices and DestinationRules of a configuration directory.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Show a node proxy's live view: the workloads and Services it knows, the policies in
    /// force, the certificates it holds, the connections open now (from its admin API, like
    /// `istioctl ztunnel-config`).
    Config {
        #[arg(value_enum)]
        section: config::Section,
        /// Aligned tables, or the lists as JSON or YAML.
        #[arg(short, long, value_enum, default_value_t = config::Format::Table)]
        output: config::Format,
        /// The node proxy's admin API (`run --admin-addr`).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
    },
    /// Install or remove the chained CNI plugin (`ztunnel-cni`) that captures new pods before
    /// they start.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
}

#[derive(Subcommand)]
pub enum CniCommand {
    /// Copy `ztunnel-cni` into the CNI bin directory and add it at the end of the plugin chain
    /// of the node's network (the first .conflist of the conf directory). Idempotent.
    Install {
        /// The CNI plugin directory of the node (containerd's `bin_dir`, e.g. /opt/cni/bin).
        #[arg(long)]
        bin_dir: PathBuf,
        /// The CNI configuration directory of the node (e.g. /etc/cni/net.d).
        #[arg(long)]
        conf_dir: PathBuf,
        /// The node proxy's CNI socket (`run --cni-socket`), written into the plugin's entry.
        #[arg(long, default_value = cni_plugin::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The plugin binary to install [default: `ztunnel-cni` next to this binary].
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Remove the plugin's entry from every conflist of the conf directory, then the binary
    /// and the node state file next to the socket.
    Uninstall {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
        #[arg(long, default_value = cni_plugin::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Would this call be allowed, and why? Runs the proxy's own decision. Exit status: 0
    /// allowed, 1 denied, 2 bad input or configuration.
    Check(Box<CheckArgs>),
}

#[derive(Subcommand)]
pub enum RouteCommand {
    /// Where would this request go, and why? Runs the proxy's own routing decision. Exit
    /// status: 0 routed (or answered by its route), 1 no route or no reachable destination,
    /// 2 bad input or configuration.
    Check(Box<RouteCheckArgs>),
}

#[derive(Parser)]
pub struct RouteCheckArgs {
    /// Directory of Kubernetes-shaped YAML, as for `run`.
    #[arg(long)]
    pub config_dir: PathBuf,
    /// The client pod, namespace/name.
    #[arg(long)]
    pub from: String,
    /// host:port, the host as the client writes it (`reviews`, `reviews.bookinfo`, an FQDN
    /// or a cluster IP), the port a Service port.
    #[arg(long)]
    pub to: String,
    /// HTTP method [default: GET].
    #[arg(long)]
    pub method: Option<String>,
    /// Path and query [default: /].
    #[arg(long)]
    pub path: Option<String>,
    /// A request header, 'name: value' (repeatable); `host:` sets the authority.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
}

#[derive(Parser)]
#[command(group(clap::ArgGroup::new("caller").required(true).args(["from", "from_principal", "from_plaintext"])))]
pub struct CheckArgs {
    /// Directory of Kubernetes-shaped YAML, as for `run`.
    #[arg(long)]
    pub config_dir: PathBuf,
    /// The destination pod, namespace/name.
    #[arg(long)]
    pub to: String,
    /// The destination (target) port [default: the pod's first container port].
    #[arg(long)]
    pub port: Option<u16>,
    /// The calling pod, namespace/name: mTLS as its identity if it is in the mesh, else plaintext.
    #[arg(long)]
    pub from: Option<String>,
    /// An mTLS caller with this SPIFFE id (spiffe:// optional).
    #[arg(long)]
    pub from_principal: Option<String>,
    /// A plaintext caller from outside the mesh.
    #[arg(long)]
    pub from_plaintext: bool,
    /// The caller's address.
    #[arg(long)]
    pub from_ip: Option<std::net::IpAddr>,
    /// HTTP method (describing any HTTP attribute makes it an HTTP request; GET by default).
    #[arg(long)]
    pub method: Option<String>,
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    /// A request header, 'name: value' (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// A JWT for RequestAuthentication.
    #[arg(long)]
    pub jwt: Option<String>,
    #[arg(long)]
    pub sni: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    #[arg(long, default_value = "istio.io/dataplane-mode=ambient", value_parser = EnrolmentPolicy::parse_label)]
    pub ambient_label: (String, String),
    #[arg(long, default_value = "istio.io/dataplane-mode=none", value_parser = EnrolmentPolicy::parse_label)]
    pub opt_out_label: (String, String),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a root CA (root-cert.pem, root-key.pem) in a directory, for `run --ca-dir`.
    Init {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Lifetime of the root certificate.
        #[arg(long, default_value = "3650d", value_parser = parse_duration)]
        validity: Duration,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Serve Istio's CSR API (istio.v1.auth.IstioCertificateService) from an embedded CA, for
    /// proxies started with `run --ca-address`.
    Serve {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// A DNS name the service's certificate carries (repeat for more), for clients that
        /// verify the CA by the name they dial, as Istio's ztunnel does. Default: ztunnel-ca,
        /// ztunnel-ca.istio-system, ztunnel-ca.istio-system.svc and
        /// ztunnel-ca.istio-system.svc.cluster.local.
        #[arg(long = "dns-san", value_name = "NAME")]
        dns_sans: Vec<String>,
        /// An IP the service's certificate carries (repeat for more), for clients that dial it
        /// by address (e.g. its Service's ClusterIP). Default: the --listen IP unless it is
        /// 0.0.0.0 or [::].
        #[arg(long = "ip-san", value_name = "IP")]
        ip_sans: Vec<std::net::IpAddr>,
        /// Bearer token clients must present. Without it (or --kubernetes) every client is
        /// served: local use only.
        #[arg(long, conflicts_with = "kubernetes")]
        token_file: Option<PathBuf>,
        /// Authenticate node proxies by their service account tokens (TokenReview) and sign
        /// only identities of pods on the caller's node. In-cluster API access.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: reach the API through this kubeconfig instead (outside a cluster).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// With --kubernetes: the node proxies' service account, namespace/name.
        #[arg(long, default_value = "istio-system/ztunnel", requires = "kubernetes")]
        node_proxy_service_account: istio_ca::token_review::ServiceAccount,
        /// With --kubernetes: the audience node proxies' tokens must be issued for.
        #[arg(long, default_value = istio_ca::token_review::ISTIO_CA_AUDIENCE, requires = "kubernetes")]
        token_audience: String,
    },
}

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Parses `90s`, `15m`, `24h`, `30d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 90s, 15m, 24h or 30d, got {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "unknown duration unit {unit:?} in {s:?} (use s, m, h or d)"
            ))
        }
    };
    if secs == 0 {
        return Err("a duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

#[derive(Subcommand)]
pub enum BpfCommand {
    /// What is pinned where (programs with run statistics, links, maps), which pods are
    /// enrolled, and the bpftool commands to dig deeper. Works whether or not the proxy runs.
    Status {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove every pinned program, link and map of a node proxy (detaches capture).
    Uninstall {
        #[arg(long, default_value = DEFAULT_BPF_DIR)]
        bpf_dir: PathBuf,
    },
}

pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/ztunnel";

#[derive(Parser)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config_dir", "kubernetes"])))]
pub struct RunArgs {
    /// Directory of Kubernetes-shaped YAML (Namespaces, Pods, Services, Istio policies).
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster service account) instead of a directory.
    #[arg(long)]
    pub kubernetes: bool,
    /// With --kubernetes: reach the API through this kubeconfig's current context instead
    /// (outside a cluster).
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: only pods with this `spec.nodeName` are captured here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Pin directory on bpffs (one per node proxy).
    #[arg(long, default_value = DEFAULT_BPF_DIR)]
    pub bpf_dir: PathBuf,
    /// cgroup v2 directory to attach the connect programs to [default: the cgroup2 root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// cgroup v2 directory the node's own processes (the kubelet) live below, where the
    /// program that recognises their connections to pods (probes) attaches [default: --cgroup].
    #[arg(long)]
    pub node_cgroup: Option<PathBuf>,
    /// Where the node's `/proc/sys` is writable: the proxy sets `net.ipv4.tcp_fwmark_accept`
    /// in each enrolled pod's netns through it (docs/capture.md, "Inbound delivery").
    /// Container runtimes mount a container's own `/proc/sys` read-only: mount the node's
    /// (a hostPath) elsewhere and name it here.
    #[arg(long, default_value = "/proc/sys")]
    pub proc_sys: PathBuf,
    /// Serve the `ztunnel-cni` plugin on this unix socket, so new pods are captured before
    /// they start (`ztunnel cni install` points the plugin here; conventionally
    /// /var/run/ztunnel/cni.sock). The node state file the plugin falls back on is written
    /// next to it. Without it, pods are enrolled when the configuration reports them.
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// How long a CNI ADD waits for a pod the configuration does not show yet before it fails
    /// (the kubelet then retries the sandbox).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub cni_pod_wait: Duration,
    /// Namespace label that enrols a namespace's pods, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=ambient", value_parser = EnrolmentPolicy::parse_label)]
    pub ambient_label: (String, String),
    /// Pod label that opts a pod out of capture, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=none", value_parser = EnrolmentPolicy::parse_label)]
    pub opt_out_label: (String, String),
    /// Istio's root namespace: PeerAuthentications there without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Directory of the embedded CA (see `ztunnel ca init`): workload certificates are issued
    /// in-process from its root. One of --ca-dir and --ca-address is required: there is no
    /// plaintext mode between nodes.
    #[arg(
        long,
        required_unless_present = "ca_address",
        conflicts_with = "ca_address"
    )]
    pub ca_dir: Option<PathBuf>,
    /// Address of an Istio-compatible CA (istiod, or `ztunnel ca serve`): host:port.
    #[arg(long, requires = "ca_root")]
    pub ca_address: Option<String>,
    /// The mesh root certificate (PEM): verifies the CA service and every peer.
    #[arg(long)]
    pub ca_root: Option<PathBuf>,
    /// File holding the bearer token sent to the CA (re-read on every request).
    #[arg(long)]
    pub ca_token_file: Option<PathBuf>,
    /// Verify the CA service by this SPIFFE id instead of the host name dialled (`ztunnel ca
    /// serve` runs as spiffe://<trust-domain>/ns/istio-system/sa/ztunnel-ca).
    #[arg(long)]
    pub ca_identity: Option<SpiffeId>,
    /// Lifetime requested for workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::METRICS_PORT)))]
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::READINESS_PORT)))]
    pub readiness_addr: SocketAddr,
    /// Admin API (config dump, certificates, BPF state, log level). Keep it on loopback: it
    /// shows the whole configuration and changes the log level.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::ADMIN_PORT)))]
    pub admin_addr: SocketAddr,
    /// On SIGTERM, how long open connections may go on (after the listeners close and a new
    /// proxy can take over) before they are reset.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Wait this long for a proxy that is shutting down to release the pin directory (the
    /// next proxy of a rolling restart). Without it, a busy directory is an error at once.
    #[arg(long, value_parser = parse_duration)]
    pub takeover_wait: Option<Duration>,
    /// Turn on the kernel's eBPF run statistics while the proxy runs (as
    /// `sysctl kernel.bpf_stats_enabled=1` does; costs a few ns per program run).
    #[arg(long)]
    pub bpf_stats: bool,
    /// The same-netns fast path: bytes between an application's socket and the proxy's in
    /// its pod go from one socket's send straight to the other's receive queue (sockhash +
    /// sk_msg) instead of through the loopback TCP stack; the proxy still reads every byte
    /// (docs/capture.md, "Fast path"). Off by default: on this kernel a blocking `recv()` of
    /// an application socket on the fast path can fail with EAGAIN (tcp_bpf returns it after
    /// any wakeup without data), so turn it on only where every application reads with an
    /// event loop. It also has no flow control yet: a reader slower than its writer lets the
    /// kernel queue grow without bound, so it is for measurements only.
    #[arg(long, env = "ZTUNNEL_FAST_PATH", value_enum, default_value_t = Switch::Off)]
    pub fast_path: Switch,
    /// Istio's request metrics (istio_requests_total, istio_request_duration_milliseconds,
    /// istio_request_bytes, istio_response_bytes) for the HTTP requests the proxy parses.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub request_metrics: Switch,
    /// One `http request` log line per HTTP request the proxy parses.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub access_log: Switch,
    /// The share of successful requests (answered below 400) the access log keeps, from 0 to
    /// 1, evenly spread; refused, failed and abandoned requests are always logged.
    #[arg(long, default_value = "1", value_parser = parse_share)]
    pub access_log_sample: f64,
    /// The cluster's DNS domain: the `destination_service` of a request is
    /// `<name>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    #[command(flatten)]
    pub hbone: HboneArgs,
}

/// HBONE's limits and timeouts (docs/hbone.md, "Limits and timeouts"); the defaults are
/// [`PoolLimits::default`] and [`ServerLimits::default`].
#[derive(clap::Args, Debug)]
pub struct HboneArgs {
    /// Client: CONNECT streams on one HBONE connection before the pool opens another for the
    /// same source pod and destination (fewer if the peer allows fewer).
    #[arg(long, default_value_t = PoolLimits::default().streams_per_connection, value_parser = at_least_one)]
    pub hbone_streams_per_connection: usize,
    /// Client: HBONE connections per (source pod, destination pod); with the streams per
    /// connection, the most tunnels one pod may have open to one destination pod.
    #[arg(long, default_value_t = PoolLimits::default().connections_per_key, value_parser = at_least_one)]
    pub hbone_connections_per_key: usize,
    /// Client: how long a CONNECT waits for a free stream when its pod is at that cap, before
    /// the connection is reset.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub hbone_pool_wait: Duration,
    /// Client: a pooled HBONE connection without streams for this long is closed; a key's
    /// other idle connections (opened for a burst) go after a sixth of it.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub hbone_pool_idle_timeout: Duration,
    /// Both sides: an HTTP/2 PING on every HBONE connection this often.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hbone_keepalive_interval: Duration,
    /// Both sides: a PING not answered within this closes the connection and resets its
    /// streams.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub hbone_keepalive_timeout: Duration,
    /// Server: from the TCP accept to the first CONNECT (TLS handshake, HTTP/2 preface,
    /// SETTINGS, request head); later, the connection is refused.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hbone_first_request_timeout: Duration,
    /// Server: an HBONE connection without streams for this long is closed (GOAWAY).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,
    /// Server: SETTINGS_MAX_CONCURRENT_STREAMS of every HBONE connection.
    #[arg(long, default_value_t = ServerLimits::default().max_concurrent_streams, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_concurrent_streams: u32,
    /// Server: SETTINGS_MAX_HEADER_LIST_SIZE (bytes) of every HBONE connection.
    #[arg(long, default_value_t = ServerLimits::default().max_header_list_size, value_parser = clap::value_parser!(u32).range(1024..))]
    pub hbone_max_header_list_size: u32,
    /// Server: HBONE connections from one source address that may be waiting for their first
    /// CONNECT at once; more are reset at accept.
    #[arg(long, default_value_t = ServerLimits::default().max_pending_per_source, value_parser = at_least_one)]
    pub hbone_max_pending_per_source: usize,
    /// Server: the same, for the whole proxy.
    #[arg(long, default_value_t = ServerLimits::default().max_pending, value_parser = at_least_one)]
    pub hbone_max_pending: usize,
}

impl HboneArgs {
    pub fn limits(&self) -> (PoolLimits, ServerLimits) {
        let keepalive = Keepalive {
            interval: self.hbone_keepalive_interval,
            timeout: self.hbone_keepalive_timeout,
        };
        let pool = PoolLimits {
            streams_per_connection: self.hbone_streams_per_connection,
            connections_per_key: self.hbone_connections_per_key,
            wait: self.hbone_pool_wait,
            idle_timeout: self.hbone_pool_idle_timeout,
            keepalive,
        };
        let server = ServerLimits {
            first_request_timeout: self.hbone_first_request_timeout,
            idle_timeout: self.hbone_idle_timeout,
            keepalive,
            max_concurrent_streams: self.hbone_max_concurrent_streams,
            max_header_list_size: self.hbone_max_header_list_size,
            max_pending_per_source: self.hbone_max_pending_per_source,
            max_pending: self.hbone_max_pending,
            ..ServerLimits::default()
        };
        (pool, server)
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got {s:?}")),
    }
}

/// A feature turned on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        self == Switch::On
    }
}

/// A share from 0 to 1 (`0.25`).
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected a share from 0 to 1 (like 0.1), got {s:?}"
        )),
    }
}

/// `ca init` (a root CA in a directory) and `ca serve` (Istio's CSR API from it, until the
/// process is stopped).
pub fn ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            ca_dir,
            trust_domain,
            validity,
            force,
        } => CaFiles::init(&ca_dir, &trust_domain, validity, force)
            .map(|_| {
                println!(
                    "created a root CA for {trust_domain} in {}",
                    ca_dir.display()
                )
            })
            .with_context(|| format!("creating a CA in {}", ca_dir.display())),
        CaCommand::Serve {
            ca_dir,
            listen,
            dns_sans,
            ip_sans,
            token_file,
            kubernetes,
            kubeconfig,
            node_proxy_service_account,
            token_audience,
        } => {
            let _ = logging::init(LogFormat::Text);
            let callers = match (kubernetes, token_file) {
                (true, _) => istio_ca::CallerAuth::Kubernetes {
                    access: ApiAccess::new(kubeconfig),
                    node_proxy: node_proxy_service_account,
                    audience: token_audience,
                },
                (false, Some(file)) => istio_ca::CallerAuth::TokenFile(file),
                (false, None) => istio_ca::CallerAuth::Anyone,
            };
            tokio::runtime::Runtime::new()
                .context("starting the runtime")
                .and_then(|rt| {
                    rt.block_on(istio_ca::run_ca_service(istio_ca::CaServiceOptions {
                        ca_dir,
                        listen,
                        callers,
                        names: serving_names(listen, dns_sans, ip_sans),
                    }))
                })
        }
    }
}

/// The CA service's certificate names: each list given replaces its default.
fn serving_names(
    listen: std::net::SocketAddr,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
) -> istio_ca::ServingNames {
    let defaults = istio_ca::ServingNames::defaults(listen);
    istio_ca::ServingNames {
        dns: if dns.is_empty() { defaults.dns } else { dns },
        ips: if ips.is_empty() { defaults.ips } else { ips },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags the Kubernetes manifests rely on.
    #[test]
    fn configuration_source_and_ca_authentication_flags() {
        let parse = |args: &str| Cli::try_parse_from(args.split_whitespace());
        for ok in [
            "ztunnel run --kubernetes --node-name n --ca-dir d",
            "ztunnel run --kubernetes --kubeconfig k --node-name n --ca-dir d",
            "ztunnel run --config-dir c --node-name n --ca-dir d",
            "ztunnel ca serve --ca-dir d --kubernetes",
            "ztunnel ca serve --ca-dir d --kubernetes --kubeconfig k --node-proxy-service-account ns/sa --token-audience a",
            "ztunnel ca serve --ca-dir d --token-file t",
            "ztunnel ca serve --ca-dir d --dns-san ca.example --dns-san ca --ip-san 10.96.0.5",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok).err());
        }
        for bad in [
            "ztunnel run --node-name n --ca-dir d",
            "ztunnel run --config-dir c --kubernetes --node-name n --ca-dir d",
            "ztunnel run --kubeconfig k --node-name n --ca-dir d",
            "ztunnel ca serve --ca-dir d --kubernetes --token-file t",
            "ztunnel ca serve --ca-dir d --kubeconfig k",
            "ztunnel ca serve --ca-dir d --kubernetes --node-proxy-service-account ztunnel",
            "ztunnel ca serve --ca-dir d --ip-san not-an-ip",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    /// The flags' defaults are the limits' defaults (docs/hbone.md lists one set).
    #[test]
    fn hbone_flag_defaults_are_the_limits_defaults() {
        let cli =
            Cli::try_parse_from("ztunnel run --config-dir c --node-name n --ca-dir d".split(' '))
                .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            run.hbone.limits(),
            (PoolLimits::default(), ServerLimits::default())
        );
    }

    #[test]
    fn ca_service_names_replace_their_defaults_one_list_at_a_time() {
        let listen = "10.0.0.7:15012".parse().unwrap();
        let defaults = serving_names(listen, vec![], vec![]);
        assert_eq!(defaults, istio_ca::ServingNames::defaults(listen));
        let dns_only = serving_names(listen, vec!["ca.example".into()], vec![]);
        assert_eq!(dns_only.dns, ["ca.example"]);
        assert_eq!(dns_only.ips, defaults.ips);
    }

    /// Every `ztunnel` command line of the rendered manifests parses.
    #[test]
    fn the_manifests_command_lines_parse() {
        use serde::Deserialize as _;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ztunnel.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut checked = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let doc = serde_yaml::Value::deserialize(doc).unwrap();
            let containers = &doc["spec"]["template"]["spec"]["containers"];
            for c in containers.as_sequence().into_iter().flatten() {
                if c["command"][0].as_str() != Some("ztunnel") {
                    continue;
                }
                let args: Vec<&str> = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap())
                    .collect();
                let line = std::iter::once("ztunnel").chain(args.iter().copied());
                if let Err(e) = Cli::try_parse_from(line) {
                    panic!("{args:?}: {e}");
                }
                checked.push(args[0].to_owned());
            }
        }
        checked.sort();
        assert_eq!(checked, ["ca", "run"], "the node proxy and the CA");
    }
}
