//! Images in requests: `data:image/…;base64,` URLs, and `file://` URLs under the one directory
//! the server was allowed to read (`--allowed-local-media-path`). Remote URLs are refused: the
//! server never reaches the network.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use step3::ImageSource;

/// Turns an `image_url` into an image, or says (in a sentence) why not. A `file://` image is
/// read here, at most `max_bytes` of it (the body limit: what a `data:` URL could carry).
pub fn image_from_url(url: &str, allowed: Option<&Path>, max_bytes: usize) -> Result<ImageSource, String> {
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
    if url.starts_with("file:") {
        let Some(root) = allowed else {
            return Err("local files are not served: start the server with --allowed-local-media-path DIR".into());
        };
        // `file:///a%20b.png` and `file://localhost/a.png` as RFC 8089 reads them.
        let path = url::Url::parse(url)
            .ok()
            .filter(|u| u.scheme() == "file")
            .and_then(|u| u.to_file_path().ok())
            .ok_or("a file:// URL needs an absolute path (file:///dir/image.png)")?;
        return read_local(&path, root, max_bytes).map(|b| ImageSource::Bytes(b.into()));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err("remote image URLs are not fetched (the server does not reach the network): send the image \
                    as a data:image/...;base64, URL"
            .into());
    }
    Err("an image URL must be a data:image/...;base64, URL (or file:// under the allowed media directory)".into())
}

/// The bytes of the regular file `path`, which must lie inside `root` (itself resolved), links
/// and `..` resolved. The file is opened first and then asked where it is (on Linux the kernel's
/// name for the open file, `/proc/self/fd/N`; elsewhere the resolved path, checked to name the
/// same file without a link), so a link swapped in between the check and the read cannot make the
/// server read a file outside `root`. Every path outside `root` gets the same answer, whether it
/// exists or not: nothing about the rest of the machine is told.
fn read_local(path: &Path, root: &Path, max_bytes: usize) -> Result<Vec<u8>, String> {
    use std::io::Read as _;

    let outside = || format!("{} is not a file inside the allowed media directory", path.display());
    let Ok(real) = path.canonicalize() else {
        // Only a path that lies inside the directory, as written and through no link, may be
        // said to be missing: a link could point anywhere.
        return Err(if missing_inside(path, root) { format!("{}: no such file", path.display()) } else { outside() });
    };
    if !real.starts_with(root) {
        return Err(outside());
    }
    // Only regular files: opening a FIFO would wait for a writer (so it is opened non-blocking
    // too, and the file's type checked again once open).
    if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return Err(format!("{} is not a file", path.display()));
    }
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&real).map_err(|_| outside())?
    };
    if !opened_inside(&file, &real, root) {
        return Err(outside());
    }
    let meta = file.metadata().map_err(|_| outside())?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", path.display()));
    }
    if meta.len() > max_bytes as u64 {
        return Err(format!(
            "{} holds {} bytes, more than the {max_bytes} a request may carry",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes as u64 + 1).read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > max_bytes {
        return Err(format!("{} holds more than the {max_bytes} bytes a request may carry", path.display()));
    }
    Ok(bytes)
}

/// Whether the open `file` (opened as `real`) is a file inside `root`.
fn opened_inside(file: &std::fs::File, real: &Path, root: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let _ = real;
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).is_ok_and(|p| p.starts_with(root))
    }
    #[cfg(not(target_os = "linux"))]
    {
        // The resolved path still has no link in it, and names (without following a link) the
        // file that was opened.
        use std::os::unix::fs::MetadataExt as _;
        let (Ok(opened), Ok(named)) = (file.metadata(), std::fs::symlink_metadata(real)) else { return false };
        opened.dev() == named.dev()
            && opened.ino() == named.ino()
            && real.canonicalize().is_ok_and(|again| again == real && again.starts_with(root))
    }
}

/// Whether `path`, as written (`.` and `..` resolved lexically), lies inside `root` and reaches
/// its end through no link: only then is "no such file" an answer about the allowed directory.
fn missing_inside(path: &Path, root: &Path) -> bool {
    let path = lexical(path);
    let Ok(rest) = path.strip_prefix(root) else { return false };
    let mut at = root.to_path_buf();
    for c in rest.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return false,
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    true
}

