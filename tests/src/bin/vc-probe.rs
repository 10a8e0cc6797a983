//! `vc-probe`: a tiny client/server tool run inside the virtual cluster's pods.
//!
//! ```text
//! vc-probe http-server --port P [--name N]     one JSON reply per request, Connection: close
//! vc-probe tcp-echo --port P                    echoes every byte back
//! vc-probe h2-server --port P [--name N]       HTTP/2 with prior knowledge (h2c): one JSON
//!                                               reply per request stream; a gRPC request
//!                                               (content-type application/grpc) gets an empty
//!                                               message and the trailer grpc-status its
//!                                               x-grpc-status header asks for (default 0)
//! vc-probe get --addr IP:PORT [--path /x] [--delay-ms N] [--timeout-ms N]
//!                                               with --delay-ms, waits that long after
//!                                               connecting before it sends the request
//! vc-probe connect --addr IP:PORT [--send TEXT] [--reset true] [--timeout-ms N]
//!                                               sends TEXT, shuts its write side down and
//!                                               reads to EOF (`received_bytes`, `received`
//!                                               up to 64 KiB); with --reset, resets (RST)
//!                                               after sending instead
//! vc-probe chat --addr IP:PORT [--messages a,b] [--gap-ms N]
//!                                               one connection to a tcp-echo server: waits
//!                                               gap-ms before each message and checks its echo;
//!                                               with no messages, holds the idle connection
//! vc-probe tcp-app --port P [--banner TEXT] [--reply-bytes N] [--reset-after-read true]
//!                                               a TCP server for data-path fidelity: greets
//!                                               with `TEXT\r\n` first (a server-first
//!                                               protocol) if asked; reads until the client's
//!                                               FIN, then sends N bytes and closes; or resets
//!                                               (RST) as soon as it has read a byte. Prints
//!                                               `{"event":"ended","read":n,"how":...}` per
//!                                               connection (`eof`, `reset sent`, an error kind)
//! vc-probe greeting --addr IP:PORT [--timeout-ms N]
//!                                               connects and reads the server's first line
//!                                               without sending: `{"banner","first_byte_ms"}`
//! vc-probe repl [--timeout-ms N]                reads `get ADDR [PATH]` / `connect ADDR [TEXT]`
//!                                               lines from stdin, one JSON result line each
//! vc-probe transfer --addr IP:PORT --bytes N [--streams S] [--timeout-ms N] [--retry-eagain true]
//!                                               S parallel connections to a tcp-echo server:
//!                                               each sends N bytes of its own pseudo-random
//!                                               stream, half-closes, reads the echo to EOF and
//!                                               checks every byte against the stream
//!
//! For the benchmark (`cargo xtask bench`, docs/benchmarks.md):
//! vc-probe http-server-ka --port P [--name N] [--version V] [--fail-every K]
//!                                               HTTP/1.1 keep-alive server (closes only when the
//!                                               client asks); no per-request output. Paths
//!                                               like httpbin's: /status/<code> answers that
//!                                               status, /delay/<ms> answers after that long,
//!                                               /bytes/<n> with a body of n bytes; otherwise
//!                                               `{"server":N,"version":V}`. With K > 0 every
//!                                               K-th request is answered 503
//! vc-probe requests --addr IP:PORT --count N [--concurrency C] [--path P]
//!                   [--header 'name: value']... [--timeout-ms T]
//!                                               N GETs over C keep-alive connections; one JSON
//!                                               line: statuses, servers and versions that
//!                                               answered, `overloaded` (x-envoy-overloaded),
//!                                               errors, timeouts, max_ms
//! vc-probe http-load --addr IP:PORT --rate R --duration-ms D --connections C
//!                                               open-loop GETs at R/s over C keep-alive
//!                                               connections; latency from the scheduled time
//! vc-probe conn-rate --addr IP:PORT --duration-ms D --concurrency N
//!                                               N loops of connect, GET (Connection: close),
//!                                               read to EOF, close
//! vc-probe hold --addr IP:PORT --count N --hold-ms T
//!                                               opens N connections to a tcp-echo server (one
//!                                               echoed byte each), prints `{"opened":n,...}`,
//!                                               holds them T ms
//! ```
//! The benchmark commands print one JSON result line (`hold`: one when all are open, one at the
//! end) and exit 0 only if nothing failed.
//! Servers print `{"event":"listening",...}` once they accept connections and
//! `{"event":"accept","peer":...}` for every accepted connection, on stdout.
//! `get` exits 0 on HTTP 200, 1 on a connect or I/O error (`{"error":...,"kind":...}`), 3 on any
//! other status; `connect` exits 0 or 1.
use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::Mutex,
    time::Duration,
};

use serde_json::{json, Value};

static STDOUT: Mutex<()> = Mutex::new(());

