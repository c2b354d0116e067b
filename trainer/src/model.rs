//! The LLaMA decoder: its trainable tensors (named as Hugging Face names them) and the forward pass of each segment.
//!
//! The model is pure local computation on the tensors it is given: it knows nothing of
//! devices, ranks or collectives. The engine runs it segment by segment (embedding, each
//! block's attention and MLP branch, head) and owns the residual stream between segments.
use crate::config::ModelConfig;
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

/// A Hugging Face tensor stored as rows `[row_offset, row_offset + rows)` of a trainable
/// tensor (q/k/v share one, so do gate/up: one matmul each instead of three or two).
#[derive(Debug, Clone)]
pub struct HfPiece {
    pub name: String,
    pub shape: Vec<i64>,
    pub row_offset: i64,
    pub init: Init,
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

    fn matrix(rows: &[(String, i64, Init)], cols: i64) -> LeafSpec {
        let mut row_offset = 0;
        let pieces = rows
            .iter()
            .map(|(name, n, init)| {
                let piece = HfPiece {
                    name: name.clone(),
                    shape: vec![*n, cols],
                    row_offset,
                    init: *init,
                };
                row_offset += n;
                piece
            })
            .collect();
        LeafSpec {
            shape: vec![row_offset, cols],
            pieces,
            decay: true,
        }
    }

    fn norm(name: String, dim: i64) -> LeafSpec {
        let piece = HfPiece {
            name,
            shape: vec![dim],
            row_offset: 0,
            init: Init::Ones,
        };
        LeafSpec {
            shape: vec![dim],
            pieces: vec![piece],
            decay: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SegmentSpec {
    pub kind: SegmentKind,
    pub leaves: Vec<LeafSpec>,
}

/// The trainable tensors of the whole model, segment by segment in forward order.
pub fn segment_specs(m: &ModelConfig) -> Vec<SegmentSpec> {
    let (d, hd, f) = (m.dim, m.head_dim(), m.ffn_dim);
    let std = Init::Normal(m.init_std);
    let out_std = Init::Normal(m.init_std / (2.0 * m.n_layers as f64).sqrt());
    let mut segments = vec![SegmentSpec {
        kind: SegmentKind::Embedding,
        leaves: vec![LeafSpec::matrix(
            &[("model.embed_tokens.weight".into(), m.vocab_size, std)],
            d,
        )],
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
                ),
                LeafSpec::matrix(&[(format!("{p}.self_attn.o_proj.weight"), d, out_std)], m.n_heads * hd),
            ],
        });
        segments.push(SegmentSpec {
            kind: SegmentKind::Mlp(layer),
            leaves: vec![
                LeafSpec::norm(format!("{p}.post_attention_layernorm.weight"), d),
                LeafSpec::matrix(
                    &[
                        (format!("{p}.mlp.gate_proj.weight"), f, std),
                        (format!("{p}.mlp.up_proj.weight"), f, std),
                    ],
                    d,
                ),
                LeafSpec::matrix(&[(format!("{p}.mlp.down_proj.weight"), d, out_std)], f),
            ],
        });
    }
    segments.push(SegmentSpec {
        kind: SegmentKind::Head,
        leaves: vec![
            LeafSpec::norm("model.norm.weight".into(), d),
            LeafSpec::matrix(&[("lm_head.weight".into(), m.vocab_size, std)], d),
        ],
    });
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
        let inv_freq = Tensor::from(m.rope_theta)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let positions = Tensor::arange(m.max_seq_len, (Kind::Double, device));
        let freqs = positions.outer(&inv_freq);
        let angles = Tensor::cat(&[&freqs, &freqs], -1);
        Rope {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }

    /// `x`: [batch, heads, seq, head_dim].
    fn apply(&self, x: &Tensor) -> Tensor {
        let seq = x.size()[2];
        let (cos, sin) = (self.cos.narrow(0, 0, seq), self.sin.narrow(0, 0, seq));
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
        x * cos + rotated * sin
    }
}

/// The model's forward computation over tensors it does not own (views of the engine's
/// flat parameter buffer), one method per segment kind.
#[derive(Debug)]
pub struct Llama {
    config: ModelConfig,
    /// Trainable tensors per segment, in `segment_specs` order.
    leaves: Vec<Vec<Tensor>>,
    rope: Rope,
}

impl Llama {
    pub fn new(config: &ModelConfig, leaves: Vec<Vec<Tensor>>) -> Llama {
        let first = &leaves[0][0];
        let rope = Rope::new(config, first.kind(), first.device());
        Llama {
            config: config.clone(),
            leaves,
            rope,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one segment: the embedding takes token ids, a residual branch takes the
    /// residual stream and returns what it adds to it, the head returns the logits.
    pub fn segment_forward(&self, segment: usize, kind: SegmentKind, input: &Tensor) -> Tensor {
        let w = &self.leaves[segment];
        match kind {
            SegmentKind::Embedding => Tensor::embedding(&w[0], input, -1, false, false),
            SegmentKind::Attention(_) => self.attention(input, &w[0], &w[1], &w[2]),
            SegmentKind::Mlp(_) => self.mlp(input, &w[0], &w[1], &w[2]),
            SegmentKind::Head => self.norm(input, &w[0]).linear(&w[1], None::<Tensor>),
        }
    }

    /// Sum of the token cross-entropies of `logits` [batch, seq, vocab] against `targets` [batch, seq].
    pub fn loss_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
        let vocab = logits.size()[2];
        let logits = logits.view([-1, vocab]);
        // Half-precision logits are upcast; f32 and f64 stay as they are.
        let logits = if logits.kind() == Kind::BFloat16 {
            logits.to_kind(Kind::Float)
        } else {
            logits
        };
        logits.cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, Reduction::Sum, -100, 0.0)
    }

    fn norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        x.rms_norm([self.config.dim], Some(weight), self.config.norm_eps)
    }

    fn attention(&self, x: &Tensor, norm: &Tensor, qkv: &Tensor, out: &Tensor) -> Tensor {
        let m = &self.config;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let hd = m.head_dim();
        // Heads held here (all of them, or this rank's share under tensor parallelism).
        let heads = out.size()[1] / hd;
        let kv_heads = heads * m.kv_heads() / m.n_heads;
        let projected = self.norm(x, norm).linear(qkv, None::<Tensor>);
        let parts = projected.split_with_sizes([heads * hd, kv_heads * hd, kv_heads * hd], -1);
        let split_heads = |t: &Tensor, n: i64| t.view([batch, seq, n, hd]).transpose(1, 2);
        let q = self.rope.apply(&split_heads(&parts[0], heads));
        let k = self.rope.apply(&split_heads(&parts[1], kv_heads));
        let v = split_heads(&parts[2], kv_heads);
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, heads != kv_heads);
        attended
            .transpose(1, 2)
            .reshape([batch, seq, heads * hd])
            .linear(out, None::<Tensor>)
    }

    fn mlp(&self, x: &Tensor, norm: &Tensor, gate_up: &Tensor, down: &Tensor) -> Tensor {
        let ffn = gate_up.size()[0] / 2;
        let projected = self.norm(x, norm).linear(gate_up, None::<Tensor>);
        let parts = projected.split(ffn, -1);
        (parts[0].silu() * &parts[1]).linear(down, None::<Tensor>)
    }
}
