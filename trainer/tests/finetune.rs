//! Packed fine-tuning windows: documents packed into one window score, and train, exactly as each would alone.
use std::sync::Arc;
use tch::{Kind, Tensor};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::data::{Batch, Packing};
use trainer::engine::Engine;
use trainer::train::build_engine;

fn engine() -> Engine {
    let overrides = ["train.dtype=float64".to_string(), "model.n_layers=2".to_string()];
    let config = Config::parse(include_str!("../../configs/tiny.toml"), &overrides).unwrap();
    build_engine(&config, Arc::new(Comm::single())).unwrap()
}

/// A batch of one window, [1, len + 1] tokens, trained where `mask` (per target) is 1.
fn batch(tokens: &[i64], packing: Option<(&[f64], &[i64])>) -> Batch {
    let seq = tokens.len() as i64 - 1;
    let packing = packing.map(|(mask, positions)| Packing {
        target_mask: Tensor::from_slice(mask).view([1, seq]),
        positions: Tensor::from_slice(positions).view([1, seq]),
    });
    Batch { tokens: Tensor::from_slice(tokens).view([1, seq + 1]), packing }
}

fn gradients(engine: &Engine, batch: &Batch) -> (f64, Tensor) {
    engine.params.zero_grads();
    let loss = engine.forward_backward(batch, 1.0, None).unwrap().double_value(&[]);
    (loss, engine.params.grads().copy())
}

#[test]
fn packed_documents_train_as_if_alone() {
    let engine = engine();
    tch::manual_seed(5);
    let first: Vec<i64> = Vec::try_from(Tensor::randint(4096, [9], (Kind::Int64, tch::Device::Cpu))).unwrap();
    let second: Vec<i64> = Vec::try_from(Tensor::randint(4096, [14], (Kind::Int64, tch::Device::Cpu))).unwrap();
    // The window: both documents end to end; the target that crosses from the first into the
    // second (the second's first token) is not trained, as data-shards masks it.
    let tokens: Vec<i64> = first.iter().chain(&second).copied().collect();
    let seq = tokens.len() - 1;
    let mut mask = vec![1.0; seq];
    mask[first.len() - 1] = 0.0;
    let positions: Vec<i64> = (0..first.len() as i64).chain(0..second.len() as i64 - 1).collect();
    let packed = batch(&tokens, Some((&mask, &positions)));

    let (loss, grads) = gradients(&engine, &packed);
    let (first_loss, first_grads) = gradients(&engine, &batch(&first, None));
    let (second_loss, second_grads) = gradients(&engine, &batch(&second, None));
    assert!((loss - (first_loss + second_loss)).abs() < 1e-10, "{loss} vs {first_loss} + {second_loss}");
    let difference = (&grads - (first_grads + second_grads)).abs().max().double_value(&[]);
    assert!(difference < 1e-10, "gradients differ by {difference:e}");
    assert!((engine.eval_loss_sum(&packed).unwrap() - loss).abs() < 1e-10, "validation scores the same way");

    // Without the document mask the second document would see the first: the loss changes.
    let unpacked = batch(&tokens, Some((&mask, &(0..seq as i64).collect::<Vec<_>>())));
    let (leaky, _) = gradients(&engine, &unpacked);
    assert!((leaky - loss).abs() > 1e-3, "positions alone must matter: {leaky} vs {loss}");
}
