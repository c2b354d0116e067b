//! Generation: the KV-cache step equals full recomputation as sequences join and leave, sampling is seeded per request, stops are honoured, and the logits processors equal `transformers`'.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tch::{Kind, Tensor};
use trainer::comm::Comm;
use trainer::config::Config;
use trainer::decode::{generate, Decoder, FinishReason, Mode, Request, StopReason};
use trainer::engine::Engine;
use trainer::kv_cache::KvCache;
use trainer::sampling::{process_logits, repetition_penalty, SamplingParams};
use trainer::train::build_engine;

/// The tiny preset with weights large enough that attention is sharp (so a wrong position or a
/// missing key shows in the logits).
fn engine(overrides: &[&str]) -> Engine {
    let mut all = vec!["model.n_layers=2".to_string(), "model.init_std=0.1".into()];
    all.extend(overrides.iter().map(|s| s.to_string()));
    let config = Config::parse(include_str!("../../configs/tiny.toml"), &all).unwrap();
    build_engine(&config, Arc::new(Comm::single())).unwrap()
}

fn random_tokens(n: i64, seed: i64) -> Vec<i64> {
    tch::manual_seed(seed);
    Vec::<i64>::try_from(Tensor::randint(4096, [n], (Kind::Int64, tch::Device::Cpu))).unwrap()
}

/// The logits of each sequence's last token, recomputed over the whole sequence.
fn recomputed(engine: &Engine, sequences: &[&Vec<i64>]) -> Tensor {
    let rows: Vec<Tensor> =
        sequences.iter().map(|s| engine.logits(&Tensor::from_slice(s).view([1, -1])).unwrap().select(1, -1)).collect();
    Tensor::cat(&rows, 0)
}

/// Feeds `new` tokens (one row per slot) to `slots` through the cache, appends them to the
/// slots' sequences and returns the largest difference from full recomputation and the largest
/// logit's magnitude.
fn feed(
    engine: &Engine,
    cache: &mut KvCache,
    slots: &[usize],
    new: &[Vec<i64>],
    sequences: &mut [Vec<i64>],
) -> (f64, f64) {
    for (&slot, tokens) in slots.iter().zip(new) {
        sequences[slot].extend(tokens);
    }
    let tokens = Tensor::from_slice(&new.concat()).view([slots.len() as i64, -1]);
    let cached = engine.forward_cached(cache, slots, &tokens).unwrap().to_kind(Kind::Double);
    let rows: Vec<&Vec<i64>> = slots.iter().map(|&s| &sequences[s]).collect();
    let expected = recomputed(engine, &rows).to_kind(Kind::Double);
    ((cached - &expected).abs().max().double_value(&[]), expected.abs().max().double_value(&[]))
}

/// Feeds the cache as a server would (prefills, decode steps of sequences of different lengths,
/// a chunk of 2 tokens each, a sequence leaving and another joining) and returns the largest
/// difference from full recomputation, relative to the logits' largest magnitude.
fn cache_vs_recompute(engine: &Engine) -> f64 {
    let mut cache = engine.new_cache(3, 48).unwrap();
    let mut sequences = vec![Vec::new(); 3];
    let mut seed = 0;
    let mut new = |counts: &[i64]| -> Vec<Vec<i64>> {
        counts
            .iter()
            .map(|&n| {
                seed += 1;
                random_tokens(n, seed)
            })
            .collect()
    };
    let mut results = Vec::new();
    for (slot, n) in [(0, 7), (1, 12), (2, 3)] {
        results.push(feed(engine, &mut cache, &[slot], &new(&[n]), &mut sequences));
    }
    for _ in 0..4 {
        results.push(feed(engine, &mut cache, &[0, 1, 2], &new(&[1, 1, 1]), &mut sequences));
    }
    results.push(feed(engine, &mut cache, &[0, 1, 2], &new(&[2, 2, 2]), &mut sequences));
    // Sequence 1 leaves; 0 and 2 go on as rows that are not adjacent; a new sequence joins in slot 1.
    for _ in 0..3 {
        results.push(feed(engine, &mut cache, &[0, 2], &new(&[1, 1]), &mut sequences));
    }
    cache.reset(1);
    sequences[1].clear();
    results.push(feed(engine, &mut cache, &[1], &new(&[5]), &mut sequences));
    for _ in 0..3 {
        results.push(feed(engine, &mut cache, &[0, 1, 2], &new(&[1, 1, 1]), &mut sequences));
    }
    let worst = results.iter().map(|r| r.0).fold(0.0, f64::max);
    let scale = results.iter().map(|r| r.1).fold(0.0, f64::max);
    eprintln!("cache vs recomputation: {worst:e} (logits up to {scale:.2})");
    worst / scale.max(1.0)
}