/// Prints one JSON line, whole, even with many threads printing.
fn emit(v: &Value) {
    let _g = STDOUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!(
            "usage: vc-probe http-server|h2-server|tcp-echo|tcp-app|get|connect|greeting|repl|transfer|\
             http-server-ka|http-load|conn-rate|hold [options]"
        );
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vc-probe: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = Duration::from_millis(opts.num("timeout-ms").unwrap_or(5000));
    match cmd.as_str() {
        "http-server" | "tcp-echo" => {
            let Some(port) = opts.num("port") else {
                eprintln!("vc-probe: --port is required");
                return ExitCode::from(2);
            };
            let name = opts.get("name").unwrap_or("server").to_owned();
            match serve(cmd == "http-server", port as u16, name) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vc-probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "h2-server" => {
            let Some(port) = opts.num("port") else {
                eprintln!("vc-probe: --port is required");
                return ExitCode::from(2);
            };
            let name = opts.get("name").unwrap_or("server").to_owned();
            match h2_server(port as u16, name) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vc-probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "tcp-app" => {
            let Some(port) = opts.num("port") else {
                eprintln!("vc-probe: --port is required");
                return ExitCode::from(2);
            };
            let app = TcpApp {
                banner: opts.get("banner").map(str::to_owned),
                reply_bytes: opts.num("reply-bytes").unwrap_or(0) as usize,
                reset_after_read: opts.get("reset-after-read") == Some("true"),
            };
            match tcp_app(port as u16, app) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vc-probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "greeting" => {
            let Some(addr) = opts.get("addr") else {
                eprintln!("vc-probe: --addr is required");
                return ExitCode::from(2);
            };
            let (code, out) = greeting(addr, timeout);
            emit(&out);
            ExitCode::from(code)
        }
        "ext-authz" => {
            let Some(port) = opts.num("port") else {
                eprintln!("vc-probe: --port is required");
                return ExitCode::from(2);
            };
            match ext_authz(port as u16) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vc-probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "get" | "connect" => {
            let Some(addr) = opts.get("addr") else {
                eprintln!("vc-probe: --addr is required");
                return ExitCode::from(2);
            };
            let (code, out) = if cmd == "get" {
                let delay = Duration::from_millis(opts.num("delay-ms").unwrap_or(0));
                get(addr, opts.get("path").unwrap_or("/"), delay, timeout)
            } else {
                let reset = opts.get("reset") == Some("true");
                connect(addr, opts.get("send"), reset, timeout)
            };
            emit(&out);
            ExitCode::from(code)
        }
        "repl" => {
            repl(timeout);
            ExitCode::SUCCESS
        }
        "chat" => {
            let Some(addr) = opts.get("addr") else {
                eprintln!("vc-probe: --addr is required");
                return ExitCode::from(2);
            };
            let messages: Vec<&str> = opts
                .get("messages")
                .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default();
            let gap = Duration::from_millis(opts.num("gap-ms").unwrap_or(0));
            let (code, out) = chat(addr, &messages, gap, timeout);
            emit(&out);
            ExitCode::from(code)
        }
        "transfer" => match transfer::run(&opts, timeout) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vc-probe: {e}");
                ExitCode::from(2)
            }
        },
        "http-server-ka" | "http-load" | "conn-rate" | "hold" | "requests" => {
            match bench::run(cmd, &opts) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("vc-probe: {e}");
                    ExitCode::from(2)
                }
            }
        }
        other => {
            eprintln!("vc-probe: unknown command {other}");
            ExitCode::from(2)
        }
    }
}

struct Opts(Vec<(String, String)>);

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a}"))?;
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            out.push((key.to_owned(), value.clone()));
        }
        Ok(Self(out))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// Every value of a repeated option, in order.
    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn serve(http: bool, port: u16, name: String) -> io::Result<()> {
    let v4 = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    // IPv6 is optional: pods may have no IPv6 at all.
    let v6 = bind_v6_only(port).ok();
    emit(
        &json!({"event": "listening", "port": port, "ipv6": v6.is_some(), "pid": std::process::id()}),
    );
    let name: &'static str = Box::leak(name.into_boxed_str());
    if let Some(v6) = v6 {
        std::thread::spawn(move || accept_loop(v6, http, name));
    }
    accept_loop(v4, http, name);
    Ok(())
}

/// An HTTP/2 server without TLS (prior knowledge, as `curl --http2-prior-knowledge` speaks):
/// answers every request stream with `{"server","method","path","version"}`.
fn h2_server(port: u16, name: String) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        emit(
            &json!({"event": "listening", "port": port, "http2": true, "pid": std::process::id()}),
        );
        let name: &'static str = Box::leak(name.into_boxed_str());
        loop {
            let (tcp, peer) = listener.accept().await?;
            emit(&json!({"event": "accept", "peer": peer.to_string()}));
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if is_grpc(req.headers()) {
                        answer_grpc(req.headers(), &mut respond);
                        continue;
                    }
                    let body = json!({
                        "server": name,
                        "method": req.method().as_str(),
                        "path": req.uri().path(),
                        "version": format!("{:?}", req.version()),
                    })
                    .to_string();
                    let response = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(())
                        .expect("static response parts");
                    if let Ok(mut send) = respond.send_response(response, false) {
                        let _ = send.send_data(bytes::Bytes::from(body), true);
                    }
                }
            });
        }
    })
}

fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A gRPC answer: one empty message, then the trailers `grpc-status` (from the request's
/// `x-grpc-status`, default 0) and `grpc-message`.
fn answer_grpc(h: &http::HeaderMap, respond: &mut h2::server::SendResponse<bytes::Bytes>) {
    let status = h
        .get("x-grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(0);
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("static response parts");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    // A message frame: not compressed, length 0.
    let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(u16::from(status)));
    trailers.insert("grpc-message", http::HeaderValue::from_static("vc-probe"));
    let _ = send.send_trailers(trailers);
}

fn bind_v6_only(port: u16) -> io::Result<TcpListener> {
    // SAFETY: plain socket syscalls on a descriptor we own; ownership moves to TcpListener.
    unsafe {
        use std::os::fd::FromRawFd as _;
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        sa.sin6_addr.s6_addr = Ipv6Addr::UNSPECIFIED.octets();
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        ) != 0
            || libc::listen(fd, 128) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn accept_loop(listener: TcpListener, http: bool, name: &'static str) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = addr_string(stream.peer_addr());
        let local = addr_string(stream.local_addr());
        emit(&json!({"event": "accept", "peer": peer, "local": local}));
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(20)));
            if http {
                handle_http(stream, name, &peer, &local);
            } else {
                handle_echo(stream);
            }
        });
    }
}

