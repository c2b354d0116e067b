//! A safetensors file memory-mapped read-only with its header parsed once: a reader copies out only the boxes it needs, never the whole file.
use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype as StDtype;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One stored tensor: where its bytes are in the map, its dtype and shape.
#[derive(Debug)]
struct Stored {
    bytes: Range<usize>,
    kind: Kind,
    shape: Vec<i64>,
}

/// A mapped safetensors file. Pages are read from disk only when a box touching them is
/// copied, so a rank that holds a slice of a tensor reads about that slice.
#[derive(Debug)]
pub struct MappedSafetensors {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: HashMap<String, Stored>,
}

/// The libtorch kind of a safetensors dtype this trainer reads.
fn kind_of(dtype: StDtype) -> Option<Kind> {
    Some(match dtype {
        StDtype::F32 => Kind::Float,
        StDtype::F64 => Kind::Double,
        StDtype::BF16 => Kind::BFloat16,
        StDtype::F16 => Kind::Half,
        _ => return None,
    })
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<MappedSafetensors> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the files read here (checkpoint pieces, Hugging Face weights) are published
        // by rename and never written in place; the map is read-only.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (header, metadata) = SafeTensors::read_metadata(&map)
            .with_context(|| format!("{} is not a safetensors file, or it is truncated", path.display()))?;
        let data_start = 8 + header;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            let kind = kind_of(info.dtype).with_context(|| {
                format!("{}: tensor {name} has dtype {:?}, not a float", path.display(), info.dtype)
            })?;
            let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            if end > map.len() || end - start != shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes() {
                bail!("{}: tensor {name} lies outside the file or has the wrong size", path.display());
            }
            tensors.insert(name, Stored { bytes: start..end, kind, shape });
        }
        Ok(MappedSafetensors { path: path.to_path_buf(), map, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// A stored tensor's shape.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// A stored tensor's bytes (e.g. to checksum them).
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors.get(name).map(|t| &self.map[t.bytes.clone()])
    }

    /// Copies the box `[start, start + target's shape)` of stored tensor `name` into `target`
    /// (converting the dtype, on any device).
    pub fn copy_box(&self, name: &str, start: &[i64], target: &Tensor) -> Result<()> {
        let stored = self.tensors.get(name).with_context(|| format!("{} has no tensor {name}", self.path.display()))?;
        let size = target.size();
        let inside = size.len() == stored.shape.len()
            && (0..size.len()).all(|d| start[d] >= 0 && start[d] + size[d] <= stored.shape[d]);
        if !inside {
            bail!(
                "{}: tensor {name} of shape {:?} has no box of shape {size:?} at {start:?}",
                self.path.display(),
                stored.shape
            );
        }
        let bytes = &self.map[stored.bytes.clone()];
        let shape = &stored.shape;
        let strides: Vec<i64> = (0..shape.len()).map(|d| shape[d + 1..].iter().product()).collect();
        // SAFETY: `bytes` holds the tensor's elements (size checked in `open`) in a read-only
        // map that outlives the view, which is only read (copied out of) and dropped here.
        let whole = unsafe { Tensor::from_blob(bytes.as_ptr(), shape, &strides, stored.kind, tch::Device::Cpu) };
        let mut source = whole;
        for (d, (&from, &len)) in start.iter().zip(&size).enumerate() {
            source = source.narrow(d as i64, from, len);
        }
        tch::no_grad(|| target.shallow_clone().copy_(&source));
        Ok(())
    }
}
