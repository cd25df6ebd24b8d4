//! Process-wide settings of the CPU backend.

/// The CPU settings a program running Step3 wants, first thing in `main`, before any thread
/// starts: [`init_cpu_threads`] and [`keep_freed_memory`].
pub fn init_cpu() {
    init_cpu_threads();
    keep_freed_memory();
}

/// Sets `RAYON_NUM_THREADS` to the number of CPUs this process may use, unless it is already set.
///
/// Call it first thing in `main`, before any thread starts. Without the variable, candle 0.11
/// works out its thread count for every CPU matmul by parsing `/proc/cpuinfo`, which makes small
/// models several times slower (the tiny checkpoint decodes 3–4× faster with it set).
pub fn init_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Lets the C allocator keep freed memory for reuse instead of handing it back to the kernel, so
/// that the large activation buffers of every forward step (a prefill chunk's attention scores and
/// MLP activations: tens to hundreds of MB, allocated and freed each step) are not mapped afresh
/// and zero-filled page by page each time. On glibc its defaults serve allocations above 32 MB
/// (after warm-up) with `mmap` and unmap them on free, which cost prefill a quarter of its speed
/// on the ~200M benchmark model (see docs/performance.md). Allocations up to 1 GiB now come from
/// the heap, and up to 1 GiB of free heap is kept before trimming: the process holds its peak
/// working memory, as a long-running server should. A no-op elsewhere than Linux with glibc, and
/// where `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` is set (the user's choice stands).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const GIB: libc::c_int = 1 << 30;
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only sets allocator parameters; it is safe to call at any time.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, GIB) };
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, GIB) };
        }
    }
}
