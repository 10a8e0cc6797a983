//! The proxy's logs: to stderr, as text or one JSON object per line, with a filter that the
//! admin API can change at run time.
//!
//! Lines are not written where they are logged. The thread that logs appends the line to a
//! shared buffer ([`BatchWriter`]) and one writer thread writes the buffer out: a line after a
//! quiet spell at once, then at most one write per 20 ms ([`INTERVAL`]) for the lines that
//! came meanwhile, sooner when the buffer passes 64 KiB or a warning or error is logged, and
//! at shutdown ([`flush`], which `main` calls) or a panic. A busy proxy writes one batch where
//! it wrote a line per connection, and a slow stderr never blocks a worker: past a bound
//! (4 MiB), lines are dropped and counted (`ztunnel_log_lines_dropped`, and a line saying how
//! many once the writer caught up).
use std::{
    io::{self, Write},
    sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use clap::ValueEnum;
use prometheus_client::metrics::counter::Counter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Sets the log filter (an `EnvFilter` directive such as `debug` or `info,ztunnel=trace`).
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The shortest time between two writes, unless a batch must go at once: how long a line
/// logged right after a write may wait for others to share the next one.
const INTERVAL: Duration = Duration::from_millis(20);
/// A batch this large is written at once.
const FLUSH_AT: usize = 64 * 1024;
/// Buffered bytes past which lines are dropped (counted) rather than held: the bound on what
/// a stalled stderr can cost.
const BOUND: usize = 4 * 1024 * 1024;

/// The daemon's writer, for [`flush`].
static DAEMON: OnceLock<BatchWriter> = OnceLock::new();
/// Lines dropped because the buffer was full, for the metrics.
static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Lines the log dropped under overload (`ztunnel_log_lines_dropped`).
pub fn dropped_lines() -> Counter {
    DROPPED.clone()
}

/// Logs to stderr through a [`BatchWriter`]; returns how to change the filter at run time (the
/// admin API's `/logging`). [`flush`] before the process exits.
pub fn init(format: LogFormat) -> (String, SetLogLevel) {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let writer = DAEMON
        .get_or_init(|| BatchWriter::new(Box::new(io::stderr()), DROPPED.clone()))
        .clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // What was logged before the panic comes before its message.
        flush_now();
        previous(info);
    }));
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
    let set: SetLogLevel = Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive)
            .map_err(|e| format!("bad log filter {directive:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    (initial, set)
}

/// Writes out every line logged so far and stops the writer thread; lines logged afterwards
/// are written at once. For the end of `main`.
pub fn flush() {
    if let Some(writer) = DAEMON.get() {
        writer.close();
    }
}

/// Writes out what is buffered from the calling thread (a panic, which may be the last thing
/// the process does).
fn flush_now() {
    if let Some(writer) = DAEMON.get() {
        // Not if this thread panicked holding the lock (it would wait for itself).
        if let Ok(mut state) = writer.shared.state.try_lock() {
            writer.shared.drain(&mut state);
        }
    }
}

/// Log lines to an output through a bounded buffer and one writer thread (the module's doc).
/// Clones share the buffer.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a batch starts, must go at once, or the writer is closed.
    wake: Condvar,
    out: Mutex<Box<dyn Write + Send>>,
    dropped: Counter,
    /// The shortest time between two writes that need not go at once.
    interval: Duration,
    /// Buffered bytes past which lines are dropped.
    bound: usize,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Write the batch now (size, a warning, shutdown).
    urgent: bool,
    closed: bool,
    /// Dropped since the last batch was written.
    dropped: u64,
}

impl BatchWriter {
    /// Starts the writer thread for `out`; `dropped` counts lines dropped past the bound.
    pub fn new(out: Box<dyn Write + Send>, dropped: Counter) -> Self {
        Self::with_limits(out, dropped, INTERVAL, BOUND)
    }

