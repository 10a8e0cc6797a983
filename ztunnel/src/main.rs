//! `ztunnel`: the node proxy daemon and its operator commands.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rustls::pki_types::CertificateDer;
use tracing::{error, info};
use ztunnel::{
    admin::{
        self,
        metrics::{Metrics, Sampled},
        AdminState, Endpoint, ProxyView,
    },
    authz::{
        check::{check, Caller, CheckRequest},
        jwks, request_authentication,
    },
    capture::{self, enrolment::Enroller, CaptureOptions, PreparedCapture},
    cni,
    config::{
        self,
        kubernetes::KubernetesOptions,
        pod_netns::{NsId, PodNetnsFinder},
    },
    identity::{
        istio_ca::{self, IstioCaClient},
        CaFiles, CacheOptions, CertificateCache, CertificateProvider, SpiffeId,
    },
    kubernetes::ApiAccess,
    netns::Netns,
    proxy::{Mesh, Proxy, ProxyOptions},
    state::{EnrolmentPolicy, MeshSettings},
};

#[derive(Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-accelerated node proxy for ambient meshes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Install or remove the chained CNI plugin (`ztunnel-cni`) that captures new pods before
    /// they start.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
}

#[derive(Subcommand)]
enum CniCommand {
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
        #[arg(long, default_value = cni::DEFAULT_SOCKET)]
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
        #[arg(long, default_value = cni::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn cni_command(command: CniCommand) -> Result<()> {
    match command {
        CniCommand::Install {
            bin_dir,
            conf_dir,
            socket,
            plugin,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("finding this binary")?
                    .with_file_name(cni::PLUGIN_NAME),
            };
            let done = cni::install::install(&bin_dir, &conf_dir, &socket, &plugin)?;
            println!(
                "{} {} ({})",
                if done.binary_changed {
                    "installed"
                } else {
                    "unchanged"
                },
                done.binary.display(),
                plugin.display()
            );
            println!(
                "{} {}: {} is the last plugin of the chain, socket {}",
                if done.conflist_changed {
                    "updated"
                } else {
                    "unchanged"
                },
                done.conflist.display(),
                cni::PLUGIN_NAME,
                socket.display()
            );
            Ok(())
        }
        CniCommand::Uninstall {
            bin_dir,
            conf_dir,
            socket,
        } => {
            let done = cni::install::uninstall(&bin_dir, &conf_dir, Some(&socket))?;
            for f in &done.conflists {
                println!("removed {} from {}", cni::PLUGIN_NAME, f.display());
            }
            if done.binary_removed {
                println!("removed {}", bin_dir.join(cni::PLUGIN_NAME).display());
            }
            if done.conflists.is_empty() && !done.binary_removed {
                println!("{} was not installed", cni::PLUGIN_NAME);
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Would this call be allowed, and why? Runs the proxy's own decision. Exit status: 0
    /// allowed, 1 denied, 2 bad input or configuration.
    Check(Box<CheckArgs>),
}

#[derive(Parser)]
#[command(group(clap::ArgGroup::new("caller").required(true).args(["from", "from_principal", "from_plaintext"])))]
struct CheckArgs {
    /// Directory of Kubernetes-shaped YAML, as for `run`.
    #[arg(long)]
    config_dir: PathBuf,
    /// The destination pod, namespace/name.
    #[arg(long)]
    to: String,
    /// The destination (target) port [default: the pod's first container port].
    #[arg(long)]
    port: Option<u16>,
    /// The calling pod, namespace/name: mTLS as its identity if it is in the mesh, else plaintext.
    #[arg(long)]
    from: Option<String>,
    /// An mTLS caller with this SPIFFE id (spiffe:// optional).
    #[arg(long)]
    from_principal: Option<String>,
    /// A plaintext caller from outside the mesh.
    #[arg(long)]
    from_plaintext: bool,
    /// The caller's address.
    #[arg(long)]
    from_ip: Option<std::net::IpAddr>,
    /// HTTP method (describing any HTTP attribute makes it an HTTP request; GET by default).
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    path: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// A request header, 'name: value' (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// A JWT for RequestAuthentication.
    #[arg(long)]
    jwt: Option<String>,
    #[arg(long)]
    sni: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    #[arg(long, default_value = "istio.io/dataplane-mode=ambient", value_parser = EnrolmentPolicy::parse_label)]
    ambient_label: (String, String),
    #[arg(long, default_value = "istio.io/dataplane-mode=none", value_parser = EnrolmentPolicy::parse_label)]
    opt_out_label: (String, String),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `policy check`: prints the answer; the exit status says allowed (0), denied (1), or bad
/// input or configuration (2).
fn policy_check(args: CheckArgs) -> ExitCode {
    let bad = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    };
    let objects = match config::load_dir(&args.config_dir) {
        Ok(o) => o,
        Err(e) => {
            return bad(format!(
                "{} is not a valid configuration: {e}",
                args.config_dir.display()
            ))
        }
    };
    let settings = MeshSettings {
        root_namespace: args.root_namespace.clone(),
    };
    let snapshot = ztunnel::state::Snapshot::build(1, objects, &settings);
    for problem in &snapshot.problems {
        eprintln!("warning: {problem}");
    }
    let from = match (args.from, args.from_principal) {
        (Some(pod), _) => Caller::Pod(pod),
        (None, Some(p)) => Caller::Principal(p),
        (None, None) => Caller::Plaintext,
    };
    let req = CheckRequest {
        to: args.to,
        port: args.port,
        from,
        from_ip: args.from_ip,
        method: args.method,
        path: args.path,
        host: args.host,
        headers: args.headers,
        jwt: args.jwt,
        sni: args.sni,
        trust_domain: args.trust_domain,
        enrolment: EnrolmentPolicy {
            namespace_label: args.ambient_label,
            pod_opt_out_label: args.opt_out_label,
        },
    };
    // Key sets named by jwksUri are fetched once, up front, as the proxy would fetch them.
    let mut fetched = std::collections::HashMap::new();
    if req.jwt.is_some() {
        let uris: std::collections::BTreeSet<String> = snapshot
            .request_authentications
            .iter()
            .flat_map(|ra| &ra.rules)
            .filter_map(|r| match &r.keys {
                request_authentication::Keys::Uri(uri) => Some(uri.clone()),
                request_authentication::Keys::Inline(_) => None,
            })
            .collect();
        if !uris.is_empty() {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return bad(format!("starting the runtime: {e}")),
            };
            for uri in uris {
                let got = rt.block_on(tokio::time::timeout(jwks::TIMEOUT, jwks::fetch(&uri)));
                match got {
                    Ok(Ok(set)) => {
                        fetched.insert(uri, Arc::new(set));
                    }
                    Ok(Err(e)) => eprintln!("warning: fetching {uri}: {e}"),
                    Err(_) => eprintln!("warning: fetching {uri}: timed out"),
                }
            }
        }
    }
    let answer = match check(&snapshot, &req, &|uri| fetched.get(uri).cloned()) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    match args.output {
        Output::Text => print!("{}", answer.text()),
        Output::Json => match serde_json::to_string_pretty(&answer) {
            Ok(j) => println!("{j}"),
            Err(e) => return bad(e.to_string()),
        },
    }
    if answer.decision == "ALLOW" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[derive(Subcommand)]
enum CaCommand {
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

const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

fn bpf_status(dir: &std::path::Path, output: Output) -> Result<()> {
    use capture::inventory::inventory;
    if !dir.is_dir() {
        anyhow::bail!(
            "{} does not exist: no node proxy has pinned its state there (see --bpf-dir)",
            dir.display()
        );
    }
    let inv = inventory(dir);
    if matches!(output, Output::Json) {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    let d = dir.display();
    println!("pin directory {d}");
    println!(
        "eBPF run statistics: {}",
        if inv.stats_enabled {
            "on (kernel.bpf_stats_enabled=1)"
        } else {
            "off by the sysctl (a proxy started with --bpf-stats may hold them on; \
             `sysctl -w kernel.bpf_stats_enabled=1` turns them on for everyone)"
        }
    );
    println!("\nprograms");
    for p in &inv.programs {
        let avg = (p.run_time.as_nanos() as u64)
            .checked_div(p.run_count)
            .map(|ns| format!("{ns} ns/run"))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<20} id {:<6} {:<16} {:>10} runs  {avg}",
            p.pin, p.id, p.kind, p.run_count
        );
    }
    println!("\nlinks");
    for l in &inv.links {
        println!(
            "  {:<40} id {:<6} program {:<6} {}",
            l.pin, l.id, l.program_id, l.target
        );
    }
    println!("\nmaps");
    for m in &inv.maps {
        let entries = m
            .entries
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<20} id {:<6} {:<12} {:>6} / {} entries",
            m.pin, m.id, m.kind, entries, m.max_entries
        );
    }
    let enrolled: Vec<&str> = inv
        .links
        .iter()
        .filter_map(|l| l.pin.strip_prefix("pods/"))
        .collect();
    println!(
        "\nenrolled pods ({}, by their sk_lookup link; namespace_pod)",
        enrolled.len()
    );
    for p in &enrolled {
        println!("  {p}");
    }
    for e in &inv.errors {
        println!("\ncannot read {e}");
    }
    println!(
        "\ndig deeper (run_time_ns and run_cnt show while statistics are on):\n  \
         bpftool prog show pinned {d}/prog_connect4\n  \
         bpftool map dump pinned {d}/enrolled_netns\n  \
         bpftool link show pinned {d}/link_cgroup_connect4\n  \
         bpftool cgroup tree\n  \
         bpftool prog profile pinned {d}/prog_sk_lookup duration 5 cycles instructions \
         (needs a bpftool built with clang skeletons; Debian 12's is not)"
    );
    Ok(())
}

