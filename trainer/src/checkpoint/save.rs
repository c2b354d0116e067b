//! Saving: each rank copies its regions to host memory and writes them (in the background when asynchronous); rank 0 commits the manifest and publishes the step.
use super::format::{
    dtype_name, region_view, step_dir_name, step_of_dir_name, Manifest, Piece, TensorEntry, FORMAT_VERSION,
};
use crate::comm::{Comm, GroupKind, ReduceOp};
use crate::config::Config;
use crate::params::{FlatParams, Region};
use crate::zero::DistOptimizer;
use anyhow::{bail, Context, Result};
use data_shards::format::checksum_hex;
use data_shards::DataCursor;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use tch::Tensor;

/// Points `root/latest` at step `step`'s directory, by rename.
fn publish_latest(root: &Path, step: i64) -> Result<()> {
    let pointer = root.join("latest.tmp");
    write_synced(&pointer, step_dir_name(step).as_bytes())?;
    std::fs::rename(&pointer, root.join("latest"))
        .with_context(|| format!("cannot replace {}", root.join("latest").display()))?;
    sync_dir(root)
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
            xxh3_128: checksum_hex(bytes),
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
