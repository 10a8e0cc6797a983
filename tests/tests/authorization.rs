//! End-to-end tests of AuthorizationPolicy at L4: decided when a connection arrives at the
//! destination's node proxy, from the caller's SPIFFE identity (HBONE between nodes, the
//! listener on the same node) or its address (plaintext), with real clients in pods.
use anyhow::{ensure, Context, Result};
use serde_json::Value;
use ztunnel_tests::{jwt::IdentityProvider, Cluster};

mod common;

use common::{addr, start, WAIT};

fn authorization_policy(ns: &str, name: &str, body: &str) -> String {
    common::istio("AuthorizationPolicy", ns, name, body)
}

/// `ns/name` fetches `target`: Ok if it got an answer.
fn get(c: &Cluster, from: (&str, &str), target: &str) -> Result<bool> {
    let out = c.pod(from.0, from.1).get(target)?;
    Ok(out.code == Some(0))
}

/// The "authorization denied" line node 2 logged after `mark` for a caller at `src_ip`.
fn denial(c: &Cluster, mark: usize, src_ip: &str) -> Result<Value> {
    c.wait_for_log_since(2, mark, WAIT, |l| {
        l["message"] == "authorization denied" && l["src_ip"] == src_ip
    })
}

#[test]
fn l4_allow_by_principal() -> Result<()> {
    let c = start()?;
    let _catalog = c
        .pod("istioinaction", "catalog")
        .http_server(8080, "catalog")?;
    let catalog = addr(&c, "istioinaction", "catalog", 8080);
    c.apply(
        "catalog-viewer.yaml",
        Some(&authorization_policy(
            "istioinaction",
            "catalog-viewer",
            "  selector:\n    matchLabels:\n      app: catalog\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/istioinaction/sa/client\"]\n",
        )),
    )?;
    // The named identity, across nodes (HBONE): allowed, and the log says by which rule.
    let mark = c.log_mark(2);
    ensure!(
        get(&c, ("istioinaction", "client"), &catalog)?,
        "client should be allowed"
    );
    let line = c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["dst_addr"] == catalog.as_str()
    })?;
    ensure!(
        line["outcome"] == "ok" && line["authz_policy"] == "istioinaction/catalog-viewer",
        "{line}"
    );
    ensure!(line["authz_rule"] == 0, "{line}");
    // Any other caller is denied: another identity on the same node, another namespace across
    // nodes, and a plaintext client with no identity at all.
    for (from, via) in [
        (("istioinaction", "neighbour"), "same node"),
        (("other", "outsider"), "HBONE"),
        (("default", "sleep"), "plaintext"),
    ] {
        let mark = c.log_mark(2);
        ensure!(
            !get(&c, from, &catalog)?,
            "{}/{} ({via}) should be denied",
            from.0,
            from.1
        );
        let src_ip = c.pod(from.0, from.1).ip().to_string();
        let d = denial(&c, mark, &src_ip)?;
        ensure!(d["dst_workload"] == "istioinaction/catalog", "{d}");
        ensure!(
            d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("none of their rules matched")),
            "{d}"
        );
        let expected_principal =
            (from.0 != "default").then(|| format!("cluster.local/ns/{}/sa/{}", from.0, from.1));
        ensure!(
            d["src_principal"].as_str() == expected_principal.as_deref(),
            "{via}: {d}"
        );
    }
    Ok(())
}

#[test]
fn l4_deny_by_namespace() -> Result<()> {
    let c = start()?;
    let _web = c
        .pod("istioinaction", "webapp")
        .http_server(8080, "webapp")?;
    let webapp = addr(&c, "istioinaction", "webapp", 8080);
    c.apply(
        "deny-other.yaml",
        Some(&authorization_policy(
            "istioinaction",
            "deny-other-namespace",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [other]\n",
        )),
    )?;
    let mark = c.log_mark(2);
    ensure!(
        !get(&c, ("other", "outsider"), &webapp)?,
        "outsider should be denied"
    );
    let d = denial(&c, mark, &c.pod("other", "outsider").ip().to_string())?;
    ensure!(d["policy"] == "istioinaction/deny-other-namespace", "{d}");
    ensure!(d["rule"] == 0 && d["action"] == "DENY", "{d}");
    ensure!(
        d["src_principal"] == "cluster.local/ns/other/sa/outsider",
        "{d}"
    );
    // The tunnel was refused with 403 on the source side too.
    let refused = c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["outcome"] == "denied"
    })?;
    ensure!(refused["status"] == 403, "{refused}");
    // Everyone else still gets through: the DENY needs an mTLS peer from `other`.
    for from in [("istioinaction", "client"), ("default", "sleep")] {
        ensure!(get(&c, from, &webapp)?, "{from:?} should be allowed");
    }
    Ok(())
}

