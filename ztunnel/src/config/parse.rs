//! Kubernetes-shaped YAML into [`Objects`]: Namespaces, Pods and Services are modelled, and so
//! are Istio's `PeerAuthentication`, `AuthorizationPolicy` and `RequestAuthentication`, and its
//! `VirtualService` and `DestinationRule` (`networking.istio.io`); other
//! kinds are kept as [`OtherObject`]s for the stages that understand them. A file may hold
//! several documents and `kind: List` objects, so the output of `kubectl get -o yaml` works
//! unchanged. Errors name the file, line and reason.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{de, Deserialize, Deserializer};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use crate::authz::{authorization_policy, peer_authentication, request_authentication};
use crate::model::{
    ContainerPort, Labels, Namespace, Origin, OtherObject, Pod, Service, ServicePort, TargetPort,
    NETNS_ANNOTATION,
};
use crate::state::Objects;
use crate::traffic::{destination_rule, virtual_service};

/// Why a configuration version was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    /// 1-based; absent when the error is about the file or directory as a whole.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for LoadError {}

/// Every reason a configuration version was rejected: all bad files are reported at once, so
/// an operator does not discover them one reload at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

impl From<LoadError> for LoadErrors {
    fn from(e: LoadError) -> Self {
        LoadErrors(vec![e])
    }
}

/// Parses one file's documents into `objects`.
pub fn parse_file(file: &Path, text: &str, objects: &mut Objects) -> Result<(), LoadError> {
    let located = |e: serde_yaml::Error| LoadError {
        file: file.to_owned(),
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
        reason: strip_location(&e.to_string()),
    };
    // First pass: syntax, and each document's kind. Second pass: the typed parse of the same
    // documents, straight from the text so that errors keep their line and column.
    let mut heads = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        heads.push(Option::<Head>::deserialize(doc).map_err(located)?);
    }
    let starts = document_start_lines(text);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Some(head) = &heads[i] else { continue }; // an empty document
        let origin = Origin {
            file: file.to_owned(),
            line: starts.get(i).copied().unwrap_or(1),
        };
        let whole = |reason: String| LoadError {
            file: file.to_owned(),
            line: Some(origin.line),
            column: None,
            reason,
        };
        if head.kind == "List" {
            let list = ListDoc::deserialize(doc).map_err(located)?;
            // Items are parsed from values, which have no positions: point at the list and
            // name the item instead.
            for (j, item) in list.items.into_iter().enumerate() {
                parse_value(item, &origin, objects)
                    .map_err(|reason| whole(format!("items[{j}]: {reason}")))?;
            }
        } else {
            add_object(head, doc, &origin, objects).map_err(|e| match e {
                ObjectError::Parse(e) => located(e),
                ObjectError::Invalid(reason) => whole(format!("{}: {reason}", head.describe())),
            })?;
        }
    }
    Ok(())
}

/// Parses one object given as a value (an item of a `List`, or an object read from the
/// Kubernetes API) into `objects`. The error names the object ("Pod shop/web: reason") when
/// its head could be read.
pub fn parse_value(
    value: serde_yaml::Value,
    origin: &Origin,
    objects: &mut Objects,
) -> Result<(), String> {
    let head = Head::deserialize(&value).map_err(|e| strip_location(&e.to_string()))?;
    add_object(&head, value, origin, objects)
        .map_err(|e| format!("{}: {}", head.describe(), e.reason()))
}

/// Why one object was not accepted.
enum ObjectError {
    /// The typed parse failed (carries a position when parsed from text).
    Parse(serde_yaml::Error),
    Invalid(String),
}

impl ObjectError {
    fn reason(&self) -> String {
        match self {
            ObjectError::Parse(e) => strip_location(&e.to_string()),
            ObjectError::Invalid(r) => r.clone(),
        }
    }
}

/// The part every object has.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Metadata,
}

