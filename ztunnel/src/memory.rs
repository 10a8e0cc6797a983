//! Giving memory back to the system after a burst of connections ends. glibc's malloc keeps
//! what freed connections leave in the middle of its heaps (it trims only a heap's top on its
//! own), so 200 connections that came and went would keep their ~7 MiB for good. Every
//! connection (proxied, or an HBONE connection of either side) holds a [`Live`] mark; when the
//! count has fallen well below its peak, the freed pages are returned (`malloc_trim`). A
//! steady load never shrinks the count that much, so it never pays for a trim.
#[cfg(feature = "alloc-census")]
pub mod census;

use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use tokio::sync::Notify;

static LIVE: AtomicI64 = AtomicI64::new(0);
/// The highest count since the last trim.
static PEAK: AtomicI64 = AtomicI64::new(0);
/// Woken by the connection whose end takes the count [`DROP`] below its peak: an idle proxy
/// has no timer for this.
static FALLEN: Notify = Notify::const_new();

/// How long after the fall the trim waits, so that a burst ending is taken in one trim.
const SETTLE: Duration = Duration::from_secs(1);
/// How far below its peak the count must fall before a trim.
const DROP: i64 = 64;

/// One live connection, for as long as it is held.
#[derive(Debug)]
pub struct Live(());

impl Live {
    pub fn new() -> Self {
        let live = LIVE.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(live, Ordering::Relaxed);
        Self(())
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let live = LIVE.fetch_sub(1, Ordering::Relaxed) - 1;
        if PEAK.load(Ordering::Relaxed) - live == DROP {
            FALLEN.notify_one();
        }
    }
}

/// Runs for the life of the process: trims after every fall of [`DROP`] live connections.
pub async fn return_freed_memory() {
    loop {
        FALLEN.notified().await;
        tokio::time::sleep(SETTLE).await;
        // A few milliseconds for a heap of some hundred MiB; off the runtime's threads.
        let _ = tokio::task::spawn_blocking(trim).await;
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Returns the allocator's free pages to the system now (a few milliseconds for a heap of some
/// hundred MiB: call it off the runtime's threads).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
