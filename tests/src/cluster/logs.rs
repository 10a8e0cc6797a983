//! What the node proxies logged: one JSON object per line, appended over every run of a node's
//! proxy; marks let a test look only at what came after an action.
use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::Value;

use super::Cluster;

impl Cluster {
    // ---- logs --------------------------------------------------------------------------------

    /// Raw log text of node `i`'s proxy (all runs, appended).
    pub fn log_text(&self, i: usize) -> String {
        fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn complete_lines(&self, i: usize) -> Vec<String> {
        self.log_text(i)
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// A position in node `i`'s log: pass it to the `*_since` functions to see only later lines.
    pub fn log_mark(&self, i: usize) -> usize {
        self.complete_lines(i).len()
    }

    /// Every JSON log line of node `i`.
    pub fn logs(&self, i: usize) -> Vec<Value> {
        self.logs_since(i, 0)
    }

    pub fn logs_since(&self, i: usize, mark: usize) -> Vec<Value> {
        self.complete_lines(i)
            .iter()
            .skip(mark)
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last `n` lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let lines = self.complete_lines(i);
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// "connection closed" entries of node `i`.
    pub fn connections(&self, i: usize) -> Vec<Value> {
        self.connections_since(i, 0)
    }

    pub fn connections_since(&self, i: usize, mark: usize) -> Vec<Value> {
        self.logs_since(i, mark)
            .into_iter()
            .filter(|l| l["message"] == "connection closed")
            .collect()
    }

    /// Waits for a log line of node `i` matching `pred`, anywhere in the log.
    pub fn wait_for_log(
        &self,
        i: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for_log_since(i, 0, timeout, pred)
    }

    /// Waits for a log line of node `i`, after `mark`, matching `pred`.
    pub fn wait_for_log_since(
        &self,
        i: usize,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.logs_since(i, mark).into_iter().find(|v| pred(v)) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for a matching log line of node {i}; log tail:\n{}",
                    self.log_tail(i, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a "connection closed" line of node `i`, after `mark`, matching `pred`.
    pub fn wait_for_connection(
        &self,
        i: usize,
        mark: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for_log_since(i, mark, timeout, |l| {
            l["message"] == "connection closed" && pred(l)
        })
    }

    /// Waits for "pod enrolled" of `workload` ("ns/name") on node `i` after `mark`.
    pub fn wait_enrolled(
        &self,
        i: usize,
        mark: usize,
        workload: &str,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_for_log_since(i, mark, timeout, |l| {
            l["message"] == "pod enrolled" && l["pod"] == workload
        })
    }
}