fn handle_http(mut stream: TcpStream, name: &str, peer: &str, local: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    emit(&json!({"event": "request", "peer": peer, "method": method, "path": path}));
    let body = json!({
        "server": name, "peer": peer, "local": local, "method": method, "path": path,
        "pid": std::process::id(),
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Drain until the client closes, so the client reads everything before any RST.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
}

fn handle_echo(mut stream: TcpStream) {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn addr_string(a: io::Result<SocketAddr>) -> String {
    match a {
        Ok(a) => a.to_string(),
        Err(e) => format!("error: {e}"),
    }
}

fn error_json(stage: &str, e: &io::Error) -> Value {
    json!({"error": format!("{stage}: {e}"), "kind": kind_name(e), "errno": e.raw_os_error()})
}

/// errno kinds as short words tests can match on.
fn kind_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "unexpected eof".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        k => format!("{k:?}").to_lowercase(),
    }
}

fn open(addr: &str, timeout: Duration) -> Result<(TcpStream, String, String), Value> {
    let sa: SocketAddr = addr
        .parse()
        .map_err(|e| json!({"error": format!("bad address {addr}: {e}"), "kind": "usage"}))?;
    let stream = TcpStream::connect_timeout(&sa, timeout).map_err(|e| error_json("connect", &e))?;
    // Right after connect, before any byte moves: what the application sees.
    let local = addr_string(stream.local_addr());
    let peer = addr_string(stream.peer_addr());
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    Ok((stream, local, peer))
}

fn get(addr: &str, path: &str, delay: Duration, timeout: Duration) -> (u8, Value) {
    let (mut stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
    std::thread::sleep(delay);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: vc-probe\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(req.as_bytes()) {
        let mut v = error_json("send", &e);
        v["local"] = json!(local);
        v["peer"] = json!(peer);
        return (1, v);
    }
    let mut resp = Vec::new();
    if let Err(e) = stream.read_to_end(&mut resp) {
        let mut v = error_json("receive", &e);
        v["local"] = json!(local);
        v["peer"] = json!(peer);
        v["received"] = json!(String::from_utf8_lossy(&resp));
        return (1, v);
    }
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        let v = json!({
            "error": if resp.is_empty() { "receive: connection closed without a response".to_owned() }
                     else { format!("receive: malformed response {head:?}") },
            "kind": if resp.is_empty() { "empty response" } else { "malformed response" },
            "local": local, "peer": peer,
        });
        return (1, v);
    };
    let v = json!({"local": local, "peer": peer, "status": status, "body": body});
    (if status == 200 { 0 } else { 3 }, v)
}

fn chat(addr: &str, messages: &[&str], gap: Duration, timeout: Duration) -> (u8, Value) {
    let (mut stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
    emit(&json!({"event": "connected", "local": local, "peer": peer}));
    if messages.is_empty() {
        std::thread::sleep(gap);
    }
    let mut replies = Vec::new();
    for m in messages {
        std::thread::sleep(gap);
        let mut back = vec![0u8; m.len()];
        let exchanged = stream
            .write_all(m.as_bytes())
            .and_then(|()| stream.read_exact(&mut back));
        if let Err(e) = exchanged {
            let mut v = error_json("exchange", &e);
            v["replies"] = json!(replies);
            return (1, v);
        }
        replies.push(String::from_utf8_lossy(&back).into_owned());
    }
    (0, json!({"local": local, "peer": peer, "replies": replies}))
}

/// At most this much of what `connect` received is printed.
const MAX_PRINTED: usize = 64 * 1024;

fn connect(addr: &str, send: Option<&str>, reset: bool, timeout: Duration) -> (u8, Value) {
    let (mut stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
    if let Some(text) = send {
        if let Err(e) = stream.write_all(text.as_bytes()) {
            return (1, error_json("send", &e));
        }
    }
    if reset {
        // Give the bytes time to leave before the RST overtakes them.
        std::thread::sleep(Duration::from_millis(200));
        abort(stream);
        return (0, json!({"local": local, "peer": peer, "reset_sent": true}));
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => (
            0,
            json!({
                "local": local, "peer": peer, "received_bytes": received.len(),
                "received": String::from_utf8_lossy(&received[..received.len().min(MAX_PRINTED)]),
            }),
        ),
        Err(e) => {
            let mut v = error_json("receive", &e);
            v["local"] = json!(local);
            v["peer"] = json!(peer);
            (1, v)
        }
    }
}

/// Closes `stream` with an RST instead of a FIN (SO_LINGER with a zero timeout).
fn abort(stream: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor `stream` owns, with a local struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// What `tcp-app` does with each connection.
#[derive(Clone)]
struct TcpApp {
    banner: Option<String>,
    reply_bytes: usize,
    reset_after_read: bool,
}

fn tcp_app(port: u16, app: TcpApp) -> io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    emit(&json!({"event": "listening", "port": port, "pid": std::process::id()}));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = addr_string(stream.peer_addr());
        emit(&json!({"event": "accept", "peer": peer, "local": addr_string(stream.local_addr())}));
        let app = app.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(20)));
            let (read, how) = serve_tcp_app(stream, &app);
            emit(&json!({"event": "ended", "peer": peer, "read": read, "how": how}));
        });
    }
    Ok(())
}

/// One connection of `tcp-app`: the bytes read and how it ended.
fn serve_tcp_app(mut stream: TcpStream, app: &TcpApp) -> (usize, String) {
    if let Some(banner) = &app.banner {
        if let Err(e) = stream.write_all(format!("{banner}\r\n").as_bytes()) {
            return (0, kind_name(&e));
        }
    }
    let mut read = 0;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if app.reset_after_read => {
                abort(stream);
                return (read + n, "reset sent".into());
            }
            Ok(n) => read += n,
            Err(e) => return (read, kind_name(&e)),
        }
    }
    // The client's FIN came in; its side of the connection is still open for the reply.
    std::thread::sleep(Duration::from_millis(100));
    let reply: Vec<u8> = (0..app.reply_bytes)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    if let Err(e) = stream.write_all(&reply) {
        return (read, kind_name(&e));
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    (read, "eof".into())
}

