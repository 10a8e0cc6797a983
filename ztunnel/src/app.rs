//! The node proxy daemon, `ztunnel run`: the wiring of every part (certificates, capture, the
//! configuration source, the proxy, enrolment, the admin endpoints), the run loop that applies
//! each new configuration, and the drain at SIGTERM.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use rustls::pki_types::CertificateDer;
use tracing::info;

use crate::{
    admin::{self, scrape::Sampled, AdminState, Endpoint, ProxyView},
    capture::{self, CaptureOptions, PreparedCapture},
    cli::RunArgs,
    cni,
    config::{
        self,
        kubernetes::KubernetesOptions,
        pod_netns::{NsId, PodNetnsFinder},
    },
    enrolment::{self, Enroller},
    identity::{
        istio_ca::IstioCaClient, CaFiles, CacheOptions, CertificateCache, CertificateProvider,
    },
    kubernetes::ApiAccess,
    logging::SetLogLevel,
    metrics::Metrics,
    netns::Netns,
    proxy::{request::RequestSettings, Mesh, Proxy, ProxyOptions},
    state::{EnrolmentPolicy, MeshSettings},
};

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

/// Runs the node proxy until SIGTERM or Ctrl-C, then hands over and drains. `logging` is the
/// filter in force and how to change it (for the admin API).
pub fn run(args: RunArgs, (log_level, set_log_level): (String, SetLogLevel)) -> Result<()> {
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
        crate::netns::socket_netns_cookie(&probe)
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
        fast_path: args.fast_path.on(),
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
            let metrics = Arc::new(Metrics::default());
            let (mut config, _watch) = match source {
                ConfigSource::Dir(dir) => config::watch(dir.clone(), settings, metrics.clone())
                    .with_context(|| format!("loading {}", dir.display()))?,
                ConfigSource::Kubernetes(access, finder) => {
                    let client = access.client().await?;
                    info!(node = %args.node_name, "waiting for the first complete list of the Kubernetes API");
                    let mut opts = KubernetesOptions::new(args.node_name.clone(), settings, finder);
                    opts.enrolment = policy.clone();
                    config::kubernetes::watch(client, opts, metrics.clone()).await?
                }
            };
            let bound = [
                admin::bind(Endpoint::Metrics, args.metrics_addr).await?,
                admin::bind(Endpoint::Readiness, args.readiness_addr).await?,
                admin::bind(Endpoint::Admin, args.admin_addr).await?,
            ];
            let (cni_tx, cni_rx) = tokio::sync::mpsc::channel(64);
            let mut cni_dispatch = enrolment::cni::CniDispatch::new(
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
                deliveries: capture.inbound_deliveries(),
                config: config.clone(),
                node: args.node_name.clone(),
                policy: policy.clone(),
                mesh: Mesh::new(
                    args.trust_domain.clone(),
                    certs,
                    metrics.clone(),
                    home.clone(),
                    args.hbone.limits(),
                ),
                metrics: metrics.clone(),
                requests: RequestSettings {
                    request_metrics: args.request_metrics.on(),
                    access_log: args.access_log.on(),
                    access_log_sample: args.access_log_sample,
                    cluster_domain: args.cluster_domain.clone(),
                },
            });
            let ready = Arc::new(AtomicBool::new(false));
            let view = Arc::new(ProxyView {
                proxy: proxy.clone(),
                bpf_dir,
                bpf_stats_held: args.bpf_stats,
                fast_path: Some((capture.fast_path_stats(), args.fast_path.on())),
            });
            let state = Arc::new(AdminState {
                registry: admin::scrape::registry(&metrics, Sampled(view.clone())),
                ready: ready.clone(),
                view,
                set_log_level: Some(set_log_level),
                log_level: std::sync::Mutex::new(log_level),
            });
            let endpoints = bound.map(|b| admin::serve_on(b, state.clone()));
            tokio::spawn(crate::memory::return_freed_memory());
            #[cfg(feature = "alloc-census")]
            tokio::spawn(crate::memory::census::write_while_enabled());

            let mut enroller = Enroller::new(capture, proxy, home, args.node_name.clone(), policy)
                .with_proc_sys(args.proc_sys.clone());
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
                        enrolment::cni::CniEvent::Call(call) => {
                            let snapshot = config.borrow().clone();
                            cni_dispatch.handle(call, &mut enroller, &snapshot);
                        }
                        enrolment::cni::CniEvent::Expired => cni_dispatch.expire(&mut enroller),
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
