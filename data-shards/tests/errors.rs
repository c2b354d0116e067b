//! User-facing errors through the CLI: each bad input names the file and says what to do.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use data_shards::{Split, TokenDataset};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    tok: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let corpus = root.join("corpus");
    write_corpus(&corpus, &make_docs(90, 11));
    let tok = train(&corpus, &root.join("tok.json"), 400);
    Fixture { _tmp: tmp, root, tok }
}

fn prepare_args<'a>(input: &'a str, tok: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["prepare", "--input", input, "--tokenizer", tok, "--output", out, "--shard-tokens", "1000"]
}

/// A prepared dataset in `root/ds`.
fn prepared(f: &Fixture) -> PathBuf {
    let out = f.root.join("ds");
    let corpus = f.root.join("corpus");
    let mut args = prepare_args(corpus.to_str().unwrap(), f.tok.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--doc-separator", "%"]);
    assert_ok(&run(&args, &[]));
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_input() {
    let f = fixture();
    let missing = f.root.join("nope.txt");
    let out = f.root.join("out");
    let r = run(&prepare_args(s(&missing), s(&f.tok), s(&out)), &[]);
    assert_fails_with(&r, &[s(&missing), "no such file or directory", "--input"]);
    assert!(!out.exists());
}

#[test]
fn missing_tokenizer() {
    let f = fixture();
    let tok = f.root.join("missing-tok.json");
    let corpus = f.root.join("corpus");
    let r = run(&prepare_args(s(&corpus), s(&tok), s(&f.root.join("out"))), &[]);
    assert_fails_with(&r, &[s(&tok), "not found", "train-tokenizer"]);
}

#[test]
fn empty_input_file_and_directory() {
    let f = fixture();
    let empty = f.root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = f.root.join("out");
    let r = run(&prepare_args(s(&empty), s(&f.tok), s(&out)), &[]);
    assert_fails_with(&r, &[s(&empty), "file is empty"]);

    let blank = f.root.join("blank.txt");
    std::fs::write(&blank, "%\n  \n%\n").unwrap();
    let mut args = prepare_args(s(&blank), s(&f.tok), s(&out));
    args.extend(["--doc-separator", "%"]);
    assert_fails_with(&run(&args, &[]), &[s(&blank), "no documents"]);

    let dir = f.root.join("emptydir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("x.dat"), "binary").unwrap();
    let mut args = prepare_args(s(&dir), s(&f.tok), s(&out));
    args.extend(["--exclude", "*.dat"]);
    assert_fails_with(&run(&args, &[]), &[s(&dir), "no input files"]);
    assert!(!out.exists());
}

#[test]
fn non_utf8_text() {
    let f = fixture();
    let bad = f.root.join("latin1.txt");
    std::fs::write(&bad, b"line one\ncaf\xe9\n").unwrap();
    let r = run(&prepare_args(s(&bad), s(&f.tok), s(&f.root.join("out"))), &[]);
    assert_fails_with(&r, &[s(&bad), "not valid UTF-8 at byte 12 (line 2)", "--exclude"]);
}

#[test]
fn jsonl_line_without_field() {
    let f = fixture();
    let bad = f.root.join("docs.jsonl");
    std::fs::write(&bad, "{\"text\": \"one\"}\n\n{\"content\": \"two\"}\n{\"text\": \"three\"}\n").unwrap();
    let r = run(&prepare_args(s(&bad), s(&f.tok), s(&f.root.join("out"))), &[]);
    assert_fails_with(&r, &[s(&bad), "line 3", "no field \"text\"", "--jsonl-field"]);
    // The right field name works.
    let good = f.root.join("good.jsonl");
    std::fs::write(&good, "{\"content\": \"two\"}\n").unwrap();
    let out = f.root.join("out2");
    let mut args = prepare_args(s(&good), s(&f.tok), s(&out));
    args.extend(["--jsonl-field", "content"]);
    assert_ok(&run(&args, &[]));
    let bad_json = f.root.join("broken.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"ok\"}\n{\"text\": \n").unwrap();
    let r = run(&prepare_args(s(&bad_json), s(&f.tok), s(&f.root.join("o3"))), &[]);
    assert_fails_with(&r, &[s(&bad_json), "line 2", "invalid JSON"]);
}

#[test]
fn truncated_shard() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00000.bin");
    let len = std::fs::metadata(&shard).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&shard).unwrap();
    file.set_len(len - 10).unwrap();
    for cmd in ["verify", "inspect"] {
        let r = run(&[cmd, s(&ds)], &[]);
        assert_fails_with(&r, &[s(&shard), "truncated", "re-run `data-shards prepare`"]);
    }
    file.set_len(20).unwrap();
    assert_fails_with(&run(&["verify", s(&ds)], &[]), &[s(&shard), "shorter than the 64-byte header"]);
}

#[test]
fn flipped_byte_is_caught_by_verify() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    // Opening is cheap and does not notice; verify does.
    assert_ok(&run(&["inspect", s(&ds)], &[]));
    let r = run(&["verify", s(&ds)], &[]);
    assert_fails_with(
        &r,
        &[s(&shard), "checksum mismatch (expected ", "the file is corrupted, re-run `data-shards prepare`"],
    );
}

#[test]
fn wrong_magic() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0..8].copy_from_slice(b"NOTSHARD");
    std::fs::write(&shard, &bytes).unwrap();
    let r = run(&["inspect", s(&ds)], &[]);
    assert_fails_with(&r, &[s(&shard), "bad magic bytes", "NOTSHARD"]);
}

