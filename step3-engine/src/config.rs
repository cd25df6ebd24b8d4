//! How the engine batches and how much memory its KV cache takes.

/// The size of the KV block pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheSize {
    /// On CUDA, 90 % of the device memory free after the weights are loaded; on the CPU, a tenth
    /// of the machine's memory (pages are only touched as they are used). Either way no more than
    /// `max_num_seqs` sequences of the full context need.
    #[default]
    Auto,
    /// This many bytes over all layers (K and V).
    Bytes(u64),
    /// This many blocks.
    Blocks(usize),
}

/// The engine's settings. The defaults suit one machine serving a few dozen streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences running at once (default 64).
    pub max_num_seqs: usize,
    /// Most tokens one step runs, decodes and prompt chunks together (default 2048).
    pub max_batched_tokens: usize,
    /// Most prompt tokens of one sequence in one step (default 512): longer prompts are chunked
    /// so that decodes keep flowing.
    pub prefill_chunk: usize,
    /// Token slots per KV block (default 16).
    pub block_size: usize,
    pub kv_cache: KvCacheSize,
    /// Reuse the K/V of full blocks shared with earlier requests (default on).
    pub prefix_caching: bool,
    /// Most requests waiting to start; more are refused as overloaded (default 1024).
    pub max_waiting: usize,
    /// Most prompt tokens in a step that also runs decodes (default `None`: up to the whole
    /// `max_batched_tokens`). Lower values bound the inter-token latency of running requests while
    /// new prompts arrive, at the cost of a slower time to first token for those prompts.
    pub max_prefill_while_decoding: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batched_tokens: 2048,
            prefill_chunk: 512,
            block_size: 16,
            kv_cache: KvCacheSize::Auto,
            prefix_caching: true,
            max_waiting: 1024,
            max_prefill_while_decoding: None,
        }
    }
}

impl EngineConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("block_size", self.block_size),
            ("max_waiting", self.max_waiting),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_prefill_while_decoding == Some(0) {
            return Err("max_prefill_while_decoding must be at least 1".into());
        }
        match self.kv_cache {
            KvCacheSize::Bytes(0) | KvCacheSize::Blocks(0) => Err("the KV cache needs at least one block".into()),
            _ => Ok(()),
        }
    }
}

/// Total memory of this machine in bytes (`/proc/meminfo`), if it can be read.
pub(crate) fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free memory of a CUDA device in bytes.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_free_memory(device: &candle_core::Device) -> Option<u64> {
    if let candle_core::Device::Cuda(d) = device {
        let _ = d; // the device is current on this thread once candle has used it
        candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok().map(|(free, _)| free as u64)
    } else {
        None
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn cuda_free_memory(_device: &candle_core::Device) -> Option<u64> {
    None
}