impl Head {
    /// "Pod shop/web", for messages.
    fn describe(&self) -> String {
        let kind = if self.kind.is_empty() {
            "object"
        } else {
            &self.kind
        };
        match (&self.metadata.namespace, self.metadata.name.as_str()) {
            (_, "") => format!("{kind} without a name"),
            (Some(ns), name) => format!("{kind} {ns}/{name}"),
            (None, name) => format!("{kind} {name}"),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    uid: String,
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
    #[serde(default, deserialize_with = "nullable")]
    annotations: Labels,
    creation_timestamp: Option<String>,
}

impl Metadata {
    /// `creationTimestamp` (RFC 3339, as the API server writes it), which orders policies.
    fn created(&self) -> Result<Option<OffsetDateTime>, String> {
        self.creation_timestamp
            .as_deref()
            .map(|t| {
                OffsetDateTime::parse(t, &Rfc3339).map_err(|e| {
                    format!("metadata.creationTimestamp {t:?} is not an RFC 3339 time: {e}")
                })
            })
            .transpose()
    }
}

const ISTIO_SECURITY_V1: &str = "security.istio.io/v1";
const ISTIO_SECURITY_V1BETA1: &str = "security.istio.io/v1beta1";
const ISTIO_NETWORKING_V1: &str = "networking.istio.io/v1";
const ISTIO_NETWORKING_V1BETA1: &str = "networking.istio.io/v1beta1";
const ISTIO_NETWORKING_V1ALPHA3: &str = "networking.istio.io/v1alpha3";

/// An Istio policy object: only `spec` matters beyond the head (`status` is ignored).
#[derive(Deserialize)]
#[serde(bound(deserialize = "S: Deserialize<'de> + Default"))]
struct PolicyDoc<S> {
    #[serde(default)]
    spec: S,
}

#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    items: Vec<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodDoc {
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still written by old tools.
    service_account: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Deserialize)]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortDoc {
    name: Option<String>,
    container_port: u16,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<IpAddr>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIp>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: IpAddr,
}

#[derive(Deserialize, Default)]
struct ServiceDoc {
    #[serde(default)]
    spec: ServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "clusterIP", default, deserialize_with = "cluster_ip")]
    cluster_ip: Option<IpAddr>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<ClusterIp>,
    #[serde(default, deserialize_with = "nullable")]
    selector: Labels,
    #[serde(default)]
    ports: Vec<ServicePortDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortDoc {
    name: Option<String>,
    port: u16,
    target_port: Option<IntOrString>,
    protocol: Option<String>,
    app_protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

/// A cluster IP, or `None` for headless services.
struct ClusterIp(Option<IpAddr>);

impl<'de> Deserialize<'de> for ClusterIp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "" | "None" => Ok(ClusterIp(None)),
            _ => s
                .parse()
                .map(|ip| ClusterIp(Some(ip)))
                .map_err(|_| de::Error::custom(format!("invalid cluster IP {s:?}"))),
        }
    }
}

fn cluster_ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    Ok(Option::<ClusterIp>::deserialize(d)?.and_then(|c| c.0))
}

/// `labels:` with nothing after it is null in YAML; Kubernetes treats it as empty.
fn nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    Ok(Option::<Labels>::deserialize(d)?.unwrap_or_default())
}

