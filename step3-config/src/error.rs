use std::path::{Path, PathBuf};

/// Why a configuration file cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A key is missing, has the wrong type or an unsupported value.
    #[error("{}: key `{key}` {problem}", path.display())]
    Key { path: PathBuf, key: String, problem: String },
}

pub type Result<T> = std::result::Result<T, ConfigError>;

impl ConfigError {
    /// A problem with `key` of the file at `path`.
    pub fn key(path: impl Into<PathBuf>, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Key { path: path.into(), key: key.into(), problem: problem.into() }
    }
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.to_path_buf(), source })
}
