//! Integration tests of `prepare`: token round trip, splits, sharding, determinism, publishing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use data_shards::{load_tokenizer, Dtype, Manifest, Split, TokenDataset};

#[test]
fn round_trip_matches_tokenizer_encode_plus_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let docs = write_corpus(&corpus, &make_docs(300, 1));
    let tok_path = train(&corpus, &tmp.path().join("tok.json"), 600);
    let out = tmp.path().join("ds");
    let report = prepare_dir(&corpus, &tok_path, &out, 0.2);

    let tok = load_tokenizer(&tok_path).unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(eos, 0);
    let expected: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            let mut ids = tok.encode(d.as_str(), false).unwrap().get_ids().to_vec();
            ids.push(eos);
            ids
        })
        .collect();

    let train = TokenDataset::open(&out, Split::Train).unwrap();
    let valid = TokenDataset::open(&out, Split::Valid).unwrap();
    assert_eq!(train.eos_id(), Some(0));
    assert_eq!(train.vocab_size(), Some(600));
    assert_eq!(train.dtype(), Dtype::U16);
    assert!(train.num_shards() > 1, "small --shard-tokens must roll over");
    assert!(valid.num_documents() > 0 && train.num_documents() > valid.num_documents());
    assert_eq!(train.num_documents() + valid.num_documents(), docs.len() as u64);
    assert_eq!(train.tokenizer_path().unwrap(), out.join("tokenizer.json"));
    train.verify_checksums().unwrap();
    valid.verify_checksums().unwrap();

    // Every document lands, in order, in the split its content hash picks.
    let (mut ti, mut vi) = (0u64, 0u64);
    for (doc, exp) in docs.iter().zip(&expected) {
        let in_valid = data_shards::prepare::is_valid_document(doc, 0.2);
        let got = if in_valid {
            vi += 1;
            valid.document(vi - 1).unwrap()
        } else {
            ti += 1;
            train.document(ti - 1).unwrap()
        };
        assert_eq!(&got, exp, "document {doc:?}");
    }
    assert_eq!((ti, vi), (train.num_documents(), valid.num_documents()));
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    assert_eq!(train.num_tokens() + valid.num_tokens(), total);
    // Token windows across shard boundaries agree with documents.
    let flat: Vec<u32> = (0..train.num_documents()).flat_map(|i| train.document(i).unwrap()).collect();
    assert_eq!(train.tokens(0, train.num_tokens()), flat);

    let m = Manifest::load(&out).unwrap();
    assert_eq!(m, report.manifest);
    assert_eq!(m.split(Split::Train).num_tokens, train.num_tokens());
}

#[test]
fn prepare_is_deterministic_across_runs_and_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(400, 2));
    let tok = train(&corpus, &tmp.path().join("tok.json"), 500);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    prepare_dir(&corpus, &tok, &a, 0.1);
    prepare_dir(&corpus, &tok, &b, 0.1);
    assert_eq!(dir_contents(&a), dir_contents(&b));

    let mut outs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = tmp.path().join(format!("t{threads}"));
        let args = prepare_args(&corpus, &tok, &out, &["--valid-fraction", "0.1", "--shard-tokens", "2000"]);
        assert_ok(&run(&args, &[("RAYON_NUM_THREADS", threads)]));
        outs.push(dir_contents(&out));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    assert_eq!(outs[0], dir_contents(&a), "CLI and library agree");
    // No temporary directories are left behind.
    let names: HashSet<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn refuses_to_overwrite_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(60, 3));
    let tok = train(&corpus, &tmp.path().join("tok.json"), 400);
    let out = tmp.path().join("ds");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "old").unwrap();
    let base = prepare_args(&corpus, &tok, &out, &[]);
    assert_fails_with(&run(&base, &[]), &[out.to_str().unwrap(), "already exists", "--force"]);
    assert!(out.join("keep.txt").exists());
    // --force replaces only a dataset that `prepare` wrote: keep.txt is not one.
    let mut forced = base.clone();
    forced.push("--force");
    assert_fails_with(&run(&forced, &[]), &[out.to_str().unwrap(), "has no data-shards manifest.json"]);
    assert_eq!(dir_contents(&out), [("keep.txt".to_string(), b"old".to_vec())]);

    let ds = tmp.path().join("ds2");
    let base = prepare_args(&corpus, &tok, &ds, &["--valid-fraction", "0.5"]);
    assert_ok(&run(&base, &[]));
    assert_fails_with(&run(&base, &[]), &[ds.to_str().unwrap(), "already exists", "--force"]);
    let mut forced = prepare_args(&corpus, &tok, &ds, &["--valid-fraction", "0"]);
    forced.push("--force");
    assert_ok(&run(&forced, &[]));
    let out2 = String::from_utf8(run(&["verify", ds.to_str().unwrap()], &[]).stdout).unwrap();
    assert!(out2.contains("ok: train split"), "{out2}");
    // The new dataset has no validation shard: the old one's was removed with it.
    assert!(!ds.join("valid-00000.bin").exists());
    let names: HashSet<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

/// `prepare --force` of `corpus` into `output`: it must fail naming `output` and `why`, and leave every file of
/// `tmp` as it was.
fn assert_force_refused(tmp: &Path, corpus: &Path, tok: &Path, output: &Path, why: &str) {
    let before = tree(tmp);
    let r = run(&prepare_args(corpus, tok, output, &["--force"]), &[]);
    assert_fails_with(&r, &[output.to_str().unwrap(), why, "--force replaces only a dataset"]);
    assert_eq!(tree(tmp), before, "prepare --force changed files");
}

