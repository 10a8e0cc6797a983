//! `ztunnel-cni`: a chained CNI plugin (spec 1.0.0; 0.3.0–0.4.0 and 1.1.0 configurations too) that
//! hands each new pod sandbox to the node proxy before any container of the pod starts.
//!
//! * **ADD**: reads the pod from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
//!   `K8S_POD_UID`), its addresses from `prevResult`, opens `CNI_NETNS`, and sends all of it
//!   (the netns as a descriptor) to the proxy's socket (`socket` in the configuration, default
//!   [`super::DEFAULT_SOCKET`]). It returns the previous result unchanged once the proxy
//!   answers "enrolled" or "not captured", and fails the ADD on any other answer. If the proxy
//!   cannot be reached, [`super::node_state`] decides: pods of captured (or unknown)
//!   namespaces fail, the others start.
//! * **DEL**: tells the proxy to un-enrol the sandbox; never fails (the runtime must always
//!   be able to tear a sandbox down; a proxy that was unreachable forgets the pod when it
//!   leaves the configuration).
//! * **CHECK**: asks the proxy whether the pod is as the configuration wants it.
//! * **STATUS**, **GC** (CNI 1.1): succeed. STATUS does not report the proxy: a node whose
//!   proxy is down must keep starting the pods of other namespaces (ADD decides per pod).
//!   GC has nothing to collect: a proxy forgets sandboxes that left the configuration.
//! * **VERSION**: the versions above.
//!
//! Invocations without a Kubernetes pod in `CNI_ARGS` pass the previous result through.
//! Errors are CNI error objects on stdout (exit status 1): code 1 for an unsupported version,
//! 4 for bad environment variables, 6 for input that does not decode, 7 for a configuration
//! this plugin cannot work with, 11 (try again later) when the proxy refused or cannot be
//! reached for a pod that must be captured.
use std::{
    collections::BTreeMap, io::Read as _, net::IpAddr, os::fd::AsFd as _, path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    node_state::{self, Offline},
    protocol::{Command, Reply, Request, SeqPacket, VERSION},
};

/// Configuration versions this plugin reads (their `prevResult` shapes are the same for what
/// it uses: `ips[].address`, `ips[].interface`, `interfaces[].sandbox`).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long the plugin waits for the proxy's answer unless `timeoutSeconds` says otherwise.
/// Longer than the proxy's own wait for a pod it has not seen yet (`--cni-pod-wait`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_STDIN: u64 = 1024 * 1024;

/// CNI error codes (spec §"Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific: the proxy answered CHECK that the pod is not as it should be.
    pub const CHECK_FAILED: u32 = 100;
}

/// What a run prints on stdout and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Extra lines for stderr (the runtime logs them).
    pub stderr: String,
    pub success: bool,
}

/// A CNI error.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

/// The plugin's configuration (the conflist entry, with the runtime's additions).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    socket: Option<PathBuf>,
    timeout_seconds: Option<u64>,
    prev_result: Option<Value>,
}

/// The runtime's environment variables for one invocation.
pub type Env = BTreeMap<String, String>;

/// The binary's entry point.
pub fn main() -> std::process::ExitCode {
    let env: Env = std::env::vars().collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => error_outcome(
            "1.0.0",
            err(
                code::DECODING_FAILURE,
                "cannot read the configuration from stdin",
                e.to_string(),
            ),
        ),
    };
    print!("{}", outcome.stdout);
    eprint!("{}", outcome.stderr);
    if outcome.success {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn error_outcome(version: &str, e: CniError) -> Outcome {
    let stdout = json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details});
    Outcome {
        stderr: format!("ztunnel-cni: {}: {}\n", e.msg, e.details),
        stdout: format!("{stdout}\n"),
        success: false,
    }
}

/// One invocation: `env` as the runtime set it, `stdin` the network configuration.
pub fn run(env: &Env, stdin: &[u8]) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        let stdout = json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS});
        return Outcome {
            stdout: format!("{stdout}\n"),
            stderr: String::new(),
            success: true,
        };
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(c) => c,
        Err(e) => {
            return error_outcome(
                "1.0.0",
                err(
                    code::DECODING_FAILURE,
                    "the network configuration on stdin is not valid",
                    e.to_string(),
                ),
            )
        }
    };
    let version = conf.cni_version.clone();
    match invoke(command, env, &conf) {
        Ok((stdout, stderr)) => Outcome {
            stdout,
            stderr,
            success: true,
        },
        Err(e) => error_outcome(&version, e),
    }
}

