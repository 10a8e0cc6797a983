//! A Kubernetes API server for tests, over plain HTTP/1.1 on loopback: list and watch (with
//! resource versions, ADDED / MODIFIED / DELETED events and field selectors) of the collections
//! registered, GET of single objects, and TokenReview. Faults on demand: failing requests with
//! any status, watch connections ended cleanly or broken, and compaction, after which resuming a
//! watch from an older resource version is answered with `410 Gone` (as a watch ERROR event, as
//! the real server does, or as the HTTP status).
//!
//! Not modelled: pagination (`limit` is ignored and everything is returned in one page),
//! bookmarks, label selectors, and a field selector that stops matching a changed object is
//! not turned into a DELETED event.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Frame, Request, Response};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

type Body = BoxBody<Bytes, io::Error>;

/// One resource collection: `api/v1/pods`, `apis/security.istio.io/v1/authorizationpolicies`.
struct Collection {
    api_version: String,
    kind: String,
    namespaced: bool,
    objects: BTreeMap<(String, String), Value>,
    /// (resource version, event type, object).
    events: Vec<(u64, &'static str, Value)>,
}

struct Watcher {
    collection: String,
    namespace: Option<String>,
    fields: Vec<FieldTerm>,
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, io::Error>>,
}

/// How a resumed watch from a compacted resource version is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// `200`, then one `ERROR` event with a `410` Status (what kube-apiserver does).
    Event,
    /// HTTP `410` on the watch request itself.
    Http,
}

/// What TokenReview answers for a token.
#[derive(Clone, Debug)]
pub struct TokenIdentity {
    pub username: String,
    pub audiences: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches may resume from this resource version or later; older ones get 410.
    compacted: u64,
    gone: Option<Gone>,
    collections: BTreeMap<String, Collection>,
    watchers: Vec<Watcher>,
    /// Statuses the next requests get instead of an answer, in order.
    failures: Vec<u16>,
    /// (part of the request line, status): the next request that matches gets the status.
    path_failures: Vec<(String, u16)>,
    tokens: HashMap<String, TokenIdentity>,
    /// Every request line received ("GET /api/v1/pods?..."), for assertions.
    requests: Vec<String>,
    /// Every TokenReview spec received.
    token_reviews: Vec<Value>,
    authorizations: Vec<String>,
}

/// The token the kubeconfig of [`ApiServer::kubeconfig`] presents.
pub const KUBECONFIG_TOKEN: &str = "node-proxy-token";

