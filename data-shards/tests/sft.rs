//! Fine-tuning data: chat and prompt/completion examples into loss-masked shards (format version 2), the masks and positions of training windows, version 1 data through the same API, and refused inputs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use data_shards::{
    load_tokenizer, prepare_sft, ChatTemplate, CorpusOptions, DataCursor, DatasetWriter, Dtype, ManifestMeta, Message,
    RankLoader, SftFormat, SftOptions, Split, TokenDataset, WindowSampler,
};

/// Prepares chat JSONL `input` with the model in `model` into `out` (small shards, no validation split).
fn prepare_chats(model: &Path, input: &Path, out: &Path) -> data_shards::PrepareReport {
    let mut opts = SftOptions::new(
        SftFormat::Chat,
        CorpusOptions::new(vec![input.to_path_buf()]),
        Some(model.to_path_buf()),
        out.to_path_buf(),
    );
    opts.valid_fraction = 0.0;
    opts.shard_tokens = 1500;
    prepare_sft(&opts).unwrap()
}

/// The runs of consecutive tokens with mask 1, decoded.
fn masked_runs(tok: &tokenizers::Tokenizer, tokens: &[u32], mask: &[u8]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&t, &m) in tokens.iter().zip(mask) {
        if m == 1 {
            run.push(t);
        } else if !run.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut run), false).unwrap());
        }
    }
    if !run.is_empty() {
        runs.push(tok.decode(&run, false).unwrap());
    }
    runs
}

#[test]
fn chat_mask_marks_exactly_the_assistant_contents_and_their_end_of_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model_dir(tmp.path(), "model", CHATML_TEMPLATE);
    let chats = make_chats(60, 3);
    let input = tmp.path().join("chats.jsonl");
    write_chats(&input, &chats);
    let out = tmp.path().join("ds");
    let report = prepare_chats(&model, &input, &out);
    assert_eq!(report.manifest.format_version, 2);
    assert_eq!(report.manifest.eos_token.as_deref(), Some("<|im_end|>"));

    let tok = load_tokenizer(&model.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::from_model_dir(&model).unwrap();
    let ds = TokenDataset::open(&out, Split::Train).unwrap();
    assert!(ds.has_loss_mask() && ds.num_shards() > 1);
    ds.verify_checksums().unwrap();
    assert_eq!(ds.num_documents(), chats.len() as u64);
    let mut trained = 0u64;
    for (i, chat) in chats.iter().enumerate() {
        let text = template.render(chat, false).unwrap();
        let expected = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let tokens = ds.document(i as u64).unwrap();
        let mask = ds.document_loss_mask(i as u64).unwrap();
        assert_eq!(tokens, expected, "conversation {i}");
        let contents: Vec<String> =
            chat.iter().filter(|m| m.role == "assistant").map(|m| format!("{}<|im_end|>", m.content)).collect();
        assert_eq!(masked_runs(&tok, &tokens, &mask), contents, "conversation {i}");
        trained += mask.iter().map(|&m| u64::from(m)).sum::<u64>();
    }
    assert_eq!(ds.num_loss_tokens(), Some(trained));
}

#[test]
fn prompt_completion_masks_the_prompt_and_trains_the_completion_and_end_of_turn() {
    let tmp = tempfile::tempdir().unwrap();
    // A base model's directory: a tokenizer and an eos_token, no chat template.
    let model = chat_model_dir(tmp.path(), "model", CHATML_TEMPLATE);
    std::fs::write(model.join("tokenizer_config.json"), r#"{"eos_token": "<|im_end|>"}"#).unwrap();
    let pairs = [
        ("Question: what does the model learn?\nAnswer:", " tokens from data shards\n"),
        ("résumé of", " naïve 日本語 emoji🙂"),
    ];
    let lines: Vec<String> =
        pairs.iter().map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string()).collect();
    let input = tmp.path().join("pc.jsonl");
    std::fs::write(&input, lines.join("\n\n")).unwrap();
    let out = tmp.path().join("ds");
    let mut opts = SftOptions::new(
        SftFormat::PromptCompletion,
        CorpusOptions::new(vec![input.clone()]),
        Some(model.clone()),
        out.clone(),
    );
    opts.valid_fraction = 0.0;
    prepare_sft(&opts).unwrap();
    let tok = load_tokenizer(&model.join("tokenizer.json")).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let ds = TokenDataset::open(&out, Split::Train).unwrap();
    assert_eq!(ds.eos_id(), Some(im_end));
    for (i, (prompt, completion)) in pairs.iter().enumerate() {
        let tokens = ds.document(i as u64).unwrap();
        let mask = ds.document_loss_mask(i as u64).unwrap();
        let mut expected = tok.encode(format!("{prompt}{completion}"), false).unwrap().get_ids().to_vec();
        expected.push(im_end);
        assert_eq!(tokens, expected);
        let cut = mask.iter().position(|&m| m == 1).unwrap();
        assert!(mask[cut..].iter().all(|&m| m == 1), "the mask is 0s then 1s");
        assert_eq!(tok.decode(&tokens[..cut], false).unwrap(), *prompt);
        assert_eq!(tok.decode(&tokens[cut..], false).unwrap(), format!("{completion}<|im_end|>"));
    }
}

