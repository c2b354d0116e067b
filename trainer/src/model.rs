//! The LLaMA decoder: its trainable tensors (named as Hugging Face names them) and the forward pass of each segment.
//!
//! The model is pure local computation on the tensors it is given: it knows nothing of
//! devices, ranks or collectives. The engine runs it segment by segment (embedding, each
//! block's attention and MLP branch, head) and owns the residual stream between segments.
//! For decoding, the attention branch also takes a key/value cache and the new tokens'
//! positions (`segment_forward_cached`), so a step computes only the new tokens.
use crate::config::ModelConfig;
use crate::kv_cache::{CacheStep, KvCache};
use anyhow::{bail, Result};
use tch::{Kind, Reduction, Tensor};

/// One forward unit of the segment schedule: residual branches read the stream, the
/// embedding starts it and the head ends it in a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    Embedding,
    Attention(usize),
    Mlp(usize),
    Head,
}

/// How the initial value of a Hugging Face tensor is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Ones,
    Normal(f64),
}

/// This rank's share of a tensor-parallel group: it holds part `rank` of `size` of every
/// split tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShard {
    pub rank: i64,
    pub size: i64,
}

impl TpShard {
    pub const ALONE: TpShard = TpShard { rank: 0, size: 1 };
}

/// (This rank's part of) a Hugging Face tensor, stored as rows `[row_offset, row_offset +
/// shape[0])` of a trainable tensor (q/k/v share one, so do gate/up: one matmul each
/// instead of three or two).
#[derive(Debug, Clone)]
pub struct HfPiece {
    pub name: String,
    pub global_shape: Vec<i64>,
    /// Where this rank's part starts: (dimension, offset); `None`: the whole tensor (replicated).
    pub split: Option<(usize, i64)>,
    /// The shape held here.
    pub shape: Vec<i64>,
    pub row_offset: i64,
    pub init: Init,
}

impl HfPiece {
    /// This rank's part of the global tensor `value`.
    pub fn local_part(&self, value: &Tensor) -> Tensor {
        match self.split {
            None => value.shallow_clone(),
            Some((dim, start)) => value.narrow(dim as i64, start, self.shape[dim]),
        }
    }
}

/// A trainable tensor: the unit autograd sees.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub shape: Vec<i64>,
    pub pieces: Vec<HfPiece>,
    /// Weight decay applies (matrices), or not (norm weights).
    pub decay: bool,
}

impl LeafSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Every tensor-parallel rank holds the whole leaf (its gradient is partial per rank).
    pub fn replicated(&self) -> bool {
        self.pieces.iter().all(|p| p.split.is_none())
    }

    /// A matrix made of Hugging Face tensors of `cols` columns stacked by rows; `split` is
    /// the dimension divided over tensor-parallel ranks.
    fn matrix(rows: &[(String, i64, Init)], cols: i64, split: usize, tp: TpShard) -> LeafSpec {
        let mut row_offset = 0;
        let pieces = rows
            .iter()
            .map(|(name, n, init)| {
                let global_shape = vec![*n, cols];
                let mut shape = global_shape.clone();
                shape[split] /= tp.size;
                let piece = HfPiece {
                    name: name.clone(),
                    split: (tp.size > 1).then_some((split, tp.rank * shape[split])),
                    global_shape,
                    row_offset,
                    init: *init,
                    shape,
                };
                row_offset += piece.shape[0];
                piece
            })
            .collect();
        let cols = if split == 1 { cols / tp.size } else { cols };
        LeafSpec { shape: vec![row_offset, cols], pieces, decay: true }
    }

    fn norm(name: String, dim: i64) -> LeafSpec {
        let piece =
            HfPiece { name, global_shape: vec![dim], split: None, shape: vec![dim], row_offset: 0, init: Init::Ones };
        LeafSpec { shape: vec![dim], pieces: vec![piece], decay: false }
    }
}

#[derive(Debug, Clone)]
pub struct SegmentSpec {
    pub kind: SegmentKind,
    pub leaves: Vec<LeafSpec>,
}