/// Every path under `dir` with its contents (None for directories and links), sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.push((path.clone(), None));
            out.extend(tree(&path));
        } else {
            out.push((path.clone(), meta.is_file().then(|| std::fs::read(&path).unwrap())));
        }
    }
    out.sort();
    out
}

#[test]
fn force_replaces_nothing_but_a_dataset_and_never_one_holding_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let corpus = root.join("corpus");
    write_corpus(&corpus, &make_docs(60, 5));
    let tok = train(&corpus, &root.join("tok.json"), 400);
    // The input corpus itself, a directory of notes, an empty directory, a file, a link to a dataset.
    assert_force_refused(root, &corpus, &tok, &corpus, &format!("contains the input {}", corpus.display()));
    let notes = root.join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "keep me").unwrap();
    assert_force_refused(root, &corpus, &tok, &notes, "has no data-shards manifest.json");
    std::fs::create_dir(root.join("empty")).unwrap();
    assert_force_refused(root, &corpus, &tok, &root.join("empty"), "has no data-shards manifest.json");
    assert_force_refused(root, &corpus, &tok, &tok, "is not a directory");
    let ds = root.join("ds");
    assert_ok(&run(&prepare_args(&corpus, &tok, &ds, &[]), &[]));
    let link = root.join("link");
    std::os::unix::fs::symlink(&ds, &link).unwrap();
    assert_force_refused(root, &corpus, &tok, &link, "is a symbolic link");
    // A dataset with a file that prepare did not write, or a subdirectory.
    std::fs::write(ds.join("notes.txt"), "mine").unwrap();
    assert_force_refused(root, &corpus, &tok, &ds, "holds notes.txt, which `prepare` did not write");
    std::fs::remove_file(ds.join("notes.txt")).unwrap();
    std::fs::create_dir(ds.join("sub")).unwrap();
    assert_force_refused(root, &corpus, &tok, &ds, "holds sub, which `prepare` did not write");
    std::fs::remove_dir(ds.join("sub")).unwrap();
    // A dataset that holds an input of this run (here a corpus file inside it, or the corpus around it).
    std::fs::copy(corpus.join("a.txt"), root.join("a.txt")).unwrap();
    let inner = ds.join("tokenizer.json");
    assert_force_refused(root, &inner, &tok, &ds, &format!("contains the input {}", inner.display()));
    let nested = corpus.join("ds");
    assert_ok(&run(&prepare_args(&root.join("a.txt"), &tok, &nested, &[]), &[]));
    assert_force_refused(root, &corpus, &tok, &nested, "contains the input");
}

#[test]
fn failed_prepare_leaves_nothing_that_looks_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus, &make_docs(60, 4));
    let tok = train(&corpus, &tmp.path().join("tok.json"), 400);
    // A bad file sorted after the good ones: the failure happens mid-way through.
    std::fs::write(corpus.join("z.txt"), b"fine\n%\nbad \xff byte\n").unwrap();
    let out = tmp.path().join("ds");
    let r = run(&prepare_args(&corpus, &tok, &out, &["--shard-tokens", "100"]), &[]);
    assert_fails_with(&r, &["z.txt", "not valid UTF-8 at byte 11 (line 3)"]);
    assert!(!out.exists());
    let mut left: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["corpus", "tok.json"], "temporary directory left behind");
}

#[test]
fn large_vocab_uses_u32_and_u16_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("big.json");
    write_word_level_tokenizer(&tok, 70_000);
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, "w5 w69998 w65536 w12 <|endoftext|> w1\n").unwrap();
    let out = tmp.path().join("ds");
    let args = |dtype: &'static str| {
        vec![
            "prepare".to_string(),
            "--input".into(),
            corpus.to_str().unwrap().into(),
            "--tokenizer".into(),
            tok.to_str().unwrap().into(),
            "--output".into(),
            out.to_str().unwrap().into(),
            "--valid-fraction".into(),
            "0".into(),
            "--dtype".into(),
            dtype.into(),
        ]
    };
    let a16 = args("u16");
    let r = run(&a16.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert_fails_with(&r, &[tok.to_str().unwrap(), "70000 tokens does not fit in u16", "--dtype u32"]);
    assert!(!out.exists());
    let auto = args("auto");
    assert_ok(&run(&auto.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]));
    let ds = Arc::new(TokenDataset::open(&out, Split::Train).unwrap());
    assert_eq!(ds.dtype(), Dtype::U32);
    assert_eq!(ds.vocab_size(), Some(70_000));
    let eos = ds.eos_id().unwrap();
    assert_eq!(ds.document(0).unwrap(), vec![5, 69998, 65536, 12, eos, 1, eos]);
    ds.verify_checksums().unwrap();
}

/// A WordLevel tokenizer.json with `n` words `w0..w{n-1}`; `<|endoftext|>` is an added token.
fn write_word_level_tokenizer(path: &std::path::Path, n: u32) {
    let mut vocab = serde_json::Map::new();
    for i in 0..n - 1 {
        vocab.insert(format!("w{i}"), i.into());
    }
    vocab.insert("<|endoftext|>".into(), (n - 1).into());
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": [{"id": n - 1, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(path, tok.to_string()).unwrap();
}
