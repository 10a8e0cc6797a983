//! The local cluster's Service plumbing (`cargo xtask cluster services`, run by `up` as a
//! daemon in the root netns): there is no kube-proxy and no cluster DNS, so this process
//!
//! * answers DNS on the cluster DNS address for `<service>.<namespace>.svc.cluster.local`
//!   (A records of ClusterIPs; every other name is NXDOMAIN, nothing is forwarded off the
//!   machine);
//! * listens on every Service's ClusterIP and TCP port (the root netns has a `local` route for
//!   the service range, so any address in it can be bound) and relays each connection to a
//!   ready endpoint, round robin; `kubernetes:443` goes to the loopback API server.
//!
//! Enrolled pods never reach it: the node proxy captures their connections to ClusterIPs and
//! picks the endpoint itself. It serves what has no mesh in front: the node proxies' calls to
//! the CA Service, unenrolled pods, in-cluster clients of the API. Services and EndpointSlices
//! are polled with kubectl every second.
use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::layout::{self, API_PORT, API_SERVICE_IP, CLUSTER_DOMAIN, DNS_SERVICE_IP};

type Backends = Arc<Mutex<Vec<SocketAddr>>>;

#[derive(Default)]
struct Table {
    /// (ClusterIP, port) → its current endpoints.
    listeners: HashMap<SocketAddrV4, Backends>,
    /// `name.namespace.svc.cluster.local` → ClusterIP.
    names: HashMap<String, Ipv4Addr>,
}

pub fn serve(kubectl: &std::path::Path) -> Result<()> {
    let table = Arc::new(Mutex::new(Table::default()));
    let api: SocketAddr = SocketAddr::from(([127, 0, 0, 1], API_PORT));
    let api_vip = SocketAddrV4::new(API_SERVICE_IP.parse()?, 443);
    listen(&table, api_vip, vec![api])?;
    table.lock().unwrap().names.insert(
        format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        *api_vip.ip(),
    );
    let dns = UdpSocket::bind((DNS_SERVICE_IP, 53)).context("binding the cluster DNS")?;
    let t = table.clone();
    thread::spawn(move || dns_loop(&dns, &t));
    eprintln!("services: serving {api_vip} and DNS on {DNS_SERVICE_IP}:53");
    loop {
        match poll(kubectl) {
            Ok(services) => apply(&table, services, api),
            Err(e) => eprintln!("services: {e:#}"),
        }
        thread::sleep(Duration::from_secs(1));
    }
}

struct Service {
    name: String,
    vip: SocketAddrV4,
    backends: Vec<SocketAddr>,
}

fn poll(kubectl: &std::path::Path) -> Result<Vec<Service>> {
    let out = layout::kubectl(kubectl)
        .args(["get", "services,endpointslices", "-A", "-o", "json"])
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        anyhow::bail!("kubectl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let list: Value = serde_json::from_slice(&out.stdout)?;
    Ok(services_of(&list))
}

/// Services with a ClusterIP, one entry per TCP port, with the ready endpoints of their
/// EndpointSlices.
fn services_of(list: &Value) -> Vec<Service> {
    let items = list["items"].as_array().cloned().unwrap_or_default();
    let mut found = Vec::new();
    for svc in items.iter().filter(|i| i["kind"] == "Service") {
        let (ns, name) = (
            svc["metadata"]["namespace"].as_str().unwrap_or(""),
            svc["metadata"]["name"].as_str().unwrap_or(""),
        );
        let Some(ip) = svc["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let slices: Vec<&Value> = items
            .iter()
            .filter(|i| {
                i["kind"] == "EndpointSlice"
                    && i["metadata"]["namespace"] == ns
                    && i["metadata"]["labels"]["kubernetes.io/service-name"] == name
            })
            .collect();
        for port in svc["spec"]["ports"].as_array().into_iter().flatten() {
            if port["protocol"].as_str().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Some(number) = port["port"].as_u64() else {
                continue;
            };
            let port_name = port["name"].as_str().unwrap_or("");
            let mut backends = Vec::new();
            for slice in &slices {
                let target = slice["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"].as_str().unwrap_or("") == port_name)
                    .and_then(|p| p["port"].as_u64());
                let Some(target) = target else { continue };
                for ep in slice["endpoints"].as_array().into_iter().flatten() {
                    if ep["conditions"]["ready"] == false {
                        continue;
                    }
                    for addr in ep["addresses"].as_array().into_iter().flatten() {
                        if let Some(a) = addr.as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()) {
                            backends.push(SocketAddr::from((a, target as u16)));
                        }
                    }
                }
            }
            backends.sort();
            found.push(Service {
                name: format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"),
                vip: SocketAddrV4::new(ip, number as u16),
                backends,
            });
        }
    }
    found
}

