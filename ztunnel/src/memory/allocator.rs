//! The process's allocator: jemalloc (the `jemalloc` feature, on by default), mimalloc (the
//! `mimalloc` feature, with `--no-default-features`) or glibc's malloc (no feature);
//! docs/benchmarks.md has the measurements that chose between them.
//! [`Backing`] is what every allocation reaches in the end: the daemon's `main.rs` installs it
//! (a library does not choose its users' allocator), or the `alloc-census` feature wraps it in
//! its counting allocator.
#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("the `jemalloc` and `mimalloc` features each choose the allocator: enable one");

#[cfg(feature = "jemalloc")]
pub type Backing = tikv_jemallocator::Jemalloc;
#[cfg(feature = "jemalloc")]
pub const BACKING: Backing = tikv_jemallocator::Jemalloc;
#[cfg(feature = "jemalloc")]
pub const NAME: &str = "jemalloc";

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
pub type Backing = mimalloc::MiMalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
pub const BACKING: Backing = mimalloc::MiMalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
pub const NAME: &str = "mimalloc";

#[cfg(not(any(feature = "jemalloc", feature = "mimalloc")))]
pub type Backing = std::alloc::System;
#[cfg(not(any(feature = "jemalloc", feature = "mimalloc")))]
pub const BACKING: Backing = std::alloc::System;
#[cfg(not(any(feature = "jemalloc", feature = "mimalloc")))]
pub const NAME: &str = "system (glibc malloc)";

/// Returns the allocator's free pages to the system now (a few milliseconds for a heap of some
/// hundred MiB: call it off the runtime's threads).
pub fn trim() {
    #[cfg(feature = "jemalloc")]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages, now.
        // SAFETY: a NUL-terminated control name that takes no value and returns none.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arena.4096.purge".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
    #[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
    // SAFETY: mi_collect only frees what the allocator no longer uses.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(
        not(any(feature = "jemalloc", feature = "mimalloc")),
        target_os = "linux",
        target_env = "gnu"
    ))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
