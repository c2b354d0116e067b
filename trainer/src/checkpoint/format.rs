//! The checkpoint format: the manifest, its pieces and their checks, step directory names and dtype names.
use crate::params::Region;
use anyhow::{bail, Context, Result};
use data_shards::DataCursor;
use safetensors::tensor::Dtype as StDtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

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

pub(super) fn step_dir_name(step: i64) -> String {
    format!("step-{step:08}")
}

/// The step a `step-N` directory name stands for.
pub(super) fn step_of_dir_name(name: &str) -> Option<i64> {
    name.strip_prefix("step-")?.parse().ok()
}

pub(super) fn dtype_name(kind: Kind) -> Result<(&'static str, StDtype)> {
    Ok(match kind {
        Kind::Float => ("float32", StDtype::F32),
        Kind::Double => ("float64", StDtype::F64),
        Kind::BFloat16 => ("bfloat16", StDtype::BF16),
        other => bail!("cannot checkpoint {other:?} tensors"),
    })
}

pub(super) fn kind_of(dtype: &str) -> Result<Kind> {
    Ok(match dtype {
        "float32" => Kind::Float,
        "float64" => Kind::Double,
        "bfloat16" => Kind::BFloat16,
        other => bail!("unknown tensor dtype {other:?} in the checkpoint"),
    })
}

/// A view of `buffer` holding `region`, shaped as its box.
pub(super) fn region_view(buffer: &Tensor, region: &Region) -> Tensor {
    buffer.narrow(0, region.flat.start, region.flat.end - region.flat.start).view(region.shape.as_slice())
}
