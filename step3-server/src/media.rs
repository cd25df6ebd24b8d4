//! Images in requests: `data:image/…;base64,` URLs, and `file://` URLs under the one directory
//! the server was allowed to read (`--allowed-local-media-path`). Remote URLs are refused: the
//! server never reaches the network.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use step3::ImageSource;

/// Turns an `image_url` into an image, or says (in a sentence) why not.
pub fn image_from_url(url: &str, allowed: Option<&Path>) -> Result<ImageSource, String> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or("a data: URL needs a comma before its data")?;
        if !meta.ends_with(";base64") {
            return Err("a data: URL must be base64 (data:image/png;base64,…)".into());
        }
        let media = meta.trim_end_matches(";base64");
        if !media.is_empty() && !media.starts_with("image/") {
            return Err(format!("a data: URL of type `{media}` is not an image"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("the data: URL is not valid base64: {e}"))?;
        return Ok(ImageSource::Bytes(bytes.into()));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let Some(root) = allowed else {
            return Err("local files are not served: start the server with --allowed-local-media-path DIR".into());
        };
        return local_file(Path::new(path), root).map(ImageSource::File);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err("remote image URLs are not fetched (the server does not reach the network): send the image \
                    as a data:image/...;base64, URL"
            .into());
    }
    Err("an image URL must be a data:image/...;base64, URL (or file:// under the allowed media directory)".into())
}

/// `path` resolved (links and `..` included) and checked to lie inside `root` (itself resolved).
fn local_file(path: &Path, root: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("a file:// URL needs an absolute path".into());
    }
    let real = path.canonicalize().map_err(|_| format!("{}: no such file", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!("{} is outside the allowed media directory", path.display()));
    }
    if !real.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let png = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        assert!(
            matches!(image_from_url(&format!("data:image/png;base64,{png}"), None), Ok(ImageSource::Bytes(b)) if *b == [1, 2, 3])
        );
        assert!(image_from_url("data:image/png;base64,@@@", None).unwrap_err().contains("base64"));
        assert!(image_from_url("data:text/plain;base64,AAAA", None).unwrap_err().contains("not an image"));
        assert!(image_from_url("https://example.com/cat.png", None).unwrap_err().contains("not fetched"));
        assert!(image_from_url("file:///etc/passwd", None).unwrap_err().contains("--allowed-local-media-path"));
        assert!(image_from_url("ftp://x", None).is_err());
    }

    #[test]
    fn local_files_stay_inside_the_allowed_directory() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        std::fs::write(root.path().join("a.png"), b"x").unwrap();
        std::fs::write(outside.path().join("secret.png"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.png"), root.path().join("link.png")).unwrap();
        let url = |p: &Path| format!("file://{}", p.display());
        assert!(image_from_url(&url(&root.path().join("a.png")), Some(&root_path)).is_ok());
        let escape = root.path().join("..").join(outside.path().file_name().unwrap()).join("secret.png");
        for bad in
            [escape, root.path().join("link.png"), outside.path().join("secret.png"), PathBuf::from("/etc/passwd")]
        {
            let e = image_from_url(&url(&bad), Some(&root_path)).unwrap_err();
            assert!(e.contains("outside the allowed media directory") || e.contains("no such file"), "{bad:?}: {e}");
        }
        assert!(image_from_url("file://relative.png", Some(&root_path)).unwrap_err().contains("absolute"));
    }
}
