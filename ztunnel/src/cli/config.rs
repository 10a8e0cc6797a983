//! `ztunnel config`: a node proxy's live view (the workloads and Services it knows, the
//! policies in force, the certificates it holds, the connections open now), read from its admin
//! API (`/config_dump`, `/connections`), as
//! aligned tables for people or JSON / YAML for programs: what `istioctl ztunnel-config`
//! answers for Istio's ztunnel.
use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::ValueEnum;
use serde_json::Value;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Every pod the proxy knows, and whether it is enrolled on this node.
    Workloads,
    /// Services: cluster IPs, ports, selector.
    Services,
    /// PeerAuthentication, AuthorizationPolicy and RequestAuthentication in force.
    Policies,
    /// The workload certificates the proxy holds (never a key).
    Certificates,
    /// Connections open now: both ends with their identities, bytes so far, age.
    Connections,
    /// All of the above.
    All,
}

/// How to show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// Prints `section` of the proxy at `admin`. An admin API that cannot be reached is one line
/// on stderr and exit code 2; a bad answer is an error (exit 1).
pub fn run(section: Section, output: Format, admin: &str) -> ExitCode {
    let dump = match fetch_for(admin, section) {
        Ok(Fetched::Body(v)) => v,
        Ok(Fetched::Unreachable(why)) => {
            eprintln!(
                "ztunnel config: cannot reach the admin API at {admin}: {why} (is the node proxy \
                 running? --admin HOST:PORT names another)"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ztunnel config: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match render(&dump, section, output) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztunnel config: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Fetched {
    Body(Value),
    /// Nothing answered (refused, unroutable, timed out).
    Unreachable(String),
}

/// What `section` shows, in one document: the configuration dump, with the open connections
/// (`/connections`) under `connections` where the section needs them.
fn fetch_for(admin: &str, section: Section) -> Result<Fetched> {
    let mut dump = match section {
        Section::Connections => Value::Object(Default::default()),
        _ => match fetch(admin, "/config_dump")? {
            Fetched::Body(v) => v,
            unreachable => return Ok(unreachable),
        },
    };
    if parts(section).contains(&"connections") {
        match fetch(admin, "/connections")? {
            Fetched::Body(mut v) => dump["connections"] = v["connections"].take(),
            unreachable => return Ok(unreachable),
        }
    }
    Ok(Fetched::Body(dump))
}

/// `GET path` from the admin API (HTTP/1.0: the answer ends with the connection).
fn fetch(admin: &str, path: &str) -> Result<Fetched> {
    let addrs: Vec<_> = match admin.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Ok(Fetched::Unreachable(e.to_string())),
    };
    let mut last = String::from("no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let Some(mut s) = stream else {
        return Ok(Fetched::Unreachable(last));
    };
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {admin}\r\nAccept: application/json\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading {path} from {admin}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{admin} answered {path} with no HTTP response"))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        bail!(
            "{admin} answered {path} with status {status}: {}",
            body.trim()
        );
    }
    let v = serde_json::from_str(body)
        .with_context(|| format!("{admin} answered {path} with something not JSON"))?;
    Ok(Fetched::Body(v))
}

/// The parts of the dump a section shows, keyed as in JSON / YAML output.
fn parts(section: Section) -> &'static [&'static str] {
    match section {
        Section::Workloads => &["workloads"],
        Section::Services => &["services"],
        Section::Policies => &["policies"],
        Section::Certificates => &["certificates"],
        Section::Connections => &["connections"],
        Section::All => &[
            "workloads",
            "services",
            "policies",
            "certificates",
            "connections",
        ],
    }
}

fn render(dump: &Value, section: Section, output: Format) -> Result<String> {
    let keys = parts(section);
    if output != Format::Table {
        let mut doc = serde_json::Map::new();
        for k in keys {
            doc.insert(k.to_string(), part(dump, k));
        }
        // One section alone is its list; `all` is an object of them.
        let v = match keys {
            [one] => doc.remove(*one).unwrap_or(Value::Null),
            _ => Value::Object(doc),
        };
        return Ok(match output {
            Format::Json => serde_json::to_string_pretty(&v)? + "\n",
            _ => serde_yaml::to_string(&v)?,
        });
    }
    let tables: Vec<String> = keys.iter().map(|k| table_of(dump, k)).collect();
    Ok(tables.join("\n"))
}

/// The dump's lists under the names this command gives them; a workload is marked with
/// whether it is enrolled on this node.
fn part(dump: &Value, key: &str) -> Value {
    match key {
        "workloads" => dump["pods"].clone(),
        "services" => dump["services"].clone(),
        "connections" => dump["connections"].clone(),
        "certificates" => Value::Array(
            list(&dump["certificates"])
                .iter()
                .map(|c| {
                    // The chain is long and public; the table and the summary do not need it.
                    let mut c = c.clone();
                    if let Some(o) = c.as_object_mut() {
                        o.remove("chain_pem");
                    }
                    c
                })
                .collect(),
        ),
        _ => {
            let mut out = Vec::new();
            for (kind, field) in POLICY_KINDS {
                for p in list(&dump[*field]) {
                    let mut p = p.clone();
                    if let Some(o) = p.as_object_mut() {
                        o.insert("kind".into(), Value::from(*kind));
                    }
                    out.push(p);
                }
            }
            Value::Array(out)
        }
    }
}

