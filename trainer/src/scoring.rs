//! Scoring sequences on the engine, for `trainer eval` and the evaluations during training: loss, perplexity and bits per byte of documents, and multiple-choice accuracy by log-likelihood, over any parallel layout.
//!
//! Every rank of a tensor-parallel group scores the same sequences; data-parallel groups take
//! every dp-th one, and the sums meet in one all-reduce over the data-parallel group, so any
//! layout gives the same numbers (up to summation order).
use crate::comm::{GroupKind, ReduceOp};
use crate::config::invalid_config;
use crate::engine::Engine;
use crate::runlog::EVAL_SCORES;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;
use tracing::info;

/// A document to score: its token ids after one token of context (the first id, scored
/// never), and the bytes of its text (for bits per byte).
#[derive(Debug, Clone)]
pub struct Document {
    pub ids: Vec<i64>,
    pub bytes: u64,
}

/// One sequence of at most `seq_len + 1` tokens whose tokens from `first_scored` on are
/// predicted and summed.
#[derive(Debug, Clone)]
struct Scored {
    ids: Vec<i64>,
    first_scored: usize,
}

/// Loss, perplexity and bits per byte over documents.
#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    pub documents: u64,
    pub tokens: u64,
    pub bytes: u64,
    /// Mean negative log-likelihood per token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// The negative log-likelihood in bits over the bytes of the text: comparable across
    /// tokenizers.
    pub bits_per_byte: f64,
}

/// Accuracy on a multiple-choice task: the choice with the highest log-likelihood (`accuracy`)
/// or the highest per byte of the choice's text (`accuracy_norm`, lm-evaluation-harness's
/// acc_norm).
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceReport {
    pub items: u64,
    pub accuracy: f64,
    pub accuracy_norm: f64,
    /// The right choices' negative log-likelihood (nats), averaged over the items.
    pub answer_nll: f64,
    /// Every item's scores, in the task file's order (`--output` writes them; the printed line leaves them out).
    pub per_item: Vec<ChoiceScores>,
}

/// One multiple-choice item's scores, as lm-evaluation-harness logs them per sample.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceScores {
    /// Each choice's summed log-likelihood (nats) after the context.
    pub loglikelihoods: Vec<f64>,
    /// Each choice's length in UTF-8 bytes (what `accuracy_norm` divides by).
    pub bytes: Vec<u64>,
    /// The right choice.
    pub answer: usize,
    /// The most likely choice, and the most likely per byte.
    pub predicted: usize,
    pub predicted_norm: usize,
}

impl LossReport {
    /// The scores that metrics.jsonl and Prometheus carry (names from [`EVAL_SCORES`]).
    pub fn scores(&self) -> BTreeMap<String, f64> {
        named_scores([("loss", self.loss), ("perplexity", self.perplexity), ("bits_per_byte", self.bits_per_byte)])
    }
}

impl ChoiceReport {
    /// The scores that metrics.jsonl and Prometheus carry (names from [`EVAL_SCORES`]).
    pub fn scores(&self) -> BTreeMap<String, f64> {
        named_scores([
            ("accuracy", self.accuracy),
            ("accuracy_norm", self.accuracy_norm),
            ("answer_nll", self.answer_nll),
        ])
    }
}

fn named_scores<const N: usize>(scores: [(&str, f64); N]) -> BTreeMap<String, f64> {
    debug_assert!(scores.iter().all(|(name, _)| EVAL_SCORES.iter().any(|(known, _, _)| known == name)));
    scores.into_iter().map(|(name, value)| (name.to_string(), value)).collect()
}

/// One multiple-choice item as the task file holds it (one JSON object per line).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceItem {
    pub context: String,
    pub choices: Vec<String>,
    /// The index of the right choice.
    pub answer: usize,
}