#[test]
fn a_new_deny_cuts_open_connections_it_matches() -> Result<()> {
    let c = start()?;
    let _echo = c.pod("istioinaction", "webapp").tcp_echo(9000)?;
    let echo = addr(&c, "istioinaction", "webapp", 9000);
    let chat = |from: (&str, &str)| {
        c.pod(from.0, from.1).spawn_probe(&[
            "chat",
            "--addr",
            &echo,
            "--messages",
            "one,two",
            "--gap-ms",
            "3000",
            "--timeout-ms",
            "10000",
        ])
    };
    let mut from_client = chat(("istioinaction", "client"))?;
    let mut from_neighbour = chat(("istioinaction", "neighbour"))?;
    from_client.wait_for_json(0, WAIT, |v| v["event"] == "connected")?;
    from_neighbour.wait_for_json(0, WAIT, |v| v["event"] == "connected")?;
    let mark = c.log_mark(2);
    c.apply(
        "deny-client.yaml",
        Some(&authorization_policy(
            "istioinaction",
            "deny-client",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/istioinaction/sa/client\"]\n",
        )),
    )?;
    let cut = from_client.wait_for_json(0, WAIT, |v| v.get("event").is_none())?;
    ensure!(cut["error"].is_string(), "client's chat must be cut: {cut}");
    let line = c.wait_for_connection(2, mark, WAIT, |l| {
        l["direction"] == "inbound" && l["outcome"] == "revoked"
    })?;
    ensure!(line["hbone"] == true, "{line}");
    ensure!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("istioinaction/deny-client")),
        "{line}"
    );
    // The neighbour's connection (same node, another identity) is not affected.
    let done = from_neighbour.wait_for_json(0, WAIT, |v| v.get("event").is_none())?;
    ensure!(
        done["replies"] == serde_json::json!(["one", "two"]),
        "{done}"
    );
    Ok(())
}

#[test]
fn bad_authorization_policies_are_rejected_with_file_and_line() -> Result<()> {
    let c = start()?;
    let mark = c.log_mark(2);
    c.write_raw(
        "bad.yaml",
        &authorization_policy(
            "istioinaction",
            "bad",
            "  rules:\n  - from:\n    - source:\n        principal: [\"x\"]\n",
        ),
    )?;
    let rejected = c.wait_for_log_since(2, mark, WAIT, |l| {
        l["file"].as_str().is_some_and(|f| f.ends_with("bad.yaml"))
    })?;
    ensure!(
        rejected["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unknown field `principal`")),
        "{rejected}"
    );
    ensure!(rejected["line"] == 10, "{rejected}");
    ensure!(c.proxy_running(1) && c.proxy_running(2));
    Ok(())
}

