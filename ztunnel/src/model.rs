//! The cluster's objects as the proxy models them: namespaces, pods and services with their
//! labels, and where each was read from. Plain data, with no index and no policy: the
//! configuration sources build these, [`crate::authz`] matches policies against them and
//! [`crate::state`] indexes them into a snapshot.
use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

/// Pod annotation naming the pod's network namespace on its node (the local source; the
/// Kubernetes source finds it from the pod's cgroup).
pub const NETNS_ANNOTATION: &str = "ztunnel.dev/netns";

pub type Labels = BTreeMap<String, String>;

/// Where an object was read from, for messages that point the operator at it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file, or for an object of the Kubernetes API `k8s:<kind>/<namespace>/<name>`.
    pub file: PathBuf,
    /// 1-based; 0 when the object has no line (the Kubernetes API).
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Labels,
    pub annotations: Labels,
    pub service_account: String,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// Primary address first, as in `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace on its node (annotation `ztunnel.dev/netns`).
    pub netns_path: Option<PathBuf>,
    pub container_ports: Vec<ContainerPort>,
    pub origin: Origin,
}

impl Pod {
    /// `namespace/name`, the form used in logs.
    pub fn workload(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// `appProtocol`, as written.
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// The protocol this port declares ([`AppProtocol::declared`]); `None`: undeclared.
    pub fn protocol(&self) -> Option<AppProtocol> {
        AppProtocol::declared(
            self.name.as_deref(),
            self.app_protocol.as_deref(),
            self.port,
        )
    }
}

/// The application protocol a Service port declares, as Istio's protocol selection reads it
/// (istio.io, "Protocol Selection"). What is declared is believed: an HTTP port is parsed as
/// HTTP without first waiting to see what the client sends, an opaque one is never sniffed.
/// Only an undeclared port is sniffed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppProtocol {
    /// `http`: HTTP/1.1 or HTTP/2 (which one is told by the client's first bytes).
    Http,
    /// `http2`, and `appProtocol: kubernetes.io/h2c`: HTTP/2 without TLS.
    Http2,
    /// `grpc`: HTTP/2.
    Grpc,
    /// `grpc-web`: HTTP (gRPC-Web runs over HTTP/1.1 or HTTP/2).
    GrpcWeb,
    /// `https`: TLS, opaque to the proxy (it does not terminate the application's TLS).
    Https,
    /// `tls`: opaque.
    Tls,
    /// `tcp`: opaque bytes.
    Tcp,
    /// `mongo`: opaque (MongoDB's wire protocol).
    Mongo,
    /// `mysql`: opaque, and server-first (the server greets before the client speaks).
    Mysql,
    /// `redis`: opaque.
    Redis,
}

/// Ports Istio treats as `tcp` when nothing is declared: their protocols (SMTP, DNS, MySQL,
/// MongoDB) are server-first or not HTTP, and sniffing would only delay them.
const WELL_KNOWN_TCP_PORTS: [u16; 4] = [25, 53, 3306, 27017];

impl AppProtocol {
    /// The protocol declared by a Service port named `name` with `appProtocol` `app_protocol`,
    /// on service port number `port`. The one place this is decided (the inbound side asks it
    /// through `Snapshot::declared_protocol`):
    ///
    /// * `appProtocol`, when set, is the declaration (the name is not looked at):
    ///   `kubernetes.io/h2c` is `http2`, `kubernetes.io/ws` is `http`, `kubernetes.io/wss` is
    ///   `https`; any other value is read like a name;
    /// * a name declares `<protocol>` or `<protocol>-<suffix>`, case-insensitively, with
    ///   `grpc-web` read whole: `http`, `http2`, `grpc`, `grpc-web`, `https`, `tls`, `tcp`,
    ///   `mongo`, `mysql`, `redis`;
    /// * anything else declares nothing, except on ports 25, 53, 3306 and 27017, which are
    ///   `tcp` (as Istio has it).
    pub fn declared(name: Option<&str>, app_protocol: Option<&str>, port: u16) -> Option<Self> {
        let declared = match app_protocol {
            Some("kubernetes.io/h2c") => Some(Self::Http2),
            Some("kubernetes.io/ws") => Some(Self::Http),
            Some("kubernetes.io/wss") => Some(Self::Https),
            Some(app) => Self::from_name(app),
            None => name.and_then(Self::from_name),
        };
        declared.or_else(|| WELL_KNOWN_TCP_PORTS.contains(&port).then_some(Self::Tcp))
    }

