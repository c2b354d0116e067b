//! The real SmolLM2-135M-Instruct (`scripts/fetch-smollm2`): its `[model]` comes from config.json, its tied weights load and give transformers' logits, and a sharded export reads back in both.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tch::{Kind, Tensor};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::engine::Engine;
use trainer::hf::{self, HfWeights};
use trainer::train::build_engine;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The converted model's directory (fetched and converted once, then cached).
fn smollm2_dir() -> PathBuf {
    let output = Command::new(repo_root().join("scripts/fetch-smollm2")).output().unwrap();
    assert!(output.status.success(), "fetch-smollm2: {}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// A run that starts from `dir` with no `[model]` section of its own.
fn config_from(dir: &Path, extra: &str) -> Config {
    let text = format!("[checkpoint]\ninit_from_hf = {:?}\n[data]\npath = \"unused\"\n{extra}", dir.to_str().unwrap());
    Config::parse(&text, &[]).unwrap()
}

fn engine_from(dir: &Path, config: &Config) -> Engine {
    let engine = build_engine(config, Arc::new(Comm::single())).unwrap();
    engine.params.load_hf(&HfWeights::open(dir).unwrap()).unwrap();
    engine
}

/// transformers' logits for `tokens` from the model in `model_dir`.
fn transformers_logits(model_dir: &Path, tokens: &Tensor, work: &Path) -> Tensor {
    let (tokens_path, out) = (work.join("tokens.safetensors"), work.join("logits.safetensors"));
    Tensor::write_safetensors(&[("tokens", tokens)], &tokens_path).unwrap();
    let status = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/reference/hf_logits.py"))
        .args([model_dir, &tokens_path, &out])
        .status()
        .unwrap();
    assert!(status.success(), "the transformers reference failed");
    Tensor::read_safetensors(&out).unwrap().remove(0).1
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn smollm2_is_read_from_its_directory_and_matches_transformers() {
    let dir = smollm2_dir();
    let config = config_from(&dir, "[train]\nseq_len = 32\n");
    let m = &config.model;
    assert_eq!((m.dim, m.n_layers, m.n_heads, m.kv_heads(), m.ffn_dim, m.vocab_size), (576, 30, 9, 3, 1536, 49152));
    assert!(m.tie_word_embeddings && m.rope_theta == 100000.0, "{m:?}");
    assert_eq!(m.num_params(), 134_515_008, "transformers counts 134,515,008 parameters");
    let engine = engine_from(&dir, &config);
    tch::manual_seed(3);
    let tokens = Tensor::randint(m.vocab_size, [2, 24], (Kind::Int64, tch::Device::Cpu));
    let work = tempfile::tempdir().unwrap();
    let reference = transformers_logits(&dir, &tokens, work.path());
    let diff = max_diff(&engine.logits(&tokens).unwrap(), &reference);
    assert!(diff < 1e-4, "logits differ from transformers by {diff:e}");

    let shorter = config_from(&dir, "[model]\nmax_seq_len = 2048\n[train]\nseq_len = 32\n");
    assert_eq!(shorter.model.max_seq_len, 2048, "a key the config sets wins");
    let error = trainer::config::check_model_config(&dir, &config_from(&dir, "[model]\nn_layers = 2\n").model);
    let error = format!("{:#}", error.unwrap_err());
    assert!(error.contains("model.n_layers = 2 in the config, num_hidden_layers = 30 in config.json"), "{error}");
}

#[test]
fn a_sharded_tied_export_reads_back_in_transformers_and_here() {
    let dir = smollm2_dir();
    let config = config_from(&dir, "[train]\nseq_len = 32\n");
    let engine = engine_from(&dir, &config);
    let weights = engine.hf_weights().unwrap();
    assert!(weights.iter().all(|(name, _)| name != "lm_head.weight"), "a tied head is not written twice");
    let out = tempfile::tempdir().unwrap();
    let files = hf::write_weights(&weights, out.path(), 100_000_000).unwrap();
    assert_eq!(files.len(), 7, "6 shards of at most 100 MB and the index: {files:?}");
    assert_eq!(files.last().unwrap(), hf::INDEX_FILE);
    std::fs::write(out.path().join("config.json"), hf::config_json(&config.model, "float32").to_string()).unwrap();

    let reread = engine_from(out.path(), &config);
    assert!(reread.params.values().equal(engine.params.values()), "the shards hold exactly the weights");
    let tokens = Tensor::randint(config.model.vocab_size, [1, 16], (Kind::Int64, tch::Device::Cpu));
    let work = tempfile::tempdir().unwrap();
    let diff = max_diff(&engine.logits(&tokens).unwrap(), &transformers_logits(out.path(), &tokens, work.path()));
    assert!(diff < 2e-4, "transformers reads the sharded export: logits differ by {diff:e}");
}