/// Adds the object `body` describes. `body` is the document itself (a YAML deserializer, so
/// errors carry positions) or a value taken from a `List`.
fn add_object<'de, D>(
    head: &Head,
    body: D,
    origin: &Origin,
    objects: &mut Objects,
) -> Result<(), ObjectError>
where
    D: Deserializer<'de, Error = serde_yaml::Error>,
{
    if head.kind.is_empty() {
        return Err(ObjectError::Invalid("the document has no `kind`".into()));
    }
    let meta = &head.metadata;
    if meta.name.is_empty() {
        return Err(ObjectError::Invalid("metadata.name is missing".into()));
    }
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    match (head.api_version.as_str(), head.kind.as_str()) {
        ("v1", "Namespace") => objects.namespaces.push(Arc::new(Namespace {
            name: meta.name.clone(),
            labels: meta.labels.clone(),
            origin: origin.clone(),
        })),
        ("v1", "Pod") => {
            let doc = PodDoc::deserialize(body).map_err(ObjectError::Parse)?;
            let mut ips: Vec<IpAddr> = doc.status.pod_ip.into_iter().collect();
            for p in doc.status.pod_ips {
                if !ips.contains(&p.ip) {
                    ips.push(p.ip);
                }
            }
            objects.pods.push(Arc::new(Pod {
                namespace,
                name: meta.name.clone(),
                uid: meta.uid.clone(),
                labels: meta.labels.clone(),
                annotations: meta.annotations.clone(),
                service_account: doc
                    .spec
                    .service_account_name
                    .or(doc.spec.service_account)
                    .unwrap_or_else(|| "default".into()),
                node_name: doc.spec.node_name,
                host_network: doc.spec.host_network,
                ips,
                netns_path: meta.annotations.get(NETNS_ANNOTATION).map(PathBuf::from),
                container_ports: doc
                    .spec
                    .containers
                    .into_iter()
                    .flat_map(|c| c.ports)
                    .map(|p| ContainerPort {
                        name: p.name,
                        port: p.container_port,
                    })
                    .collect(),
                origin: origin.clone(),
            }));
        }
        ("v1", "Service") => {
            let doc = ServiceDoc::deserialize(body).map_err(ObjectError::Parse)?;
            let mut vips: Vec<IpAddr> = doc.spec.cluster_ip.into_iter().collect();
            for ip in doc.spec.cluster_ips.into_iter().filter_map(|c| c.0) {
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
            let mut ports = Vec::new();
            for p in doc.spec.ports {
                // Only TCP is captured; UDP and SCTP ports of a service play no part here.
                if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                    continue;
                }
                let target_port = match p.target_port {
                    None => TargetPort::Number(p.port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(n),
                    Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(s),
                    },
                };
                ports.push(ServicePort {
                    name: p.name,
                    port: p.port,
                    target_port,
                    app_protocol: p.app_protocol,
                });
            }
            objects.services.push(Arc::new(Service {
                namespace,
                name: meta.name.clone(),
                vips,
                selector: doc.spec.selector,
                ports,
                origin: origin.clone(),
            }));
        }
        (ISTIO_SECURITY_V1 | ISTIO_SECURITY_V1BETA1, "PeerAuthentication") => {
            let created = meta.created().map_err(ObjectError::Invalid)?;
            let policy = istio_policy(body, |spec: peer_authentication::SpecDoc| {
                spec.into_policy(namespace, meta.name.clone(), created, origin.clone())
            })?;
            objects.peer_authentications.push(Arc::new(policy));
        }
        (ISTIO_SECURITY_V1 | ISTIO_SECURITY_V1BETA1, "AuthorizationPolicy") => {
            let policy = istio_policy(body, |spec: authorization_policy::SpecDoc| {
                spec.into_policy(namespace, meta.name.clone(), origin.clone())
            })?;
            objects.authorization_policies.push(Arc::new(policy));
        }
        (ISTIO_SECURITY_V1 | ISTIO_SECURITY_V1BETA1, "RequestAuthentication") => {
            let policy = istio_policy(body, |spec: request_authentication::SpecDoc| {
                spec.into_policy(namespace, meta.name.clone(), origin.clone())
            })?;
            objects.request_authentications.push(Arc::new(policy));
        }
        (
            ISTIO_NETWORKING_V1 | ISTIO_NETWORKING_V1BETA1 | ISTIO_NETWORKING_V1ALPHA3,
            "VirtualService",
        ) => {
            let created = meta.created().map_err(ObjectError::Invalid)?;
            let vs = istio_policy(body, |spec: virtual_service::SpecDoc| {
                spec.into_virtual_service(namespace, meta.name.clone(), created, origin.clone())
            })?;
            objects.virtual_services.push(vs);
        }
        (
            ISTIO_NETWORKING_V1 | ISTIO_NETWORKING_V1BETA1 | ISTIO_NETWORKING_V1ALPHA3,
            "DestinationRule",
        ) => {
            let created = meta.created().map_err(ObjectError::Invalid)?;
            let dr = istio_policy(body, |spec: destination_rule::SpecDoc| {
                spec.into_destination_rule(namespace, meta.name.clone(), created, origin.clone())
            })?;
            objects.destination_rules.push(dr);
        }
        (version, kind @ ("VirtualService" | "DestinationRule"))
            if version.starts_with("networking.istio.io/") =>
        {
            return Err(ObjectError::Invalid(format!(
                "apiVersion {version} is not supported for {kind} (use {ISTIO_NETWORKING_V1}, {ISTIO_NETWORKING_V1BETA1} or {ISTIO_NETWORKING_V1ALPHA3})"
            )));
        }
        (
            version,
            kind @ ("PeerAuthentication" | "AuthorizationPolicy" | "RequestAuthentication"),
        ) if version.starts_with("security.istio.io/") => {
            return Err(ObjectError::Invalid(format!(
                "apiVersion {version} is not supported for {kind} (use {ISTIO_SECURITY_V1} or {ISTIO_SECURITY_V1BETA1})"
            )));
        }
        _ => objects.other.push(OtherObject {
            api_version: head.api_version.clone(),
            kind: head.kind.clone(),
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            body: serde_yaml::Value::deserialize(body).map_err(ObjectError::Parse)?,
            origin: origin.clone(),
        }),
    }
    Ok(())
}

