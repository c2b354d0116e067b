//! Loading under any layout: a rank memory-maps the pieces and reads the intersections of its regions with them.
use super::format::{kind_of, region_view, Manifest, Piece};
use crate::config::{invalid_config, Config};
use crate::mapped::MappedSafetensors;
use crate::params::FlatParams;
use crate::zero::DistOptimizer;
use anyhow::{bail, Context, Result};
use data_shards::format::checksum_hex;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Reads, for one loading rank, boxes of global tensors out of a checkpoint's pieces.
pub struct Reader {
    dir: PathBuf,
    manifest: Manifest,
    files: HashMap<String, MappedSafetensors>,
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

    fn file(&mut self, name: &str) -> Result<&MappedSafetensors> {
        if !self.files.contains_key(name) {
            let path = self.dir.join(name);
            if !path.exists() {
                bail!("checkpoint file {} is missing (named by the manifest)", path.display());
            }
            let file = MappedSafetensors::open(&path)
                .with_context(|| format!("checkpoint file {} is truncated or corrupt", path.display()))?;
            self.files.insert(name.to_string(), file);
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
            let file = self.verified_piece(piece, kind, name)?;
            let mut dst = target.shallow_clone();
            for d in 0..size.len() {
                dst = dst.narrow(d as i64, start[d] - offset[d], end[d] - start[d]);
            }
            let within: Vec<i64> = (0..size.len()).map(|d| start[d] - piece.offset[d]).collect();
            file.copy_box(&piece.key, &within, &dst)?;
            covered += dst.numel() as i64;
        }
        if covered != target.numel() as i64 {
            bail!("checkpoint {}: the pieces of {name} do not cover the part this rank needs", self.dir.display());
        }
        Ok(())
    }

    /// The model's weights, each a whole tensor in its saved dtype on the CPU, under its
    /// Hugging Face name.
    pub fn model_weights(&mut self) -> Result<Vec<(String, Tensor)>> {
        let entries: Vec<(String, Vec<i64>, String)> = self
            .manifest
            .tensors
            .iter()
            .filter_map(|(name, e)| Some((name.strip_prefix("model:")?.to_string(), e.shape.clone(), e.dtype.clone())))
            .collect();
        let mut weights = Vec::with_capacity(entries.len());
        for (name, shape, dtype) in entries {
            let tensor = Tensor::zeros(shape.as_slice(), (kind_of(&dtype)?, tch::Device::Cpu));
            self.read_box(&format!("model:{name}"), &shape, &vec![0; shape.len()], &tensor)?;
            weights.push((name, tensor));
        }
        Ok(weights)
    }

    /// The mapped file holding `piece`, after checking the piece's dtype and shape against the
    /// manifest and, the first time, its bytes against the manifest's checksum.
    fn verified_piece(&mut self, piece: &Piece, kind: Kind, name: &str) -> Result<&MappedSafetensors> {
        let id = (piece.file.clone(), piece.key.clone());
        let verify = !self.verified.contains(&id);
        let path = self.dir.join(&piece.file);
        let file = self.file(&piece.file)?;
        let bytes = file
            .bytes(&piece.key)
            .with_context(|| format!("checkpoint file {} lacks piece {} of {name}", path.display(), piece.key))?;
        let numel: i64 = piece.shape.iter().product();
        if file.shape(&piece.key) != Some(piece.shape.as_slice())
            || bytes.len() != numel as usize * kind.elt_size_in_bytes()
        {
            bail!("checkpoint file {}: piece {} of {name} has the wrong size", path.display(), piece.key);
        }
        if verify {
            let actual = checksum_hex(bytes);
            if actual != piece.xxh3_128 {
                bail!(
                    "checkpoint file {}: checksum mismatch in {name} (expected {}, got {actual}); the file is corrupted",
                    path.display(),
                    piece.xxh3_128
                );
            }
            self.bytes_read += bytes.len() as u64;
            self.verified.insert(id);
        }
        Ok(&self.files[&piece.file])
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
        return Err(invalid_config(format!(
            "(model): checkpoint {dir} holds another model, an incompatible model shape ({}); resume with the \
             checkpoint's [model] section or start in another train.run_dir",
            differences.join("; ")
        )));
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