/// `path` with `.` and `..` removed as written (no file system access).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let png = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3]);
        assert!(
            matches!(image_from_url(&format!("data:image/png;base64,{png}"), None, 1 << 20), Ok(ImageSource::Bytes(b)) if *b == [1, 2, 3])
        );
        assert!(image_from_url("data:image/png;base64,@@@", None, 1 << 20).unwrap_err().contains("base64"));
        assert!(image_from_url("data:text/plain;base64,AAAA", None, 1 << 20).unwrap_err().contains("not an image"));
        assert!(image_from_url("https://example.com/cat.png", None, 1 << 20).unwrap_err().contains("not fetched"));
        assert!(image_from_url("file:///etc/passwd", None, 1 << 20)
            .unwrap_err()
            .contains("--allowed-local-media-path"));
        assert!(image_from_url("ftp://x", None, 1 << 20).is_err());
    }

    fn bytes(r: Result<ImageSource, String>) -> Result<Vec<u8>, String> {
        r.map(|s| match s {
            ImageSource::Bytes(b) => b.to_vec(),
            other => panic!("{other:?}"),
        })
    }

    /// An allowed directory (and its resolved path) and a directory outside it holding
    /// `secret.png`.
    fn media_dirs() -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
        let (root, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let root_path = root.path().canonicalize().unwrap();
        std::fs::write(outside.path().join("secret.png"), b"SECRET").unwrap();
        (root, outside, root_path)
    }

    #[test]
    fn local_files_stay_inside_the_allowed_directory() {
        let (root, outside, root_path) = media_dirs();
        std::fs::write(root.path().join("a.png"), b"inside").unwrap();
        std::fs::write(root.path().join("a b.png"), b"spaced").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.png"), root.path().join("link.png")).unwrap();
        std::os::unix::fs::symlink(root.path().join("a.png"), root.path().join("inner-link.png")).unwrap();
        let get = |url: &str| bytes(image_from_url(url, Some(&root_path), 1 << 20));
        let url = |p: &Path| format!("file://{}", p.display());
        assert_eq!(get(&url(&root.path().join("a.png"))).unwrap(), b"inside");
        assert_eq!(get(&url(&root.path().join("inner-link.png"))).unwrap(), b"inside");
        // Percent-encoded names and the `localhost` host of RFC 8089.
        assert_eq!(get(&format!("file://{}/a%20b.png", root_path.display())).unwrap(), b"spaced");
        assert_eq!(get(&format!("file://localhost{}/a.png", root_path.display())).unwrap(), b"inside");
        // Outside: the same answer whether or not the file exists.
        let escape = root.path().join("..").join(outside.path().file_name().unwrap()).join("secret.png");
        for bad in [
            url(&escape),
            url(&root.path().join("link.png")),
            url(&outside.path().join("secret.png")),
            url(&outside.path().join("missing.png")),
            "file:///etc/passwd".into(),
            "file:///etc/no-such-file-here".into(),
            format!("file://{}/%2e%2e/x.png", root_path.display()),
        ] {
            let e = get(&bad).unwrap_err();
            assert!(e.ends_with("is not a file inside the allowed media directory"), "{bad}: {e}");
        }
        assert!(get(&url(&root.path().join("missing.png"))).unwrap_err().ends_with("no such file"));
        // Links to missing files outside, or through a linked directory, tell nothing either.
        std::os::unix::fs::symlink(outside.path().join("nope.png"), root.path().join("dangling.png")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        for bad in
            [root.path().join("dangling.png"), root.path().join("out/secret.png"), root.path().join("out/nope.png")]
        {
            let e = get(&url(&bad)).unwrap_err();
            assert!(e.ends_with("is not a file inside the allowed media directory"), "{bad:?}: {e}");
        }
        // A FIFO is refused at once (opening it would wait for a writer).
        let fifo = root.path().join("fifo.png");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(get(&url(&fifo)).unwrap_err().ends_with("is not a file"));
        assert!(get(&url(root.path())).unwrap_err().ends_with("is not a file"));
        assert!(get("file://relative.png").unwrap_err().contains("absolute"));
        assert!(get("file://example.com/a.png").unwrap_err().contains("absolute"));
        // A file larger than a request may carry is refused before it is read.
        let small = bytes(image_from_url(&url(&root.path().join("a.png")), Some(&root_path), 3));
        assert!(small.unwrap_err().contains("more than the 3"));
    }

    /// A link swapped in and out while requests read the name never yields the file outside.
    #[test]
    fn a_swapped_link_never_reads_outside() {
        let (root, outside, root_path) = media_dirs();
        let (name, secret) = (root.path().join("race.png"), outside.path().join("secret.png"));
        std::fs::write(&name, b"inside").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, name, tmp) = (stop.clone(), name.clone(), root.path().join("tmp"));
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::remove_file(&tmp);
                    let _ = std::os::unix::fs::symlink(&secret, &tmp);
                    let _ = std::fs::rename(&tmp, &name);
                    let _ = std::fs::write(&tmp, b"inside");
                    let _ = std::fs::rename(&tmp, &name);
                }
            })
        };
        let url = format!("file://{}", name.display());
        // At least 3000 racing reads, and more (up to 200 000) until one has caught the regular
        // file: on a loaded machine the swapper can hold the name as a link for a long while.
        let (mut read_inside, mut attempts) = (0, 0);
        while attempts < 3000 || (read_inside == 0 && attempts < 200_000) {
            attempts += 1;
            if let Ok(b) = bytes(image_from_url(&url, Some(&root_path), 1 << 20)) {
                assert_eq!(b, b"inside");
                read_inside += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        assert!(read_inside > 0, "the regular file was never read");
    }
}
