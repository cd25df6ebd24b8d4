use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An accelerator as the cost model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accelerator {
    /// Short name (`H800`, `H20`, ...), matched case-insensitively on the command line.
    pub name: String,
    /// Rental price per card-hour, USD.
    pub usd_per_hour: f64,
    /// Dense (no 2:4 sparsity) BF16 tensor peak, FLOP/s.
    pub bf16_flops: f64,
    /// Dense FP8 tensor peak, FLOP/s; absent on cards without FP8 (8-bit weights then run as INT8
    /// at the BF16 rate, as in the paper).
    #[serde(default)]
    pub fp8_flops: Option<f64>,
    /// Memory bandwidth, bytes/s.
    pub mem_bw: f64,
    /// NICs per 8-card server and their line rate (Gbit/s), for the MoE-sparsity bound.
    #[serde(default = "default_nics")]
    pub nics: usize,
    #[serde(default)]
    pub nic_gbps: f64,
    /// Where the numbers (and the price) come from.
    #[serde(default)]
    pub source: String,
    /// The price is our assumption, not the paper's.
    #[serde(default)]
    pub price_is_assumption: bool,
}

fn default_nics() -> usize {
    8
}

/// A custom accelerator file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{}: accelerator `{name}`: {msg}", path.display())]
    Invalid { path: PathBuf, name: String, msg: String },
}

impl Accelerator {
    /// The peak used for unit costs: FP8 where the card has it, else BF16.
    pub fn peak_flops(&self) -> f64 {
        self.fp8_flops.unwrap_or(self.bf16_flops)
    }

    /// USD per FLOP at peak.
    pub fn usd_per_flop(&self) -> f64 {
        self.usd_per_hour / (3600.0 * self.peak_flops())
    }

    /// USD per byte of memory traffic at full bandwidth.
    pub fn usd_per_byte(&self) -> f64 {
        self.usd_per_hour / (3600.0 * self.mem_bw)
    }

    /// Ridge point of the roofline, FLOP per byte.
    pub fn roofline(&self) -> f64 {
        self.peak_flops() / self.mem_bw
    }

    /// Aggregate NIC bandwidth of an 8-card server, bytes/s.
    pub fn network_bytes_per_s(&self) -> f64 {
        self.nics as f64 * self.nic_gbps * 1e9 / 8.0
    }

    /// Reads accelerators from a JSON (`[{...}, ...]` or `{"accelerators": [...]}`) or TOML
    /// (`[[accelerator]]` tables) file, chosen by extension.
    pub fn from_file(path: &Path) -> Result<Vec<Self>, AccelError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccelError::Io { path: path.into(), source })?;
        let parse = |msg: String| AccelError::Parse { path: path.into(), msg };
        let list: Vec<Self> = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
            #[derive(Deserialize)]
            struct File {
                accelerator: Vec<Accelerator>,
            }
            toml::from_str::<File>(&text).map_err(|e| parse(e.to_string()))?.accelerator
        } else {
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum File {
                List(Vec<Accelerator>),
                Wrapped { accelerators: Vec<Accelerator> },
            }
            match serde_json::from_str::<File>(&text).map_err(|e| parse(e.to_string()))? {
                File::List(l) | File::Wrapped { accelerators: l } => l,
            }
        };
        if list.is_empty() {
            return Err(parse("no accelerators in the file".into()));
        }
        for a in &list {
            let bad = |msg: &str| AccelError::Invalid { path: path.into(), name: a.name.clone(), msg: msg.into() };
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if a.name.trim().is_empty() {
                return Err(bad("`name` is empty"));
            }
            if !positive(a.usd_per_hour) {
                return Err(bad("`usd_per_hour` must be a positive number"));
            }
            if !positive(a.bf16_flops) || a.fp8_flops.is_some_and(|f| !positive(f)) {
                return Err(bad("`bf16_flops` (and `fp8_flops` if given) must be positive FLOP/s"));
            }
            if !positive(a.mem_bw) {
                return Err(bad("`mem_bw` must be a positive number of bytes/s"));
            }
        }
        Ok(list)
    }
}
