//! The local configuration source: a directory of Kubernetes-shaped YAML, parsed into one
//! [`Snapshot`] and watched for changes.
//!
//! Every `*.yaml` / `*.yml` file of the directory (dotfiles excluded, so editors and atomic
//! writers can use them as temporaries) is read with [`super::parse`]. A file that does not
//! parse rejects the whole new version with its file, line and reason, and the last good
//! snapshot stays in force: a half-applied configuration is never published.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    parse::{parse_file, LoadError, LoadErrors},
    WatchHandle,
};
use crate::metrics::Metrics;
use crate::state::{Delta, MeshSettings, Objects, Snapshot};

/// Changes are noticed through inotify; this rescan catches whatever inotify misses (the
/// directory replaced, events overflowed, filesystems without inotify). Without inotify it is
/// the only way changes are seen, so it runs more often then.
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
const RESCAN_INTERVAL_WATCHED: Duration = Duration::from_secs(30);

/// A burst of writes (`kubectl`-style dumps, an editor's save) is taken in one reload: the
/// reload starts once no event came for `SETTLE`, or `SETTLE_MAX` after the first one.
const SETTLE: Duration = Duration::from_millis(10);
const SETTLE_MAX: Duration = Duration::from_millis(100);

/// Reads every configuration file of `dir` (sorted by name, so conflicts resolve the same way
/// every time).
pub fn load_dir(dir: &Path) -> Result<Objects, LoadErrors> {
    Ok(ParsedFiles::default().load(&fingerprint(dir)?)?.objects)
}

/// Each file's objects as last parsed, with the fingerprint they were parsed at: a reload
/// parses again only the files that changed (one YAML file, not the whole cluster, when one
/// object changes), and the snapshot shares the unchanged files' objects.
#[derive(Default)]
struct ParsedFiles {
    files: HashMap<PathBuf, (FileStamp, Objects)>,
    /// Files parsed by the last [`ParsedFiles::load`], for the log.
    parsed_last: usize,
    /// Whether `files` holds what the last published snapshot was built from, so that a
    /// [`Delta`] from them applies to it: not before the first load, nor after a rejected one
    /// (its good files were kept, its snapshot never published).
    in_sync: bool,
}

/// A directory's objects, and what changed since the previous load when it is known.
struct Loaded {
    objects: Objects,
    delta: Option<Delta>,
}