/// `curl` in pod `ns/name` with `options`, then each of `urls` (on one connection when curl can
/// reuse it): the status codes, and everything it printed.
#[test]
fn l7_paths_and_methods_are_decided_per_request() -> Result<()> {
    let c = start()?;
    let webapp = c.pod("istioinaction", "webapp");
    let mut server =
        webapp.spawn_probe(&["http-server-ka", "--port", "8080", "--name", "webapp"])?;
    server.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let _echo = webapp.tcp_echo(9000)?;
    c.apply(
        "allow-catalog.yaml",
        Some(&authorization_policy(
            "istioinaction",
            "allow-catalog-requests-in-web-app",
            "  selector:\n    matchLabels:\n      app: webapp\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths: [\"/api/catalog*\"]\n        methods: [GET]\n",
        )),
    )?;
    let base = format!("http://{}", addr(&c, "istioinaction", "webapp", 8080));
    let (catalog, hello) = (format!("{base}/api/catalog/items"), format!("{base}/hello"));

    // Across nodes (HBONE), on the same node, and in plaintext: each request on its own, two
    // of them on one keep-alive connection.
    for from in [
        ("istioinaction", "client"),
        ("istioinaction", "neighbour"),
        ("default", "sleep"),
    ] {
        let mark = c.log_mark(2);
        let (codes, text) = c.pod(from.0, from.1).curl(&[], &[&catalog, &hello])?;
        ensure!(codes == [200, 403], "{from:?}: {text}");
        ensure!(
            text.lines().nth(1).is_some_and(|l| l.ends_with(" 0")),
            "{from:?}: the second request should reuse the connection: {text}"
        );
        let denied = c.wait_for_log_since(2, mark, WAIT, |l| {
            l["message"] == "authorization denied" && l["path"] == "/hello"
        })?;
        ensure!(denied["method"] == "GET", "{denied}");
        let allowed = c.wait_for_log_since(2, mark, WAIT, |l| {
            l["message"] == "http request" && l["path"] == "/api/catalog/items"
        })?;
        ensure!(
            allowed["response_code"] == 200
                && allowed["authz_policy"] == "istioinaction/allow-catalog-requests-in-web-app",
            "{allowed}"
        );
    }
    // The method counts too, and the denial's body is Istio's.
    let (codes, text) = c
        .pod("istioinaction", "client")
        .curl(&["-X", "POST"], &[&catalog])?;
    ensure!(codes == [403], "{text}");
    let body = c
        .pod("istioinaction", "client")
        .run(&["curl", "-sS", "--max-time", "5", &hello], WAIT)?;
    ensure!(
        String::from_utf8_lossy(&body.stdout) == "RBAC: access denied",
        "{body:?}"
    );

    // What is not HTTP cannot satisfy an HTTP rule: the ALLOW does not match, so it is denied.
    let mark = c.log_mark(2);
    let echo = addr(&c, "istioinaction", "webapp", 9000);
    let out = c.pod("istioinaction", "client").probe(&[
        "chat",
        "--addr",
        &echo,
        "--messages",
        "not-http",
        "--timeout-ms",
        "5000",
    ])?;
    ensure!(
        out.code != Some(0),
        "opaque traffic should be denied: {}",
        out.stdout
    );
    c.wait_for_log_since(2, mark, WAIT, |l| {
        l["message"] == "authorization denied"
            && l["dst_port"] == 9000
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("none of their rules matched"))
    })?;
    Ok(())
}

/// `nghttp` (nghttp2's client, HTTP/2 with prior knowledge) in pod `ns/name`: all of `urls` as
/// concurrent streams of one connection; the status of each, in the order of `urls`.
fn nghttp(c: &Cluster, from: (&str, &str), urls: &[&str]) -> Result<(Vec<u16>, String)> {
    let mut all = vec!["nghttp", "-v", "-n", "-t", "5"];
    all.extend_from_slice(urls);
    let out = c.pod(from.0, from.1).run(&all, WAIT)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // `recv (stream_id=13) :status: 200`; streams are opened in the order of the URLs.
    let mut statuses: Vec<(u32, u16)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("recv (stream_id=")?.1;
            let (id, rest) = rest.split_once(')')?;
            let status = rest.trim().strip_prefix(":status: ")?;
            Some((id.parse().ok()?, status.trim().parse().ok()?))
        })
        .collect();
    statuses.sort_unstable();
    let connections = text.matches("Connected").count();
    ensure!(connections == 1, "expected one connection: {text}");
    Ok((statuses.into_iter().map(|(_, s)| s).collect(), text))
}

