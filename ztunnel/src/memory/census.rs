//! A heap census for finding what each connection keeps (feature `alloc-census`, off by
//! default): the global allocator counts the live allocations by size, and while
//! `ZTUNNEL_ALLOC_CENSUS_DIR` is set the proxy writes `census-<pid>.txt` there every second the
//! heap changed: the live bytes and the size classes holding the most. With N idle connections
//! held, a class with about N (or a multiple of N) live blocks is a per-connection allocation,
//! and its size names the type. Counting costs two relaxed atomic adds per allocation.
use std::{
    alloc::{GlobalAlloc, Layout},
    fmt::Write as _,
    sync::atomic::{AtomicI64, Ordering},
};

/// Exact classes up to this size, in steps of [`STEP`] bytes; larger blocks share one class.
const LARGEST: usize = 64 * 1024;
const STEP: usize = 8;
const CLASSES: usize = LARGEST / STEP + 1;

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static BLOCKS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];
/// Bytes of the blocks larger than [`LARGEST`].
static LARGE_BYTES: AtomicI64 = AtomicI64::new(0);

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn class(size: usize) -> usize {
    size.div_ceil(STEP).min(CLASSES - 1)
}

fn count(size: usize, sign: i64) {
    LIVE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
    let c = class(size);
    BLOCKS[c].fetch_add(sign, Ordering::Relaxed);
    if c == CLASSES - 1 {
        LARGE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
    }
}

use super::allocator::{Backing, BACKING};

/// The allocator every call is passed on to (glibc's, jemalloc or mimalloc: [`super::allocator`]).
static INNER: Backing = BACKING;

// SAFETY: every call is passed on to the process's allocator unchanged; the counters are only
// added to.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { INNER.alloc(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { INNER.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { INNER.dealloc(ptr, layout) };
        count(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { INNER.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        p
    }
}

/// Bytes allocated and not freed now.
pub fn live_bytes() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// The census as text: live bytes, then the `top` classes by the bytes they hold.
pub fn report(top: usize) -> String {
    let mut classes: Vec<(usize, i64, i64)> = (0..CLASSES)
        .filter_map(|c| {
            let blocks = BLOCKS[c].load(Ordering::Relaxed);
            let bytes = match c {
                c if c == CLASSES - 1 => LARGE_BYTES.load(Ordering::Relaxed),
                c => blocks * (c * STEP) as i64,
            };
            (blocks > 0).then_some((c * STEP, blocks, bytes))
        })
        .collect();
    classes.sort_by_key(|&(_, _, bytes)| std::cmp::Reverse(bytes));
    let mut out = format!("live_bytes {}\n", live_bytes());
    let _ = writeln!(out, "{:>10} {:>10} {:>12}", "size<=", "blocks", "bytes");
    for (size, blocks, bytes) in classes.into_iter().take(top) {
        let size = match size {
            s if s > LARGEST => format!(">{LARGEST}"),
            s => s.to_string(),
        };
        let _ = writeln!(out, "{size:>10} {blocks:>10} {bytes:>12}");
    }
    out
}

/// Writes the census every second the heap changed by 64 KiB or more, while
/// `ZTUNNEL_ALLOC_CENSUS_DIR` is set; `census-<pid>-peak.txt` beside it is the census at the
/// largest heap so far (the connections held).
pub async fn write_while_enabled() {
    let Some(dir) = std::env::var_os("ZTUNNEL_ALLOC_CENSUS_DIR") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let path = dir.join(format!("census-{}.txt", std::process::id()));
    let peak_path = dir.join(format!("census-{}-peak.txt", std::process::id()));
    let (mut written, mut peak) = (i64::MIN / 2, 0);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let live = live_bytes();
        if (live - written).abs() >= 64 * 1024 {
            let text = report(60);
            if live > peak {
                let _ = std::fs::write(&peak_path, &text);
                peak = live;
            }
            let _ = std::fs::write(&path, text);
            written = live;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_block_is_counted_in_its_class_until_freed() {
        let before = BLOCKS[class(4000)].load(Ordering::Relaxed);
        let block = vec![0u8; 4000];
        assert!(BLOCKS[class(4000)].load(Ordering::Relaxed) > before);
        drop(block);
        assert!(report(10).starts_with("live_bytes "));
    }
}