#[test]
fn the_kv_cache_equals_full_recomputation() {
    let f32_diff = cache_vs_recompute(&engine(&[]));
    assert!(f32_diff <= 1e-5, "fp32: cached logits differ from recomputed ones by {f32_diff:e} (relative)");
    let gqa = cache_vs_recompute(&engine(&["model.n_kv_heads=2"]));
    assert!(gqa <= 1e-5, "fp32 grouped-query: cached logits differ by {gqa:e} (relative)");
    let bf16 = cache_vs_recompute(&engine(&["train.dtype=bfloat16"]));
    assert!(bf16 <= 5e-2, "bf16: cached logits differ by {bf16:e} (relative)");
}

fn request(prompt: &[i64], params: SamplingParams) -> Request {
    Request { prompt: prompt.to_vec(), params }
}

#[test]
fn seeded_sampling_repeats_per_request_and_stops_are_honoured() {
    let engine = engine(&[]);
    let prompt = random_tokens(6, 1);
    let sampled = SamplingParams { max_tokens: 24, temperature: 1.0, seed: Some(11), ..SamplingParams::default() };
    let other = request(&random_tokens(9, 2), SamplingParams { seed: Some(3), max_tokens: 5, ..sampled.clone() });
    // Alone, or batched with others (the third request joins when the first ends, while the second
    // runs): the same tokens (each request has its own generator).
    let (alone, _) = generate(&engine, None, vec![request(&prompt, sampled.clone())], 4, Mode::KvCache).unwrap();
    let batch = vec![other.clone(), request(&prompt, sampled.clone()), other];
    let (batched, _) = generate(&engine, None, batch, 2, Mode::KvCache).unwrap();
    assert_eq!(alone[0].token_ids.len(), 24);
    assert_eq!(alone[0].token_ids, batched[1].token_ids, "the same seed and request give the same tokens");
    let reseeded = SamplingParams { seed: Some(12), ..sampled.clone() };
    let (changed, _) = generate(&engine, None, vec![request(&prompt, reseeded)], 1, Mode::KvCache).unwrap();
    assert_ne!(changed[0].token_ids, alone[0].token_ids, "another seed, other tokens");

    let greedy = SamplingParams::greedy(24);
    let (expected, _) = generate(&engine, None, vec![request(&prompt, greedy.clone())], 1, Mode::KvCache).unwrap();
    let (recomputed, _) = generate(&engine, None, vec![request(&prompt, greedy.clone())], 1, Mode::Recompute).unwrap();
    assert_eq!(expected[0].token_ids, recomputed[0].token_ids, "greedy with the cache = greedy recomputing");
    let top1 = SamplingParams { top_k: 1, ..sampled };
    let (top1, _) = generate(&engine, None, vec![request(&prompt, top1)], 1, Mode::KvCache).unwrap();
    assert_eq!(top1[0].token_ids, expected[0].token_ids, "top-k 1 is greedy");
    assert_eq!(expected[0].finish_reason, FinishReason::Length);

    let tokens = &expected[0].token_ids;
    let stop = tokens[5];
    let first = tokens.iter().position(|&t| t == stop).unwrap();
    let stopping = SamplingParams { stop_token_ids: vec![stop], ..greedy };
    let (stopped, _) = generate(&engine, None, vec![request(&prompt, stopping)], 1, Mode::KvCache).unwrap();
    assert_eq!(stopped[0].token_ids, tokens[..first], "the output ends before the stop token");
    assert_eq!(
        (stopped[0].finish_reason, &stopped[0].stop_reason),
        (FinishReason::Stop, &Some(StopReason::Token(stop)))
    );
}