/// HTTP/2 (prior knowledge) is decided per request stream too: two streams multiplexed on one
/// connection get different answers, and the allowed one reaches the server as HTTP/2.
#[test]
fn l7_http2_streams_are_decided_per_request() -> Result<()> {
    let c = start()?;
    let catalog = c.pod("istioinaction", "catalog");
    let mut server = catalog.spawn_probe(&["h2-server", "--port", "8081", "--name", "catalog"])?;
    server.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    c.apply(
        "catalog-h2.yaml",
        Some(&authorization_policy(
            "istioinaction",
            "catalog-items-only",
            "  selector:\n    matchLabels:\n      app: catalog\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths: [\"/items*\"]\n        ports: [\"8081\"]\n",
        )),
    )?;
    let base = format!("http://{}", addr(&c, "istioinaction", "catalog", 8081));
    let (items, admin) = (format!("{base}/items/1"), format!("{base}/admin"));
    // Across nodes (HBONE) and on the same node.
    for from in [("istioinaction", "client"), ("istioinaction", "webapp")] {
        let mark = c.log_mark(2);
        let (codes, text) = nghttp(&c, from, &[&items, &admin])?;
        ensure!(codes == [200, 403], "{from:?}: {codes:?}: {text}");
        let allowed = c.wait_for_log_since(2, mark, WAIT, |l| {
            l["message"] == "http request" && l["path"] == "/items/1"
        })?;
        ensure!(
            allowed["response_code"] == 200
                && allowed["authz_policy"] == "istioinaction/catalog-items-only",
            "{allowed}"
        );
        c.wait_for_log_since(2, mark, WAIT, |l| {
            l["message"] == "authorization denied" && l["path"] == "/admin"
        })?;
    }
    // curl too; the server saw an HTTP/2 request (the proxy keeps the version upstream).
    let body = c.pod("istioinaction", "client").run(
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "--http2-prior-knowledge",
            &items,
        ],
        WAIT,
    )?;
    let reply: Value = serde_json::from_slice(&body.stdout).with_context(|| format!("{body:?}"))?;
    ensure!(
        reply["version"] == "HTTP/2.0" && reply["path"] == "/items/1",
        "{reply}"
    );
    Ok(())
}

