//! Where a checkpoint comes from: a local directory, or a Hugging Face repo id (optionally
//! `@revision`) fetched through `hf-hub` into the standard cache, or found there offline.
//!
//! Cache location: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub` (the layout
//! the Python `huggingface_hub` uses, so both share downloads). `HF_HUB_OFFLINE=1` resolves
//! everything from the cache and names any missing file. `HF_TOKEN` authenticates downloads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::{Error, Result};

/// Files a model directory may hold besides the weights; only `config.json` is required.
pub const OPTIONAL_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"];

/// A model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// A directory when `s` names an existing one or looks like a path (starts with `.`, `/` or
    /// `~`, or has more than one `/` before any `@revision`): a missing one is an error, never a
    /// hub request. Otherwise a
    /// repo id `owner/name`, optionally `owner/name@revision` (default revision `main`).
    pub fn parse(s: &str) -> Result<Self> {
        let path = match (s.strip_prefix("~/"), std::env::var_os("HOME")) {
            (Some(rest), Some(home)) => Path::new(&home).join(rest),
            _ => PathBuf::from(s),
        };
        if path.is_dir() {
            return Ok(Self::Dir(path));
        }
        let repo_part = s.split('@').next().unwrap_or(s);
        let looks_like_path =
            s.starts_with(['.', '/', '~', '\\']) || repo_part.matches('/').count() > 1 || path.exists();
        if looks_like_path {
            return Err(Error::NoModelDir { dir: path });
        }
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        match repo.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) && !revision.is_empty() => {
                Ok(Self::Hub { repo: repo.to_string(), revision: revision.to_string() })
            }
            _ => Err(Error::Hub(format!(
                "`{s}` is neither a model directory nor a Hugging Face repo id (owner/name, optionally @revision)"
            ))),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Resolve from the cache only.
    pub offline: bool,
    pub cache_dir: PathBuf,
    /// Show download progress bars.
    pub progress: bool,
    pub token: Option<String>,
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

impl HubOptions {
    /// From the environment: `HF_HUB_OFFLINE`, `HF_HUB_CACHE` / `HF_HOME`, `HF_TOKEN`.
    pub fn from_env() -> Self {
        let cache_dir = match (std::env::var_os("HF_HUB_CACHE"), std::env::var_os("HF_HOME")) {
            (Some(c), _) => PathBuf::from(c),
            (None, Some(home)) => PathBuf::from(home).join("hub"),
            (None, None) => hf_hub::Cache::default().path().clone(),
        };
        Self {
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| truthy(&v)),
            cache_dir,
            progress: true,
            token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
        }
    }
}

/// The local directory holding `source`'s files, downloading what is missing unless offline.
pub fn resolve(source: &ModelSource, opts: &HubOptions) -> Result<PathBuf> {
    match source {
        ModelSource::Dir(p) if p.is_dir() => Ok(p.clone()),
        ModelSource::Dir(p) => Err(Error::NoModelDir { dir: p.clone() }),
        ModelSource::Hub { repo, revision } if opts.offline => resolve_offline(repo, revision, &opts.cache_dir),
        ModelSource::Hub { repo, revision } => download(repo, revision, opts),
    }
}

/// Shard files named by an index's `weight_map`.
fn shards(index: &Path) -> Result<BTreeSet<String>> {
    Ok(crate::checkpoint::read_weight_map(index)?.into_values().collect())
}

fn resolve_offline(repo: &str, revision: &str, cache_dir: &Path) -> Result<PathBuf> {
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    let cached = cache.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let missing = |file: &str| {
        Error::Hub(format!(
            "working offline (--offline or HF_HUB_OFFLINE) and `{file}` of {repo}@{revision} is not in the \
             Hugging Face cache at {} (download it once online, or point HF_HOME / HF_HUB_CACHE at the cache \
             that has it)",
            cache_dir.display()
        ))
    };
    // A revision may be a commit hash with a snapshot but no ref.
    let snapshot_of = |file: &str| -> Option<PathBuf> {
        cached.get(file).or_else(|| {
            let p = cache_dir
                .join(format!("models--{}", repo.replace('/', "--")))
                .join("snapshots")
                .join(revision)
                .join(file);
            p.exists().then_some(p)
        })
    };
    let config = snapshot_of("config.json").ok_or_else(|| missing("config.json"))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    match snapshot_of(INDEX_FILE) {
        Some(index) => {
            for shard in shards(&index)? {
                snapshot_of(&shard).ok_or_else(|| missing(&shard))?;
            }
        }
        None => {
            snapshot_of(SINGLE_FILE).ok_or_else(|| missing("model.safetensors (or model.safetensors.index.json)"))?;
        }
    }
    Ok(dir)
}

fn download(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(opts.progress)
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.clone())
        .build()
        .map_err(|e| Error::Hub(format!("cannot reach the Hugging Face hub: {e}")))?;
    let remote = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let info = remote.info().map_err(|e| {
        Error::Hub(format!(
            "cannot find {repo}@{revision} on the Hugging Face hub ({e}); check the repo id, your network and HF_TOKEN, \
             or set HF_HUB_OFFLINE=1 to use the local cache"
        ))
    })?;
    let files: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let fetch = |file: &str| {
        remote.get(file).map_err(|e| Error::Hub(format!("downloading `{file}` of {repo}@{revision}: {e}")))
    };
    if !files.contains("config.json") {
        return Err(Error::Hub(format!("{repo}@{revision} has no config.json: not a model repository")));
    }
    let config = fetch("config.json")?;
    for f in OPTIONAL_FILES.iter().filter(|f| files.contains(**f)) {
        fetch(f)?;
    }
    if files.contains(INDEX_FILE) {
        let index = fetch(INDEX_FILE)?;
        for shard in shards(&index)? {
            fetch(&shard)?;
        }
    } else if files.contains(SINGLE_FILE) {
        fetch(SINGLE_FILE)?;
    } else {
        return Err(Error::Hub(format!("{repo}@{revision} has neither {INDEX_FILE} nor {SINGLE_FILE}")));
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            ModelSource::parse("stepfun-ai/step3").unwrap(),
            ModelSource::Hub { repo: "stepfun-ai/step3".into(), revision: "main".into() }
        );
        assert_eq!(
            ModelSource::parse("stepfun-ai/step3-fp8@refs/pr/2").unwrap(),
            ModelSource::Hub { repo: "stepfun-ai/step3-fp8".into(), revision: "refs/pr/2".into() }
        );
        assert_eq!(ModelSource::parse(".").unwrap(), ModelSource::Dir(".".into()));
        // Path-like sources never reach the hub: a missing one says so.
        for missing in ["./nonexistent", "/no/such/dir", "~/no-such-step3-dir", "a/b/c", "../x"] {
            let e = ModelSource::parse(missing).unwrap_err().to_string();
            assert!(e.starts_with("no such model directory: "), "{missing}: {e}");
        }
        for bad in ["step3", "a/b/c", "/no/such/dir", "owner/", "x y/z"] {
            assert!(ModelSource::parse(bad).is_err(), "{bad}");
        }
    }
}
