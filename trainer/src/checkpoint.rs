//! Sharded checkpoints: each rank writes its pieces of global tensors, rank 0 commits a manifest and publishes the step by rename; loading reads, under any layout, the intersections it needs.
//!
//! Layout of `checkpoint.dir`:
//! ```text
//! step-00000100/manifest.json        written last, after every rank's files are fsync'd
//! step-00000100/rank-00003.safetensors
//! step-00000100/tokenizer.json
//! .step-00000200.partial/            a save in progress (never loaded, removed later)
//! latest                             the name of the newest complete step, replaced by rename
//! ```
//! Every stored tensor is a box of a global tensor (`Region`): a parameter under its
//! Hugging Face name (`model:NAME`) or an optimizer state of it (`exp_avg:NAME`,
//! `exp_avg_sq:NAME`, `master:NAME`). Replicated tensors are written by one rank only.
use crate::comm::{Comm, GroupKind, ReduceOp};
use crate::config::Config;
use crate::params::{FlatParams, Region};
use crate::zero::DistOptimizer;
use anyhow::{bail, Context, Result};
use data_shards::DataCursor;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use tch::{Kind, Tensor};
use xxhash_rust::xxh3::xxh3_128;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Piece {
    pub file: String,
    pub key: String,
    pub offset: Vec<i64>,
    pub shape: Vec<i64>,
    pub xxh3_128: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorEntry {
    pub shape: Vec<i64>,
    pub dtype: String,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: i64,
    pub data_cursor: DataCursor,
    /// Layout of the run that saved it: world size, tensor-parallel degree, ZeRO.
    pub world: usize,
    pub tensor_parallel: usize,
    pub zero: bool,
    /// The resolved configuration of that run.
    pub config: String,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Manifest {
    /// Reads and checks a step directory's manifest: known format, every file inside the directory.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("checkpoint {} has no readable manifest.json (an incomplete save?)", dir.display())
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        if manifest.format_version > FORMAT_VERSION {
            bail!(
                "{}: checkpoint format version {} is newer than this trainer's {FORMAT_VERSION}; use a newer trainer",
                path.display(),
                manifest.format_version
            );
        }
        let named_step = dir.file_name().and_then(|n| step_of_dir_name(n.to_str()?));
        if manifest.step < 0 || named_step.is_some_and(|step| step != manifest.step) {
            bail!("{}: the manifest is of step {}, not of this directory's step", path.display(), manifest.step);
        }
        for (name, entry) in &manifest.tensors {
            for piece in &entry.pieces {
                let file = Path::new(&piece.file);
                if file.components().count() != 1 || file.file_name().is_none() {
                    bail!(
                        "{}: tensor {name} names the file {:?}, outside the checkpoint directory; refusing to read it",
                        path.display(),
                        piece.file
                    );
                }
            }
            kind_of(&entry.dtype)
                .and_then(|_| entry.check_tiling())
                .with_context(|| format!("{}: tensor {name} is corrupt", path.display()))?;
        }
        Ok(manifest)
    }
}

impl TensorEntry {
    /// Checks that the pieces cover the global tensor exactly once: each inside it, no two
    /// overlapping, and together as many elements as it has.
    fn check_tiling(&self) -> Result<()> {
        let dims = self.shape.len();
        if self.shape.iter().any(|&d| d < 0) {
            bail!("negative dimension in shape {:?}", self.shape);
        }
        let total = self.shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d)).context("its size overflows")?;
        let mut covered = 0i64;
        for (i, piece) in self.pieces.iter().enumerate() {
            let (offset, shape) = (&piece.offset, &piece.shape);
            if offset.len() != dims || shape.len() != dims {
                bail!(
                    "piece {:?} has {} offsets and {} sizes for a {dims}-dimensional tensor",
                    piece.key,
                    offset.len(),
                    shape.len()
                );
            }
            let inside = (0..dims).all(|d| offset[d] >= 0 && shape[d] >= 0 && offset[d] + shape[d] <= self.shape[d]);
            if !inside {
                bail!("piece {:?} at {offset:?} of shape {shape:?} lies outside the shape {:?}", piece.key, self.shape);
            }
            covered += shape.iter().product::<i64>();
            for other in &self.pieces[..i] {
                let overlap = (0..dims).all(|d| {
                    offset[d].max(other.offset[d]) < (offset[d] + shape[d]).min(other.offset[d] + other.shape[d])
                });
                if overlap {
                    bail!("pieces {:?} and {:?} overlap", other.key, piece.key);
                }
            }
        }
        if covered != total {
            bail!("its pieces hold {covered} of its {total} elements");
        }
        Ok(())
    }
}