/// Connects and waits for the server to speak first, sending nothing.
fn greeting(addr: &str, timeout: Duration) -> (u8, Value) {
    let start = std::time::Instant::now();
    let (stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
    let connect_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut line = String::new();
    let mut reader = io::BufReader::new(stream);
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => {
            let first_byte_ms = start.elapsed().as_secs_f64() * 1e3;
            let banner = line.trim_end();
            let v = json!({"local": local, "peer": peer, "banner": banner,
                           "connect_ms": connect_ms, "first_byte_ms": first_byte_ms});
            (0, v)
        }
        Ok(_) => (
            1,
            json!({"error": "closed before greeting", "kind": "unexpected eof"}),
        ),
        Err(e) => (1, error_json("receive", &e)),
    }
}

/// One long-lived client process: lets tests show capture changing under a running app.
fn repl(timeout: Duration) {
    emit(&json!({"event": "ready", "pid": std::process::id()}));
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let (code, mut v) = match (words.next(), words.next()) {
            (Some("get"), Some(addr)) => {
                get(addr, words.next().unwrap_or("/"), Duration::ZERO, timeout)
            }
            (Some("connect"), Some(addr)) => connect(addr, words.next(), false, timeout),
            (None, _) => continue,
            _ => (
                2,
                json!({"error": format!("bad command {line:?}"), "kind": "usage"}),
            ),
        };
        v["exit"] = json!(code);
        v["pid"] = json!(std::process::id());
        emit(&v);
    }
}

/// The load generators and the keep-alive server of `cargo xtask bench`.
mod bench {
    use std::{
        collections::BTreeMap,
        io::{self, Read as _, Write as _},
        net::{Shutdown, SocketAddr, TcpListener, TcpStream},
        sync::atomic::{AtomicU64, Ordering},
        time::{Duration, Instant},
    };

    use serde_json::{json, Value};

    use super::{emit, kind_name, Opts};

    /// Deadline for one connect, send or receive of the load generators.
    const IO_TIMEOUT: Duration = Duration::from_secs(2);
    /// A request or response head larger than this is refused.
    const MAX_HEAD: usize = 64 * 1024;

    /// Runs one benchmark command; `Err` is a usage error.
    pub fn run(cmd: &str, opts: &Opts) -> Result<u8, String> {
        let need = |key: &str| opts.num(key).ok_or(format!("--{key} <number> is required"));
        let addr = || -> Result<SocketAddr, String> {
            let a = opts.get("addr").ok_or("--addr IP:PORT is required")?;
            a.parse().map_err(|e| format!("bad --addr {a}: {e}"))
        };
        match cmd {
            "requests" => {
                let count = need("count")?;
                let concurrency = opts.num("concurrency").unwrap_or(1).max(1);
                let timeout = Duration::from_millis(opts.num("timeout-ms").unwrap_or(5000));
                let path = opts.get("path").unwrap_or("/").to_owned();
                let headers: Vec<String> = opts.all("header");
                emit(&requests(
                    addr()?,
                    count,
                    concurrency,
                    &path,
                    &headers,
                    timeout,
                ));
                Ok(0)
            }
            "http-server-ka" => {
                let port = u16::try_from(need("port")?).map_err(|_| "--port is too large")?;
                let name = opts.get("name").unwrap_or("server");
                let body = match opts.get("version") {
                    Some(v) => json!({"server": name, "version": v}),
                    None => json!({"server": name}),
                };
                let fail_every = opts.num("fail-every").unwrap_or(0);
                serve_keep_alive(port, body.to_string(), fail_every).map_err(|e| e.to_string())?;
                Ok(0)
            }
            "http-load" => {
                let (rate, ms, conns) = (need("rate")?, need("duration-ms")?, need("connections")?);
                if rate == 0 || conns == 0 || ms == 0 {
                    return Err("--rate, --duration-ms and --connections must be positive".into());
                }
                Ok(http_load(
                    addr()?,
                    rate,
                    Duration::from_millis(ms),
                    conns as usize,
                ))
            }
            "conn-rate" => {
                let (ms, n) = (need("duration-ms")?, need("concurrency")?);
                if n == 0 {
                    return Err("--concurrency must be positive".into());
                }
                Ok(conn_rate(addr()?, Duration::from_millis(ms), n as usize))
            }
            "hold" => {
                let (count, ms) = (need("count")?, need("hold-ms")?);
                Ok(hold(addr()?, count as usize, Duration::from_millis(ms)))
            }
            other => Err(format!("unknown command {other}")),
        }
    }