fn apply(table: &Arc<Mutex<Table>>, services: Vec<Service>, api: SocketAddr) {
    let mut names = HashMap::new();
    for s in services {
        names.insert(s.name.clone(), *s.vip.ip());
        // The API server has no endpoints (no endpoint reconciler): it stays on loopback.
        let backends = if s.name.starts_with("kubernetes.default.") {
            vec![api]
        } else {
            s.backends
        };
        let known = table.lock().unwrap().listeners.get(&s.vip).cloned();
        match known {
            Some(b) => *b.lock().unwrap() = backends,
            None => {
                if let Err(e) = listen(table, s.vip, backends) {
                    eprintln!("services: {} ({}): {e:#}", s.name, s.vip);
                }
            }
        }
    }
    table.lock().unwrap().names = names;
}

fn listen(table: &Arc<Mutex<Table>>, vip: SocketAddrV4, backends: Vec<SocketAddr>) -> Result<()> {
    let listener = TcpListener::bind(vip).with_context(|| format!("binding {vip}"))?;
    let backends: Backends = Arc::new(Mutex::new(backends));
    table
        .lock()
        .unwrap()
        .listeners
        .insert(vip, backends.clone());
    let next = Arc::new(AtomicUsize::new(0));
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let pick = {
                let b = backends.lock().unwrap();
                (!b.is_empty()).then(|| b[next.fetch_add(1, Ordering::Relaxed) % b.len()])
            };
            match pick {
                Some(to) => {
                    thread::spawn(move || relay(conn, to));
                }
                // No ready endpoint: refuse, as kube-proxy's reject rule does.
                None => drop(conn),
            }
        }
    });
    Ok(())
}

fn relay(client: TcpStream, to: SocketAddr) {
    let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return;
    };
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let a = thread::spawn(move || pipe(client, upstream));
    pipe(u2, c2);
    let _ = a.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn dns_loop(sock: &UdpSocket, table: &Arc<Mutex<Table>>) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let names = table.lock().unwrap().names.clone();
        if let Some(reply) = dns_answer(&buf[..n], |name| names.get(name).copied()) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}

/// The answer to one DNS query: an A record for a known name, no record (NOERROR) for other
/// types of a known name, NXDOMAIN otherwise. `None` for what is not a standard query.
pub fn dns_answer(query: &[u8], lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question_end = pos + 4;
    query.get(..question_end)?;
    let name = labels.join(".");
    let ip = lookup(&name);
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]);
    // QR, the query's RD, RA; rcode 3 (NXDOMAIN) for an unknown name.
    reply.push(0x80 | (query[2] & 0x01));
    reply.push(0x80 | if ip.is_none() { 3 } else { 0 });
    let answers: u16 = (ip.is_some() && qtype == 1).into();
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let (Some(ip), 1) = (ip, answers) {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn known_names_get_their_cluster_ip_and_others_nxdomain() {
        let lookup =
            |n: &str| (n == "web.shop.svc.cluster.local").then(|| Ipv4Addr::new(10, 96, 0, 7));
        let a = dns_answer(&query("Web.shop.svc.cluster.local", 1), lookup).unwrap();
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1);
        assert_eq!(&a[a.len() - 4..], &[10, 96, 0, 7]);
        let aaaa = dns_answer(&query("web.shop.svc.cluster.local", 28), lookup).unwrap();
        assert_eq!((aaaa[3] & 0x0f, aaaa[7]), (0, 0));
        let nx = dns_answer(&query("example.com", 1), lookup).unwrap();
        assert_eq!((nx[3] & 0x0f, nx[7]), (3, 0));
        assert!(dns_answer(&[0; 5], lookup).is_none());
    }

    #[test]
    fn services_take_ready_endpoints_by_port_name() {
        let list = serde_json::json!({"items": [
            {"kind": "Service", "metadata": {"namespace": "ns", "name": "ca"},
             "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "grpc", "port": 15012, "protocol": "TCP"}]}},
            {"kind": "EndpointSlice", "metadata": {"namespace": "ns", "name": "ca-x",
              "labels": {"kubernetes.io/service-name": "ca"}},
             "ports": [{"name": "grpc", "port": 15012}],
             "endpoints": [
                {"addresses": ["10.88.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.88.2.5"], "conditions": {"ready": false}}]},
            {"kind": "Service", "metadata": {"namespace": "ns", "name": "headless"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}
        ]});
        let s = services_of(&list);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "ca.ns.svc.cluster.local");
        assert_eq!(s[0].vip, "10.96.0.9:15012".parse().unwrap());
        assert_eq!(
            s[0].backends,
            ["10.88.1.5:15012".parse::<SocketAddr>().unwrap()]
        );
    }
}