#[test]
fn jwt_protected_service_users_get_admins_everything() -> Result<()> {
    let c = start()?;
    let idp = IdentityProvider::new("auth@istioinaction.io");
    let webapp = c.pod("istioinaction", "webapp");
    let mut server =
        webapp.spawn_probe(&["http-server-ka", "--port", "8080", "--name", "webapp"])?;
    server.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let policies = format!(
        "{}---\n{}---\n{}",
        common::istio(
            "RequestAuthentication",
            "istioinaction",
            "jwt-token-request-authn",
            &format!(
                "  selector:\n    matchLabels:\n      app: webapp\n  jwtRules:\n  - issuer: auth@istioinaction.io\n    jwks: '{}'\n",
                idp.jwks
            ),
        ),
        authorization_policy(
            "istioinaction",
            "allow-all-with-jwt-to-webapp",
            "  selector:\n    matchLabels:\n      app: webapp\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"auth@istioinaction.io/*\"]\n    to:\n    - operation:\n        methods: [GET]\n",
        ),
        authorization_policy(
            "istioinaction",
            "allow-mesh-all-ops-admin",
            "  selector:\n    matchLabels:\n      app: webapp\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"auth@istioinaction.io/*\"]\n    when:\n    - key: request.auth.claims[group]\n      values: [admin]\n",
        ),
    );
    c.apply("jwt.yaml", Some(&policies))?;
    let url = format!(
        "http://{}/api/catalog",
        addr(&c, "istioinaction", "webapp", 8080)
    );
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let (user, admin) = (
        idp.token("user", "user", 600),
        idp.token("admin", "admin", 600),
    );
    let expired = idp.token("user", "user", -3600);
    let forged = IdentityProvider::new("auth@istioinaction.io").token("admin", "admin", 600);
    let client = ("istioinaction", "client");
    for (what, options, expected) in [
        ("no token: requestPrincipals required", vec![], 403),
        (
            "expired token",
            vec!["-H".to_owned(), bearer(&expired)],
            401,
        ),
        (
            "token of another issuer key",
            vec!["-H".to_owned(), bearer(&forged)],
            401,
        ),
        (
            "garbage token",
            vec!["-H".to_owned(), bearer("abc.def.ghi")],
            401,
        ),
        ("user GET", vec!["-H".to_owned(), bearer(&user)], 200),
        (
            "user POST",
            vec![
                "-X".to_owned(),
                "POST".to_owned(),
                "-H".to_owned(),
                bearer(&user),
            ],
            403,
        ),
        (
            "admin POST",
            vec![
                "-X".to_owned(),
                "POST".to_owned(),
                "-H".to_owned(),
                bearer(&admin),
            ],
            200,
        ),
    ] {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        let (codes, text) = c.pod(client.0, client.1).curl(&options, &[&url])?;
        ensure!(
            codes == [expected],
            "{what}: expected {expected}, got {text}"
        );
    }
    // The proxy says who the user was, and why a token failed.
    let logs = c.logs(2);
    ensure!(
        logs.iter().any(|l| l["message"] == "http request"
            && l["request_principal"] == "auth@istioinaction.io/admin"
            && l["response_code"] == 200),
        "no request logged with the admin's request principal"
    );
    ensure!(
        logs.iter().any(|l| l["message"] == "authentication failed"
            && l["reason"].as_str().is_some_and(|r| r.contains("Expired"))),
        "no authentication failure logged for the expired token"
    );
    Ok(())
}

#[test]
fn custom_ext_authz_decides_first_then_deny_and_allow() -> Result<()> {
    let c = start()?;
    // The provider: Istio's sample behaviour, in a pod outside the mesh, behind a Service.
    c.set_pod_labels("default", "sleep", &[("app", "ext-authz")])?;
    c.set_service(
        ztunnel_tests::service("default", "ext-authz")
            .selector(&[("app", "ext-authz")])
            .port(8000, 8000),
    )?;
    let mut provider = c
        .pod("default", "sleep")
        .spawn_probe(&["ext-authz", "--port", "8000"])?;
    provider.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let webapp = c.pod("istioinaction", "webapp");
    let mut server =
        webapp.spawn_probe(&["http-server-ka", "--port", "8080", "--name", "webapp"])?;
    server.wait_for_json(0, WAIT, |v| v["event"] == "listening")?;
    let mesh = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    extensionProviders:\n    - name: sample-ext-authz-http\n      envoyExtAuthzHttp:\n        service: ext-authz.default.svc.cluster.local\n        port: 8000\n        includeRequestHeadersInCheck: [x-ext-authz]\n        headersToDownstreamOnDeny: [x-ext-authz-check-result]\n";
    let policies = format!(
        "{mesh}---\n{}---\n{}",
        authorization_policy(
            "istioinaction",
            "ext-authz",
            "  selector:\n    matchLabels:\n      app: webapp\n  action: CUSTOM\n  provider:\n    name: sample-ext-authz-http\n  rules:\n  - to:\n    - operation:\n        paths: [\"/headers*\"]\n",
        ),
        authorization_policy(
            "istioinaction",
            "deny-secret",
            "  selector:\n    matchLabels:\n      app: webapp\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/headers/secret\"]\n",
        ),
    );
    c.apply("ext-authz.yaml", Some(&policies))?;
    let base = format!("http://{}", addr(&c, "istioinaction", "webapp", 8080));
    let client = c.pod("istioinaction", "client");
    let fetch = |path: &str, header: &str| -> Result<String> {
        let url = format!("{base}{path}");
        let out = client.run(
            &["curl", "-sS", "-i", "--max-time", "5", "-H", header, &url],
            WAIT,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let status = |response: &str| response.split_whitespace().nth(1).unwrap_or("").to_owned();

    let allowed = fetch("/headers", "x-ext-authz: allow")?;
    ensure!(status(&allowed) == "200", "{allowed}");
    let check = provider.wait_for_json(0, WAIT, |v| v["event"] == "check")?;
    ensure!(
        check["path"] == "/headers" && check["x-ext-authz"] == "allow" && check["method"] == "GET",
        "the provider saw the request as sent: {check}"
    );

    let denied = fetch("/headers", "x-ext-authz: deny")?;
    ensure!(status(&denied) == "403", "{denied}");
    ensure!(
        denied.contains("x-ext-authz-check-result: denied")
            && denied.contains("denied by ext_authz for not found header"),
        "the provider's status, header and body reach the client: {denied}"
    );
    // CUSTOM allowing does not skip DENY.
    let secret = fetch("/headers/secret", "x-ext-authz: allow")?;
    ensure!(status(&secret) == "403", "{secret}");
    ensure!(secret.contains("RBAC: access denied"), "{secret}");
    // Requests the CUSTOM policy does not cover are not sent to the provider.
    let checks_before = provider.json_lines().len();
    let other = fetch("/other", "x-ext-authz: deny")?;
    ensure!(status(&other) == "200", "{other}");
    ensure!(
        provider.json_lines().len() == checks_before,
        "the provider was asked about /other"
    );
    // The provider down: the CUSTOM policy denies (no failOpen).
    provider.kill();
    let down = fetch("/headers", "x-ext-authz: allow")?;
    ensure!(status(&down) == "403", "{down}");
    Ok(())
}