    /// Raises the soft open-files limit to the hard limit; returns the limit now in force.
    pub fn raise_nofile() -> u64 {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a local struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return 0;
            }
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    return want.rlim_cur;
                }
            }
        }
        lim.rlim_cur
    }

    /// Lets this thread's sleeps end close to when they were asked to (default slack: 50 µs).
    fn precise_sleeps() {
        // SAFETY: prctl with an integer argument; affects only the calling thread.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        }
    }

    fn err_text(stage: &str, e: &io::Error) -> String {
        format!("{stage}: {e} ({})", kind_name(e))
    }

    // ---- HTTP/1.1 framing, just enough for small GETs ------------------------------------

    /// A connection with its unread bytes (requests or responses may arrive in pieces).
    struct Conn {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    /// One parsed message head.
    struct Head {
        /// Request target or status code, the second word of the first line.
        second_word: String,
        close: bool,
        /// The head's header lines and the body, when asked for ([`Conn::read_whole`]).
        headers: String,
        body: Vec<u8>,
    }

    impl Conn {
        fn new(stream: TcpStream) -> Self {
            let _ = stream.set_nodelay(true);
            Self {
                stream,
                buf: Vec::with_capacity(4096),
            }
        }

        /// Reads one message head and its body (by Content-Length); `None` on a clean EOF
        /// before any byte of it.
        fn read_message(&mut self) -> io::Result<Option<Head>> {
            self.read(false)
        }

        /// [`Conn::read_message`], keeping the header lines and the body.
        fn read_whole(&mut self) -> io::Result<Option<Head>> {
            self.read(true)
        }

        fn read(&mut self, keep: bool) -> io::Result<Option<Head>> {
            let end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
                }
                if !self.fill()? {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            };
            let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            let mut lines = text.split("\r\n");
            let second_word = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("")
                .to_owned();
            let (mut content_length, mut close) = (0usize, false);
            let mut headers = String::new();
            for line in lines {
                if keep {
                    headers.push_str(line);
                    headers.push('\n');
                }
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                    })?;
                } else if k.eq_ignore_ascii_case("connection") {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
            while self.buf.len() < end + content_length {
                if !self.fill()? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            let body = match keep {
                true => self.buf[end..end + content_length].to_vec(),
                false => Vec::new(),
            };
            self.buf.drain(..end + content_length);
            Ok(Some(Head {
                second_word,
                close,
                headers,
                body,
            }))
        }

        /// Reads more bytes into the buffer; false on EOF.
        fn fill(&mut self) -> io::Result<bool> {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            self.buf.extend_from_slice(&chunk[..n]);
            Ok(n > 0)
        }
    }

    fn get_request(addr: SocketAddr, close: bool) -> Vec<u8> {
        let connection = if close { "close" } else { "keep-alive" };
        format!(
            "GET /bench HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: vc-probe\r\nConnection: {connection}\r\n\r\n"
        )
        .into_bytes()
    }

    // ---- requests -----------------------------------------------------------------------

    /// What `requests` saw: statuses, the servers and versions that answered, how many
    /// answers were a proxy's overflow (`x-envoy-overloaded`), failures, and the slowest.
    #[derive(Default)]
    struct Seen {
        statuses: BTreeMap<String, u64>,
        servers: BTreeMap<String, u64>,
        versions: BTreeMap<String, u64>,
        overloaded: u64,
        errors: u64,
        timeouts: u64,
        max_ms: u64,
        last_error: Option<String>,
    }

    /// `count` GETs of `path` in all, over `concurrency` keep-alive connections (a closed one
    /// is opened again), each bounded by `timeout`.
    fn requests(
        addr: SocketAddr,
        count: u64,
        concurrency: u64,
        path: &str,
        headers: &[String],
        timeout: Duration,
    ) -> Value {
        let mut extra = String::new();
        for h in headers {
            extra.push_str(h);
            extra.push_str("\r\n");
        }
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: vc-probe\r\n{extra}\r\n");
        let seen = std::sync::Mutex::new(Seen::default());
        std::thread::scope(|scope| {
            for t in 0..concurrency {
                let n = count / concurrency + u64::from(t < count % concurrency);
                let (req, seen) = (&req, &seen);
                scope.spawn(move || {
                    let mut conn: Option<Conn> = None;
                    for _ in 0..n {
                        let start = Instant::now();
                        let r = one_request(&mut conn, addr, req.as_bytes(), timeout);
                        let ms = start.elapsed().as_millis() as u64;
                        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                        s.max_ms = s.max_ms.max(ms);
                        match r {
                            Ok(h) => {
                                *s.statuses.entry(h.second_word.clone()).or_default() += 1;
                                if h.headers
                                    .to_ascii_lowercase()
                                    .contains("x-envoy-overloaded: true")
                                {
                                    s.overloaded += 1;
                                }
                                if let Ok(b) = serde_json::from_slice::<Value>(&h.body) {
                                    if let Some(v) = b["server"].as_str() {
                                        *s.servers.entry(v.to_owned()).or_default() += 1;
                                    }
                                    if let Some(v) = b["version"].as_str() {
                                        *s.versions.entry(v.to_owned()).or_default() += 1;
                                    }
                                }
                            }
                            Err(e) => {
                                conn = None;
                                s.errors += 1;
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                                ) {
                                    s.timeouts += 1;
                                }
                                s.last_error = Some(kind_name(&e));
                            }
                        }
                    }
                });
            }
        });
        let s = seen.into_inner().unwrap_or_else(|p| p.into_inner());
        json!({
            "sent": count, "statuses": s.statuses, "servers": s.servers, "versions": s.versions,
            "overloaded": s.overloaded, "errors": s.errors, "timeouts": s.timeouts,
            "max_ms": s.max_ms, "last_error": s.last_error,
        })
    }

    fn one_request(
        conn: &mut Option<Conn>,
        addr: SocketAddr,
        req: &[u8],
        timeout: Duration,
    ) -> io::Result<Head> {
        if conn.is_none() {
            let stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            *conn = Some(Conn::new(stream));
        }
        let c = conn.as_mut().expect("just opened");
        c.stream.write_all(req)?;
        let head = c
            .read_whole()?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if head.close {
            *conn = None;
        }
        Ok(head)
    }

    // ---- http-server-ka ----------------------------------------------------------------

    fn serve_keep_alive(port: u16, body: String, fail_every: u64) -> io::Result<()> {
        let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
        emit(&json!({
            "event": "listening", "port": port, "keep_alive": true, "pid": std::process::id(),
        }));
        let body: &'static str = Box::leak(body.into_boxed_str());
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            std::thread::spawn(move || serve_connection(stream, body, fail_every));
        }
        Ok(())
    }

    /// Requests answered so far, for `--fail-every`.
    static ANSWERED: AtomicU64 = AtomicU64::new(0);

    /// Answers requests on one connection until the client closes it or asks to; with
    /// `fail_every` K > 0, every K-th request of the server is answered 503.
    fn serve_connection(stream: TcpStream, body: &str, fail_every: u64) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
        let mut conn = Conn::new(stream);
        loop {
            let head = match conn.read_message() {
                Ok(Some(h)) => h,
                Ok(None) | Err(_) => return,
            };
            let connection = if head.close { "close" } else { "keep-alive" };
            let mut answer = Answer::for_target(&head.second_word);
            let n = ANSWERED.fetch_add(1, Ordering::Relaxed) + 1;
            if fail_every > 0 && n.is_multiple_of(fail_every) {
                answer.status = 503;
            }
            if let Some(delay) = answer.delay {
                std::thread::sleep(delay);
            }
            let body = match answer.bytes {
                Some(n) => "x".repeat(n),
                None => body.to_owned(),
            };
            let resp = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: {connection}\r\n\r\n{body}",
                answer.status,
                answer.reason(),
                body.len()
            );
            if conn.stream.write_all(resp.as_bytes()).is_err() {
                return;
            }
            if head.close {
                let _ = conn.stream.shutdown(Shutdown::Write);
                // Drain until the client closes, so it reads everything before any RST.
                let _ = conn.stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut chunk = [0u8; 1024];
                while matches!(conn.stream.read(&mut chunk), Ok(n) if n > 0) {}
                return;
            }
        }
    }

    /// What `http-server-ka` answers a request target with.
    #[derive(Debug, PartialEq)]
    struct Answer {
        status: u16,
        delay: Option<Duration>,
        bytes: Option<usize>,
    }

    impl Answer {
        /// `/status/<code>`, `/delay/<ms>` (at most 10 s), `/bytes/<n>` (at most 1 MiB), or
        /// 200 with the server's name.
        fn for_target(target: &str) -> Self {
            let path = target.split('?').next().unwrap_or("");
            let mut words = path.trim_start_matches('/').splitn(2, '/');
            let (verb, arg) = (
                words.next(),
                words.next().and_then(|a| a.parse::<u64>().ok()),
            );
            let mut a = Answer {
                status: 200,
                delay: None,
                bytes: None,
            };
            match (verb, arg) {
                (Some("status"), Some(code)) if (200..=599).contains(&code) => {
                    a.status = code as u16
                }
                (Some("delay"), Some(ms)) => a.delay = Some(Duration::from_millis(ms.min(10_000))),
                (Some("bytes"), Some(n)) => a.bytes = Some(n.min(1 << 20) as usize),
                _ => {}
            }
            a
        }

        fn reason(&self) -> &'static str {
            match self.status {
                200 => "OK",
                400..=499 => "Client Error",
                500..=599 => "Server Error",
                _ => "Status",
            }
        }
    }

    #[cfg(test)]
    #[test]
    fn answers_follow_the_path() {
        let a = |t| Answer::for_target(t);
        assert_eq!(a("/status/503").status, 503);
        assert_eq!(a("/status/99").status, 200);
        assert_eq!(a("/delay/300?x=1").delay, Some(Duration::from_millis(300)));
        assert_eq!(a("/delay/99999").delay, Some(Duration::from_secs(10)));
        assert_eq!(a("/bytes/5").bytes, Some(5));
        assert_eq!(
            a("/bench"),
            Answer {
                status: 200,
                delay: None,
                bytes: None
            }
        );
    }

    // ---- http-load ---------------------------------------------------------------------

    fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| err_text("connect", &e))?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        Ok(Conn::new(stream))
    }

    /// One request/response on a keep-alive connection.
    fn round_trip(conn: &mut Conn, req: &[u8]) -> Result<(), String> {
        conn.stream
            .write_all(req)
            .map_err(|e| err_text("send", &e))?;
        match conn.read_message() {
            Ok(Some(h)) if h.second_word == "200" && !h.close => Ok(()),
            Ok(Some(h)) if h.second_word == "200" => Err("server closed the connection".into()),
            Ok(Some(h)) => Err(format!("status {}", h.second_word)),
            Ok(None) => Err("receive: connection closed without a response".into()),
            Err(e) => Err(err_text("receive", &e)),
        }
    }

    /// What one load thread measured.
    #[derive(Default)]
    struct Tally {
        latencies_us: Vec<u64>,
        errors: u64,
        first_error: Option<String>,
    }

    impl Tally {
        fn error(&mut self, e: String) {
            self.errors += 1;
            self.first_error.get_or_insert(e);
        }
        fn merge(&mut self, other: Tally) {
            self.latencies_us.extend(other.latencies_us);
            self.errors += other.errors;
            if self.first_error.is_none() {
                self.first_error = other.first_error;
            }
        }
    }

    /// Nearest-rank percentile of sorted values.
    fn percentile(sorted: &[u64], p: f64) -> u64 {
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// Open loop: request `i` is due at `t0 + i/rate` and goes on connection `i % conns`; its
    /// latency runs from when it was due, so a stalled connection delays (and is charged for)
    /// every request queued behind it rather than silently lowering the rate.
    fn http_load(addr: SocketAddr, rate: u64, duration: Duration, conns: usize) -> u8 {
        let total = (rate as u128 * duration.as_millis() / 1000) as u64;
        let period_ns = 1_000_000_000u64 / rate;
        let req = get_request(addr, false);
        // Connect and warm every connection first: setup is not what is measured here.
        let mut opened = Vec::with_capacity(conns);
        for _ in 0..conns {
            match connect(addr).and_then(|mut c| round_trip(&mut c, &req).map(|()| c)) {
                Ok(c) => opened.push(c),
                Err(e) => {
                    emit(
                        &json!({"requests": 0, "errors": total, "error": format!("warm-up: {e}")}),
                    );
                    return 1;
                }
            }
        }
        let t0 = Instant::now() + Duration::from_millis(20);
        let mut tally = Tally::default();
        std::thread::scope(|s| {
            let handles: Vec<_> = opened
                .into_iter()
                .enumerate()
                .map(|(c, conn)| {
                    let req = &req;
                    s.spawn(move || {
                        precise_sleeps();
                        let mut conn = Some(conn);
                        let mut t = Tally::default();
                        for i in (c as u64..total).step_by(conns) {
                            let due = t0 + Duration::from_nanos(i * period_ns);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                            let c = match conn.take() {
                                Some(c) => Ok(c),
                                None => connect(addr),
                            };
                            let result = c.and_then(|mut c| round_trip(&mut c, req).map(|()| c));
                            match result {
                                Ok(c) => {
                                    t.latencies_us.push(due.elapsed().as_micros() as u64);
                                    conn = Some(c);
                                }
                                // The connection is dropped; the next request opens another.
                                Err(e) => t.error(e),
                            }
                        }
                        t
                    })
                })
                .collect();
            for h in handles {
                tally.merge(h.join().unwrap_or_default());
            }
        });
        let elapsed = t0.elapsed();
        let mut lat = tally.latencies_us;
        lat.sort_unstable();
        let mean = if lat.is_empty() {
            0
        } else {
            lat.iter().sum::<u64>() / lat.len() as u64
        };
        emit(&json!({
            "requests": lat.len(), "errors": tally.errors, "scheduled": total,
            "p50_us": percentile(&lat, 50.0), "p90_us": percentile(&lat, 90.0),
            "p99_us": percentile(&lat, 99.0), "max_us": lat.last().copied().unwrap_or(0),
            "mean_us": mean, "rate": rate, "connections": conns,
            "duration_ms": duration.as_millis() as u64, "elapsed_ms": elapsed.as_millis() as u64,
            "first_error": tally.first_error,
        }));
        u8::from(tally.errors > 0 || lat.is_empty())
    }

    // ---- conn-rate ---------------------------------------------------------------------

    /// connect, GET with `Connection: close`, read to EOF, close.
    fn one_connection(addr: SocketAddr, req: &[u8]) -> Result<(), String> {
        let mut conn = connect(addr)?;
        conn.stream
            .write_all(req)
            .map_err(|e| err_text("send", &e))?;
        match conn.read_message() {
            Ok(Some(h)) if h.second_word == "200" => {}
            Ok(Some(h)) => return Err(format!("status {}", h.second_word)),
            Ok(None) => return Err("receive: connection closed without a response".into()),
            Err(e) => return Err(err_text("receive", &e)),
        }
        // To EOF: the server closes after its response.
        let mut rest = [0u8; 1024];
        loop {
            match conn.stream.read(&mut rest) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(err_text("receive", &e)),
            }
        }
    }

    fn conn_rate(addr: SocketAddr, duration: Duration, concurrency: usize) -> u8 {
        let req = get_request(addr, true);
        let start = Instant::now();
        let deadline = start + duration;
        let mut tally = Tally::default();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..concurrency)
                .map(|_| {
                    let req = &req;
                    s.spawn(move || {
                        let mut t = Tally::default();
                        while Instant::now() < deadline {
                            let begun = Instant::now();
                            match one_connection(addr, req) {
                                Ok(()) => t.latencies_us.push(begun.elapsed().as_micros() as u64),
                                Err(e) => t.error(e),
                            }
                        }
                        t
                    })
                })
                .collect();
            for h in handles {
                tally.merge(h.join().unwrap_or_default());
            }
        });
        let elapsed = start.elapsed();
        let mut lat = tally.latencies_us;
        lat.sort_unstable();
        emit(&json!({
            "connections": lat.len(), "errors": tally.errors,
            "per_second": lat.len() as f64 / elapsed.as_secs_f64(),
            "p50_us": percentile(&lat, 50.0), "p99_us": percentile(&lat, 99.0),
            "concurrency": concurrency, "elapsed_ms": elapsed.as_millis() as u64,
            "first_error": tally.first_error,
        }));
        u8::from(tally.errors > 0 || lat.is_empty())
    }

    // ---- hold --------------------------------------------------------------------------

    /// Opens a connection to an echo server and checks one byte makes the round trip, so a
    /// connection counts only once it works end to end (through any proxy in between).
    fn open_echoed(addr: SocketAddr) -> Result<TcpStream, String> {
        let mut stream =
            TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| err_text("connect", &e))?;
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        stream.write_all(b"h").map_err(|e| err_text("send", &e))?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'h' => Ok(stream),
            Ok(0) => Err("receive: connection closed before the echo".into()),
            Ok(_) => Err("receive: wrong echo".into()),
            Err(e) => Err(err_text("receive", &e)),
        }
    }

    fn hold(addr: SocketAddr, count: usize, hold_for: Duration) -> u8 {
        /// Gives up after this many failed connections, or after this long opening them.
        const MAX_ERRORS: u64 = 10;
        const MAX_OPENING: Duration = Duration::from_secs(30);
        let nofile = raise_nofile();
        let start = Instant::now();
        let mut held = Vec::with_capacity(count);
        let mut tally = Tally::default();
        while held.len() < count && tally.errors < MAX_ERRORS && start.elapsed() < MAX_OPENING {
            match open_echoed(addr) {
                Ok(s) => held.push(s),
                Err(e) => tally.error(e),
            }
        }
        emit(&json!({
            "event": "opened", "opened": held.len(), "wanted": count, "errors": tally.errors,
            "first_error": tally.first_error, "open_ms": start.elapsed().as_millis() as u64,
            "nofile_limit": nofile,
        }));
        std::thread::sleep(hold_for);
        let still_open = held
            .iter()
            .filter(|s| {
                let _ = s.set_nonblocking(true);
                let mut b = [0u8; 1];
                // Open and idle: nothing to read yet (WouldBlock); EOF or an error: it died.
                matches!(s.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            })
            .count();
        emit(&json!({"event": "done", "opened": held.len(), "still_open": still_open}));
        u8::from(held.len() < count || still_open < held.len())
    }
}