/// The documents of a single-shard split laid end to end: tokens, mask, and each token's document start.
fn flat(ds: &TokenDataset) -> (Vec<i64>, Vec<u8>, Vec<u64>) {
    let (mut tokens, mut mask, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ds.num_documents() {
        let doc = ds.document(i).unwrap();
        let start = tokens.len() as u64;
        starts.extend(std::iter::repeat_n(start, doc.len()));
        tokens.extend(doc.iter().map(|&t| i64::from(t)));
        mask.extend(ds.document_loss_mask(i).unwrap());
    }
    (tokens, mask, starts)
}

/// Every window of `sampler` (one shard) against `flat`: same tokens, mask, and positions restarting at 0 at
/// the window's start and at each document start.
fn check_windows(sampler: &WindowSampler, ds: &TokenDataset) {
    let (tokens, mask, starts) = flat(ds);
    let w = sampler.seq_len() + 1;
    let (mut t, mut m, mut p) = (vec![0i64; w], vec![0u8; w], vec![0i64; w]);
    for i in 0..sampler.num_windows() {
        sampler.masked_window_into(i, &mut t, &mut m, &mut p);
        let (shard, start) = sampler.window_location(sampler.window_id(i));
        assert_eq!(shard, 0);
        let a = start as usize;
        assert_eq!(t, tokens[a..a + w]);
        assert_eq!(m, mask[a..a + w]);
        let expected: Vec<i64> = (a..a + w).map(|j| (j as u64 - starts[j].max(start)) as i64).collect();
        assert_eq!(p, expected, "window {i} at {start}");
    }
}

#[test]
fn windows_carry_the_mask_and_positions_that_restart_per_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model_dir(tmp.path(), "model", CHATML_TEMPLATE);
    let input = tmp.path().join("chats.jsonl");
    write_chats(&input, &make_chats(40, 9));
    let out = tmp.path().join("ds");
    let mut opts = SftOptions::new(SftFormat::Chat, CorpusOptions::new(vec![input]), Some(model), out.clone());
    opts.valid_fraction = 0.0;
    prepare_sft(&opts).unwrap();
    let ds = Arc::new(TokenDataset::open(&out, Split::Train).unwrap());
    assert_eq!(ds.num_shards(), 1);
    // Windows both shorter than a conversation (it is cut) and holding several.
    for seq_len in [7, 64, 300] {
        check_windows(&WindowSampler::new(ds.clone(), seq_len, 5).unwrap(), &ds);
    }
    // The loader gives the same windows as next_batch, with their masks and positions, per rank.
    let seq = 64;
    let mut plain = RankLoader::new(WindowSampler::new(ds.clone(), seq, 1).unwrap(), 1, 2, DataCursor::default());
    let mut masked = RankLoader::new(WindowSampler::new(ds.clone(), seq, 1).unwrap(), 1, 2, DataCursor::default());
    let check = WindowSampler::new(ds.clone(), seq, 1).unwrap();
    for _ in 0..3 {
        let range = masked.next_indices(4);
        let batch = masked.next_masked_batch(4);
        assert_eq!(batch.tokens, plain.next_batch(4));
        assert_eq!(batch.loss_mask.len(), batch.tokens.len());
        for (row, gi) in range.enumerate() {
            let (mut t, mut m, mut p) = (vec![0i64; seq + 1], vec![0u8; seq + 1], vec![0i64; seq + 1]);
            check.masked_window_into(gi, &mut t, &mut m, &mut p);
            let r = row * (seq + 1)..(row + 1) * (seq + 1);
            assert_eq!((&batch.loss_mask[r.clone()], &batch.positions[r]), (&m[..], &p[..]));
        }
    }
    assert_eq!(masked.cursor(), plain.cursor());
}

#[test]
fn version_1_data_reads_unchanged_with_an_all_ones_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(50, 2));
    let tok = train(&corpus, &tmp.path().join("tok.json"), 400);
    let out = tmp.path().join("ds");
    let mut o = data_shards::PrepareOptions::new(corpus_options(&corpus), tok, out.clone());
    o.valid_fraction = 0.0;
    data_shards::prepare(&o).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format_version"], 1);
    assert!(manifest["splits"]["train"].get("num_loss_tokens").is_none());
    let shard = std::fs::read(out.join("train-00000.bin")).unwrap();
    assert_eq!(u32::from_le_bytes(shard[8..12].try_into().unwrap()), 1);
    let ds = Arc::new(TokenDataset::open(&out, Split::Train).unwrap());
    assert!(!ds.has_loss_mask() && ds.num_loss_tokens().is_none());
    let (_, mask, _) = flat(&ds);
    assert!(mask.iter().all(|&m| m == 1));
    check_windows(&WindowSampler::new(ds.clone(), 50, 3).unwrap(), &ds);
    let text = assert_ok(&run(&["dump-docs", out.to_str().unwrap(), "--mask"], &[]));
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["tokens"].as_array().unwrap().len(), first["loss_mask"].as_array().unwrap().len());
}