fn step_dir_name(step: i64) -> String {
    format!("step-{step:08}")
}

/// The step a `step-N` directory name stands for.
fn step_of_dir_name(name: &str) -> Option<i64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Points `root/latest` at step `step`'s directory, by rename.
fn publish_latest(root: &Path, step: i64) -> Result<()> {
    let pointer = root.join("latest.tmp");
    write_synced(&pointer, step_dir_name(step).as_bytes())?;
    std::fs::rename(&pointer, root.join("latest"))
        .with_context(|| format!("cannot replace {}", root.join("latest").display()))?;
    sync_dir(root)
}

fn dtype_name(kind: Kind) -> Result<(&'static str, StDtype)> {
    Ok(match kind {
        Kind::Float => ("float32", StDtype::F32),
        Kind::Double => ("float64", StDtype::F64),
        Kind::BFloat16 => ("bfloat16", StDtype::BF16),
        other => bail!("cannot checkpoint {other:?} tensors"),
    })
}

fn kind_of(dtype: &str) -> Result<Kind> {
    Ok(match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "bfloat16" => Kind::BFloat16,
        other => bail!("unknown tensor dtype {other:?} in the checkpoint"),
    })
}

/// A view of `buffer` holding `region`, shaped as its box.
fn region_view(buffer: &Tensor, region: &Region) -> Tensor {
    buffer.narrow(0, region.flat.start, region.flat.end - region.flat.start).view(region.shape.as_slice())
}

/// What this rank stores: the buffers it is responsible for, each with its named regions.
fn owned_regions(params: &FlatParams, optimizer: &DistOptimizer, comm: &Comm) -> Vec<(Tensor, Vec<(String, Region)>)> {
    let topology = comm.topology;
    let mine = |r: &Region| !r.replicated || topology.tensor.rank == 0;
    let mut out = Vec::new();
    if topology.data.rank == 0 {
        let regions = params.regions(&(0..params.numel())).into_iter().filter(mine);
        out.push((params.values().shallow_clone(), regions.map(|r| (format!("model:{}", r.name), r)).collect()));
    }
    if optimizer.sharded() || topology.data.rank == 0 {
        let regions: Vec<Region> = optimizer.regions(params).into_iter().filter(mine).collect();
        for (state, buffer) in optimizer.state(params) {
            out.push((buffer, regions.iter().map(|r| (format!("{state}:{}", r.name), r.clone())).collect()));
        }
    }
    out
}

/// One rank's part of a save, copied to host memory.
struct HostPiece {
    tensor: String,
    global_shape: Vec<i64>,
    offset: Vec<i64>,
    shape: Vec<i64>,
    dtype: (&'static str, StDtype),
    /// A host copy of the box, taken while training waits; turned into bytes by the writer.
    data: Tensor,
}

impl HostPiece {
    fn bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.data.numel() * self.data.kind().elt_size_in_bytes()];
        self.data.copy_data_u8(&mut bytes, self.data.numel());
        bytes
    }
}