pub struct ApiServer {
    pub addr: SocketAddr,
    /// With TLS: the PEM certificate of the CA that issued the server's certificate.
    ca_pem: Option<String>,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Over plain HTTP.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Over HTTPS, with a certificate for 127.0.0.1 from a CA of its own (see [`Self::kubeconfig`]).
    pub async fn start_tls() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let mut server =
            Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await;
        server.ca_pem = Some(ca.pem());
        server
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            gone: Some(Gone::Event),
            ..Default::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                .await
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Self {
            addr,
            ca_pem: None,
            state,
            task,
        }
    }

    /// Serves a collection (`prefix` is `api/v1` or `apis/<group>/<version>`).
    pub fn register(&self, prefix: &str, plural: &str, kind: &str, namespaced: bool) {
        let api_version = prefix
            .strip_prefix("api/")
            .or_else(|| prefix.strip_prefix("apis/"))
            .unwrap()
            .to_owned();
        self.state.lock().unwrap().collections.insert(
            format!("{prefix}/{plural}"),
            Collection {
                api_version,
                kind: kind.into(),
                namespaced,
                objects: BTreeMap::new(),
                events: Vec::new(),
            },
        );
    }

    /// The core kinds the node proxy watches, and Istio's security CRDs.
    pub fn register_defaults(&self) {
        self.register("api/v1", "namespaces", "Namespace", false);
        self.register("api/v1", "pods", "Pod", true);
        self.register("api/v1", "services", "Service", true);
        self.register("api/v1", "configmaps", "ConfigMap", true);
        self.register_istio();
    }

    pub fn register_istio(&self) {
        for (plural, kind) in [
            ("peerauthentications", "PeerAuthentication"),
            ("requestauthentications", "RequestAuthentication"),
            ("authorizationpolicies", "AuthorizationPolicy"),
        ] {
            self.register("apis/security.istio.io/v1", plural, kind, true);
        }
        for (plural, kind) in [
            ("virtualservices", "VirtualService"),
            ("destinationrules", "DestinationRule"),
        ] {
            self.register("apis/networking.istio.io/v1", plural, kind, true);
        }
    }

    /// A kubeconfig file pointing at this server (trusting its CA when it serves TLS), with
    /// the bearer token [`KUBECONFIG_TOKEN`].
    pub fn kubeconfig(&self, dir: &std::path::Path) -> PathBuf {
        use base64::Engine as _;
        let path = dir.join("kubeconfig");
        let cluster = match &self.ca_pem {
            None => format!("{{server: \"http://{}\"}}", self.addr),
            Some(ca) => format!(
                "{{server: \"https://{}\", certificate-authority-data: {}}}",
                self.addr,
                base64::engine::general_purpose::STANDARD.encode(ca)
            ),
        };
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {cluster}\nusers:\n- name: test\n  user: {{token: {KUBECONFIG_TOKEN}}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            ),
        )
        .unwrap();
        path
    }

    /// The `authorization` headers received so far.
    pub fn authorizations(&self) -> Vec<String> {
        self.state.lock().unwrap().authorizations.clone()
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, object: Value) {
        let mut s = self.state.lock().unwrap();
        s.apply(object);
    }

    /// Deletes an object (DELETED); returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        s.delete(kind, namespace, name)
    }

    /// Ends every open watch: cleanly (end of the chunked body) or by breaking the connection.
    pub fn end_watches(&self, broken: bool) {
        self.state.lock().unwrap().end_watches(broken);
    }

    /// In one step: forget history (resuming from any version seen so far gets 410, answered
    /// as `gone` says), end every watch, and apply `changes`, so that clients can only learn
    /// about the changes by listing again.
    pub fn compact_and_change(&self, gone: Gone, changes: impl FnOnce(&mut Changes<'_>)) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        s.compacted = s.rv;
        s.gone = Some(gone);
        s.end_watches(false);
        changes(&mut Changes(&mut s));
    }

    /// The next `statuses.len()` requests (any path) get these statuses instead of answers.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().failures.extend(statuses);
    }

    /// The next request whose line contains `part` gets `status` instead of an answer.
    pub fn fail_path(&self, part: &str, status: u16) {
        let mut s = self.state.lock().unwrap();
        s.path_failures.push((part.into(), status));
    }

    pub fn pending_failures(&self) -> usize {
        self.state.lock().unwrap().failures.len()
    }

    /// How many lists (not watches) of `path` were requested so far.
    pub fn lists_of(&self, path: &str) -> usize {
        let s = self.state.lock().unwrap();
        let prefix = format!("GET {path}?");
        s.requests
            .iter()
            .filter(|r| r.starts_with(&prefix) && !r.contains("watch=true"))
            .count()
    }

    pub fn add_token(&self, token: &str, identity: TokenIdentity) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.into(), identity);
    }

    pub fn token_reviews(&self) -> Vec<Value> {
        self.state.lock().unwrap().token_reviews.clone()
    }
}

/// Changes made while watches are down (see [`ApiServer::compact_and_change`]).
pub struct Changes<'a>(&'a mut State);

impl Changes<'_> {
    pub fn apply(&mut self, object: Value) {
        self.0.apply(object);
    }

    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        self.0.delete(kind, namespace, name)
    }
}

impl State {
    fn collection_of_kind(&mut self, api_version: &str, kind: &str) -> (String, &mut Collection) {
        let (name, c) = self
            .collections
            .iter_mut()
            .find(|(_, c)| c.kind == kind && c.api_version == api_version)
            .unwrap_or_else(|| panic!("no collection registered for {api_version} {kind}"));
        (name.clone(), c)
    }

