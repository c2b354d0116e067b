//! The key/value cache of incremental decoding: per layer, preallocated keys and values for a batch of sequences (slots), each with its own length, so that sequences can join and leave between steps.
//!
//! A forward step feeds `n` new tokens to each of some slots ([`KvCache::step`] describes it:
//! which rows, the new tokens' positions, what each query may see); every layer writes its new
//! keys and values at those positions and attends over the slot's prefix ([`KvCache::extend`]);
//! [`KvCache::commit`] then advances the slots' lengths. The cache is plain tensors: it knows
//! nothing of the model's weights, of devices beyond where its buffers live, or of ranks.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Keys and values of every layer for `slots` sequences of up to `capacity` tokens, each
/// buffer shaped [slots, kv_heads, capacity, head_dim] (the KV heads this rank holds).
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Tokens cached per slot.
    lengths: Vec<i64>,
    capacity: i64,
}

/// The rows of the cache a step runs on.
#[derive(Debug)]
enum Rows {
    /// Slots `start..start + count`: the cache's rows are views, nothing is copied.
    Range(i64),
    /// Any slots (an int64 index on the cache's device).
    Index(Tensor),
}

/// What each new token's query attends to.
#[derive(Debug)]
enum Visible {
    /// Every row starts empty: plain causal attention over the new tokens.
    Causal,
    /// One new token per row and every row as long: all cached keys.
    All,
    /// Key `j` is visible to the query at position `p` when `j <= p`: [rows, 1, new, keys].
    Mask(Tensor),
}

/// One forward step over some of the cache's sequences, built by [`KvCache::step`] before the
/// step, used by every layer, and committed by [`KvCache::commit`] after it.
#[derive(Debug)]
pub struct CacheStep {
    slots: Vec<usize>,
    /// The slots as an int64 [rows, 1] index on the cache's device.
    slot_index: Tensor,
    rows: Rows,
    new: i64,
    /// Absolute positions of the new tokens, [rows, new] (the rotary embedding's too).
    positions: Tensor,
    /// Keys attended: positions `0..keys` of each row (the longest row after the step).
    keys: i64,
    visible: Visible,
}

impl CacheStep {
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// The attention mask to use (`true`: visible), if any.
    pub fn mask(&self) -> Option<&Tensor> {
        match &self.visible {
            Visible::Mask(mask) => Some(mask),
            _ => None,
        }
    }

    /// Whether attention is plain causal over the new tokens (no mask needed).
    pub fn is_causal(&self) -> bool {
        matches!(self.visible, Visible::Causal)
    }

    pub fn slots(&self) -> &[usize] {
        &self.slots
    }
}