    fn with_limits(
        out: Box<dyn Write + Send>,
        dropped: Counter,
        interval: Duration,
        bound: usize,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            out: Mutex::new(out),
            dropped,
            interval,
            bound,
        });
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn({
                let shared = shared.clone();
                move || shared.run()
            })
            .expect("spawning the log writer thread");
        Self {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    /// Writes out what is buffered and stops the thread; later lines are written directly.
    pub fn close(&self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
        // Anything logged while the thread was stopping.
        self.shared.drain(&mut self.shared.lock());
    }

    /// Appends one line (tracing's formatter hands over a whole line per write).
    fn append(&self, line: &[u8], urgent: bool) {
        let mut state = self.shared.lock();
        if state.closed {
            state.buf.extend_from_slice(line);
            self.shared.drain(&mut state);
            return;
        }
        if state.buf.len() + line.len() > self.shared.bound {
            state.dropped += 1;
            self.shared.dropped.inc();
            state.urgent = true;
            self.shared.wake.notify_one();
            return;
        }
        let first = state.buf.is_empty();
        state.buf.extend_from_slice(line);
        let now = urgent || state.buf.len() >= FLUSH_AT;
        if now && !state.urgent {
            state.urgent = true;
            self.shared.wake.notify_one();
        } else if first {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer thread: waits for a line and writes what is buffered, at most once per
    /// interval ([`INTERVAL`]) unless a batch must go at once (size, a warning, shutdown). A line after
    /// a quiet spell is written as soon as the thread wakes; lines that come faster share a
    /// write. Writes happen out of the lock.
    fn run(&self) {
        let mut spare = Vec::new();
        let mut last: Option<Instant> = None;
        let mut state = self.lock();
        loop {
            while state.buf.is_empty() && state.dropped == 0 && !state.closed {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.buf.is_empty() && state.dropped == 0 {
                return; // closed, nothing left
            }
            if let Some(last) = last {
                let next = last + self.interval;
                while !state.urgent && !state.closed {
                    let left = next.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = self
                        .wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            std::mem::swap(&mut state.buf, &mut spare);
            let dropped = std::mem::take(&mut state.dropped);
            state.urgent = false;
            drop(state);
            self.write(&spare, dropped);
            last = Some(Instant::now());
            spare.clear();
            // What a burst grew is not kept.
            spare.shrink_to(FLUSH_AT);
            state = self.lock();
        }
    }

    /// Writes the buffer out from the calling thread, holding the lock (order is kept).
    fn drain(&self, state: &mut State) {
        let dropped = std::mem::take(&mut state.dropped);
        self.write(&state.buf, dropped);
        state.buf.clear();
        state.urgent = false;
    }

    fn write(&self, batch: &[u8], dropped: u64) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // Nowhere to report a failing stderr: the lines are lost, as with a direct write.
        let _ = out.write_all(batch);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "log: {dropped} lines dropped, the log could not keep up (ztunnel_log_lines_dropped)"
            );
        }
        let _ = out.flush();
    }
}

/// What one event writes through: its whole line goes into the buffer in one piece.
pub struct EventWriter<'a> {
    writer: &'a BatchWriter,
    urgent: bool,
}

impl Write for EventWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.append(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            writer: self,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        EventWriter {
            writer: self,
            // Warnings and errors are not held back: they may be the last thing logged.
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An output that records what reaches it, each write separately, and can be held shut.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().unwrap().concat()).unwrap()
        }
        fn writes(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
    }

    fn log(writer: &BatchWriter, line: &str) {
        writer.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_come_out_whole_in_order_in_few_writes_and_all_by_close() {
        let out = Recorder::default();
        let writer = BatchWriter::new(Box::new(out.clone()), Counter::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log(&writer, &format!("thread {t} line {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Nothing is lost at shutdown, however soon it comes after the last line.
        writer.close();
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2000, "every line, once");
        for t in 0..4 {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..500).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(own, expected, "each thread's lines whole and in its order");
        }
        assert!(
            out.writes() < 100,
            "2 000 lines in {} writes: they were not batched",
            out.writes()
        );
        // After close, a line is written at once.
        log(&writer, "late\n");
        assert!(out.text().ends_with("late\n"));
    }

    #[test]
    fn a_line_after_a_quiet_spell_goes_at_once_and_a_warning_skips_the_interval() {
        // A long interval, so that "held" and "not held" differ by far more than a loaded
        // machine's scheduling delays.
        let interval = Duration::from_millis(600);
        let out = Recorder::default();
        let writer =
            BatchWriter::with_limits(Box::new(out.clone()), Counter::default(), interval, BOUND);
        let written = |n: usize| {
            let since = Instant::now();
            while out.writes() < n {
                assert!(since.elapsed() < Duration::from_secs(10), "never written");
                std::thread::sleep(Duration::from_millis(1));
            }
            since.elapsed()
        };
        log(&writer, "one\n");
        let took = written(1);
        assert!(took < interval / 2, "the first line was held {took:?}");
        std::thread::sleep(interval + interval / 2);
        log(&writer, "two\n");
        let took = written(2);
        assert!(
            took < interval / 2,
            "a line after a quiet spell was held {took:?}"
        );
        // Right after a write: held for the interval, and shared.
        log(&writer, "three\n");
        log(&writer, "four\n");
        let took = written(3);
        assert!(took > interval / 3, "not held: {took:?}");
        assert_eq!(out.writes(), 3, "three and four in one write");
        // A warning right after a write is not held.
        let mut warning = EventWriter {
            writer: &writer,
            urgent: true,
        };
        warning.write_all(b"warn\n").unwrap();
        let took = written(4);
        assert!(took < interval / 2, "the warning was held {took:?}");
        writer.close();
        assert_eq!(out.text(), "one\ntwo\nthree\nfour\nwarn\n");
    }

    #[test]
    fn a_stalled_output_bounds_the_buffer_and_counts_what_it_drops() {
        let out = Recorder::default();
        let dropped = Counter::default();
        let bound = 64 * 1024;
        let writer =
            BatchWriter::with_limits(Box::new(out.clone()), dropped.clone(), INTERVAL, bound);
        // The output blocks: the writer thread is stuck in its first write.
        let stall = out.gate.lock().unwrap();
        log(&writer, "first\n");
        let (done, finished) = mpsc::channel();
        let producer = std::thread::spawn({
            let writer = writer.clone();
            move || {
                for i in 0..20_000 {
                    log(&writer, &format!("line {i:05} {}\n", "x".repeat(50)));
                }
                done.send(()).unwrap();
            }
        });
        // Logging never waits for the output.
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("logging blocked behind a stalled output");
        producer.join().unwrap();
        assert!(writer.shared.lock().buf.len() <= bound, "over the bound");
        let lost = dropped.get();
        assert!(lost > 0, "20 000 lines of 62 bytes fit in 64 KiB?");
        drop(stall);
        writer.close();
        let text = out.text();
        let kept: Vec<&str> = text.lines().filter(|l| l.starts_with("line ")).collect();
        assert_eq!(
            kept.len() as u64 + lost,
            20_000,
            "each line written or counted"
        );
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "in order");
        assert!(
            text.contains(&format!("log: {lost} lines dropped")),
            "the drop is said in the log:\n{}",
            &text[text.len().saturating_sub(300)..]
        );
    }
}