/// An HTTP ext-authz provider like Istio's sample: allows a check whose request carries
/// `x-ext-authz: allow`, denies anything else with 403, and says so in
/// `x-ext-authz-check-result`. Prints one JSON line per check (method, path, the header seen).
fn ext_authz(port: u16) -> io::Result<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    emit(&json!({"event": "listening", "port": port, "pid": std::process::id()}));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let text = String::from_utf8_lossy(&head);
            let mut lines = text.lines();
            let first: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
            let header = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-ext-authz"))
                .map(|(_, v)| v.trim().to_owned());
            let allowed = header.as_deref() == Some("allow");
            emit(
                &json!({"event": "check", "method": first.first(), "path": first.get(1),
                "x-ext-authz": header, "allowed": allowed}),
            );
            let (status, body) = if allowed {
                ("200 OK", String::new())
            } else {
                (
                    "403 Forbidden",
                    "denied by ext_authz for not found header `x-ext-authz: allow` in the request"
                        .to_owned(),
                )
            };
            let result = if allowed { "allowed" } else { "denied" };
            let resp = format!(
                "HTTP/1.1 {status}\r\nx-ext-authz-check-result: {result}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes());
        });
    }
    Ok(())
}

/// Bulk transfers that must arrive intact: every byte echoed back is compared with what was
/// sent, so a lost, duplicated, reordered or altered byte anywhere on the path is caught.
mod transfer {
    use std::{
        io::{self, Read as _, Write as _},
        net::{Shutdown, SocketAddr, TcpStream},
        thread,
        time::{Duration, Instant},
    };