#[test]
fn requests_beyond_the_context_or_vocabulary_are_refused_clearly() {
    let engine = engine(&[]);
    let too_long = request(&random_tokens(250, 1), SamplingParams::greedy(7));
    let error = generate(&engine, None, vec![too_long], 1, Mode::KvCache).unwrap_err().to_string();
    assert!(error.contains("max_tokens = 7 after a prompt of 250 tokens exceeds the context of 256 tokens"), "{error}");
    assert!(error.contains("at most 6"), "{error}");
    let outside = request(&[1, 4096], SamplingParams::greedy(1));
    let error = generate(&engine, None, vec![outside], 1, Mode::KvCache).unwrap_err().to_string();
    assert!(error.contains("token id 4096 is outside the vocabulary (0..4096)"), "{error}");
    let stop_text = request(&[1], SamplingParams { stop: vec!["x".into()], ..SamplingParams::greedy(1) });
    let error = generate(&engine, None, vec![stop_text], 1, Mode::KvCache).unwrap_err().to_string();
    assert!(error.contains("stop strings need the model's tokenizer"), "{error}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn logits_processors_equal_transformers() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(5);
    let logits = Tensor::randn([3, 64], (Kind::Float, tch::Device::Cpu)) * 3.0;
    let history = Tensor::from_slice(&[3i64, 7, 7, 0, 63, 12, 5, 9, 9, 9, 40, 41, 2, 2, 2]).view([3, 5]);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("logits", &logits), ("history", &history)], &inputs).unwrap();
    let python = repo_root().join(".venv/bin/python");
    let status = Command::new(&python)
        .arg(repo_root().join("tests/reference/hf_sampling.py"))
        .arg(&inputs)
        .arg(dir.path().join("reference.safetensors"))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup first", python.display()));
    assert!(status.success(), "the transformers reference failed");
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("reference.safetensors")).unwrap().into_iter().collect();
    let warped = SamplingParams { temperature: 0.7, top_k: 20, top_p: 0.9, min_p: 0.05, ..Default::default() };
    let penalized = SamplingParams { repetition_penalty: 1.3, ..warped.clone() };
    for row in 0..3 {
        let ids = Vec::<i64>::try_from(history.get(row)).unwrap();
        let expected = reference["penalty"].get(row);
        assert!(repetition_penalty(&logits.get(row), &ids, 1.3).equal(&expected), "repetition penalty, row {row}");
        for (name, params) in [("warped", &warped), ("penalized_warped", &penalized)] {
            let ours = process_logits(&logits.get(row), &ids, params);
            let theirs = reference[name].get(row);
            assert!(ours.isfinite().equal(&theirs.isfinite()), "{name}, row {row}: other tokens kept");
            let kept = ours.isfinite();
            let diff = (ours.masked_select(&kept) - theirs.masked_select(&kept)).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{name}, row {row}: logits differ by {diff:e}");
        }
    }
}

#[test]
fn a_cancelled_request_frees_its_slot_and_cache_at_once_and_the_others_continue_unchanged() {
    let engine = engine(&[]);
    let greedy = |prompt: &[i64]| request(prompt, SamplingParams::greedy(6));
    let (a, b) = (random_tokens(5, 1), random_tokens(9, 2));
    let (alone, _) = generate(&engine, None, vec![greedy(&b)], 1, Mode::KvCache).unwrap();
    let mut decoder = Decoder::new(&engine, None, 2, 32, Mode::KvCache).unwrap();
    assert!(decoder.add(0, greedy(&a)).unwrap().is_none() && decoder.add(1, greedy(&b)).unwrap().is_none());
    decoder.step().unwrap();
    assert_eq!((decoder.cache_usage(), decoder.free_slots()), ((5 + 9 + 2, 64), 0));
    assert!(decoder.cancel(0) && !decoder.cancel(0));
    assert_eq!((decoder.cache_usage(), decoder.free_slots()), ((9 + 1, 64), 1));
    assert_eq!(decoder.running().map(|(id, output)| (id, output.len())).collect::<Vec<_>>(), [(1, 2)]);
    let mut finished = Vec::new();
    while !decoder.is_idle() {
        finished.extend(decoder.step().unwrap());
    }
    assert_eq!(finished[0].token_ids, alone[0].token_ids);
    assert_eq!(decoder.cache_usage(), (0, 64), "a finished request's cached tokens are freed");
}