impl ParsedFiles {
    /// The objects of the files in `fp`, in its order. A file parsed at the same stamp is not
    /// read again. On error nothing is kept for the failing files, so they are read again next
    /// time. A file that changes while it is read has a newer stamp than the one kept here,
    /// and is read again on the next reload.
    fn load(&mut self, fp: &Fingerprint) -> Result<Loaded, LoadErrors> {
        let mut objects = Objects::default();
        let mut delta = Delta::default();
        let mut errors = Vec::new();
        let mut kept = HashMap::with_capacity(fp.len());
        self.parsed_last = 0;
        for (file, stamp) in fp {
            let before = match self.files.remove(file) {
                Some((at, parsed)) if at == *stamp => {
                    objects.extend_from(&parsed);
                    kept.insert(file.clone(), (at, parsed));
                    continue;
                }
                before => before,
            };
            self.parsed_last += 1;
            let mut parsed = Objects::default();
            let result = std::fs::read_to_string(file)
                .map_err(|e| LoadError {
                    file: file.clone(),
                    line: None,
                    column: None,
                    reason: format!("cannot read: {e}"),
                })
                .and_then(|text| parse_file(file, &text, &mut parsed));
            match result {
                Ok(()) => {
                    match &before {
                        Some((_, old)) => delta.record(old, &mut parsed),
                        None => delta.added.extend_from(&parsed),
                    }
                    objects.extend_from(&parsed);
                    kept.insert(file.clone(), (*stamp, parsed));
                }
                Err(e) => errors.push(e),
            }
        }
        // The files gone since the last load.
        for (_, old) in self.files.values() {
            delta.removed.extend_from(old);
        }
        self.files = kept;
        if !errors.is_empty() {
            self.in_sync = false;
            return Err(LoadErrors(errors));
        }
        let delta = std::mem::replace(&mut self.in_sync, true).then_some(delta);
        Ok(Loaded { objects, delta })
    }
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let whole_dir = |e: std::io::Error| LoadError {
        file: dir.to_owned(),
        line: None,
        column: None,
        reason: format!("cannot list the configuration directory: {e}"),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(whole_dir)? {
        let entry = entry.map_err(whole_dir)?;
        let path = entry.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        // The entry's own type costs no `stat` (most filesystems report it with the name);
        // a symlink is followed (a ConfigMap volume's files are symlinks).
        let is_file = |entry: &std::fs::DirEntry| match entry.file_type() {
            Ok(t) if t.is_symlink() => path.is_file(),
            Ok(t) => t.is_file(),
            Err(_) => false,
        };
        if yaml && !name.starts_with('.') && is_file(&entry) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// What tells us cheaply whether a file changed: its size, mtime and inode (an atomic writer's
/// `rename` always brings a new inode, even within one mtime tick).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    mtime: Option<SystemTime>,
    inode: u64,
}

/// Every configuration file of a directory with its stamp, sorted by name.
type Fingerprint = Vec<(PathBuf, FileStamp)>;

fn fingerprint(dir: &Path) -> Result<Fingerprint, LoadError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut fp = Vec::new();
    for file in config_files(dir)? {
        let stamp = match std::fs::metadata(&file) {
            Ok(m) => FileStamp {
                len: m.len(),
                mtime: m.modified().ok(),
                inode: m.ino(),
            },
            // Removed since listing: the next scan sees it gone.
            Err(_) => FileStamp {
                len: 0,
                mtime: None,
                inode: 0,
            },
        };
        fp.push((file, stamp));
    }
    Ok(fp)
}

fn log_problems(snapshot: &Snapshot) {
    for problem in &snapshot.problems {
        warn!(problem = %problem, "configuration problem");
    }
}

fn log_rejection(errors: &LoadErrors, metrics: &Metrics) {
    metrics.config_rejected.inc();
    for e in &errors.0 {
        error!(file = %e.file.display(), line = e.line, column = e.column, reason = %e.reason,
            "configuration rejected ({e}); the last good configuration stays in force");
    }
}

/// Whether an inotify event can mean a configuration file changed. Opening, reading and
/// closing a file unwritten cannot; and the scan itself opens the directory, so counting those
/// would make every scan wake the next one, forever.
fn may_change_files(event: &notify::Event) -> bool {
    !matches!(event.kind, notify::EventKind::Access(_))
}

/// An inotify watch on `dir` that sends `()` for every event that may have changed a file;
/// no watcher (and a warning) where inotify is not available: the rescan still runs.
fn watch_events(
    dir: &Path,
) -> (
    Option<notify::RecommendedWatcher>,
    mpsc::UnboundedReceiver<()>,
) {
    let (event_tx, events) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.as_ref().is_ok_and(|e| !may_change_files(e)) {
            return;
        }
        let _ = event_tx.send(());
    })
    .and_then(|mut w| {
        use notify::Watcher as _;
        w.watch(dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    match watcher {
        Ok(w) => (Some(w), events),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e,
                "cannot watch the configuration directory; changes are picked up by rescanning");
            (None, events)
        }
    }
}

