//! Safetensors checkpoints: discovery (one file or shards listed in an index), memory mapping,
//! header reading, and tensor loading with the file and tensor named in every error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Dtype as StDtype;

use crate::{Error, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What a checkpoint header says about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The dtype as stored (candle's name when candle supports it).
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Byte range inside the file's data section.
    pub range: (usize, usize),
}

impl TensorInfo {
    pub fn candle_dtype(&self) -> Option<DType> {
        DType::try_from(self.dtype).ok()
    }

    pub fn nbytes(&self) -> usize {
        self.range.1 - self.range.0
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

/// A memory-mapped safetensors checkpoint (one file or several shards).
///
/// Opening reads only the headers. Tensors are materialised one at a time by [`Checkpoint::load`]
/// straight from the mapping (one copy into the tensor's own storage, converted to the requested
/// dtype on the way); nothing else of the file is read into memory, and dropping the checkpoint
/// after the model is built releases the mapping.
pub struct Checkpoint {
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorInfo>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("files", &self.files()).field("tensors", &self.tensors.len()).finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (and the shards it lists) or `dir/model.safetensors`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(Error::NoCheckpoint { dir: dir.to_path_buf() })
    }

    /// Opens the shards listed in a `model.safetensors.index.json` (`weight_map`: tensor → file).
    pub fn open_index(index: &Path) -> Result<Self> {
        let map = read_weight_map(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        // Shards sorted by file name; each tensor routed to its shard's position.
        let files: std::collections::BTreeSet<&str> = map.values().map(String::as_str).collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let routing = map
            .iter()
            .map(|(name, file)| (name.clone(), files.iter().position(|f| *f == file.as_str()).unwrap_or_default()))
            .collect();
        Self::assemble(&paths, Some(routing))
    }

    /// Opens and indexes the given safetensors files (later files win on duplicate names).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        Self::assemble(paths, None)
    }

    /// Maps every file; with a `routing` (tensor → shard, from an index) each listed tensor must
    /// be in its shard and only listed tensors are visible.
    fn assemble(paths: &[PathBuf], routing: Option<HashMap<String, usize>>) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut headers = Vec::with_capacity(paths.len());
        for path in paths {
            let (shard, header) = Shard::open(path)?;
            shards.push(shard);
            headers.push(header);
        }
        let mut tensors = HashMap::new();
        match routing {
            None => {
                for (i, header) in headers.into_iter().enumerate() {
                    for (name, info) in header {
                        tensors.insert(name, TensorInfo { file: i, ..info });
                    }
                }
            }
            Some(routing) => {
                for (name, shard) in routing {
                    let info = headers[shard].get(&name).ok_or_else(|| Error::MissingTensor {
                        name: name.clone(),
                        within: Some(paths[shard].clone()),
                    })?;
                    tensors.insert(name, TensorInfo { file: shard, ..info.clone() });
                }
            }
        }
        Ok(Self { shards, tensors })
    }

    /// The files of this checkpoint.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Total size of the files on disk.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn file_of(&self, info: &TensorInfo) -> &Path {
        &self.shards[info.file].path
    }

    /// Loads tensor `name` onto `device` as `dtype`, checking its shape when `shape` is given.
    pub fn load(&self, name: &str, shape: Option<&Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let (info, stored) = self.entry(name)?;
        if let Some(shape) = shape {
            if shape.dims() != info.shape.as_slice() {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    file: self.file_of(info).to_path_buf(),
                    expected: shape.dims().to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        let tensor = self.copy_out(info, 0, info.nbytes(), stored, &info.shape, device)?;
        Ok(if stored == dtype { tensor } else { tensor.to_dtype(dtype)? })
    }

    /// Slice `index` along the first dimension of tensor `name` (expert `index` of a stacked
    /// `[E, out, in]` weight, or of its `[E, rb, cb]` scales), in the stored dtype on `device`.
    /// Only that slice's bytes are copied out of the mapping and then dropped from the resident
    /// set, so statistics can stream over stacked tensors far larger than memory.
    pub fn load_index(&self, name: &str, index: usize, device: &Device) -> Result<Tensor> {
        let (info, stored) = self.entry(name)?;
        let count = info.shape.first().copied().unwrap_or(0);
        if index >= count {
            let mut expected = info.shape.clone();
            match expected.first_mut() {
                Some(first) => *first = index + 1,
                None => expected.push(index + 1),
            }
            return Err(Error::TensorShape {
                name: name.to_string(),
                file: self.file_of(info).to_path_buf(),
                expected,
                found: info.shape.clone(),
            });
        }
        let len = info.nbytes() / count;
        self.copy_out(info, index * len, len, stored, &info.shape[1..], device)
    }

    /// The region `region[d] = (start, len)` of every dimension `d` of tensor `name`, in the
    /// stored dtype on `device`: only the region's bytes are copied out of the mapping (one run
    /// per row of the last split dimension), so a rank reads only its slice of a sharded weight.
    pub fn load_region(&self, name: &str, region: &[(usize, usize)], device: &Device) -> Result<Tensor> {
        let (info, stored) = self.entry(name)?;
        let shape = &info.shape;
        let out_of_bounds = region.len() != shape.len()
            || region.iter().zip(shape).any(|(&(start, len), &size)| len == 0 || start + len > size);
        if out_of_bounds {
            return Err(Error::TensorShape {
                name: name.to_string(),
                file: self.file_of(info).to_path_buf(),
                expected: region.iter().map(|&(start, len)| start + len).collect(),
                found: shape.clone(),
            });
        }
        let dims: Vec<usize> = region.iter().map(|r| r.1).collect();
        if dims == *shape {
            return self.copy_out(info, 0, info.nbytes(), stored, shape, device);
        }
        // Bytes of one step along each dimension, and the innermost dimensions copied whole.
        let elem = stored.size_in_bytes();
        let mut strides = vec![elem; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let last_split = (0..shape.len()).rev().find(|&d| region[d].1 != shape[d]).unwrap_or(0);
        let run = region[last_split].1 * strides[last_split];
        let shard = &self.shards[info.file];
        let base = shard.data_start + info.range.0;
        let mut bytes = Vec::with_capacity(dims.iter().product::<usize>() * elem);
        // Odometer over the dimensions before `last_split`.
        let mut index: Vec<usize> = region[..last_split].iter().map(|r| r.0).collect();
        loop {
            let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()
                + region[last_split].0 * strides[last_split];
            bytes.extend_from_slice(&shard.mmap[base + offset..base + offset + run]);
            let mut d = last_split;
            loop {
                if d == 0 {
                    let tensor = Tensor::from_raw_buffer(&bytes, stored, &dims, device)?;
                    shard.release(base, info.nbytes());
                    return Ok(tensor);
                }
                d -= 1;
                index[d] += 1;
                if index[d] < region[d].0 + region[d].1 {
                    break;
                }
                index[d] = region[d].0;
            }
        }
    }

    /// The header entry of `name` and its stored dtype.
    fn entry(&self, name: &str) -> Result<(&TensorInfo, DType)> {
        let info =
            self.tensors.get(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), within: None })?;
        let stored = info.candle_dtype().ok_or_else(|| Error::TensorDtype {
            name: name.to_string(),
            file: self.file_of(info).to_path_buf(),
            found: format!("{:?}", info.dtype),
            expected: "a dtype candle supports".into(),
        })?;
        Ok((info, stored))
    }

    /// Copies `len` bytes from `offset` into `info`'s data out of the mapping as a `dims` tensor of
    /// `stored` dtype, then drops those pages from the resident set.
    fn copy_out(
        &self,
        info: &TensorInfo,
        offset: usize,
        len: usize,
        stored: DType,
        dims: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let shard = &self.shards[info.file];
        let start = shard.data_start + info.range.0 + offset;
        let tensor = Tensor::from_raw_buffer(&shard.mmap[start..start + len], stored, dims, device)?;
        shard.release(start, len);
        Ok(tensor)
    }
}

impl Shard {
    fn open(path: &Path) -> Result<(Self, HashMap<String, TensorInfo>)> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; as with every mmap-based loader, the file must not be
        // truncated by another process while the checkpoint is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::BadSafetensors { path: path.to_path_buf(), reason: describe(&e, mmap.len()) })?;
        let header = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                (name, TensorInfo { dtype: info.dtype, shape: info.shape.clone(), file: 0, range: info.data_offsets })
            })
            .collect();
        Ok((Self { path: path.to_path_buf(), mmap, data_start: 8 + header_len }, header))
    }

    /// Drops the pages of a range that has been copied out from this process's resident set, so
    /// loading a model peaks at about one copy of the weights rather than two. The pages stay in
    /// the page cache and fault back in from the file if read again.
    fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED discards nothing: a
        // later read faults the same bytes back in from the file. No slice into the range is live.
        unsafe {
            // Advice only; failure changes nothing but memory use.
            let _ = self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len);
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

