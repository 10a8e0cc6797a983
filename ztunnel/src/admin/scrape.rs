//! What the proxy's metrics cannot count as they happen, read when scraped: the HBONE pool,
//! the certificates held, the configuration in force, the enrolled pods and the kernel's
//! per-program statistics.
use std::{sync::Arc, time::UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::ProxyView;
use crate::metrics::Metrics;

/// Values owned by other parts (the pool, certificates, configuration, pins), read at scrape
/// time.
#[derive(Debug)]
pub struct Sampled(pub Arc<ProxyView>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Sampled {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let view = &self.0;
        let proxy = &view.proxy;
        let pool = proxy.mesh().pool.stats();
        gauge(
            &mut e,
            "ztunnel_hbone_pool_connections",
            "HBONE connections in the pool",
            pool.connections as i64,
        )?;
        gauge(
            &mut e,
            "ztunnel_hbone_active_streams",
            "CONNECT streams open on pooled HBONE connections",
            pool.active_streams as i64,
        )?;
        counter(
            &mut e,
            "ztunnel_hbone_connections_opened",
            "HBONE connections opened by the pool",
            pool.connections_opened,
        )?;
        counter(
            &mut e,
            "ztunnel_hbone_streams_opened",
            "CONNECT streams opened on pooled HBONE connections",
            pool.streams_opened,
        )?;

        let certs = proxy.mesh().certs.current();
        let expiry = ConstGauge::new(0i64);
        let mut m = e.encode_descriptor(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "When each workload certificate expires (Unix time)",
            None,
            expiry.metric_type(),
        )?;
        for cert in &certs {
            let at = cert
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            ConstGauge::new(at).encode(m.encode_family(&IdentityLabels {
                identity: cert.id.to_string(),
            })?)?;
        }
        counter(
            &mut e,
            "ztunnel_certificates_issued",
            "Certificates obtained from the CA (first issues and rotations)",
            proxy.mesh().certs.issued(),
        )?;
        counter(
            &mut e,
            "ztunnel_certificate_rotation_failures",
            "Failed background certificate renewals",
            proxy.mesh().certs.rotation_failures(),
        )?;

        let snapshot = proxy.snapshot();
        gauge(
            &mut e,
            "ztunnel_config_generation",
            "Generation of the configuration in force (1 = the first load)",
            snapshot.generation as i64,
        )?;
        counter(
            &mut e,
            "ztunnel_config_reloads",
            "Configuration versions applied after the first load",
            snapshot.generation.saturating_sub(1),
        )?;
        gauge(
            &mut e,
            "ztunnel_config_problems",
            "Problems found in the configuration in force (see the logs)",
            snapshot.problems.len() as i64,
        )?;
        gauge(
            &mut e,
            "ztunnel_enrolled_pods",
            "Pods whose traffic this proxy captures",
            proxy.local_workloads().len() as i64,
        )?;

        if let Some((stats, on)) = &view.fast_path {
            gauge(
                &mut e,
                "ztunnel_fast_path_enabled",
                "Whether new app-proxy connections take the same-netns fast path (--fast-path)",
                *on as i64,
            )?;
            // Counted by the kernel programs; a read error leaves them out of this scrape.
            if let Ok(v) = stats.read() {
                use ztunnel_common::fast_path_stats as s;
                for (i, name, help) in [
                    (s::SOCKETS, "sockets", "App and proxy sockets that joined the fast path"),
                    (s::REDIRECTED_MSGS, "redirected_messages",
                        "Messages moved from one socket's send to its peer's receive queue"),
                    (s::REDIRECTED_BYTES, "redirected_bytes", "Bytes of those messages"),
                    (s::TCP_MSGS, "tcp_messages",
                        "Messages of fast-path sockets that went through loopback TCP"),
                    (s::JOIN_FAILED, "join_failures",
                        "Sockets that qualified but could not join (a map full)"),
                    (s::ACTIVE_TCP, "active_tcp",
                        "Connections whose opener's first message found no peer yet: that direction stays on TCP"),
                ] {
                    counter(&mut e, &format!("ztunnel_fast_path_{name}"), help, v[i as usize])?;
                }
            }
        }

        // Per pinned program, as the kernel counts it (only while BPF statistics are on).
        let programs = crate::capture::inventory::programs(&view.bpf_dir);
        let runs = ConstCounter::new(0u64);
        let mut m = e.encode_descriptor(
            "ztunnel_bpf_program_runs",
            "Runs of each pinned eBPF program (needs kernel.bpf_stats_enabled=1)",
            None,
            runs.metric_type(),
        )?;
        for p in &programs {
            ConstCounter::new(p.run_count).encode(m.encode_family(&ProgramLabels {
                program: p.pin.clone(),
            })?)?;
        }
        let mut m = e.encode_descriptor(
            "ztunnel_bpf_program_run_time_seconds",
            "Time spent in each pinned eBPF program (needs kernel.bpf_stats_enabled=1)",
            None,
            runs.metric_type(),
        )?;
        for p in &programs {
            ConstCounter::new(p.run_time.as_secs_f64()).encode(m.encode_family(
                &ProgramLabels {
                    program: p.pin.clone(),
                },
            )?)?;
        }
        gauge(
            &mut e,
            "ztunnel_bpf_stats_enabled",
            "Whether the kernel collects eBPF run statistics (kernel.bpf_stats_enabled)",
            (view.bpf_stats_held || crate::capture::inventory::stats_enabled()) as i64,
        )
    }
}

/// The registry with every metric, ready to serve.
pub fn registry(metrics: &Metrics, sampled: Sampled) -> Registry {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(sampled));
    registry
}
