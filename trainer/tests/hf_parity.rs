//! Parity with the real `transformers` LlamaForCausalLM: logits, loss and every gradient on the same weights and tokens.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tch::{Kind, Tensor};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::data::Batch;
use trainer::hf;
use trainer::train::build_engine;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Largest |a - b| over the tensor, relative to the largest |b| (at least 1e-3).
fn relative_max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    let scale = b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1e-3);
    diff / scale
}

fn check_against_transformers(overrides: &[&str]) {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let config = Config::parse(include_str!("../../configs/tiny.toml"), &overrides).unwrap();
    let engine = build_engine(&config, Arc::new(Comm::single())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), hf::config_json(&config.model, "float32").to_string()).unwrap();
    let weights = engine.hf_weights().unwrap();
    Tensor::write_safetensors(&weights, dir.path().join("model.safetensors")).unwrap();
    tch::manual_seed(7);
    let (batch, seq) = (2, 48);
    let tokens = Tensor::randint(config.model.vocab_size, [batch, seq + 1], (Kind::Int64, tch::Device::Cpu));
    Tensor::write_safetensors(&[("tokens", &tokens)], dir.path().join("tokens.safetensors")).unwrap();

    let python = repo_root().join(".venv/bin/python");
    let status = Command::new(&python)
        .arg(repo_root().join("tests/reference/hf_llama.py"))
        .arg(dir.path())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup first", python.display()));
    assert!(status.success(), "the transformers reference failed");
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("reference.safetensors")).unwrap().into_iter().collect();

    let logits = engine.logits(&tokens.narrow(1, 0, seq)).unwrap();
    let logits_diff = (&logits - &reference["logits"]).abs().max().double_value(&[]);
    assert!(logits_diff <= 1e-4, "logits differ from transformers by {logits_diff:e}");

    engine.params.zero_grads();
    let windows = Batch { tokens: tokens.shallow_clone(), packing: None };
    let loss = engine.forward_backward(&windows, (batch * seq) as f64, None).unwrap().double_value(&[]);
    let reference_loss = reference["loss"].double_value(&[0]);
    assert!((loss - reference_loss).abs() <= 1e-5, "loss {loss} vs transformers {reference_loss}");

    let grads: Vec<_> = engine.params.hf_grads().map(|(piece, grad)| (piece.name.clone(), grad)).collect();
    assert_eq!(grads.len(), reference.len() - 2, "one gradient per transformers parameter");
    let mut worst = 0.0f64;
    for (name, grad) in grads {
        let expected = &reference[&format!("grad.{name}")];
        let diff = relative_max_diff(&grad, expected);
        assert!(diff <= 1e-4, "gradient of {name} differs from transformers by {diff:e} (relative to its max)");
        worst = worst.max(diff);
    }
    eprintln!(
        "vs transformers: logits {logits_diff:e}, loss {:e}, gradients {worst:e} (relative)",
        (loss - reference_loss).abs()
    );
}

#[test]
fn tiny_preset_matches_transformers() {
    check_against_transformers(&[]);
}

#[test]
fn grouped_query_attention_matches_transformers() {
    check_against_transformers(&["model.n_kv_heads=2", "model.n_layers=2"]);
}

#[test]
fn tied_embeddings_match_transformers() {
    // One matrix is both the embedding and the head: its gradient is the sum of both uses.
    check_against_transformers(&["model.tie_word_embeddings=true", "model.n_layers=2"]);
}