/// The pod a Kubernetes runtime names in `CNI_ARGS`.
#[derive(Debug, PartialEq, Eq)]
struct PodArgs {
    namespace: String,
    name: String,
    uid: String,
}

/// Parses `CNI_ARGS` (`K=V;K=V`); `None` when it names no Kubernetes pod.
fn pod_args(args: &str) -> Result<Option<PodArgs>, CniError> {
    let mut map = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(err(
                code::INVALID_ENV,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE (in {args:?})"),
            ));
        };
        map.insert(k.to_owned(), v.to_owned());
    }
    let ns = map.remove("K8S_POD_NAMESPACE").filter(|v| !v.is_empty());
    let name = map.remove("K8S_POD_NAME").filter(|v| !v.is_empty());
    match (ns, name) {
        (None, None) => Ok(None),
        (Some(namespace), Some(name)) => Ok(Some(PodArgs {
            namespace,
            name,
            uid: map.remove("K8S_POD_UID").unwrap_or_default(),
        })),
        _ => Err(err(
            code::INVALID_ENV,
            "CNI_ARGS names half a pod",
            format!("K8S_POD_NAMESPACE and K8S_POD_NAME must come together (in {args:?})"),
        )),
    }
}

/// The pod's own addresses in a result: those on interfaces inside the sandbox (or on no
/// interface named).
fn pod_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let bad = |what: String| err(code::INVALID_CONFIG, "prevResult is not a CNI result", what);
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let mut ips = Vec::new();
    let Some(list) = result.get("ips").and_then(Value::as_array) else {
        return Ok(ips);
    };
    for ip in list {
        let address = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("an entry of ips has no address: {ip}")))?;
        let addr_text = address.split_once('/').map_or(address, |(a, _)| a);
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| bad(format!("{address:?} is not an address in CIDR notation")))?;
        let in_sandbox = match ip.get("interface").and_then(Value::as_u64) {
            None => true,
            Some(i) => interfaces
                .and_then(|l| l.get(i as usize))
                .ok_or_else(|| {
                    bad(format!(
                        "ips names interface {i}, which interfaces does not have"
                    ))
                })?
                .get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
        };
        if in_sandbox && !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    Ok(ips)
}

fn required<'a>(env: &'a Env, name: &str, command: &str) -> Result<&'a str, CniError> {
    env.get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            err(
                code::INVALID_ENV,
                format!("{name} is not set"),
                format!("{command} needs it"),
            )
        })
}