/// A masked dataset written directly: documents across shard files, with random masks.
fn written_masked(dir: &Path) -> Vec<(Vec<u32>, Vec<u8>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = DatasetWriter::new_masked(dir, Dtype::U16, 100);
    let mut rng = Rng(11);
    let docs: Vec<(Vec<u32>, Vec<u8>)> = (0..40)
        .map(|_| {
            let len = 1 + rng.below(70) as usize;
            ((0..len).map(|_| rng.below(500) as u32).collect(), (0..len).map(|_| rng.below(2) as u8).collect())
        })
        .collect();
    for (tokens, mask) in &docs {
        w.push_masked_tokens(Split::Train, tokens, mask).unwrap();
        w.end_document(Split::Train).unwrap();
    }
    w.finish(ManifestMeta { tokenizer: None, vocab_size: 500, eos_token: None, eos_id: None, valid_fraction: 0.0 })
        .unwrap();
    docs
}

#[test]
fn written_masks_read_back_and_damage_to_them_is_found() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let docs = written_masked(&dir);
    let ds = TokenDataset::open(&dir, Split::Train).unwrap();
    assert!(ds.num_shards() > 1);
    for (i, (tokens, mask)) in docs.iter().enumerate() {
        assert_eq!(&ds.document(i as u64).unwrap(), tokens);
        assert_eq!(&ds.document_loss_mask(i as u64).unwrap(), mask);
    }
    ds.verify_checksums().unwrap();
    let d = dir.to_str().unwrap();
    assert!(assert_ok(&run(&["verify", d], &[])).contains("ok: train split"));
    assert!(assert_ok(&run(&["inspect", d], &[])).contains("trained: loss mask"));

    // A flipped mask bit, and a bit set past the last token, with the checksums made to match.
    let shard = dir.join("train-00000.bin");
    let pristine = std::fs::read(&shard).unwrap();
    let last = pristine.len() - 1;
    let tokens = u64::from_le_bytes(pristine[16..24].try_into().unwrap());
    let mut damaged = Vec::new();
    let mut flipped = pristine.clone();
    flipped[last] ^= 1;
    damaged.push((flipped, "the loss mask marks"));
    if tokens % 8 != 0 {
        let mut padding = pristine.clone();
        padding[last] |= 0x80;
        damaged.push((padding, "bits set past the last token"));
    }
    for (bytes, needle) in damaged {
        std::fs::write(&shard, bytes).unwrap();
        rewrite_checksums(&dir);
        assert_fails_with(&run(&["verify", d], &[]), &[shard.to_str().unwrap(), needle]);
    }
    // A version 2 shard listed in a version 1 manifest.
    std::fs::write(&shard, &pristine).unwrap();
    rewrite_checksums(&dir);
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["format_version"] = 1.into();
    std::fs::write(&path, manifest.to_string()).unwrap();
    assert_fails_with(
        &run(&["inspect", d], &[]),
        &[shard.to_str().unwrap(), "format version 2 in header, 1 in manifest"],
    );
}

struct Refused {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
}

fn refused() -> Refused {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = chat_model_dir(&root, "model", CHATML_TEMPLATE);
    Refused { _tmp: tmp, root, model }
}