/// Writes this rank's pieces and their index into the staging directory, fsync'd.
fn write_rank_files(staging: &Path, rank: usize, pieces: Vec<HostPiece>) -> Result<u64> {
    let file = format!("rank-{rank:05}.safetensors");
    let mut index: BTreeMap<String, TensorEntry> = BTreeMap::new();
    let bytes: Vec<Vec<u8>> = pieces.iter().map(HostPiece::bytes).collect();
    let mut views = Vec::with_capacity(pieces.len());
    for (i, (piece, bytes)) in pieces.iter().zip(&bytes).enumerate() {
        let key = format!("{i}");
        let shape: Vec<usize> = piece.shape.iter().map(|&d| d as usize).collect();
        views.push((key.clone(), TensorView::new(piece.dtype.1, shape, bytes)?));
        let entry = index.entry(piece.tensor.clone()).or_insert_with(|| TensorEntry {
            shape: piece.global_shape.clone(),
            dtype: piece.dtype.0.into(),
            pieces: Vec::new(),
        });
        entry.pieces.push(Piece {
            file: file.clone(),
            key,
            offset: piece.offset.clone(),
            shape: piece.shape.clone(),
            xxh3_128: format!("{:032x}", xxh3_128(bytes)),
        });
    }
    let path = staging.join(&file);
    safetensors::tensor::serialize_to_file(views, None, &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    File::open(&path)?.sync_all()?;
    let bytes = std::fs::metadata(&path)?.len();
    write_synced(&staging.join(format!("rank-{rank:05}.json")), serde_json::to_string(&index)?.as_bytes())?;
    Ok(bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all().with_context(|| format!("cannot fsync {}", dir.display()))
}

/// A save whose files are being written in the background.
struct PendingSave {
    step: i64,
    staging: PathBuf,
    manifest: Manifest,
    writer: Option<JoinHandle<Result<u64>>>,
    result: Option<Result<u64>>,
    started: Instant,
}

/// Saves and commits checkpoints for one run: `save` copies this rank's state to host
/// memory and writes it (in the background when asynchronous); `settle` (every step, on every
/// rank, with every rank's `status` combined) commits a save once every rank has written its files.
pub struct Checkpointer {
    root: PathBuf,
    keep_last: usize,
    asynchronous: bool,
    tokenizer: Option<PathBuf>,
    pending: Option<PendingSave>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").field("root", &self.root).finish()
    }
}

/// Where a rank's part of a pending save stands (both false when none is pending).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStatus {
    pub writing: bool,
    pub failed: bool,
}

/// What a completed save reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    pub step: i64,
    pub dir: PathBuf,
    /// Bytes written by all ranks, and by this one.
    pub bytes: u64,
    pub rank_bytes: u64,
    pub seconds: f64,
}

impl Checkpointer {
    pub fn new(root: PathBuf, keep_last: usize, asynchronous: bool, tokenizer: Option<PathBuf>) -> Checkpointer {
        Checkpointer { root, keep_last, asynchronous, tokenizer, pending: None }
    }