/// Runs ADD, DEL or CHECK; returns stdout and stderr.
fn invoke(command: &str, env: &Env, conf: &NetConf) -> Result<(String, String), CniError> {
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(err(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let cmd = match command {
        "STATUS" | "GC" => return Ok((String::new(), String::new())),
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "" => {
            return Err(err(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "expected ADD, DEL, CHECK or VERSION",
            ))
        }
        other => {
            return Err(err(
                code::INVALID_ENV,
                format!("CNI_COMMAND {other} is not supported"),
                format!(
                    "ztunnel-cni implements ADD, DEL, CHECK and VERSION of CNI {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ))
        }
    };
    let container_id = required(env, "CNI_CONTAINERID", command)?;
    required(env, "CNI_IFNAME", command)?;
    let netns_path = if cmd == Command::Del {
        env.get("CNI_NETNS").cloned().unwrap_or_default()
    } else {
        required(env, "CNI_NETNS", command)?.to_owned()
    };
    let prev = conf.prev_result.clone();
    // A chained plugin's result is the previous one, unchanged.
    let passthrough = || match &prev {
        Some(p) => format!("{p}\n"),
        None => String::new(),
    };
    let Some(pod) = pod_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or(""))? else {
        return Ok((passthrough(), String::new()));
    };
    let ips = match cmd {
        Command::Del => Vec::new(),
        Command::Add | Command::Check => {
            let Some(prev) = &prev else {
                return Err(err(
                    code::INVALID_CONFIG,
                    format!(
                        "{} must be chained after the plugin that gives the pod its addresses",
                        super::PLUGIN_NAME
                    ),
                    "the configuration has no prevResult",
                ));
            };
            let ips = pod_ips(prev)?;
            if ips.is_empty() {
                return Err(err(
                    code::INVALID_CONFIG,
                    "prevResult holds no address of the pod",
                    format!("network {:?}: the plugins before {} assigned no address inside the sandbox", conf.name, conf.kind),
                ));
            }
            ips
        }
    };
    let netns = if cmd == Command::Del {
        None
    } else {
        Some(std::fs::File::open(&netns_path).map_err(|e| {
            err(
                code::INVALID_ENV,
                format!("cannot open CNI_NETNS {netns_path}"),
                e.to_string(),
            )
        })?)
    };
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| super::DEFAULT_SOCKET.into());
    let timeout = conf
        .timeout_seconds
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let workload = format!("{}/{}", pod.namespace, pod.name);
    let request = Request {
        version: VERSION,
        command: cmd,
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        container_id: container_id.to_owned(),
        netns: netns_path.clone(),
        ips,
    };
    let conn = match SeqPacket::connect(&socket, timeout) {
        Ok(c) => c,
        Err(e) => {
            // Not reachable: decide from the node state file.
            let unreachable = format!(
                "the node proxy is not reachable at {}: {e}",
                socket.display()
            );
            return match cmd {
                Command::Del => Ok((String::new(), format!("ztunnel-cni: DEL {workload}: {unreachable}; it forgets the pod when it runs again\n"))),
                Command::Add | Command::Check => {
                    match node_state::offline_decision(&node_state::path_for_socket(&socket), &pod.namespace) {
                        Offline::Start => Ok((passthrough(), format!("ztunnel-cni: {command} {workload}: {unreachable}; the namespace is not captured, the pod starts\n"))),
                        Offline::Refuse(why) => Err(err(code::TRY_AGAIN_LATER, unreachable, why)),
                    }
                }
            };
        }
    };
    let answer = exchange(&conn, &request, netns.as_ref());
    match (cmd, answer) {
        (Command::Del, Ok(_)) => Ok((String::new(), String::new())),
        (Command::Del, Err(e)) => {
            Ok((String::new(), format!("ztunnel-cni: DEL {workload}: {e}\n")))
        }
        (_, Ok(Reply::Enrolled)) | (_, Ok(Reply::NotCaptured { .. })) => {
            Ok((passthrough(), String::new()))
        }
        (Command::Add, Ok(Reply::Failed { reason })) => Err(err(
            code::TRY_AGAIN_LATER,
            format!("the node proxy did not capture pod {workload}"),
            reason,
        )),
        (Command::Check, Ok(Reply::Failed { reason })) => Err(err(
            code::CHECK_FAILED,
            format!("pod {workload} is not captured as it should be"),
            reason,
        )),
        (_, Ok(other)) => Err(err(
            code::TRY_AGAIN_LATER,
            format!("the node proxy answered {command} for {workload} unexpectedly"),
            format!("{other:?}"),
        )),
        (_, Err(e)) => Err(err(
            code::TRY_AGAIN_LATER,
            format!(
                "no answer from the node proxy at {} for {workload}",
                socket.display()
            ),
            e,
        )),
    }
}

fn exchange(
    conn: &SeqPacket,
    request: &Request,
    netns: Option<&std::fs::File>,
) -> Result<Reply, String> {
    let text = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    conn.send(&text, netns.map(|f| f.as_fd()))
        .map_err(|e| format!("sending the request: {e}"))?;
    let (reply, _) = conn
        .recv()
        .map_err(|e| format!("waiting for the answer: {e}"))?;
    if reply.is_empty() {
        return Err("the node proxy closed the connection without answering".into());
    }
    serde_json::from_slice(&reply).map_err(|e| format!("the answer does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn error_of(o: &Outcome) -> (u64, String) {
        assert!(!o.success, "expected a failure: {o:?}");
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        (
            v["code"].as_u64().unwrap(),
            format!("{} {}", v["msg"], v["details"]),
        )
    }

    const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
        "ips":[{"address":"10.1.0.2/24","interface":1},{"address":"10.9.9.9/24","interface":0},{"address":"fd00::2/64"}]}"#;

    #[test]
    fn version_lists_the_supported_versions() {
        let o = run(&env(&[("CNI_COMMAND", "VERSION")]), b"{}");
        assert!(o.success);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }

    #[test]
    fn addresses_come_from_the_sandbox_interfaces_of_the_previous_result() {
        let v: Value = serde_json::from_str(RESULT).unwrap();
        assert_eq!(
            pod_ips(&v).unwrap(),
            [
                "10.1.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        let bad: Value = serde_json::from_str(r#"{"ips":[{"address":"nope/24"}]}"#).unwrap();
        assert!(pod_ips(&bad).unwrap_err().details.contains("CIDR"));
        let dangling: Value =
            serde_json::from_str(r#"{"ips":[{"address":"10.0.0.1/8","interface":3}]}"#).unwrap();
        assert!(pod_ips(&dangling)
            .unwrap_err()
            .details
            .contains("interface 3"));
    }

    #[test]
    fn cni_args_name_the_pod() {
        assert_eq!(
            pod_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=u").unwrap(),
            Some(PodArgs { namespace: "shop".into(), name: "web".into(), uid: "u".into() })
        );
        assert_eq!(pod_args("IgnoreUnknown=1").unwrap(), None);
        assert_eq!(pod_args("").unwrap(), None);
        assert!(pod_args("K8S_POD_NAMESPACE=shop")
            .unwrap_err()
            .msg
            .contains("half a pod"));
        assert!(pod_args("garbage")
            .unwrap_err()
            .details
            .contains("KEY=VALUE"));
    }

    #[test]
    fn bad_input_gets_a_cni_error() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web"),
        ];
        let conf = |extra: &str| {
            format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"ztunnel-cni","socket":"/nonexistent/x.sock"{extra}}}"#
            )
        };
        let with = |e: &[(&str, &str)]| {
            let mut m = env(&base);
            for (k, v) in e {
                if v.is_empty() {
                    m.remove(*k);
                } else {
                    m.insert((*k).into(), (*v).into());
                }
            }
            m
        };
        let prev = format!(r#","prevResult":{RESULT}"#);
        assert_eq!(error_of(&run(&with(&[]), b"not json")).0, 6);
        assert_eq!(
            error_of(&run(&with(&[]), br#"{"cniVersion":"9.9.9"}"#)).0,
            1
        );
        let (c, m) = error_of(&run(&with(&[]), conf("").as_bytes()));
        assert!(c == 7 && m.contains("prevResult"), "{m}");
        let (c, m) = error_of(&run(
            &with(&[("CNI_CONTAINERID", "")]),
            conf(&prev).as_bytes(),
        ));
        assert!(c == 4 && m.contains("CNI_CONTAINERID"), "{m}");
        let (c, m) = error_of(&run(
            &with(&[("CNI_NETNS", "/nonexistent/netns")]),
            conf(&prev).as_bytes(),
        ));
        assert!(c == 4 && m.contains("cannot open CNI_NETNS"), "{m}");
        let (c, m) = error_of(&run(
            &with(&[("CNI_COMMAND", "FROB")]),
            conf(&prev).as_bytes(),
        ));
        assert!(c == 4 && m.contains("FROB"), "{m}");
        for verb in ["STATUS", "GC"] {
            let o = run(&with(&[("CNI_COMMAND", verb)]), conf("").as_bytes());
            assert!(o.success, "{verb}: {o:?}");
        }
        let (c, m) = error_of(&run(
            &with(&[]),
            conf(r#","prevResult":{"ips":[]}"#).as_bytes(),
        ));
        assert!(c == 7 && m.contains("no address"), "{m}");
        // No proxy and no state file: a pod of an unknown namespace must not start.
        let (c, m) = error_of(&run(&with(&[]), conf(&prev).as_bytes()));
        assert!(c == 11 && m.contains("not reachable"), "{m}");
        // DEL never fails, and a non-Kubernetes invocation passes the result through.
        assert!(run(&with(&[("CNI_COMMAND", "DEL")]), conf("").as_bytes()).success);
        let o = run(
            &with(&[("CNI_ARGS", "IgnoreUnknown=1")]),
            conf(&prev).as_bytes(),
        );
        assert!(o.success);
        assert_eq!(
            serde_json::from_str::<Value>(&o.stdout).unwrap(),
            serde_json::from_str::<Value>(RESULT).unwrap()
        );
    }
}