/// Parses `90s`, `15m`, `24h`, `30d` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
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
enum BpfCommand {
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

const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/ztunnel";

#[derive(Parser)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config_dir", "kubernetes"])))]
struct RunArgs {
    /// Directory of Kubernetes-shaped YAML (Namespaces, Pods, Services, Istio policies).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster service account) instead of a directory.
    #[arg(long)]
    kubernetes: bool,
    /// With --kubernetes: reach the API through this kubeconfig's current context instead
    /// (outside a cluster).
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: only pods with this `spec.nodeName` are captured here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Pin directory on bpffs (one per node proxy).
    #[arg(long, default_value = DEFAULT_BPF_DIR)]
    bpf_dir: PathBuf,
    /// cgroup v2 directory to attach the connect programs to [default: the cgroup2 root].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// cgroup v2 directory the node's own processes (the kubelet) live below, where the
    /// program that recognises their connections to pods (probes) attaches [default: --cgroup].
    #[arg(long)]
    node_cgroup: Option<PathBuf>,
    /// Serve the `ztunnel-cni` plugin on this unix socket, so new pods are captured before
    /// they start (`ztunnel cni install` points the plugin here; conventionally
    /// /var/run/ztunnel/cni.sock). The node state file the plugin falls back on is written
    /// next to it. Without it, pods are enrolled when the configuration reports them.
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// How long a CNI ADD waits for a pod the configuration does not show yet before it fails
    /// (the kubelet then retries the sandbox).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    cni_pod_wait: Duration,
    /// Namespace label that enrols a namespace's pods, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=ambient", value_parser = EnrolmentPolicy::parse_label)]
    ambient_label: (String, String),
    /// Pod label that opts a pod out of capture, as key=value.
    #[arg(long, default_value = "istio.io/dataplane-mode=none", value_parser = EnrolmentPolicy::parse_label)]
    opt_out_label: (String, String),
    /// Istio's root namespace: PeerAuthentications there without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// SPIFFE trust domain of this mesh.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Directory of the embedded CA (see `ztunnel ca init`): workload certificates are issued
    /// in-process from its root. One of --ca-dir and --ca-address is required: there is no
    /// plaintext mode between nodes.
    #[arg(
        long,
        required_unless_present = "ca_address",
        conflicts_with = "ca_address"
    )]
    ca_dir: Option<PathBuf>,
    /// Address of an Istio-compatible CA (istiod, or `ztunnel ca serve`): host:port.
    #[arg(long, requires = "ca_root")]
    ca_address: Option<String>,
    /// The mesh root certificate (PEM): verifies the CA service and every peer.
    #[arg(long)]
    ca_root: Option<PathBuf>,
    /// File holding the bearer token sent to the CA (re-read on every request).
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
    /// Verify the CA service by this SPIFFE id instead of the host name dialled (`ztunnel ca
    /// serve` runs as spiffe://<trust-domain>/ns/istio-system/sa/ztunnel-ca).
    #[arg(long)]
    ca_identity: Option<SpiffeId>,
    /// Lifetime requested for workload certificates; they are renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_validity: Duration,
    /// Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Admin API (config dump, certificates, BPF state, log level). Keep it on loopback: it
    /// shows the whole configuration and changes the log level.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// On SIGTERM, how long open connections may go on (after the listeners close and a new
    /// proxy can take over) before they are reset.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Wait this long for a proxy that is shutting down to release the pin directory (the
    /// next proxy of a rolling restart). Without it, a busy directory is an error at once.
    #[arg(long, value_parser = parse_duration)]
    takeover_wait: Option<Duration>,
    /// Turn on the kernel's eBPF run statistics while the proxy runs (as
    /// `sysctl kernel.bpf_stats_enabled=1` does; costs a few ns per program run).
    #[arg(long)]
    bpf_stats: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => return policy_check(*args),
        Command::Run(args) => {
            let set_log_level = init_logging(args.log_format);
            run(*args, set_log_level)
        }
        Command::Cni { command } => cni_command(command),
        Command::Bpf {
            command: BpfCommand::Uninstall { bpf_dir },
        } => capture::uninstall(&bpf_dir),
        Command::Bpf {
            command: BpfCommand::Status { bpf_dir, output },
        } => bpf_status(&bpf_dir, output),
        Command::Ca {
            command:
                CaCommand::Init {
                    ca_dir,
                    trust_domain,
                    validity,
                    force,
                },
        } => CaFiles::init(&ca_dir, &trust_domain, validity, force)
            .map(|_| {
                println!(
                    "created a root CA for {trust_domain} in {}",
                    ca_dir.display()
                )
            })
            .with_context(|| format!("creating a CA in {}", ca_dir.display())),
        Command::Ca {
            command:
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
                },
        } => {
            let _ = init_logging(LogFormat::Text);
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "ztunnel failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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

/// Logs to stderr; returns how to change the filter at run time (the admin API's `/logging`).
fn init_logging(format: LogFormat) -> (String, admin::SetLogLevel) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
    let set: admin::SetLogLevel = Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive)
            .map_err(|e| format!("bad log filter {directive:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (initial, set)
}

/// The CA workload certificates come from, and the mesh roots.
fn certificate_provider(
    args: &RunArgs,
) -> Result<(Arc<dyn CertificateProvider>, Vec<CertificateDer<'static>>)> {
    if let Some(dir) = &args.ca_dir {
        let ca =
            CaFiles::load(dir).with_context(|| format!("loading the CA in {}", dir.display()))?;
        if ca.trust_domain() != args.trust_domain {
            anyhow::bail!(
                "the CA in {} is for trust domain {:?}, not {:?}",
                dir.display(),
                ca.trust_domain(),
                args.trust_domain
            );
        }
        let roots = ca.roots();
        return Ok((Arc::new(ca), roots));
    }
    let (Some(address), Some(root_file)) = (&args.ca_address, &args.ca_root) else {
        anyhow::bail!("pass --ca-dir, or --ca-address with --ca-root");
    };
    let root_pem = std::fs::read_to_string(root_file)
        .with_context(|| format!("reading {}", root_file.display()))?;
    let roots: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut root_pem.as_bytes())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", root_file.display()))?;
    if roots.is_empty() {
        anyhow::bail!("{} holds no certificate", root_file.display());
    }
    // istiod is checked by the host name dialled; our own CA service proves itself with its
    // SPIFFE id (its certificate carries no DNS name).
    let mut client = IstioCaClient::new(
        address,
        &root_pem,
        args.ca_token_file.clone(),
        Duration::from_secs(10),
    )?;
    if let Some(id) = &args.ca_identity {
        client = client.with_server_identity(id.clone());
    }
    Ok((Arc::new(client), roots))
}

