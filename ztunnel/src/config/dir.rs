//! The local configuration source: a directory of Kubernetes-shaped YAML, parsed into one
//! [`Snapshot`] and watched for changes.
//!
//! Every `*.yaml` / `*.yml` file of the directory (dotfiles excluded, so editors and atomic
//! writers can use them as temporaries) is read with [`super::parse`]. A file that does not
//! parse rejects the whole new version with its file, line and reason, and the last good
//! snapshot stays in force: a half-applied configuration is never published.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    parse::{parse_file, LoadError, LoadErrors},
    WatchHandle,
};
use crate::metrics::Metrics;
use crate::state::{MeshSettings, Objects, Snapshot};

/// Changes are noticed through inotify; this rescan catches whatever inotify misses (the
/// directory replaced, events overflowed, filesystems without inotify).
const RESCAN_INTERVAL: Duration = Duration::from_secs(2);

/// Reads every configuration file of `dir` (sorted by name, so conflicts resolve the same way
/// every time).
pub fn load_dir(dir: &Path) -> Result<Objects, LoadErrors> {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for file in config_files(dir)? {
        let parsed = std::fs::read_to_string(&file)
            .map_err(|e| LoadError {
                file: file.clone(),
                line: None,
                column: None,
                reason: format!("cannot read: {e}"),
            })
            .and_then(|text| parse_file(&file, &text, &mut objects));
        if let Err(e) = parsed {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(LoadErrors(errors))
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
        let path = entry.map_err(whole_dir)?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// What tells us cheaply whether a directory changed: each file's name, size and mtime.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Result<Fingerprint, LoadError> {
    let mut fp = Vec::new();
    for file in config_files(dir)? {
        let (len, mtime) = match std::fs::metadata(&file) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (0, None), // removed since listing: the next scan sees it gone
        };
        fp.push((file, len, mtime));
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
    let first = Snapshot::build(generation, load_dir(&dir)?, &settings);
    log_problems(&first);
    let (tx, rx) = watch::channel(Arc::new(first));

    let (event_tx, mut events) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        let _ = event_tx.send(());
    })
    .and_then(|mut w| {
        use notify::Watcher as _;
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e,
                "cannot watch the configuration directory; changes are picked up by rescanning");
            None
        }
    };

    let task = tokio::spawn(async move {
        let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
        let mut last_error: Option<LoadErrors> = None;
        loop {
            tokio::select! {
                Some(()) = events.recv() => {
                    // Let a burst of writes settle, then take them in one reload.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while events.try_recv().is_ok() {}
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
            last_fingerprint = fp;
            match load_dir(&dir) {
                Ok(objects) => {
                    generation += 1;
                    let snapshot = Snapshot::build(generation, objects, &settings);
                    info!(
                        generation,
                        pods = snapshot.pods.len(),
                        services = snapshot.services.len(),
                        namespaces = snapshot.namespaces.len(),
                        peer_authentications = snapshot.peer_authentications.len(),
                        authorization_policies = snapshot.authorization_policies.len(),
                        request_authentications = snapshot.request_authentications.len(),
                        "configuration loaded"
                    );
                    log_problems(&snapshot);
                    last_error = None;
                    if tx.send(Arc::new(snapshot)).is_err() {
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
            .map(|n| n.name)
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