/// The trainable tensors of the whole model held by tensor-parallel rank `tp`, segment by
/// segment in forward order, as in Megatron-LM: q/k/v and gate/up split by rows
/// (column-parallel), o and down by columns (row-parallel), embedding and head by vocabulary
/// rows, norms replicated.
pub fn segment_specs(m: &ModelConfig, tp: TpShard) -> Vec<SegmentSpec> {
    let (d, hd, f) = (m.dim, m.head_dim(), m.ffn_dim);
    let std = Init::Normal(m.init_std);
    let out_std = Init::Normal(m.init_std / (2.0 * m.n_layers as f64).sqrt());
    let (rows, cols) = (0, 1);
    let mut segments = vec![SegmentSpec {
        kind: SegmentKind::Embedding,
        leaves: vec![LeafSpec::matrix(&[("model.embed_tokens.weight".into(), m.vocab_size, std)], d, rows, tp)],
    }];
    for layer in 0..m.n_layers as usize {
        let p = format!("model.layers.{layer}");
        segments.push(SegmentSpec {
            kind: SegmentKind::Attention(layer),
            leaves: vec![
                LeafSpec::norm(format!("{p}.input_layernorm.weight"), d),
                LeafSpec::matrix(
                    &[
                        (format!("{p}.self_attn.q_proj.weight"), m.n_heads * hd, std),
                        (format!("{p}.self_attn.k_proj.weight"), m.kv_heads() * hd, std),
                        (format!("{p}.self_attn.v_proj.weight"), m.kv_heads() * hd, std),
                    ],
                    d,
                    rows,
                    tp,
                ),
                LeafSpec::matrix(&[(format!("{p}.self_attn.o_proj.weight"), d, out_std)], m.n_heads * hd, cols, tp),
            ],
        });
        segments.push(SegmentSpec {
            kind: SegmentKind::Mlp(layer),
            leaves: vec![
                LeafSpec::norm(format!("{p}.post_attention_layernorm.weight"), d),
                LeafSpec::matrix(
                    &[(format!("{p}.mlp.gate_proj.weight"), f, std), (format!("{p}.mlp.up_proj.weight"), f, std)],
                    d,
                    rows,
                    tp,
                ),
                LeafSpec::matrix(&[(format!("{p}.mlp.down_proj.weight"), d, out_std)], f, cols, tp),
            ],
        });
    }
    let mut head = vec![LeafSpec::norm("model.norm.weight".into(), d)];
    if !m.tie_word_embeddings {
        head.push(LeafSpec::matrix(&[("lm_head.weight".into(), m.vocab_size, std)], d, rows, tp));
    }
    segments.push(SegmentSpec { kind: SegmentKind::Head, leaves: head });
    segments
}

/// Rotary position embedding tables (Hugging Face's rotate-half convention).
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(m: &ModelConfig, kind: Kind, device: tch::Device) -> Rope {
        let hd = m.head_dim();
        let exponents = Tensor::arange_start_step(0, hd, 2, (Kind::Double, device)) / hd as f64;
        let inv_freq = Tensor::from(m.rope_theta).to_device(device).pow(&exponents).reciprocal();
        let positions = Tensor::arange(m.max_seq_len, (Kind::Double, device));
        let freqs = positions.outer(&inv_freq);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        Rope { cos: angles.cos().to_kind(kind), sin: angles.sin().to_kind(kind) }
    }

    /// `x`: [batch, heads, seq, head_dim] at positions `0..seq`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let seq = x.size()[2];
        Self::rotate(x, &self.cos.narrow(0, 0, seq), &self.sin.narrow(0, 0, seq))
    }

    /// `x`: [batch, heads, seq, head_dim] at `positions` [batch, seq].
    fn apply_at(&self, x: &Tensor, positions: &Tensor) -> Tensor {
        let (batch, seq) = (positions.size()[0], positions.size()[1]);
        let at = |table: &Tensor| table.index_select(0, &positions.reshape([-1])).view([batch, 1, seq, -1]);
        Self::rotate(x, &at(&self.cos), &at(&self.sin))
    }

    fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
        x * cos + rotated * sin
    }
}

/// A decoding step's cache: the attention branches read and extend it.
/// How the tokens of a forward pass attend, besides causally.
#[derive(Clone, Copy)]
enum Attend<'a> {
    /// Over the whole window, at positions `0..seq`.
    Window,
    /// Only within their own document, at positions restarting with it (packed fine-tuning data).
    Documents(&'a Documents),
    /// Over each sequence's cached keys and values (a decoding step).
    Cached(&'a KvCache, &'a CacheStep),
}