/// `prepare --format chat` of a file whose second line is `bad`; it must fail naming the file, line 2 and
/// `needles`, and leave no output.
fn assert_line_refused(f: &Refused, model: &Path, bad: &str, needles: &[&str]) {
    let input = f.root.join("bad.jsonl");
    let good = serde_json::json!({"messages": [Message::new("user", "hi"), Message::new("assistant", "hello")]});
    std::fs::write(&input, format!("{good}\n{bad}\n{good}\n")).unwrap();
    let out = f.root.join("out");
    let args = ["prepare", "--format", "chat", "--model-dir", model.to_str().unwrap(), "--input"];
    let mut args = args.to_vec();
    args.extend([input.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    let mut all = vec![input.to_str().unwrap(), "line 2"];
    all.extend_from_slice(needles);
    assert_fails_with(&run(&args, &[]), &all);
    assert!(!out.exists());
}

#[test]
fn bad_conversations_are_refused_naming_file_and_line() {
    let f = refused();
    let m = &f.model;
    let user = r#"{"role": "user", "content": "hi"}"#;
    let assistant = r#"{"role": "assistant", "content": "yes"}"#;
    assert_line_refused(
        &f,
        m,
        &format!(r#"{{"messages": [{user}, {{"role": "tool", "content": "x"}}, {assistant}]}}"#),
        &["messages[1] has role \"tool\""],
    );
    assert_line_refused(
        &f,
        m,
        &format!(r#"{{"messages": [{user}, {{"role": "assistant", "content": [{{"type": "text"}}]}}]}}"#),
        &["messages[1].content is not a string (found an array)"],
    );
    assert_line_refused(
        &f,
        m,
        &format!(r#"{{"messages": [{user}, {{"role": "assistant", "content": null}}]}}"#),
        &["messages[1].content is not a string (found null)"],
    );
    assert_line_refused(&f, m, &format!(r#"{{"messages": [{user}]}}"#), &["no assistant message"]);
    assert_line_refused(&f, m, r#"{"messages": []}"#, &["no messages"]);
    assert_line_refused(&f, m, r#"{"conversations": []}"#, &["no field \"messages\""]);
    assert_line_refused(&f, m, &format!(r#"{{"messages": [{user}, {assistant}"#), &["invalid JSON"]);
    // A template that renders an earlier turn differently once later ones follow (with a system message).
    let odd = chat_model_dir(
        &f.root,
        "odd",
        &CHATML_TEMPLATE.replace(
            "{% endfor %}",
            "{% if loop.last and messages[0].role == 'system' %}<|end|>{% endif %}{% endfor %}",
        ),
    );
    assert_line_refused(
        &f,
        &odd,
        &format!(r#"{{"messages": [{{"role": "system", "content": "s"}}, {user}, {assistant}]}}"#),
        &["assistant message 2 cannot be told apart"],
    );
    // raise_exception in the template.
    let strict = chat_model_dir(&f.root, "strict", &format!("{{% if messages[0].role == 'system' %}}{{{{ raise_exception('no system messages') }}}}{{% endif %}}{CHATML_TEMPLATE}"));
    assert_line_refused(
        &f,
        &strict,
        &format!(r#"{{"messages": [{{"role": "system", "content": "s"}}, {user}, {assistant}]}}"#),
        &["strict/tokenizer_config.json", "no system messages"],
    );
}

#[test]
fn bad_options_and_model_directories_are_refused() {
    let f = refused();
    let input = f.root.join("chats.jsonl");
    write_chats(&input, &make_chats(3, 1));
    let [i, m, out] = [input.clone(), f.model.clone(), f.root.join("out")].map(|p| p.to_str().unwrap().to_owned());
    let chat = |extra: &[&str]| {
        let mut args = vec!["prepare", "--format", "chat", "--input", &i, "--output", &out];
        args.extend_from_slice(extra);
        run(&args, &[])
    };
    assert_fails_with(&chat(&[]), &["--format chat needs --model-dir"]);
    assert_fails_with(
        &chat(&["--model-dir", &m, "--add-special-tokens"]),
        &["--add-special-tokens does not go with --format chat"],
    );
    assert_fails_with(&chat(&["--model-dir", &m, "--jsonl-field", "x"]), &["--jsonl-field is for --format text"]);
    assert_fails_with(&chat(&["--model-dir", &m, "--eos-token", "<none>"]), &["\"<none>\" is not in the vocabulary"]);
    let bare = f.root.join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(f.model.join("tokenizer.json"), bare.join("tokenizer.json")).unwrap();
    assert_fails_with(&chat(&["--model-dir", bare.to_str().unwrap()]), &[bare.to_str().unwrap(), "no chat template"]);
    std::fs::write(bare.join("tokenizer_config.json"), "{not json").unwrap();
    assert_fails_with(&chat(&["--model-dir", bare.to_str().unwrap()]), &["bare/tokenizer_config.json", "invalid JSON"]);
    std::fs::write(bare.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
    std::fs::write(bare.join("tokenizer_config.json"), "{}").unwrap();
    assert_fails_with(&chat(&["--model-dir", bare.to_str().unwrap()]), &["bare/chat_template.jinja", "cannot parse"]);
    assert!(!Path::new(&out).exists());
    let text = ["prepare", "--input", &i, "--output", &out, "--model-dir", &m];
    assert_fails_with(&run(&text, &[]), &["--model-dir is for --format chat and prompt-completion"]);

    // --force replaces a fine-tuning dataset like any other that prepare wrote.
    assert_ok(&chat(&["--model-dir", &m]));
    assert_fails_with(&chat(&["--model-dir", &m]), &["already exists"]);
    assert_ok(&chat(&["--model-dir", &m, "--force"]));
    assert!(assert_ok(&run(&["verify", &out], &[])).contains("ok: valid split"));
}