const POLICY_KINDS: &[(&str, &str)] = &[
    ("PeerAuthentication", "peer_authentications"),
    ("AuthorizationPolicy", "authorization_policies"),
    ("RequestAuthentication", "request_authentications"),
];

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A field as a table cell: strings bare, lists joined with commas, maps as `k=v`, nothing
/// as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn table_of(dump: &Value, key: &str) -> String {
    let rows = part(dump, key);
    let rows = list(&rows);
    match key {
        "workloads" => table(
            &[
                "NAMESPACE",
                "POD NAME",
                "ADDRESS",
                "NODE",
                "SERVICE ACCOUNT",
                "ENROLLED HERE",
            ],
            rows.iter().map(|p| {
                let (ns, name) = split_name(&p["workload"]);
                vec![
                    ns,
                    name,
                    cell(&p["ips"]),
                    cell(&p["node"]),
                    cell(&p["service_account"]),
                    if p["enrolled_here"] == true {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                ]
            }),
        ),
        "services" => table(
            &[
                "NAMESPACE",
                "SERVICE NAME",
                "CLUSTER IP",
                "PORTS",
                "SELECTOR",
            ],
            rows.iter().map(|s| {
                let (ns, name) = split_name(&s["service"]);
                vec![
                    ns,
                    name,
                    cell(&s["vips"]),
                    cell(&s["ports"]),
                    cell(&s["selector"]),
                ]
            }),
        ),
        "certificates" => table(
            &["IDENTITY", "NOT AFTER", "EXPIRES IN", "STATE"],
            rows.iter().map(|c| {
                let left = c["expires_in_seconds"].as_u64().unwrap_or(0);
                vec![
                    cell(&c["identity"]),
                    c["not_after"]
                        .as_u64()
                        .map_or_else(|| cell(&c["not_after"]), utc),
                    human(left),
                    if left > 0 { "valid" } else { "expired" }.into(),
                ]
            }),
        ),
        "connections" => table(
            &[
                "WORKLOAD",
                "DIRECTION",
                "TRANSPORT",
                "SOURCE",
                "SOURCE IDENTITY",
                "DESTINATION",
                "DESTINATION IDENTITY",
                "SENT",
                "RECEIVED",
                "AGE",
            ],
            rows.iter().map(|c| {
                // An outbound HBONE connection has no source address of its own: its workload.
                let source = match &c["src_addr"] {
                    Value::Null => &c["src_workload"],
                    addr => addr,
                };
                vec![
                    cell(&c["workload"]),
                    cell(&c["direction"]),
                    cell(&c["transport"]),
                    cell(source),
                    cell(&c["src_identity"]),
                    cell(&c["dst_addr"]),
                    cell(&c["dst_identity"]),
                    cell(&c["bytes_sent"]),
                    cell(&c["bytes_received"]),
                    human(c["age_ms"].as_u64().unwrap_or(0) / 1000),
                ]
            }),
        ),
        _ => table(
            &[
                "KIND",
                "NAMESPACE",
                "NAME",
                "ACTION",
                "TARGET",
                "RULES",
                "SOURCE",
            ],
            rows.iter().map(|p| {
                let (ns, name) = split_name(&p["policy"]);
                vec![
                    cell(&p["kind"]),
                    ns,
                    name,
                    cell(&p["action"]),
                    cell(&p["target"]),
                    cell(&p["rules"]),
                    cell(&p["origin"]),
                ]
            }),
        ),
    }
}

/// `namespace/name` as its two cells.
fn split_name(v: &Value) -> (String, String) {
    let s = v.as_str().unwrap_or("-");
    match s.split_once('/') {
        Some((ns, name)) => (ns.into(), name.into()),
        None => ("-".into(), s.into()),
    }
}

/// Unix seconds as `2026-12-02T15:29:00Z`.
fn utc(unix: u64) -> String {
    let (days, rest) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, sec) = (rest / 3_600, rest / 60 % 60, rest % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}Z")
}