    fn from_name(name: &str) -> Option<Self> {
        const GRPC_WEB: &str = "grpc-web";
        if name
            .get(..GRPC_WEB.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(GRPC_WEB))
        {
            return Some(Self::GrpcWeb);
        }
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        [
            Self::Http,
            Self::Http2,
            Self::Grpc,
            Self::Https,
            Self::Tls,
            Self::Tcp,
            Self::Mongo,
            Self::Mysql,
            Self::Redis,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(prefix))
    }

    /// The protocol's name, as a port name would declare it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
            Self::GrpcWeb => "grpc-web",
            Self::Https => "https",
            Self::Tls => "tls",
            Self::Tcp => "tcp",
            Self::Mongo => "mongo",
            Self::Mysql => "mysql",
            Self::Redis => "redis",
        }
    }

    /// Whether the proxy can read this port's traffic as HTTP requests.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc | Self::GrpcWeb)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    /// Empty means "no selector": the service has no endpoints we can compute.
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    pub origin: Origin,
}

/// A Kubernetes object of a kind this snapshot does not model (yet): kept so later stages
/// (policy) can read it from the same snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct OtherObject {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub body: serde_yaml::Value,
    pub origin: Origin,
}

#[cfg(test)]
mod tests {
    use super::AppProtocol::{self, *};

    fn named(name: &str) -> Option<AppProtocol> {
        AppProtocol::declared(Some(name), None, 8080)
    }

    #[test]
    fn port_names_declare_protocols_as_istio_reads_them() {
        for (name, expected) in [
            ("http", Some(Http)),
            ("http-web", Some(Http)),
            ("HTTP-Web", Some(Http)),
            ("http2", Some(Http2)),
            ("http2-api", Some(Http2)),
            ("grpc", Some(Grpc)),
            ("grpc-status", Some(Grpc)),
            ("grpc-web", Some(GrpcWeb)),
            ("grpc-web-ui", Some(GrpcWeb)),
            ("GRPC-WEB", Some(GrpcWeb)),
            ("https-admin", Some(Https)),
            ("tls", Some(Tls)),
            ("tcp-db", Some(Tcp)),
            ("mongo", Some(Mongo)),
            ("mysql-primary", Some(Mysql)),
            ("redis-cache", Some(Redis)),
            // Not a declaration: a word that only starts like one, no name, other words.
            ("httpx", None),
            ("web-http", None),
            ("tcpdump", None),
            ("udp-dns", None),
            ("http_proxy", None),
            ("", None),
            ("-http", None),
        ] {
            assert_eq!(named(name), expected, "{name:?}");
        }
        assert_eq!(AppProtocol::declared(None, None, 8080), None);
    }

    #[test]
    fn app_protocol_wins_over_the_name() {
        let declared = |app, name| AppProtocol::declared(name, Some(app), 8080);
        assert_eq!(declared("kubernetes.io/h2c", Some("tcp")), Some(Http2));
        assert_eq!(declared("kubernetes.io/ws", None), Some(Http));
        assert_eq!(declared("kubernetes.io/wss", None), Some(Https));
        assert_eq!(declared("HTTP", Some("tcp-x")), Some(Http));
        assert_eq!(declared("mysql", Some("http")), Some(Mysql));
        // An appProtocol that declares nothing Istio knows leaves the port undeclared, even
        // if its name would have declared one.
        assert_eq!(declared("example.com/custom", Some("http")), None);
    }

    #[test]
    fn well_known_ports_are_tcp_unless_declared() {
        for port in [25, 53, 3306, 27017] {
            assert_eq!(AppProtocol::declared(None, None, port), Some(Tcp));
            assert_eq!(AppProtocol::declared(Some("web"), None, port), Some(Tcp));
            assert_eq!(AppProtocol::declared(Some("http"), None, port), Some(Http));
        }
        assert_eq!(AppProtocol::declared(None, None, 3307), None);
    }

    #[test]
    fn http_protocols_are_parsed_and_the_rest_is_opaque() {
        let http = [Http, Http2, Grpc, GrpcWeb];
        for p in [
            Http, Http2, Grpc, GrpcWeb, Https, Tls, Tcp, Mongo, Mysql, Redis,
        ] {
            assert_eq!(p.is_http(), http.contains(&p), "{p:?}");
            assert_eq!(named(p.as_str()), Some(p), "{p:?} names itself");
        }
    }
}