/// Documents of text, tokenized without special tokens, each after `prefix` (the token a
/// document follows in training data, e.g. `<|endoftext|>`).
pub fn text_documents(texts: &[String], tokenizer: &Tokenizer, prefix: i64) -> Result<Vec<Document>> {
    texts
        .iter()
        .map(|text| {
            let ids = std::iter::once(prefix).chain(encode(tokenizer, text)?).collect();
            Ok(Document { ids, bytes: text.len() as u64 })
        })
        .collect()
}

/// The documents of a text file: the whole file, or each line's "text" of a JSONL file.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(vec![text]);
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| invalid_config(format!("{} line {}: {e}", path.display(), number + 1)))?;
            value["text"].as_str().map(str::to_string).ok_or_else(|| {
                invalid_config(format!("{} line {}: expected {{\"text\": \"...\"}}", path.display(), number + 1))
            })
        })
        .collect()
}

/// The token ids of `text`, without the tokenizer's special tokens.
fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    let encoding = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
    Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
}

/// Reads a multiple-choice task: JSONL of `{"context", "choices", "answer"}`.
pub fn read_choice_items(path: &Path) -> Result<Vec<ChoiceItem>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut items = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let item: ChoiceItem = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"context\": str, \"choices\": [str], \"answer\": int}}",
                path.display(),
                number + 1
            )
        })?;
        if item.choices.len() < 2 || item.answer >= item.choices.len() {
            bail!(
                "{} line {}: {} choices and answer {}: needs two choices at least and an answer among them",
                path.display(),
                number + 1,
                item.choices.len(),
                item.answer
            );
        }
        items.push(item);
    }
    if items.is_empty() {
        bail!("{} holds no items", path.display());
    }
    Ok(items)
}

/// Sequences are scored this many at a time (padded to the longest).
const BATCH: usize = 8;

/// The summed negative log-likelihood of each sequence's scored tokens. Each data-parallel
/// rank scores every dp-th sequence (its tensor-parallel group alike), then one all-reduce
/// over the data-parallel group gives every rank all of them.
fn score(engine: &Engine, sequences: &[Scored]) -> Result<Vec<f64>> {
    let topology = engine.comm().topology;
    let (dp_rank, dp) = (topology.data.rank, topology.data.size);
    let mine: Vec<usize> = (dp_rank..sequences.len()).step_by(dp).collect();
    let mut sums = vec![0.0; sequences.len()];
    let device = engine.params.values().device();
    let started = Instant::now();
    for batch in mine.chunks(BATCH) {
        let longest = batch.iter().map(|&i| sequences[i].ids.len()).max().unwrap_or(2);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for &i in batch {
            let s = &sequences[i];
            ids.extend(s.ids.iter().copied().chain(std::iter::repeat_n(0, longest - s.ids.len())));
            // Target position p predicts token p + 1.
            mask.extend((1..longest).map(|t| f64::from(u8::from(t >= s.first_scored && t < s.ids.len()))));
        }
        let rows = batch.len() as i64;
        let tokens = Tensor::from_slice(&ids).view([rows, longest as i64]).to_device(device);
        let mask = Tensor::from_slice(&mask).view([rows, longest as i64 - 1]).to_device(device);
        let seq = longest as i64 - 1;
        let nll = tch::no_grad(|| -> Result<Tensor> {
            let logits = engine.logits(&tokens.narrow(1, 0, seq))?;
            let losses = engine.token_losses(&logits, &tokens.narrow(1, 1, seq))?.to_kind(Kind::Double);
            Ok((losses * mask).sum_dim_intlist([1i64].as_slice(), false, Kind::Double).to_device(tch::Device::Cpu))
        })?;
        for (row, &i) in batch.iter().enumerate() {
            sums[i] = nll.double_value(&[row as i64]);
        }
    }
    let tokens: usize = mine.iter().map(|&i| sequences[i].ids.len()).sum();
    let seconds = started.elapsed().as_secs_f64();
    info!(
        "scored {} sequences, {tokens} tokens in {seconds:.2} s ({:.0} tokens/s)",
        mine.len(),
        tokens as f64 / seconds.max(1e-9)
    );
    if dp > 1 {
        let all = Tensor::from_slice(&sums);
        engine.comm().all_reduce(GroupKind::Data, &all, ReduceOp::Sum).wait()?;
        sums = Vec::<f64>::try_from(&all)?;
    }
    Ok(sums)
}