/// Loads `dir` and keeps following it. Fails only if the first load fails: without a first
/// good configuration there is nothing safe to run with. Every rejected version counts in
/// `metrics.config_rejected`. Must be called inside a tokio runtime.
pub fn watch(
    dir: PathBuf,
    settings: MeshSettings,
    metrics: Arc<Metrics>,
) -> Result<(watch::Receiver<Arc<Snapshot>>, WatchHandle), LoadErrors> {
    let mut last_fingerprint = fingerprint(&dir)?;
    let mut generation = 1;
    let mut parsed = ParsedFiles::default();
    let first = Snapshot::build(
        generation,
        parsed.load(&last_fingerprint)?.objects,
        &settings,
    );
    log_problems(&first);
    let (tx, rx) = watch::channel(Arc::new(first));

    let (watcher, mut events) = watch_events(&dir);

    let rescan_every = match watcher {
        Some(_) => RESCAN_INTERVAL_WATCHED,
        None => RESCAN_INTERVAL,
    };
    let task = tokio::spawn(async move {
        let mut rescan = tokio::time::interval(rescan_every);
        let mut last_error: Option<LoadErrors> = None;
        loop {
            tokio::select! {
                Some(()) = events.recv() => {
                    // Let a burst of writes settle (until SETTLE passes without an event, at
                    // most SETTLE_MAX), then take them in one reload.
                    let give_up = tokio::time::Instant::now() + SETTLE_MAX;
                    loop {
                        tokio::time::sleep(SETTLE).await;
                        let mut more = false;
                        while events.try_recv().is_ok() {
                            more = true;
                        }
                        if !more || tokio::time::Instant::now() >= give_up {
                            break;
                        }
                    }
                }
                _ = rescan.tick() => {}
            }
            // The fingerprint is taken before loading: a write racing with the load changes it
            // again and triggers another reload.
            let fp = match fingerprint(&dir) {
                Ok(fp) => fp,
                Err(e) => {
                    let e = LoadErrors::from(e);
                    if last_error.as_ref() != Some(&e) {
                        log_rejection(&e, &metrics);
                        last_error = Some(e);
                    }
                    continue;
                }
            };
            if fp == last_fingerprint {
                continue;
            }
            // Reading a cluster-sized directory takes seconds: not on a worker of the proxy.
            let (cache, loaded) = {
                let settings = settings.clone();
                let fp = fp.clone();
                let next = generation + 1;
                let before = tx.borrow().clone();
                let work = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let loaded = parsed.load(&fp).map(|Loaded { objects, delta }| {
                        let read = started.elapsed();
                        let snapshot = match &delta {
                            Some(delta) => before.apply(next, objects, delta, &settings),
                            None => Snapshot::build(next, objects, &settings),
                        };
                        (snapshot, read, started.elapsed() - read)
                    });
                    (parsed, loaded)
                });
                match work.await {
                    Ok(done) => done,
                    Err(e) => {
                        error!(error = %e, "reading the configuration directory failed; the last good configuration stays in force");
                        return;
                    }
                }
            };
            parsed = cache;
            last_fingerprint = fp;
            match loaded {
                Ok((snapshot, read, index)) => {
                    generation += 1;
                    info!(
                        generation,
                        pods = snapshot.pods.len(),
                        services = snapshot.services.len(),
                        namespaces = snapshot.namespaces.len(),
                        peer_authentications = snapshot.peer_authentications.len(),
                        authorization_policies = snapshot.authorization_policies.len(),
                        request_authentications = snapshot.request_authentications.len(),
                        files_read = parsed.parsed_last,
                        read_ms = read.as_secs_f64() * 1e3,
                        index_ms = index.as_secs_f64() * 1e3,
                        "configuration loaded"
                    );
                    log_problems(&snapshot);
                    last_error = None;
                    if !super::publish(&tx, snapshot) {
                        return; // nobody listens any more
                    }
                }
                Err(e) => {
                    log_rejection(&e, &metrics);
                    last_error = Some(e);
                }
            }
        }
    });
    Ok((
        rx,
        WatchHandle {
            task,
            _watcher: watcher,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_loads_sorted_yaml_files_only() {
        let dir = std::env::temp_dir().join(format!("ztunnel-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |n: &str, t: &str| std::fs::write(dir.join(n), t).unwrap();
        write(
            "b.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        write(
            "a.yml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        );
        write(".tmp.yaml", "not: [valid");
        write("notes.txt", "not: [valid");
        let names: Vec<String> = load_dir(&dir)
            .unwrap()
            .namespaces
            .into_iter()
            .map(|n| n.name.clone())
            .collect();
        write("c.yaml", "kind: [");
        write(
            "d.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: x}\n",
        );
        let errors = load_dir(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names, ["a", "b"]);
        let files: Vec<_> = errors.0.iter().map(|e| e.file.clone()).collect();
        assert_eq!(
            files,
            [dir.join("c.yaml"), dir.join("d.yaml")],
            "every bad file is reported"
        );
        assert!(errors.0.iter().all(|e| e.line.is_some()));
    }

    #[test]
    fn a_reload_reads_only_the_files_that_changed_and_shares_the_rest() {
        let dir = std::env::temp_dir().join(format!("ztunnel-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        // As atomic writers do: a new inode every time, whatever the size and mtime.
        let publish = |file: &str, text: &str| {
            std::fs::write(dir.join(".tmp"), text).unwrap();
            std::fs::rename(dir.join(".tmp"), dir.join(file)).unwrap();
        };
        let names =
            |o: &Objects| -> Vec<String> { o.namespaces.iter().map(|n| n.name.clone()).collect() };
        let mut parsed = ParsedFiles::default();
        let load = |parsed: &mut ParsedFiles| parsed.load(&fingerprint(&dir).unwrap());
        publish("a.yaml", &ns("one"));
        publish("b.yaml", &ns("two"));
        let first = load(&mut parsed).unwrap();
        assert_eq!(
            (names(&first.objects), parsed.parsed_last),
            (vec!["one".into(), "two".into()], 2)
        );
        assert!(first.delta.is_none(), "nothing to apply a delta to yet");

        publish("b.yaml", &ns("six")); // same size
        let second = load(&mut parsed).unwrap();
        assert_eq!(names(&second.objects), ["one", "six"]);
        assert_eq!(parsed.parsed_last, 1, "only b.yaml is read again");
        assert!(
            Arc::ptr_eq(&first.objects.namespaces[0], &second.objects.namespaces[0]),
            "a.yaml's objects are the ones parsed before"
        );
        let delta = second.delta.expect("a delta to the first load");
        assert_eq!(
            (names(&delta.removed), names(&delta.added)),
            (vec!["two".into()], vec!["six".into()])
        );

        // Rewritten unchanged: read again, but nothing changed and the objects stay shared.
        publish("b.yaml", &ns("six"));
        let same = load(&mut parsed).unwrap();
        assert_eq!(parsed.parsed_last, 1);
        assert!(same.delta.expect("in sync").is_empty());
        assert!(Arc::ptr_eq(
            &second.objects.namespaces[1],
            &same.objects.namespaces[1]
        ));

        publish("b.yaml", "kind: [");
        assert!(load(&mut parsed).is_err());
        publish("b.yaml", &ns("two"));
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let third = load(&mut parsed).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            names(&third.objects),
            ["two"],
            "a removed file takes its objects along"
        );
        assert_eq!((parsed.parsed_last, parsed.files.len()), (1, 1));
        assert!(
            third.delta.is_none(),
            "after a rejected load the next snapshot is built whole"
        );
    }

    #[tokio::test]
    async fn reading_the_directory_does_not_wake_its_watch() {
        let dir = std::env::temp_dir().join(format!("ztunnel-wake-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap();
        let (watcher, mut events) = watch_events(&dir);
        assert!(watcher.is_some(), "inotify is available here");
        // What every scan does: list the directory and stat its files, then read a changed one.
        let fp = fingerprint(&dir).unwrap();
        ParsedFiles::default().load(&fp).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let woken = events.try_recv().is_ok();

        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        let changed = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            !woken,
            "a scan must not wake the next one (it would rescan forever)"
        );
        assert!(matches!(changed, Ok(Some(()))), "a written file wakes it");
    }

    #[tokio::test]
    async fn watch_publishes_changes_and_keeps_the_last_good_snapshot() {
        let dir = std::env::temp_dir().join(format!("ztunnel-watch-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        std::fs::write(dir.join("a.yaml"), ns("one")).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (mut rx, _handle) = watch(dir.clone(), MeshSettings::default(), metrics).unwrap();
        assert_eq!(rx.borrow_and_update().generation, 1);

        std::fs::write(dir.join("b.yaml"), ns("two")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.generation, 2);
        assert!(s.namespaces.contains_key("two"));

        std::fs::write(dir.join("c.yaml"), "kind: [").unwrap();
        let bad = tokio::time::timeout(RESCAN_INTERVAL * 2, rx.changed()).await;
        assert!(bad.is_err(), "a broken file must not publish a snapshot");
        assert_eq!(rx.borrow().generation, 2);

        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        std::fs::write(dir.join("b.yaml"), ns("three")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        let s = rx.borrow_and_update().clone();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.generation, 3);
        assert!(s.namespaces.contains_key("three") && !s.namespaces.contains_key("two"));
    }
}