/// Every proxied connection costs the proxy two descriptors (more with HBONE); the usual soft
/// limit of 1024 would cap a node at a few hundred connections, so take the hard limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(
                    from = soft,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
}

/// Where `run` reads the cluster from.
enum ConfigSource {
    Dir(PathBuf),
    Kubernetes(ApiAccess, PodNetnsFinder),
}

fn run(args: RunArgs, (log_level, set_log_level): (String, admin::SetLogLevel)) -> Result<()> {
    // Taken before any other thread exists: every thread starts in this (the node's) netns.
    let home = Arc::new(Netns::current().context("opening the node network namespace")?);
    raise_fd_limit();
    // Before any kernel state changes: a proxy that cannot get certificates must not capture.
    let (provider, roots) = certificate_provider(&args)?;
    let cgroup = match args.cgroup {
        Some(c) => c,
        None => capture::cgroup2_root()?,
    };
    let source = match args.config_dir.clone() {
        Some(dir) => ConfigSource::Dir(dir),
        None => ConfigSource::Kubernetes(
            {
                let access = ApiAccess::new(args.kubeconfig.clone());
                access.check()?; // before capture: a proxy that cannot read the cluster must not capture
                access
            },
            // Pods' cgroups are looked for in the hierarchy capture attaches to; our own
            // netns tells host-network processes apart.
            PodNetnsFinder::new(
                cgroup.clone(),
                NsId::of(std::path::Path::new("/proc/self/ns/net"))
                    .context("reading the node network namespace")?,
            ),
        ),
    };
    let bpf_dir = args.bpf_dir.clone();
    let node_netns_cookie = {
        let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .context("opening a socket in the node network namespace")?;
        ztunnel::netns::socket_netns_cookie(&probe)
            .context("reading the node network namespace cookie")?
    };
    // Every precondition is checked here, before anything is pinned; the pins come only once
    // the configuration loaded and every port is ours, so a failed start leaves no pins.
    let prepared = PreparedCapture::new(&CaptureOptions {
        bpf_dir: args.bpf_dir.clone(),
        node_cgroup: args.node_cgroup.clone().unwrap_or_else(|| cgroup.clone()),
        cgroup,
        node_netns_cookie,
        takeover_wait: args.takeover_wait,
    })?;
    let policy = EnrolmentPolicy {
        namespace_label: args.ambient_label,
        pod_opt_out_label: args.opt_out_label,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async move {
            let settings = MeshSettings {
                root_namespace: args.root_namespace.clone(),
            };
            let (mut config, _watch) = match source {
                ConfigSource::Dir(dir) => config::watch(dir.clone(), settings)
                    .with_context(|| format!("loading {}", dir.display()))?,
                ConfigSource::Kubernetes(access, finder) => {
                    let client = access.client().await?;
                    info!(node = %args.node_name, "waiting for the first complete list of the Kubernetes API");
                    let mut opts = KubernetesOptions::new(args.node_name.clone(), settings, finder);
                    opts.enrolment = policy.clone();
                    config::kubernetes::watch(client, opts).await?
                }
            };
            let bound = [
                admin::bind(Endpoint::Metrics, args.metrics_addr).await?,
                admin::bind(Endpoint::Readiness, args.readiness_addr).await?,
                admin::bind(Endpoint::Admin, args.admin_addr).await?,
            ];
            let (cni_tx, cni_rx) = tokio::sync::mpsc::channel(64);
            let mut cni_dispatch = cni::dispatch::CniDispatch::new(
                args.cni_socket.is_some().then_some(cni_rx),
                args.cni_pod_wait,
                args.cni_socket.as_deref().map(cni::node_state::path_for_socket),
            );
            // The plugin's fallback first, then the socket (plugins that connect now wait
            // for the answer until the proxy is ready).
            cni_dispatch.write_state(&args.node_name, &policy, &config.borrow());
            let cni_server = match &args.cni_socket {
                Some(path) => Some(cni::server::CniServer::bind(path)?),
                None => None,
            };
            let capture = prepared.install()?;
            // Held for the process's life: statistics stay on while the descriptor is open.
            let _bpf_stats = if args.bpf_stats {
                Some(
                    aya::sys::enable_stats(aya::sys::Stats::RunTime)
                        .context("turning on eBPF run statistics")?,
                )
            } else {
                None
            };
            let metrics = Arc::new(Metrics::default());
            let certs = Arc::new(CertificateCache::new(
                provider,
                roots,
                CacheOptions {
                    validity: args.cert_validity,
                    ..CacheOptions::default()
                },
            ));
            let proxy = Proxy::new(ProxyOptions {
                home: home.clone(),
                orig_dst: capture.orig_dst_table(),
                node_connections: capture.node_connections(),
                config: config.clone(),
                node: args.node_name.clone(),
                policy: policy.clone(),
                mesh: Mesh::new(args.trust_domain.clone(), certs, metrics.clone(), home.clone()),
                metrics: metrics.clone(),
            });
            let ready = Arc::new(AtomicBool::new(false));
            let view = Arc::new(ProxyView {
                proxy: proxy.clone(),
                bpf_dir,
                bpf_stats_held: args.bpf_stats,
            });
            let state = Arc::new(AdminState {
                registry: admin::metrics::registry(&metrics, Sampled(view.clone())),
                ready: ready.clone(),
                view,
                set_log_level: Some(set_log_level),
                log_level: std::sync::Mutex::new(log_level),
            });
            let endpoints = bound.map(|b| admin::serve_on(b, state.clone()));

            let mut enroller = Enroller::new(capture, proxy, home, args.node_name.clone(), policy);
            if let Some(socket) = &args.cni_socket {
                // Sandboxes reported to a previous proxy keep their capture across the restart.
                *enroller.cni_pods() =
                    cni::registry::CniPods::persistent(cni::registry::store_for_socket(socket));
            }
            let snapshot = config.borrow_and_update().clone();
            enroller.reconcile(&snapshot);
            if let Some(server) = &cni_server {
                server.start(cni_tx)?;
            }
            ready.store(true, Ordering::Release);
            info!(node = %args.node_name, generation = snapshot.generation, "proxy ready");

            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut retry = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tokio::select! {
                    changed = config.changed() => {
                        if changed.is_err() {
                            anyhow::bail!("configuration watcher stopped");
                        }
                        let snapshot = config.borrow_and_update().clone();
                        enroller.reconcile(&snapshot);
                        cni_dispatch.after_snapshot(&mut enroller, &snapshot);
                        info!(generation = snapshot.generation, "configuration applied");
                    }
                    event = cni_dispatch.next() => match event {
                        cni::dispatch::CniEvent::Call(call) => {
                            let snapshot = config.borrow().clone();
                            cni_dispatch.handle(call, &mut enroller, &snapshot);
                        }
                        cni::dispatch::CniEvent::Expired => cni_dispatch.expire(&mut enroller),
                    },
                    _ = retry.tick(), if enroller.has_failures() => {
                        let snapshot = config.borrow().clone();
                        enroller.reconcile(&snapshot);
                    }
                    _ = terminate.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
            // Hand over: stop listening and release the pins and ports at once, so the next
            // proxy can take over while this one drains. Pins stay: enrolled pods' new
            // connections fail closed until a proxy listens again.
            ready.store(false, Ordering::Release);
            // New sandboxes now meet no proxy: the plugin falls back on the node state file
            // (pods of captured namespaces wait for the next proxy).
            drop(cni_server);
            drop(cni_dispatch);
            enroller.hand_over();
            for e in endpoints {
                e.abort();
            }
            let open = metrics.active_connections.get();
            info!(
                open_connections = open,
                drain_timeout_s = args.drain_timeout.as_secs(),
                "shutting down: draining open connections; capture stays in force"
            );
            let deadline = tokio::time::Instant::now() + args.drain_timeout;
            while metrics.active_connections.get() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            info!(
                reset_connections = metrics.active_connections.get(),
                "stopped"
            );
            Ok(())
        })
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