/// An index's `weight_map`: tensor name → shard file name.
pub(crate) fn read_weight_map(index: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    let value = crate::read_json(index)?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::key(index, "weight_map", "is missing or not an object"))?;
    map.iter()
        .map(|(name, file)| match file.as_str() {
            Some(f) => Ok((name.clone(), f.to_string())),
            None => Err(Error::key(index, format!("weight_map.{name}"), "must be a file name")),
        })
        .collect()
}

fn describe(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            format!("the file is truncated: its header promises more data than the {len} bytes present")
        }
        E::HeaderTooSmall => format!("the file is too short to hold a header ({len} bytes)"),
        E::InvalidHeaderLength => {
            format!("the header length is larger than the file ({len} bytes): truncated or not safetensors")
        }
        other => other.to_string(),
    }
}

/// A callback told how many of the model's tensors have been loaded: `(done, total)`.
#[derive(Clone)]
pub struct LoadProgress(pub std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress")
    }
}

/// Lets candle's [`candle_nn::VarBuilder`] read from a [`Checkpoint`], reporting progress.
/// With a rank plan, every tensor is read as that rank's slice (see [`crate::shard`]).
pub(crate) struct CheckpointBackend<'a> {
    pub ckpt: &'a Checkpoint,
    pub progress: Option<(LoadProgress, usize)>,
    /// Tensors loaded so far (shared by the builders of every rank).
    pub loaded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The rank's plan and the FP8 scale block of the checkpoint.
    pub plan: Option<(crate::shard::RankPlan, Option<[usize; 2]>)>,
}