    /// The newest complete checkpoint under `root`, if any. Complete step directories (a
    /// `step-N` holding its manifest, which is written last) are the truth: `latest` only
    /// names the newest of them, and when it is missing, dangling or behind (a crash between
    /// publishing a step and replacing `latest`), `repair` rewrites it.
    pub fn latest(root: &Path, repair: bool) -> Result<Option<PathBuf>> {
        let mut newest: Option<(i64, PathBuf)> = None;
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read the checkpoint directory {}", root.display()))
            }
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read the checkpoint directory {}", root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(step) = step_of_dir_name(&name) else { continue };
            if entry.path().join("manifest.json").is_file() && newest.as_ref().is_none_or(|(n, _)| step > *n) {
                newest = Some((step, entry.path()));
            }
        }
        let Some((step, dir)) = newest else { return Ok(None) };
        let pointer = root.join("latest");
        let named = std::fs::read_to_string(&pointer).ok().map(|name| name.trim().to_string());
        if repair && named.as_deref() != Some(step_dir_name(step).as_str()) {
            tracing::warn!(
                "{} named {:?} but the newest complete checkpoint is {}; repairing it",
                pointer.display(),
                named.unwrap_or_else(|| "nothing".into()),
                step_dir_name(step)
            );
            publish_latest(root, step)?;
        }
        Ok(Some(dir))
    }

    /// Starts saving the state after `step` steps. Collective: every rank calls it at the
    /// same step. A previous save still in flight is completed first.
    pub fn save(
        &mut self,
        comm: &Comm,
        params: &FlatParams,
        optimizer: &DistOptimizer,
        config: &Config,
        step: i64,
        cursor: DataCursor,
    ) -> Result<Option<SaveReport>> {
        let previous = self.finish(comm)?;
        let started = Instant::now();
        let staging = self.root.join(format!(".{}.partial", step_dir_name(step)));
        std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        // What training waits for: one host copy per buffer; the boxes are views of it.
        let mut pieces = Vec::new();
        for (buffer, regions) in owned_regions(params, optimizer, comm) {
            let host = tch::no_grad(|| {
                if buffer.device() == tch::Device::Cpu {
                    buffer.copy()
                } else {
                    buffer.to_device(tch::Device::Cpu)
                }
            });
            let dtype = dtype_name(host.kind())?;
            for (tensor, region) in regions {
                let data = region_view(&host, &region);
                pieces.push(HostPiece {
                    tensor,
                    global_shape: region.global_shape,
                    offset: region.offset,
                    shape: region.shape,
                    dtype,
                    data,
                });
            }
        }
        let topology = comm.topology;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            step,
            data_cursor: cursor,
            world: topology.world,
            tensor_parallel: topology.tensor.size,
            zero: optimizer.sharded(),
            config: config.to_toml(),
            tensors: BTreeMap::new(),
        };
        let (dir, rank) = (staging.clone(), topology.rank);
        let mut pending = PendingSave { step, staging, manifest, writer: None, result: None, started };
        if self.asynchronous {
            pending.writer = Some(std::thread::spawn(move || write_rank_files(&dir, rank, pieces)));
            self.pending = Some(pending);
            Ok(previous)
        } else {
            pending.result = Some(write_rank_files(&dir, rank, pieces));
            self.pending = Some(pending);
            Ok(self.finish(comm)?.or(previous))
        }
    }

    /// This rank's part of a pending save, without waiting for its writes: the training loop
    /// combines every rank's into the step's one all-reduce and hands the result to [`Self::settle`].
    pub fn status(&mut self) -> SaveStatus {
        self.local_status(false)
    }

    /// Waits for the pending save, if any, and commits it. Collective.
    pub fn finish(&mut self, comm: &Comm) -> Result<Option<SaveReport>> {
        let local = self.local_status(true);
        let flags = Tensor::from_slice(&[f64::from(u8::from(local.writing)), f64::from(u8::from(local.failed))]);
        comm.all_reduce(GroupKind::World, &flags, ReduceOp::Max).wait()?;
        let agreed = SaveStatus { writing: flags.double_value(&[0]) > 0.0, failed: flags.double_value(&[1]) > 0.0 };
        self.settle(comm, agreed)
    }

    /// Joins the background writer once it is done (or, with `wait`, until it is).
    fn local_status(&mut self, wait: bool) -> SaveStatus {
        let Some(pending) = self.pending.as_mut() else { return SaveStatus::default() };
        if let Some(writer) = pending.writer.take_if(|w| wait || w.is_finished()) {
            pending.result =
                Some(writer.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the checkpoint writer panicked"))));
        }
        SaveStatus { writing: pending.result.is_none(), failed: matches!(pending.result, Some(Err(_))) }
    }

    /// Commits the pending save once no rank is still writing, given every rank's
    /// [`SaveStatus`] combined (any rank writing, any rank failed). Collective.
    pub fn settle(&mut self, comm: &Comm, agreed: SaveStatus) -> Result<Option<SaveReport>> {
        if self.pending.is_none() || agreed.writing {
            return Ok(None);
        }
        let failed = agreed.failed;
        let pending = self.pending.take().expect("a pending save");
        let bytes = match pending.result {
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                return Err(e.context(format!("saving step {} failed; {}", pending.step, self.what_stays())))
            }
            None => unreachable!("settled above"),
        };
        if failed {
            bail!("another rank failed to write step {}; {}", pending.step, self.what_stays());
        }
        let rank_bytes = bytes;
        let bytes = comm.sum_scalar(GroupKind::World, bytes as f64)? as u64;
        let dir = self.root.join(step_dir_name(pending.step));
        if comm.topology.rank == 0 {
            self.commit(&pending, &dir, comm.topology.world)?;
        }
        comm.barrier(GroupKind::World).wait()?;
        let seconds = pending.started.elapsed().as_secs_f64();
        Ok(Some(SaveReport { step: pending.step, dir, bytes, rank_bytes, seconds }))
    }

    /// What a failed save leaves: the newest complete checkpoint, if there is one.
    fn what_stays(&self) -> String {
        match Checkpointer::latest(&self.root, false) {
            Ok(Some(dir)) => format!("{} stays the newest checkpoint", dir.display()),
            _ => format!("no complete checkpoint exists in {}", self.root.display()),
        }
    }

    /// Rank 0: merge every rank's index into the manifest, write it last, publish the step
    /// directory and then `latest` by rename, prune old checkpoints and failed saves.
    fn commit(&self, pending: &PendingSave, dir: &Path, world: usize) -> Result<()> {
        let mut manifest = pending.manifest.clone();
        for rank in 0..world {
            let path = pending.staging.join(format!("rank-{rank:05}.json"));
            let index: BTreeMap<String, TensorEntry> = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            for (name, entry) in index {
                manifest
                    .tensors
                    .entry(name)
                    .or_insert_with(|| TensorEntry { pieces: Vec::new(), ..entry.clone() })
                    .pieces
                    .extend(entry.pieces);
            }
            std::fs::remove_file(&path)?;
        }
        if let Some(tokenizer) = &self.tokenizer {
            std::fs::copy(tokenizer, pending.staging.join("tokenizer.json"))?;
        }
        write_synced(&pending.staging.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        sync_dir(&pending.staging)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&pending.staging, dir).with_context(|| format!("cannot publish {}", dir.display()))?;
        publish_latest(&self.root, pending.step)?;
        self.prune(pending.step)
    }

    /// Removes all but the newest `keep_last` complete checkpoints and any abandoned partial save.
    fn prune(&self, newest: i64) -> Result<()> {
        let mut steps = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step-") && name.ends_with(".partial") {
                std::fs::remove_dir_all(self.root.join(&name))?;
            } else if let Some(step) = step_of_dir_name(&name) {
                if step <= newest {
                    steps.push(step);
                }
            }
        }
        steps.sort_unstable();
        for step in &steps[..steps.len().saturating_sub(self.keep_last)] {
            std::fs::remove_dir_all(self.root.join(step_dir_name(*step)))?;
        }
        Ok(())
    }
}