#[test]
fn wrong_version() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("valid-00000.bin");
    let shard = if shard.exists() { shard } else { ds.join("train-00000.bin") };
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let r = run(&["verify", s(&ds)], &[]);
    assert_fails_with(&r, &[s(&shard), "format version 99 is not supported"]);
}

#[test]
fn header_disagreeing_with_manifest() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[16] ^= 0x02; // token count
    std::fs::write(&shard, &bytes).unwrap();
    let r = run(&["dump-docs", s(&ds)], &[]);
    assert_fails_with(&r, &[s(&shard), "does not match the manifest"]);
    std::fs::remove_file(ds.join("manifest.json")).unwrap();
    let r = run(&["inspect", s(&ds)], &[]);
    assert_fails_with(&r, &["manifest.json", "re-run `data-shards prepare`"]);
}

#[test]
fn unknown_dtype_is_a_usage_error() {
    // "Vocab too large for u16" is tested with a real 70000-token tokenizer in tests/prepare.rs.
    let f = fixture();
    let corpus = f.root.join("corpus");
    let mut args = prepare_args(s(&corpus), s(&f.tok), "unused");
    args.extend(["--dtype", "u8"]);
    let r = run(&args, &[]);
    assert_eq!(r.status.code(), Some(2), "clap usage error");
}

#[test]
fn seq_len_longer_than_data_via_cli() {
    let f = fixture();
    let ds = prepared(&f);
    let r = run(&["bench-loader", s(&ds), "--seq-len", "100000", "--seconds", "0.01"], &[]);
    assert_fails_with(&r, &["seq_len 100000 is longer than the data (", s(&ds)]);
}

#[test]
fn megatron_problems_name_the_file() {
    let f = fixture();
    let prefix = f.root.join("mg");
    let r = run(&["inspect", "--megatron", s(&prefix)], &[]);
    assert_fails_with(&r, &["mg.idx", "file not found"]);
    // Index for 2 documents of 3 int32 tokens; .bin one token short.
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend(1u64.to_le_bytes());
    idx.push(4);
    idx.extend(2u64.to_le_bytes());
    idx.extend(3u64.to_le_bytes());
    for l in [3i32, 3] {
        idx.extend(l.to_le_bytes());
    }
    for p in [0i64, 12] {
        idx.extend(p.to_le_bytes());
    }
    for d in [0i64, 1, 2] {
        idx.extend(d.to_le_bytes());
    }
    std::fs::write(prefix.with_extension("idx"), &idx).unwrap();
    let tokens: Vec<u8> = (1i32..=5).flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(prefix.with_extension("bin"), &tokens).unwrap();
    let r = run(&["dump-docs", "--megatron", s(&prefix)], &[]);
    assert_fails_with(&r, &["mg.bin", "20 bytes", "6 tokens"]);
    let tokens: Vec<u8> = (1i32..=6).flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(prefix.with_extension("bin"), &tokens).unwrap();
    let out = assert_ok(&run(&["dump-docs", "--megatron", s(&prefix)], &[]));
    assert_eq!(out, "[1,2,3]\n[4,5,6]\n");
    idx[9] = 2;
    std::fs::write(prefix.with_extension("idx"), &idx).unwrap();
    let r = run(&["inspect", "--megatron", s(&prefix)], &[]);
    assert_fails_with(&r, &["mg.idx", "format version 2 is not supported"]);
}

#[test]
fn dataset_without_its_tokenizer() {
    let f = fixture();
    let ds = prepared(&f);
    let tok = ds.join("tokenizer.json");
    std::fs::remove_file(&tok).unwrap();
    for args in [vec!["verify", s(&ds)], vec!["inspect", s(&ds)], vec!["decode", s(&ds), "--len", "5"]] {
        assert_fails_with(&run(&args, &[]), &[s(&tok), "missing", "tokenizer.json"]);
    }
    // The library names it too (the trainer opens its data with TokenDataset::open).
    let err = TokenDataset::open(&ds, Split::Train).unwrap_err().to_string();
    assert!(err.contains(s(&tok)) && err.contains("missing"), "{err}");
}

#[test]
fn document_table_past_the_end_is_an_error_not_an_allocation() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let num_tokens = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let table = 64 + 2 * num_tokens;
    bytes[table..table + 8].copy_from_slice(&(1u64 << 41).to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    let r = run(&["dump-docs", s(&ds)], &[]);
    assert_fails_with(&r, &[s(&shard), "document 0 spans tokens 0..2199023255552", "re-run `data-shards prepare`"]);
    rewrite_checksums(&ds);
    assert_fails_with(&run(&["verify", s(&ds)], &[]), &[s(&shard), "document 0 ends at token 2199023255552"]);
}

#[test]
fn token_ids_outside_the_vocabulary_are_found_by_verify() {
    let f = fixture();
    let ds = prepared(&f);
    let shard = ds.join("train-00001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[64 + 2 * 7..64 + 2 * 8].copy_from_slice(&60000u16.to_le_bytes());
    std::fs::write(&shard, &bytes).unwrap();
    rewrite_checksums(&ds);
    let r = run(&["verify", s(&ds)], &[]);
    assert_fails_with(&r, &[s(&shard), "token 60000 at position 7 is outside the vocabulary of 400"]);
}