impl<'a> CheckpointBackend<'a> {
    pub fn new(ckpt: &'a Checkpoint, progress: Option<(LoadProgress, usize)>) -> Self {
        Self { ckpt, progress, loaded: Default::default(), plan: None }
    }

    /// Reads `name` (this rank's slice of it under a plan), checking the shape when given.
    fn read(&self, name: &str, shape: Option<&Shape>, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Some((plan, block)) = &self.plan else { return self.ckpt.load(name, shape, dtype, dev) };
        let info = self.ckpt.info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), within: None })?;
        let weight = name.strip_suffix("_scale_inv").or_else(|| name.strip_suffix("_scale")).unwrap_or(name);
        let scale_of = match (weight != name, block, self.ckpt.info(weight)) {
            (true, Some(block), Some(w)) => Some((w.shape.as_slice(), *block)),
            _ => None,
        };
        let Some(region) = plan.region(name, &info.shape, scale_of).map_err(|e| Error::Input(e.to_string()))? else {
            return self.ckpt.load(name, shape, dtype, dev);
        };
        let t = self.ckpt.load_region(name, &region, dev)?;
        if let Some(shape) = shape {
            if shape.dims() != t.dims() {
                return Err(Error::TensorShape {
                    name: format!("{name} (the slice of rank tp {} / ep {})", plan.tp_rank, plan.ep_rank),
                    file: self.ckpt.file_of(info).to_path_buf(),
                    expected: shape.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
        }
        Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
    }

    fn tick(&self) {
        if let Some((LoadProgress(f), total)) = &self.progress {
            let done = self.loaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            f(done.min(*total), *total);
        }
    }
}

impl candle_nn::var_builder::SimpleBackend for CheckpointBackend<'_> {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.read(name, Some(&s), dtype, dev).map_err(candle_core::Error::wrap)?;
        self.tick();
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.read(name, None, dtype, dev).map_err(candle_core::Error::wrap)?;
        if !name.ends_with("_scale_inv") && !name.ends_with("_scale") {
            self.tick();
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// Writes `tensors` as a safetensors file at `path` the way a user expects a command's output to
/// land: through a link to the file it names (the link stays), into a FIFO or device as a stream,
/// and with the permissions an existing file had (a new one gets the process's umask, as any
/// created file does). A regular file is written whole to a sibling temporary file first and then
/// renamed over, so a reader never sees half of it.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| Error::Input(format!("writing {}: {e}", path.display()));
    let target = match path.canonicalize() {
        Ok(real) => real,
        // New: its directory, resolved, must exist.
        Err(_) => path.to_path_buf(),
    };
    let existing = std::fs::metadata(&target).ok();
    let permissions = match existing {
        Some(m) if m.is_dir() => return Err(failed(&"it is a directory")),
        Some(m) if !m.is_file() => {
            // A FIFO or a device: stream the bytes into it.
            let bytes =
                safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None).map_err(|e| failed(&e))?;
            use std::io::Write as _;
            return std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .and_then(|mut f| f.write_all(&bytes))
                .map_err(|e| failed(&e));
        }
        // The permissions the file has, or that a file created here gets (umask applied).
        Some(m) => m.permissions(),
        None => {
            let created = std::fs::File::create(&target).map_err(|e| failed(&e))?;
            created.metadata().map_err(|e| failed(&e))?.permissions()
        }
    };
    candle_core::safetensors::save(tensors, &target).map_err(|e| failed(&e))?;
    std::fs::set_permissions(&target, permissions).map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> HashMap<String, Tensor> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).and_then(|t| t.reshape((2, 3))).unwrap();
        HashMap::from([("x".to_string(), t)])
    }

    fn read_back(path: &Path) -> Vec<f32> {
        let loaded = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        loaded["x"].flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Through a link (the link stays, the file it names gets the tensors and keeps its mode),
    /// into a FIFO as a stream, a new file with the umask's mode, a directory refused.
    #[test]
    fn save_tensors_writes_where_and_as_users_expect() {
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let want = vec![0f32, 1.0, 2.0, 3.0, 4.0, 5.0];
        let (real, link) = (dir.path().join("real.st"), dir.path().join("link.st"));
        std::fs::write(&real, b"old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        save_tensors(&tensors(), &link).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::metadata(&real).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(read_back(&real), want);

        let new = dir.path().join("new.st");
        save_tensors(&tensors(), &new).unwrap();
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&new), mode(&probe), "a new file gets what any created file gets");
        assert_eq!(read_back(&new), want);

        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        save_tensors(&tensors(), &fifo).unwrap();
        let streamed = reader.join().unwrap();
        assert_eq!(streamed, std::fs::read(&new).unwrap());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());

        assert!(save_tensors(&tensors(), dir.path()).unwrap_err().to_string().contains("directory"));
    }
}