/// The documents packed into training windows: each token's position in its document and the
/// attention mask that keeps a document from seeing the one before it.
#[derive(Debug)]
pub struct Documents {
    positions: Tensor,
    /// [batch, 1, seq, seq], true where query i may attend key j: same document, j <= i.
    mask: Tensor,
}

impl Documents {
    /// From each input token's position in its document, [batch, seq] (0 where one starts).
    pub fn new(positions: &Tensor) -> Documents {
        let seq = positions.size()[1];
        let document = positions.eq(0).cumsum(1, Kind::Int64);
        let same = document.unsqueeze(2).eq_tensor(&document.unsqueeze(1));
        let causal = Tensor::ones([seq, seq], (Kind::Bool, positions.device())).tril(0);
        Documents { positions: positions.shallow_clone(), mask: same.logical_and(&causal).unsqueeze(1) }
    }
}

/// The model's forward computation over tensors it does not own (views of the engine's
/// flat parameter buffer), one method per segment kind.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    tp: TpShard,
    /// Trainable tensors per segment, in `segment_specs` order.
    leaves: Vec<Vec<Tensor>>,
    rope: Rope,
}

impl Llama {
    pub fn new(config: &ModelConfig, tp: TpShard, leaves: Vec<Vec<Tensor>>) -> Llama {
        let first = &leaves[0][0];
        let rope = Rope::new(config, first.kind(), first.device());
        Llama { config: config.clone(), tp, leaves, rope }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one segment: the embedding takes token ids, a residual branch takes the
    /// residual stream and returns what it adds to it, the head returns the logits. Under
    /// tensor parallelism the embedding's and the branches' outputs are this rank's partial
    /// sums and the head's logits cover this rank's slice of the vocabulary.
    pub fn segment_forward(&self, segment: usize, kind: SegmentKind, input: &Tensor) -> Tensor {
        self.forward(segment, kind, input, Attend::Window)
    }

    /// [`Llama::segment_forward`] of windows that pack several documents: attention stays
    /// within each document and positions restart with it.
    pub fn segment_forward_packed(
        &self,
        segment: usize,
        kind: SegmentKind,
        input: &Tensor,
        documents: &Documents,
    ) -> Tensor {
        self.forward(segment, kind, input, Attend::Documents(documents))
    }

    /// [`Llama::segment_forward`] of a decoding step: `input` holds only the new tokens of the
    /// sequences of `step`; an attention branch writes their keys and values into `cache` and
    /// attends over each sequence's cached prefix.
    pub fn segment_forward_cached(
        &self,
        segment: usize,
        kind: SegmentKind,
        input: &Tensor,
        cache: &KvCache,
        step: &CacheStep,
    ) -> Tensor {
        self.forward(segment, kind, input, Attend::Cached(cache, step))
    }

    fn forward(&self, segment: usize, kind: SegmentKind, input: &Tensor, attend: Attend) -> Tensor {
        let w = &self.leaves[segment];
        match kind {
            SegmentKind::Embedding => self.embedding(input, &w[0]),
            SegmentKind::Attention(layer) => self.attention(input, [&w[0], &w[1], &w[2]], layer, attend),
            SegmentKind::Mlp(_) => self.mlp(input, &w[0], &w[1], &w[2]),
            SegmentKind::Head => self.norm(input, &w[0]).linear(self.head_weight(), None::<Tensor>),
        }
    }

    /// The output head's matrix: its own, or the token embedding's when they are tied.
    pub fn head_weight(&self) -> &Tensor {
        match self.config.tie_word_embeddings {
            true => &self.leaves[0][0],
            false => &self.leaves[self.leaves.len() - 1][1],
        }
    }

    /// An empty cache for `slots` sequences of up to `capacity` tokens, holding the KV heads of
    /// this rank, in the weights' dtype and on their device.
    pub fn new_cache(&self, slots: usize, capacity: i64) -> Result<KvCache> {
        let m = &self.config;
        if capacity < 1 || capacity > m.max_seq_len {
            bail!(
                "a cache of {capacity} tokens: the model's context is 1..={} tokens (model.max_seq_len)",
                m.max_seq_len
            );
        }
        let kv_heads = m.kv_heads() / self.tp.size;
        let (kind, device) = (self.rope.cos.kind(), self.rope.cos.device());
        Ok(KvCache::new(m.n_layers as usize, slots, kv_heads, capacity, m.head_dim(), kind, device))
    }

    /// The cross-entropy of each token, [batch, seq], of `logits` [batch, seq, vocab] against
    /// `targets` [batch, seq].
    pub fn token_losses(logits: &Tensor, targets: &Tensor) -> Tensor {
        let vocab = logits.size()[2];
        let flat = logits.view([-1, vocab]);
        // Half-precision logits are upcast; f32 and f64 stay as they are.
        let flat = if flat.kind() == Kind::BFloat16 { flat.to_kind(Kind::Float) } else { flat };
        flat.cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, Reduction::None, -100, 0.0).view_as(targets)
    }

