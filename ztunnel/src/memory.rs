//! Giving memory back to the system after a burst of connections ends. glibc's malloc keeps
//! what freed connections leave in the middle of its heaps (it trims only a heap's top on its
//! own), so 200 connections that came and went would keep their ~7 MiB for good. Every
//! connection (proxied, or an HBONE connection of either side) holds a [`Live`] mark; when the
//! count has fallen well below its peak, the freed pages are returned (`malloc_trim`). A
//! steady load never shrinks the count that much, so it never pays for a trim.
use std::{
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

static LIVE: AtomicI64 = AtomicI64::new(0);

/// How often the count is looked at.
const PERIOD: Duration = Duration::from_secs(1);
/// How far below its peak the count must fall before a trim.
const DROP: i64 = 64;

/// One live connection, for as long as it is held.
#[derive(Debug)]
pub struct Live(());

impl Live {
    pub fn new() -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
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
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs for the life of the process: trims after every fall of [`DROP`] live connections.
pub async fn return_freed_memory() {
    let mut peak = LIVE.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(PERIOD).await;
        let live = LIVE.load(Ordering::Relaxed);
        if peak - live >= DROP {
            // A few milliseconds for a heap of some hundred MiB; off the runtime's threads.
            let _ = tokio::task::spawn_blocking(trim).await;
            peak = live;
        } else {
            peak = peak.max(live);
        }
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
