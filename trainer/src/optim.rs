//! AdamW over flat buffers, the warmup + cosine learning-rate schedule, and global-norm gradient clipping.
use crate::config::OptimConfig;
use std::ops::Range;
use tch::Tensor;

/// Learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr`
/// at `total_steps`.
pub fn learning_rate(config: &OptimConfig, step: i64, total_steps: i64) -> f64 {
    if step < config.warmup_steps {
        return config.lr * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let decay_steps = (total_steps - config.warmup_steps).max(1) as f64;
    let progress = ((step - config.warmup_steps) as f64 / decay_steps).min(1.0);
    config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0: no clipping), given the
/// norm already computed over all ranks. Returns the scale applied.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// AdamW (decoupled weight decay, as `torch.optim.AdamW`) over one flat slice of weights
/// in the master dtype (f32, or f64 for exactness runs); the state lives in flat buffers.
#[derive(Debug)]
pub struct AdamW {
    config: OptimConfig,
    step: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    scratch: Tensor,
    /// Ranges of the slice that take weight decay.
    decay_ranges: Vec<Range<i64>>,
}

impl AdamW {
    pub fn new(config: &OptimConfig, weights: &Tensor, decay_ranges: Vec<Range<i64>>) -> AdamW {
        AdamW {
            config: config.clone(),
            step: 0,
            exp_avg: Tensor::zeros_like(weights),
            exp_avg_sq: Tensor::zeros_like(weights),
            scratch: Tensor::zeros_like(weights),
            decay_ranges,
        }
    }

    /// Updates taken so far (the bias corrections depend on it).
    pub fn steps_taken(&self) -> i64 {
        self.step
    }

    pub fn set_steps_taken(&mut self, steps: i64) {
        self.step = steps;
    }

    /// The moment buffers by name: what a checkpoint must keep.
    pub fn moments(&self) -> [(&'static str, &Tensor); 2] {
        [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)]
    }

    /// One update of `weights` from `grads` (both the flat slice this optimizer owns).
    pub fn step(&mut self, weights: &mut Tensor, grads: &Tensor, lr: f64) {
        tch::no_grad(|| {
            self.step += 1;
            let c = &self.config;
            if c.weight_decay > 0.0 {
                for range in &self.decay_ranges {
                    let _ = weights
                        .narrow(0, range.start, range.end - range.start)
                        .g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
            }
            let _ = self.exp_avg.lerp_(grads, 1.0 - c.beta1);
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(grads, &(grads * (1.0 - c.beta2)));
            let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
            let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
            if lr == 0.0 {
                return;
            }
            // update = -lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) = m / denom, with
            // denom = (sqrt(v) + eps * sqrt(bc2)) * -bc1 / (lr * sqrt(bc2)): four passes.
            let root_bc2 = bias_correction2.sqrt();
            let _ = self.exp_avg_sq.sqrt_out(&self.scratch);
            let _ = self.scratch.g_add_scalar_(c.eps * root_bc2).g_mul_scalar_(-bias_correction1 / (lr * root_bc2));
            let _ = weights.addcdiv_(&self.exp_avg, &self.scratch);
        });
    }
}

/// Sum of squares of a flat gradient slice.
pub fn squared_norm(grads: &Tensor) -> f64 {
    tch::no_grad(|| grads.norm().double_value(&[]).powi(2))
}