/// A checkpoint file, memory-mapped, with its safetensors header parsed once.
struct MappedFile {
    map: memmap2::Mmap,
    /// Byte range of each stored piece within the file.
    pieces: HashMap<String, std::ops::Range<usize>>,
}

/// Reads, for one loading rank, boxes of global tensors out of a checkpoint's pieces.
pub struct Reader {
    dir: PathBuf,
    manifest: Manifest,
    files: HashMap<String, MappedFile>,
    verified: HashSet<(String, String)>,
    bytes_read: u64,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Reader> {
        Ok(Reader {
            dir: dir.to_path_buf(),
            manifest: Manifest::read(dir)?,
            files: HashMap::new(),
            verified: HashSet::new(),
            bytes_read: 0,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether the checkpoint holds the global tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.manifest.tensors.contains_key(name)
    }

    /// Bytes of the pieces read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    fn file(&mut self, name: &str) -> Result<&MappedFile> {
        if !self.files.contains_key(name) {
            let path = self.dir.join(name);
            let file = File::open(&path)
                .with_context(|| format!("checkpoint file {} is missing (named by the manifest)", path.display()))?;
            // SAFETY: checkpoint files are never modified after they are published; the map
            // is read-only and every piece's bytes are checksummed before use.
            let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
            let (header, metadata) = SafeTensors::read_metadata(&map)
                .with_context(|| format!("checkpoint file {} is truncated or corrupt", path.display()))?;
            let data_start = 8 + header;
            let pieces = metadata
                .tensors()
                .into_iter()
                .map(|(key, info)| (key, data_start + info.data_offsets.0..data_start + info.data_offsets.1))
                .collect();
            self.files.insert(name.to_string(), MappedFile { map, pieces });
        }
        Ok(&self.files[name])
    }

    /// Fills `target` (shaped as the box at `offset` of global tensor `name`) from the
    /// pieces that intersect it; every element must be covered.
    pub fn read_box(&mut self, name: &str, global_shape: &[i64], offset: &[i64], target: &Tensor) -> Result<()> {
        let entry = self.manifest.tensors.get(name).cloned().with_context(|| {
            format!(
                "checkpoint {} has no tensor {name} (saved by another model or optimizer setup?)",
                self.dir.display()
            )
        })?;
        if entry.shape != global_shape {
            bail!(
                "checkpoint {}: tensor {name} has shape {:?}, the model needs {:?} (incompatible model shape)",
                self.dir.display(),
                entry.shape,
                global_shape
            );
        }
        let kind = kind_of(&entry.dtype)?;
        let size = target.size();
        let mut covered = 0i64;
        for piece in &entry.pieces {
            let (start, end): (Vec<i64>, Vec<i64>) = (0..size.len())
                .map(|d| (offset[d].max(piece.offset[d]), (offset[d] + size[d]).min(piece.offset[d] + piece.shape[d])))
                .unzip();
            if start.iter().zip(&end).any(|(s, e)| s >= e) {
                continue;
            }
            let source = self.piece_tensor(piece, kind, name)?;
            let (mut src, mut dst) = (source, target.shallow_clone());
            for d in 0..size.len() {
                src = src.narrow(d as i64, start[d] - piece.offset[d], end[d] - start[d]);
                dst = dst.narrow(d as i64, start[d] - offset[d], end[d] - start[d]);
            }
            covered += src.numel() as i64;
            dst.copy_(&src);
        }
        if covered != target.numel() as i64 {
            bail!("checkpoint {}: the pieces of {name} do not cover the part this rank needs", self.dir.display());
        }
        Ok(())
    }

    /// A piece as a CPU tensor over the mapped file (no copy), its bytes checked against the
    /// manifest's checksum the first time. The tensor must not outlive the reader.
    fn piece_tensor(&mut self, piece: &Piece, kind: Kind, name: &str) -> Result<Tensor> {
        let id = (piece.file.clone(), piece.key.clone());
        let verify = !self.verified.contains(&id);
        let path = self.dir.join(&piece.file);
        let file = self.file(&piece.file)?;
        let range = file
            .pieces
            .get(&piece.key)
            .cloned()
            .with_context(|| format!("checkpoint file {} lacks piece {} of {name}", path.display(), piece.key))?;
        let bytes = &file.map[range];
        let numel: i64 = piece.shape.iter().product();
        if bytes.len() != numel as usize * kind.elt_size_in_bytes() {
            bail!("checkpoint file {}: piece {} of {name} has the wrong size", path.display(), piece.key);
        }
        if verify {
            let actual = format!("{:032x}", xxh3_128(bytes));
            if actual != piece.xxh3_128 {
                bail!(
                    "checkpoint file {}: checksum mismatch in {name} (expected {}, got {actual}); the file is corrupted",
                    path.display(),
                    piece.xxh3_128
                );
            }
        }
        let (pointer, length) = (bytes.as_ptr(), bytes.len());
        if verify {
            self.bytes_read += length as u64;
            self.verified.insert(id);
        }
        let strides: Vec<i64> = (0..piece.shape.len()).map(|d| piece.shape[d + 1..].iter().product()).collect();
        // SAFETY: `pointer` holds `numel` elements of `kind` (checked above) in a read-only map
        // owned by this reader; the tensor is only read (copied out of) while the reader,
        // and so the map, is alive: `read_box` drops it before returning.
        Ok(unsafe { Tensor::from_blob(pointer, &piece.shape, &strides, kind, tch::Device::Cpu) })
    }
}

/// Loads a checkpoint into this rank's parameters (before the optimizer is built from them).
pub fn load_params(reader: &mut Reader, params: &FlatParams) -> Result<()> {
    // A bf16 run's fp32 master weights are the exact values for a run in a wider dtype.
    let wide = params.values().kind() != Kind::BFloat16;
    tch::no_grad(|| {
        for region in params.regions(&(0..params.numel())) {
            let target = region_view(params.values(), &region);
            let master = format!("master:{}", region.name);
            let name = if wide && reader.has(&master) { master } else { format!("model:{}", region.name) };
            reader.read_box(&name, &region.global_shape, &region.offset, &target)?;
        }
        Ok(())
    })
}

/// Refuses a checkpoint of another model: its saved `[model]` section must equal this run's
/// (the parallel layout may differ, and the dtype, which is reported). Tensor shapes alone
/// would let a 2-layer model take the first layers of a 4-layer checkpoint, or 4 KV heads
/// reinterpret the weights of 2.
pub fn check_same_model(reader: &Reader, config: &Config, leader: bool) -> Result<()> {
    let dir = reader.dir.display();
    let saved = Config::parse(&reader.manifest().config, &[])
        .with_context(|| format!("checkpoint {dir}: its saved configuration cannot be read"))?;
    let table = |model: &crate::config::ModelConfig| match toml::Value::try_from(model) {
        Ok(toml::Value::Table(table)) => table,
        _ => unreachable!("a model section serializes to a table"),
    };
    let (theirs, ours) = (table(&saved.model), table(&config.model));
    let mut keys: Vec<&String> = theirs.keys().chain(ours.keys()).collect();
    keys.sort();
    keys.dedup();
    let differences: Vec<String> = keys
        .into_iter()
        .filter(|key| theirs.get(*key) != ours.get(*key))
        .map(|key| {
            let value = |t: &toml::Table| t.get(key).map_or("unset".into(), |v| v.to_string());
            format!("model.{key} = {} in the checkpoint, {} in this run", value(&theirs), value(&ours))
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "invalid config: checkpoint {dir} holds another model, an incompatible model shape ({}); resume with \
             the checkpoint's [model] section or start in another train.run_dir",
            differences.join("; ")
        );
    }
    if saved.train.dtype != config.train.dtype && leader {
        tracing::info!(
            "checkpoint {dir} was saved with train.dtype = {}; continuing with {}",
            saved.train.dtype.name(),
            config.train.dtype.name()
        );
    }
    Ok(())
}

/// Loads a checkpoint's optimizer state into this rank's (freshly built) optimizer.
pub fn load_optimizer(reader: &mut Reader, params: &FlatParams, optimizer: &mut DistOptimizer) -> Result<()> {
    let regions = optimizer.regions(params);
    tch::no_grad(|| {
        for (state, buffer) in optimizer.state(params) {
            for region in &regions {
                let target = region_view(&buffer, region);
                let mut name = format!("{state}:{}", region.name);
                if state == "master" && !reader.has(&name) {
                    // Saved by a run without master weights (fp32): its weights are the master.
                    name = format!("model:{}", region.name);
                }
                reader.read_box(&name, &region.global_shape, &region.offset, &target)?;
            }
        }
        anyhow::Ok(())
    })?;
    optimizer.adamw().set_steps_taken(reader.manifest().step);
    Ok(())
}

/// Writes a checkpoint's model as a Hugging Face directory (no ranks needed: every tensor is
/// assembled from its pieces).
pub fn export_hf(checkpoint: &Path, output: &Path) -> Result<()> {
    let mut reader = Reader::open(checkpoint)?;
    let config = Config::parse(&reader.manifest().config, &[])
        .with_context(|| format!("{}: the saved configuration is invalid", checkpoint.display()))?;
    let names: Vec<(String, Vec<i64>, String)> = reader
        .manifest()
        .tensors
        .iter()
        .filter_map(|(name, e)| Some((name.strip_prefix("model:")?.to_string(), e.shape.clone(), e.dtype.clone())))
        .collect();
    let mut weights = Vec::with_capacity(names.len());
    for (name, shape, dtype) in names {
        let tensor = Tensor::zeros(shape.as_slice(), (kind_of(&dtype)?, tch::Device::Cpu));
        reader.read_box(&format!("model:{name}"), &shape, &vec![0; shape.len()], &tensor)?;
        weights.push((name, tensor));
    }
    let tokenizer = checkpoint.join("tokenizer.json");
    crate::hf::write_dir(&weights, &config, tokenizer.exists().then_some(tokenizer.as_path()), output)
}