    fn apply(&mut self, mut object: Value) {
        self.rv += 1;
        let rv = self.rv;
        let api_version = object["apiVersion"].as_str().unwrap().to_owned();
        let kind = object["kind"].as_str().unwrap().to_owned();
        let (name, c) = self.collection_of_kind(&api_version, &kind);
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if c.namespaced && !meta.contains_key("namespace") {
            meta.insert("namespace".into(), json!("default"));
        }
        let key = (
            meta.get("namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            meta["name"].as_str().unwrap().to_owned(),
        );
        let kind = if c.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.events.push((rv, kind, object.clone()));
        self.notify(&name, kind, &object);
    }

    fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        self.rv += 1;
        let rv = self.rv;
        let Some((collection, c)) = self
            .collections
            .iter_mut()
            .find(|(_, c)| c.kind == kind)
            .map(|(n, c)| (n.clone(), c))
        else {
            return false;
        };
        let Some(mut object) = c.objects.remove(&(namespace.into(), name.into())) else {
            return false;
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.events.push((rv, "DELETED", object.clone()));
        self.notify(&collection, "DELETED", &object);
        true
    }

    fn notify(&mut self, collection: &str, kind: &str, object: &Value) {
        let line = event_line(kind, object);
        self.watchers.retain(|w| {
            if w.collection != collection || !selected(object, w.namespace.as_deref(), &w.fields) {
                return true;
            }
            w.tx.send(Ok(Frame::data(line.clone()))).is_ok()
        });
    }

    fn end_watches(&mut self, broken: bool) {
        for w in self.watchers.drain(..) {
            if broken {
                let _ =
                    w.tx.send(Err(io::Error::other("connection broken by the test")));
            }
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// One term of a field selector: `path=value` or `path!=value`.
#[derive(Clone, Debug)]
struct FieldTerm {
    path: String,
    value: String,
    equal: bool,
}

fn parse_fields(selector: &str) -> Vec<FieldTerm> {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (path, value, equal) = if let Some((p, v)) = t.split_once("!=") {
                (p, v, false)
            } else {
                let (p, v) = t.split_once('=').unwrap();
                (p, v.trim_start_matches('='), true)
            };
            FieldTerm {
                path: path.into(),
                value: value.into(),
                equal,
            }
        })
        .collect()
}

fn selected(object: &Value, namespace: Option<&str>, fields: &[FieldTerm]) -> bool {
    if let Some(ns) = namespace {
        if object["metadata"]["namespace"].as_str() != Some(ns) {
            return false;
        }
    }
    fields.iter().all(|t| {
        let mut v = object;
        for part in t.path.split('.') {
            v = &v[part];
        }
        (v.as_str().unwrap_or_default() == t.value) == t.equal
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code, reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

/// Where a request path points.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns), *plural, Some(name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name)),
        _ => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace: namespace.map(|s| s.to_string()),
        name: name.map(|s| s.to_string()),
    })
}

async fn handle(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let line = format!("{} {}", req.method(), req.uri());
    {
        let mut s = state.lock().unwrap();
        if let Some(auth) = req.headers().get("authorization") {
            let auth = auth.to_str().unwrap_or_default().to_owned();
            s.authorizations.push(auth);
        }
        let matching = s
            .path_failures
            .iter()
            .position(|(p, _)| line.contains(p.as_str()));
        s.requests.push(line);
        let code = match matching {
            Some(i) => Some(s.path_failures.remove(i).1),
            None if !s.failures.is_empty() => Some(s.failures.remove(0)),
            None => None,
        };
        if let Some(code) = code {
            return status(code, "InternalError", "failure injected by the test");
        }
    }
    if req.method() == hyper::Method::POST
        && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let review: Value = serde_json::from_slice(&body).unwrap();
        return token_review(state, review);
    }
    let q = query(&req);
    let Some(t) = target(req.uri().path()) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let mut s = state.lock().unwrap();
    let compacted = s.compacted;
    let gone = s.gone;
    let Some(c) = s.collections.get(&t.collection) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if let Some(name) = &t.name {
        let key = (t.namespace.clone().unwrap_or_default(), name.clone());
        return match c.objects.get(&key) {
            Some(o) => json_response(200, o),
            None => status(404, "NotFound", &format!("{} {name:?} not found", c.kind)),
        };
    }
    let fields = parse_fields(q.get("fieldSelector").map_or("", String::as_str));
    let ns = t.namespace.as_deref();
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if from < compacted {
            let message = format!("too old resource version: {from} ({compacted})");
            return match gone.unwrap_or(Gone::Event) {
                Gone::Http => status(410, "Expired", &message),
                Gone::Event => {
                    let line = event_line("ERROR", &status_object(410, "Expired", &message));
                    let stream = tokio_stream::once(Ok::<_, io::Error>(Frame::data(line)));
                    Response::new(StreamBody::new(stream).boxed())
                }
            };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (rv, kind, object) in &c.events {
            if *rv > from && selected(object, ns, &fields) {
                let _ = tx.send(Ok(Frame::data(event_line(kind, object))));
            }
        }
        s.watchers.push(Watcher {
            collection: t.collection,
            namespace: t.namespace,
            fields,
            tx,
        });
        let body = StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        return Response::builder()
            .header("content-type", "application/json")
            .body(body.boxed())
            .unwrap();
    }
    let items: Vec<&Value> = c
        .objects
        .values()
        .filter(|o| selected(o, ns, &fields))
        .collect();
    let list = json!({
        "kind": format!("{}List", c.kind),
        "apiVersion": c.api_version,
        "metadata": {"resourceVersion": s.rv.to_string()},
        "items": items,
    });
    json_response(200, &list)
}

fn token_review(state: &Mutex<State>, review: Value) -> Response<Body> {
    let mut s = state.lock().unwrap();
    let spec = review["spec"].clone();
    s.token_reviews.push(spec.clone());
    let token = spec["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let status = match s.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(id) => {
            let audiences: Vec<&String> = if wanted.is_empty() {
                id.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| id.audiences.contains(a)).collect()
            };
            if audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({"authenticated": true, "audiences": audiences,
                    "user": {"username": id.username, "uid": "u-1", "groups": ["system:serviceaccounts"],
                        "extra": id.extra}})
            }
        }
    };
    json_response(
        201,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": null}, "spec": spec, "status": status}),
    )
}
