//! Where a rank sits in the job: its tensor-parallel and data-parallel groups.

/// Which process group a collective runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Ranks that split each layer (one data-parallel replica).
    Tensor,
    /// Ranks holding the same tensor-parallel shard of different data.
    Data,
    /// Every rank.
    World,
}

impl GroupKind {
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tensor => "tensor-parallel",
            GroupKind::Data => "data-parallel",
            GroupKind::World => "world",
        }
    }
}

/// This rank's place in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub kind: GroupKind,
    pub rank: usize,
    pub size: usize,
}

/// Where this process sits: world = data x tensor, rank = dp_index * tp + tp_index, so a
/// tensor-parallel group is contiguous (one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub tensor: Group,
    pub data: Group,
}

impl Topology {
    pub fn new(rank: usize, world: usize, local_rank: usize, tp: usize) -> Topology {
        Topology {
            rank,
            world,
            local_rank,
            tensor: Group { kind: GroupKind::Tensor, rank: rank % tp, size: tp },
            data: Group { kind: GroupKind::Data, rank: rank / tp, size: world / tp },
        }
    }
}
