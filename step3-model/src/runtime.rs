//! Process-wide settings of the CPU backend.

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
