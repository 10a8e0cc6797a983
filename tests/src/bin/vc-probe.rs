//! `vc-probe`: a tiny client/server tool run inside the virtual cluster's pods.
//!
//! ```text
//! vc-probe http-server --port P [--name N]     one JSON reply per request, Connection: close
//! vc-probe tcp-echo --port P                    echoes every byte back
//! vc-probe get --addr IP:PORT [--path /x] [--timeout-ms N]
//! vc-probe connect --addr IP:PORT [--send TEXT] [--timeout-ms N]
//! vc-probe repl [--timeout-ms N]                reads `get ADDR [PATH]` / `connect ADDR [TEXT]`
//!                                               lines from stdin, one JSON result line each
//! ```
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
        eprintln!("usage: vc-probe http-server|tcp-echo|get|connect|repl [options]");
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
        "get" | "connect" => {
            let Some(addr) = opts.get("addr") else {
                eprintln!("vc-probe: --addr is required");
                return ExitCode::from(2);
            };
            let (code, out) = if cmd == "get" {
                get(addr, opts.get("path").unwrap_or("/"), timeout)
            } else {
                connect(addr, opts.get("send"), timeout)
            };
            emit(&out);
            ExitCode::from(code)
        }
        "repl" => {
            repl(timeout);
            ExitCode::SUCCESS
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

fn get(addr: &str, path: &str, timeout: Duration) -> (u8, Value) {
    let (mut stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
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

fn connect(addr: &str, send: Option<&str>, timeout: Duration) -> (u8, Value) {
    let (mut stream, local, peer) = match open(addr, timeout) {
        Ok(x) => x,
        Err(v) => return (1, v),
    };
    if let Some(text) = send {
        if let Err(e) = stream.write_all(text.as_bytes()) {
            return (1, error_json("send", &e));
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => (
            0,
            json!({"local": local, "peer": peer, "received": String::from_utf8_lossy(&received)}),
        ),
        Err(e) => {
            let mut v = error_json("receive", &e);
            v["local"] = json!(local);
            v["peer"] = json!(peer);
            (1, v)
        }
    }
}

/// One long-lived client process: lets tests show capture changing under a running app.
fn repl(timeout: Duration) {
    emit(&json!({"event": "ready", "pid": std::process::id()}));
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let (code, mut v) = match (words.next(), words.next()) {
            (Some("get"), Some(addr)) => get(addr, words.next().unwrap_or("/"), timeout),
            (Some("connect"), Some(addr)) => connect(addr, words.next(), timeout),
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
