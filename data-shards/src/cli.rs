//! The `data-shards` subcommands that do more than call into the library: inspect, render-chat and bench-loader.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use data_shards::sft::parse_chat_line;
use data_shards::{ChatTemplate, DataCursor, RankLoader, Split, WindowSampler};

use crate::Source;

/// Renders each conversation of chat JSONL `input` with the chat template of `model_dir`, one JSON string per
/// line on stdout.
pub fn render_chat(model_dir: &Path, input: &Path, add_generation_prompt: bool) -> Result<()> {
    let template = ChatTemplate::from_model_dir(model_dir)?;
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("input {}: line {}", input.display(), i + 1);
        let value = serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let messages = parse_chat_line(value).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let rendered = template.render(&messages, add_generation_prompt).with_context(at)?;
        serde_json::to_writer(&mut out, &rendered)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

pub fn inspect(source: &Source, json: bool) -> Result<()> {
    let splits: Vec<Split> = if source.megatron.is_some() { vec![Split::Train] } else { Split::ALL.to_vec() };
    let mut report = serde_json::Map::new();
    for split in splits {
        let ds = source.open(split)?;
        let name = if source.megatron.is_some() { "megatron" } else { split.name() };
        if json {
            report.insert(
                name.into(),
                serde_json::json!({
                    "num_tokens": ds.num_tokens(),
                    "num_documents": ds.num_documents(),
                    "num_shards": ds.num_shards(),
                    "dtype": ds.dtype().to_string(),
                    "vocab_size": ds.vocab_size(),
                    "eos_id": ds.eos_id(),
                    "loss_mask": ds.has_loss_mask(),
                    "num_loss_tokens": ds.num_loss_tokens(),
                    "tokenizer": ds.tokenizer_path().map(|p| p.display().to_string()),
                }),
            );
        } else {
            let mean = ds.num_tokens() as f64 / ds.num_documents().max(1) as f64;
            let trained = match ds.num_loss_tokens() {
                Some(n) => format!(" ({n} trained: loss mask)"),
                None => String::new(),
            };
            println!(
                "{name}: {} tokens{trained}, {} documents ({mean:.1} tokens/doc), {} shards, dtype {}, vocab {}, eos {}",
                ds.num_tokens(),
                ds.num_documents(),
                ds.num_shards(),
                ds.dtype(),
                opt(ds.vocab_size()),
                opt(ds.eos_id()),
            );
            for p in ds.shard_paths() {
                println!("  {}", display_name(&p));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

fn display_name(p: &Path) -> String {
    p.display().to_string()
}

pub fn bench_loader(source: &Source, split: Split, seq_len: usize, global_batch: usize, seconds: f64) -> Result<()> {
    let ds = Arc::new(source.open(split)?);
    let sampler = WindowSampler::new(ds.clone(), seq_len, 1234)?;
    let check = WindowSampler::new(ds.clone(), seq_len, 1234)?;
    let mut loader = RankLoader::new(sampler, 0, 1, DataCursor::default());
    let mut out = vec![0i64; global_batch * (seq_len + 1)];
    let budget = std::time::Duration::from_secs_f64(seconds);

    // Loader: windows decoded to i64 through the permutation.
    let t = Instant::now();
    let mut batches = 0u64;
    let mut sink = 0i64;
    while t.elapsed() < budget {
        loader.next_batch_into(global_batch, &mut out);
        sink = sink.wrapping_add(out[batches as usize % out.len()]);
        batches += 1;
    }
    let loader_secs = t.elapsed().as_secs_f64();
    let loader_tokens = batches * (global_batch * (seq_len + 1)) as u64;

    // Baseline: memcpy of the same windows' raw bytes, same order.
    let mut raw = vec![0u8; global_batch * (seq_len + 1) * ds.dtype().width()];
    let row = (seq_len + 1) * ds.dtype().width();
    let t = Instant::now();
    let mut copied = 0u64;
    let mut gi = 0u64;
    while t.elapsed() < budget {
        for dst in raw.chunks_exact_mut(row) {
            let (shard, start) = check.window_location(check.window_id(gi));
            dst.copy_from_slice(ds.raw_shard_bytes(shard, start, (seq_len + 1) as u64));
            gi += 1;
        }
        sink = sink.wrapping_add(raw[copied as usize % raw.len()] as i64);
        copied += 1;
    }
    let memcpy_secs = t.elapsed().as_secs_f64();
    let memcpy_tokens = copied * (global_batch * (seq_len + 1)) as u64;

    let loader_tps = loader_tokens as f64 / loader_secs;
    let memcpy_tps = memcpy_tokens as f64 / memcpy_secs;
    println!(
        "loader: {:.3e} tokens/s ({} batches of {}x{} from {} tokens, {}); memcpy of the same {} bytes: {:.3e} tokens/s; loader/memcpy = {:.2} (checksum {sink})",
        loader_tps,
        batches,
        global_batch,
        seq_len + 1,
        ds.num_tokens(),
        ds.dtype(),
        ds.dtype(),
        memcpy_tps,
        loader_tps / memcpy_tps
    );
    Ok(())
}