/// Loss, perplexity and bits per byte of `documents`, each scored in disjoint windows of
/// `seq_len` predicted tokens (each window's first input is the token before it).
pub fn loss_report(engine: &Engine, documents: &[Document], seq_len: usize) -> Result<LossReport> {
    let mut sequences = Vec::new();
    for document in documents.iter().filter(|d| d.ids.len() > 1) {
        let mut start = 0;
        while start + 1 < document.ids.len() {
            let end = (start + seq_len + 1).min(document.ids.len());
            sequences.push(Scored { ids: document.ids[start..end].to_vec(), first_scored: 1 });
            start += seq_len;
        }
    }
    let nll: f64 = score(engine, &sequences)?.iter().sum();
    let tokens: u64 = documents.iter().map(|d| d.ids.len().saturating_sub(1) as u64).sum();
    let bytes: u64 = documents.iter().map(|d| d.bytes).sum();
    if tokens == 0 {
        bail!("nothing to score: the documents hold no tokens");
    }
    let loss = nll / tokens as f64;
    Ok(LossReport {
        documents: documents.len() as u64,
        tokens,
        bytes,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
    })
}

/// Accuracy on `items`: each choice's tokens scored after the context's (the last `seq_len + 1`
/// tokens of the two, so a long context loses its beginning); an empty context is `prefix`.
pub fn choice_report(
    engine: &Engine,
    items: &[ChoiceItem],
    tokenizer: &Tokenizer,
    prefix: i64,
    seq_len: usize,
) -> Result<ChoiceReport> {
    let mut sequences = Vec::new();
    for item in items {
        let mut context = encode(tokenizer, &item.context)?;
        if context.is_empty() {
            context.push(prefix);
        }
        for choice in &item.choices {
            let continuation = encode(tokenizer, choice)?;
            if continuation.is_empty() || continuation.len() > seq_len {
                bail!("the choice {choice:?} is {} tokens; it must be 1 to {seq_len} (--seq-len)", continuation.len());
            }
            let ids: Vec<i64> = context.iter().chain(&continuation).copied().collect();
            let ids = ids[ids.len().saturating_sub(seq_len + 1)..].to_vec();
            sequences.push(Scored { first_scored: ids.len() - continuation.len(), ids });
        }
    }
    let scores = score(engine, &sequences)?;
    let mut remaining = scores.as_slice();
    let mut per_item = Vec::with_capacity(items.len());
    for item in items {
        let (nll, rest) = remaining.split_at(item.choices.len());
        remaining = rest;
        let bytes: Vec<u64> = item.choices.iter().map(|c| c.len() as u64).collect();
        // The most likely choice has the least negative log-likelihood (the first of equals).
        let best = |key: &dyn Fn(usize) -> f64| (0..nll.len()).min_by(|&a, &b| key(a).total_cmp(&key(b))).unwrap_or(0);
        per_item.push(ChoiceScores {
            loglikelihoods: nll.iter().map(|&x| -x).collect(),
            answer: item.answer,
            predicted: best(&|c| nll[c]),
            predicted_norm: best(&|c| nll[c] / bytes[c].max(1) as f64),
            bytes,
        });
    }
    let n = items.len() as f64;
    let share = |hit: &dyn Fn(&ChoiceScores) -> bool| per_item.iter().filter(|s| hit(s)).count() as f64 / n;
    Ok(ChoiceReport {
        items: items.len() as u64,
        accuracy: share(&|s| s.predicted == s.answer),
        accuracy_norm: share(&|s| s.predicted_norm == s.answer),
        answer_nll: -per_item.iter().map(|s| s.loglikelihoods[s.answer]).sum::<f64>() / n,
        per_item,
    })
}
