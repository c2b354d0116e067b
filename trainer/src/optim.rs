//! AdamW over flat buffers (libtorch's fused kernel) and the warmup + cosine learning-rate schedule.
use crate::config::OptimConfig;
use crate::torch_ext::{fused_adamw, AdamWGroup, AdamWStep};
use anyhow::Result;
use std::ops::Range;
use tch::{Kind, Tensor};

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

/// AdamW (decoupled weight decay, as `torch.optim.AdamW`) over one flat slice of weights in
/// the master dtype (f32, or f64 for exactness runs), through libtorch's fused kernel (the one
/// `torch.optim.AdamW(fused=True)` runs): one pass over weights, gradients and moments, on CPU
/// or CUDA. The step count lives on the device with the weights, so an update that the device
/// decides to skip (a non-finite gradient norm) needs no host round trip.
#[derive(Debug)]
pub struct AdamW {
    config: OptimConfig,
    /// Updates taken so far, as the kernel reads it (f32 on the weights' device).
    step: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The parts of the slice with weight decay, and those without.
    decayed: AdamWGroup,
    plain: AdamWGroup,
}

impl AdamW {
    /// The optimizer of `weights`, updated from `grads` (same shape, dtype and device);
    /// `decay_ranges` are the parts that take weight decay.
    pub fn new(config: &OptimConfig, weights: &Tensor, grads: &Tensor, decay_ranges: &[Range<i64>]) -> AdamW {
        let (exp_avg, exp_avg_sq) = (Tensor::zeros_like(weights), Tensor::zeros_like(weights));
        let step = Tensor::zeros([], (Kind::Float, weights.device()));
        let group = |ranges: &[Range<i64>]| {
            let views = |t: &Tensor| ranges.iter().map(|r| t.narrow(0, r.start, r.end - r.start)).collect();
            AdamWGroup {
                params: views(weights),
                grads: views(grads),
                exp_avgs: views(&exp_avg),
                exp_avg_sqs: views(&exp_avg_sq),
                steps: ranges.iter().map(|_| step.shallow_clone()).collect(),
            }
        };
        let decayed = group(decay_ranges);
        let plain = group(&complement(decay_ranges, weights.numel() as i64));
        AdamW { config: config.clone(), step, exp_avg, exp_avg_sq, decayed, plain }
    }

    /// Sets the number of updates taken (resuming from a checkpoint).
    pub fn set_steps_taken(&mut self, steps: i64) {
        let _ = self.step.fill_(steps as f64);
    }

    /// The moment buffers by name: what a checkpoint must keep.
    pub fn moments(&self) -> [(&'static str, &Tensor); 2] {
        [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)]
    }

    /// One update of the weights from the gradients, unless `skip` (an f32 scalar on the
    /// weights' device) holds 1: then nothing changes, the step count included.
    pub fn step(&mut self, lr: f64, skip: &Tensor) -> Result<()> {
        tch::no_grad(|| {
            let c = &self.config;
            let step = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, weight_decay: c.weight_decay, eps: c.eps };
            let _ = self.step.g_add_scalar_(1.0);
            fused_adamw(&self.decayed, step, Some(skip))?;
            fused_adamw(&self.plain, AdamWStep { weight_decay: 0.0, ..step }, Some(skip))?;
            let _ = self.step.g_sub_(skip);
            Ok(())
        })
    }
}

/// The parts of `0..len` that `ranges` (sorted, disjoint) leave out.
fn complement(ranges: &[Range<i64>], len: i64) -> Vec<Range<i64>> {
    let mut gaps = Vec::new();
    let mut next = 0;
    for range in ranges {
        if range.start > next {
            gaps.push(next..range.start);
        }
        next = range.end;
    }
    if next < len {
        gaps.push(next..len);
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `torch.optim.AdamW`'s update written out element by element.
    struct Reference {
        weights: Vec<f64>,
        exp_avg: Vec<f64>,
        exp_avg_sq: Vec<f64>,
        steps: i32,
    }

    impl Reference {
        fn step(&mut self, c: &OptimConfig, grads: &[f64], lr: f64, decayed: impl Fn(usize) -> bool) {
            self.steps += 1;
            let (bc1, bc2) = (1.0 - c.beta1.powi(self.steps), 1.0 - c.beta2.powi(self.steps));
            for (i, g) in grads.iter().enumerate() {
                if decayed(i) {
                    self.weights[i] *= 1.0 - lr * c.weight_decay;
                }
                self.exp_avg[i] = c.beta1 * self.exp_avg[i] + (1.0 - c.beta1) * g;
                self.exp_avg_sq[i] = c.beta2 * self.exp_avg_sq[i] + (1.0 - c.beta2) * g * g;
                let denom = self.exp_avg_sq[i].sqrt() / bc2.sqrt() + c.eps;
                self.weights[i] -= lr / bc1 * self.exp_avg[i] / denom;
            }
        }
    }

    #[test]
    fn fused_adamw_matches_the_reference_update_skips_on_the_device_and_decays_only_its_ranges() {
        let config = OptimConfig {
            lr: 1e-2,
            min_lr: 0.0,
            warmup_steps: 0,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 0.0,
            max_skipped_steps: 0,
        };
        tch::manual_seed(3);
        let options = (Kind::Double, Device::Cpu);
        let mut weights = Tensor::randn([10], options);
        let grads = Tensor::zeros([10], options);
        let decay_ranges = [2..5, 7..9];
        let decayed = |i: usize| decay_ranges.iter().any(|r| r.contains(&(i as i64)));
        let mut adamw = AdamW::new(&config, &weights, &grads, &decay_ranges);
        let mut reference = Reference {
            weights: Vec::<f64>::try_from(&weights).unwrap(),
            exp_avg: vec![0.0; 10],
            exp_avg_sq: vec![0.0; 10],
            steps: 0,
        };
        let (run, skip) = (Tensor::from(0.0f32), Tensor::from(1.0f32));
        for (step, skipped) in [false, true, false, false].into_iter().enumerate() {
            let drawn = Tensor::randn([10], options);
            grads.shallow_clone().copy_(&drawn);
            let before = weights.copy();
            adamw.step(1e-2 * (step + 1) as f64, if skipped { &skip } else { &run }).unwrap();
            if skipped {
                assert!(weights.equal(&before), "a skipped step changed the weights");
                continue;
            }
            reference.step(&config, &Vec::<f64>::try_from(&drawn).unwrap(), 1e-2 * (step + 1) as f64, decayed);
            let ours = Vec::<f64>::try_from(&weights).unwrap();
            for (i, (a, b)) in ours.iter().zip(&reference.weights).enumerate() {
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "step {step}, element {i}: {a} vs {b}");
            }
        }
        assert_eq!(reference.steps, 3);
        assert_eq!(adamw.step.double_value(&[]), 3.0, "the skipped step is not counted");
        let _ = weights.zero_();
    }
}