impl KvCache {
    /// Zeroed buffers for `layers` layers of `slots` sequences of up to `capacity` tokens.
    pub fn new(
        layers: usize,
        slots: usize,
        kv_heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> KvCache {
        let shape = [slots as i64, kv_heads, capacity, head_dim];
        let buffers = || (0..layers).map(|_| Tensor::zeros(shape, (kind, device))).collect();
        KvCache { keys: buffers(), values: buffers(), lengths: vec![0; slots], capacity }
    }

    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Tokens cached in `slot`.
    pub fn length(&self, slot: usize) -> i64 {
        self.lengths[slot]
    }

    /// Empties `slot` for another sequence (its buffers are overwritten as it fills again).
    pub fn reset(&mut self, slot: usize) {
        self.lengths[slot] = 0;
    }

    /// Bytes of the buffers.
    pub fn bytes(&self) -> u64 {
        let one = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
        self.keys.iter().chain(&self.values).map(one).sum()
    }

    /// Describes a step that feeds `new` tokens to each of `slots` (distinct): refused when a
    /// slot would outgrow the capacity.
    pub fn step(&self, slots: &[usize], new: i64) -> Result<CacheStep> {
        if slots.is_empty() || new < 1 {
            bail!("a cache step needs at least one slot and one new token");
        }
        let mut seen = vec![false; self.slots()];
        for &slot in slots {
            if slot >= self.slots() || std::mem::replace(&mut seen[slot], true) {
                bail!("cache slot {slot} is out of range (0..{}) or named twice", self.slots());
            }
            if self.lengths[slot] + new > self.capacity {
                bail!(
                    "cache slot {slot} holds {} tokens: {new} more exceed its capacity of {}",
                    self.lengths[slot],
                    self.capacity
                );
            }
        }
        let device = self.keys.first().map_or(Device::Cpu, Tensor::device);
        let starts: Vec<i64> = slots.iter().map(|&s| self.lengths[s]).collect();
        let positions = Tensor::from_slice(&starts).view([-1, 1]) + Tensor::arange(new, (Kind::Int64, Device::Cpu));
        let positions = positions.to_device(device);
        let keys = starts.iter().max().copied().unwrap_or(0) + new;
        let index: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let slot_index = Tensor::from_slice(&index).to_device(device);
        let contiguous = slots.windows(2).all(|w| w[1] == w[0] + 1);
        let rows = if contiguous { Rows::Range(index[0]) } else { Rows::Index(slot_index.shallow_clone()) };
        let same_start = starts.iter().all(|&s| s == starts[0]);
        let visible = match (same_start, starts[0], new) {
            (true, 0, _) => Visible::Causal,
            (true, _, 1) => Visible::All,
            _ => {
                let key_positions = Tensor::arange(keys, (Kind::Int64, device)).view([1, 1, keys]);
                Visible::Mask(key_positions.le_tensor(&positions.unsqueeze(-1)).unsqueeze(1))
            }
        };
        let slot_index = slot_index.view([-1, 1]);
        Ok(CacheStep { slots: slots.to_vec(), slot_index, rows, new, positions, keys, visible })
    }

    /// Writes a layer's new keys and values (each [rows, kv_heads, new, head_dim]) at the step's
    /// positions and returns the keys and values its queries attend over,
    /// [rows, kv_heads, keys, head_dim] (views where the step's slots are contiguous).
    pub fn extend(&self, layer: usize, keys: &Tensor, values: &Tensor, step: &CacheStep) -> (Tensor, Tensor) {
        let attend = |buffer: &Tensor, new: &Tensor| {
            // Indexed as [slot, :, position]: the broadcast [rows, new] index dims come first.
            let indices = [Some(step.slot_index.shallow_clone()), None, Some(step.positions.shallow_clone())];
            let _ = buffer.shallow_clone().index_put_(&indices, &new.permute([0, 2, 1, 3]), false);
            let prefix = buffer.narrow(2, 0, step.keys);
            match &step.rows {
                Rows::Range(start) => prefix.narrow(0, *start, step.slots.len() as i64),
                Rows::Index(index) => prefix.index_select(0, index),
            }
        };
        (attend(&self.keys[layer], keys), attend(&self.values[layer], values))
    }

    /// Advances the step's slots by its new tokens (after every layer has run).
    pub fn commit(&mut self, step: &CacheStep) {
        for &slot in &step.slots {
            self.lengths[slot] += step.new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_check_their_slots_and_capacity() {
        let mut cache = KvCache::new(1, 3, 2, 8, 4, Kind::Float, Device::Cpu);
        assert!(cache.step(&[0, 0], 1).is_err());
        assert!(cache.step(&[3], 1).is_err());
        assert!(cache.step(&[1], 9).unwrap_err().to_string().contains("capacity of 8"));
        let prefill = cache.step(&[1], 5).unwrap();
        assert!(prefill.is_causal());
        cache.commit(&prefill);
        assert_eq!((cache.length(0), cache.length(1)), (0, 5));
        let decode = cache.step(&[0, 1], 1).unwrap();
        let mask = decode.mask().expect("rows of different lengths need a mask");
        assert_eq!(mask.size(), [2, 1, 1, 6]);
        assert_eq!(
            Vec::<bool>::try_from(mask.view([-1])).unwrap(),
            [
                true, false, false, false, false, false, // slot 0: its one token at position 0
                true, true, true, true, true, true, // slot 1: positions 0..=5
            ]
        );
        cache.reset(1);
        assert_eq!(cache.length(1), 0);
    }

    #[test]
    fn extend_writes_at_each_rows_positions() {
        let mut cache = KvCache::new(1, 3, 1, 4, 2, Kind::Float, Device::Cpu);
        let first = cache.step(&[2], 2).unwrap();
        let k = Tensor::from_slice(&[1.0f32, 1.0, 2.0, 2.0]).view([1, 1, 2, 2]);
        let (keys, _) = cache.extend(0, &k, &k, &first);
        assert!(keys.equal(&k));
        cache.commit(&first);
        let next = cache.step(&[0, 2], 1).unwrap();
        let k = Tensor::from_slice(&[5.0f32, 5.0, 7.0, 7.0]).view([2, 1, 1, 2]);
        let (keys, values) = cache.extend(0, &k, &k, &next);
        assert_eq!(keys.size(), [2, 1, 3, 2]);
        let row = |r: i64| Vec::<f32>::try_from(keys.get(r).view([-1])).unwrap();
        assert_eq!(row(0)[..2], [5.0, 5.0]);
        assert_eq!(row(1), [1.0, 1.0, 2.0, 2.0, 7.0, 7.0]);
        assert!(values.equal(&keys));
    }
}