    /// Vocabulary-parallel lookup: rows of tokens outside this rank's slice are zero.
    fn embedding(&self, tokens: &Tensor, weight: &Tensor) -> Tensor {
        if self.tp.size == 1 {
            return Tensor::embedding(weight, tokens, -1, false, false);
        }
        let rows = weight.size()[0];
        let local = tokens - self.tp.rank * rows;
        let outside = local.lt(0).logical_or(&local.ge(rows));
        let embedded = Tensor::embedding(weight, &local.masked_fill(&outside, 0), -1, false, false);
        embedded.masked_fill(&outside.unsqueeze(-1), 0.0)
    }

    /// First vocabulary id of this rank's slice, and the slice's size.
    pub fn vocab_slice(&self) -> (i64, i64) {
        let rows = self.config.vocab_size / self.tp.size;
        (self.tp.rank * rows, rows)
    }

    fn norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        x.rms_norm([self.config.dim], Some(weight), self.config.norm_eps)
    }

    fn attention(&self, x: &Tensor, [norm, qkv, out]: [&Tensor; 3], layer: usize, attend: Attend) -> Tensor {
        let m = &self.config;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let hd = m.head_dim();
        // Heads held here (all of them, or this rank's share under tensor parallelism).
        let heads = out.size()[1] / hd;
        let kv_heads = heads * m.kv_heads() / m.n_heads;
        let projected = self.norm(x, norm).linear(qkv, None::<Tensor>);
        let parts = projected.split_with_sizes([heads * hd, kv_heads * hd, kv_heads * hd], -1);
        let split_heads = |t: &Tensor, n: i64| t.view([batch, seq, n, hd]).transpose(1, 2);
        let (q, k, v) =
            (split_heads(&parts[0], heads), split_heads(&parts[1], kv_heads), split_heads(&parts[2], kv_heads));
        let gqa = heads != kv_heads;
        let attended = match attend {
            Attend::Window => {
                let (q, k) = (self.rope.apply(&q), self.rope.apply(&k));
                Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa)
            }
            Attend::Documents(documents) => {
                let at = |x: &Tensor| self.rope.apply_at(x, &documents.positions);
                let mask = Some(&documents.mask);
                Tensor::scaled_dot_product_attention(&at(&q), &at(&k), &v, mask, 0.0, false, None, gqa)
            }
            Attend::Cached(cache, step) => {
                let (q, k) = (self.rope.apply_at(&q, step.positions()), self.rope.apply_at(&k, step.positions()));
                let (keys, values) = cache.extend(layer, &k, &v, step);
                let (mask, causal) = (step.mask(), step.is_causal());
                Tensor::scaled_dot_product_attention(&q, &keys, &values, mask, 0.0, causal, None, gqa)
            }
        };
        attended.transpose(1, 2).reshape([batch, seq, heads * hd]).linear(out, None::<Tensor>)
    }

    fn mlp(&self, x: &Tensor, norm: &Tensor, gate_up: &Tensor, down: &Tensor) -> Tensor {
        let ffn = gate_up.size()[0] / 2;
        let projected = self.norm(x, norm).linear(gate_up, None::<Tensor>);
        let parts = projected.split(ffn, -1);
        (parts[0].silu() * &parts[1]).linear(down, None::<Tensor>)
    }
}