/// Parses an Istio policy's `spec` from `body` and validates it with `validate`.
fn istio_policy<'de, D, S, P>(
    body: D,
    validate: impl FnOnce(S) -> Result<P, String>,
) -> Result<P, ObjectError>
where
    D: Deserializer<'de, Error = serde_yaml::Error>,
    S: Deserialize<'de> + Default,
{
    let doc = PolicyDoc::<S>::deserialize(body).map_err(ObjectError::Parse)?;
    validate(doc.spec).map_err(ObjectError::Invalid)
}

/// serde_yaml appends " at line L column C" to its messages; the location is reported apart.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// The first line of each YAML document of `text` (1-based), for pointing at whole objects.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    let mut seen_content = false;
    for (i, line) in text.lines().enumerate() {
        let separator = line == "---" || line.starts_with("--- ");
        if separator {
            if seen_content {
                starts.push(i + 2);
            } else {
                // A leading separator opens the first document.
                starts[0] = i + 2;
            }
            seen_content = true;
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            seen_content = true;
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::MtlsMode;
    use crate::model::AppProtocol;

    fn parse(text: &str) -> Result<Objects, LoadError> {
        let mut objects = Objects::default();
        parse_file(Path::new("test.yaml"), text, &mut objects).map(|()| objects)
    }

    const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  uid: "1234"
  labels: {app: web}
  annotations: {ztunnel.dev/netns: /run/netns/web}
spec:
  nodeName: node2
  serviceAccountName: web-sa
  containers:
  - name: app
    ports: [{containerPort: 8080, name: http}]
status:
  podIP: 10.2.0.2
  podIPs: [{ip: 10.2.0.2}, {ip: "fd00::2"}]
"#;

    #[test]
    fn pods_carry_identity_node_addresses_and_netns() {
        let o = parse(POD).unwrap();
        let p = &o.pods[0];
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web"));
        assert_eq!(p.service_account, "web-sa");
        assert_eq!(p.node_name.as_deref(), Some("node2"));
        assert_eq!(
            p.ips,
            [
                "10.2.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert_eq!(p.netns_path.as_deref(), Some(Path::new("/run/netns/web")));
        assert_eq!(
            p.container_ports,
            [ContainerPort {
                name: Some("http".into()),
                port: 8080
            }]
        );
        assert_eq!(p.uid, "1234");
    }

    #[test]
    fn multi_document_files_and_lists_are_read_with_their_lines() {
        let text = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: b}}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: shop}\n  spec:\n    clusterIP: 10.96.0.1\n    clusterIPs: [10.96.0.1, \"fd00::a\"]\n    selector: {app: web}\n    ports:\n    - {port: 80, targetPort: http}\n    - {port: 81, name: tcp-db, appProtocol: mysql}\n    - {port: 53, protocol: UDP}\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: deny, namespace: shop}\n  spec: {}\n";
        let o = parse(text).unwrap();
        assert_eq!(o.namespaces[0].name, "shop");
        assert_eq!(o.namespaces[0].origin.line, 2);
        let s = &o.services[0];
        assert_eq!(s.vips.len(), 2);
        assert_eq!(s.ports.len(), 2, "UDP ports are dropped");
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(81));
        assert_eq!(s.ports[0].protocol(), None);
        assert_eq!(s.ports[1].app_protocol.as_deref(), Some("mysql"));
        assert_eq!(s.ports[1].protocol(), Some(AppProtocol::Mysql));
        assert_eq!(s.origin.line, 7);
        assert_eq!(o.authorization_policies[0].id(), "shop/deny");
        assert!(o.other.is_empty());
    }

    #[test]
    fn headless_services_have_no_vip() {
        let o = parse("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, clusterIPs: [None]}\n").unwrap();
        assert!(o.services[0].vips.is_empty());
        assert_eq!(o.services[0].namespace, "default");
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let bad_ip = POD.replace("podIP: 10.2.0.2", "podIP: 10.2.0.300");
        let e = parse(&bad_ip).unwrap_err();
        assert_eq!(e.file, Path::new("test.yaml"));
        assert!(e.reason.contains("IP address"), "{e}");
        assert_eq!(e.line, Some(17), "the line of podIP: {e}");

        let syntax = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [unclosed\n";
        let e = parse(syntax).unwrap_err();
        assert!(e.line.is_some_and(|l| l >= 4), "{e}");

        let e = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n").unwrap_err();
        assert!(e.reason.contains("metadata.name"), "{e}");
        assert_eq!(e.line, Some(5), "the start of the second document: {e}");
        let e = parse("metadata: {name: x}\n").unwrap_err();
        assert!(e.reason.contains("kind"), "{e}");
        let e = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 99999}]\n",
        )
        .unwrap_err();
        assert!(e.reason.contains("99999"), "{e}");
        let e = parse("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b, labels: {x: [1]}}\n").unwrap_err();
        assert_eq!(e.line, Some(8), "{e}");
    }

    #[test]
    fn peer_authentications_are_read_from_both_api_versions() {
        let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system, creationTimestamp: \"2024-05-01T10:00:00Z\"}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  portLevelMtls: {8080: {mode: PERMISSIVE}}\nstatus: {anything: goes}\n";
        let o = parse(text).unwrap();
        let [mesh, web] = &o.peer_authentications[..] else {
            panic!("{:?}", o.peer_authentications)
        };
        assert_eq!(mesh.id(), "istio-system/default");
        assert_eq!(mesh.mode, MtlsMode::Strict);
        assert_eq!(mesh.created.unwrap().unix_timestamp(), 1_714_557_600);
        assert_eq!(web.id(), "default/web", "no namespace means default");
        assert_eq!(web.port_level[&8080], MtlsMode::Permissive);
        assert_eq!(web.mode, MtlsMode::Unset);
        assert_eq!(web.origin.line, 6);
        assert!(o.other.is_empty());
    }

    #[test]
    fn bad_peer_authentications_are_reported_with_their_line() {
        let head = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n";
        for (doc, expect, line) in [
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls: {mode: STRICTLY}\n",
                "unknown mTLS mode",
                9,
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls: {mode: STRICT}\n  portLevelMTLS: {}\n",
                "unknown field `portLevelMTLS`",
                10,
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  portLevelMtls: {80: {mode: STRICT}}\n",
                "needs a workload selector",
                5,
            ),
            (
                "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p}\n",
                "not supported",
                5,
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, creationTimestamp: yesterday}\n",
                "creationTimestamp",
                5,
            ),
        ] {
            let e = parse(&format!("{head}{doc}")).unwrap_err();
            assert!(e.reason.contains(expect), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.reason.contains("PeerAuthentication") || e.column.is_some(), "{e}");
        }
    }

    #[test]
    fn traffic_rules_are_read_from_three_api_versions() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: bookinfo}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}\n---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: b, namespace: bookinfo}\nspec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}\n---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: c}\nspec: {hosts: [ratings], tcp: [{route: [{destination: {host: ratings}}]}]}\nstatus: {anything: goes}\n";
        let o = parse(text).unwrap();
        assert_eq!(o.virtual_services.len(), 2);
        assert_eq!(o.destination_rules.len(), 1);
        assert_eq!(o.virtual_services[1].namespace, "default");
        assert_eq!(o.virtual_services[1].origin.line, 11);
        assert_eq!(o.destination_rules[0].subsets[0].name, "v1");
        assert!(o.other.is_empty());
    }

    /// The shipped example is what the proxy accepts, without problems.
    #[test]
    fn the_bookinfo_traffic_example_is_accepted() {
        let o = parse(include_str!(
            "../../../deploy/examples/bookinfo-traffic.yaml"
        ))
        .unwrap();
        assert_eq!(
            (o.virtual_services.len(), o.destination_rules.len()),
            (2, 2)
        );
    }

    /// Each bad rule rejects the file with the line of the field at fault (or of the
    /// document, for what is wrong with the object as a whole).
    #[test]
    fn bad_traffic_rules_are_reported_with_their_line() {
        let head = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n";
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n";
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: reviews\n";
        for (doc, expect, line) in [
            (
                format!("{vs}  - match: [{{uri: {{regex: \"/(?!admin).*\"}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n"),
                "regex",
                11,
            ),
            (
                format!("{vs}  - match: [{{headers: {{x: {{regex: \"(a)\\\\1\"}}}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n"),
                "regex",
                11,
            ),
            (
                format!("{vs}  - route: [{{destination: {{host: reviews}}}}]\n    retires: {{attempts: 3}}\n"),
                "unknown field `retires`",
                12,
            ),
            (
                format!("{vs}  - route: [{{destination: {{host: reviews}}}}]\n    timeout: 3 seconds\n"),
                "duration",
                // A bad value is placed at the route it belongs to.
                11,
            ),
            (
                format!("{dr}  trafficPolicy:\n    loadBalancer: {{simple: FASTEST}}\n"),
                "FASTEST",
                5,
            ),
            (
                format!("{dr}  trafficPolicy:\n    conectionPool: {{}}\n"),
                "unknown field `conectionPool`",
                11,
            ),
            (
                "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: r}\nspec: {}\n".to_owned(),
                "not supported",
                5,
            ),
        ] {
            let e = parse(&format!("{head}{doc}")).unwrap_err();
            assert!(e.reason.contains(expect), "{doc}: {e}");
            assert_eq!(e.line, Some(line), "{doc}: {e}");
        }
    }

    #[test]
    fn document_lines_skip_leading_separators_and_comments() {
        assert_eq!(document_start_lines("a: 1\n---\nb: 2\n"), [1, 3]);
        assert_eq!(document_start_lines("# c\n---\na: 1\n--- \nb: 1"), [3, 5]);
    }

    /// The snapshot of a parsed configuration names CUSTOM policies whose provider is missing.
    #[test]
    fn custom_policies_naming_a_provider_the_mesh_lacks_are_problems() {
        let yaml = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: http-authz
      envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000}
    - name: grpc-authz
      envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: known, namespace: foo}
spec: {action: CUSTOM, provider: {name: http-authz}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: foo}
spec: {action: CUSTOM, provider: {name: htpp-authz}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc, namespace: foo}
spec: {action: CUSTOM, provider: {name: grpc-authz}, rules: [{}]}
"#;
        let mut objects = Objects::default();
        parse_file(Path::new("policies.yaml"), yaml, &mut objects).unwrap();
        let s = crate::state::Snapshot::build(1, objects, &crate::state::MeshSettings::default());
        assert_eq!(s.problems.len(), 2, "{:#?}", s.problems);
        assert!(
            s.problems[0].contains("foo/grpc")
                && s.problems[0].contains("not an envoyExtAuthzHttp"),
            "{:#?}",
            s.problems
        );
        assert!(
            s.problems[1].contains("foo/typo")
                && s.problems[1].contains("\"htpp-authz\"")
                && s.problems[1].contains("istio-system/istio")
                && s.problems[1].contains("policies.yaml"),
            "{:#?}",
            s.problems
        );
    }
}