/// `3d4h`, `5h12m`, `42s`.
fn human(seconds: u64) -> String {
    let (d, h, m) = (seconds / 86_400, seconds / 3_600 % 24, seconds / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, m) => format!("{m}m{}s", seconds % 60),
        (0, h, m) => format!("{h}h{m}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// Columns as wide as their widest cell, separated by two spaces, no trailing blanks.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; headers.len()];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dump() -> Value {
        json!({
            "pods": [
                {"workload": "shop/web-1", "ips": ["10.2.0.3"], "node": "node2",
                 "service_account": "web", "enrolled_here": true},
                {"workload": "default/sleep", "ips": ["10.1.0.9"], "node": null,
                 "service_account": "default", "enrolled_here": false},
            ],
            "services": [{"service": "shop/web", "vips": ["10.96.0.10"], "ports": [80, 81],
                          "selector": {"app": "web"}}],
            "authorization_policies": [{"policy": "shop/web-callers", "action": "ALLOW",
                "target": "Selector", "rules": 2, "origin": "web.yaml:1"}],
            "peer_authentications": [{"policy": "istio-system/default", "origin": "pa.yaml:3"}],
            "request_authentications": [],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web",
                "not_after": 1_800_000_000u64, "expires_in_seconds": 90_061, "chain_pem": ["x"]}],
            "connections": [
                {"workload": "shop/web", "direction": "inbound", "transport": "hbone",
                 "src_addr": "10.1.0.2:40000", "src_workload": "shop/client",
                 "src_identity": "spiffe://cluster.local/ns/shop/sa/client",
                 "dst_addr": "10.2.0.3:7000",
                 "dst_identity": "spiffe://cluster.local/ns/shop/sa/web",
                 "bytes_sent": 12, "bytes_received": 7, "age_ms": 63_500},
                {"workload": "shop/client", "direction": "outbound", "transport": "passthrough",
                 "src_addr": null, "src_workload": "shop/client", "src_identity": null,
                 "dst_addr": "192.0.2.1:443", "dst_identity": null,
                 "bytes_sent": 0, "bytes_received": 0, "age_ms": 900},
            ],
        })
    }

    #[test]
    fn connections_show_both_identities_bytes_and_age() {
        let t = render(&dump(), Section::Connections, Format::Table).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        // Aligned: every column of a row starts where its header does.
        for (header, value) in [
            ("SOURCE IDENTITY", "spiffe://"),
            ("SENT", "12"),
            ("AGE", "1m3s"),
        ] {
            let at = lines[0].find(header).unwrap();
            assert!(lines[1][at..].starts_with(value), "{header} in\n{t}");
        }
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "shop/web",
                "inbound",
                "hbone",
                "10.1.0.2:40000",
                "spiffe://cluster.local/ns/shop/sa/client",
                "10.2.0.3:7000",
                "spiffe://cluster.local/ns/shop/sa/web",
                "12",
                "7",
                "1m3s"
            ],
            "{t}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "shop/client",
                "outbound",
                "passthrough",
                "shop/client",
                "-",
                "192.0.2.1:443",
                "-",
                "0",
                "0",
                "0s"
            ],
            "{t}"
        );
        let v: Value =
            serde_json::from_str(&render(&dump(), Section::Connections, Format::Json).unwrap())
                .unwrap();
        assert_eq!(v[0]["bytes_sent"], 12);
        let all = render(&dump(), Section::All, Format::Table).unwrap();
        assert!(all.contains("DESTINATION IDENTITY"), "{all}");
    }

    #[test]
    fn tables_are_aligned_and_say_what_is_missing() {
        let t = render(&dump(), Section::Workloads, Format::Table).unwrap();
        assert_eq!(
            t,
            "NAMESPACE  POD NAME  ADDRESS   NODE   SERVICE ACCOUNT  ENROLLED HERE\n\
             shop       web-1     10.2.0.3  node2  web              yes\n\
             default    sleep     10.1.0.9  -      default          no\n"
        );
        let t = render(&dump(), Section::Policies, Format::Table).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[1].starts_with("PeerAuthentication   istio-system  default"),
            "{t}"
        );
        assert!(
            lines[2].contains("ALLOW") && lines[2].ends_with("web.yaml:1"),
            "{t}"
        );
        let t = render(&dump(), Section::Certificates, Format::Table).unwrap();
        assert!(t.contains("1d1h") && t.contains("valid"), "{t}");
        assert!(t.contains("2027-01-15T08:00:00Z"), "{t}");
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn json_and_yaml_hold_the_lists_without_certificate_chains() {
        let v: Value =
            serde_json::from_str(&render(&dump(), Section::Services, Format::Json).unwrap())
                .unwrap();
        assert_eq!(v[0]["service"], "shop/web");
        let all: Value =
            serde_json::from_str(&render(&dump(), Section::All, Format::Json).unwrap()).unwrap();
        assert_eq!(all["policies"][1]["kind"], "AuthorizationPolicy");
        assert!(all["certificates"][0].get("chain_pem").is_none());
        let y = render(&dump(), Section::Workloads, Format::Yaml).unwrap();
        assert!(y.contains("workload: shop/web-1"), "{y}");
    }

    #[test]
    fn an_admin_api_that_is_not_there_is_unreachable() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = fetch(&format!("127.0.0.1:{port}"), "/config_dump").unwrap();
        assert!(matches!(r, Fetched::Unreachable(_)));
    }
}
