//! Running programs with deadlines, inside a chosen network namespace and cgroup.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what` in the message.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Makes `cmd` join a cgroup (`cgroup.procs` of it) and a network namespace (a netns file)
/// between fork and exec. Both files are opened here, before the fork, so the child only
/// makes async-signal-safe syscalls; they are close-on-exec.
pub fn confine(
    cmd: &mut Command,
    netns: Option<&Path>,
    cgroup: Option<&Path>,
) -> Result<Confinement> {
    let netns = netns
        .map(|p| File::open(p).with_context(|| format!("opening netns {}", p.display())))
        .transpose()?;
    let procs = cgroup
        .map(|c| {
            let p = c.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))
        })
        .transpose()?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure only calls write(2) and setns(2) on descriptors opened above.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(Confinement {
        _files: [netns, procs],
    })
}

/// Keeps the descriptors [`confine`] uses open until the command has been spawned.
pub struct Confinement {
    _files: [Option<File>; 2],
}

fn collect(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` to completion, killing it (and failing) if it takes longer than `timeout`.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_with_input(cmd, None, timeout)
}

/// [`output_with_timeout`], with `input` written to the command's stdin (then closed).
pub fn output_with_input(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let input = input.to_vec();
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let out = collect(child.stdout.take().expect("piped"));
    let err = collect(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let join = |h: thread::JoinHandle<Vec<u8>>| {
        // A grandchild could keep the pipe open; do not wait for it forever.
        let until = Instant::now() + Duration::from_secs(2);
        while !h.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let stdout = join(out);
    let stderr = join(err);
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {timeout:?}; stdout: {} stderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Runs a program on the host (e.g. `ip`, `bpftool`) with a deadline; fails unless it exits 0.
pub fn host(program: &str, args: &[&str]) -> Result<String> {
    let out = output_with_timeout(Command::new(program).args(args), Duration::from_secs(20))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A long-running process; killed (SIGKILL) and reaped when dropped.
///
/// Its stdout and stderr lines are collected in memory; stdin is a pipe for [`Proc::request`].
pub struct Proc {
    child: Child,
    label: String,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn lines_into(r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
}

impl Proc {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(cmd: &mut Command, label: &str) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {label}: {cmd:?}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        lines_into(child.stdout.take().expect("piped"), stdout.clone());
        lines_into(child.stderr.take().expect("piped"), stderr.clone());
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            label: label.to_owned(),
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stdout lines so far that are JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for a JSON stdout line matching `pred` among lines from index `from` on.
    pub fn wait_for_json(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(v) = lines
                .iter()
                .skip(from)
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pred(v))
            {
                return Ok(v);
            }
            if !self.is_running() {
                // Give the reader thread a moment to collect the last lines.
                thread::sleep(Duration::from_millis(100));
                if let Some(v) = self.json_lines().into_iter().skip(from).find(|v| pred(v)) {
                    return Ok(v);
                }
                bail!(
                    "{} exited ({:?}) before printing the expected line; stdout: {:?} stderr: {:?}",
                    self.label,
                    self.child.try_wait().ok().flatten(),
                    self.lines(),
                    self.stderr_lines()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: timed out after {timeout:?} waiting for an output line; stdout: {:?} stderr: {:?}",
                    self.label,
                    lines,
                    self.stderr_lines()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes one line to stdin and waits for the next stdout line (as JSON).
    pub fn request(&mut self, line: &str, timeout: Duration) -> Result<Value> {
        let from = self.lines().len();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin closed", self.label))?;
        writeln!(stdin, "{line}").with_context(|| format!("writing to {}", self.label))?;
        stdin.flush()?;
        self.wait_for_json(from, timeout, |_| true)
    }

    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (with a deadline) for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let label = self.label.clone();
        wait_until(timeout, &format!("{label} to exit"), || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