    use serde_json::{json, Value};

    use super::{emit, error_json, Opts};

    /// The stream is made of blocks of this size, each generated from (seed, block index).
    const BLOCK: usize = 64 * 1024;

    /// Block `index` of stream `seed` (xorshift64*, seeded per block, so any block can be made
    /// without the ones before it).
    fn block(seed: u64, index: u64, out: &mut [u8; BLOCK]) {
        let mut x = (seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        for word in out.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }

    pub fn run(opts: &Opts, timeout: Duration) -> Result<u8, String> {
        let addr: SocketAddr = opts
            .get("addr")
            .ok_or("--addr IP:PORT is required")?
            .parse()
            .map_err(|e| format!("bad --addr: {e}"))?;
        let bytes = opts.num("bytes").ok_or("--bytes N is required")?;
        let streams = opts.num("streams").unwrap_or(1);
        // A blocking read that fails with EAGAIN is retried, as an event loop would (the
        // sockhash fast path's receive can return it to blocking readers: docs/capture.md).
        let retry = opts.get("retry-eagain") == Some("true");
        if !(1..=1024).contains(&streams) {
            return Err("--streams must be between 1 and 1024".into());
        }
        let start = Instant::now();
        let handles: Vec<_> = (0..streams)
            .map(|i| thread::spawn(move || one(addr, 0x5eed_0000 + i, bytes, timeout, retry)))
            .collect();
        let results: Vec<Value> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| json!({"error": "the stream's thread panicked"}))
            })
            .collect();
        let elapsed = start.elapsed();
        let intact = results.iter().filter(|r| r["intact"] == true).count();
        let first_error = results.iter().find(|r| r["intact"] != true).cloned();
        let eagain: u64 = results
            .iter()
            .map(|r| r["eagain_retries"].as_u64().unwrap_or(0))
            .sum();
        let moved = 2.0 * bytes as f64 * streams as f64;
        emit(&json!({
            "streams": streams, "bytes_each": bytes, "intact": intact,
            "failed": streams as usize - intact, "first_error": first_error,
            "eagain_retries": eagain,
            "elapsed_ms": elapsed.as_millis() as u64,
            "gbit_per_s": moved * 8.0 / elapsed.as_secs_f64().max(1e-9) / 1e9,
        }));
        Ok(if intact == streams as usize { 0 } else { 1 })
    }

    /// One connection: a writer thread sends the stream and half-closes; this thread reads the
    /// echo to EOF and compares.
    fn one(addr: SocketAddr, seed: u64, bytes: u64, timeout: Duration, retry: bool) -> Value {
        let started = Instant::now();
        let mut eagain = 0u64;
        let stream = match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) => return error_json("connect", &e),
        };
        let _ = stream.set_read_timeout(Some(timeout));
        let _ = stream.set_write_timeout(Some(timeout));
        let local = stream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return error_json("clone", &e),
        };
        let sender = thread::spawn(move || -> io::Result<()> {
            let mut buf = Box::new([0u8; BLOCK]);
            let mut sent = 0u64;
            let mut index = 0;
            while sent < bytes {
                block(seed, index, &mut buf);
                let n = (bytes - sent).min(BLOCK as u64) as usize;
                writer.write_all(&buf[..n])?;
                sent += n as u64;
                index += 1;
            }
            writer.shutdown(Shutdown::Write)
        });
        let mut reader = stream;
        let (mut expected, mut got) = (Box::new([0u8; BLOCK]), vec![0u8; BLOCK]);
        let (mut received, mut index, mut fill) = (0u64, 0u64, 0usize);
        let mut mismatch: Option<u64> = None;
        let read_error = loop {
            match reader.read(&mut got[fill..]) {
                Ok(0) => break None,
                Ok(n) => {
                    fill += n;
                    received += n as u64;
                    let end_of_stream = received >= bytes;
                    if fill == BLOCK || end_of_stream {
                        block(seed, index, &mut expected);
                        if mismatch.is_none() {
                            if let Some(at) = (0..fill).find(|&i| got[i] != expected[i]) {
                                mismatch = Some(index * BLOCK as u64 + at as u64);
                            }
                        }
                        index += 1;
                        fill = 0;
                    }
                    if received > bytes {
                        break None;
                    }
                }
                Err(e)
                    if retry
                        && e.kind() == io::ErrorKind::WouldBlock
                        && started.elapsed() < timeout =>
                {
                    eagain += 1;
                }
                Err(e) => break Some(e),
            }
        };
        let sent = sender.join();
        let send_error = match sent {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the sender panicked".to_owned()),
        };
        let intact =
            mismatch.is_none() && received == bytes && read_error.is_none() && send_error.is_none();
        json!({
            "local": local, "intact": intact, "received": received, "expected": bytes,
            "first_mismatch_at": mismatch, "read_error": read_error.map(|e| e.to_string()),
            "send_error": send_error, "eagain_retries": eagain,
        })
    }
}
