//! Shared helpers for the integration tests: corpus generation, tokenizer training, CLI runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use data_shards::{prepare, train_tokenizer, CorpusOptions, PrepareOptions, PrepareReport, TrainOptions};

/// Path of the built CLI.
pub const BIN: &str = env!("CARGO_BIN_EXE_data-shards");

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "tokens",
    "from",
    "data",
    "shards",
    "quickly",
    "résumé",
    "naïve",
    "日本語",
    "emoji🙂",
    "gradient",
    "descent",
    "loss",
    "falls",
    "when",
    "batch",
    "grows",
    "and",
    "or",
    "not",
    "a",
    "of",
    "to",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "llama",
    "rust",
    "python",
    "memory",
    "mapped",
    "window",
    "epoch",
    "seed",
    "cursor",
];

/// Tiny deterministic PRNG (SplitMix64) for corpus generation.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` documents of varied length, mixed punctuation, newlines and non-ASCII text.
pub fn make_docs(n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let len = 3 + rng.below(120) as usize;
            let mut s = String::new();
            for j in 0..len {
                if j > 0 {
                    s.push(match rng.below(12) {
                        0 => '\n',
                        1 => '\t',
                        _ => ' ',
                    });
                }
                s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                if rng.below(9) == 0 {
                    s.push_str(&format!(", {}!", rng.below(1000)));
                }
            }
            s.push_str(&format!(" (doc {i})\n"));
            s
        })
        .collect()
}

/// Writes the docs into `dir` as: two `%`-separated text files and one JSONL file (in sorted
/// name order: a.txt, b.txt, c.jsonl), returning the documents in the order prepare reads them.
pub fn write_corpus(dir: &Path, docs: &[String]) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let third = docs.len() / 3;
    let (a, rest) = docs.split_at(third);
    let (b, c) = rest.split_at(third);
    std::fs::write(dir.join("a.txt"), a.join("%\n")).unwrap();
    std::fs::write(dir.join("b.txt"), format!("%\n{}%\n%\n", b.join("%\n"))).unwrap();
    let mut jsonl = String::new();
    for d in c {
        jsonl.push_str(&serde_json::json!({ "id": 1, "text": d }).to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("c.jsonl"), jsonl).unwrap();
    docs.to_vec()
}

/// Corpus options for a corpus written by [`write_corpus`].
pub fn corpus_options(dir: &Path) -> CorpusOptions {
    let mut c = CorpusOptions::new(vec![dir.to_path_buf()]);
    c.doc_separator = Some("%".into());
    c
}

/// Trains a small byte-level BPE tokenizer on the corpus in `corpus`.
pub fn train(corpus: &Path, out: &Path, vocab_size: usize) -> PathBuf {
    train_tokenizer(&TrainOptions {
        corpus: corpus_options(corpus),
        vocab_size,
        output: out.to_path_buf(),
        min_frequency: 2,
        show_progress: false,
    })
    .unwrap();
    out.to_path_buf()
}

/// Prepares `corpus` into `out` with small shards.
pub fn prepare_dir(corpus: &Path, tokenizer: &Path, out: &Path, valid: f64) -> PrepareReport {
    let mut o = PrepareOptions::new(corpus_options(corpus), tokenizer.into(), out.into());
    o.valid_fraction = valid;
    o.shard_tokens = 2000;
    prepare(&o).unwrap()
}

/// `data-shards prepare` of a `%`-separated corpus, followed by `extra` options.
pub fn prepare_args<'a>(corpus: &'a Path, tokenizer: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let [corpus, tokenizer, out] = [corpus, tokenizer, out].map(|p| p.to_str().unwrap());
    let mut args =
        vec!["prepare", "--input", corpus, "--doc-separator", "%", "--tokenizer", tokenizer, "--output", out];
    args.extend_from_slice(extra);
    args
}

/// Runs the CLI with `args` and extra environment variables.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run data-shards")
}

/// Asserts a CLI run failed cleanly (exit 1, no panic) and its stderr contains every needle.
pub fn assert_fails_with(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("backtrace"), "backtrace: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    stderr
}

/// Asserts a CLI run succeeded and returns stdout.
pub fn assert_ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Sets every shard's checksum in `dir/manifest.json` to the file's current one, so that a test's damage is found
/// by the checks after the checksum. Does nothing to a manifest or shard it cannot read.
pub fn rewrite_checksums(dir: &Path) {
    let path = dir.join("manifest.json");
    let Some(mut manifest) =
        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    else {
        return;
    };
    let shards = manifest["splits"].as_object_mut().into_iter().flat_map(|splits| splits.values_mut());
    for shard in shards.filter_map(|split| split["shards"].as_array_mut()).flatten() {
        if let Some(bytes) = shard["file"].as_str().and_then(|file| std::fs::read(dir.join(file)).ok()) {
            shard["xxh3_128"] = data_shards::format::checksum_hex(&bytes).into();
        }
    }
    std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
}

/// All files of a directory (name, bytes), sorted.
pub fn dir_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// SmolLM2-135M-Instruct's chat template: ChatML with a default system prompt when there is none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A Hugging Face model directory for chat data in `root/name`: a BPE tokenizer trained on a generated corpus
/// with the special tokens `<|im_start|>` and `<|im_end|>` added, and a `tokenizer_config.json` holding
/// `template` and `eos_token` `<|im_end|>`.
pub fn chat_model_dir(root: &Path, name: &str, template: &str) -> PathBuf {
    let corpus = root.join(format!("{name}-corpus"));
    write_corpus(&corpus, &make_docs(90, 5));
    let base = train(&corpus, &root.join(format!("{name}-base.json")), 400);
    let mut tok = tokenizers::Tokenizer::from_file(&base).unwrap();
    tok.add_special_tokens([
        tokenizers::AddedToken::from("<|im_start|>", true),
        tokenizers::AddedToken::from("<|im_end|>", true),
    ])
    .unwrap();
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// `n` conversations of one to three user/assistant rounds, some with a system message; every content starts
/// with a word (so that no token straddles the start of an assistant turn) and some hold non-ASCII text.
pub fn make_chats(n: usize, seed: u64) -> Vec<Vec<data_shards::Message>> {
    let texts = make_docs(n * 7, seed);
    let mut texts = texts.into_iter();
    let mut rng = Rng(seed ^ 0xC4A7);
    (0..n)
        .map(|_| {
            let mut chat = Vec::new();
            if rng.below(3) == 0 {
                chat.push(data_shards::Message::new("system", texts.next().unwrap()));
            }
            for _ in 0..1 + rng.below(3) {
                chat.push(data_shards::Message::new("user", texts.next().unwrap()));
                chat.push(data_shards::Message::new("assistant", texts.next().unwrap()));
            }
            chat
        })
        .collect()
}

/// Writes conversations as chat JSONL (`{"messages": [...]}` per line).
pub fn write_chats(path: &Path, chats: &[Vec<data_shards::Message>]) {
    let lines: Vec<String> = chats.iter().map(|c| serde_json::json!({ "messages": c }).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}
