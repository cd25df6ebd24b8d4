use std::path::PathBuf;

use candle_core::DType;

/// Everything that can go wrong loading or running a Step3 model. Each variant names the file,
/// key or tensor involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory that cannot be read (the message holds the cause once; it is not
    /// repeated as a `source`, so error chains print it once).
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    /// A config file that is unreadable, not JSON, or has a bad key (named).
    #[error(transparent)]
    Config(#[from] step3_config::ConfigError),
    #[error("no such model directory: {}", dir.display())]
    NoModelDir { dir: PathBuf },
    #[error("{} has no config.json: it is not a Step3 checkpoint directory", dir.display())]
    NoConfig { dir: PathBuf },
    #[error(
        "no checkpoint in {}: expected model.safetensors or model.safetensors.index.json",
        dir.display()
    )]
    NoCheckpoint { dir: PathBuf },
    #[error("{}: not a readable safetensors file ({reason})", path.display())]
    BadSafetensors { path: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint{}", within.as_ref().map(|p| format!(" (looked in {})", p.display())).unwrap_or_default())]
    MissingTensor { name: String, within: Option<PathBuf> },
    #[error("tensor `{name}` in {}: expected shape {expected:?}, found {found:?}", file.display())]
    TensorShape { name: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` in {}: dtype {found} is not supported here (expected {expected})", file.display())]
    TensorDtype { name: String, file: PathBuf, found: String, expected: String },
    #[error("block-FP8 weight `{weight}` has no scale tensor (`{weight}_scale_inv` or `{weight}_scale`)")]
    MissingScale { weight: String },
    /// The checkpoint failed the inventory check; the first problem is shown, all are listed.
    #[error("{first}{}", if more.is_empty() { String::new() } else { format!(" (and {} more problems)", more.len()) })]
    Inventory { first: Box<Error>, more: Vec<Error> },
    #[error("unsupported compute dtype {0:?}: use f32, bf16 or f16")]
    UnsupportedDtype(DType),
    #[error(transparent)]
    Cache(#[from] step3_mfa::CacheError),
    /// An image that cannot be used (the error names the file when it has one).
    #[error(transparent)]
    Vision(#[from] step3_vision::VisionError),
    #[error("{}: {error}", path.display())]
    ImageFile { path: PathBuf, error: step3_vision::VisionError },
    /// Image `index` of a prompt (in prompt order, from 0) cannot be used.
    #[error("image {} of the prompt: {error}", index + 1)]
    Image { index: usize, error: Box<Error> },
    #[error("{}: {msg}", path.display())]
    Tokenizer { path: PathBuf, msg: String },
    #[error("the tokenizer has no `{token}` token, and {why}")]
    MissingSpecialToken { token: String, why: String },
    #[error("chat template: {0}")]
    Template(String),
    /// A model could not be found or fetched (hub or local).
    #[error("{0}")]
    Hub(String),
    /// Invalid input from the caller (token ids, sampling settings, shapes).
    #[error("{0}")]
    Input(String),
    /// A device layout (tensor / expert parallelism, expert placement) that cannot run.
    #[error(transparent)]
    Layout(#[from] step3_dist::LayoutError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A problem with `key` of the configuration file at `path`.
    pub fn key(path: impl Into<PathBuf>, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config(step3_config::ConfigError::key(path, key, problem))
    }

    /// A file that cannot be read.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }
}
